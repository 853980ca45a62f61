#!/usr/bin/env bash
# Issue 17 sweep on one GPU: the 30-epoch GPU recipe and candidate changes, one run at a time.
# Each line: name, seeds, then the flags. Training time includes the first epoch (python -m tasks.classify
# records train_time_total_s); the accuracy is val_acc (the 10k test set) of the last epoch.
# Compile lines: "cold*" start from an empty inductor cache and write the torch.compiler artifacts
# file $CCFILE; "warm*" reuse that inductor cache (a second run on the same machine); "ship*" start from an
# empty inductor cache with only the artifacts file (a cache shipped with the project).
# Usage (project root): [END=<epoch s>] bash docs/bench/classify_sweep_gpu.sh OUT_DIR [NAMES...]  (default: all; NAME:S1,S2 picks seeds)
set -uo pipefail
OUT=$1; shift; ONLY="$*"; mkdir -p "$OUT"
CACHE=/tmp/inductor_sweep; CCFILE=/tmp/classify.compile-cache  # not $CC: that names the C compiler inductor runs
while read -r name seeds flags; do
  [ -z "$name" ] && continue
  if [ -n "$ONLY" ]; then  # NAME runs the line's seeds, NAME:S1,S2 those seeds
    pick=$(tr ' ' '\n' <<< "$ONLY" | grep -E "^$name(:|$)" | head -1); [ -z "$pick" ] && continue
    [[ $pick == *:* ]] && seeds=${pick#*:}
  fi
  flags=${flags//\$CCFILE/$CCFILE}
  for seed in ${seeds//,/ }; do
    if [ -n "${END:-}" ] && [ $(( $(date +%s) + 45 )) -gt "$END" ]; then echo "$name seed $seed skipped: no time"; continue; fi
    dir=$CACHE
    case $name in cold*) rm -rf "$CACHE" "$CCFILE";; ship*) dir=$(mktemp -d);; esac
    TORCHINDUCTOR_CACHE_DIR=$dir timeout 400 python3 -m tasks.classify --quiet --set train.seed=$seed $flags \
      --output "/tmp/sweep/$name-$seed" > "/tmp/sweep-$name-$seed.log" 2>&1 || { echo "$name seed $seed failed"; tail -3 "/tmp/sweep-$name-$seed.log"; }
    python3 - "/tmp/sweep/$name-$seed/metrics.jsonl" "$name" "$seed" "$flags" <<'PY' | tee -a "$OUT/classify_sweep.jsonl"
import json, statistics, sys
rows = [json.loads(x) for x in open(sys.argv[1])]
print(json.dumps({"name": sys.argv[2], "seed": int(sys.argv[3]), "flags": sys.argv[4], "acc": rows[-1]["val_acc"],
                  "best_acc": max(r.get("val_acc", 0) for r in rows),
                  "train_s": round(rows[-1]["train_time_total_s"], 2), "first_epoch_s": round(rows[0]["train_time_s"], 2),
                  "capture_s": rows[0].get("train_capture_s"), "capture_steps": rows[0].get("train_capture_steps"),
                  "img_per_s": round(statistics.median(r["train_img_per_s"] for r in rows[1:] or rows)), "epochs": len(rows),
                  "curve": [round(r["val_acc"], 4) for r in rows if "val_acc" in r]}))
PY
  done
done <<'RUNS'
base 7,13,21
cold 7 --compile --set train.compile_cache=$CCFILE
warm 13 --compile
ship 21 --compile --set train.compile_cache=$CCFILE
ema 7 --set optim.ema=true
ls02 7 --set optim.label_smoothing=0.2
lr02 7 --set optim.lr=0.2
wu3 7,13,21 --set optim.warmup_epochs=3
cold_wu3 7 --compile --set optim.warmup_epochs=3 --set train.compile_cache=$CCFILE
warm_wu3 13 --compile --set optim.warmup_epochs=3
ship_wu3 21,7,13 --compile --set optim.warmup_epochs=3 --set train.compile_cache=$CCFILE
long_b256 7 --config configs/classify/fashion_mnist_resnet18_long.yaml --batch-size 256 --epochs 240 --set optim.warmup_epochs=24 --compile --set train.eval_every=10
ship_long_b256 13,21 --config configs/classify/fashion_mnist_resnet18_long.yaml --batch-size 256 --epochs 240 --set optim.warmup_epochs=24 --compile --set train.eval_every=10 --set train.compile_cache=$CCFILE
e26 7 --epochs 26 --set optim.warmup_epochs=8
w48 7 --set model.width=48
w96 7 --set model.width=96
mixup02 7 --set data.mixup_alpha=0.2
cutmix10 7 --set data.cutmix_alpha=1.0 --set data.random_erasing=0.0
ls0 7 --set optim.label_smoothing=0.0
b384 7 --batch-size 384
re03 7 --set data.random_erasing=0.3
re07 7 --set data.random_erasing=0.7
nobench 7,13 --set train.cudnn_benchmark=false
fp16 7,13,21 --set train.amp_dtype=float16
fp16_e26 7,13,21 --set train.amp_dtype=float16 --epochs 26 --set optim.warmup_epochs=8
fp16_e32 7,13,21 --set train.amp_dtype=float16 --epochs 32 --set optim.warmup_epochs=10
long_fp16 7,13,21 --config configs/classify/fashion_mnist_resnet18_long.yaml --set train.amp_dtype=float16
long_fp16_cutmix 7,13,21 --config configs/classify/fashion_mnist_resnet18_long.yaml --set train.amp_dtype=float16 --set data.cutmix_alpha=1.0
cold_b512 7 --compile --batch-size 512 --set optim.lr=0.2 --set train.compile_cache=$CCFILE
lim1 7 --epochs 6 --set optim.warmup_epochs=2 --set train.cudnn_benchmark_limit=1
lim2 7 --epochs 6 --set optim.warmup_epochs=2 --set train.cudnn_benchmark_limit=2
lim4 7 --epochs 6 --set optim.warmup_epochs=2 --set train.cudnn_benchmark_limit=4
lim10 7 --epochs 6 --set optim.warmup_epochs=2 --set train.cudnn_benchmark_limit=10
lim0 7 --epochs 6 --set optim.warmup_epochs=2 --set train.cudnn_benchmark_limit=0
long_e360 7,13,21 --config configs/classify/fashion_mnist_resnet18_long.yaml --epochs 360 --set optim.warmup_epochs=36
long_mixoff20 7,13,21 --config configs/classify/fashion_mnist_resnet18_long.yaml --set data.mix_off_epochs=20 --set train.eval_every=10
long_e360_mixoff36 7,13,21 --config configs/classify/fashion_mnist_resnet18_long.yaml --epochs 360 --set optim.warmup_epochs=36 --set data.mix_off_epochs=36 --set train.eval_every=10
RUNS
