"""Where a training step of the Fashion-MNIST GPU recipe spends the GPU (issue 17): the recipe's model,
optimizer, on-device augmented batches and CUDA-graph step, as the trainer runs them; after warm-up
and capture, ``--steps`` steps (batch, graph replay, optimizer step) under torch.profiler.

Reports the wall time per step, the GPU time by kernel family, the FLOPs of one forward + backward
(``torch.utils.flop_counter``) and the rate they reach, and the top kernels.

    python3 docs/bench/classify_profile_gpu.py OUT.json OUT.txt [--steps 50] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tasks.engine.config import CONFIG_ROOT, load_config  # noqa: E402
from tasks.engine.graphs import GraphedForwardBackward  # noqa: E402
from tasks.engine.logging import env_info  # noqa: E402
from tasks.engine.optim import build_grad_scaler, build_optimizer  # noqa: E402
from tasks.engine.registry import TASKS  # noqa: E402

# kernel families, by name (first match wins)
FAMILIES = [
    ("batch norm", r"batch_?norm|bn_|welford"),  # first: cuDNN's (float16) are named cudnn::batchnorm_*
    ("convolution / matmul", r"xmma|gemm|conv|cudnn|nvjet|cutlass|wgrad|dgrad|fprop"),
    ("optimizer", r"multi_tensor|fused_sgd|_fused|foreach"),
    ("reduction", r"reduce|softmax|nll|cross_entropy|sum"),
    ("copy / layout", r"copy|transpose|permute|nchw|nhwc|memcpy|memset|cat"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton"),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, pattern in FAMILIES:
        if re.search(pattern, low):
            return fam
    return "other"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("table")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--recipe", default=str(CONFIG_ROOT / "classify" / "fashion_mnist_resnet18.yaml"))
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    spec = TASKS["classify"]
    cfg = load_config(spec.config, Path(a.recipe), a.overrides)
    data = spec.build_data(cfg, device, quiet=True)
    model = spec.build_model(cfg, data.meta).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = build_optimizer(model, cfg.optim, device)
    amp = cfg.train.amp and cuda
    dtype = getattr(torch, cfg.train.amp_dtype)
    scaler = build_grad_scaler(opt, dtype, device) if amp else None  # as the Trainer

    def eager_step(x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = sum(model(x, y).values())
        opt.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def opt_step():
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    step = (GraphedForwardBackward(model, opt, amp=amp, dtype=dtype, scaler=scaler)
            if cuda and cfg.train.cuda_graph else eager_step)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    batches = iter(data.train)
    x, y = next(batches)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        eager_step(x, y)
    flops = counter.get_total_flops()
    opt.zero_grad(set_to_none=True)

    def run(n: int) -> float:
        nonlocal batches
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            try:
                xb, yb = next(batches)
            except StopIteration:
                batches = iter(data.train)
                xb, yb = next(batches)
            if xb.shape[0] != x.shape[0]:  # the ragged last batch
                continue
            step(xb, yb)
            opt_step()
        sync()
        return (time.perf_counter() - t0) / n

    run(20)  # warm-up, capture
    wall = run(a.steps)
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run(a.steps)
    by_family: dict[str, float] = defaultdict(float)
    kernels = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
        # ops, runtime calls and the optimizer's record_function range (its kernels count themselves)
        if t <= 0 or e.key.startswith(("aten::", "cuda", "Optimizer.")):
            continue
        by_family[family(e.key)] += t
        kernels.append((t, e.count, e.key))
    gpu_us = sum(by_family.values()) / a.steps
    result = {
        "env": env_info() if cuda else {"device": "cpu"}, "recipe": a.recipe, "overrides": a.overrides,
        "batch_size": int(x.shape[0]), "image_shape": list(x.shape[1:]), "steps": a.steps,
        "wall_ms_per_step": wall * 1e3, "img_per_s": x.shape[0] / wall,
        "gpu_busy_ms_per_step": gpu_us / 1e3, "gpu_busy_fraction": gpu_us / 1e6 / wall,
        "flops_per_step_fwd_bwd": flops, "achieved_tflops": flops / wall / 1e12,
        "gpu_ms_per_step_by_family": {k: v / a.steps / 1e3 for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"gpu_ms_per_step": t / a.steps / 1e3, "calls_per_step": c / a.steps, "name": k[:160]}
                        for t, c, k in sorted(kernels, reverse=True)[:30]],
    }
    Path(a.out).write_text(json.dumps(result, indent=1))
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    Path(a.table).write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
    print(json.dumps({k: v for k, v in result.items() if k not in ("top_kernels", "env")}, indent=1))


if __name__ == "__main__":
    main()
