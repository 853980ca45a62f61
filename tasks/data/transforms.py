"""Augmentation pipelines for file-based data (albumentations) and their seeding.

These are the *training* pipelines. Evaluation and prediction resize through
``tasks.data.preprocess.Preprocess`` (``Preprocess.albumentations()`` for datasets), so that
every path sees an image the same way. Detection pipelines take and return HWC uint8 RGB
images with ``bboxes`` in absolute xyxy pixels ("pascal_voc") and a ``labels`` field; no
pipeline normalises (that happens on the device, in batches).

Seeding. An albumentations 2.x ``Compose`` draws from its *own* generators, not from
``random`` / ``numpy`` / ``torch``, so seeding those does nothing to it, and:

* ``Compose(seed=s)`` gives every child transform its own generator seeded with the same
  ``s`` (``BaseCompose.set_random_seed``), so their streams are identical: with
  ``RandomScale`` then ``HorizontalFlip`` the flip happens exactly when the scale is small.
  ``reseed_transforms`` instead hands one shared stream to all children
  (``BaseCompose.set_random_state``), so draws are sequential and independent.
* DataLoader workers each get a copy of the dataset, pipeline state included: without
  reseeding, all workers produce the same augmentations, and with non-persistent workers
  every epoch repeats the first one. ``seed_worker`` (``worker_init_fn``) reseeds from
  ``torch.initial_seed()``, which the DataLoader sets to ``base_seed + worker_id`` with a
  ``base_seed`` drawn from torch's RNG (or the loader's ``generator``) each epoch: different
  per worker and per epoch, reproducible from ``torch.manual_seed``.
* With ``num_workers=0`` nothing reseeds automatically: the stream just continues, which is
  reproducible from the start of a run; call ``reseed_dataset(dataset, seed + epoch)`` at the
  start of each epoch to make an epoch reproducible on its own (exact ``--resume``).
  The same holds for ``persistent_workers=True``, whose ``worker_init_fn`` runs only once.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial

import albumentations as A
import cv2
import numpy as np
import torch

from .preprocess import detection_bbox_params, resize_transform, resized_shape

__all__ = ["DETECTION_MIN_VISIBILITY", "detection_bbox_params", "detection_train_transforms", "segmentation_train_transforms",
           "classification_train_transforms", "SizedTransforms", "reseed_transforms", "reseed_dataset",
           "seed_worker"]


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------

# a box keeping less of its area inside the training crop is dropped (both augmentation paths)
DETECTION_MIN_VISIBILITY = 0.3


def detection_train_transforms(size: int, scale: Sequence[float] = (0.75, 1.25), hflip: float = 0.5,
                               *, min_visibility: float = DETECTION_MIN_VISIBILITY, seed: int | None = 0,
                               mask_fill: int = 255) -> A.Compose:
    """Scale jitter, horizontal flip, then pad / random-crop to exactly ``size`` x ``size``.

    The image is first resized so its longest side is ``size`` (as ``Preprocess`` does), so the
    jitter ``scale`` is relative to the scale the model is evaluated at, whatever the file's
    resolution ("large scale jitter" style). Padding is constant 0 at the bottom/right, like
    ``collate_detection``. Boxes keeping less than
    ``min_visibility`` of their area after the crop are dropped. A ``mask`` passed along
    (multi-task data) follows with nearest-neighbour resizing and ``mask_fill`` padding.
    """
    if size < 1:
        raise ValueError(f"size={size}: must be a positive number of pixels")
    lo, hi = (float(s) for s in scale)
    if not 0 < lo <= hi:
        raise ValueError(f"scale={tuple(scale)}: expected 0 < low <= high (factors, 1.0 = no change)")
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip={hflip}: a probability in [0, 1]")
    transforms = A.Compose([
        A.LongestMaxSize(max_size=size),
        # RandomScale samples its factor from 1 + scale_limit.
        A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), p=1.0),
        A.HorizontalFlip(p=hflip),
        A.PadIfNeeded(min_height=size, min_width=size, position="top_left",
                      border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=mask_fill),
        A.RandomCrop(height=size, width=size),
    ], bbox_params=detection_bbox_params(min_visibility), seed=seed)
    return reseed_transforms(transforms, seed)


# ---------------------------------------------------------------------------------------------
# Seeding (any albumentations pipeline)
# ---------------------------------------------------------------------------------------------

class SizedTransforms:
    """Training transforms of the dense tasks' aspect mode: the shorter side to a size the
    batch sampler picks per batch (one of ``sizes``: scale jitter, every image of a batch at
    one scale, so padding stays small), the longer at most ``max_size``, then a horizontal
    flip; boxes (``boxes=True``) and masks follow. ``at(size)`` is the pipeline for one size;
    called directly it uses the largest. All sizes draw from one random stream."""

    def __init__(self, sizes: Sequence[int], max_size: int | None, hflip: float = 0.5, *, boxes: bool = False,
                 seed: int | None = 0) -> None:
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"min_size={list(sizes)}: expected one or more positive sizes (pixels)")
        self.sizes, self.max_size = tuple(int(s) for s in sizes), max_size
        self._pipelines = {}
        for size in self.sizes:
            # Preprocess's own resize ("shorter"): training and evaluation resize alike
            ops = [resize_transform(partial(resized_shape, shorter=size, max_size=max_size)), A.HorizontalFlip(p=hflip)]
            self._pipelines[size] = A.Compose(ops, bbox_params=detection_bbox_params(0.0) if boxes else None,
                                              seed=seed)
        self.processors = self._pipelines[self.sizes[-1]].processors  # what CocoDetection checks
        reseed_transforms(self, seed)

    def at(self, size: int) -> A.Compose:
        try:
            return self._pipelines[size]
        except KeyError:
            raise ValueError(f"size {size} is not one of this pipeline's sizes {list(self.sizes)}") from None

    def __call__(self, **data):
        return self.at(self.sizes[-1])(**data)

    def set_random_state(self, rng, py_random) -> None:
        for pipeline in self._pipelines.values():
            pipeline.set_random_state(rng, py_random)


def reseed_transforms(transforms: A.BaseCompose, seed: int | None) -> A.BaseCompose:
    """Give every transform of ``transforms`` one shared stream seeded by ``seed``; returns it.

    ``seed=None`` draws fresh OS entropy (not reproducible).
    """
    rng = np.random.default_rng(seed)
    # The Python stream is derived from the numpy one so one integer seeds both.
    py_random = random.Random(int(rng.integers(2**63)))
    transforms.set_random_state(rng, py_random)  # propagates the same objects to all children
    return transforms


def reseed_dataset(dataset, seed: int) -> int:
    """Reseed every albumentations pipeline found on ``dataset`` (``.transforms``), looking
    through ``Subset`` (``.dataset``) and ``ConcatDataset`` (``.datasets``) wrappers.

    Pipelines get distinct streams derived from ``seed``. Returns how many were reseeded.
    """
    found: list[A.BaseCompose] = []
    stack, seen = [dataset], set()
    while stack:
        d = stack.pop()
        if id(d) in seen:
            continue
        seen.add(id(d))
        t = getattr(d, "transforms", None)
        if isinstance(t, (A.BaseCompose, SizedTransforms)):
            found.append(t)
        if getattr(d, "dataset", None) is not None:
            stack.append(d.dataset)
        stack.extend(getattr(d, "datasets", None) or ())
    for i, t in enumerate(found):
        # SeedSequence mixes (seed, i) so two pipelines never share a stream.
        reseed_transforms(t, int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0]))
    return len(found)


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=seed_worker)``: one OpenCV thread, and reseed ``random``,
    ``numpy`` and the dataset's albumentations pipeline(s) from this worker's ``torch.initial_seed()``."""
    # OpenCV would start a thread pool of one thread per core in every worker: 12 workers per GPU
    # on a 32-core machine could run 384 OpenCV threads per GPU (PyTorch limits its own to one)
    cv2.setNumThreads(1)
    seed = torch.initial_seed()  # base_seed + worker_id; a new base_seed every epoch
    random.seed(seed)
    np.random.seed(seed % 2**32)  # the legacy numpy seed must fit in 32 bits
    info = torch.utils.data.get_worker_info()
    if info is not None:
        reseed_dataset(info.dataset, seed)


