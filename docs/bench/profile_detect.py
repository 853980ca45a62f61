"""Where does a detection training step spend its time? (an investigation script, not a test)

    python docs/bench/profile_detect.py --out DIR [--set KEY=VALUE ...]

Measures, on the GPU recipe ``configs/detect/scenes_fcos_resnet18.yaml``:
  1. the input pipeline alone: one epoch of the training ``DeviceLoader`` (workers decode PNGs,
     albumentations, pinned copy, normalise on the device), no model;
  2. the model alone: forward + backward + AdamW on one fixed device-resident batch, for
     variants (target checks on / off, channels_last on / off) and torchvision FCOS;
  3. a ``torch.profiler`` table of the fastest variant (top CUDA kernels, launches per step).
Writes ``<out>/profile_detect.json`` and ``<out>/profile_detect.txt``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tasks import TASKS  # noqa: E402
from tasks.bench import _TorchvisionFCOS  # noqa: E402
from tasks.engine.config import load_config  # noqa: E402
from tasks.engine.logging import env_info  # noqa: E402
from tasks.engine.optim import build_optimizer  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def loader_rate(loader, batches: int | None = None) -> float:
    n, start = 0, None
    for i, (images, _) in enumerate(loader):
        if i == 2:  # worker start-up excluded
            sync()
            start, n = time.perf_counter(), 0
        n += images.shape[0]
        if batches is not None and i + 1 >= batches:
            break
    sync()
    return n / (time.perf_counter() - start)


def step_time(model, images, targets, cfg, steps: int = 30, warmup: int = 5):
    opt = build_optimizer(model, cfg.optim, images.device)
    model.train()

    def one():
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.is_cuda):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0, foreach=True)
        opt.step()

    for _ in range(warmup):
        one()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    sync()
    return (time.perf_counter() - t0) / steps, one


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--batches", type=int, default=None, help="loader batches to time (default: an epoch)")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[2]
    detect = TASKS["detect"]
    cfg = load_config(detect.config, root / "configs" / "detect" / f"{detect.recipes[0]}.yaml", args.set)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a dry run of the script
    torch.backends.cudnn.benchmark = True
    report: dict = {"env": env_info(), "overrides": args.set, "batch_size": cfg.train.batch_size}
    lines: list[str] = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    data = detect.build_data(cfg, device)
    data.train.set_epoch(0)
    report["loader_img_s"] = loader_rate(data.train, args.batches)
    say(f"input pipeline alone ({cfg.data.num_workers} workers): {report['loader_img_s']:.0f} img/s")

    images, targets = next(iter(data.train))
    k = len(data.meta["class_names"])
    variants = {}
    for name, check, cl in [("ours (check_targets on, channels_last)", True, True),
                            ("ours (check_targets off, channels_last)", False, True),
                            ("ours (check_targets off, NCHW)", False, False)]:
        torch.manual_seed(0)
        model = detect.build_model(cfg, data.meta).to(device)
        model.check_targets = check
        x = images
        if cl:
            model = model.to(memory_format=torch.channels_last)
        else:
            x = images.contiguous()
        t, one = step_time(model, x, targets, cfg, args.steps)
        variants[name] = t
        say(f"{name}: {t * 1e3:.1f} ms/step = {images.shape[0] / t:.0f} img/s")
        if name.startswith("ours (check_targets off, channels_last"):
            best_one = one
    peer = _TorchvisionFCOS(cfg.model.depth, k, cfg.data.image_size, cfg).to(device, memory_format=torch.channels_last)
    t, _ = step_time(peer, images, targets, cfg, args.steps)
    variants["torchvision FCOS"] = t
    say(f"torchvision FCOS: {t * 1e3:.1f} ms/step = {images.shape[0] / t:.0f} img/s")
    report["step_ms"] = {k: v * 1e3 for k, v in variants.items()}

    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            best_one()
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total", row_limit=40)
    say(table)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    report["cuda_kernels_per_step"] = sum(e.count for e in events) / 5
    say(f"CUDA kernels per step: {report['cuda_kernels_per_step']:.0f}")
    (out / "profile_detect.json").write_text(json.dumps(report, indent=1))
    (out / "profile_detect.txt").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
