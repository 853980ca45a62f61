"""Small synthetic datasets written by tests (nothing is downloaded or read from the system)."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file (gzip when the name ends in .gz)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def fake_fashion_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 images whose class is a bright bar at a class-specific row: easy to learn."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 + 2 * k: 4 + 2 * k, 4:24] = 230
    return images, labels


def write_fake_fashion_mnist(folder: Path, n_train: int = 256, n_test: int = 128) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_fashion_images(n, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


# Flags that shrink a FashionScenes task run to seconds on a CPU: 24 / 8 scenes of 64 px.
TINY_SCENES = ["--set", "data.scenes_train=24", "--set", "data.scenes_val=8", "--set", "data.scenes_size=64",
               "--set", "data.image_size=64", "--set", "data.num_workers=0", "--set", "data.eval_batch_size=4"]


def tiny_scenes_args(root: Path) -> list[str]:
    """``TINY_SCENES`` plus a fake Fashion-MNIST and a scenes folder under ``root``."""
    fm = write_fake_fashion_mnist(root / "fm", n_train=64, n_test=32)
    return TINY_SCENES + ["--data-dir", str(fm), "--set", f"data.scenes_root={root / 'scenes'}"]


# Small models of every task (untrained), as a run would save them: tasks.load, export and the
# README examples read them. ``meta`` defaults to what the task's own data would give.
TINY_MODELS = {
    "classify": {"model": {"in_chans": 1, "stem": "cifar", "num_classes": 3}},
    "detect": {"model": {"fpn_channels": 32, "num_convs": 1}, "data": {"image_size": 64}},
    "segment": {"data": {"image_size": 64}},
    "multitask": {"model": {"fpn_channels": 32, "num_convs": 1}, "data": {"image_size": 64}},
}
CLASS_NAMES = ["shirt", "boot", "bag"]


def task_meta(task: str, cfg) -> dict:
    from tasks import TASKS

    spec = TASKS[task]
    names = ["background", *CLASS_NAMES] if task == "segment" else list(CLASS_NAMES)
    meta = {"class_names": names, **spec.make_preprocess(cfg).to_meta()}
    if task in ("detect", "multitask"):
        meta["category_ids"] = [1, 5, 9]
    return meta


def write_task_checkpoint(path: Path, task: str, meta: dict | None = None, seed: int = 0) -> Path:
    """A checkpoint of ``task`` with ``TINY_MODELS`` settings and random weights."""
    import torch

    from tasks import TASKS
    from tasks.engine.checkpoint import CKPT_FORMAT, atomic_save
    from tasks.engine.config import config_from_dict, config_to_dict

    spec = TASKS[task]
    cfg = config_from_dict(spec.config, TINY_MODELS[task])
    meta = meta if meta is not None else task_meta(task, cfg)
    torch.manual_seed(seed)
    model = spec.build_model(cfg, {"class_names": meta.get("class_names") or meta["classes"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"format": CKPT_FORMAT, "task": task, "config": config_to_dict(cfg), "model": model.state_dict(),
                 "ema": None, "epoch": 1, "metrics": {}, "meta": meta}, path)
    return path


def in_child(fn) -> int:
    """Run ``fn`` in a forked child: its exit status, or minus the signal that killed it (a
    segfault in a C library must fail the test, not end the whole test session)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fn()
            code = 0
        except BaseException as e:  # noqa: BLE001
            os.write(2, f"child: {type(e).__name__}: {e}\n".encode("utf-8", "backslashreplace"))
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


# ----------------------------------------------------------------------------- shared by unit and e2e tests

def checkpoints_finite(folder: Path) -> None:
    """Assert that ``last.pt`` and ``best.pt`` in ``folder`` (those that exist) hold no NaN or inf."""
    from tasks.engine.checkpoint import load_checkpoint
    from tasks.engine.guard import first_nonfinite

    for name in ("last.pt", "best.pt"):
        if (folder / name).exists():
            assert first_nonfinite(load_checkpoint(folder / name)) is None, name


TV_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1 file name


def write_torchvision_resnet18(folder: Path):
    """A seeded torchvision ResNet-18 saved in ``folder`` under ``TV_FILE``; returns the model."""
    import torch
    import torchvision

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    tv = torchvision.models.resnet18().eval()
    torch.save(tv.state_dict(), folder / TV_FILE)
    return tv


def boxed_image(h: int, w: int):
    """A dark ``h`` x ``w`` image with one bright box: the image, its 0/1 mask and the box corners."""
    img = np.full((h, w, 3), 20, np.uint8)
    x, y, bw, bh = w // 5, h // 4, w // 3, h // 2
    img[y:y + bh, x:x + bw] = 240
    mask = np.zeros((h, w), np.uint8)
    mask[y:y + bh, x:x + bw] = 1
    return img, mask, [x, y, x + bw, y + bh]


