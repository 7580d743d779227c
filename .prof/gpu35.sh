set -x
mkdir -p /opt/gpu/site && for w in .prof/wheels/*.whl; do python3 -m zipfile -e "$w" /opt/gpu/site > /dev/null; done
export PYTHONPATH=/opt/gpu/site:$PWD
nvidia-smi --query-gpu=name,memory.used --format=csv
python3 benchmarks/quality.py avdigits --graphed --models dilated local --digits 4 16 64 256 \
  --questions first last count after most --newest-share 0.6 --stage-shares 1 2 1 4 --decay-share 0.3 \
  --eval-share 0.04 --time-budget 545 --tag h200_all --out $OUT > $OUT/avall.log 2>&1
rm -f $OUT/*.png
tail -45 $OUT/avall.log
