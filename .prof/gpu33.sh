set -x
mkdir -p /opt/gpu/site && for w in .prof/wheels/*.whl; do python3 -m zipfile -e "$w" /opt/gpu/site > /dev/null; done
export PYTHONPATH=/opt/gpu/site:$PWD
nvidia-smi --query-gpu=name,memory.used --format=csv
python3 benchmarks/quality.py recall --graphed --models dilated local --lengths 512 4096 16384 65536 \
  --advance-loss 1.2 --newest-share 0.6 --stage-shares 1 1 1 2 --time-budget 545 \
  --tag h200_512to64k --out $OUT > $OUT/recall64k.log 2>&1
rm -f $OUT/*.png
tail -40 $OUT/recall64k.log
