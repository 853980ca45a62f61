"""Pixels in: image and mask files, the inputs a user hands the Python API, and batch padding.

Everything here returns HWC uint8 arrays (``H x W x C``, C = 1 for gray, 3 for RGB) and
names the file or input it could not use. Two readers of one file see the same pixels:
every path decodes with OpenCV.

EXIF orientation: dataset readers keep the stored pixel order (COCO boxes and VOC masks refer
to it); ``read_image(..., exif=True)``, what ``--predict`` and ``tasks.load(...).predict`` use,
turns phone photos upright first, as an image viewer shows them.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

__all__ = ["ImageReadError", "MaskError", "read_image", "read_mask", "exif_orientation", "apply_orientation",
           "image_from_input", "pad_batch", "load_skipping_bad", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# OpenCV prints "[ WARN ...] imread_(...): can't open/read file" on its own; every failure here
# becomes an error that names the file instead
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
_MASK_MODES = ("P", "L")
_EXIF_ORIENTATION = 0x0112


class ImageReadError(OSError):
    """An image file exists but cannot be used: undecodable, unsupported channel count or
    dtype, or a size that disagrees with the annotation file."""


class MaskError(ValueError):
    """A mask file exists but cannot be used: wrong mode, size or class ids."""


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def exif_orientation(path: str | os.PathLike) -> int:
    """The EXIF orientation tag of an image file (1 = stored upright; 1 when absent or unreadable)."""
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only
            value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - no usable EXIF is "upright"; decoding errors surface in cv2
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """``image`` (HW or HWC) as shown upright for an EXIF ``orientation`` (PIL's
    ``ImageOps.exif_transpose`` table: 2 mirror, 3 rotate 180, 4 flip, 5 transpose,
    6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise)."""
    swap = (1, 0) + tuple(range(2, image.ndim))
    if orientation == 2:
        image = image[:, ::-1]
    elif orientation == 3:
        image = image[::-1, ::-1]
    elif orientation == 4:
        image = image[::-1]
    elif orientation == 5:
        image = image.transpose(swap)
    elif orientation == 6:
        image = np.rot90(image, -1)
    elif orientation == 7:
        image = np.rot90(image, 2).transpose(swap)
    elif orientation == 8:
        image = np.rot90(image, 1)
    return np.ascontiguousarray(image)


def _to_8bit(image: np.ndarray, name: str) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return cv2.convertScaleAbs(image, alpha=255.0 / 65535.0)  # full 16-bit range -> 0..255
    raise ImageReadError(f"{name}: unsupported pixel type {image.dtype} (expected 8 or 16 bit)")


def _convert_channels(image: np.ndarray, channels: int, name: str, *, order: str) -> np.ndarray:
    """HW / HWC (C = 1, 3, 4 in ``order`` "BGR" or "RGB") -> HWC with ``channels`` (1 gray, 3 RGB)."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return image[:, :, None] if channels == 1 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    c = image.shape[2]
    if c not in (3, 4):
        raise ImageReadError(f"{name}: {c} channels, expected 1 (gray), 3 (colour) or 4 (colour + alpha)")
    if channels == 3:
        code = {(3, "BGR"): cv2.COLOR_BGR2RGB, (4, "BGR"): cv2.COLOR_BGRA2RGB, (4, "RGB"): cv2.COLOR_RGBA2RGB}
        return cv2.cvtColor(image, code[c, order]) if (c, order) in code else np.ascontiguousarray(image)
    code = {(3, "BGR"): cv2.COLOR_BGR2GRAY, (4, "BGR"): cv2.COLOR_BGRA2GRAY, (3, "RGB"): cv2.COLOR_RGB2GRAY,
            (4, "RGB"): cv2.COLOR_RGBA2GRAY}
    return cv2.cvtColor(image, code[c, order])[:, :, None]


