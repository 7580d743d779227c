mkdir -p /opt/gpu/site && for w in .prof/wheels/*.whl; do python3 -m zipfile -e "$w" /opt/gpu/site > /dev/null; done
export PYTHONPATH=/opt/gpu/site:$PWD
nproc
for round in 1 2; do for dt in float32 float16; do
  s=$(date +%s)
  timeout 100 python3 benchmarks/train.py --graphed --kinds dilated --rows av1024 --warmup 6 --steps 20 \
    --profile-steps 1 --pipelined-steps 40 --set data.init_args.media_dtype $dt \
    --tag h200_media_${dt}_r$round --out $OUT > $OUT/media_${dt}_$round.log 2>&1
  echo "$dt round $round rc=$? $(( $(date +%s) - s )) s"; tail -1 $OUT/media_${dt}_$round.log
done; done
rm -f $OUT/*.png $OUT/*.tmp
