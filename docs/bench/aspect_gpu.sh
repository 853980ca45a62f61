#!/usr/bin/env bash
# The aspect mode against the square letterbox, on FashionScenes rendered at 512 px with mixed aspect
# ratios (width / height 0.5-2): FCOS ResNet-18 (the GPU recipe), same epochs; then the ResNet-50 user-data
# recipe (configs/detect/coco_fcos_resnet50.yaml, weights off: no network there) against torchvision's FCOS
# ResNet-50 FPN with the same frozen-BN / trainable-layers settings, same data, same engine.
# Usage (one GPU, project root): bash docs/bench/aspect_gpu.sh OUT_DIR [EPOCHS]
set -euo pipefail
OUT=$1; EPOCHS=${2:-4}
mkdir -p "$OUT"
S=(--set data.scenes_size=512 --set "data.scenes_aspect=[0.5,2.0]" --set data.scenes_train=2000 --set data.scenes_val=250)
for mode in square aspect; do
  extra=(--set data.image_size=512)
  [ "$mode" = aspect ] && extra=(--set data.resize=aspect --set "data.min_size=[384,448,512]" --set data.max_size=640)
  timeout 200 python3 -m tasks.detect --quiet --epochs "$EPOCHS" "${S[@]}" "${extra[@]}" --output "/tmp/aspect_bench/$mode" \
    || echo "$mode run failed"
  cp "/tmp/aspect_bench/$mode/metrics.jsonl" "$OUT/detect_$mode.jsonl" || true
  tail -1 "$OUT/detect_$mode.jsonl" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('$mode', {k: r.get(k) for k in ('val_AP','train_img_per_s','train_pad_fraction','train_time_total_s')})" || true
done
timeout 300 python3 -m tasks.bench detect --out /tmp/aspect_bench/r50 --recipe configs/detect/coco_fcos_resnet50.yaml \
  --set data.dataset=scenes "${S[@]}" --set model.weights=null --set train.epochs=2 --set "data.min_size=[384,448,512]" \
  --set data.max_size=640 || echo "bench failed"
cp /tmp/aspect_bench/r50/bench_detect.json "$OUT/bench_detect_r50_aspect.json" || true
