"""Fold eval-mode batch normalisation into the convolution before it, for inference.

At inference a BatchNorm is a per-channel affine map with fixed coefficients, so
``bn(conv(x))`` equals one convolution with rescaled weights and a bias: the folded model
computes the same outputs (to fp32 rounding) without the norm layers' kernels and memory
traffic. ``fuse_conv_bn`` does this for every conv -> norm pair of this project's ResNet
(every stem, BasicBlock and Bottleneck, the downsample shortcuts), wherever the ResNet sits in
a model (a bare trunk, a ``Classifier``, a ``MultiTaskModel``...). The pairs come from the
block layout in ``backbones/resnet.py`` (which conv feeds which norm), not from module order.

The folded model is for inference only: batch statistics and running-stat updates are gone.
"""
from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.ops import FrozenBatchNorm2d

from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["fuse_conv_bn"]

# Norms that are an affine map at eval time (SyncBatchNorm behaves as BatchNorm2d in eval).
_FOLDABLE = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)
_NORMS = _FOLDABLE + (nn.GroupNorm,)  # every norm ``make_norm_layer`` builds


def _sequential_pairs(seq: nn.Sequential, prefix: str) -> list[tuple[str, str]]:
    """Pairs of consecutive children ``(conv, norm)`` of a Sequential: conv feeds norm."""
    kids = list(seq.named_children())
    return [(f"{prefix}{a}", f"{prefix}{b}") for (a, ma), (b, mb) in zip(kids, kids[1:])
            if isinstance(ma, nn.Conv2d) and isinstance(mb, _NORMS)]


def _conv_norm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Dotted names ``(conv, norm)`` of every ResNet conv whose output goes straight into a norm."""
    pairs: list[tuple[str, str]] = []
    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        if isinstance(m, ResNet):
            if isinstance(m.conv1, nn.Sequential):
                # deep stem: (conv, norm, relu) x2 then a last conv that feeds the trunk's bn1
                pairs += _sequential_pairs(m.conv1, f"{p}conv1.")
                last = [k for k, c in m.conv1.named_children() if isinstance(c, nn.Conv2d)][-1]
                pairs.append((f"{p}conv1.{last}", f"{p}bn1"))
            else:
                pairs.append((f"{p}conv1", f"{p}bn1"))
        elif isinstance(m, (BasicBlock, Bottleneck)):
            n_convs = 3 if isinstance(m, Bottleneck) else 2
            pairs += [(f"{p}conv{i}", f"{p}bn{i}") for i in range(1, n_convs + 1)]
            if isinstance(m.downsample, nn.Sequential):
                pairs += _sequential_pairs(m.downsample, f"{p}downsample.")
    return pairs


def _set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def fuse_conv_bn(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm2d / SyncBatchNorm / FrozenBatchNorm2d of the ResNet(s) in ``model``
    into the conv that feeds it; the norm becomes ``nn.Identity`` and the conv gains a bias.

    Returns a folded **copy** (``model`` is left untouched) unless ``inplace=True``, which
    folds ``model`` itself and returns it. The model must be in eval mode: a model in
    training mode normalises with batch statistics, which cannot be folded, so it raises
    ``ValueError``. GroupNorm cannot be folded either (its statistics depend on the input):
    a model with no foldable pair raises ``ValueError``. Use the result for inference only.
    """
    pairs = _conv_norm_pairs(model)
    if model.training:
        raise ValueError(f"fuse_conv_bn needs a model in eval mode: {type(model).__name__} is in training mode, "
                         "where BatchNorm uses batch statistics that cannot be folded. Call model.eval() first.")
    foldable = [(c, n) for c, n in pairs if isinstance(model.get_submodule(n), _FOLDABLE)]
    if not foldable:
        norms = sorted({type(model.get_submodule(n)).__name__ for _, n in pairs})
        raise ValueError(f"fuse_conv_bn found no conv -> BatchNorm pair to fold in {type(model).__name__} "
                         f"(ResNet norms found: {norms or 'no ResNet'}); only BatchNorm2d, SyncBatchNorm and "
                         "FrozenBatchNorm2d fold into a conv (GroupNorm depends on the input)")
    for _, n in foldable:
        bn = model.get_submodule(n)
        if bn.training:
            raise ValueError(f"fuse_conv_bn: {n} is in training mode (batch statistics); call model.eval() first")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"fuse_conv_bn: {n} has no running statistics (track_running_stats=False): "
                             "it normalises with batch statistics even in eval mode and cannot be folded")
    if not inplace:
        model = copy.deepcopy(model)
    for c, n in foldable:
        conv, bn = model.get_submodule(c), model.get_submodule(n)
        _set_submodule(model, c, fuse_conv_bn_eval(conv, bn))  # a new conv with folded weight and bias
        _set_submodule(model, n, nn.Identity())
    return model