# ---------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------
# Joint image + mask pipelines: call as ``t(image=hwc_uint8_rgb, mask=hw_uint8_labels)``. The
# mask is always resized with nearest neighbour (a blend of two class ids is a third, wrong,
# class) and padded with 255, the ignore index, so padding never teaches "background".

SEGMENTATION_IGNORE_INDEX = 255


def segmentation_train_transforms(size: int, scale: Sequence[float] = (0.5, 2.0), hflip: float = 0.5,
                                  seed: int | None = 0, *, base_size: int | None = None) -> A.Compose:
    """Random scale, pad to at least ``size`` (image 0, mask 255), random ``size`` x ``size``
    crop, horizontal flip.

    ``scale`` is relative to the file's resolution (DeepLab / torchvision references style).
    ``base_size``: first resize the longest side to it, making the jitter relative to that
    scale instead; pass the evaluation size (``Preprocess.size``), so training and evaluation
    see objects at the same scale on average.
    """
    if size < 1:
        raise ValueError(f"size={size}: must be a positive number of pixels")
    if base_size is not None and base_size < 1:
        raise ValueError(f"base_size={base_size}: must be a positive number of pixels (or None)")
    lo, hi = (float(s) for s in scale)
    if not 0 < lo <= hi:
        raise ValueError(f"scale={tuple(scale)}: expected 0 < low <= high (factors, 1.0 = no change)")
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip={hflip}: a probability in [0, 1]")
    steps = []
    if base_size is not None:
        steps.append(A.LongestMaxSize(max_size=base_size, interpolation=cv2.INTER_LINEAR,
                                      mask_interpolation=cv2.INTER_NEAREST))
    steps += [
        # RandomScale samples its factor from 1 + scale_limit.
        A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, p=1.0),
        A.PadIfNeeded(min_height=size, min_width=size, position="top_left",
                      border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=SEGMENTATION_IGNORE_INDEX),
        A.RandomCrop(height=size, width=size),
        A.HorizontalFlip(p=hflip),
    ]
    return reseed_transforms(A.Compose(steps, seed=seed), seed)


# ---------------------------------------------------------------------------------------------
# Classification (image folders)
# ---------------------------------------------------------------------------------------------

def classification_train_transforms(size: int, *, hflip: bool = True, rot90: bool = False,
                                    seed: int | None = None) -> A.Compose:
    """Random resized crop to ``size`` (35-100 % of the area), a horizontal flip and (``rot90``)
    a rotation by 0, 90, 180 or 270 degrees."""
    ops = [A.RandomResizedCrop(size=(size, size), scale=(0.35, 1.0))]
    if hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    if rot90:
        ops.append(A.RandomRotate90(p=1.0))
    return reseed_transforms(A.Compose(ops, seed=seed), seed)