def read_image(path: str | os.PathLike, channels: int = 3, *, exif: bool = False) -> np.ndarray:
    """Any image OpenCV decodes as ``H x W x channels`` uint8: RGB for 3, luminance for 1
    (gray, colour, colour + alpha and 16-bit files alike; alpha is dropped).

    ``exif``: turn the pixels upright by the file's EXIF orientation (off for datasets, whose
    annotations refer to the stored pixel grid)."""
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: images are read as 1 (gray) or 3 (RGB) channels")
    if os.path.isdir(path):
        raise ImageReadError(f"{path}: is a folder, not an image file")
    if not os.path.isfile(path):  # before imread, which would also print its own warning line
        raise FileNotFoundError(f"{path}: image file not found")
    # IMREAD_UNCHANGED keeps bit depth and alpha so they are converted on purpose, and skips
    # OpenCV's own EXIF rotation (applied below only when asked for)
    image = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageReadError(f"{path}: cannot decode image (corrupt, truncated or not an image format "
                             f"OpenCV reads: {', '.join(IMAGE_EXTENSIONS)})")
    image = _convert_channels(_to_8bit(image, str(path)), channels, str(path), order="BGR")
    if exif:
        image = apply_orientation(image, exif_orientation(path))
    return image


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A label-map PNG as an HW uint8 array of class ids.

    'P' (palette) masks give their palette *indices*, as PASCAL VOC stores classes: converting
    them to RGB or gray would give colours, not classes. 'L' masks give their gray levels.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in _MASK_MODES:
                raise MaskError(f"{path}: mask mode {im.mode!r}, expected a palette ('P', the index is "
                                f"the class) or 8-bit gray ('L') PNG of class ids; colour-coded masks "
                                f"must be converted to class ids first")
            return np.array(im, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: mask file not found") from None
    except (OSError, SyntaxError) as e:  # PIL raises these for truncated / undecodable files
        raise ImageReadError(f"{path}: cannot decode mask ({e})") from None


# ---------------------------------------------------------------------------------------------
# Inputs of the Python API
# ---------------------------------------------------------------------------------------------

def _from_pil(image: Any, channels: int, name: str) -> np.ndarray:
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)  # a PIL image opened from a phone photo: upright, as a file
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image)
        if array.dtype != np.uint16:  # "I" is 32-bit: 16-bit PNGs open as it in some Pillow versions
            if array.min() < 0 or array.max() > 65535:
                raise ValueError(f"{name}: PIL image of mode {mode!r} with values outside 0..65535")
            array = array.astype(np.uint16)
        return _convert_channels(_to_8bit(array, name), channels, name, order="RGB")
    if mode == "F":
        raise ValueError(f"{name}: PIL image of mode 'F' (float pixels); expected 8 or 16 bit pixels")
    if mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in mode or "transparency" in image.info else "RGB")
    return _convert_channels(np.asarray(image), channels, name, order="RGB")


def _from_array(array: np.ndarray, channels: int, name: str, layout: str) -> np.ndarray:
    """``layout`` "HWC" (numpy) or "CHW" (torch): uint8 with exactly the model's channels
    (RGBA passes for a 3-channel model, alpha dropped). Arrays carry no colour mode, so they
    are taken as given, never guessed at."""
    kind = "numpy array" if layout == "HWC" else "tensor"
    if array.dtype != np.uint8:
        hint = " (scale floats to 0..255 and convert, e.g. (x * 255).round().astype(np.uint8))" \
            if np.issubdtype(array.dtype, np.floating) else ""
        raise ValueError(f"{name}: {kind} of dtype {array.dtype}, expected uint8 pixels 0..255{hint}")
    want = f"H x W x {channels}" if layout == "HWC" else f"{channels} x H x W"
    if layout == "CHW":
        if array.ndim != 3:
            raise ValueError(f"{name}: tensor of shape {list(array.shape)}, expected {want} uint8 "
                             f"(a batch [N, C, H, W] is taken as N images)")
        array = array.transpose(1, 2, 0)
    elif array.ndim == 2 and channels == 1:
        array = array[:, :, None]
    elif array.ndim != 3:
        raise ValueError(f"{name}: numpy array of shape {list(array.shape)}, expected {want} uint8"
                         + (" (a 2-D array is one gray channel; this model takes RGB: stack it, "
                            "np.stack([a] * 3, -1))" if array.ndim == 2 else ""))
    c = array.shape[2]
    if c != channels and not (channels == 3 and c == 4):
        raise ValueError(f"{name}: {kind} with {c} channel(s), this model takes {channels} "
                         f"({'RGB' if channels == 3 else 'gray'}): expected {want}")
    if 0 in array.shape[:2]:
        raise ValueError(f"{name}: {kind} of shape {list(array.shape)} has no pixels")
    return np.ascontiguousarray(array[:, :, :3] if c == 4 else array)


