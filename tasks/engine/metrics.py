"""Metrics accumulated on the device (no per-batch host syncs), reduced across ranks under
``torchrun`` (each rank evaluates its shard of the validation set); per-class numbers from
pycocotools' COCOeval."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from . import distributed

__all__ = ["ConfusionMatrix", "multilabel_metrics", "coco_per_class", "coco_gt_present", "by_name"]


class ConfusionMatrix:
    """``K x K`` counts, rows = true class, columns = prediction; ``ignore_index`` skipped.

    Used for classification accuracy and (per pixel) for segmentation IoU. With several
    ranks, ``all_reduce()`` after the last update makes ``mat`` / ``compute`` global.
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

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the counts of every rank in place (call once, after the last ``update``); a
        no-op in one process. Returns ``self``."""
        distributed.all_reduce_sum(self._counts)
        return self

    def compute(self) -> dict[str, float | list[float]]:
        m = self.mat.double().cpu()
        total = m.sum()
        correct = m.diag()
        per_class_total = m.sum(1)
        per_class_acc = correct / per_class_total.clamp(min=1)  # = recall
        precision = correct / m.sum(0).clamp(min=1)  # 0 for a class never predicted
        union = m.sum(0) + m.sum(1) - correct
        iou = correct / union.clamp(min=1)
        present = union > 0  # classes that never occur in targets nor predictions do not count
        return {
            "acc": float(correct.sum() / total.clamp(min=1)),
            "per_class_acc": per_class_acc.tolist(),
            "precision": precision.tolist(),
            "recall": per_class_acc.tolist(),
            "iou": iou.tolist(),
            "miou": float(iou[present].mean()) if present.any() else 0.0,
        }

    def segmentation(self) -> dict[str, float | list[float]]:
        """``miou``, ``pixel_acc`` and per-class ``iou`` (the segmentation tasks' metrics)."""
        m = self.compute()
        return {"miou": m["miou"], "pixel_acc": m["acc"], "iou": m["iou"]}


@torch.no_grad()
def multilabel_metrics(scores: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Multi-label classification: mean average precision over classes with at least one
    positive (non-interpolated AP: mean precision at each true positive, ranking by score) and
    micro-averaged F1 at ``threshold``. ``scores`` / ``targets``: ``[N, K]``, targets 0/1."""
    scores, targets = scores.float().cpu(), targets.float().cpu()
    order = scores.argsort(dim=0, descending=True)  # [N, K]: per class, images by score
    hits = targets.gather(0, order)  # [N, K]
    precision = hits.cumsum(0) / torch.arange(1, len(scores) + 1, dtype=torch.float32)[:, None]
    positives = targets.sum(0)  # [K]
    ap = (precision * hits).sum(0) / positives.clamp(min=1)
    pred = scores >= threshold
    tp = (pred & (targets > 0)).sum().item()
    fp = (pred & (targets == 0)).sum().item()
    fn = (~pred & (targets > 0)).sum().item()
    return {"mAP": float(ap[positives > 0].mean()) if (positives > 0).any() else 0.0,
            "F1": 2 * tp / max(2 * tp + fp + fn, 1)}


def by_name(names: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    """``{class name: value}``: how per-class metrics are stored (metrics.jsonl, metrics.json)."""
    return {str(n): float(v) for n, v in zip(names, values, strict=True)}


def coco_gt_present(coco_gt, cat_ids: Sequence[int], img_ids: Sequence[int]) -> list[bool]:
    """Per category of ``cat_ids``: has it a ground-truth box COCOeval counts (not crowd) in
    ``img_ids``?"""
    counted = {a["category_id"] for i in img_ids for a in coco_gt.imgToAnns.get(i, ()) if not a.get("iscrowd", 0)}
    return [c in counted for c in cat_ids]


def coco_per_class(cocoeval, cat_ids: Sequence[int], *, has_gt: Sequence[bool] | None = None) -> dict[str, Any]:
    """Per category of ``cat_ids`` (in that order) from ``COCOeval.eval["precision"]``
    ``[T, R, K, A, M]`` at area "all" and the most detections per image, averaged as
    ``COCOeval.summarize`` does (entries > -1): ``AP`` (IoU .50:.95) and ``AP50``, -1 for a
    class without ground truth; ``recall`` ``[R]`` (COCO's 101 points) and ``precision50``
    ``[K, R]`` (NaN without ground truth), the precision-recall curves at IoU 0.5.
    ``cocoeval=None`` (no detections at all): AP 0 where ``has_gt``, else -1."""
    recall = np.linspace(0.0, 1.0, 101)
    if cocoeval is None:
        if has_gt is None:
            raise ValueError("coco_per_class without a COCOeval needs has_gt")
        ap = [0.0 if g else -1.0 for g in has_gt]
        curves = np.array([np.zeros_like(recall) if g else np.full_like(recall, np.nan) for g in has_gt])
        return {"AP": ap, "AP50": list(ap), "recall": recall, "precision50": curves.reshape(len(ap), -1)}
    params = cocoeval.params
    k = [list(params.catIds).index(c) for c in cat_ids]
    t50 = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
    p = np.asarray(cocoeval.eval["precision"])[:, :, k, 0, -1]  # [T, R, K]: area all, most detections

    def mean_valid(x: np.ndarray) -> list[float]:  # [.., K] -> [K]: summarize's mean of entries > -1
        x = x.reshape(-1, x.shape[-1])
        valid = x > -1
        sums, counts = np.where(valid, x, 0.0).sum(0), valid.sum(0)
        return [float(s / c) if c else -1.0 for s, c in zip(sums, counts)]

    curves = p[t50].T.astype(np.float64)  # [K, R]
    curves[curves < 0] = np.nan
    return {"AP": mean_valid(p), "AP50": mean_valid(p[t50]), "recall": np.asarray(params.recThrs),
            "precision50": curves}


def coco_scores(evaluator, val_set, names: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``CocoEvaluator.compute()``'s metrics with ``per_class_AP`` / ``per_class_AP50``
    (``{class name: AP}``, -1 for a class without ground truth), and ``coco_per_class``' result
    (its precision-recall curves for a picture). Run it where COCOeval runs (rank 0)."""
    metrics: dict[str, Any] = evaluator.compute()
    ids, ev = val_set.cat_ids, evaluator.cocoeval
    # no detections at all: no COCOeval; a class with ground truth then has AP 0
    has_gt = None if ev is not None else coco_gt_present(val_set.coco, ids, set(evaluator.image_ids))
    per_class = coco_per_class(ev, ids, has_gt=has_gt)
    metrics["per_class_AP"] = by_name(names, per_class["AP"])
    metrics["per_class_AP50"] = by_name(names, per_class["AP50"])
    return metrics, per_class
