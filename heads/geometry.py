"""The anchor points of the FCOS head: one point per cell of each FPN level, with the level's
stride and the range of object sizes the level is assigned.

``PointGrid(strides, size_ranges)`` gives, for the level sizes ``[(H_l, W_l), ...]`` that the
network made of an image (a function of the image size), the ``Points`` of the flattened
outputs: P runs over the levels fine to coarse, each level row-major. They are built once per
(level sizes, device, dtype) and then come from a plain dict lookup: a training or inference
step builds nothing after the first and never syncs the host. The grid is a plain attribute of
the head, not a buffer: nothing of it is in the state dict, and the device is part of the key
(``model.to(device)`` does not move it).

The head's raw outputs are per level, ``[N, H_l, W_l, C]`` (their shapes carry the level
sizes); ``flatten_levels`` / ``split_levels`` go to ``[N, P, C]`` and back.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

__all__ = ["Points", "PointGrid", "default_size_ranges", "decode_boxes", "level_sizes", "flatten_levels",
           "split_levels"]

# FCOS assigns an object to the level whose stride s satisfies max(l, t, r, b) in (4s, 8s]
# (ranges 0-64, 64-128, ... for strides 8, 16, ...): the upper bound of each level is 8 strides.
SIZE_PER_STRIDE = 8
# Bounded: a stream of distinct image sizes (no resizing, odd shapes) must not grow it forever.
CACHE_SIZE = 32

LevelSizes = tuple[tuple[int, int], ...]


def default_size_ranges(strides: Sequence[int]) -> list[tuple[float, float]]:
    """``(0, 8 s_0], (8 s_0, 8 s_1], ..., (8 s_{L-2}, inf)``."""
    bounds = [0.0] + [float(SIZE_PER_STRIDE * s) for s in strides[:-1]] + [math.inf]
    return list(zip(bounds[:-1], bounds[1:]))


def decode_boxes(points: torch.Tensor, strides: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """xyxy boxes from points ``[..., 2]``, strides ``[...]`` and stride-normalised ltrb ``[..., 4]``."""
    ltrb = reg * strides[..., None]
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)


class Points(NamedTuple):
    """The geometry of the P points of one set of level sizes (a named tuple: ``torch.compile``
    traces it without a graph break)."""

    points: torch.Tensor  # [P, 2]: x, y pixel centres of the cells
    strides: torch.Tensor  # [P]: the level's stride
    size_ranges: torch.Tensor  # [P, 2]: the level's (lo, hi] on max(l, t, r, b)
    cells: torch.Tensor  # [P, 4]: the stride-sized xyxy box centred on each point
    level_sizes: LevelSizes  # [(H_l, W_l), ...] fine to coarse


class PointGrid:
    """The points of FPN levels of ``strides``, with per-level ``size_ranges`` (default
    ``default_size_ranges``); ``grid(level_sizes, device)`` -> ``Points``, cached.

    ``names`` (the levels' names) only make the error for bad ``size_ranges`` clearer."""

    def __init__(self, strides: Sequence[int], size_ranges: Sequence[tuple[float, float]] | None = None,
                 names: Sequence[str] | None = None) -> None:
        self.strides = [int(s) for s in strides]
        ranges = default_size_ranges(self.strides) if size_ranges is None else size_ranges
        ranges = [(float(lo), float(hi)) for lo, hi in ranges]
        if len(ranges) != len(self.strides) or any(lo >= hi for lo, hi in ranges):
            raise ValueError(f"size_ranges must give one (lo, hi) with lo < hi per FPN level "
                             f"{list(names or self.strides)}, got {list(size_ranges)}")
        self.size_ranges = ranges
        self._cache: dict[tuple, Points] = {}

    def __call__(self, level_sizes: Sequence[tuple[int, int]], device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> Points:
        """The ``Points`` of ``level_sizes`` on ``device``. float32 by default whatever the
        autocast dtype: bf16 cannot hold a pixel coordinate like 1000.5."""
        sizes = tuple((h, w) for h, w in level_sizes)
        if len(sizes) != len(self.strides):
            raise ValueError(f"{len(sizes)} level sizes for {len(self.strides)} FPN levels")
        key = (sizes, torch.device(device), dtype)
        compiling = torch.compiler.is_compiling()  # dynamo would guard on (and recompile for) the dict
        if not compiling and key in self._cache:
            return self._cache[key]
        out = self._build(sizes, key[1], dtype)
        if not compiling:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = out
        return out

    def _build(self, sizes: LevelSizes, device: torch.device, dtype: torch.dtype) -> Points:
        points, strides, ranges = [], [], []
        for (h, w), s, (lo, hi) in zip(sizes, self.strides, self.size_ranges):
            ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
            xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack([xx, yy], dim=-1).reshape(h * w, 2))  # [HW, 2], row-major as the outputs
            strides.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
            # fills, not torch.tensor([lo, hi], device=...): a host->device copy from a list
            ranges.append(torch.stack([torch.full((h * w,), lo, device=device, dtype=dtype),
                                       torch.full((h * w,), hi, device=device, dtype=dtype)], dim=-1))  # [HW, 2]
        points, strides = torch.cat(points), torch.cat(strides)
        cells = decode_boxes(points, strides, points.new_full((1, 4), 0.5))  # [P, 4]
        return Points(points, strides, torch.cat(ranges), cells, sizes)


# ----------------------------------------------------------------------------- per-level outputs

def level_sizes(levels: Sequence[torch.Tensor]) -> LevelSizes:
    """``[(H_l, W_l), ...]`` of per-level outputs ``[N, H_l, W_l, ...]``."""
    return tuple((x.shape[1], x.shape[2]) for x in levels)


def flatten_levels(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-level ``[N, H_l, W_l, *C]`` -> ``[N, P, *C]``, levels in order, each row-major (a copy:
    free per level for channels_last outputs, one copy otherwise, then the concatenation)."""
    return torch.cat([x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:]) for x in levels], dim=1)


def split_levels(flat: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """``flatten_levels`` undone: ``[N, P, *C]`` -> per-level views ``[N, H_l, W_l, *C]``."""
    parts = flat.split([h * w for h, w in sizes], dim=1)
    return [p.reshape(p.shape[0], h, w, *p.shape[2:]) for p, (h, w) in zip(parts, sizes)]
