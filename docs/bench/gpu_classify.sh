#!/usr/bin/env bash
# GPU benchmark of the classification task (issue 3), as run for docs/BENCHMARKS.md.
# From the project root on a GPU machine: bash docs/bench/gpu_classify.sh OUTDIR [extra --recipe specs]
set -uo pipefail
out=${1:-runs/bench-classify}; shift || true
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
R=configs/classify/fashion_mnist_resnet18.yaml
PYTHONUNBUFFERED=1 python3 -m tasks.bench classify --out /tmp/bench-classify \
  --recipe "$R" "$@" 2>&1 | tee "$out/log.txt"
cp /tmp/bench-classify/bench_classify.json "$out/"
cp /tmp/bench-classify/ours0/curves.png "$out/curves.png"
cp /tmp/bench-classify/ours0/confusion.png "$out/confusion.png"
