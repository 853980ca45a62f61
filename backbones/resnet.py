"""ResNet-18/34/50/101/152 returning C2-C5, with torchvision parameter names.

Layout follows torchvision's ``resnet.py``: helpers, blocks, the model, then the builders.
Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1``...``layer4``; no ``fc``), so
a torchvision or timm ResNet state dict loads as is. ``feature_info`` is filled in the same
loop that builds the stages, so channels and strides can never disagree with the layers.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import FrozenBatchNorm2d, StochasticDepth

from .base import Backbone, FeatureSpec, register_backbone
from .stem import SpaceToDepthConv2d, StemMaxPool
from .pretrained import is_named
from .pretrained import resolve as resolve_named
from .weights import LoadReport, layout_depth, load_backbone_weights

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101",
           "resnet152", "make_norm_layer"]

NormLayer = Callable[[int], nn.Module]
STAGE_NAMES = ("c2", "c3", "c4", "c5")
STEMS = ("imagenet", "cifar", "deep")
NORMS = ("bn", "syncbn", "frozen_bn", "gn")


# ----------------------------------------------------------------------------- helpers

def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding = dilation keeps the spatial size (stride 1) for any dilation
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def _group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def make_norm_layer(norm: str) -> NormLayer:
    """The norm layer constructor for ``norm`` ("bn", "syncbn", "frozen_bn", "gn")."""
    layers: dict[str, NormLayer] = {
        "bn": nn.BatchNorm2d,
        "syncbn": nn.SyncBatchNorm,
        "frozen_bn": FrozenBatchNorm2d,
        "gn": _group_norm,
    }
    if norm not in layers:
        raise ValueError(f"norm={norm!r} is not supported; choose one of {list(layers)}")
    return layers[norm]


def _drop_path(rate: float) -> nn.Module:
    # Identity when unused keeps the default path free of an extra op.
    return StochasticDepth(rate, mode="row") if rate > 0 else nn.Identity()


# ----------------------------------------------------------------------------- blocks

class BasicBlock(nn.Module):
    """Two 3x3 convs. Dilation is supported (torchvision's BasicBlock refuses it)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 *, first_dilation: int = 1, dilation: int = 1, norm_layer: NormLayer = nn.BatchNorm2d,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, first_dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.drop_path = _drop_path(drop_path)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.drop_path(out) + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here: ResNet v1.5, as torchvision), 1x1 expand."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 *, first_dilation: int = 1, dilation: int = 1, norm_layer: NormLayer = nn.BatchNorm2d,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        del dilation  # a bottleneck has one 3x3 conv: it takes the block's first dilation
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride, first_dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = _drop_path(drop_path)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + identity)


# ----------------------------------------------------------------------------- model

