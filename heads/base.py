"""The protocol every task head follows, and the backbone + head task model.

``raw = head(features, image_size)``, ``head.loss(raw, targets) -> dict[str, Tensor]``,
``head.postprocess(raw, image_size)``: one trunk pass can feed any set of heads.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from backbones.base import Backbone

__all__ = ["TaskModel"]


class TaskModel(nn.Module):
    """A backbone plus one head. Training with targets returns the loss dict; otherwise the
    post-processed outputs (``targets_required`` makes targets mandatory in training)."""

    targets_required = False

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, targets: Any = None):
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{type(self).__name__} expects images as a [N, C, H, W] tensor, got {got}")
        image_size = (images.shape[-2], images.shape[-1])
        raw = self.head(self.backbone(images), image_size)
        if self.training and targets is not None:
            return self.head.loss(raw, targets)
        if self.training and self.targets_required:
            raise ValueError(f"{type(self).__name__} in training mode needs targets; call .eval() to predict")
        return self.head.postprocess(raw, image_size)
