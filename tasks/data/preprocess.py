"""How a raw image becomes the network's input, and how outputs map back: one object for
evaluation, ``--predict``, the Python API and the ONNX metadata.

A ``Preprocess`` is stored in every checkpoint's metadata (``meta["preprocess"]`` plus
``in_chans``, ``mean``, ``std``) and rebuilt from it, so the same file gives the same input
tensor on every path:

* ``resize="crop"`` (classification): the shorter side to ``round(size / crop_pct)``, then the
  centre ``size x size`` crop (torchvision's / timm's evaluation transform; ``crop_pct=1``
  with 28 px Fashion-MNIST images is the identity).
* ``resize="longest"`` (detection, segmentation): the longer side to ``size``, aspect ratio
  kept, the batch padded bottom / right to a multiple of ``size_divisible`` (content anchored
  at (0, 0), so mapping back is a division by the per-axis scale).
* ``resize="shorter"`` (the dense tasks' aspect mode, for photos): the shorter side to
  ``size`` and the longer at most ``max_size`` (torchvision's / detectron2's convention),
  padded as "longest".

Shrinking uses area interpolation (``cv2.INTER_AREA``: no aliasing when a 4000 px photo
becomes 256 px), enlarging bilinear. Pixels are then ``(x / 255 - mean) / std`` per channel,
on the device.
"""
from __future__ import annotations

import functools

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from .gpu_augment import BatchAugment
from .images import pad_batch

__all__ = ["Preprocess", "Geometry", "RESIZE_MODES", "resized_shape", "resize_transform", "detection_bbox_params"]

RESIZE_MODES = ("crop", "longest", "shorter")


@dataclass(frozen=True)
class Geometry:
    """Where an original image went: ``x_net = x_orig * scale_x - offset_x`` (same for y);
    ``size`` is the original ``(h, w)``, ``resized`` the content's ``(h, w)`` in the input."""

    size: tuple[int, int]
    resized: tuple[int, int]
    scale: tuple[float, float]   # (sy, sx)
    offset: tuple[float, float]  # (oy, ox): the centre crop's top-left corner in the resized image

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """xyxy boxes ``[D, 4]`` in network-input pixels -> original pixels, clipped to the image."""
        (sy, sx), (oy, ox), (h, w) = self.scale, self.offset, self.size
        out = boxes.float().clone()
        out[:, 0::2] = ((out[:, 0::2] + ox) / sx).clamp(0, w)
        out[:, 1::2] = ((out[:, 1::2] + oy) / sy).clamp(0, h)
        return out


