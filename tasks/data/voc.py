"""Pascal VOC read in its own layout (``VOCdevkit/VOC20xx``), for detection and segmentation.

``VOC20xx/Annotations/<id>.xml`` (parsed with torchvision's ``VOCDetection.parse_voc_xml``),
``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette masks: the index is the class,
255 marks object borders and is ignored) and the split lists ``ImageSets/Main/<split>.txt``
(detection) / ``ImageSets/Segmentation/<split>.txt``. Detection boxes become COCO annotations in
memory and go through ``CocoDetection`` (so COCO mAP evaluates them): ``difficult`` objects are
crowd regions (ignored by COCOeval, never training targets), and VOC's 1-based inclusive pixel
corners become 0-based COCO boxes (detectron2's conversion). Segmentation goes through
``MaskFolderDataset``: 21 classes, background first.
"""
from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .coco import CocoDetection
from .images import display_path
from .segmentation import MaskFolderDataset

__all__ = ["VOC_CLASSES", "find_voc", "voc_ids", "voc_coco", "voc_detection", "voc_segmentation"]

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


def voc_coco(voc: Path, split: str) -> dict[str, Any]:
    """COCO annotations (a dict ``CocoDetection`` takes) from the XML files of a split."""
    from torchvision.datasets import VOCDetection

    images, annotations = [], []
    cat_id = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
    for image_id, stem in enumerate(voc_ids(voc, "Main", split)):
        path = voc / "Annotations" / f"{stem}.xml"
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
        size = ann.get("size") or {}
        images.append({"id": image_id, "file_name": ann.get("filename") or f"{stem}.jpg",
                       "width": int(_number(size, "width", path)), "height": int(_number(size, "height", path))})
        objects = ann.get("object") or []
        for obj in objects if isinstance(objects, list) else [objects]:
            if not isinstance(obj, dict):
                raise ValueError(f"{display_path(path)}: an <object> without elements, expected <name> and <bndbox>")
            cls = obj.get("name")
            if cls not in cat_id:
                raise ValueError(f"{display_path(path)}: object class {cls!r} is not one of the 20 VOC classes")
            box = obj.get("bndbox") or {}
            x1, y1, x2, y2 = (_number(box, k, path) for k in ("xmin", "ymin", "xmax", "ymax"))
            x1, y1 = x1 - 1, y1 - 1  # 1-based inclusive corners -> 0-based edges
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[cls],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": int(str(obj.get("difficult", "0")).strip() == "1")})
    return {"source": str(voc / "Annotations" / f"({split})"), "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in cat_id.items()]}


def voc_detection(root: str | os.PathLike, split: str, transforms: Any = None, **kwargs) -> CocoDetection:
    voc = find_voc(root)
    return CocoDetection(voc_coco(voc, split), voc / "JPEGImages", transforms, **kwargs)


def voc_segmentation(root: str | os.PathLike, split: str, **kwargs) -> MaskFolderDataset:
    voc = find_voc(root)
    return MaskFolderDataset(voc / "JPEGImages", voc / "SegmentationClass", num_classes=len(VOC_CLASSES) + 1,
                             class_names=["background", *VOC_CLASSES], stems=voc_ids(voc, "Segmentation", split),
                             **kwargs)