def image_from_input(item: Any, channels: int, name: str) -> np.ndarray:
    """One input of ``Predictor.predict`` as ``H x W x channels`` uint8 (RGB or gray):
    a file path (EXIF orientation applied), a PIL image, an ``H x W`` / ``H x W x C`` uint8
    numpy array (RGB) or a ``C x H x W`` uint8 tensor. ``name`` ("input 3") goes into errors:
    ``FileNotFoundError`` for a missing file, ``ValueError`` for anything else unusable."""
    if isinstance(item, (str, os.PathLike)):
        label = f"{name} ({os.fspath(item)})"
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"{label}: no such file")
        try:
            return read_image(path, channels, exif=True)
        except ImageReadError as e:
            raise ValueError(f"{name}: {e}") from None
    if isinstance(item, torch.Tensor):
        return _from_array(item.detach().cpu().numpy(), channels, name, "CHW")
    if isinstance(item, np.ndarray):
        return _from_array(item, channels, name, "HWC")
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL comes with torchvision
        Image = None
    if Image is not None and isinstance(item, Image.Image):
        return _from_pil(item, channels, name)
    raise ValueError(f"{name}: a {type(item).__name__}; expected a file path, a PIL image, a uint8 numpy array "
                     f"H x W x C or a uint8 tensor C x H x W")


# ---------------------------------------------------------------------------------------------
# Batches and datasets
# ---------------------------------------------------------------------------------------------

def pad_batch(tensors: Sequence[torch.Tensor], size_divisible: int = 32, fill: int = 0,
              pin_memory: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Stack ``[..., H_i, W_i]`` tensors into ``[N, ..., H, W]``, each padded bottom / right with
    ``fill`` to the largest H, W of the batch rounded up to ``size_divisible`` (every FPN level
    then divides evenly; the content stays anchored at (0, 0), so coordinates need no shift).
    ``pin_memory``: the batch in page-locked host memory (an asynchronous copy to a GPU).
    ``channels_last``: the inputs are ``[H_i, W_i, C]`` images and the result is the
    ``[N, C, H, W]`` view of an ``[N, H, W, C]`` batch: whole pixel rows are copied instead of
    a transposing copy (that one took 8 ms for 64 RGB images of 256 px on the H200 machine's
    host: the largest part of the Python API's host time for detection, by cProfile)."""
    if not tensors:
        raise ValueError("pad_batch got no tensors")
    hw = (-3, -2) if channels_last else (-2, -1)
    height = -(-max(t.shape[hw[0]] for t in tensors) // size_divisible) * size_divisible
    width = -(-max(t.shape[hw[1]] for t in tensors) // size_divisible) * size_divisible
    shape = (len(tensors), height, width, tensors[0].shape[-1]) if channels_last else \
        (len(tensors), *tensors[0].shape[:-2], height, width)
    out = torch.full(shape, fill, dtype=tensors[0].dtype, pin_memory=pin_memory)
    for i, t in enumerate(tensors):
        if channels_last:
            out[i, :t.shape[0], :t.shape[1]] = t
        else:
            out[i, ..., :t.shape[-2], :t.shape[-1]] = t
    return out.permute(0, 3, 1, 2) if channels_last else out


def load_skipping_bad(load: Callable[[int], Any], index: int, size: int, errors: tuple[type, ...],
                      stats: dict[str, int], source: str, *, replace: bool = True) -> Any:
    """``load(index)``, or, when it raises one of ``errors``, the next sample (wrapping round)
    that loads (``replace``: training, whose batches keep their size) or None (evaluation: the
    sample leaves the evaluation, which the collate functions drop, so that no image is scored
    twice or under another image's id). Each skip is counted in ``stats["unreadable"]`` and
    warned about; a dataset with no usable sample at all raises ``ImageReadError`` naming
    ``source``."""
    if not replace:
        try:
            return load(index)
        except errors as e:
            stats["unreadable"] += 1
            warnings.warn(f"left out of the evaluation, unusable: {e}", stacklevel=3)
            return None
    for attempt in range(size):
        i = (index + attempt) % size
        try:
            return load(i)
        except errors as e:
            stats["unreadable"] += 1
            warnings.warn(f"skipping unusable sample: {e}", stacklevel=3)
    raise ImageReadError(f"{source}: none of the {size} samples could be used")
