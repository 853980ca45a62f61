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
        # one extra bin collects ignored pixels: no boolean indexing, so no host sync per update
        self._counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.int64, device=device)

    @property
    def mat(self) -> torch.Tensor:
        k = self.num_classes
        return self._counts[: k * k].view(k, k)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        k = self.num_classes
        index = target * k + pred
        if self.ignore_index is not None:
            index = torch.where(target == self.ignore_index, k * k, index)
        # index_add_, not bincount: bincount reads the max index back to the host on CUDA
        self._counts.index_add_(0, index, torch.ones_like(index))

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