@dataclass(frozen=True)
class Preprocess:
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str                 # "crop" | "longest"
    size: int
    crop_pct: float = 1.0       # "crop": shorter side to round(size / crop_pct) before the crop
    size_divisible: int = 32    # "longest" / "shorter": batch padding
    max_size: int | None = None  # "shorter": the longer side at most this
    _norm: BatchAugment = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"preprocess resize={self.resize!r}: expected one of {', '.join(RESIZE_MODES)}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"preprocess in_chans={self.in_chans}: images are fed as 1 (gray) or 3 (RGB) channels")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"preprocess mean {list(self.mean)} / std {list(self.std)}: expected {self.in_chans} "
                             f"value(s) each")
        if self.resize == "shorter" and self.max_size is not None and self.max_size < self.size:
            raise ValueError(f"preprocess max_size={self.max_size} is below size={self.size}")
        if self.size < 1 or not 0 < self.crop_pct <= 1 or self.size_divisible < 1:
            raise ValueError(f"preprocess size={self.size}, crop_pct={self.crop_pct}, size_divisible="
                             f"{self.size_divisible}: expected size >= 1, 0 < crop_pct <= 1, size_divisible >= 1")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "_norm", BatchAugment(self.mean, self.std))

    # ------------------------------------------------------------------ metadata

    def to_meta(self) -> dict[str, Any]:
        """The checkpoint metadata entries: ``in_chans``, ``mean``, ``std``, ``preprocess``."""
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        return {"in_chans": d.pop("in_chans"), "mean": list(d.pop("mean")), "std": list(d.pop("std")),
                "preprocess": d}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "Preprocess":
        try:
            p = dict(meta["preprocess"])
            return cls(in_chans=int(meta["in_chans"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]), **p)
        except (KeyError, TypeError) as e:
            raise ValueError(f"checkpoint metadata has no usable preprocessing ({e}): {dict(meta)}") from None

    # ------------------------------------------------------------------ geometry

    def _resized_shape(self, h: int, w: int) -> tuple[int, int]:
        if self.resize == "longest":
            return resized_shape(h, w, longest=self.size)
        if self.resize == "shorter":
            return resized_shape(h, w, shorter=self.size, max_size=self.max_size)
        return resized_shape(h, w, shorter=max(self.size, round(self.size / self.crop_pct)))

    def albumentations(self, *, boxes: bool = False) -> A.Compose:
        """The geometric part as an albumentations pipeline, for datasets (boxes with
        ``bbox_params`` as ``CocoDetection`` expects; masks follow with nearest neighbour).
        ``transform`` applies the same resize to a lone image."""
        ops: list[A.BasicTransform] = [resize_transform(self._resized_shape)]
        if self.resize == "crop":
            ops.append(A.CenterCrop(height=self.size, width=self.size))
        if boxes:
            return A.Compose(ops, bbox_params=detection_bbox_params(0.0), seed=0)
        return A.Compose(ops, seed=0)

    def transform(self, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """``H x W x C`` uint8 -> the network's uint8 pixels (before padding) and its ``Geometry``."""
        h, w = image.shape[:2]
        out = _resize_image(image, self._resized_shape(h, w))
        rh, rw = out.shape[:2]
        oy = ox = 0
        if self.resize == "crop":  # albumentations' CenterCrop corner
            oy, ox = (rh - self.size) // 2, (rw - self.size) // 2
            out = out[oy:oy + self.size, ox:ox + self.size]
        return np.ascontiguousarray(out), Geometry((h, w), (rh, rw), (rh / h, rw / w), (float(oy), float(ox)))

    # ------------------------------------------------------------------ tensors

    def batch(self, images: Sequence[np.ndarray], pin_memory: bool = False) -> torch.Tensor:
        """Transformed ``H x W x C`` uint8 arrays -> one uint8 ``[N, C, H, W]`` batch (channels_last
        in memory): padded bottom / right to a multiple of ``size_divisible`` ("longest",
        "shorter"; "crop" images are all ``size x size`` already, and a classifier is not fed
        padding)."""
        # read-only arrays (np.asarray of a PIL image) are copied: torch warns about aliasing them
        return pad_batch([torch.from_numpy(a if a.flags.writeable else a.copy()) for a in images],
                         self._divisible, pin_memory=pin_memory, channels_last=True)

    @property
    def _divisible(self) -> int:
        return 1 if self.resize == "crop" else self.size_divisible

    def padded_shape(self, height: int, width: int) -> tuple[int, int]:
        """The input shape a transformed image of ``height x width`` gets in a batch of its own."""
        d = self._divisible
        return -(-height // d) * d, -(-width // d) * d

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, C, H, W]`` (any device) -> float ``(x / 255 - mean) / std``."""
        return self._norm(images, train=False)

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Undo ``normalize`` (for pictures)."""
        return self._norm.to_uint8(x)


def detection_bbox_params(min_visibility: float = 0.0) -> A.BboxParams:
    """Box handling shared by the detection pipelines (and what ``CocoDetection`` expects)."""
    # clip=True: boxes a hair outside the image (float rounding in the source annotations)
    # would otherwise make albumentations raise on its [0, 1] validity check.
    return A.BboxParams(format="pascal_voc", label_fields=["labels"],
                        min_visibility=min_visibility, clip=True)


def resized_shape(h: int, w: int, *, longest: int | None = None, shorter: int | None = None,
                  max_size: int | None = None) -> tuple[int, int]:
    """``(h, w)`` scaled so the longer side is ``longest``, or the shorter is ``shorter`` with the
    longer at most ``max_size``: the one rule evaluation, prediction, training's aspect mode and
    the batch sampler's padding count share."""
    if longest is not None:
        scale = longest / max(h, w)
    else:
        scale = shorter / min(h, w)
        if max_size is not None:
            scale = min(scale, max_size / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    nh, nw = shape
    h, w = image.shape[:2]
    if (nh, nw) == (h, w):
        return image
    interp = cv2.INTER_AREA if nh * nw < h * w else cv2.INTER_LINEAR
    out = cv2.resize(image, (nw, nh), interpolation=interp)
    return out.reshape(nh, nw, *image.shape[2:])  # cv2 drops a channel axis of 1


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    nh, nw = shape
    return mask if (nh, nw) == mask.shape[:2] else cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST)


def resize_transform(shape_of: Callable[[int, int], tuple[int, int]]) -> A.Lambda:
    """An albumentations step resizing each image to ``shape_of(h, w)`` (area interpolation
    when shrinking, bilinear when enlarging) and its mask with nearest neighbour; boxes need
    nothing (albumentations keeps them normalised to the image size). ``Preprocess`` and the
    aspect mode's training transforms both resize through it."""
    # partials of module functions, not lambdas: albumentations warns that lambdas cannot be pickled
    # (DataLoader workers under spawn); bboxes keep albumentations' no-op.
    return A.Lambda(image=functools.partial(_resize_to, _resize_image, shape_of),
                    mask=functools.partial(_resize_to, _resize_mask, shape_of), name="resize")


def _resize_to(resize: Callable, shape_of: Callable[[int, int], tuple[int, int]], array: np.ndarray, **_) -> np.ndarray:
    return resize(array, shape_of(*array.shape[:2]))
