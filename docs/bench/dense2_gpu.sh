#!/usr/bin/env bash
# Issue 16, second GPU session, call 1: train the 8-epoch FCOS ResNet-18 from the device cache (its
# evaluation replays GraphedInference: checks the thread_local capture), then profile and time the
# inference paths on its checkpoint; then as much of the segmentation sweep as fits (NAMES).
# Usage (project root): bash docs/bench/dense2_gpu.sh OUT_DIR [SEGMENT_NAMES...]
set -uo pipefail
OUT=$1; shift; W=/tmp/dense2; mkdir -p "$OUT" "$W"
T0=$SECONDS
timeout 100 python3 -m tasks.detect --epochs 8 --set train.eval_every=8 --quiet --output "$W/det0" > "$W/det0.log" 2>&1 \
  || { echo "detect failed"; tail -5 "$W/det0.log"; }
cp "$W/det0/metrics.jsonl" "$OUT/detect_cache_s0_b.jsonl"; tail -1 "$OUT/detect_cache_s0_b.jsonl" | cut -c1-400
echo "detect done at $((SECONDS - T0)) s"
timeout 300 python3 docs/bench/detect_infer_gpu.py "$W/det0/best.pt" "$OUT/infer_h200_b.json" --profile "$OUT/infer_profile_h200.txt" \
  2>&1 | grep -v Warning | tail -60
echo "infer done at $((SECONDS - T0)) s"
[ $# -gt 0 ] && bash docs/bench/segment_sweep_gpu.sh "$OUT" "$@"
echo "all done at $((SECONDS - T0)) s"
