"""Where a ResNet step spends its GPU time (issue 7 levers), before changing anything.

    python docs/bench/probe_backbone.py --out DIR [--models resnet18,resnet50] [--batch 256]

1. The 7x7/2 stem conv alone, channels_last bf16: cuDNN on 3 input channels against
   ``backbones.stem.space_to_depth_conv2d`` (12 channels, or zero-padded to 16): forward, and
   forward + weight gradient (the input needs no gradient), CUDA-event timed. (A first probe
   also padded the plain conv's input to 4 or 8 channels: 1.78 / 1.77 / 1.72 ms, no gain.)
2. Our compiled BN-folded inference and compiled training step (fused SGD) with our stem
   (``SpaceToDepthConv2d``, ``StemMaxPool``) and with torchvision's stem layers swapped in,
   and torch.profiler kernel tables (top kernels by GPU time per step) of ours.
Writes ``probe_backbone.json`` and ``*_kernels.txt`` under ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from backbones import fuse_conv_bn
from backbones.stem import max_pool_3x3_s2, space_to_depth_conv2d, with_plain_stem
from tasks.bench_backbone import build_ours


def cuda_time(fn, steps: int = 20, rounds: int = 5, warmup: int = 5) -> float:
    """Median milliseconds per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / steps)
    return statistics.median(times)


def stem_probe(batch: int, size: int) -> dict:
    """The 7x7/2 stem conv alone: cuDNN on 3 channels vs the space-to-depth formulation."""
    out = {}
    x = torch.randn(batch, 3, size, size, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    w0 = torch.randn(64, 3, 7, 7, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    forms = {"cudnn_cin3": lambda w: F.conv2d(x, w, stride=2, padding=3),
             "s2d_cin12": lambda w: space_to_depth_conv2d(x, w, padding=3, channel_multiple=1),
             "s2d_cin16": lambda w: space_to_depth_conv2d(x, w, padding=3, channel_multiple=8)}
    for name, conv in forms.items():
        wg = w0.clone().requires_grad_(True)
        fwd = cuda_time(lambda: conv(w0))

        def fwd_bwd():
            y = conv(wg)
            return torch.autograd.grad(y, wg, torch.ones_like(y))
        fb = cuda_time(fwd_bwd)
        out[name] = {"fwd_ms": fwd, "fwd_wgrad_ms": fb}
        print(f"stem conv {name}: fwd {fwd:.3f} ms, fwd+wgrad {fb:.3f} ms", flush=True)
    return out


def pool_probe(batch: int, size: int) -> dict:
    """The stem max-pool alone, compiled, forward + backward: inductor's lowering of
    F.max_pool2d vs backbones.stem.max_pool_3x3_s2."""
    out = {}
    x0 = torch.randn(batch, 64, size // 2, size // 2, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    for name, pool in (("max_pool2d", lambda t: F.max_pool2d(t, 3, 2, 1)), ("stem_max_pool", max_pool_3x3_s2)):
        torch._dynamo.reset()
        x = x0.clone().requires_grad_(True)
        fn = torch.compile(lambda t: pool(t.relu()))
        g = torch.ones_like(fn(x))

        def fwd_bwd():
            return torch.autograd.grad(fn(x), x, g)
        ms = cuda_time(fwd_bwd)
        out[name] = {"fwd_bwd_ms": ms}
        print(f"stem max-pool {name}: fwd+bwd {ms:.3f} ms", flush=True)
    return out


def kernel_class(name: str) -> str:
    """A kernel's kind by its name: cuDNN conv, cuBLAS matmul, inductor's Triton, optimizer."""
    n = name.lower()
    if "sgd" in n or "multi_tensor" in n:
        return "optimizer"
    if n.startswith(("triton_red", "triton_per")):
        return "triton_reduction"
    if n.startswith("triton_poi"):
        return "triton_pointwise"
    if n.startswith("triton"):
        return "triton_other"
    if "nvjet" in n or ("gemm" in n and "implicit" not in n and "conv" not in n):
        return "matmul"
    if any(k in n for k in ("xmma", "cudnn", "cutlass", "conv", "implicit")):
        return "conv"
    return "other"


def kernel_table(step, steps: int = 5, top: int = 30) -> tuple[str, dict[str, float]]:
    """torch.profiler over ``steps`` calls: a text table of the top kernels (ms per step) and the
    ms per step of each ``kernel_class`` plus ``total``."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    evs = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0]
    classes: dict[str, float] = {}
    for e in evs:
        k = kernel_class(e.key)
        classes[k] = classes.get(k, 0.0) + e.self_device_time_total / 1000 / steps
    total = sum(classes.values())
    evs.sort(key=lambda e: -e.self_device_time_total)
    lines = [f"GPU kernel time per step: {total:.2f} ms",
             "by class: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(classes.items(), key=lambda kv: -kv[1])),
             f"{'ms/step':>8} {'%':>6} {'calls':>6}  kernel"]
    for e in evs[:top]:
        ms = e.self_device_time_total / 1000 / steps
        lines.append(f"{ms:8.3f} {100 * ms / total:6.1f} {e.count // steps:6d}  {e.key[:150]}")
    return "\n".join(lines), {**classes, "total": total}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/probe")
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "stem": stem_probe(args.batch, args.size),
           "pool": pool_probe(args.batch, args.size)}
    x = torch.randn(args.batch, 3, args.size, args.size, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device="cuda")
    amp = dict(device_type="cuda", dtype=torch.bfloat16)
    for depth in args.models.split(","):
        fast = build_ours(depth).cuda().to(memory_format=torch.channels_last)
        for stem, base in (("fast_stem", fast), ("plain_stem", with_plain_stem(fast))):
            torch._dynamo.reset()  # no recompilation (or dynamic shapes) carried over between models
            f_inf = torch.compile(fuse_conv_bn(base.eval()).eval())

            def infer():
                with torch.no_grad(), torch.autocast(**amp):
                    return f_inf(x)
            ms = cuda_time(infer)
            res[f"{depth}_infer_{stem}"] = {"ms": ms, "img_per_s": args.batch / ms * 1000}
            print(depth, stem, "infer compiled bnfold", f"{ms:.2f} ms/step", f"{args.batch / ms * 1000:,.0f} img/s",
                  flush=True)
            if stem == "fast_stem":
                text, _ = kernel_table(infer)
                (out / f"{depth}_infer_kernels.txt").write_text(text + "\n")
                print(text, flush=True)
            train_model = copy.deepcopy(base).train()
            torch._dynamo.reset()
            f_tr = torch.compile(train_model)
            opt = torch.optim.SGD(train_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)

            def train():
                opt.zero_grad(set_to_none=True)
                with torch.autocast(**amp):
                    loss = F.cross_entropy(f_tr(x), y)
                loss.backward()
                opt.step()
            ms = cuda_time(train, steps=10, rounds=3)
            res[f"{depth}_train_{stem}"] = {"ms": ms, "img_per_s": args.batch / ms * 1000}
            print(depth, stem, "train compiled fusedsgd", f"{ms:.2f} ms/step", f"{args.batch / ms * 1000:,.0f} img/s",
                  flush=True)
            if stem == "fast_stem":
                text, _ = kernel_table(train, steps=3)
                (out / f"{depth}_train_kernels.txt").write_text(text + "\n")
                print(text, flush=True)
            del f_inf, f_tr, opt, train_model
            torch.cuda.empty_cache()
    (out / "probe_backbone.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
