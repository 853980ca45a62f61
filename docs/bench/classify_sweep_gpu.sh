#!/usr/bin/env bash
# Issue 17 sweep on one GPU (not run yet): the 30-epoch GPU recipe and candidate changes, seeds 7 13 21.
# Each line: name, then the flags. Training time includes the first epoch (python -m tasks.classify
# records train_time_total_s); the final test accuracy is val_acc of the last epoch.
# Usage (project root): bash docs/bench/classify_sweep_gpu.sh OUT_DIR [SEEDS]
set -uo pipefail
OUT=$1; SEEDS=${2:-"7 13 21"}; mkdir -p "$OUT"
while read -r name flags; do
  [ -z "$name" ] && continue
  for seed in $SEEDS; do
    timeout 120 python3 -m tasks.classify --quiet --set train.seed=$seed $flags --output "/tmp/sweep/$name-$seed" \
      > /dev/null 2>&1 || echo "$name seed $seed failed"
    tail -1 "/tmp/sweep/$name-$seed/metrics.jsonl" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); \
print(json.dumps({'name': '$name', 'seed': $seed, 'acc': r['val_acc'], 'train_s': r['train_time_total_s']}))" \
      | tee -a "$OUT/sweep.jsonl"
  done
done <<'RUNS'
base
mixup02 --set data.mixup_alpha=0.2
cutmix10 --set data.cutmix_alpha=1.0 --set data.random_erasing=0.0
ls0 --set optim.label_smoothing=0.0
compiled --compile
RUNS
