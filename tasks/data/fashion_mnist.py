"""Fashion-MNIST from its four IDX files (60k train / 10k test, 28x28 grayscale, 10 classes).

The files are looked for in ``data_dir`` (``--data-dir``), ``$FASHION_MNIST_DIR``,
``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package ``dataset-fashion-mnist``) and
``~/.cache/onetrunk/fashion-mnist``; nothing is downloaded unless asked (``download()``).
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from .subset import subset_indices

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
# The largest IDX payload read: Fashion-MNIST's largest file holds 47 MB (60000 x 28 x 28)
_MAX_IDX_BYTES = 1 << 30


class IDXError(ValueError):
    """An IDX file is truncated, has a wrong magic number or unexpected dimensions."""


def read_idx(path: str | os.PathLike, expect_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a uint8 array, validating its header.

    The header is read first and only as many bytes as it announces (plus one, to tell a file
    that holds more) are decompressed, so a small gzip file that inflates to gigabytes (a
    decompression bomb) costs no more memory than its header claims, itself at most
    ``_MAX_IDX_BYTES``."""
    path = Path(path)
    name = os.fsencode(path).decode("utf-8", "backslashreplace")  # printable, whatever the name's bytes
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            head = f.read(4)
            ndim = head[3] if len(head) == 4 else 0
            head += f.read(4 * ndim)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != _UBYTE:
                gz = " (it is gzip-compressed: name it .gz)" if head[:2] == b"\x1f\x8b" else ""
                raise IDXError(f"{name}: not an unsigned-byte IDX file (magic bytes {head[:4].hex() or 'missing'}, "
                               f"expected 000008xx){gz}")
            if expect_ndim is not None and ndim != expect_ndim:
                raise IDXError(f"{name}: has {ndim} dimensions, expected {expect_ndim}")
            header = 4 + 4 * ndim
            if len(head) < header:
                raise IDXError(f"{name}: truncated header")
            shape = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
            size = math.prod(shape)
            if size > _MAX_IDX_BYTES:
                raise IDXError(f"{name}: its header claims {list(shape)} = {size:,} bytes, more than any "
                               f"Fashion-MNIST file (limit {_MAX_IDX_BYTES:,}): not a Fashion-MNIST file")
            body = _read_at_most(f, size + 1)
    except IDXError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # gzip raises these on corrupt / truncated streams
        raise IDXError(f"{name}: cannot read IDX file ({e})") from None
    if len(body) != size:
        raise IDXError(f"{name}: {header + len(body)}{'+' if len(body) > size else ''} bytes but its header "
                       f"{list(shape)} needs {header + size} (truncated or wrong file)")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _read_at_most(f, n: int) -> bytes:
    """Up to ``n`` bytes of ``f``, in chunks: one ``read(n)`` would reserve all ``n`` at once."""
    chunks, left = [], n
    while left > 0:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


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
            shown = os.fsencode(folder).decode("utf-8", "backslashreplace")
            raise FileNotFoundError(f"--data-dir {shown} does not hold the Fashion-MNIST IDX files. {HOW_TO_GET}")
        return folder
    candidates = [os.environ.get("FASHION_MNIST_DIR"), SYSTEM_DIR, CACHE_DIR]
    for c in candidates:
        if c and _has_files(Path(c)):
            return Path(c)
    searched = ", ".join(str(c) for c in candidates if c)
    raise FileNotFoundError(f"Fashion-MNIST not found (searched {searched}). {HOW_TO_GET}")


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None,
                       limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of ``split`` ("train" or "test");
    ``limit``: a class-balanced random subset of that many, drawn with ``seed``."""
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
        keep = subset_indices(len(labels), limit, seed, labels)
        images, labels = images[keep], labels[keep]
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def download(dest: str | os.PathLike = CACHE_DIR) -> Path:
    """Fetch the files through torchvision (needs internet) into ``dest``."""
    from torchvision.datasets import FashionMNIST

    dest = Path(dest)
    for train in (True, False):
        try:
            FashionMNIST(str(dest / "_torchvision"), train=train, download=True)
        except Exception as e:  # noqa: BLE001 - URLError, RuntimeError ("Error downloading ..."), bad checksum
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            reason = f"{type(e).__name__}: {' '.join(lines)[:300]}" if lines else type(e).__name__
            raise FileNotFoundError(f"Fashion-MNIST download into {dest} failed ({reason}). {HOW_TO_GET}") from None
    raw = dest / "_torchvision" / "FashionMNIST" / "raw"
    for imgs, lbls, _ in SPLITS.values():
        for stem in (imgs, lbls):
            (dest / (stem + ".gz")).write_bytes((raw / (stem + ".gz")).read_bytes())
    return dest
