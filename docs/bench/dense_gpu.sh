#!/usr/bin/env bash
# Issue 16 on one GPU: detection and segmentation training from the device cache (data.cache=auto
# picks it on a GPU), 8 epochs; detection with two seeds; segmentation at output stride 32 and 8;
# then the detection inference paths and NMS settings on the seed-0 checkpoint.
# Usage (project root): bash docs/bench/dense_gpu.sh OUT_DIR
set -uo pipefail
OUT=$1; W=/tmp/dense_bench; mkdir -p "$OUT" "$W"
for seed in 0 1; do
  timeout 95 python3 -m tasks.detect --epochs 8 --set train.eval_every=8 --set train.seed=$seed --quiet \
    --output "$W/det$seed" || echo "detect seed $seed failed"
  cp "$W/det$seed/metrics.jsonl" "$OUT/detect_cache_s$seed.jsonl"
done
for os in 32 8; do
  timeout 80 python3 -m tasks.segment --epochs 8 --set train.eval_every=8 --set model.output_stride=$os --quiet \
    --output "$W/seg$os" || echo "segment os $os failed"
  cp "$W/seg$os/metrics.jsonl" "$OUT/segment_cache_os$os.jsonl"
done
for f in "$OUT"/*.jsonl; do
  tail -1 "$f" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('$(basename "$f")', {k: r.get(k) for k in ('val_AP','val_miou','train_img_per_s','train_time_total_s')})"
done
timeout 170 python3 docs/bench/detect_infer_gpu.py "$W/det0/best.pt" "$OUT/infer_cache_trained.json" || echo "infer failed"
