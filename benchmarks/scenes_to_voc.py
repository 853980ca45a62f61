"""Write a FashionScenes folder out again in Pascal VOC's own layout, for the VOC runs on the GPU machine
(it has no network, so no VOC). Usage: python -m benchmarks.scenes_to_voc SCENES_ROOT OUT_DIR

    OUT_DIR/VOCdevkit/VOC2012/{JPEGImages/*.jpg, Annotations/*.xml, SegmentationClass/*.png,
                               ImageSets/{Main,Segmentation}/{train,val}.txt}

The 10 Fashion-MNIST classes take the names of the first 10 VOC classes (the XML must name VOC
classes). Boxes are written with VOC's 1-based inclusive corners; objects smaller than 16x16 px are
marked ``difficult`` (a crowd region in evaluation, no training target). Masks become palette PNGs
with the same indices (0 background, class + 1, 255 ignore). Images are re-encoded as JPEG (q 95).
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from tasks.data.voc import VOC_CLASSES  # noqa: E402

SPLITS = ("train", "val")
DIFFICULT_BELOW = 16  # px, the shorter box side
PALETTE = np.zeros((256, 3), np.uint8)
PALETTE[1:11] = [[128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128], [0, 128, 128],
                 [128, 128, 128], [64, 0, 0], [192, 0, 0], [64, 128, 0]]  # VOC's first 10 colours
PALETTE[255] = (224, 224, 192)  # VOC's object border


def _convert(job: tuple) -> str:
    root, voc, split, image, anns = job
    stem = f"{split}_{image['id']:06d}"
    bgr = cv2.imread(str(Path(root) / "images" / split / image["file_name"]), cv2.IMREAD_COLOR)
    cv2.imwrite(str(voc / "JPEGImages" / f"{stem}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    mask = np.asarray(Image.open(Path(root) / "masks" / split / image["file_name"]))
    m = Image.fromarray(mask, mode="P")
    m.putpalette(PALETTE.reshape(-1).tolist())
    m.save(voc / "SegmentationClass" / f"{stem}.png")
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "VOC2012"
    ET.SubElement(ann, "filename").text = f"{stem}.jpg"
    size = ET.SubElement(ann, "size")
    for key, value in (("width", image["width"]), ("height", image["height"]), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for a in anns:
        x, y, w, h = a["bbox"]
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = VOC_CLASSES[a["category_id"] - 1]
        ET.SubElement(obj, "difficult").text = str(int(min(w, h) < DIFFICULT_BELOW))
        box = ET.SubElement(obj, "bndbox")
        # 0-based edges -> 1-based inclusive corners (what voc_coco undoes)
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (x + 1, y + 1, x + w, y + h)):
            ET.SubElement(box, key).text = f"{value:g}"
    ET.ElementTree(ann).write(voc / "Annotations" / f"{stem}.xml")
    return stem


def main(scenes_root: str, out_dir: str) -> None:
    voc = Path(out_dir) / "VOCdevkit" / "VOC2012"
    for sub in ("Annotations", "JPEGImages", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        coco = json.loads((Path(scenes_root) / "annotations" / f"instances_{split}.json").read_text())
        per_image = {im["id"]: [] for im in coco["images"]}
        for a in coco["annotations"]:
            per_image[a["image_id"]].append(a)
        jobs = [(scenes_root, voc, split, im, per_image[im["id"]]) for im in coco["images"]]
        with ProcessPoolExecutor() as pool:
            stems = list(pool.map(_convert, jobs, chunksize=32))
        for kind in ("Main", "Segmentation"):
            (voc / "ImageSets" / kind / f"{split}.txt").write_text("\n".join(stems) + "\n")
        print(f"{split}: {len(stems)} images -> {voc}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
