#!/usr/bin/env bash
# Issue 15 on one GPU: (1) Pascal VOC read in its own layout by the two user-data recipes, on FashionScenes
# written out as a VOC tree (the GPU machine has no network, so no VOC and no ImageNet weights: weights off);
# (2) segmentation in the aspect mode against the square letterbox (ResNet-18 GPU recipe, 512 px scenes of
# mixed aspect ratios, same epochs).
# Usage (one GPU, project root): bash docs/bench/voc_gpu.sh OUT_DIR [EPOCHS]
set -uo pipefail
OUT=$1; EPOCHS=${2:-4}
mkdir -p "$OUT"; W=/tmp/voc_bench; rm -rf "$W"; mkdir -p "$W"
t0=$(date +%s)
python3 -m tasks.data.scenes --out "$W/scenes" --train 2000 --val 250 --size 512 --aspect 0.5,2 --quiet
python3 docs/bench/scenes_to_voc.py "$W/scenes" "$W/voc"
echo "data: $(( $(date +%s) - t0 )) s"
V=(--voc-root "$W/voc/VOCdevkit" --set model.weights=null --quiet)
timeout 240 python3 -m tasks.detect "${V[@]}" --config configs/detect/coco_fcos_resnet50.yaml --epochs 3 --output "$W/det" \
  || echo "voc detect failed"
cp "$W/det/metrics.jsonl" "$OUT/voc_detect_r50.jsonl"
timeout 60 python3 -m tasks.detect --weights "$W/det/best.pt" --predict "$W/voc/VOCdevkit/VOC2012/JPEGImages/val_000001.jpg" \
  "$W/voc/VOCdevkit/VOC2012/JPEGImages/val_000002.jpg" --output "$W/det_pred" && ls "$W/det_pred" | head
timeout 240 python3 -m tasks.segment "${V[@]}" --config configs/segment/voc_fcn_resnet50.yaml --epochs 2 --output "$W/seg" \
  || echo "voc segment failed"
cp "$W/seg/metrics.jsonl" "$OUT/voc_segment_r50.jsonl"
timeout 60 python3 -m tasks.segment --weights "$W/seg/best.pt" --predict "$W/voc/VOCdevkit/VOC2012/JPEGImages/val_000001.jpg" \
  --output "$W/seg_pred" && ls "$W/seg_pred" | head
# the segmentation recipe as it was when this ran (stride 32, C3-C5, no aux, eager step), spelled out
S=(--set data.scenes_size=512 --set "data.scenes_aspect=[0.5,2.0]" --set data.scenes_train=2000 --set data.scenes_val=250
   --set model.output_stride=32 --set "model.in_features=[c3,c4,c5]" --set model.aux=false --set train.cuda_graph=false)
for mode in square aspect; do
  extra=(--set data.image_size=512)
  [ "$mode" = aspect ] && extra=(--set data.resize=aspect --set "data.min_size=[384,448,512]" --set data.max_size=640)
  timeout 200 python3 -m tasks.segment --quiet --epochs "$EPOCHS" "${S[@]}" "${extra[@]}" --output "$W/seg_$mode" \
    || echo "$mode run failed"
  cp "$W/seg_$mode/metrics.jsonl" "$OUT/segment_$mode.jsonl"
done
for f in "$OUT"/*.jsonl; do
  tail -1 "$f" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('$(basename "$f")', {k: r.get(k) for k in ('epoch','val_AP','val_miou','train_img_per_s','train_pad_fraction','train_time_total_s')})"
done
