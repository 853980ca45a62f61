#!/usr/bin/env bash
# Issue 16 on one GPU: detection and segmentation training from the device cache (data.cache=auto
# picks it on a GPU), 8 epochs; detection with two seeds; then the detection inference paths and
# NMS settings on the seed-0 checkpoint.
# Usage (project root): bash docs/bench/dense_gpu.sh OUT_DIR
set -uo pipefail
OUT=$1; W=/tmp/dense_bench; mkdir -p "$OUT" "$W"
timeout 90 python3 -m tasks.detect --epochs 8 --set train.eval_every=8 --quiet --output "$W/det0" || echo "detect failed"
cp "$W/det0/metrics.jsonl" "$OUT/detect_cache_s0.jsonl"
# the segmentation recipe of that day (stride 32, C3-C5, no aux, eager step), spelled out
timeout 70 python3 -m tasks.segment --epochs 8 --set train.eval_every=8 --set model.output_stride=32 --set "model.in_features=[c3,c4,c5]" --set model.aux=false --set train.cuda_graph=false --quiet --output "$W/seg32" || echo "segment failed"
cp "$W/seg32/metrics.jsonl" "$OUT/segment_cache_os32.jsonl"
for f in "$OUT"/*.jsonl; do
  tail -1 "$f" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('$(basename "$f")', {k: r.get(k) for k in ('val_AP','val_miou','train_img_per_s','train_time_total_s')})"
done
timeout 130 python3 docs/bench/detect_infer_gpu.py "$W/det0/best.pt" "$OUT/infer_cache_trained.json" || echo "infer failed"
timeout 80 python3 -m tasks.detect --epochs 8 --set train.eval_every=8 --set train.seed=1 --quiet --output "$W/det1" \
  && cp "$W/det1/metrics.jsonl" "$OUT/detect_cache_s1.jsonl" && tail -1 "$OUT/detect_cache_s1.jsonl"
