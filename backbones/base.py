"""Feature metadata and the backbone protocol shared by every trunk and head.

A backbone is an ``nn.Module`` whose ``feature_info`` lists the maps its ``forward`` returns,
fine to coarse. Heads and necks read channels and strides from these specs, so nothing
downstream hard-codes ``[256, 512, 1024, 2048]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["FeatureSpec", "Backbone", "register_backbone", "build_backbone", "list_backbones"]


@dataclass(frozen=True)
class FeatureSpec:
    """One output feature map: its key in the forward dict, channel count and stride."""

    name: str
    channels: int
    stride: int


class Backbone(nn.Module):
    """Base class: subclasses fill ``feature_info`` while building their stages."""

    feature_info: list[FeatureSpec]

    def __init__(self) -> None:
        super().__init__()
        self.feature_info = []

    def spec(self, name: str) -> FeatureSpec:
        """The ``FeatureSpec`` called ``name``; a ``KeyError`` lists the available ones."""
        for s in self.feature_info:
            if s.name == name:
                return s
        raise KeyError(f"no feature {name!r}; this backbone returns {[s.name for s in self.feature_info]}")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


_REGISTRY: dict[str, Callable[..., Backbone]] = {}


def register_backbone(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
    """Decorator: make a builder available to ``build_backbone`` under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"backbone {fn.__name__!r} is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_backbones() -> list[str]:
    """Names accepted by ``build_backbone``, sorted."""
    return sorted(_REGISTRY)


def build_backbone(name: str, **kwargs) -> Backbone:
    """Build a registered backbone by name, e.g. ``build_backbone("resnet50", stem="deep")``."""
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list_backbones()}") from None
    return fn(**kwargs)
