"""Semantic segmentation: an FCN-8s style head on C3/C4/C5 and the backbone + head model.

The coarsest feature gets torchvision's ``FCNHead`` block (3x3 conv, BN, ReLU, dropout, 1x1 to
class scores); each finer skip gets a 1x1 score conv. Scores are fused coarse to fine, each
time upsampled to the *size* of the next skip (never by a scale factor), and the fused map is
upsampled to the input size, so any H, W works (97x131 included) and a dilated trunk (C4 and C5
at stride 8 or 16) simply skips the resizes whose sizes already agree.

Everything in ``forward`` and ``loss`` is a tensor op: no ``.item()``, no boolean-mask indexing,
so no device -> host synchronisation and no graph break under ``torch.compile``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from backbones.base import Backbone, FeatureSpec

from .base import TaskModel

__all__ = ["FCNHead", "Segmenter"]


# ----------------------------------------------------------------------------- helpers

def _fcn_block(in_channels: int, channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """torchvision's ``FCNHead`` block; the last layer is the score conv."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),  # bias is redundant before BN
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        nn.Conv2d(channels, num_classes, 1),
    )


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize to ``size``; a no-op when it already has that size (dilated trunks)."""
    if tuple(x.shape[-2:]) == tuple(size):  # Python ints: no sync
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over the pixels that are not ``ignore_index``, in float32.

    ``F.cross_entropy(reduction="mean")`` returns NaN (0 / 0) for a batch whose pixels are all
    ignored, which would stop training on a legal input; dividing the sum by the clamped count
    gives 0 there and the same value otherwise, without a host sync.
    """
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum().clamp(min=1)
    return total / count


# ----------------------------------------------------------------------------- head

