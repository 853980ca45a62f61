#!/usr/bin/env bash
# Issue 16, detection post-processing on one GPU: train the FCOS ResNet-18 GPU recipe for 8 epochs
# (evaluation through GraphedInference), measure the inference paths on its checkpoint and on fresh
# weights, then one-pass multitask inference on a 4-epoch multitask checkpoint.
# Usage (project root): bash docs/bench/nms_gpu.sh OUT_DIR
set -uo pipefail
OUT=$1; W=/tmp/nms_bench; mkdir -p "$OUT" "$W"
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -3
timeout 200 python3 -m tasks.detect --epochs 8 --set train.eval_every=4 --quiet --output "$W/det8" || echo "detect failed"
cp "$W/det8/metrics.jsonl" "$OUT/detect8_metrics.jsonl"
timeout 200 python3 docs/bench/detect_infer_gpu.py "$W/det8/best.pt" "$OUT/infer_trained.json" || echo "infer trained failed"
timeout 100 python3 docs/bench/detect_infer_gpu.py "$W/det8/best.pt" "$OUT/infer_untrained.json" --untrained --batches 4 \
  || echo "infer untrained failed"
timeout 200 python3 -m tasks.multitask --epochs 4 --set train.eval_every=4 --quiet --output "$W/mt" || echo "multitask failed"
timeout 120 python3 -m tasks.bench multitask --out "$W/mtb" --weights "$W/mt/best.pt" && cp "$W/mtb/bench_multitask.json" "$OUT/"
