"""ResNet training step: which compile options / layer forms move it (issue 7, ResNet-50 training).

    python docs/bench/probe_train_options.py --out DIR [--depth resnet50] [--variants a,b,...]

Our compiled training step (bs 256, 224x224, bf16 autocast, channels_last, fused SGD), one
variant at a time, each after ``torch._dynamo.reset()``: inductor options (``conv_1x1_as_mm``:
1x1 convs as cuBLAS matmuls; ``coordinate_descent_tuning``: per-kernel block-size search for
the Triton pointwise/reduction kernels, i.e. the BatchNorm work), and the strided 1x1
downsample conv as slice + stride-1 1x1 conv. For each: median ms/step (CUDA events), compile
seconds, and GPU time per kernel class (conv / matmul / Triton / optimizer / other) from
torch.profiler. ``torchvision`` rows take torchvision's ResNet with the same options, so a gain
can be told apart from one any model would get. Writes ``probe_train_options.json`` (after
every variant, so a timed-out run still returns what it measured) and ``*_kernels.txt``.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from probe_backbone import cuda_time, kernel_table  # docs/bench/, the script's folder
from tasks.bench_backbone import build_ours

VARIANTS = {
    # name: (impl, inductor options, slice downsample)
    "ours_default": ("ours", {}, False),
    "ours_1x1mm": ("ours", {"conv_1x1_as_mm": True}, False),
    "ours_slice_ds": ("ours", {}, True),
    "ours_coord": ("ours", {"coordinate_descent_tuning": True}, False),
    "ours_1x1mm_coord": ("ours", {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True}, False),
    "tv_default": ("torchvision", {}, False),
    "tv_coord": ("torchvision", {"coordinate_descent_tuning": True}, False),
}


class SliceConv1x1(nn.Conv2d):
    """A strided 1x1 conv as subsample + stride-1 1x1 conv (same weight, same output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        return F.conv2d(x[:, :, ::s[0], ::s[1]], self.weight, self.bias)


def slice_downsample(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for m in model.modules():
        ds = getattr(m, "downsample", None)
        if isinstance(ds, nn.Sequential) and ds[0].kernel_size == (1, 1) and ds[0].stride != (1, 1):
            c = ds[0]
            new = SliceConv1x1(c.in_channels, c.out_channels, 1, stride=c.stride, bias=c.bias is not None)
            new.load_state_dict(c.state_dict())
            ds[0] = new.to(c.weight.device, memory_format=torch.channels_last)
    return model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/probe_train")
    p.add_argument("--depth", default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    x = torch.randn(args.batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device="cuda")
    amp = dict(device_type="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    ours = build_ours(args.depth).cuda().to(memory_format=torch.channels_last)
    import torchvision
    tv = getattr(torchvision.models, args.depth)().cuda().to(memory_format=torch.channels_last)
    res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "depth": args.depth,
           "batch": args.batch, "variants": {}}
    for name in args.variants.split(","):
        impl, options, sliced = VARIANTS[name]
        base = ours if impl == "ours" else tv
        model = slice_downsample(base) if sliced else copy.deepcopy(base)
        model.train()
        torch._dynamo.reset()
        fn = torch.compile(model, options=options) if options else torch.compile(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)

        def train():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(**amp):
                loss = F.cross_entropy(fn(x), y)
            loss.backward()
            opt.step()
        t0 = time.perf_counter()
        try:
            for _ in range(3):
                train()
            torch.cuda.synchronize()
        except Exception as e:  # one failing option set should not lose the others
            res["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(name, "failed", res["variants"][name], flush=True)
            continue
        compile_s = time.perf_counter() - t0
        ms = cuda_time(train, steps=10, rounds=5, warmup=0)  # warmed up above
        text, classes = kernel_table(train, steps=3, top=40)
        (out / f"{name}_kernels.txt").write_text(text + "\n")
        res["variants"][name] = {"impl": impl, "options": options, "slice_downsample": sliced,
                                 "compile_s": round(compile_s, 1), "ms": ms, "img_per_s": args.batch / ms * 1000,
                                 "kernel_ms": classes}
        print(name, f"compile {compile_s:.0f}s", f"{ms:.2f} ms/step", f"{args.batch / ms * 1000:,.0f} img/s",
              text.splitlines()[1], flush=True)
        (out / "probe_train_options.json").write_text(json.dumps(res, indent=1))
        del fn, opt, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
