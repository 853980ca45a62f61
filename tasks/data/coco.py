"""COCO-format detection data (``--train-ann FILE --train-images DIR``), batching and mAP.

``CocoDetection`` serves ``(image uint8 [3, H, W], target)`` pairs from any COCO JSON:
non-contiguous category ids become labels 0..K-1, images without annotations are kept as
negatives, ``iscrowd`` annotations are left out of the targets (but kept for COCOeval, which
treats them as ignore regions), and boxes are clipped to the image (degenerate ones dropped).
``collate_detection`` pads a batch to one tensor, ``detections_to_coco`` turns model outputs
back into COCO results in the files' pixel coordinates, ``coco_evaluate`` runs COCOeval.

Bad input, and what ``skip_bad`` changes:

* annotation file missing / not JSON / without the three lists / with an image entry lacking
  ``id``, ``file_name``, ``width`` or ``height``: always an error naming the file.
* malformed annotation (unknown image or category id, bbox not 4 finite numbers, missing or
  duplicate id, a ``segmentation`` that is not polygons or RLE of the image's size:
  ``segmentation_problem``): ``ValueError`` naming the file and the annotation id; with
  ``skip_bad`` it is dropped and counted (``stats["malformed"]``). Detection uses no masks,
  yet a broken one is refused all the same: it would be kept in ``.coco`` and be decoded by
  whatever reads that next (pycocotools decodes a bad RLE string into memory it does not own).
* image file missing (checked for every used image at init, a stat call each):
  ``FileNotFoundError`` naming it; with ``skip_bad`` the image is dropped and counted
  (``stats["skipped_images"]``).
* image unreadable at load time (corrupt, unsupported channels or dtype, size disagreeing with
  the JSON ``width``/``height``): ``ImageReadError`` naming the file. Decoding every image at
  init would cost a full pass over the data, so with ``skip_bad`` such an image is skipped
  when met instead: a warning names it, ``stats["unreadable"]`` counts it (in the process that
  met it, i.e. a worker), ``unusable`` flags it for every process (it is not read again, and
  the run names it at its end) and the next readable sample is returned in its place; an
  ``evaluation`` set returns None instead (``collate_detection`` drops it, and
  ``CocoEvaluator`` scores only the images it saw, so the image leaves ground truth and
  predictions alike).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import reprlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from .images import (ImageReadError, Unusable, display_path, load_skipping_bad, pad_batch, read_image, read_mask,
                     with_skip_hint)
from .subset import subset_indices

__all__ = ["CocoDetection", "CocoEvaluator", "load_coco_json", "check_categories", "check_images", "is_int",
           "checked_annotations", "segmentation_problem", "keep_existing_images", "collate_detection",
           "detections_to_coco", "coco_evaluate", "run_cocoeval", "coco_stats",
           "METRIC_NAMES"]

# COCOeval.stats[:6], in its order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# Label of the whole-image box that rides through the transforms (see CocoDetection._transform).
_FRAME_LABEL = -1


# ---------------------------------------------------------------------------------------------
# Annotation file checks
# ---------------------------------------------------------------------------------------------

def _brief(value: Any) -> str:
    """``repr(value)`` cut to a readable length (an error line quoting a whole malformed entry
    could otherwise run to megabytes)."""
    text = _REPR.repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxdict = 6
_REPR.maxlevel = 3


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``json.load``'s ``object_pairs_hook``: a key twice in one object is an error (JSON keeps
    the last silently: ``"bbox"`` given twice would train on one and hide the other)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


class _DuplicateKey(ValueError):
    pass


# Parses kept for the next reader of the same unchanged file: a run describes the user's data
# (tasks.engine.describe) and then builds its datasets from the same files. Parsing is the cost:
# 7.3 s for a 207 MB file of 860,000 annotations on 2 CPU cores.
# An entry is taken by its reader (never shared, so never kept alive beside the dataset built from
# it), at most _HANDOFF_MAX of them.
_HANDOFF: dict[tuple[str, int, int], dict] = {}
_HANDOFF_MAX = 2


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def load_coco_json(path: Path | Mapping[str, Any], *, keep: bool = False) -> dict:
    """A COCO file's contents, its three lists checked; a mapping (annotations built in memory,
    e.g. from Pascal VOC XML) is checked the same way. A key twice in one JSON object, or
    nesting deeper than Python's recursion limit, is an error naming the file. ``keep``: the
    contents are also kept for the next call on the same unchanged file, which takes them
    instead of parsing it again (callers never modify what they get)."""
    cache_key = None
    if isinstance(path, Mapping):
        data, path = dict(path), Path(str(path.get("source", "<annotations>")))
    else:
        if not path.is_file():
            raise FileNotFoundError(f"{display_path(path)}: COCO annotation file not found")
        cache_key = _file_key(path)
        data = _HANDOFF.pop(cache_key, None)
        if data is not None:
            if keep:
                _HANDOFF[cache_key] = data
            return data  # checked when it was parsed
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f, object_pairs_hook=_unique_keys)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{display_path(path)}: not valid JSON ({e})") from None
        except _DuplicateKey as e:
            raise ValueError(f"{display_path(path)}: the key {_brief(e.args[0])} appears twice in one JSON object "
                             f"(JSON would keep only the last)") from None
        except RecursionError:
            raise ValueError(f"{display_path(path)}: JSON nested too deeply (a COCO file nests a few levels)") \
                from None
    name = display_path(path)
    if not isinstance(data, dict):
        raise ValueError(f"{name}: expected a JSON object with 'images', 'annotations' and "
                         f"'categories' lists, got a {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{name}: no '{key}' list (not a COCO detection file?)")
        if not isinstance(data[key], list):
            raise ValueError(f"{name}: '{key}' is a {type(data[key]).__name__}, expected a list")
    if keep and cache_key is not None:
        _HANDOFF[cache_key] = data
        while len(_HANDOFF) > _HANDOFF_MAX:
            _HANDOFF.pop(next(iter(_HANDOFF)))
    return data


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_categories(path: Path, categories: list) -> dict[int, str]:
    name = display_path(path)
    names: dict[int, str] = {}
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not is_int(c.get("id")):
            raise ValueError(f"{name}: category #{i} has no integer 'id': {_brief(c)}")
        if c["id"] in names:
            raise ValueError(f"{name}: category id {c['id']} appears twice")
        names[c["id"]] = str(c.get("name", c["id"]))
    if not names:
        raise ValueError(f"{name}: 'categories' is empty")
    return names


def check_images(path: Path, images: list) -> dict[int, dict]:
    name = display_path(path)
    by_id: dict[int, dict] = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict) or not is_int(img.get("id")):
            raise ValueError(f"{name}: image #{i} has no integer 'id': {_brief(img)}")
        for key in ("width", "height"):
            if not is_int(img.get(key)) or img[key] < 1:
                raise ValueError(f"{name}: image id {img['id']}: '{key}' is {_brief(img.get(key))}, "
                                 f"expected a positive integer")
        file_name = img.get("file_name")
        # a NUL byte would reach the file system calls as a bare "embedded null byte" error
        if not isinstance(file_name, str) or not file_name or "\0" in file_name:
            raise ValueError(f"{name}: image id {img['id']}: 'file_name' is {_brief(file_name)}, expected a file name")
        if img["id"] in by_id:
            raise ValueError(f"{name}: image id {img['id']} appears twice")
        by_id[img["id"]] = img
    return by_id


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rle_string_problem(counts: str | bytes, total: int) -> str | None:
    """Why a compressed COCO RLE string does not describe exactly ``total`` pixels, or None.

    pycocotools decodes these strings without any check: a character outside its alphabet, a
    number cut off at the end (it then reads past the string) or runs that do not add up to
    height x width give masks of whatever was in memory, or a crash. This reads the string as
    its ``rleFrString`` does (6-bit groups, '0' + value, bit 0x20 "more follows", bit 0x10 of
    the last group the sign; from the third number on, each is a delta to the one two before)
    and checks every run is >= 0 and the runs add up to ``total``. Vectorised: about 20 us for
    a typical mask."""
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            return "RLE 'counts' string has characters outside '0'..'o' (not a COCO compressed RLE)"
    if not counts:
        return "RLE 'counts' string is empty"
    b = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
    if b.min() < 0 or b.max() > 63:
        return "RLE 'counts' string has characters outside '0'..'o' (not a COCO compressed RLE)"
    more = (b & 0x20) != 0
    if more[-1]:
        return "RLE 'counts' string ends inside a number (cut short?)"
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 6:  # 30 bits: more than any run of an image under 2**29 pixels needs
        return "RLE 'counts' string holds a number too large for any image"
    shift = 5 * (np.arange(b.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((b & 0x1F) << shift, starts)
    values -= ((b[ends] & 0x10) != 0) << (5 * lengths)  # negative numbers (deltas)
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])  # odd runs: run 1, then deltas to the run two before
    runs[2::2] = np.cumsum(values[2::2])  # even runs: run 0 as is, run 2, then deltas
    if runs.min() < 0:
        return "RLE 'counts' string decodes to a negative run length (corrupt)"
    if runs.sum() != total:
        return f"RLE 'counts' string covers {int(runs.sum())} pixels, not height * width = {total}"
    return None


def segmentation_problem(segm: Any, height: int, width: int, *, required: bool = True) -> str | None:
    """Why ``segm`` is not a usable COCO polygon list or RLE for an image of ``height`` x
    ``width``, or None. ``required=False`` (detection, which uses no masks) also accepts an
    absent or empty segmentation (``None``, ``[]``, or ``[[]]`` as some exporters write for a
    box without a mask)."""
    if not required and (segm is None or (isinstance(segm, list) and all(p == [] for p in segm))):
        return None
    if isinstance(segm, list):
        if not segm:
            return "'segmentation' is an empty polygon list"
        # pycocotools rasterises a polygon along its edges: a coordinate far outside the image
        # (1e12: a unit mix-up) would take for ever; a whole image beyond each edge is plenty
        side = max(height, width)
        for poly in segm:
            # pycocotools reads a 4-number "polygon" as a box: demand real polygons.
            if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
                return "'segmentation' polygon is not a list of >= 3 finite (x, y) pairs"
            # C loops, not a Python loop per coordinate: COCO train2017 has 860k polygons.
            # fsum raises TypeError on anything but numbers; its sum is finite iff every value is
            try:
                finite = math.isfinite(math.fsum(poly))
                inside = finite and -side <= min(poly) and max(poly) <= 2 * side
            except (TypeError, OverflowError):
                finite = False
            if not finite:
                return "'segmentation' polygon is not a list of >= 3 finite (x, y) pairs"
            if not inside:
                xs, ys = poly[0::2], poly[1::2]
                return (f"'segmentation' polygon has points far outside the {width}x{height} image "
                        f"(x {min(xs)}..{max(xs)}, y {min(ys)}..{max(ys)})")
        return None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if (not isinstance(size, (list, tuple)) or len(size) != 2 or not all(is_int(v) for v in size)
                or [*size] != [height, width]):
            return f"RLE size {size!r} is not the image's [height, width] = [{height}, {width}]"
        if isinstance(counts, list):
            if not all(is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
                return f"uncompressed RLE counts do not add up to height * width = {height * width}"
            return None
        if isinstance(counts, (str, bytes)):
            return _rle_string_problem(counts, height * width)
        return f"RLE 'counts' is a {type(counts).__name__}, expected a string or a list of ints"
    if segm is None:
        return "no 'segmentation' (polygons or RLE)"
    return f"'segmentation' is a {type(segm).__name__}, expected a polygon list or an RLE dict"


def _annotation_problem(ann: Any, image_ids: dict, category_ids: dict, seen: set) -> str | None:
    """Why ``ann`` cannot be used, or None."""
    if not isinstance(ann, dict):
        return f"not an object: {_brief(ann)}"
    if not is_int(ann.get("id")):
        return "no integer 'id'"
    if ann["id"] in seen:
        return "duplicate id"
    if ann.get("image_id") not in image_ids:
        return f"image_id {_brief(ann.get('image_id'))} is not in 'images'"
    if ann.get("category_id") not in category_ids:
        return f"category_id {_brief(ann.get('category_id'))} is not in 'categories'"
    bbox = ann.get("bbox")
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in bbox)):
        return f"bbox {_brief(bbox)} is not 4 finite numbers [x, y, w, h]"
    # the fields COCOeval reads from a ground-truth annotation: checked here, when the file is
    # loaded, rather than met as a crash inside pycocotools after an epoch of training
    if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):  # True / False compare equal to 1 / 0
        return f"iscrowd {_brief(ann['iscrowd'])} is not 0 or 1"
    for key in ("area", "ignore"):
        if key in ann and not (_is_number(ann[key]) and ann[key] >= 0):
            return f"{key} {_brief(ann[key])} is not a finite number >= 0"
    # a mask, where there is one, must fit its image: an annotation file with broken masks is
    # refused when it is loaded, not met later as garbage or a crash in pycocotools
    img = image_ids[ann["image_id"]]
    return segmentation_problem(ann.get("segmentation"), img["height"], img["width"], required=False)


def checked_annotations(anns: list, images: dict[int, dict], cat_to_label: dict[int, int], *, ann_file: Path,
                        skip_bad: bool, stats: dict[str, int],
                        extra_check: Callable[[dict], str | None] | None = None):
    """Yield the well-formed annotations; a malformed one (``_annotation_problem``, or
    ``extra_check``) raises ``ValueError`` naming the file and annotation id, or with
    ``skip_bad`` is dropped and counted in ``stats["malformed"]``."""
    seen: set[int] = set()
    for i, ann in enumerate(anns):
        problem = _annotation_problem(ann, images, cat_to_label, seen)
        if problem is None and extra_check is not None:
            problem = extra_check(ann)
        if problem is not None:
            ann_id = _brief(ann["id"]) if isinstance(ann, dict) and "id" in ann else f"#{i}"
            if not skip_bad:
                raise ValueError(f"{display_path(ann_file)}: malformed annotation id {ann_id}: {problem}; "
                                 f"--set data.skip_bad=true drops malformed annotations")
            stats["malformed"] += 1
            continue
        seen.add(ann["id"])
        yield ann


def keep_existing_images(image_dir: Path, images: dict[int, dict], ids: list[int], *, ann_file: Path,
                         skip_bad: bool, stats: dict[str, int]) -> list[int]:
    """The ids whose image file exists; a missing one raises ``FileNotFoundError`` naming it, or
    with ``skip_bad`` is dropped and counted in ``stats["skipped_images"]``."""
    kept = []
    for img_id in ids:
        path = image_dir / images[img_id]["file_name"]
        if path.is_file():
            kept.append(img_id)
        elif skip_bad:
            stats["skipped_images"] += 1
        else:
            raise FileNotFoundError(f"{display_path(path)}: image file not found (image id {img_id} of "
                                    f"{display_path(ann_file)}); --set data.skip_bad=true skips missing images")
    return kept


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------

class CocoDetection(torch.utils.data.Dataset):
    """Detection samples from a COCO JSON and an image folder.

    ``dataset[i] -> (image, target)``: ``image`` uint8 ``[3, H, W]`` RGB, not normalised;
    ``target`` = ``boxes`` float32 ``[N, 4]`` xyxy pixels of the transformed image, ``labels``
    int64 ``[N]`` in ``[0, num_classes)``, ``image_id`` int, ``orig_size`` / ``size``
    ``(h, w)`` of the file / transformed image, and ``scale`` ``(sy, sx)`` + ``offset``
    ``(oy, ox)`` such that ``x_file = (x - ox) / sx`` (``detections_to_coco`` uses them).

    ``transforms``: an ``A.Compose`` with ``tasks.data.transforms.detection_bbox_params``-style
    boxes (``pascal_voc``, ``label_fields=["labels"]``), e.g. ``detection_val_transforms``.
    ``limit``: a random subset of ``limit`` images drawn with ``seed`` (before dropping missing files).
    ``coco`` holds the same images and annotations as served (crowd regions included, boxes
    clipped, degenerate and malformed ones removed), so ``coco_evaluate(ds.coco, ...)``
    scores exactly what the dataset serves.
    """

    # what skip_bad skips: unreadable, or vanished since init (FileNotFoundError)
    unusable_errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, ann_file: str | os.PathLike | Mapping[str, Any], image_dir: str | os.PathLike,
                 transforms: A.Compose | None = None, *, skip_bad: bool = False,
                 limit: int | None = None, mask_dir: str | os.PathLike | None = None, evaluation: bool = False,
                 seed: int = 0):
        # a COCO file, or its contents in memory (named by their "source": Pascal VOC's XML)
        self._ann = ann_file if isinstance(ann_file, Mapping) else None
        self.ann_file = Path(str(ann_file["source"])) if isinstance(ann_file, Mapping) else Path(ann_file)
        self.image_dir = Path(image_dir)
        # optional semantic label maps (<mask_dir>/<image stem>.png), served as target["mask"]
        self.mask_dir = Path(mask_dir) if mask_dir is not None else None
        self.transforms = transforms
        self.skip_bad = skip_bad
        self.evaluation = evaluation
        _check_transforms(transforms)
        if limit is not None and limit < 0:
            raise ValueError(f"limit={limit}: expected a number of images >= 0 (or None for all)")
        self.stats = dict.fromkeys(("images", "annotations", "crowd", "clipped", "degenerate",
                                    "malformed", "skipped_images", "unreadable"), 0)

        data = load_coco_json(self._ann if self._ann is not None else self.ann_file)
        names = check_categories(self.ann_file, data["categories"])
        images = check_images(self.ann_file, data["images"])
        self.cat_ids: list[int] = sorted(names)
        self.class_names: list[str] = [names[c] for c in self.cat_ids]
        self.num_classes = len(self.cat_ids)
        self._cat_to_label = {c: i for i, c in enumerate(self.cat_ids)}

        ids = sorted(images)
        kept_ids = [ids[i] for i in subset_indices(len(ids), limit, seed)]
        kept_ids = self._drop_missing_files(images, kept_ids)
        anns_by_image = self._sanitize_annotations(data["annotations"], images, set(kept_ids))

        self._records = []  # (image_id, path, h, w, boxes float32 [N, 4], labels int64 [N])
        for img_id in kept_ids:
            img = images[img_id]
            anns = [a for a in anns_by_image.get(img_id, []) if not a.get("iscrowd", 0)]
            boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
            labels = np.array([self._cat_to_label[a["category_id"]] for a in anns], dtype=np.int64)
            self._records.append((img_id, self.image_dir / img["file_name"],
                                  img["height"], img["width"], boxes, labels))
        self.stats["images"] = len(self._records)

        gt = {k: v for k, v in data.items() if k not in ("images", "annotations")}
        gt["images"] = [images[i] for i in kept_ids]
        gt["annotations"] = [a for i in kept_ids for a in anns_by_image.get(i, [])]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO()
            self.coco.dataset = gt
            self.coco.createIndex()
        self._report()
        self.unusable = Unusable(len(self._records), self.sample_name) if skip_bad else None

    # -- init helpers -----------------------------------------------------------------------

    def _drop_missing_files(self, images: dict[int, dict], ids: list[int]) -> list[int]:
        return keep_existing_images(self.image_dir, images, ids, ann_file=self.ann_file, skip_bad=self.skip_bad,
                                    stats=self.stats)

    def _sanitize_annotations(self, anns: list, images: dict[int, dict],
                              kept: set[int]) -> dict[int, list[dict]]:
        """Check every annotation; return the usable ones of the kept images, boxes clipped."""
        by_image: dict[int, list[dict]] = {}
        for ann in checked_annotations(anns, images, self._cat_to_label, ann_file=self.ann_file,
                                       skip_bad=self.skip_bad, stats=self.stats):
            if ann["image_id"] not in kept:
                continue
            ann = dict(ann)  # never mutate the caller's JSON
            # pycocotools' COCOeval reads these without defaults.
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
            if ann["iscrowd"]:
                self.stats["crowd"] += 1  # COCOeval ignore region, never a training target
            else:
                img = images[ann["image_id"]]
                x, y, w, h = (float(v) for v in ann["bbox"])
                x1, x2 = min(max(x, 0.0), img["width"]), min(max(x + w, 0.0), img["width"])
                y1, y2 = min(max(y, 0.0), img["height"]), min(max(y + h, 0.0), img["height"])
                if x2 <= x1 or y2 <= y1:  # zero size, negative size or fully outside
                    self.stats["degenerate"] += 1
                    continue
                if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                    self.stats["clipped"] += 1
                    ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
                self.stats["annotations"] += 1
            by_image.setdefault(ann["image_id"], []).append(ann)
        return by_image

    def _report(self) -> None:
        noted = {k: self.stats[k] for k in ("clipped", "degenerate", "malformed", "skipped_images")
                 if self.stats[k]}
        if noted:
            what = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in noted.items())
            warnings.warn(f"{display_path(self.ann_file)}: {what} (boxes clipped to the image; degenerate and "
                          f"malformed annotations and skipped images are not used)", stacklevel=3)

    # -- categories -------------------------------------------------------------------------

    def label_to_category(self, labels):
        """Labels 0..K-1 -> COCO category ids (a tensor stays a tensor, else an int64 array)."""
        table = np.asarray(self.cat_ids, dtype=np.int64)
        if isinstance(labels, torch.Tensor):
            idx = labels.detach().cpu().long().numpy()
        else:
            idx = np.asarray(labels, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {idx.min()}..{idx.max()}")
        cats = table[idx]
        return torch.as_tensor(cats, device=labels.device) if isinstance(labels, torch.Tensor) else cats

    # -- samples ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def image_sizes(self) -> list[tuple[int, int]]:
        """``(h, w)`` of every sample, from the annotation file (the aspect batch sampler's input)."""
        return [(h, w) for _, _, h, w, _, _ in self._records]

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, dict] | None:
        # (index, size): the aspect batch sampler's pick of this batch's scale (SizedTransforms.at)
        index, size = index if isinstance(index, tuple) else (index, None)
        transforms = self.transforms.at(size) if size is not None and hasattr(self.transforms, "at") else None
        if not self.skip_bad:
            try:
                return self._load(index, transforms)
            except self.unusable_errors as e:
                raise with_skip_hint(e) from None
        return load_skipping_bad(lambda i: self._load(i, transforms), index, len(self), self.unusable_errors,
                                 self.stats, str(self.ann_file), replace=not self.evaluation, unusable=self.unusable)

    def sample_name(self, index: int) -> str:
        """The image file of sample ``index``, as messages name it."""
        return display_path(self._records[index][1])

    def _load(self, index: int, transforms: Any = None) -> tuple[torch.Tensor, dict]:
        img_id, path, h, w, boxes, labels = self._records[index]
        image = read_image(path)
        if image.shape[:2] != (h, w):
            raise ImageReadError(f"{display_path(path)}: image is {image.shape[1]}x{image.shape[0]} but "
                                 f"{display_path(self.ann_file)} says {w}x{h} (image id {img_id})")
        mask = self._read_mask(path, image.shape[:2]) if self.mask_dir is not None else None
        image, boxes, labels, scale, offset, mask = self._transform(image, boxes, labels, mask, transforms)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "image_id": img_id,
            "orig_size": (h, w),
            "size": tuple(image.shape[:2]),
            "scale": scale,
            "offset": offset,
        }
        if mask is not None:
            target["mask"] = torch.from_numpy(np.ascontiguousarray(mask)).long()  # [H, W]
        # [H, W, 3] -> [3, H, W]; a contiguous copy so collate and pin_memory don't stride.
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), target

    def _read_mask(self, image_path: Path, size: tuple[int, int]) -> np.ndarray:
        path = self.mask_dir / (image_path.stem + ".png")
        mask = read_mask(path)
        if mask.shape != tuple(size):
            raise ImageReadError(f"{display_path(path)}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                 f"{display_path(image_path)} is {size[1]}x{size[0]}")
        return mask

    def _transform(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None,
                   transforms: Any = None):
        h, w = image.shape[:2]
        transforms = transforms or self.transforms
        if transforms is None:
            return image, boxes, labels, (1.0, 1.0), (0.0, 0.0), mask
        # A whole-image "frame" box rides along with the real ones: where the pipeline puts it
        # is where the original image ended up, computed by the same bbox arithmetic as the
        # targets, so predictions map back exactly, for any resize/pad pipeline, without
        # re-deriving each transform's rounding. After a crop or flip the mapping is not
        # invertible by scale and offset alone (training pipelines; nothing maps back there).
        extra = {"mask": mask} if mask is not None else {}
        out = transforms(
            image=image,
            bboxes=np.concatenate([boxes, np.array([[0, 0, w, h]], np.float32)]),
            labels=np.concatenate([labels, np.array([_FRAME_LABEL], np.int64)]), **extra)
        image = out["image"]
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise TypeError(f"transforms must return HWC uint8 RGB images, got {image.dtype} "
                            f"{image.shape}")
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        is_frame = labels == _FRAME_LABEL
        if is_frame.any():
            fx1, fy1, fx2, fy2 = (float(v) for v in boxes[is_frame][0])
            scale, offset = ((fy2 - fy1) / h, (fx2 - fx1) / w), (fy1, fx1)
        else:  # cropped away (min_visibility): only the size ratio is known
            scale, offset = (image.shape[0] / h, image.shape[1] / w), (0.0, 0.0)
        # Albumentations keeps boxes squeezed to zero width at a crop edge; they teach nothing.
        keep = ~is_frame & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return image, boxes[keep], labels[keep], scale, offset, out.get("mask")


def _check_transforms(transforms: Any) -> None:
    if transforms is None:
        return
    composed = isinstance(transforms, A.BaseCompose) or hasattr(transforms, "at")  # SizedTransforms
    bbox = getattr(transforms, "processors", {}).get("bboxes") if composed else None
    if (bbox is None or bbox.params.format != "pascal_voc"
            or "labels" not in (bbox.params.label_fields or ())):
        raise ValueError("transforms must be an albumentations Compose with bbox_params="
                         "A.BboxParams(format='pascal_voc', label_fields=['labels']) "
                         "(see tasks.data.transforms.detection_bbox_params)")


# ---------------------------------------------------------------------------------------------
# Batching, results, evaluation
# ---------------------------------------------------------------------------------------------

def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]],
                      size_divisible: int = 32) -> tuple[torch.Tensor, list[dict]]:
    """Stack images into uint8 ``[B, 3, H, W]``, zero-padded bottom/right to the largest
    H, W of the batch rounded up to ``size_divisible`` (``pad_batch``); boxes need no change.
    Returns ``(images, targets)``."""
    batch = [b for b in batch if b is not None]  # samples an evaluation set left out (skip_bad)
    if not batch:
        return None
    images, targets = zip(*batch)
    return pad_batch(images, size_divisible), list(targets)


