#!/usr/bin/env bash
# Multi-GPU scaling (issue 7): one process vs torchrun with 2 processes at the same per-GPU batch.
# From the project root on a machine with 2 GPUs (Fashion-MNIST found through $FASHION_MNIST_DIR):
#   bash docs/bench/ddp_scaling.sh OUTDIR          # classify: about 3 minutes on 2 H200s
#   SEGMENT=1 bash docs/bench/ddp_scaling.sh OUTDIR  # + segmentation (FashionScenes generated on first use)
# Classification runs the shipped GPU recipe (train.cuda_graph=true) on one GPU and on two
# (the graphed step, then one flat gradient all-reduce); EAGER=1 adds train.cuda_graph=false
# (DDP proper). Throughput = train_images / train_time_s from each run's
# metrics.jsonl (train_images counts every rank's images; evaluation excluded).
set -euo pipefail
out=${1:-runs/bench-ddp}
PY=${PYTHON:-python3}
EPOCHS=${EPOCHS:-30}        # the shipped classification recipe's length (accuracy comparable)
SEG_EPOCHS=${SEG_EPOCHS:-8}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"  # e.g. a CPU smoke test: EXTRA_ARGS="--device cpu --limit-train 512"
# NVLink multicast stays off (shared machines): NCCL, PyTorch symmetric memory, NVSHMEM
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv && nvidia-smi topo -m; } 2>&1 \
  | tee "$out/gpu.txt" || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), \
'gpus', torch.cuda.device_count())" | tee -a "$out/gpu.txt"

TORCHRUN=($PY -m torch.distributed.run --standalone --nproc_per_node=2)
C=(--config configs/classify/fashion_mnist_resnet18.yaml --epochs "$EPOCHS" "${EXTRA[@]}")
[[ "${EAGER:-0}" == 1 ]] && C+=(--set train.cuda_graph=false)

run() {  # name, command...
  local name=$1; shift
  rm -rf "${out:?}/$name"
  echo "== $name: $*" | tee -a "$out/log.txt"
  local t0=$SECONDS
  if "$@" --output "$out/$name" 2>&1 | tee -a "$out/log.txt"; then
    echo "== $name: $((SECONDS - t0)) s wall" | tee -a "$out/log.txt"
  else
    echo "== $name FAILED after $((SECONDS - t0)) s" | tee -a "$out/log.txt"
  fi
}

run classify_1gpu_b256 $PY -m tasks.classify "${C[@]}" --batch-size 256
run classify_2gpu_b256 "${TORCHRUN[@]}" -m tasks.classify "${C[@]}" --batch-size 256
# the same global batch as 2 x 256 on one GPU: the accuracy reference for the 2-GPU run
[[ "${CLASSIFY_REF:-1}" == 1 ]] && run classify_1gpu_b512 $PY -m tasks.classify "${C[@]}" --batch-size 512
if [[ "${SEGMENT:-0}" == 1 ]]; then
  # the segmentation recipe as measured on 2026-11-22 (stride 32, C3-C5, no aux, eager step), spelled out
  S=(--config configs/segment/scenes_fcn_resnet18.yaml --epochs "$SEG_EPOCHS" --set model.output_stride=32 --set "model.in_features=[c3,c4,c5]" --set model.aux=false --set train.cuda_graph=false "${EXTRA[@]}")
  run segment_1gpu $PY -m tasks.segment "${S[@]}"
  run segment_2gpu "${TORCHRUN[@]}" -m tasks.segment "${S[@]}"
fi

$PY - "$out" <<'EOF' | tee "$out/summary.txt"
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = {}
for run in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").is_file()):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    images = sum(r["train_images"] for r in recs)
    seconds = sum(r["train_time_s"] for r in recs)
    steady = statistics.median(r["train_img_per_s"] for r in recs[1:]) if len(recs) > 1 else float("nan")
    main = next((k for k in ("val_acc", "val_miou") if k in recs[-1]), None)
    rows[run.name] = dict(world=recs[-1].get("world_size", 1), epochs=len(recs), images=images, seconds=seconds,
                          overall=images / seconds, steady=steady, metric=main, value=recs[-1].get(main))
print(f"{'run':<22}{'GPUs':>5}{'epochs':>7}{'train s':>9}{'img/s overall':>15}{'img/s steady':>14}  final metric")
for name, r in rows.items():
    print(f"{name:<22}{r['world']:>5}{r['epochs']:>7}{r['seconds']:>9.1f}{r['overall']:>15,.0f}{r['steady']:>14,.0f}"
          f"  {r['metric']} {r['value']:.4f}")
for one, two in (("classify_1gpu_b256", "classify_2gpu_b256"), ("segment_1gpu", "segment_2gpu")):
    if one in rows and two in rows:
        a, b = rows[one], rows[two]
        print(f"{two} / {one}: {b['overall'] / a['overall']:.2f}x overall, {b['steady'] / a['steady']:.2f}x steady "
              f"(target >= 1.85x); final metric {b['value'] - a['value']:+.4f}")
EOF
