"""BatchNorm forward + backward at the Fashion-MNIST ResNet-18 recipe's shapes (batch 256, channels_last),
bf16 against fp16 input (fp32 weights, as under autocast). PyTorch sends bf16 to its native kernels and
fp16 to cuDNN (``torch._C._select_batch_norm_backend``); this measures what that choice costs (issue 17).

    python3 docs/bench/bn_dtype_gpu.py OUT.json
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

# (channels, side, layers of that shape in ResNet-18 with the cifar stem at 28x28)
SHAPES = [(64, 28, 5), (128, 14, 5), (256, 7, 5), (512, 4, 5)]


def time_bn(dtype: torch.dtype, c: int, s: int, relu: bool, reps: int = 200) -> tuple[float, str]:
    x = torch.randn(256, c, s, s, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.ones(c, device="cuda", requires_grad=True)
    b = torch.zeros(c, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    dy = torch.randn_like(x)
    backend = str(torch._C._select_batch_norm_backend(x, w, b, rm, rv, True, 1e-5))

    def step():
        y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
        if relu:
            y = F.relu(y)
        y.backward(dy)

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            step()
    g.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    g.replay()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) * 1000 / reps, backend


def main() -> None:
    torch.backends.cudnn.benchmark = True
    rows = []
    for relu in (False, True):
        for dtype in (torch.bfloat16, torch.float16):
            total = 0.0
            for c, s, n in SHAPES:
                us, backend = time_bn(dtype, c, s, relu)
                rows.append({"dtype": str(dtype), "relu": relu, "channels": c, "side": s, "us_fwd_bwd": round(us, 2),
                             "backend": backend})
                total += us * n
            rows.append({"dtype": str(dtype), "relu": relu, "per_step_ms_20_layers": round(total / 1000, 3)})
            print(rows[-1], flush=True)
    json.dump({"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
               "gpu": torch.cuda.get_device_name(), "rows": rows}, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
