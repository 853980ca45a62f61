"""Shapes: a COCO detection set that is not FashionScenes, for checking that a recipe holds on
other data (the seed sweep of ``benchmarks.seeds`` on it, say); with ``--masks``, a segmentation
set of mask folders of similar images (a user's own layout).

    python -m benchmarks.shapes --out DIR [--train 3000] [--val 500] [--seed 0] [--masks | --folders]

Writes ``DIR/train/*.jpg``, ``DIR/val/*.jpg``, ``DIR/train.json`` and ``DIR/val.json`` (COCO
instances, boxes only) and prints the ``--set`` flags that point a detection recipe at them.
The images differ from FashionScenes where a recipe could have been tuned to it: non-square
(width 320-512, height 240-400), RGB colour everywhere, textured backgrounds (gradients, noise,
clutter lines), four classes (circle, square, triangle, cross) of 14-140 px drawn in any
colour, overlapping each other, 1-10 per image, a few images with none. JPEG, quality 90.

``--folders``: a classification set of class folders, ``DIR/{train,val}/<shape>/*.jpg``, one
shape per image (radius 25-45 % of the shorter side, any colour, rotated) on the same
backgrounds with a few clutter lines, images 64-128 px wide and high (a user's small photo set).

``--masks``: ``DIR/{train,val}/images/*.jpg``, ``DIR/{train,val}/masks/*.png`` (pixel = class id,
0 background, 1-4 the shapes, 1-5 per image of radius 10-60 px, drawn with OpenCV on the same
backgrounds, no clutter lines, JPEG quality 95) and ``DIR/classes.txt``; it
prints the ``python -m tasks.segment`` flags for them.

The set is written into a temporary folder beside ``DIR`` and renamed into place when complete;
an existing ``DIR`` is used as it is when it holds this generator's marker for the same
arguments, and refused otherwise (it is never deleted or overwritten).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = ("circle", "square", "triangle", "cross")
MARKER = "shapes.json"


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = ((xx * math.cos(angle) + yy * math.sin(angle)) / max(w, h) + 1) / 2
    img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    img += rng.normal(0, rng.uniform(4, 20), (h, w, 1)) + rng.normal(0, 4, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(cls: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]] | None:
    if cls == "circle":
        return None
    if cls == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        r = r / math.sqrt(2)
    elif cls == "triangle":
        corners = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # cross: a plus sign of arm width r/3
        q = 1 / 3
        corners = [(-q, -1), (q, -1), (q, -q), (1, -q), (1, q), (q, q), (q, 1), (-q, 1), (-q, q), (-1, q),
                   (-1, -q), (-q, -q)]
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in corners]


def draw_image(rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One image (HWC uint8) and its ``(label, [x, y, w, h])`` boxes."""
    from PIL import Image, ImageDraw

    w, h = int(rng.integers(320, 513)), int(rng.integers(240, 401))
    img = Image.fromarray(_background(rng, w, h))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 12))):  # clutter: lines the model must learn to ignore
        draw.line([tuple(rng.uniform(0, [w, h])), tuple(rng.uniform(0, [w, h]))],
                  fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 5)))
    boxes = []
    n = 0 if rng.random() < 0.03 else int(rng.integers(1, 11))
    for _ in range(n):
        label = int(rng.integers(len(CLASSES)))
        r = float(rng.uniform(7, 70))
        cx, cy = float(rng.uniform(r * 0.5, w - r * 0.5)), float(rng.uniform(r * 0.5, h - r * 0.5))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        poly = _polygon(CLASSES[label], cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            xs, ys = [cx - r, cx + r], [cy - r, cy + r]
        else:
            draw.polygon(poly, fill=colour)
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
        x1, y1 = min(float(w), max(xs)), min(float(h), max(ys))
        if x1 - x0 >= 4 and y1 - y0 >= 4:
            boxes.append((label, [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]))
    return np.asarray(img), boxes


def _write_split(root: Path, split: str, n: int, rng: np.random.Generator) -> None:
    from PIL import Image

    (root / split).mkdir()
    images, anns = [], []
    for i in range(n):
        img, boxes = draw_image(rng)
        name = f"{i:06d}.jpg"
        Image.fromarray(img).save(root / split / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": img.shape[1], "height": img.shape[0]})
        for label, box in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": label + 1, "bbox": box,
                         "area": round(box[2] * box[3], 2), "iscrowd": 0})
    cats = [{"id": k + 1, "name": name} for k, name in enumerate(CLASSES)]
    (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def _fill_shape(img: np.ndarray, cls: str, cx: float, cy: float, r: float, rot: float, color,
                antialiased: bool = False) -> None:
    """Draw shape ``cls`` filled with ``color`` into ``img`` with OpenCV (a mask: its class id)."""
    import cv2

    line = cv2.LINE_AA if antialiased else cv2.LINE_8
    poly = _polygon(cls, cx, cy, r, rot)
    if poly is None:
        cv2.circle(img, (int(cx), int(cy)), int(r), color, -1, line)
    else:
        cv2.fillPoly(img, [np.array(poly, np.int32)], color, line)


def _write_mask_split(root: Path, split: str, n: int, rng: np.random.Generator) -> None:
    import cv2

    (root / split / "images").mkdir(parents=True)
    (root / split / "masks").mkdir()
    for i in range(n):
        w, h = int(rng.integers(320, 512)), int(rng.integers(240, 400))
        img, mask = _background(rng, w, h), np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 6))):
            k = int(rng.integers(len(CLASSES)))
            r = rng.uniform(10, 60)
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            color = tuple(int(v) for v in rng.integers(0, 256, 3))
            rot = rng.uniform(0, 2 * math.pi)
            _fill_shape(img, CLASSES[k], cx, cy, r, rot, color)
            _fill_shape(mask, CLASSES[k], cx, cy, r, rot, k + 1)
        cv2.imwrite(str(root / split / "images" / f"{i:04d}.jpg"), img)
        cv2.imwrite(str(root / split / "masks" / f"{i:04d}.png"), mask)
    (root / "classes.txt").write_text("background\n" + "\n".join(CLASSES) + "\n")


