#!/usr/bin/env bash
# Issue 16, second GPU session, call 3: the segmentation bench (ours: the new GPU recipe; torchvision's
# FCN head on ResNet-18; fcn_resnet50) at 8 epochs; one-pass multitask inference on a 4-epoch multitask
# checkpoint (real CUDA graphs now); the GPU tests of the graphed / compiled inference.
# Usage (project root): END=<epoch s> bash docs/bench/dense4_gpu.sh OUT_DIR
set -uo pipefail
OUT=$1; W=/tmp/dense4; mkdir -p "$OUT" "$W"
T0=$SECONDS
timeout 330 python3 -m tasks.bench segment --out "$W/bseg" --set train.epochs=8 --set train.eval_every=4 2>&1 \
  | grep -v Warn | tail -8
cp "$W/bseg/bench_segment.json" "$OUT/" 2>/dev/null
echo "bench segment done at $((SECONDS - T0)) s"
if [ $(( $(date +%s) + 120 )) -lt "${END:-0}" ]; then
  timeout 100 python3 -m tasks.multitask --epochs 4 --set train.eval_every=4 --quiet --output "$W/mt" > "$W/mt.log" 2>&1 \
    || { echo "multitask failed"; tail -3 "$W/mt.log"; }
  timeout 60 python3 -m tasks.bench multitask --out "$W/bmt" --weights "$W/mt/best.pt" 2>&1 | grep -v Warn | tail -3
  cp "$W/bmt/bench_multitask.json" "$OUT/" 2>/dev/null
fi
echo "multitask done at $((SECONDS - T0)) s"
if [ $(( $(date +%s) + 60 )) -lt "${END:-0}" ]; then
  timeout $(( END - $(date +%s) - 5 )) python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
    -k "graphed_inference or compiled_nms" 2>&1 | tail -5
fi
echo "all done at $((SECONDS - T0)) s"
