"""Fashion-MNIST from its four IDX files (60k train / 10k test, 28x28 grayscale, 10 classes).

The files are looked for in ``data_dir`` (``--data-dir``), ``$FASHION_MNIST_DIR``,
``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package ``dataset-fashion-mnist``) and
``~/.cache/onetrunk/fashion-mnist``; nothing is downloaded unless asked (``download()``).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["CLASSES", "MEAN", "STD", "IDXError", "read_idx", "find_data_dir", "load_fashion_mnist", "download"]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Statistics of the train images in [0, 1]: inputs are normalised with these.
MEAN, STD = 0.2860, 0.3530
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
CACHE_DIR = Path.home() / ".cache" / "onetrunk" / "fashion-mnist"
HOW_TO_GET = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (puts it in "
    f"{SYSTEM_DIR}), point --data-dir or $FASHION_MNIST_DIR at a folder holding the four IDX "
    "files (train-images-idx3-ubyte.gz, ...), or, when online, rerun with --download.")
# IDX type codes (third magic byte) we accept: unsigned bytes only, as Fashion-MNIST uses.
_UBYTE = 0x08


class IDXError(ValueError):
    """An IDX file is truncated, has a wrong magic number or unexpected dimensions."""


def read_idx(path: str | os.PathLike, expect_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a uint8 array, validating its header."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip raises these on corrupt / truncated streams
        raise IDXError(f"{path}: cannot read IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _UBYTE:
        raise IDXError(f"{path}: not an unsigned-byte IDX file (magic bytes {data[:4].hex() or 'missing'}, "
                       f"expected 000008xx)")
    ndim = data[3]
    if expect_ndim is not None and ndim != expect_ndim:
        raise IDXError(f"{path}: has {ndim} dimensions, expected {expect_ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{path}: truncated header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) + header
    if len(data) != expected:
        raise IDXError(f"{path}: {len(data)} bytes but its header {list(shape)} needs {expected} "
                       f"(truncated or wrong file)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_files(folder: Path) -> bool:
    return all(_find_file(folder, s) for imgs, lbls, _ in SPLITS.values() for s in (imgs, lbls))


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The first folder in the search order that holds all four files."""
    if data_dir is not None:
        folder = Path(data_dir)
        if not _has_files(folder):
            raise FileNotFoundError(f"--data-dir {folder} does not hold the Fashion-MNIST IDX files. {HOW_TO_GET}")
        return folder
    candidates = [os.environ.get("FASHION_MNIST_DIR"), SYSTEM_DIR, CACHE_DIR]
    for c in candidates:
        if c and _has_files(Path(c)):
            return Path(c)
    searched = ", ".join(str(c) for c in candidates if c)
    raise FileNotFoundError(f"Fashion-MNIST not found (searched {searched}). {HOW_TO_GET}")


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None,
                       limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of ``split`` ("train" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {list(SPLITS)}")
    folder = find_data_dir(data_dir)
    img_stem, lbl_stem, _ = SPLITS[split]
    img_path, lbl_path = _find_file(folder, img_stem), _find_file(folder, lbl_stem)
    images = read_idx(img_path, expect_ndim=3)
    labels = read_idx(lbl_path, expect_ndim=1)
    if len(images) != len(labels):
        raise IDXError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASSES):
        raise IDXError(f"{lbl_path}: label {labels.max()} out of range 0..{len(CLASSES) - 1}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def download(dest: str | os.PathLike = CACHE_DIR) -> Path:
    """Fetch the files through torchvision (needs internet) into ``dest``."""
    from torchvision.datasets import FashionMNIST

    dest = Path(dest)
    for train in (True, False):
        FashionMNIST(str(dest / "_torchvision"), train=train, download=True)
    raw = dest / "_torchvision" / "FashionMNIST" / "raw"
    for imgs, lbls, _ in SPLITS.values():
        for stem in (imgs, lbls):
            (dest / (stem + ".gz")).write_bytes((raw / (stem + ".gz")).read_bytes())
    return dest
