"""Faster, equivalent stem layers: the stride-2 conv on image channels, and the max-pool's backward.

cuDNN runs the ImageNet stem badly on a GPU: with 3 input channels it pads them to 8 and picks
an old implicit-GEMM kernel; on an H200 (torch 2.11, bf16, channels_last, batch 256 at 224x224)
that one conv took 1.5 ms, 38% of a compiled ResNet-18 inference step, at ~40 TFLOP/s
(a profile of one compiled inference step; the script is in git history). Zero-padding the input to 4 or 8 channels does not help;
the rearrangement below took the conv alone from 1.77 to 1.05 ms (forward + weight gradient:
3.02 to 1.64 ms).

A stride-2 conv is exactly a stride-1 conv over the input rearranged 2x2 pixels into channels
("space to depth", as TPU ResNet-50 recipes do): with ``x'[c, 2a+b] -> s[4c + 2b_h + b_w, a]`` the
7x7 kernel becomes a 4x4 kernel (the 8th tap zero) over 12 channels. Each output is the same sum
of the same products, only accumulated in another order, so results agree to rounding. The
weights keep their ``[out, in, 7, 7]`` shape (checkpoints and torchvision / timm weights load
unchanged); the rearranged kernel is built each call (64x3x7x7: negligible).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["space_to_depth_conv2d", "SpaceToDepthConv2d", "max_pool_3x3_s2", "StemMaxPool", "with_plain_stem"]


def space_to_depth_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          padding: int = 0, channel_multiple: int = 8) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=2, padding=padding)`` computed as a stride-1 conv on the
    2x2 space-to-depth rearrangement of the padded input. ``channel_multiple``: the rearranged
    channels (4 x in) are zero-padded to a multiple of it (8: bf16 tensor-core alignment)."""
    n, c, h, w = x.shape
    out_c, in_c, kh, kw = weight.shape
    if in_c != c:
        raise ValueError(f"space_to_depth_conv2d: input has {c} channels, weight expects {in_c}")
    ho, wo = (h + 2 * padding - kh) // 2 + 1, (w + 2 * padding - kw) // 2 + 1
    th, tw = (kh + 1) // 2, (kw + 1) // 2  # taps per parity
    # pad (or crop) so the rearranged input has exactly ho + th - 1 rows of pixel pairs
    rows, cols = 2 * (ho + th - 1), 2 * (wo + tw - 1)
    if torch.is_autocast_enabled(x.device.type):  # rearrange the bf16 copy autocast would make anyway
        x = x.to(torch.get_autocast_dtype(x.device.type))
    xp = F.pad(x, (padding, cols - w - padding, padding, rows - h - padding))
    # one copy into [n, rows/2, cols/2, (c, 2, 2)] = channels_last [n, 4c, rows/2, cols/2],
    # channels zero-padded for tensor-core alignment; the kernel the same way
    extra = -4 * c % channel_multiple
    s = xp.reshape(n, c, rows // 2, 2, cols // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, rows // 2, cols // 2, 4 * c)
    s = F.pad(s, (0, extra)).permute(0, 3, 1, 2)
    wp = F.pad(weight, (0, 2 * tw - kw, 0, 2 * th - kh))
    ws = wp.reshape(out_c, c, th, 2, tw, 2).permute(0, 2, 4, 1, 3, 5).reshape(out_c, th, tw, 4 * c)
    ws = F.pad(ws, (0, extra)).permute(0, 3, 1, 2)
    return F.conv2d(s, ws, bias)


class SpaceToDepthConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (stride 2, no dilation, one group) that runs as ``space_to_depth_conv2d``
    on CUDA tensors and as a plain conv elsewhere (CPU, ONNX export on the CPU). Only for inputs
    of up to 4 channels (images): with more, cuDNN's own kernels are no longer starved for
    channels and the rearranged conv would do up to 16/9 the multiply-adds for nothing."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0,
                 bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=2, padding=padding, bias=bias)
        self.space_to_depth = in_channels <= 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.is_cuda and self.space_to_depth):
            return super().forward(x)
        return space_to_depth_conv2d(x, self.weight, self.bias, self.padding[0])