class FCNHead(nn.Module):
    """FCN-8s style head: ``raw = head(features, image_size)`` -> ``{"out": [N, K, H, W]}``
    logits at ``image_size`` (plus ``"aux"`` in training when ``aux=True``).

    Args:
        in_specs: the backbone's ``feature_info``; ``in_features`` are picked from it.
        num_classes: K, background included (targets are in ``[0, K)`` or ``ignore_index``).
        in_features: fine to coarse; the last one gets the conv block, the others 1x1 score
            convs (skips). ``("c5",)`` gives FCN-32s, ``("c4", "c5")`` FCN-16s.
        channels: width of the conv block; default ``in_channels // 4`` of the coarsest feature
            (torchvision's FCN).
        dropout: dropout before the score conv of the conv blocks.
        aux: add an auxiliary conv block on ``aux_feature`` (default C4), used only by the loss
            (weight ``aux_weight``) and only computed in training mode.
        ignore_index: target value that the loss skips.
    """

    def __init__(self, in_specs: Sequence[FeatureSpec], num_classes: int, *,
                 in_features: Sequence[str] = ("c3", "c4", "c5"), channels: int | None = None,
                 dropout: float = 0.1, aux: bool = False, aux_weight: float = 0.4,
                 ignore_index: int = 255, aux_feature: str = "c4") -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        if isinstance(in_features, str):
            in_features = (in_features,)
        by_name = {s.name: s for s in in_specs}
        wanted = list(in_features) + ([aux_feature] if aux else [])
        missing = [n for n in wanted if n not in by_name]
        if not in_features or missing:
            raise ValueError(f"in_features {list(in_features)}{' + aux ' + aux_feature if aux else ''}: "
                             f"{missing or 'none given'} not among the backbone's features {list(by_name)}")
        specs = [by_name[n] for n in in_features]
        for a, b in zip(specs, specs[1:]):
            # Equal strides are fine (dilated C4/C5); a coarser map before a finer one is not.
            if b.stride < a.stride:
                raise ValueError(f"in_features must run fine to coarse: {a.name} (stride {a.stride}) "
                                 f"comes before {b.name} (stride {b.stride})")
        coarsest = specs[-1]
        channels = channels if channels is not None else max(coarsest.channels // 4, 1)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_weight = float(aux_weight)
        self.in_names = [s.name for s in specs]
        self.strides = [s.stride for s in specs]

        self.score = _fcn_block(coarsest.channels, channels, num_classes, dropout)
        # Skips, coarse to fine: the order they are fused in.
        self.skip_names = [s.name for s in reversed(specs[:-1])]
        self.skip_scores = nn.ModuleList(nn.Conv2d(s.channels, num_classes, 1) for s in reversed(specs[:-1]))
        self.aux_name = aux_feature if aux else None
        self.aux = None
        if aux:
            aux_spec = by_name[aux_feature]
            self.aux = _fcn_block(aux_spec.channels, max(aux_spec.channels // 4, 1), num_classes, dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Score convs (block outputs and skips): small weights and zero biases, so every class
        # starts near-equally likely (loss ~ log K) and no skip dominates the fused sum at first.
        score_convs = [self.score[-1], *self.skip_scores] + ([self.aux[-1]] if self.aux is not None else [])
        for conv in score_convs:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    # ------------------------------------------------------------------ forward

    def forward(self, features: dict[str, torch.Tensor], image_size: Sequence[int]) -> dict[str, torch.Tensor]:
        # sym_int, not int: under torch.export (ONNX) int() would freeze a dynamic H, W to the
        # example's size; for plain ints and tensors it is int()
        size = (torch.sym_int(image_size[0]), torch.sym_int(image_size[1]))
        x = self.score(features[self.in_names[-1]])  # [N, K, h5, w5]
        for name, score in zip(self.skip_names, self.skip_scores):
            skip = features[name]
            x = _resize(x, skip.shape[-2:]) + score(skip)  # [N, K, h_skip, w_skip]
        raw = {"out": _resize(x, size)}  # [N, K, H, W]
        if self.aux is not None and self.training:
            raw["aux"] = _resize(self.aux(features[self.aux_name]), size)  # [N, K, H, W]
        return raw

    # ------------------------------------------------------------------ loss

    def _check_targets(self, targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not isinstance(targets, torch.Tensor):
            raise ValueError(f"segmentation targets must be an int64 tensor [N, H, W], got {type(targets).__name__}")
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(f"segmentation targets must hold integer class indices, got {targets.dtype}")
        expected = (logits.shape[0], *logits.shape[2:])
        if tuple(targets.shape) != expected:
            raise ValueError(f"segmentation target mask shape {tuple(targets.shape)} does not match the "
                             f"logits shape {tuple(logits.shape)} (expected masks {expected})")
        return targets.to(device=logits.device, dtype=torch.int64)  # no-op for int64 on device

    def loss(self, raw: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"seg": CE}``, plus ``{"aux": aux_weight * CE}`` when the aux output is present.

        Cross-entropy is averaged over non-ignored pixels and computed in float32 whatever the
        autocast dtype (a bf16 log-softmax loses digits).
        """
        targets = self._check_targets(targets, raw["out"])
        losses = {"seg": _masked_ce(raw["out"], targets, self.ignore_index)}
        if "aux" in raw:
            losses["aux"] = self.aux_weight * _masked_ce(raw["aux"], targets, self.ignore_index)
        return losses

    def postprocess(self, raw: dict[str, torch.Tensor], image_size: Sequence[int] | None = None) -> torch.Tensor:
        """Logits ``[N, K, H, W]`` at the size ``forward`` was given (argmax is the caller's)."""
        return raw["out"]


# ----------------------------------------------------------------------------- model

class Segmenter(TaskModel):
    """``Segmenter(backbone, head)``: train mode with masks ``[N, H, W]`` -> loss dict
    (``seg``, and ``aux`` if enabled); otherwise logits ``[N, K, H, W]`` at the input size.

    ``check_targets`` checks every mask value is a class id in ``[0, K)`` or the ignore
    index, at the cost of one host sync per training call; turn it off where the data
    pipeline already checks them (the mask datasets do) or the step is a CUDA graph."""

    def __init__(self, backbone: Backbone, head: FCNHead, *, check_targets: bool = True) -> None:
        names = [s.name for s in backbone.feature_info]
        aux_name = getattr(head, "aux_name", None)
        needed = list(getattr(head, "in_names", [])) + ([aux_name] if aux_name else [])
        missing = [n for n in needed if n not in names]
        if missing:
            raise ValueError(f"the head reads {missing} but the backbone only returns {names}")
        super().__init__(backbone, head)
        self.check_targets = check_targets

    def forward(self, images: torch.Tensor, targets: Any = None):
        if self.training and self.check_targets and isinstance(targets, torch.Tensor):
            k, ignore = self.head.num_classes, self.head.ignore_index
            bad = ((targets < 0) | (targets >= k)) & (targets != ignore)
            if bool(bad.any()):  # before the trunk runs, and before cross_entropy's device-side assert
                values = torch.unique(targets[bad])[:10].tolist()
                raise ValueError(f"segmentation masks hold class ids {values}: expected 0..{k - 1} "
                                 f"(num_classes={k}) or {ignore} (ignore)")
        return super().forward(images, targets)
