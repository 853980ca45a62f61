"""The user's data described without decoding images (``DataFacts`` for ``tasks.engine.derive``):
counts and classes from folder listings and annotation files, sizes and channels from image
headers; mask folders without a class list have up to ``MASK_SCAN`` masks read for their largest
class id. Each task's ``describe_data`` picks the describer of its data kind."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from tasks.data.coco import check_categories, check_images, load_coco_json
from tasks.data.folders import ImageFolderDataset, list_images
from tasks.data.images import display_path, read_mask
from tasks.data.segmentation import IMAGE_SUFFIXES
from tasks.data.voc import (VOC_CLASSES, find_class_list, find_voc, read_class_list, voc_classes, voc_ids,
                            voc_object_names)

from .derive import DataFacts, data_name, image_sample_stats, orientation_check, sample_by_class

__all__ = ["describe_folders", "describe_coco", "describe_voc", "describe_voc_config", "describe_masks", "MASK_SCAN"]

MASK_SCAN = 2000  # masks read to find the class count when no class list is given


def _limited(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def describe_folders(train: str, val: str, *, limit_train: int | None = None, limit_val: int | None = None,
                     seed: int = 0) -> DataFacts:
    """Class-folder data (``<root>/<class>/*``)."""
    with warnings.catch_warnings():  # the datasets built for training say it once
        warnings.simplefilter("ignore")
        tr = ImageFolderDataset(train, channels=3)
        va = ImageFolderDataset(val, channels=3, classes=tr.classes)
    size, chans = image_sample_stats([p for p, _ in tr.samples], seed=seed)
    return DataFacts(kind="folders", name=data_name(train), where=display_path(train),
                     train=_limited(len(tr), limit_train), val=_limited(len(va), limit_val),
                     class_names=list(tr.classes), classes_from="the class folders", median_size=size, channels=chans,
                     orientation=lambda: orientation_check(sample_by_class(tr.samples, tr.classes, seed=seed)))


def _coco_counts(path: str) -> tuple[dict[int, str], dict[int, dict]]:
    data = load_coco_json(Path(path), keep=True)  # the datasets built next take this parse
    return check_categories(Path(path), data["categories"]), check_images(Path(path), data["images"])


def describe_coco(paths: dict[str, str], *, background: bool, classes: Sequence[str] | None = None,
                  limit_train: int | None = None, limit_val: int | None = None) -> DataFacts:
    """A COCO set: classes are its categories (by id), sizes from its ``images`` entries."""
    if classes:
        raise ValueError("--classes / data.classes: COCO data names its classes (its categories); leave it out")
    names, images = _coco_counts(paths["train_ann"])
    _, val_images = _coco_counts(paths["val_ann"])
    class_names = [names[c] for c in sorted(names)]
    widths = [img["width"] for img in images.values()]
    heights = [img["height"] for img in images.values()]
    size = (int(np.median(widths)), int(np.median(heights))) if widths else (0, 0)
    return DataFacts(kind="coco", name=data_name(paths["train_images"]), where=display_path(paths["train_ann"]),
                     train=_limited(len(images), limit_train), val=_limited(len(val_images), limit_val),
                     class_names=(["background"] if background else []) + class_names,
                     classes_from="the COCO categories" + (", background first" if background else ""),
                     median_size=size)


def describe_voc(root: str, train_split: str, val_split: str, *, segmentation: bool,
                 classes: Sequence[str] | None = None, limit_train: int | None = None,
                 limit_val: int | None = None, seed: int = 0) -> DataFacts:
    """A VOC-layout tree. Detection: ``classes``, else ``voc_classes`` (classes.txt, the XML's
    object names, VOC's 20). Segmentation: ``classes`` (background first), else a classes.txt
    (background first), else VOC's 21 when every XML object name is a VOC class and no mask id
    is above 20; else (a tree of other classes) numbered classes up to the largest mask id, as
    for mask folders: the XML files name the classes but not which mask id each one is."""
    voc = find_voc(root)
    kind = "Segmentation" if segmentation else "Main"
    train_ids, val_ids = voc_ids(voc, kind, train_split), voc_ids(voc, kind, val_split)
    notes: list[str] = []
    numbered = False
    if classes:
        names, where = list(classes), "--classes"
    elif segmentation:
        found = find_class_list(voc)
        if found:
            names, where = read_class_list(found), display_path(found)
        else:
            # Pascal VOC itself (every XML name one of its classes) is told by its XML files, 0.34 s for
            # its 2,913 segmentation ones, not by a scan of its 1,464 train masks, 1.6 s (0.12 ms an XML
            # file, 1.1 ms a 500x375 palette PNG: files of VOC's sizes, 2 CPU cores); a tree of other or
            # no names is scanned
            objects = voc_object_names(voc, kind, (train_split, val_split))
            if not (objects and objects <= set(VOC_CLASSES)):
                masks = [voc / "SegmentationClass" / f"{i}.png" for i in train_ids]
                why = f"the XML files name {', '.join(sorted(objects))} but not which mask id each is" \
                    if objects else ""
                names, where, notes = _numbered_classes(masks, seed, voc, why)
                numbered = bool(objects) or len(names) > len(VOC_CLASSES) + 1  # masks only: VOC's ids or above
            if not numbered:
                names, where, notes = ["background", *VOC_CLASSES], "Pascal VOC's 21 (no classes.txt" + (
                    "; every XML object name is a VOC class)" if objects else ")"), []
    else:
        names, where = voc_classes(voc, (train_split, val_split))
    size, _ = image_sample_stats([voc / "JPEGImages" / f"{i}.jpg" for i in train_ids], seed=seed)
    return DataFacts(kind="voc", name=data_name(voc), where=display_path(voc), train=_limited(len(train_ids), limit_train),
                     val=_limited(len(val_ids), limit_val), class_names=names, classes_from=where, median_size=size,
                     record_classes=True, notes=notes, numbered=numbered)


def _numbered_classes(masks: Sequence[Path], seed: int, folder: Path, why: str = ""
                      ) -> tuple[list[str], str, list[str]]:
    """``(names, where, notes)`` for masks without a class list: background, class_1, ... up to
    the largest id (255, ignore, left out) in up to ``MASK_SCAN`` of ``masks`` drawn with ``seed``;
    the notes say where to name them (``folder``/classes.txt) and when not every mask was read."""
    rng = np.random.default_rng(seed)
    pick = masks if len(masks) <= MASK_SCAN else [masks[i] for i in sorted(rng.choice(len(masks), MASK_SCAN,
                                                                                    replace=False))]
    top = 0
    for path in pick:
        ids = np.unique(read_mask(path))
        ids = ids[ids != 255]
        if ids.size:
            top = max(top, int(ids.max()))
    names = ["background", *(f"class_{i}" for i in range(1, max(top, 1) + 1))]
    notes = [f"class names are numbers{f' ({why})' if why else ''}: give them in "
             f"{display_path(folder / 'classes.txt')} (one per line, background first) or --classes"]
    if len(pick) < len(masks):
        notes.append(f"only {len(pick)} of {len(masks)} masks were read for the class count: a class id above {top} "
                     f"elsewhere stops the run naming its mask; a classes.txt makes it exact")
    return names, f"the largest class id in {len(pick)} of {len(masks)} masks", notes


def describe_voc_config(d, seed: int, *, segmentation: bool) -> DataFacts | None:
    """``describe_voc`` for a dense task's data config ``d``, or None when it names no VOC tree."""
    if not (d.voc_root or d.dataset == "voc"):
        return None
    if not d.voc_root:
        raise ValueError("data.dataset=voc needs --voc-root DIR")
    return describe_voc(d.voc_root, d.voc_train, d.voc_val, segmentation=segmentation, classes=d.classes,
                        limit_train=d.limit_train, limit_val=d.limit_val, seed=seed)


def describe_masks(paths: dict[str, str], *, classes: Sequence[str] | None = None, limit_train: int | None = None,
                   limit_val: int | None = None, seed: int = 0) -> DataFacts:
    """Image and mask folders (``<masks>/<image stem>.png`` of class ids). Classes: ``classes``
    (background first), else ``classes.txt`` in the mask folder or the folder above it, else the
    largest id in the masks (up to ``MASK_SCAN`` of them) + 1, named background, class_1, ..."""
    for key in ("train_images", "train_masks", "val_images", "val_masks"):
        if not Path(paths[key]).is_dir():
            raise FileNotFoundError(f"--{key.replace('_', '-')} {display_path(paths[key])}: folder not found")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, _ = list_images(Path(paths["train_images"]), IMAGE_SUFFIXES, recursive=False)
        val, _ = list_images(Path(paths["val_images"]), IMAGE_SUFFIXES, recursive=False)
    if not train:
        raise ValueError(f"{display_path(paths['train_images'])}: no images")
    notes: list[str] = []
    mask_dir = Path(paths["train_masks"])
    found = find_class_list(mask_dir)
    if classes:
        names, where = list(classes), "--classes"
    elif found is not None:
        names, where = read_class_list(found), display_path(found)
    else:
        masks = list_images(mask_dir, (".png",), recursive=False)[0]  # hidden files are no masks
        if not masks:
            raise ValueError(f"{display_path(mask_dir)}: no masks (<image stem>.png)")
        names, where, notes = _numbered_classes(masks, seed, mask_dir)
    size, _ = image_sample_stats(train, seed=seed)
    return DataFacts(kind="folders", name=data_name(paths["train_images"]), where=display_path(paths["train_images"]),
                     train=_limited(len(train), limit_train), val=_limited(len(val), limit_val), class_names=names,
                     classes_from=where, median_size=size, record_classes=True, notes=notes,
                     numbered=not classes and found is None)
