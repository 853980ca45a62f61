#!/usr/bin/env bash
# Issue 17 sweep on one GPU (not run yet): the 30-epoch GPU recipe and candidate changes.
# Each line: name, seeds, then the flags. Training time includes the first epoch (python -m tasks.classify
# records train_time_total_s); the final test accuracy is val_acc of the last epoch. compiled_cold starts
# from an empty inductor cache (TORCHINDUCTOR_CACHE_DIR), compiled_warm reuses the one compiled_cold filled;
# shipped_write / shipped_read each start from an empty inductor cache, the second with the torch.compiler
# artifacts file (train.compile_cache) the first wrote: a cache shipped with the project.
# Usage (project root): [END=<epoch s>] bash docs/bench/classify_sweep_gpu.sh OUT_DIR [NAMES...]  (default: all)
set -uo pipefail
OUT=$1; shift; ONLY="$*"; mkdir -p "$OUT"
CACHE=/tmp/inductor_sweep
while read -r name seeds flags; do
  [ -z "$name" ] && continue
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
  [ "$name" = compiled_cold ] && rm -rf "$CACHE"
  for seed in ${seeds//,/ }; do
    if [ -n "${END:-}" ] && [ $(( $(date +%s) + 45 )) -gt "$END" ]; then echo "$name seed $seed skipped: no time"; continue; fi
    dir=$CACHE; [[ $name == shipped* ]] && dir=$(mktemp -d)  # a machine that has only the artifacts file
    TORCHINDUCTOR_CACHE_DIR=$dir timeout 150 python3 -m tasks.classify --quiet --set train.seed=$seed $flags \
      --output "/tmp/sweep/$name-$seed" > "/tmp/sweep-$name-$seed.log" 2>&1 || { echo "$name seed $seed failed"; tail -3 "/tmp/sweep-$name-$seed.log"; }
    python3 - "/tmp/sweep/$name-$seed/metrics.jsonl" "$name" "$seed" "$flags" <<'PY' | tee -a "$OUT/classify_sweep.jsonl"
import json, statistics, sys
rows = [json.loads(x) for x in open(sys.argv[1])]
print(json.dumps({"name": sys.argv[2], "seed": int(sys.argv[3]), "flags": sys.argv[4], "acc": rows[-1]["val_acc"],
                  "train_s": rows[-1]["train_time_total_s"], "first_epoch_s": rows[0]["train_time_s"],
                  "img_per_s": statistics.median(r["train_img_per_s"] for r in rows[1:] or rows), "epochs": len(rows)}))
PY
  done
done <<'RUNS'
base 7,13,21
compiled_cold 7 --compile
compiled_warm 13,21 --compile
shipped_write 7 --compile --set train.compile_cache=/tmp/classify.compile-cache
shipped_read 13 --compile --set train.compile_cache=/tmp/classify.compile-cache
e26 7 --epochs 26
b384 7 --batch-size 384
ema 7 --set optim.ema=true
mixup02 7 --set data.mixup_alpha=0.2
cutmix10 7 --set data.cutmix_alpha=1.0 --set data.random_erasing=0.0
ls0 7 --set optim.label_smoothing=0.0
w48 7 --set model.width=48
w96 7 --set model.width=96
RUNS
