"""Semantic segmentation data: mask folders (VOC style), COCO instances painted into label
maps, and batching.

Every dataset serves ``(image, mask)``: ``image`` uint8 ``[3, H, W]`` RGB, not normalised;
``mask`` int64 ``[H, W]`` of class ids in ``[0, num_classes)`` or ``ignore_index`` (255). Each
has ``num_classes`` (background included), ``class_names`` and ``ignore_index``.

* ``MaskFolderDataset``: ``image_dir/*.png|*.jpg`` + ``mask_dir/<stem>.png``. Masks are
  palette ('P') PNGs whose palette *index* is the class (PASCAL VOC), or 8-bit gray ('L') PNGs
  of class ids (FashionScenes: ``scenes_segmentation(root, split)``).
* ``CocoSemanticDataset``: a COCO instance file: background 0, category ``c`` -> 1 + its rank
  among the sorted category ids, instances painted in file order (later ones on top), crowd
  regions painted 255 last (ignore wins over any instance).
* ``collate_segmentation``: pad a batch to one size (images 0, masks 255).

Bad input, and what ``skip_bad`` changes (the style of ``tasks.data.coco``):

* image without a mask (checked at init): ``FileNotFoundError`` naming the image and the mask
  it looked for; with ``skip_bad`` the pair is dropped and counted (``stats["skipped_images"]``).
  Hidden files in the image folder are ignored; other files that are not .png / .jpg / .jpeg
  are named in one warning.
* annotation file problems and malformed COCO annotations: as ``CocoDetection``, plus a
  ``segmentation`` that is not polygons or RLE of the image's size (``stats["malformed"]``).
* at load time (checking every mask at init would decode the whole dataset): unreadable image
  or mask, mask not 'P'/'L', mask size different from its image, class ids ``>= num_classes``
  other than 255: ``ImageReadError`` / ``MaskError`` (a ``ValueError``) naming the file; with
  ``skip_bad`` a warning names it, ``stats["unreadable"]`` counts it (in the process that met
  it), ``unusable`` flags it for every process (it is not read again, and the run names it at
  its end) and the next usable sample is served in its place.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pycocotools import mask as mask_utils

from .coco import (check_categories, check_images, checked_annotations, is_int, keep_existing_images, load_coco_json,
                   segmentation_problem)
from .folders import list_images, warn_skipped_files
from .subset import subset_indices
from .images import (ImageReadError, MaskError, Unusable, display_path, load_skipping_bad, pad_batch, read_image,
                     read_image_size, read_mask, with_skip_hint)

__all__ = ["MaskFolderDataset", "CocoSemanticDataset", "MaskError", "read_mask", "collate_segmentation",
           "scenes_segmentation", "IGNORE_INDEX", "IMAGE_SUFFIXES"]

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ---------------------------------------------------------------------------------------------
# Shared sample machinery
# ---------------------------------------------------------------------------------------------

class _SegmentationDataset(torch.utils.data.Dataset):
    """``__getitem__`` with ``skip_bad`` retry, transforms and tensor conversion; subclasses
    implement ``_read(index) -> (image HWC uint8 RGB, mask HW uint8)`` and ``_name(index)``."""

    ignore_index = IGNORE_INDEX
    # what skip_bad skips: unreadable, vanished since init, or a bad mask
    unusable_errors: tuple[type[BaseException], ...] = (OSError, MaskError)
    unusable: Unusable | None = None
    num_classes: int
    class_names: list[str]

    def __init__(self, transforms: Callable | None, skip_bad: bool, limit: int | None, evaluation: bool = False) -> None:
        if transforms is not None and not callable(transforms):
            raise ValueError(f"transforms must be an albumentations pipeline called as "
                             f"t(image=..., mask=...), got {type(transforms).__name__}")
        if limit is not None and (not is_int(limit) or limit < 0):
            raise ValueError(f"limit={limit!r}: expected a number of images >= 0 (or None for all)")
        self.transforms = transforms
        self.skip_bad = skip_bad
        self.evaluation = evaluation  # with skip_bad: a bad sample is left out (None), not replaced
        self.stats = dict.fromkeys(("images", "skipped_images", "unreadable"), 0)

    def __len__(self) -> int:  # pragma: no cover - subclasses
        raise NotImplementedError

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        # (index, size): the aspect batch sampler's pick of this batch's scale (SizedTransforms.at)
        index, size = index if isinstance(index, tuple) else (index, None)
        transforms = self.transforms.at(size) if size is not None and hasattr(self.transforms, "at") else None
        if not self.skip_bad:
            try:
                return self._load(index, transforms)
            except OSError as e:  # a bad mask (MaskError) names its own remedy: skipping is not always it
                raise with_skip_hint(e) from None
        return load_skipping_bad(lambda i: self._load(i, transforms), index, len(self), self.unusable_errors,
                                 self.stats, self._source(), replace=not self.evaluation, unusable=self.unusable)

    def _track_unusable(self) -> None:
        """``unusable``, made once the samples are known (at the end of a subclass's ``__init__``)."""
        self.unusable = Unusable(len(self), self.sample_name) if self.skip_bad else None

    def sample_name(self, index: int) -> str:  # pragma: no cover - subclasses
        """The image file of sample ``index``, as messages name it."""
        raise NotImplementedError

    def image_sizes(self) -> list[tuple[int, int]]:  # pragma: no cover - subclasses
        """``(h, w)`` of every sample without decoding it (the aspect batch sampler's input)."""
        raise NotImplementedError

    def _load(self, index: int, transforms: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self._read(index)
        transforms = transforms or self.transforms
        if transforms is not None:
            out = transforms(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise TypeError(f"transforms must return HWC uint8 RGB images, got {image.dtype} {image.shape}")
            if mask.shape != image.shape[:2]:
                raise TypeError(f"transforms must return a [H, W] mask the size of the image, got "
                                f"{mask.shape} for an image of {image.shape}")
        # [H, W, 3] -> [3, H, W]; contiguous copies so collate and pin_memory don't stride.
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        mask = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))  # [H, W]
        return image, mask

    def _check_labels(self, mask: np.ndarray, path: Any) -> None:
        bad = (mask >= self.num_classes) & (mask != self.ignore_index)
        if bad.any():
            values = np.unique(mask[bad])
            raise MaskError(f"{path}: class ids {values[:10].tolist()} out of range: expected 0.."
                            f"{self.num_classes - 1} or {self.ignore_index} (ignore) for "
                            f"num_classes={self.num_classes}")

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - subclasses
        raise NotImplementedError

    def _source(self) -> str:  # pragma: no cover - subclasses
        raise NotImplementedError


def _check_num_classes(num_classes: Any, class_names: Sequence[str] | None) -> list[str]:
    # 255 is the ignore index, so class ids must stay below it (and fit the uint8 masks).
    if not is_int(num_classes) or not 1 <= num_classes <= IGNORE_INDEX:
        raise ValueError(f"num_classes={num_classes!r}: expected an integer in 1..{IGNORE_INDEX} "
                         f"(background included; {IGNORE_INDEX} is the ignore index)")
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    class_names = [str(n) for n in class_names]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
    return class_names


# ---------------------------------------------------------------------------------------------
# Image + mask folders
# ---------------------------------------------------------------------------------------------

class MaskFolderDataset(_SegmentationDataset):
    """Images ``image_dir/*.{png,jpg,jpeg}`` with masks ``mask_dir/<image stem>.png``, sorted
    by file name; ``limit``: a random subset of that many drawn with ``seed`` (before dropping
    unpaired images).

    ``num_classes``: K, background included; mask values must be in ``[0, K)`` or 255.
    ``class_names``: default ``"0"``, ``"1"``, ... ``transforms``: a joint albumentations
    pipeline (``tasks.data.transforms.segmentation_*_transforms``). ``stems``: only these
    images (a split list, as Pascal VOC's ``ImageSets``), in that order; one without an image
    file is an error naming the file it looked for (``skip_bad``: skipped and counted).
    """

    def __init__(self, image_dir: str | os.PathLike, mask_dir: str | os.PathLike, *, num_classes: int,
                 transforms: Callable | None = None, class_names: Sequence[str] | None = None,
                 skip_bad: bool = False, limit: int | None = None, evaluation: bool = False,
                 stems: Sequence[str] | None = None, seed: int = 0) -> None:
        super().__init__(transforms, skip_bad, limit, evaluation)
        self.image_dir = Path(image_dir)
        self.mask_dir = Path(mask_dir)
        self.class_names = _check_num_classes(num_classes, class_names)
        self.num_classes = num_classes
        for what, folder in (("image", self.image_dir), ("mask", self.mask_dir)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{display_path(folder)}: {what} folder not found")
        # hidden files (macOS "._x.png" resource forks, editor back-ups) are never images
        images, others = list_images(self.image_dir, IMAGE_SUFFIXES, recursive=False)
        if stems is not None:
            found = {p.stem: p for p in images}
            images = []
            for stem in stems:
                if stem in found:
                    images.append(found[stem])
                elif skip_bad:
                    self.stats["skipped_images"] += 1
                else:
                    raise FileNotFoundError(f"{display_path(self.image_dir / (stem + '.jpg'))}: image file not found "
                                            f"(listed in the split); --set data.skip_bad=true skips missing images")
        else:  # a split list names its images; without one every other file is said, not dropped silently
            warn_skipped_files(self.image_dir, others, IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"{display_path(self.image_dir)}: no images ({', '.join(IMAGE_SUFFIXES)})")
        by_stem: dict[str, Path] = {}
        for p in images:
            if p.stem in by_stem:  # both would claim the same mask
                raise ValueError(f"{display_path(by_stem[p.stem])} and {display_path(p)}: two images share the stem "
                                 f"{display_path(p.stem)!r}, so they would share the mask "
                                 f"{display_path(self.mask_dir / (p.stem + '.png'))}")
            by_stem[p.stem] = p
        if limit is not None:
            images = [images[i] for i in subset_indices(len(images), limit, seed)]
        self._pairs: list[tuple[Path, Path]] = []
        for image in images:
            mask = self.mask_dir / f"{image.stem}.png"
            if mask.is_file():
                self._pairs.append((image, mask))
            elif skip_bad:
                self.stats["skipped_images"] += 1
            else:
                raise FileNotFoundError(f"{display_path(image)}: no mask {display_path(mask)}; --set "
                                        f"data.skip_bad=true skips images without masks")
        self.stats["images"] = len(self._pairs)
        self._sizes: list[tuple[int, int]] | None = None
        self._track_unusable()
        if self.stats["skipped_images"]:
            warnings.warn(f"{display_path(self.image_dir)}: {self.stats['skipped_images']} images without a mask "
                          f"in {display_path(self.mask_dir)} are not used", stacklevel=2)

    def __len__(self) -> int:
        return len(self._pairs)

    def sample_name(self, index: int) -> str:
        return display_path(self._pairs[index][0])

    def image_sizes(self) -> list[tuple[int, int]]:
        if self._sizes is None:
            # the header only: no decoding, and no refusal of an oversized image (loading it does)
            self._sizes = [self._header_size(image) for image, _ in self._pairs]
        return self._sizes

    def _header_size(self, image: Path) -> tuple[int, int]:
        try:
            return read_image_size(image)
        except (ImageReadError, FileNotFoundError):
            if not self.skip_bad:
                raise
            return 1, 1  # any size: loading the sample fails again, and skips it (and counts it)

    def _source(self) -> str:
        return str(self.image_dir)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self._pairs[index]
        image = read_image(image_path)
        mask = read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise MaskError(f"{display_path(mask_path)}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                            f"{display_path(image_path)} is {image.shape[1]}x{image.shape[0]}")
        self._check_labels(mask, display_path(mask_path))
        return image, mask


def scenes_segmentation(root: str | os.PathLike, split: str = "train", **kwargs) -> MaskFolderDataset:
    """A FashionScenes split (``tasks.data.scenes``) as a ``MaskFolderDataset``: 11 classes,
    background + the 10 Fashion-MNIST classes; ``kwargs`` go to ``MaskFolderDataset``."""
    from .fashion_mnist import CLASSES
    from .scenes import NUM_CLASSES

    root = Path(root)
    return MaskFolderDataset(root / "images" / split, root / "masks" / split, num_classes=NUM_CLASSES + 1,
                             class_names=["background", *CLASSES], **kwargs)


# ---------------------------------------------------------------------------------------------
# COCO instances -> semantic label maps
# ---------------------------------------------------------------------------------------------

# the check lives with the COCO reader, which applies it to every annotation file it loads
_segmentation_problem = segmentation_problem


def _to_rle(segm: list | dict, height: int, width: int) -> dict:
    """One compressed RLE from COCO polygons, uncompressed or compressed RLE (``COCO.annToRLE``)."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


class CocoSemanticDataset(_SegmentationDataset):
    """Semantic label maps painted from a COCO instance file and an image folder.

    Labels: 0 background, ``1 + i`` for the ``i``-th category id in sorted order
    (``cat_ids[i]``), so ``num_classes = len(categories) + 1`` and ``class_names[0]`` is
    ``"background"``. Instances are painted in annotation-file order (later ones on top);
    crowd regions (``iscrowd=1``) are painted ``ignore_index`` after all of them. Images
    without annotations are all background. ``limit``: a random subset of that many images
    (by ``seed``).
    """

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike, *,
                 transforms: Callable | None = None, skip_bad: bool = False, limit: int | None = None,
                 evaluation: bool = False, seed: int = 0) -> None:
        super().__init__(transforms, skip_bad, limit, evaluation)
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.stats.update(annotations=0, crowd=0, malformed=0)

        data = load_coco_json(self.ann_file)
        names = check_categories(self.ann_file, data["categories"])
        images = check_images(self.ann_file, data["images"])
        self.cat_ids: list[int] = sorted(names)
        if len(self.cat_ids) >= IGNORE_INDEX:
            raise ValueError(f"{display_path(self.ann_file)}: {len(self.cat_ids)} categories; at most "
                             f"{IGNORE_INDEX - 1} fit below the ignore index {IGNORE_INDEX} with background 0")
        self.class_names = ["background"] + [names[c] for c in self.cat_ids]
        self.num_classes = len(self.cat_ids) + 1
        self._cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}

        ids = sorted(images)
        kept_ids = [ids[i] for i in subset_indices(len(ids), limit, seed)]
        kept_ids = keep_existing_images(self.image_dir, images, kept_ids, ann_file=self.ann_file,
                                        skip_bad=self.skip_bad, stats=self.stats)
        anns = self._sanitize_annotations(data["annotations"], images, set(kept_ids))

        # (image_id, path, h, w, [(label, segmentation)] painted in order, crowd is label 255)
        self._records = []
        for img_id in kept_ids:
            img = images[img_id]
            instances = [(self._cat_to_label[a["category_id"]], a["segmentation"])
                         for a in anns.get(img_id, []) if not a.get("iscrowd", 0)]
            crowd = [(IGNORE_INDEX, a["segmentation"]) for a in anns.get(img_id, []) if a.get("iscrowd", 0)]
            self._records.append((img_id, self.image_dir / img["file_name"], img["height"], img["width"],
                                  instances + crowd))
        self.stats["images"] = len(self._records)
        self._track_unusable()
        noted = {k: self.stats[k] for k in ("malformed", "skipped_images") if self.stats[k]}
        if noted:
            what = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in noted.items())
            warnings.warn(f"{display_path(self.ann_file)}: {what} (not used)", stacklevel=2)

    def _sanitize_annotations(self, anns: list, images: dict[int, dict], kept: set[int]) -> dict[int, list[dict]]:
        """The usable annotations of the kept images, grouped by image in file order."""
        def segmentation_problem(ann: dict) -> str | None:
            # a segmentation that is there was checked with the annotation (checked_annotations);
            # here it is also required: no mask, no semantic label map
            segm = ann.get("segmentation")
            if segm is None or (isinstance(segm, list) and all(p == [] for p in segm)):
                img = images[ann["image_id"]]
                return _segmentation_problem(segm, img["height"], img["width"])
            return None

        by_image: dict[int, list[dict]] = {}
        for ann in checked_annotations(anns, images, self._cat_to_label, ann_file=self.ann_file,
                                       skip_bad=self.skip_bad, stats=self.stats, extra_check=segmentation_problem):
            if ann["image_id"] in kept:
                self.stats["crowd" if ann.get("iscrowd", 0) else "annotations"] += 1
                by_image.setdefault(ann["image_id"], []).append(ann)
        return by_image

    def __len__(self) -> int:
        return len(self._records)

    def sample_name(self, index: int) -> str:
        return display_path(self._records[index][1])

    def image_sizes(self) -> list[tuple[int, int]]:
        return [(h, w) for _, _, h, w, _ in self._records]

    def _source(self) -> str:
        return str(self.ann_file)

    def label_to_category(self, labels: Sequence[int] | np.ndarray) -> np.ndarray:
        """Labels 1..K-1 -> COCO category ids (background 0 has none)."""
        idx = np.asarray(labels, dtype=np.int64)
        if idx.size and (idx.min() < 1 or idx.max() >= self.num_classes):
            raise ValueError(f"labels must be in [1, {self.num_classes}), got {idx.min()}..{idx.max()}")
        return np.asarray(self.cat_ids, dtype=np.int64)[idx - 1]

    def semantic_mask(self, index: int) -> np.ndarray:
        """The painted label map (HW uint8) of sample ``index``, before transforms."""
        _, _, h, w, regions = self._records[index]
        mask = np.zeros((h, w), np.uint8)
        if regions:
            rles = [_to_rle(segm, h, w) for _, segm in regions]
            masks = mask_utils.decode(rles)  # [H, W, R] uint8, R = regions in paint order
            for r, (label, _) in enumerate(regions):
                mask[masks[:, :, r] > 0] = label  # later regions overwrite earlier ones
        return mask

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img_id, path, h, w, _ = self._records[index]
        image = read_image(path)
        if image.shape[:2] != (h, w):
            raise ImageReadError(f"{display_path(path)}: image is {image.shape[1]}x{image.shape[0]} but "
                                 f"{display_path(self.ann_file)} says {w}x{h} (image id {img_id})")
        return image, self.semantic_mask(index)


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------

def collate_segmentation(batch: Sequence[tuple[torch.Tensor, torch.Tensor]], size_divisible: int = 32,
                         ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images into uint8 ``[B, 3, H, W]`` (zero-padded bottom/right) and masks into int64
    ``[B, H, W]`` (padded with ``ignore_index``, so padding counts in no loss or metric), at
    the largest H, W of the batch rounded up to ``size_divisible``."""
    batch = [b for b in batch if b is not None]  # samples an evaluation set left out (skip_bad)
    if not batch:
        return None
    images, masks = zip(*batch)
    for i, (img, m) in enumerate(zip(images, masks)):
        if img.dim() != 3 or m.dim() != 2 or tuple(img.shape[-2:]) != tuple(m.shape):
            raise ValueError(f"sample {i}: expected image [3, H, W] and mask [H, W] of the same size, "
                             f"got {tuple(img.shape)} and {tuple(m.shape)}")
    return pad_batch(images, size_divisible), pad_batch(masks, size_divisible, fill=ignore_index)
