"""Small synthetic datasets written by tests (nothing is downloaded or read from the system)."""
from __future__ import annotations

import gzip
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