def _pair(v: Any) -> tuple[float, float]:
    if isinstance(v, (int, float)):
        return float(v), float(v)
    a, b = v
    return float(a), float(b)


def detections_to_coco(outputs: Sequence[dict], targets: Sequence[dict],
                       label_to_category: Callable | Sequence[int]) -> list[dict]:
    """Model outputs (``boxes`` xyxy in transformed-image pixels, ``scores``, ``labels``) ->
    COCO results (``image_id``, ``category_id``, ``bbox`` xywh in file pixels, ``score``).

    Undoes each target's ``offset`` / ``scale`` (``x_file = (x - ox) / sx``) and clips to its
    ``orig_size``. ``label_to_category``: ``dataset.label_to_category`` or ``dataset.cat_ids``.
    """
    if not callable(label_to_category):
        table = np.asarray(label_to_category, dtype=np.int64)
        label_to_category = lambda labels: table[np.asarray(labels, dtype=np.int64)]  # noqa: E731
    results = []
    for out, tgt in zip(outputs, targets, strict=True):
        # float64 so dividing by the scale reproduces the file's coordinates to ~1e-12.
        boxes = torch.as_tensor(out["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)
        if not len(boxes):
            continue
        scores = torch.as_tensor(out["scores"]).detach().cpu().reshape(-1).tolist()
        labels = torch.as_tensor(out["labels"]).detach().cpu().reshape(-1).long().numpy()
        sy, sx = _pair(tgt.get("scale", 1.0))
        oy, ox = _pair(tgt.get("offset", 0.0))
        h, w = tgt["orig_size"]
        boxes[:, 0::2] = ((boxes[:, 0::2] - ox) / sx).clamp(0, w)
        boxes[:, 1::2] = ((boxes[:, 1::2] - oy) / sy).clamp(0, h)
        xywh = box_convert(boxes, "xyxy", "xywh").tolist()
        cats = np.asarray(label_to_category(labels)).tolist()
        image_id = int(tgt["image_id"])
        results.extend({"image_id": image_id, "category_id": int(c), "bbox": b, "score": float(s)}
                       for b, s, c in zip(xywh, scores, cats, strict=True))
    return results


def run_cocoeval(coco_gt: COCO, predictions: Sequence[dict], *, img_ids: Sequence[int] | None = None,
                 verbose: bool = False) -> COCOeval | None:
    """pycocotools' box COCOeval of COCO-format ``predictions``, evaluated, accumulated and
    summarised (``stats``, ``eval["precision"]``); ``None`` without predictions (``loadRes``
    cannot take none). ``img_ids`` / ``verbose``: as ``coco_evaluate``."""
    if not predictions:
        return None
    # loadRes adds keys to every result dict: give it copies.
    preds = [dict(p) for p in predictions]
    unknown = {p["image_id"] for p in preds} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"predictions for image ids not in the ground truth: {sorted(unknown)[:10]}")
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_dt = coco_gt.loadRes(preds)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if img_ids is not None:
            evaluator.params.imgIds = sorted(img_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def coco_stats(evaluator: COCOeval | None) -> dict[str, float]:
    """``run_cocoeval``'s result as ``{"AP", "AP50", ...}``: all zeros for ``None``."""
    if evaluator is None:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    return {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats[:6])}


def coco_evaluate(coco_gt: COCO, predictions: Sequence[dict], *,
                  img_ids: Sequence[int] | None = None, verbose: bool = False) -> dict[str, float]:
    """Box mAP of COCO-format ``predictions`` with pycocotools' COCOeval.

    Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` on COCOeval's 0..1 scale (-1 where
    COCOeval has no ground truth for an area range). No predictions gives all zeros.
    ``img_ids`` restricts evaluation (default: every image of ``coco_gt``); ``verbose`` lets
    COCOeval print its table.
    """
    return coco_stats(run_cocoeval(coco_gt, predictions, img_ids=img_ids, verbose=verbose))


class CocoEvaluator:
    """Collects detections as COCO results (file coordinates) and scores them with COCOeval.

    ``update(outputs, targets)`` takes a batch of model outputs (network-input pixels) and the
    dataset's targets (``image_id``, ``scale``, ``offset``, ``orig_size``); ``compute()`` gives
    ``coco_evaluate``'s metrics over everything added and keeps its COCOeval in ``cocoeval``
    (``None`` without predictions) for per-class numbers."""

    def __init__(self, dataset: CocoDetection) -> None:
        self.dataset = dataset
        self.results: list[dict] = []
        self.image_ids: list[int] = []  # the images evaluated: ground truth of no other counts
        self.cocoeval: COCOeval | None = None

    def update(self, outputs: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict]) -> list[dict[str, torch.Tensor]]:
        """Add a batch; returns the outputs moved to the CPU (float32)."""
        outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]
        self.results += detections_to_coco(outputs, targets, self.dataset.label_to_category)
        self.image_ids += [int(t["image_id"]) for t in targets]
        return outputs

    def compute(self) -> dict[str, float]:
        """COCOeval over the images that were evaluated (all of them unless an evaluation set
        with ``skip_bad`` left unreadable ones out, which is then said)."""
        missing = len(self.dataset) - len(set(self.image_ids))
        if missing > 0:
            warnings.warn(f"{self.dataset.ann_file}: {missing} validation image(s) could not be read and are left "
                          f"out of the evaluation (their ground truth too)")
        self.cocoeval = run_cocoeval(self.dataset.coco, self.results, img_ids=sorted(set(self.image_ids)))
        return coco_stats(self.cocoeval)