class ResNet(Backbone):
    """A ResNet trunk returning ``{"c2": ..., "c5": ...}`` (the requested subset).

    See ``resnet50`` for the arguments. Stages after the last requested feature are not built.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], *,
                 in_chans: int = 3, stem: str = "imagenet", output_stride: int = 32,
                 out_features: Sequence[str] = STAGE_NAMES, norm: str = "bn", freeze_at: int = 0,
                 zero_init_residual: bool = False, drop_path_rate: float = 0.0,
                 grad_checkpointing: bool = False, width: int = 64) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem={stem!r} is not supported; choose one of {list(STEMS)}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride={output_stride} is not supported; choose 8, 16 or 32")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at={freeze_at} must be in 0..5 (0: nothing, 1: stem, k: stem..C(k))")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={drop_path_rate} must be in [0, 1)")
        if isinstance(out_features, str):
            out_features = (out_features,)
        unknown = [f for f in out_features if f not in STAGE_NAMES]
        if unknown or not out_features or len(set(out_features)) != len(out_features):
            raise ValueError(f"out_features={tuple(out_features)!r}: expected distinct names from {STAGE_NAMES}")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"width must be a positive integer (64 in the standard ResNets), got {width!r}")
        if norm == "gn" and width % 32:
            raise ValueError(f"width={width} with norm='gn': GroupNorm's 32 groups need a width divisible by 32")
        norm_layer = make_norm_layer(norm)
        self.in_chans = in_chans
        self.width = width
        self.layout = (block.__name__, tuple(layers))  # what backbones.weights.resnet_layout reads off a state dict
        self.stem_type = stem
        self.norm = norm
        self.grad_checkpointing = grad_checkpointing
        self._out = tuple(f for f in STAGE_NAMES if f in out_features)  # canonical fine-to-coarse order

        # Stem. The deep stem keeps timm's key layout (conv1.0/.3/.6) so timm's *c/*d
        # ResNet stems load; its first conv is where input-channel adaptation happens.
        if stem == "deep":
            self.conv1 = nn.Sequential(
                SpaceToDepthConv2d(in_chans, 32, 3, padding=1), norm_layer(32), nn.ReLU(inplace=True),
                nn.Conv2d(32, 32, 3, padding=1, bias=False), norm_layer(32), nn.ReLU(inplace=True),
                nn.Conv2d(32, width, 3, padding=1, bias=False))
            self.first_conv = "conv1.0.weight"
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
            self.first_conv = "conv1.weight"
        else:
            # an nn.Conv2d that runs faster on CUDA (same weights, same function): backbones/stem.py
            self.conv1 = SpaceToDepthConv2d(in_chans, width, 7, padding=3)
            self.first_conv = "conv1.weight"
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if stem == "cifar" else StemMaxPool()
        stride = 1 if stem == "cifar" else 4

        # Stages: output_stride 16 dilates C5, 8 dilates C4 and C5 (the stride they would
        # have added becomes dilation), whatever the stem; feature_info gets the real strides.
        first_dilated = {32: 4, 16: 3, 8: 2}[output_stride]
        n_stages = STAGE_NAMES.index(self._out[-1]) + 1
        total_blocks = sum(layers[:n_stages])
        block_idx = 0
        inplanes, dilation = width, 1
        self.stage_names: list[str] = []
        for i in range(n_stages):
            planes = width * 2 ** i
            stage_stride = 1 if i == 0 else 2
            prev_dilation = dilation
            if i >= first_dilated:
                dilation *= stage_stride
                stage_stride = 1
            downsample = None
            if stage_stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stage_stride),
                                           norm_layer(planes * block.expansion))
            blocks = []
            for j in range(layers[i]):
                dpr = drop_path_rate * block_idx / max(total_blocks - 1, 1)  # linear decay rule
                blocks.append(block(inplanes, planes, stage_stride if j == 0 else 1,
                                    downsample if j == 0 else None,
                                    first_dilation=prev_dilation if j == 0 else dilation,
                                    dilation=dilation, norm_layer=norm_layer, drop_path=dpr))
                inplanes = planes * block.expansion
                block_idx += 1
            stride *= stage_stride
            layer_name = f"layer{i + 1}"
            self.add_module(layer_name, nn.Sequential(*blocks))
            self.stage_names.append(layer_name)
            if STAGE_NAMES[i] in self._out:
                self.feature_info.append(FeatureSpec(STAGE_NAMES[i], inplanes, stride))

        self._init_weights(zero_init_residual)
        self.freeze_at = freeze_at
        self._freeze(freeze_at)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts as identity: known to help large-batch training.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    # -- freezing
    def frozen_modules(self) -> list[nn.Module]:
        """Stem and the first ``freeze_at - 1`` stages (``freeze_at=1``: the stem only)."""
        if self.freeze_at == 0:
            return []
        stem = [self.conv1, self.bn1]
        return stem + [getattr(self, n) for n in self.stage_names[: self.freeze_at - 1]]

    def _freeze(self, freeze_at: int) -> None:
        for m in self.frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        # Frozen stages keep their normalisation statistics in every mode.
        for m in self.frozen_modules():
            m.eval()
        return self

    # -- forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ResNet expects a 4-D tensor [N, {self.in_chans}, H, W], got {got}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"ResNet was built with in_chans={self.in_chans} but the input has "
                             f"{x.shape[1]} channels (shape {tuple(x.shape)})")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: dict[str, torch.Tensor] = {}
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for feature, layer_name in zip(STAGE_NAMES, self.stage_names):
            layer = getattr(self, layer_name)
            if use_ckpt:
                for block in layer:
                    x = checkpoint(block, x, use_reentrant=False)
            else:
                x = layer(x)
            if feature in self._out:
                out[feature] = x
        return out

    def load_weights(self, weights: str | os.PathLike | Mapping[str, Any], *, strict: bool = True,
                     verbose: bool = True, name: str | None = None) -> LoadReport:
        """Load a torchvision / timm / onetrunk checkpoint (``backbones.weights``), or weights by
        name: ``torchvision:IMAGENET1K_V2``, ``timm:resnet50.a1_in1k``, ``imagenet``
        (``backbones.pretrained``: the libraries' caches, offline first). ``name``: the source
        in the load report (for a checkpoint already read into a mapping)."""
        if is_named(weights):
            depth = layout_depth(self.layout)
            if depth is None:
                raise ValueError(f"weights {weights!r}: named weights exist for ResNet-18/34/50/101/152 only")
            info, weights = resolve_named(weights, f"resnet{depth}")
            name = f"{info.name} ({info.library} {info.arch})"
        return load_backbone_weights(self, weights, first_conv=self.first_conv, strict=strict, verbose=verbose,
                                     name=name)


# ----------------------------------------------------------------------------- builders

def _resnet(block, layers, *, weights=None, **kwargs) -> ResNet:
    freeze_at = kwargs.get("freeze_at", 0)
    if kwargs.get("zero_init_residual") and weights is not None:
        warnings.warn("zero_init_residual=True has no effect: the loaded weights replace the init", stacklevel=3)
    if freeze_at == 5 and kwargs.get("drop_path_rate", 0.0) > 0:
        warnings.warn("drop_path_rate has no effect: freeze_at=5 freezes every stage", stacklevel=3)
    if freeze_at == 5 and kwargs.get("grad_checkpointing"):
        warnings.warn("grad_checkpointing saves nothing: freeze_at=5 freezes every stage", stacklevel=3)
    if kwargs.get("norm") == "frozen_bn" and freeze_at == 0 and weights is None:
        warnings.warn("norm='frozen_bn' without weights keeps identity normalisation: "
                      "it is meant for fine-tuning loaded weights", stacklevel=3)
    model = ResNet(block, layers, **kwargs)
    if weights is not None:
        model.load_weights(weights)
    return model


@register_backbone
def resnet18(*, weights=None, **kwargs) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); C2-C5 channels 64/128/256/512."""
    return _resnet(BasicBlock, [2, 2, 2, 2], weights=weights, **kwargs)


@register_backbone
def resnet34(*, weights=None, **kwargs) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]); C2-C5 channels 64/128/256/512."""
    return _resnet(BasicBlock, [3, 4, 6, 3], weights=weights, **kwargs)


@register_backbone
def resnet50(*, weights=None, **kwargs) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]); C2-C5 channels 256/512/1024/2048.

    Args (keyword only, shared by every depth):
        in_chans: input channels (1 for grayscale); loaded ``conv1`` weights are adapted.
        stem: "imagenet" (7x7/2 + max-pool, C2 at stride 4), "cifar" (3x3/1, no pool, C2 at
            stride 1, for 28-64 px images) or "deep" (three 3x3 convs, ResNet-C/D stem).
        output_stride: 32 (no dilation), 16 (C5 dilated) or 8 (C4 and C5 dilated); the
            name is the ImageNet-stem stride, ``feature_info`` reports the real strides.
        out_features: subset of ("c2", "c3", "c4", "c5"); later stages are not built.
        norm: "bn", "syncbn", "frozen_bn" or "gn" (32 groups).
        freeze_at: 0 none, 1 stem, k stem..C(k): no gradients and frozen norm statistics.
        zero_init_residual: start each residual branch at zero (last norm weight = 0).
        drop_path_rate: stochastic depth, rising linearly to this rate at the last block.
        grad_checkpointing: recompute each block in backward to save memory (BN running
            statistics are then updated twice per step, as in timm).
        width: the stem's output channels; stage i has ``width * 2**i`` planes (64: the
            standard ResNets, the only width of torchvision's and timm's weights).
        weights: path or state dict: torchvision / timm ResNet or an onetrunk checkpoint.
    """
    return _resnet(Bottleneck, [3, 4, 6, 3], weights=weights, **kwargs)


@register_backbone
def resnet101(*, weights=None, **kwargs) -> ResNet:
    """ResNet-101 (Bottleneck, [3, 4, 23, 3]); C2-C5 channels 256/512/1024/2048."""
    return _resnet(Bottleneck, [3, 4, 23, 3], weights=weights, **kwargs)


@register_backbone
def resnet152(*, weights=None, **kwargs) -> ResNet:
    """ResNet-152 (Bottleneck, [3, 8, 36, 3]); C2-C5 channels 256/512/1024/2048."""
    return _resnet(Bottleneck, [3, 8, 36, 3], weights=weights, **kwargs)
