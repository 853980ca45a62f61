#!/usr/bin/env bash
# Issue 16, segmentation on one GPU: the 8-epoch GPU recipe (device cache) and candidate changes,
# one run each (seed 0 unless the flags say otherwise). The lines up to os8_c2 spell out the recipe of
# their run (stride 32, C3-C5, no aux: the recipe before 2026-12-02); recipe_* run the recipe of the day (the 2026-12-02d runs: lr 2e-3 and a 128-channel block, before
# recipe_lr3_ch256 became the recipe). Each line: name, then the flags. Records
# the last epoch's mIoU, the median img/s of epochs 2-8 and the training time (first epoch in).
# Usage (project root): bash docs/bench/segment_sweep_gpu.sh OUT_DIR [NAMES...]  (default: all)
set -uo pipefail
OUT=$1; shift; ONLY="$*"; W=/tmp/segment_sweep; mkdir -p "$OUT" "$W"
while read -r name flags; do
  [ -z "$name" ] && continue
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
  # END (epoch seconds, optional): start no run within 50 s of it
  if [ -n "${END:-}" ] && [ $(( $(date +%s) + 50 )) -gt "$END" ]; then echo "$name skipped: no time"; continue; fi
  timeout 150 python3 -m tasks.segment --epochs 8 --set train.eval_every=8 --quiet $flags --output "$W/$name" \
    > "$W/$name.log" 2>&1 || { echo "$name failed"; tail -3 "$W/$name.log"; }
  python3 - "$W/$name/metrics.jsonl" "$name" "$flags" <<'PY' | tee -a "$OUT/segment_sweep.jsonl"
import json, statistics, sys
rows = [json.loads(x) for x in open(sys.argv[1])]
print(json.dumps({"name": sys.argv[2], "flags": sys.argv[3], "miou": rows[-1]["val_miou"],
                  "img_per_s": statistics.median(r["train_img_per_s"] for r in rows[1:]),
                  "train_s": rows[-1]["train_time_total_s"], "first_epoch_s": rows[0]["train_time_s"],
                  "iou": [round(x, 4) for x in rows[-1].get("val_iou", [])]}))
PY
done <<'RUNS'
os32 --set train.cuda_graph=false --set model.output_stride=32 --set model.in_features=[c3,c4,c5] --set model.aux=false
graph --set train.cuda_graph=true --set model.output_stride=32 --set model.in_features=[c3,c4,c5] --set model.aux=false
graph_s1 --set train.cuda_graph=true --set model.output_stride=32 --set model.in_features=[c3,c4,c5] --set model.aux=false --set train.seed=1
c2 --set train.cuda_graph=true --set model.output_stride=32 --set model.in_features=[c3,c4,c5] --set model.aux=false --set model.in_features=[c2,c3,c4,c5]
os16 --set train.cuda_graph=true --set model.output_stride=32 --set model.in_features=[c3,c4,c5] --set model.aux=false --set model.output_stride=16
os16_c2 --set train.cuda_graph=true --set model.output_stride=32 --set model.in_features=[c3,c4,c5] --set model.aux=false --set model.output_stride=16 --set model.in_features=[c2,c3,c4,c5]
os16_aux --set train.cuda_graph=true --set model.output_stride=32 --set model.in_features=[c3,c4,c5] --set model.aux=false --set model.output_stride=16 --set model.aux=true
os8 --set train.cuda_graph=true --set model.output_stride=32 --set model.in_features=[c3,c4,c5] --set model.aux=false --set model.output_stride=8
os8_c2 --set train.cuda_graph=true --set model.output_stride=32 --set model.in_features=[c3,c4,c5] --set model.aux=false --set model.output_stride=8 --set model.in_features=[c2,c3,c4,c5]
os8_c2_aux --set train.cuda_graph=true --set model.output_stride=8 --set model.in_features=[c2,c3,c4,c5] --set model.aux=true
os16_c2_aux --set train.cuda_graph=true --set model.output_stride=16 --set model.in_features=[c2,c3,c4,c5] --set model.aux=true
recipe_s1 --set train.seed=1
recipe_lr3 --set optim.lr=3e-3
recipe_ch256 --set model.channels=256
recipe_dice05 --set model.dice_weight=0.5
recipe_dice1 --set model.dice_weight=1.0
recipe_dice1_s1 --set model.dice_weight=1.0 --set train.seed=1
recipe_r34_os16 --set model.depth=34 --set model.output_stride=16
recipe_drop0 --set model.dropout=0.0
recipe_lr3_ch256 --set optim.lr=3e-3 --set model.channels=256
recipe_lr3_dice05 --set optim.lr=3e-3 --set model.dice_weight=0.5
RUNS
