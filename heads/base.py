"""The protocol every task head follows, and the backbone + head task model.

``raw = head(features, image_size)``, ``head.loss(raw, targets) -> dict[str, Tensor]``,
``head.postprocess(raw, image_size)``: one trunk pass can feed any set of heads.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from backbones.base import Backbone

__all__ = ["TaskModel", "check_images"]


def check_images(model: nn.Module, images: Any) -> None:
    """Task models take normalised float batches ``[N, C, H, W]`` with the trunk's channels;
    anything else is a ``ValueError`` saying what was expected (not torch's dtype error deep
    in the first conv)."""
    name = type(model).__name__
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} expects images as a [N, C, H, W] tensor, got {got}")
    if not images.is_floating_point():
        raise ValueError(f"{name} expects normalised float images ((pixels / 255 - mean) / std), got {images.dtype}: "
                         f"tasks.load(checkpoint).predict(...) takes raw uint8 images")
    chans = getattr(model.backbone, "in_chans", None)
    if chans is not None and images.shape[1] != chans:
        raise ValueError(f"{name} expects {chans}-channel images, got {images.shape[1]} channels "
                         f"(shape {tuple(images.shape)})")


class TaskModel(nn.Module):
    """A backbone plus one head. Training with targets returns the loss dict; otherwise the
    post-processed outputs (``targets_required`` makes targets mandatory in training)."""

    targets_required = False

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, targets: Any = None):
        check_images(self, images)
        image_size = (images.shape[-2], images.shape[-1])
        raw = self.head(self.backbone(images), image_size)
        if self.training and targets is not None:
            return self.head.loss(raw, targets)
        if self.training and self.targets_required:
            raise ValueError(f"{type(self).__name__} in training mode needs targets; call .eval() to predict")
        return self.head.postprocess(raw, image_size)

    def forward_device(self, images: torch.Tensor) -> Any:
        """The eval-mode outputs as they leave the device part: tensors of fixed shapes, no host
        sync, so a CUDA graph can hold the whole call. ``finish`` makes ``forward``'s outputs."""
        check_images(self, images)
        image_size = (images.shape[-2], images.shape[-1])
        return device_outputs(self.head, self.head(self.backbone(images), image_size), image_size)

    def finish(self, outputs: Any, image_size: tuple[int, int]) -> Any:
        return host_outputs(self.head, outputs, image_size)


def device_outputs(head: nn.Module, raw: Any, image_size: tuple[int, int]) -> Any:
    """A head's post-processing up to where it needs the host (``head.postprocess_device``);
    for heads without one (classification, segmentation) that is all of ``postprocess``."""
    fn = getattr(head, "postprocess_device", None)
    return fn(raw, image_size) if fn is not None else head.postprocess(raw, image_size)


def host_outputs(head: nn.Module, outputs: Any, image_size: tuple[int, int]) -> Any:
    """The rest of ``postprocess`` after ``device_outputs`` (``head.postprocess_host``)."""
    fn = getattr(head, "postprocess_host", None)
    return fn(outputs, image_size) if fn is not None else outputs