# ----------------------------------------------------------------------------- max-pool
# The stem's 3x3 / stride-2 max-pool. Under torch.compile, inductor (torch 2.11) computes its
# backward by re-deriving every window's argmax for each input pixel: on an H200 that one kernel
# took 1.46 ms of a 14 ms ResNet-18 training step (batch 256, 224x224).
# Here the forward stores each window's argmax tap (int8, at output resolution) and the backward
# routes each gradient to its tap with a few shifted, fused reads: the same gradients as
# F.max_pool2d (the first maximum of a window in row-major order takes it; ties are not split).
# Compiled, ReLU + pool forward + backward alone went from 2.11 to 1.47 ms.

def _pool_taps(x: torch.Tensor) -> list[torch.Tensor]:
    """The 9 taps (row-major) of every 3x3 / stride-2 / padding-1 window: 9 x [N, C, Ho, Wo] views."""
    h, w = x.shape[-2:]
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    xp = F.pad(x, (1, 2 * wo - w, 1, 2 * ho - h), value=float("-inf"))
    return [xp[..., dy:dy + 2 * ho - 1:2, dx:dx + 2 * wo - 1:2] for dy in range(3) for dx in range(3)]


class _MaxPool3x3s2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        # a chain of element-wise steps (one fused kernel under inductor; a stack of the taps
        # and a max over it was materialised tap by tap, 9x slower)
        taps = _pool_taps(x)
        y = taps[0]
        arg = torch.zeros(y.shape, dtype=torch.int8, device=x.device)
        for t in range(1, 9):
            better = taps[t] > y  # strictly: the first maximum keeps it, as max_pool2d's kernels
            y = torch.where(better, taps[t], y)
            arg = torch.where(better, torch.full((), t, dtype=torch.int8, device=x.device), arg)
        ctx.save_for_backward(arg)
        ctx.in_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (arg,) = ctx.saved_tensors
        h, w = ctx.in_shape[-2:]
        ho, wo = g.shape[-2:]
        # padded-input pixel (2a + py, 2b + px) is tap (dy, dx) of output (a - dy // 2, b - dx // 2)
        # for dy = py, py + 2 (< 3); index a + 1 - dy // 2 in the one-padded outputs below
        gp = F.pad(g, (1, 1, 1, 1))
        ap = F.pad(arg, (1, 1, 1, 1), value=-1)
        zero = torch.zeros((), dtype=g.dtype, device=g.device)
        full = g.new_empty(*g.shape[:-2], 2 * ho + 2, 2 * wo + 2)
        if g.is_contiguous(memory_format=torch.channels_last):
            full = full.contiguous(memory_format=torch.channels_last)
        for py in range(2):
            for px in range(2):
                acc = None
                for dy in range(py, 3, 2):
                    for dx in range(px, 3, 2):
                        i0, j0 = 1 - dy // 2, 1 - dx // 2
                        hit = ap[..., i0:i0 + ho + 1, j0:j0 + wo + 1] == dy * 3 + dx
                        term = torch.where(hit, gp[..., i0:i0 + ho + 1, j0:j0 + wo + 1], zero)
                        acc = term if acc is None else acc + term
                full[..., py::2, px::2] = acc  # one strided write per parity
        return full[..., 1:1 + h, 1:1 + w]


def max_pool_3x3_s2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 3, 2, 1)`` with the argmax-routing backward above (any device)."""
    return _MaxPool3x3s2.apply(x)


class StemMaxPool(nn.MaxPool2d):
    """``nn.MaxPool2d(3, stride=2, padding=1)`` that, inside ``torch.compile`` on CUDA and when a
    gradient is needed, uses ``max_pool_3x3_s2`` (eager PyTorch keeps its own max-pool kernels;
    inductor's forward-only lowering is fast)."""

    def __init__(self) -> None:
        super().__init__(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.requires_grad and torch.compiler.is_compiling():
            return max_pool_3x3_s2(x)
        return super().forward(x)


def with_plain_stem(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose stem layers are the stock ``nn.Conv2d`` / ``nn.MaxPool2d`` with the
    same weights (what torchvision and timm run): the baseline for A/B timing and equality checks."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SpaceToDepthConv2d):
                plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                  child.padding, bias=child.bias is not None, device="meta")
                plain.weight = child.weight  # already a copy; its device and memory format kept
                plain.bias = child.bias
                setattr(parent, name, plain)
            elif isinstance(child, StemMaxPool):
                setattr(parent, name, nn.MaxPool2d(3, stride=2, padding=1))
    return model
