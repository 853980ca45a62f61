"""Detection targets: the per-image form (a list of ``{"boxes": [M, 4] xyxy, "labels": [M]}``)
and the padded batch form (``{"boxes": [N, M, 4], "labels": [N, M]}``, labels -1 on padding);
checks that name what is wrong; and ``assign_points``, the FCOS assignment of a whole batch's
targets to the points of ``heads.geometry`` in one vectorised pass (no per-image loop, no host
sync)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Sequence

import torch
from torch import nn

from .geometry import Points

__all__ = ["pad_targets", "is_padded_targets", "check_target_structure", "check_target_values", "batch_targets",
           "assign_points"]


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


def batch_targets(targets: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``[N, M, 4]`` float32 and labels ``[N, M]`` int64 on ``device``, padding labels with -1.

    M is at least 1 so that reductions over boxes stay defined for an all-empty batch.
    Padded targets (``pad_targets``) pass through as they are.
    """
    if is_padded_targets(targets):
        boxes = targets["boxes"].to(device=device, dtype=torch.float32)
        labels = targets["labels"].to(device=device, dtype=torch.int64)
    else:
        boxes = nn.utils.rnn.pad_sequence([t["boxes"].to(device=device, dtype=torch.float32) for t in targets],
                                          batch_first=True)  # [N, M, 4]
        labels = nn.utils.rnn.pad_sequence([t["labels"].to(device=device, dtype=torch.int64) for t in targets],
                                           batch_first=True, padding_value=-1)  # [N, M]
    if boxes.shape[1] == 0:  # shape, not data: no sync
        boxes = boxes.new_zeros(boxes.shape[0], 1, 4)
        labels = labels.new_full((labels.shape[0], 1), -1)
    return boxes, labels


def check_target_values(targets: Any, num_classes: int, num_images: int | None = None) -> None:
    """Raise ``ValueError`` naming the image (and box) for malformed detection targets.

    Every value check of the batch runs on the padded ``[N, M]`` layout at once: a single
    host sync when the batch is good."""
    check_target_structure(targets, num_images)
    if is_padded_targets(targets):
        boxes, labels = targets["boxes"], targets["labels"]
        real = labels != -1  # -1 marks padding in this form
    else:
        if not targets:
            return
        device = targets[0]["boxes"].device
        counts = torch.tensor([t["boxes"].shape[0] for t in targets], device=device)
        padded = pad_targets(targets, device=device)
        boxes, labels = padded["boxes"], padded["labels"]
        real = torch.arange(boxes.shape[1], device=device) < counts[:, None]  # a label -1 here is an error
    nonfinite = (~torch.isfinite(boxes)).any(dim=-1) & real  # [N, M]
    out_of_range = ((labels < 0) | (labels >= num_classes)) & real
    degenerate = ((boxes[..., 2] <= boxes[..., 0]) | (boxes[..., 3] <= boxes[..., 1])) & real & ~nonfinite
    flags = torch.stack([nonfinite, out_of_range, degenerate])  # [3, N, M]
    if not bool(flags.any()):
        return
    i = int(flags.any(dim=2).any(dim=0).nonzero()[0])  # the first bad image
    kind = int(flags[:, i].any(dim=1).nonzero()[0])
    j = int(flags[kind, i].nonzero()[0])
    if kind == 0:
        raise ValueError(f"image {i}: box {j} has a non-finite coordinate: {boxes[i, j].tolist()}")
    if kind == 1:
        raise ValueError(f"image {i}: label {int(labels[i, j])} of box {j} is outside [0, {num_classes})")
    raise ValueError(f"image {i}: box {j} {boxes[i, j].tolist()} has x2 <= x1 or y2 <= y1 "
                     "(boxes are xyxy absolute pixels)")


@torch.no_grad()
def assign_points(grid: Points, targets: Any, center_sampling_radius: float) -> dict[str, torch.Tensor]:
    """FCOS assignment for the whole batch at once.

    A point is positive for a box when it lies inside the box's centre region (``radius *
    stride`` around the box centre, clipped to the box; the whole box when the radius is 0) and
    max(l, t, r, b) falls in its level's size range; a point matching several boxes takes the
    one of smallest area (ties: the lowest box index).

    Returns ``positive [N, P]`` bool, ``matched [N, P]`` (box index, -1 for background),
    ``labels [N, P]`` (-1 for background), ``boxes [N, P, 4]`` (the matched box; zeros for
    background) and ``reg_targets [N, P, 4]`` (l, t, r, b / stride; zeros for background).
    """
    points, strides, size_ranges = grid.points, grid.strides, grid.size_ranges
    gt_boxes, gt_labels = batch_targets(targets, points.device)  # [N, M, 4], [N, M]
    x = points[None, :, None, 0]  # [1, P, 1]
    y = points[None, :, None, 1]
    x1, y1, x2, y2 = (gt_boxes[:, None, :, i] for i in range(4))  # each [N, 1, M]
    # distances from every point to every box side: four [N, P, M] tensors, never [N, P, M, 4]
    left, top, right, bottom = x - x1, y - y1, x2 - x, y2 - y
    max_dist = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))
    lo, hi = size_ranges[None, :, None, 0], size_ranges[None, :, None, 1]  # [1, P, 1]
    match = (max_dist > lo) & (max_dist <= hi)
    if center_sampling_radius > 0:
        # The centre region is clipped to the box, so being inside it implies being inside
        # the box: the in-box test is subsumed here.
        radius = center_sampling_radius * strides[None, :, None]  # [1, P, 1]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        in_center = ((x - torch.maximum(cx - radius, x1) > 0) & (y - torch.maximum(cy - radius, y1) > 0)
                     & (torch.minimum(cx + radius, x2) - x > 0) & (torch.minimum(cy + radius, y2) - y > 0))
        match &= in_center
    else:
        match &= torch.minimum(torch.minimum(left, top), torch.minimum(right, bottom)) > 0
    # padding: its zero box has no interior and cannot pass the strict tests above anyway;
    # the mask keeps that true whatever the padding value
    match &= (gt_labels >= 0)[:, None, :]
    area = (x2 - x1) * (y2 - y1)  # [N, 1, M]
    cost = torch.where(match, area, torch.full_like(area, math.inf))  # [N, P, M]
    matched = cost.argmin(dim=2)  # [N, P]; argmin returns the first of equal minima
    positive = match.any(dim=2)  # [N, P]
    matched_boxes = gt_boxes.gather(1, matched[..., None].expand(-1, -1, 4))  # [N, P, 4]
    labels = gt_labels.gather(1, matched)  # [N, P]
    px, py = points[None, :, 0], points[None, :, 1]  # [1, P]
    ltrb = torch.stack([px - matched_boxes[..., 0], py - matched_boxes[..., 1],
                        matched_boxes[..., 2] - px, matched_boxes[..., 3] - py], dim=-1)  # [N, P, 4]
    reg_targets = ltrb / strides[None, :, None]
    pos4 = positive[..., None]
    return {
        "positive": positive,
        "matched": torch.where(positive, matched, -1),
        "labels": torch.where(positive, labels, -1),
        "boxes": torch.where(pos4, matched_boxes, 0.0),
        "reg_targets": torch.where(pos4, reg_targets, 0.0),
    }
