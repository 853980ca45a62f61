"""Image classification: global pooling + dropout + linear on the coarsest feature."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backbones.base import FeatureSpec

from .base import TaskModel

__all__ = ["ClassificationHead", "Classifier", "MultiLabelHead"]

# A classifier is the plain task model (a backbone and one head): no behaviour of its own.
Classifier = TaskModel


class ClassificationHead(nn.Module):
    """Logits ``[N, num_classes]`` from the feature named by ``in_spec``.

    ``loss`` is cross-entropy with optional label smoothing; ``postprocess`` returns the
    logits (softmax / top-k are the caller's choice).
    """

    def __init__(self, in_spec: FeatureSpec, num_classes: int, dropout: float = 0.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_name = in_spec.name
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_spec.channels, num_classes)

    def forward(self, features: dict[str, torch.Tensor], image_size: tuple[int, int] | None = None) -> torch.Tensor:
        x = features[self.in_name].mean(dim=(2, 3))  # [N, C]: global average pool
        return self.fc(self.dropout(x))  # [N, K]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        # fp32 loss whatever the autocast dtype: the log-softmax of bf16 logits loses digits
        return {"cls": F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)}

    def postprocess(self, logits: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        return logits


class MultiLabelHead(nn.Module):
    """Which of ``num_classes`` classes appear in the image: pool + linear, one sigmoid per class.

    ``loss`` is binary cross-entropy against multi-hot targets ``[N, K]``; ``postprocess``
    returns the per-class probabilities ``[N, K]``.
    """

    def __init__(self, in_spec: FeatureSpec, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_name = in_spec.name
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_spec.channels, num_classes)

    def forward(self, features: dict[str, torch.Tensor], image_size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.fc(self.dropout(features[self.in_name].mean(dim=(2, 3))))  # [N, K]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if targets.shape != logits.shape:
            raise ValueError(f"multi-label targets must be [N, {self.num_classes}] multi-hot, got {tuple(targets.shape)}")
        return {"bce": F.binary_cross_entropy_with_logits(logits.float(), targets.float())}

    def postprocess(self, logits: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        return torch.sigmoid(logits.float())
