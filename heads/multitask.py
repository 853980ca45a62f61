"""One trunk pass, several heads: joint training and one-pass inference.

``MultiTaskModel(backbone, {"classify": ..., "detect": ..., "segment": ...})`` runs the trunk
once per batch and every head on its features. Training with ``targets = {task: target}``
returns the weighted losses of every task (keys ``<task>_<loss>``); otherwise
``{task: post-processed outputs}``. ``from_task_models`` merges single-task models whose
trunks hold identical weights (e.g. trained from one frozen trunk) into one such model.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from backbones.base import Backbone

from .base import check_images, device_outputs, host_outputs

__all__ = ["MultiTaskModel"]


class MultiTaskModel(nn.Module):
    def __init__(self, backbone: Backbone, heads: Mapping[str, nn.Module],
                 loss_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if not heads:
            raise ValueError("MultiTaskModel needs at least one head")
        unknown = set(loss_weights or {}) - set(heads)
        if unknown:
            raise ValueError(f"loss_weights for unknown tasks {sorted(unknown)}; heads are {list(heads)}")
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.loss_weights = {name: float((loss_weights or {}).get(name, 1.0)) for name in heads}

    def forward(self, images: torch.Tensor, targets: Mapping[str, Any] | None = None):
        check_images(self, images)
        image_size = (images.shape[-2], images.shape[-1])
        features = self.backbone(images)  # once, for every head
        if self.training and targets is not None:
            missing = [name for name in self.heads if name not in targets]
            if missing:
                raise ValueError(f"targets lack tasks {missing}; give one target per head {list(self.heads)}")
            losses: dict[str, torch.Tensor] = {}
            for name, head in self.heads.items():
                w = self.loss_weights[name]
                for key, value in head.loss(head(features, image_size), targets[name]).items():
                    losses[f"{name}_{key}"] = value * w
            return losses
        return {name: head.postprocess(head(features, image_size), image_size) for name, head in self.heads.items()}

    def forward_device(self, images: torch.Tensor) -> dict[str, Any]:
        """Every head's device-side outputs from one trunk pass (see ``TaskModel.forward_device``)."""
        check_images(self, images)
        image_size = (images.shape[-2], images.shape[-1])
        features = self.backbone(images)
        return {name: device_outputs(head, head(features, image_size), image_size) for name, head in self.heads.items()}

    def finish(self, outputs: Mapping[str, Any], image_size: tuple[int, int]) -> dict[str, Any]:
        return {name: host_outputs(head, outputs[name], image_size) for name, head in self.heads.items()}

    @classmethod
    def from_task_models(cls, models: Mapping[str, nn.Module], *, atol: float = 0.0) -> "MultiTaskModel":
        """Share the trunk of single-task models (``.backbone`` + ``.head``) whose trunk
        weights agree (within ``atol``); raises ``ValueError`` naming the first difference."""
        items = list(models.items())
        first_name, first = items[0]
        reference = first.backbone.state_dict()
        for name, model in items[1:]:
            state = model.backbone.state_dict()
            if state.keys() != reference.keys():
                raise ValueError(f"the {name} and {first_name} trunks have different layers; they cannot share one")
            for key, value in state.items():
                ref = reference[key]
                if value.shape != ref.shape or not torch.allclose(value.float(), ref.float(), atol=atol, rtol=0):
                    diff = (value.float() - ref.float()).abs().max().item() if value.shape == ref.shape else "shape"
                    raise ValueError(
                        f"the {name} and {first_name} trunks differ at {key} (max |diff| {diff}): only models "
                        f"trained from one trunk with it frozen (--trunk CKPT --set model.freeze_at=5) share it")
        return cls(first.backbone, {name: model.head for name, model in items})
