"""Pascal VOC read in its own layout (``VOCdevkit/VOC20xx``), for detection and segmentation.

``VOC20xx/Annotations/<id>.xml`` (parsed with torchvision's ``VOCDetection.parse_voc_xml``),
``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette masks: the index is the class,
255 marks object borders and is ignored) and the split lists ``ImageSets/Main/<split>.txt``
(detection) / ``ImageSets/Segmentation/<split>.txt``. Detection boxes become COCO annotations in
memory and go through ``CocoDetection`` (so COCO mAP evaluates them): ``difficult`` objects are
crowd regions (ignored by COCOeval, never training targets), and VOC's 1-based inclusive pixel
corners become 0-based COCO boxes (detectron2's conversion). Segmentation goes through
``MaskFolderDataset``: 21 classes, background first.

A VOC-layout set of other classes: pass them as ``classes`` (detection: the object names;
segmentation: the mask ids' names, background first); ``voc_classes`` finds them for a set
the way the tasks do (a ``classes.txt``, else the object names of the XML files, else VOC's).
"""
from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

from .coco import CocoDetection
from .images import display_path
from .segmentation import MaskFolderDataset

__all__ = ["VOC_CLASSES", "find_voc", "voc_ids", "voc_coco", "voc_detection", "voc_segmentation", "voc_classes",
           "find_class_list", "read_class_list"]

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def find_voc(root: str | os.PathLike) -> Path:
    """The ``VOC20xx`` folder of ``root``: itself, or the newest ``VOC20xx`` inside a ``VOCdevkit``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--voc-root {display_path(root)}: folder not found")
    if (root / "JPEGImages").is_dir():
        return root
    years = sorted(p for p in root.glob("VOC20*") if (p / "JPEGImages").is_dir())
    if not years:
        raise FileNotFoundError(f"--voc-root {display_path(root)}: neither a VOC20xx folder (with JPEGImages/) nor a "
                                f"VOCdevkit holding one")
    return years[-1]


def voc_ids(voc: Path, kind: str, split: str) -> list[str]:
    """The image ids of ``ImageSets/<kind>/<split>.txt`` (``kind``: Main or Segmentation)."""
    path = voc / "ImageSets" / kind / f"{split}.txt"
    name = display_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: VOC split list not found (expected one image id per line)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not a text file of image ids (byte 0x{e.object[e.start]:02x} at offset "
                         f"{e.start} is not UTF-8)") from None
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{name}: lists no image ids")
    # an id becomes a file name: a path separator or a NUL byte would leave the VOC folder or
    # reach the file system as a bare "embedded null byte" error
    bad = next((i for i in ids if "/" in i or "\\" in i or "\0" in i or i in (".", "..")), None)
    if bad is not None:
        raise ValueError(f"{name}: {bad!r} is not an image id (a file name stem, without folders)")
    return ids


def _number(obj: dict, key: str, path: Path) -> float:
    """A finite number from the XML: "nan" or "inf" parse as floats, then fail as sizes or boxes
    far from the file that holds them."""
    obj = obj if isinstance(obj, dict) else {}  # <size>text</size>: no elements at all
    try:
        value = float(obj[key])
    except (KeyError, TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{display_path(path)}: {key!r} is {obj.get(key)!r}, expected a finite number")
    return value


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Class names, one per line (blank lines and ``#`` comments skipped), e.g. a ``classes.txt``."""
    name = display_path(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{name}: not a UTF-8 text file of class names (one per line)") from None
    names = [line.split("#")[0].strip() for line in text.splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{name}: lists no class names (expected one per line)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{name}: class names {dup} appear more than once")
    return names


def _parse(path: Path, stem: str, split: str) -> dict[str, Any]:
    from torchvision.datasets import VOCDetection

    name = display_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: annotation file not found (image {stem} of ImageSets/Main/{split}.txt)")
    try:
        ann = VOCDetection.parse_voc_xml(ET.parse(path).getroot())["annotation"]
    except (ET.ParseError, KeyError) as e:
        raise ValueError(f"{name}: not a VOC annotation ({e})") from None
    except RecursionError:  # parse_voc_xml recurses once per element level
        raise ValueError(f"{name}: not a VOC annotation (XML nested too deeply)") from None
    if not isinstance(ann, dict):
        raise ValueError(f"{name}: not a VOC annotation (<annotation> holds no elements)")
    return ann


def _objects(ann: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    objects = ann.get("object") or []
    objects = objects if isinstance(objects, list) else [objects]
    for obj in objects:
        if not isinstance(obj, dict):
            raise ValueError(f"{display_path(path)}: an <object> without elements, expected <name> and <bndbox>")
    return objects


def find_class_list(folder: Path) -> Path | None:
    """``classes.txt`` in ``folder`` or the folder above it (a VOC20xx folder and its VOCdevkit,
    a mask folder and the dataset folder), or None."""
    return next((p for p in (folder / "classes.txt", folder.parent / "classes.txt") if p.is_file()), None)


def voc_classes(voc: Path, splits: tuple[str, ...] = ("train", "val")) -> tuple[list[str], str]:
    """``(class names, where they came from)`` of a VOC-layout detection set: ``classes.txt`` in
    the VOC20xx folder or the VOCdevkit above it; else the object names of the ``splits``' XML
    files: VOC's 20 (in VOC's order) when they are all VOC classes, else the names found, sorted."""
    listed = find_class_list(voc)
    if listed is not None:
        return read_class_list(listed), display_path(listed)
    found = voc_object_names(voc, "Main", splits)
    if found <= set(VOC_CLASSES):
        return list(VOC_CLASSES), "Pascal VOC's 20 classes (every object name is one of them)"
    return sorted(found), f"the object names of the XML files of {', '.join(splits)}"


def voc_object_names(voc: Path, kind: str, splits: tuple[str, ...]) -> set[str]:
    """The object names of the XML files of the ``splits`` of ``ImageSets/<kind>``. Main: every
    image needs its XML file; Segmentation: images without one are passed over (a tree may hold
    masks only)."""
    found: set[str] = set()
    for split in splits:
        for stem in voc_ids(voc, kind, split):
            path = voc / "Annotations" / f"{stem}.xml"
            if kind == "Main" or path.is_file():
                found.update(str(obj.get("name")) for obj in _objects(_parse(path, stem, split), path))
    return found


def voc_coco(voc: Path, split: str, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """COCO annotations (a dict ``CocoDetection`` takes) from the XML files of a split; ``classes``:
    the object names (default: VOC's 20)."""
    images, annotations = [], []
    classes = list(classes) if classes else list(VOC_CLASSES)
    cat_id = {name: i + 1 for i, name in enumerate(classes)}
    for image_id, stem in enumerate(voc_ids(voc, "Main", split)):
        path = voc / "Annotations" / f"{stem}.xml"
        ann = _parse(path, stem, split)
        size = ann.get("size") or {}
        images.append({"id": image_id, "file_name": ann.get("filename") or f"{stem}.jpg",
                       "width": int(_number(size, "width", path)), "height": int(_number(size, "height", path))})
        for obj in _objects(ann, path):
            cls = obj.get("name")
            if cls not in cat_id:
                which = "the 20 VOC classes" if classes == list(VOC_CLASSES) else f"the classes {classes}"
                raise ValueError(f"{display_path(path)}: object class {cls!r} is not one of {which} (a set of "
                                 f"other classes: list them in classes.txt or --classes)")
            box = obj.get("bndbox") or {}
            x1, y1, x2, y2 = (_number(box, k, path) for k in ("xmin", "ymin", "xmax", "ymax"))
            x1, y1 = x1 - 1, y1 - 1  # 1-based inclusive corners -> 0-based edges
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[cls],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": int(str(obj.get("difficult", "0")).strip() == "1")})
    return {"source": str(voc / "Annotations" / f"({split})"), "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in cat_id.items()]}


def voc_detection(root: str | os.PathLike, split: str, transforms: Any = None, *,
                  classes: Sequence[str] | None = None, **kwargs) -> CocoDetection:
    voc = find_voc(root)
    return CocoDetection(voc_coco(voc, split, classes), voc / "JPEGImages", transforms, **kwargs)


def voc_segmentation(root: str | os.PathLike, split: str, *, classes: Sequence[str] | None = None,
                     **kwargs) -> MaskFolderDataset:
    """``classes``: the names of mask ids 0, 1, ... (background first; default: VOC's 21)."""
    voc = find_voc(root)
    names = list(classes) if classes else ["background", *VOC_CLASSES]
    return MaskFolderDataset(voc / "JPEGImages", voc / "SegmentationClass", num_classes=len(names),
                             class_names=names, stems=voc_ids(voc, "Segmentation", split), **kwargs)
