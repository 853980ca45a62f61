"""Detection targets: the per-image form (a list of ``{"boxes": [M, 4] xyxy, "labels": [M]}``)
and the padded batch form (``{"boxes": [N, M, 4], "labels": [N, M]}``, labels -1 on padding)
that ``heads.detection.FCOSHead`` assigns in one vectorised pass; checks that name what is wrong."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import torch

__all__ = ["pad_targets", "is_padded_targets", "check_target_structure"]


def is_padded_targets(targets: Any) -> bool:
    """The batched target form: ``{"boxes": [N, M, 4], "labels": [N, M]}``, labels -1 on padding."""
    return isinstance(targets, Mapping) and "boxes" in targets and "labels" in targets


def _check_boxes(boxes: Any, layout: str, where: str) -> None:
    """``boxes`` is a floating-point tensor of ``layout`` ("[M, 4]" or "[N, M, 4]")."""
    dims = layout.count(",") + 1
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != dims or boxes.shape[-1] != 4:
        got = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"{where}: boxes must be a {layout} xyxy tensor, got {got}")
    if not boxes.is_floating_point():
        raise ValueError(f"{where}: boxes must be floating point (xyxy pixels), got {boxes.dtype}")


def check_target_structure(targets: Any, num_images: int | None = None) -> None:
    """Types and shapes only (no device sync): cheap enough to run on every ``loss`` call."""
    if is_padded_targets(targets):
        boxes, labels = targets["boxes"], targets["labels"]
        _check_boxes(boxes, "[N, M, 4]", "padded targets")
        if (not isinstance(labels, torch.Tensor) or labels.shape != boxes.shape[:2] or labels.is_floating_point()
                or labels.dtype == torch.bool):
            got = (f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor)
                   else type(labels).__name__)
            raise ValueError(f"padded targets: labels must be an integer [N, M] = {tuple(boxes.shape[:2])} "
                             f"tensor (-1 on padding), got {got}")
        if num_images is not None and boxes.shape[0] != num_images:
            raise ValueError(f"got padded targets for {boxes.shape[0]} images but {num_images} images")
        return
    if not isinstance(targets, (list, tuple)):
        raise ValueError("detection targets must be a list of dicts (one per image) or a dict of padded "
                         f"'boxes' [N, M, 4] and 'labels' [N, M], got {type(targets).__name__}")
    if num_images is not None and len(targets) != num_images:
        raise ValueError(f"got {len(targets)} targets for {num_images} images")
    for i, t in enumerate(targets):
        if not isinstance(t, Mapping) or "boxes" not in t or "labels" not in t:
            got = sorted(t) if isinstance(t, Mapping) else type(t).__name__
            raise ValueError(f"image {i}: target must be a dict with 'boxes' and 'labels', got {got}")
        boxes, labels = t["boxes"], t["labels"]
        _check_boxes(boxes, "[M, 4]", f"image {i}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"image {i}: labels must be a [M] int64 tensor, got {got}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"image {i}: labels must be integer class indices, got {labels.dtype}")
        if labels.shape[0] != boxes.shape[0]:
            raise ValueError(f"image {i}: {boxes.shape[0]} boxes but {labels.shape[0]} labels")


def pad_targets(targets: Sequence[Mapping[str, torch.Tensor]], multiple: int = 1,
                device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Per-image targets -> the padded form ``{"boxes": [N, M, 4] float32, "labels": [N, M] int64}``,
    labels -1 on padding; M is the largest box count rounded up to ``multiple`` (at least 1).

    A fixed M (``multiple`` above any image's count) gives every batch the same shapes, which a
    CUDA graph needs; built on the CPU in a DataLoader worker it also turns 2N small tensors per
    batch into two (less inter-process traffic and host-to-device copies).
    """
    n = len(targets)
    m = max([int(t["boxes"].shape[0]) for t in targets] + [1])
    m = -(-m // max(1, multiple)) * max(1, multiple)
    boxes = torch.zeros(n, m, 4, dtype=torch.float32, device=device)
    labels = torch.full((n, m), -1, dtype=torch.int64, device=device)
    for i, t in enumerate(targets):
        k = t["boxes"].shape[0]
        boxes[i, :k] = t["boxes"]
        labels[i, :k] = t["labels"]
    return {"boxes": boxes, "labels": labels}
