"""Feature Pyramid Network over any backbone's ``feature_info``.

Outputs are named ``p{log2(stride)}`` (``c3`` at stride 8 becomes ``p3``). The top-down path
upsamples to the *size* of each lateral map, so any input size works (97x131 included).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones.base import Backbone, FeatureSpec

__all__ = ["FPN", "BackboneWithFPN"]

EXTRAS = ("p6p7", "maxpool", None)


def _level(stride: int) -> int:
    level = int(round(math.log2(stride)))
    if 2 ** level != stride:
        raise ValueError(f"FPN needs power-of-two strides, got {stride}")
    return level


class FPN(nn.Module):
    """Lateral 1x1 + top-down nearest upsampling + 3x3 output convs.

    Args:
        in_specs: the input maps, fine to coarse; strides must double level to level (a
            dilated C5 at the stride of C4 cannot be a separate pyramid level).
        out_channels: channels of every output level.
        extra: ``"p6p7"`` adds P6 (3x3/2 conv on P5) and P7 (3x3/2 on ReLU(P6)), as in
            FCOS / RetinaNet; ``"maxpool"`` adds P6 by subsampling P5 (Faster R-CNN); ``None``
            adds nothing.
    """

    def __init__(self, in_specs: Sequence[FeatureSpec], out_channels: int = 256, extra: str | None = "p6p7") -> None:
        super().__init__()
        in_specs = list(in_specs)
        if not in_specs:
            raise ValueError("FPN needs at least one input feature")
        if extra not in EXTRAS:
            raise ValueError(f"extra={extra!r} is not supported; choose one of {list(EXTRAS)}")
        for a, b in zip(in_specs, in_specs[1:]):
            if b.stride != 2 * a.stride:
                raise ValueError(
                    f"FPN inputs must double in stride level to level: {a.name} has stride {a.stride}, "
                    f"{b.name} has {b.stride} (a dilated trunk needs fewer FPN inputs)")
        self.in_names = [s.name for s in in_specs]
        self.extra = extra
        self.lateral = nn.ModuleList(nn.Conv2d(s.channels, out_channels, 1) for s in in_specs)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_specs)
        self.feature_info = [FeatureSpec(f"p{_level(s.stride)}", out_channels, s.stride) for s in in_specs]
        top = self.feature_info[-1]
        if extra == "p6p7":
            self.p6 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
            self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        n_extra = {"p6p7": 2, "maxpool": 1, None: 0}[extra]
        for i in range(1, n_extra + 1):
            stride = top.stride * 2 ** i
            self.feature_info.append(FeatureSpec(f"p{_level(stride)}", out_channels, stride))
        self.out_channels = out_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)  # as torchvision's FPN
                nn.init.zeros_(m.bias)

    def forward(self, features: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        missing = [n for n in self.in_names if n not in features]
        if missing:
            raise KeyError(f"FPN needs features {self.in_names}, missing {missing}; got {list(features)}")
        xs = [features[n] for n in self.in_names]
        inner = self.lateral[-1](xs[-1])
        results = [self.output[-1](inner)]
        for i in range(len(xs) - 2, -1, -1):
            lateral = self.lateral[i](xs[i])
            # size=, not scale_factor=: odd sizes (97x131) round differently at each level
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.output[i](inner))
        if self.extra == "p6p7":
            p6 = self.p6(results[-1])
            results += [p6, self.p7(F.relu(p6))]
        elif self.extra == "maxpool":
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2))
        return OrderedDict((s.name, r) for s, r in zip(self.feature_info, results))


class BackboneWithFPN(nn.Module):
    """Backbone + FPN returning an ``OrderedDict`` of pyramid levels, with ``out_channels``.

    This is the interface torchvision's ``FasterRCNN``, ``RetinaNet`` and ``FCOS`` expect of
    their ``backbone`` argument (the README shows all three).
    """

    def __init__(self, backbone: Backbone, in_features: Sequence[str] = ("c3", "c4", "c5"),
                 out_channels: int = 256, extra: str | None = "p6p7") -> None:
        super().__init__()
        self.body = backbone
        self.fpn = FPN([backbone.spec(n) for n in in_features], out_channels, extra)
        self.out_channels = out_channels
        self.feature_info = self.fpn.feature_info

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(x))
