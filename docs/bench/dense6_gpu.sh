#!/usr/bin/env bash
# Issue 16, third GPU session, call 2: two more segmentation sweep lines, then the segmentation bench and
# the full 24-epoch recipe with the best line's flags (best of BASE_MIOU, the lr 3e-3 line of call 1, and
# these), then compiled one-pass multitask inference on a 4-epoch multitask checkpoint.
# Usage (project root): END=<epoch s> bash docs/bench/dense6_gpu.sh OUT_DIR
set -uo pipefail
OUT=$1; W=/tmp/dense6; mkdir -p "$OUT" "$W"
T0=$SECONDS
bash docs/bench/segment_sweep_gpu.sh "$W" recipe_lr3_ch256 recipe_lr3_dice05
cp "$W/segment_sweep.jsonl" "$OUT/"
FLAGS=$(python3 - "$W/segment_sweep.jsonl" <<'PY'
import json, sys
best = ("--set optim.lr=3e-3", 0.6917)  # recipe_lr3, call 1
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["miou"] > best[1]:
        best = (r["flags"], r["miou"])
print(best[0])
PY
)
echo "chosen: $FLAGS at $((SECONDS - T0)) s"
timeout 330 python3 -m tasks.bench segment --out "$W/bseg" --set train.epochs=8 --set train.eval_every=4 $FLAGS 2>&1 \
  | grep -v Warn | tail -6
cp "$W/bseg/bench_segment.json" "$OUT/" 2>/dev/null
echo "bench segment done at $((SECONDS - T0)) s"
timeout $(( END - $(date +%s) > 10 ? END - $(date +%s) : 10 )) python3 -m tasks.segment --quiet $FLAGS --output "$W/full" \
  > "$W/full.log" 2>&1 || { echo "full recipe failed or cut"; tail -3 "$W/full.log"; }
cp "$W/full/metrics.jsonl" "$OUT/segment_full_recipe.jsonl" 2>/dev/null; tail -1 "$W/full/metrics.jsonl" | cut -c1-400
echo "full recipe done at $((SECONDS - T0)) s"
if [ $(( $(date +%s) + 150 )) -lt "${END:-0}" ]; then
  timeout 100 python3 -m tasks.multitask --epochs 4 --set train.eval_every=4 --quiet --output "$W/mt" > "$W/mt.log" 2>&1 \
    || { echo "multitask failed"; tail -3 "$W/mt.log"; }
  timeout $(( END - $(date +%s) > 10 ? END - $(date +%s) : 10 )) python3 -m tasks.bench multitask --out "$W/bmt" \
    --weights "$W/mt/best.pt" --set train.compile_inference=true 2>&1 | grep -v Warn | tail -2 | cut -c1-1500
  cp "$W/bmt/bench_multitask.json" "$OUT/" 2>/dev/null
fi
echo "all done at $((SECONDS - T0)) s"
