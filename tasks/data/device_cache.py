"""Dense training data decoded once and kept as tensors, augmented per sample on the device.

For data that fits (FashionScenes: 8000 x 3 x 256 x 256 = 1.5 GB): ``decode_dense`` reads every
training sample once through the evaluation resize (longer side to ``size``), pads it top-left into
one ``[N, 3, S, S]`` uint8 tensor, and keeps the boxes as ``[N, M, 4]`` (labels -1 on padding) and
the masks as ``[N, S, S]`` (255 on padding). ``DenseAugment`` then redoes the albumentations
training pipelines of ``tasks.data.transforms`` for a whole batch at once, with per-sample random
numbers drawn on the device:

* detection (``detection_train_transforms``): RandomScale, HorizontalFlip, PadIfNeeded
  (top-left), RandomCrop to ``size``, boxes dropped below ``min_visibility`` of their area;
* segmentation (``segmentation_train_transforms``): RandomScale, PadIfNeeded, RandomCrop,
  HorizontalFlip, masks padded with 255.

The geometry is albumentations' exactly: the scaled size ``int(h * s)``, the crop corner
``int((H - size + 1) * u)``, cv2's half-pixel bilinear sampling for images (cv2 rounds in fixed
point: a pixel may differ by one grey level) and cv2's ``INTER_NEAREST`` rule
``floor(x * src / dst)`` for masks, albumentations' box arithmetic and visibility filter. The tests
compare the two paths on fixed parameters. The DataLoader workers (PNG decode + albumentations)
were the ceiling of dense training on an H200; here a batch costs a few kernels.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .images import cv2_single_threaded, with_skip_hint

__all__ = ["DenseCache", "decode_dense", "cache_nbytes", "dense_augment", "DenseAugment"]

_EPS = 1e-7  # albumentations' filter_bboxes epsilon


@dataclass
class DenseCache:
    """Decoded training samples: ``images [N, 3, S, S]`` uint8 (top-left, zero padded),
    ``hw [N, 2]`` their real sizes, ``boxes [N, M, 4]`` / ``labels [N, M]`` (-1: none) or None,
    ``masks [N, S, S]`` uint8 (255 outside the image) or None."""
    images: torch.Tensor
    hw: torch.Tensor
    boxes: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    masks: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device) -> "DenseCache":
        return DenseCache(*(None if t is None else t.to(device)
                            for t in (self.images, self.hw, self.boxes, self.labels, self.masks)))


def cache_nbytes(n: int, size: int, *, masks: bool) -> int:
    """What ``decode_dense`` will hold for ``n`` samples of at most ``size`` pixels (boxes aside)."""
    return n * size * size * (3 + int(masks))


def decode_dense(dataset: Any, transforms: Any, size: int, *, boxes: bool, masks: bool, workers: int | None = None,
                 quiet: bool = True) -> DenseCache:
    """Every sample of ``dataset`` (a ``CocoDetection`` or mask dataset) read once through
    ``transforms`` (the evaluation resize), packed into a ``DenseCache`` on the CPU. Threads:
    cv2 and PNG decoding release the GIL. A sample the dataset cannot use (its
    ``unusable_errors``) stops the decoding, naming the file, or under the dataset's
    ``skip_bad`` is left out of the cache, flagged in its ``unusable`` and named in one warning."""
    n = len(dataset)
    errors = getattr(dataset, "unusable_errors", ())
    skip = getattr(dataset, "unusable", None) is not None
    failed: dict[int, str] = {}
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    hw = torch.zeros(n, 2, dtype=torch.int64)
    mask_t = torch.full((n, size, size), 255, dtype=torch.uint8) if masks else None
    per_boxes: list[torch.Tensor] = [torch.zeros(0, 4)] * n
    per_labels: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int64)] * n

    def load(i: int) -> None:
        try:
            image, target = dataset._load(i, transforms)  # the dataset's own reading and checks
        except errors as e:
            if not skip:
                raise (with_skip_hint(e) if isinstance(e, OSError) else e) from None
            failed[i] = str(e)
            return
        h, w = image.shape[-2:]
        if h > size or w > size:
            raise ValueError(f"sample {i}: {w}x{h} after the resize, larger than the cache's {size}x{size}")
        images[i, :, :h, :w] = image
        hw[i, 0], hw[i, 1] = h, w
        if masks:
            m = target["mask"] if isinstance(target, dict) else target
            mask_t[i, :h, :w] = m.to(torch.uint8)
        if boxes:
            per_boxes[i], per_labels[i] = target["boxes"].float(), target["labels"]

    # the threads are the parallelism: cv2's own pool on top of them would oversubscribe the CPUs
    with cv2_single_threaded(), ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool:
        list(tqdm(pool.map(load, range(n)), total=n, desc="decode to cache", unit="img", disable=quiet or None))
    if failed:
        if len(failed) == n:
            raise ValueError(f"none of the {n} training images could be used: {failed[min(failed)]}")
        for i in failed:
            dataset.unusable.add(i)
        shown = "; ".join(failed[i] for i in sorted(failed)[:3]) + (f"; ... ({len(failed)})" if len(failed) > 3 else "")
        warnings.warn(f"skipping {len(failed)} unusable training image{'s' if len(failed) > 1 else ''} "
                      f"(data.skip_bad): {shown}", stacklevel=2)
        keep = torch.tensor(sorted(set(range(n)) - set(failed)))
        images, hw = images[keep], hw[keep]
        mask_t = mask_t[keep] if masks else None
        per_boxes = [per_boxes[i] for i in keep.tolist()]
        per_labels = [per_labels[i] for i in keep.tolist()]
        n = len(keep)
    box_t = label_t = None
    if boxes:
        m = max(1, max(len(b) for b in per_boxes))
        box_t = torch.zeros(n, m, 4)
        label_t = torch.full((n, m), -1, dtype=torch.int64)
        for i, (b, lab) in enumerate(zip(per_boxes, per_labels)):
            box_t[i, :len(b)], label_t[i, :len(b)] = b, lab
    return DenseCache(images, hw, box_t, label_t, mask_t)


def dense_augment(images: torch.Tensor, hw: torch.Tensor, scale: torch.Tensor, flip: torch.Tensor,
                  offset: torch.Tensor, size: int, *, flip_first: bool, boxes: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None, masks: torch.Tensor | None = None, min_visibility: float = 0.0,
                  mask_fill: int = 255) -> dict[str, torch.Tensor]:
    """One batch through scale -> (flip) -> pad top-left -> crop ``size`` -> (flip), with explicit
    per-sample parameters: ``scale [B]`` (float64 factors), ``flip [B]`` (bool), ``offset [B, 2]``
    (the crop corner ``(y, x)`` in the padded scaled image). ``flip_first``: detection's order
    (flip before the crop), else segmentation's (after). Inputs as ``DenseCache`` holds them.

    Returns ``images [B, 3, size, size]`` float (whole grey levels, 0-255), and as given
    ``boxes [B, M, 4]`` / ``labels [B, M]`` (a dropped box: zeros, label -1), ``masks [B, size,
    size]`` int64."""
    b = images.shape[0]
    dev = images.device
    h, w = hw[:, 0].double(), hw[:, 1].double()  # [B]
    hs, ws = torch.floor(h * scale), torch.floor(w * scale)  # albumentations: int(h * scale)
    pos = torch.arange(size, device=dev, dtype=torch.float64)
    ys = offset[:, :1].double() + pos  # [B, size]: rows of the padded, scaled image
    if flip_first:
        xs = offset[:, 1:].double() + pos
        inside_x = xs < ws[:, None]
        xs = torch.where(flip[:, None], ws[:, None] - 1 - xs, xs)  # flipped before the pad
    else:
        xs = offset[:, 1:].double() + torch.where(flip[:, None], size - 1 - pos, pos)
        inside_x = xs < ws[:, None]
    inside = (ys < hs[:, None])[:, :, None] & inside_x[:, None, :]  # [B, size, size]

    # cv2 INTER_LINEAR: source = (dst + 0.5) * src / dst - 0.5, clamped to the edge pixels
    sy = ((ys + 0.5) * (h / hs)[:, None] - 0.5).clamp(min=0)
    sy = torch.minimum(sy, (h - 1)[:, None])
    sx = ((xs + 0.5) * (w / ws)[:, None] - 0.5).clamp(min=0)
    sx = torch.minimum(sx, (w - 1)[:, None])
    s = images.shape[-1]
    # to float32 per row / column, before broadcasting to the [B, size, size, 2] grid
    gx, gy = ((2 * sx + 1) / s - 1).float(), ((2 * sy + 1) / images.shape[-2] - 1).float()
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = torch.where(inside[:, None], out.round(), 0.0)
    result = {"images": out}

    if masks is not None:
        # cv2 INTER_NEAREST: source = floor(dst * src / dst_size), at most the last pixel
        iy = torch.minimum(torch.floor(ys * (1.0 / (hs / h))[:, None]), (h - 1)[:, None]).clamp(min=0).long()
        ix = torch.minimum(torch.floor(xs * (1.0 / (ws / w))[:, None]), (w - 1)[:, None]).clamp(min=0).long()
        batch = torch.arange(b, device=dev)[:, None, None]
        m = masks[batch, iy[:, :, None], ix[:, None, :]].long()
        result["masks"] = torch.where(inside, m, mask_fill)

    if boxes is not None:
        fx, fy = (ws / w).float()[:, None], (hs / h).float()[:, None]
        x1, y1, x2, y2 = boxes.unbind(-1)
        x1, x2, y1, y2 = x1 * fx, x2 * fx, y1 * fy, y2 * fy
        if flip_first:
            wsf = ws.float()[:, None]
            x1, x2 = torch.where(flip[:, None], wsf - x2, x1), torch.where(flip[:, None], wsf - x1, x2)
        oy, ox = offset[:, :1].float(), offset[:, 1:].float()
        x1, x2, y1, y2 = x1 - ox, x2 - ox, y1 - oy, y2 - oy
        if not flip_first:
            x1, x2 = torch.where(flip[:, None], size - x2, x1), torch.where(flip[:, None], size - x1, x2)
        area = (x2 - x1) * (y2 - y1)
        cx1, cy1, cx2, cy2 = (v.clamp(0, size) for v in (x1, y1, x2, y2))
        clipped = (cx2 - cx1) * (cy2 - cy1)
        keep = ((labels >= 0) & (area >= _EPS) & (clipped / (area + _EPS) >= min_visibility)
                & (cx2 > cx1) & (cy2 > cy1))  # CocoDetection drops boxes squeezed to nothing
        result["boxes"] = torch.where(keep[..., None], torch.stack([cx1, cy1, cx2, cy2], -1), 0.0)
        result["labels"] = torch.where(keep, labels, -1)
    return result


class DenseAugment:
    """Draws ``dense_augment``'s parameters as the albumentations pipelines do: scale uniform in
    ``[lo, hi]``, a flip with probability ``hflip``, the crop corner uniform over the padded
    image. Then normalises (``normalize``: uint8-valued float -> model input)."""

    def __init__(self, size: int, scale: Sequence[float], hflip: float, *, flip_first: bool,
                 normalize: Any, min_visibility: float = 0.0, mask_fill: int = 255) -> None:
        lo, hi = (float(v) for v in scale)
        if not 0 < lo <= hi:
            raise ValueError(f"scale={tuple(scale)}: expected 0 < low <= high")
        self.size, self.lo, self.hi, self.hflip = size, lo, hi, hflip
        self.flip_first, self.normalize = flip_first, normalize
        self.min_visibility, self.mask_fill = min_visibility, mask_fill

    def params(self, hw: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, dev = hw.shape[0], hw.device
        u = torch.rand(4, b, device=dev, dtype=torch.float64, generator=generator)
        scale = self.lo + (self.hi - self.lo) * u[0]
        flip = u[1] < self.hflip
        hs, ws = torch.floor(hw[:, 0].double() * scale), torch.floor(hw[:, 1].double() * scale)
        room_y, room_x = (hs.clamp(min=self.size) - self.size + 1), (ws.clamp(min=self.size) - self.size + 1)
        offset = torch.stack([torch.floor(room_y * u[2]), torch.floor(room_x * u[3])], dim=1).long()
        return scale, flip, offset

    def __call__(self, images: torch.Tensor, hw: torch.Tensor, generator: torch.Generator, **targets) -> dict:
        scale, flip, offset = self.params(hw, generator)
        out = dense_augment(images, hw, scale, flip, offset, self.size, flip_first=self.flip_first,
                            min_visibility=self.min_visibility, mask_fill=self.mask_fill, **targets)
        out["images"] = self.normalize(out["images"])
        return out