def write_odd_coco(root: Path, sizes) -> list[str]:
    """A COCO train set of ``boxed_image`` s of ``sizes`` (val: the first 3): the task's data flags."""
    import json

    import cv2

    flags = []
    for split, shapes in (("train", sizes), ("val", sizes[:3])):
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i, (h, w) in enumerate(shapes):
            img, _, (x1, y1, x2, y2) = boxed_image(h, w)
            cv2.imwrite(str(root / split / f"{i}.png"), img)
            images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
            anns.append({"id": i + 1, "image_id": i, "category_id": 5, "bbox": [x1, y1, x2 - x1, y2 - y1]})
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                        "categories": [{"id": 5, "name": "box"}]}))
        flags += [f"--{split}-ann", str(root / f"{split}.json"), f"--{split}-images", str(root / split)]
    return flags


VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192]  # index 255: the border


def write_voc_tree(root: Path, missing: str | None = None) -> Path:
    """VOCdevkit/VOC2012 with 4 images: boxes (one ``difficult``) and palette masks."""
    import xml.etree.ElementTree as ET

    import cv2
    from PIL import Image

    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("Annotations", "JPEGImages", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    ids = [f"2012_00000{i}" for i in range(4)]
    for k, stem in enumerate(ids):
        h, w = (60, 80) if k % 2 else (80, 60)
        img = np.full((h, w, 3), 30, np.uint8)
        img[10:40, 10:40] = (0, 0, 230)  # an aeroplane, say (BGR red)
        img[45:55, 15:25] = (0, 230, 0)
        cv2.imwrite(str(voc / "JPEGImages" / f"{stem}.jpg"), img)
        mask = np.zeros((h, w), np.uint8)
        mask[10:40, 10:40] = 1
        mask[9, 9:41] = 255  # VOC's object border: ignored
        m = Image.fromarray(mask, mode="P")
        m.putpalette(VOC_PALETTE)
        m.save(voc / "SegmentationClass" / f"{stem}.png")
        ann = ET.Element("annotation")
        ET.SubElement(ann, "filename").text = f"{stem}.jpg"
        size = ET.SubElement(ann, "size")
        for key, value in (("width", w), ("height", h), ("depth", 3)):
            ET.SubElement(size, key).text = str(value)
        for name, (x1, y1, x2, y2), difficult in (("aeroplane", (11, 11, 40, 40), 0), ("bicycle", (16, 46, 25, 55), 1)):
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = name
            ET.SubElement(obj, "difficult").text = str(difficult)
            box = ET.SubElement(obj, "bndbox")
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
                ET.SubElement(box, key).text = str(value)
        ET.ElementTree(ann).write(voc / "Annotations" / f"{stem}.xml")
    for kind in ("Main", "Segmentation"):
        (voc / "ImageSets" / kind / "train.txt").write_text("\n".join(ids[:3]) + "\n")
        (voc / "ImageSets" / kind / "val.txt").write_text(ids[3] + "\n")
    if missing:
        (voc / "JPEGImages" / f"{missing}.jpg").unlink()
    return root / "VOCdevkit"


def write_image_folders(root: Path, n_per_class: int = 6, size: int = 20) -> Path:
    """train/ and val/ image folders of 3 classes (cat, dog, owl), one colour channel per class: learnable."""
    import cv2

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, name in enumerate(["cat", "dog", "owl"]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n_per_class):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                img[:, :, k] += 150  # one colour channel per class: learnable
                cv2.imwrite(str(folder / f"{i}.png"), img)
    return root


# Fake Fashion-MNIST of soft blobs for the scenes generator: train items carry labels 0..4 and
# test items 5..9, so the category ids of a scene tell which split it was drawn from.
BLOB_TRAIN_LABELS, BLOB_TEST_LABELS = range(0, 5), range(5, 10)


def _blobs(rng, n):
    """uint8 [n, 28, 28] filled ellipses with soft edges, like a Fashion-MNIST item's."""
    yy, xx = np.mgrid[:28, :28]
    cy, cx = rng.uniform(10, 18, (2, n, 1, 1))
    ry, rx = rng.uniform(5, 12, (2, n, 1, 1))
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2  # [n, 28, 28], 1 on the ellipse
    return (np.clip(1.5 - d, 0, 1) * rng.uniform(120, 255, (n, 1, 1))).astype(np.uint8)


def write_blob_fashion_mnist(root: Path) -> Path:
    """50 train and 20 test blob items (``BLOB_TRAIN_LABELS`` / ``BLOB_TEST_LABELS``) as gzip IDX files."""
    rng = np.random.default_rng(0)
    for stem, n, labels in (("train", 50, BLOB_TRAIN_LABELS), ("t10k", 20, BLOB_TEST_LABELS)):
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", _blobs(rng, n))
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", rng.choice(list(labels), n))
    return root


def write_flat_image(path: Path, value: int, size: tuple[int, int] = (40, 40), gray: bool = False) -> str:
    """An image of one value (``size`` = (h, w)), its folders made; returns the path as a string."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    cv2.imwrite(str(path), np.full((h, w) if gray else (h, w, 3), value, np.uint8))
    return str(path)