def _write_folder_split(root: Path, split: str, n: int, rng: np.random.Generator) -> None:
    import cv2

    for name in CLASSES:
        (root / split / name).mkdir(parents=True)
    for i in range(n):
        k = i % len(CLASSES)  # balanced classes
        w, h = int(rng.integers(64, 129)), int(rng.integers(64, 129))
        img = _background(rng, w, h)
        for _ in range(int(rng.integers(0, 4))):
            p0, p1 = rng.uniform(0, [w, h]).astype(int), rng.uniform(0, [w, h]).astype(int)
            cv2.line(img, tuple(int(v) for v in p0), tuple(int(v) for v in p1),
                     tuple(int(v) for v in rng.integers(0, 256, 3)), int(rng.integers(1, 3)))
        r = float(rng.uniform(0.25, 0.45)) * min(w, h)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        _fill_shape(img, CLASSES[k], cx, cy, r, rng.uniform(0, 2 * math.pi), color, antialiased=True)
        cv2.imwrite(str(root / split / CLASSES[k] / f"{i:04d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])


def ensure_shapes(out: str | Path, train: int = 3000, val: int = 500, seed: int = 0, masks: bool = False,
                  folders: bool = False) -> Path:
    """The set in ``out`` (``masks``: the mask-folder layout, ``folders``: class folders):
    generated when missing, reused when ``out`` holds the same set."""
    if masks and folders:
        raise ValueError("masks and folders: one layout at a time")
    out = Path(out)
    spec: dict[str, Any] = {"generator": "benchmarks.shapes", "train": train, "val": val, "seed": seed}
    if masks or folders:
        spec["layout"] = "masks" if masks else "folders"
    if out.exists():
        marker = out / MARKER
        if out.is_dir() and marker.is_file() and json.loads(marker.read_text()) == spec:
            return out
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            raise FileExistsError(f"--out {out}: exists and is not this generator's set for train={train} val={val} "
                             f"seed={seed}; give a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        rng = np.random.default_rng(seed)
        write = _write_mask_split if masks else _write_folder_split if folders else _write_split
        write(tmp, "train", train, rng)
        write(tmp, "val", val, rng)
        (tmp / MARKER).write_text(json.dumps(spec))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def recipe_flags(root: str | Path) -> list[str]:
    """The ``--set`` values that point a detection recipe at the set in ``root``."""
    root = Path(root).resolve()
    return ["data.dataset=coco", f"data.train_ann={root / 'train.json'}", f"data.train_images={root / 'train'}",
            f"data.val_ann={root / 'val.json'}", f"data.val_images={root / 'val'}"]


def segment_flags(root: str | Path) -> list[str]:
    """The ``python -m tasks.segment`` flags for the mask-folder set in ``root``."""
    root = Path(root).resolve()
    return ["--train-images", str(root / "train" / "images"), "--train-masks", str(root / "train" / "masks"),
            "--val-images", str(root / "val" / "images"), "--val-masks", str(root / "val" / "masks"),
            "--classes", str(root / "classes.txt")]


def folder_flags(root: str | Path) -> list[str]:
    """The ``python -m tasks.classify`` flags for the class-folder set in ``root``."""
    root = Path(root).resolve()
    return ["--train-images", str(root / "train"), "--val-images", str(root / "val")]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shapes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--masks", action="store_true", help="mask folders for segmentation instead of COCO boxes")
    layout.add_argument("--folders", action="store_true", help="class folders for classification instead of COCO boxes")
    args = p.parse_args(argv)
    if args.train < 1 or args.val < 1:
        p.error("--train and --val: expected at least 1 image each")
    try:
        root = ensure_shapes(args.out, args.train, args.val, args.seed, masks=args.masks, folders=args.folders)
    except OSError as e:
        p.exit(2, f"error: {e}\n")
    flags = (folder_flags(root) if args.folders else segment_flags(root) if args.masks
             else [f"--set {f}" for f in recipe_flags(root)])
    print(" ".join(flags))


if __name__ == "__main__":
    sys.exit(main())
