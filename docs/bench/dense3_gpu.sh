#!/usr/bin/env bash
# Issue 16, second GPU session, call 2: FCOS ResNet-18 trained 8 epochs with train.compile (+ the
# CUDA-graph step, as shipped) and a compiled evaluation graph; the inference paths on its checkpoint
# (the plain recipe's if the compiled run fails); then segmentation sweep NAMES as time allows.
# Usage (project root): END=<epoch s> bash docs/bench/dense3_gpu.sh OUT_DIR [SEGMENT_NAMES...]
set -uo pipefail
OUT=$1; shift; W=/tmp/dense3; mkdir -p "$OUT" "$W"
T0=$SECONDS
CK="$W/detc/best.pt"
timeout 220 python3 -m tasks.detect --epochs 8 --compile --set train.eval_every=8 --set train.compile_inference=true \
  --quiet --output "$W/detc" > "$W/detc.log" 2>&1 || { echo "compiled detect failed"; grep -v Warn "$W/detc.log" | tail -8; }
if [ -f "$W/detc/metrics.jsonl" ]; then cp "$W/detc/metrics.jsonl" "$OUT/detect_compiled_s0.jsonl"; fi
if [ ! -f "$CK" ]; then
  CK="$W/det0/best.pt"
  timeout 100 python3 -m tasks.detect --epochs 8 --set train.eval_every=8 --quiet --output "$W/det0" > "$W/det0.log" 2>&1
fi
echo "detect done at $((SECONDS - T0)) s"
timeout 300 python3 docs/bench/detect_infer_gpu.py "$CK" "$OUT/infer_h200_c.json" --profile "$OUT/infer_profile_h200_c.txt" 2>&1 | grep -v Warn | tail -40
echo "infer done at $((SECONDS - T0)) s"
[ $# -gt 0 ] && bash docs/bench/segment_sweep_gpu.sh "$OUT" "$@"
echo "all done at $((SECONDS - T0)) s"
