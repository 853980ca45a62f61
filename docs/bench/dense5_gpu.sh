#!/usr/bin/env bash
# Issue 16, third GPU session, call 1: the GPU tests of graphed / compiled inference, then segmentation
# sweep lines for the mIoU gap to fcn_resnet50 (soft Dice term, a second seed, ResNet-34 at stride 16).
# Usage (project root): END=<epoch s> bash docs/bench/dense5_gpu.sh OUT_DIR [SWEEP NAMES...]
set -uo pipefail
OUT=$1; shift; mkdir -p "$OUT"
T0=$SECONDS
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "graphed_inference or compiled_nms" \
  > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$? at $((SECONDS - T0)) s"; tail -3 "$OUT/gpu_tests.txt"
bash docs/bench/segment_sweep_gpu.sh "$OUT" "$@"
echo "all done at $((SECONDS - T0)) s"
