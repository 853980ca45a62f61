"""Metrics accumulated on the device (no per-batch host syncs)."""
from __future__ import annotations

import torch

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """``K x K`` counts, rows = true class, columns = prediction; ``ignore_index`` skipped.

    Used for classification accuracy and (per pixel) for segmentation IoU.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int | None = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.reshape(-1), target.reshape(-1)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        k = self.num_classes
        self.mat += torch.bincount(target.long() * k + pred.long(), minlength=k * k).reshape(k, k)

    def compute(self) -> dict[str, float | list[float]]:
        m = self.mat.double().cpu()
        total = m.sum()
        correct = m.diag()
        per_class_total = m.sum(1)
        per_class_acc = correct / per_class_total.clamp(min=1)
        union = m.sum(0) + m.sum(1) - correct
        iou = correct / union.clamp(min=1)
        present = union > 0  # classes that never occur in targets nor predictions do not count
        return {
            "acc": float(correct.sum() / total.clamp(min=1)),
            "per_class_acc": per_class_acc.tolist(),
            "iou": iou.tolist(),
            "miou": float(iou[present].mean()) if present.any() else 0.0,
        }
