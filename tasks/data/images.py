"""Pixels in: image and mask files, the inputs a user hands the Python API, and batch padding.

Everything here returns HWC uint8 arrays (``H x W x C``, C = 1 for gray, 3 for RGB) and
names the file or input it could not use. Two readers of one file see the same pixels:
every path decodes with OpenCV.

Files are read as bytes and decoded from memory (``cv2.imdecode``): ``cv2.imread`` crashes the
process (a segfault) on a file name that is not valid UTF-8. Before anything is decoded the
header is checked: an empty or truncated PNG / JPEG (no end marker: an interrupted copy) is
refused, and so is an image of more than ``max_image_pixels()`` pixels (a "decompression
bomb": a PNG of a few hundred bytes can claim 100000 x 69000 pixels, 6.9 GB to decode).

EXIF orientation: dataset readers keep the stored pixel order (COCO boxes and VOC masks refer
to it); ``read_image(..., exif=True)``, what ``--predict`` and ``tasks.load(...).predict`` use,
turns phone photos upright first, as an image viewer shows them.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

__all__ = ["ImageReadError", "MaskError", "read_image", "read_mask", "read_image_size", "exif_orientation",
           "apply_orientation", "image_from_input", "pad_batch", "load_skipping_bad", "Unusable",
           "with_skip_hint", "display_path",
           "max_image_pixels", "cv2_single_threaded", "IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "MAX_IMAGE_PIXELS_ENV"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# The most pixels (width x height) an image file may have before it is decoded. Twice PIL's
# Image.MAX_IMAGE_PIXELS (89,478,485, a quarter GiB of RGB): the size from which PIL itself
# refuses a file as a decompression bomb. 537 MB as RGB uint8; a 100-megapixel photo fits, a
# forged header claiming gigapixels does not. OpenCV's own limit (2**30 pixels) lies above.
MAX_IMAGE_PIXELS = 178_956_970
MAX_IMAGE_PIXELS_ENV = "ONETRUNK_MAX_IMAGE_PIXELS"  # overrides it (read at each call: workers see it too)
# OpenCV prints "[ERROR ...] imdecode_(...): can't read data" lines of its own; every failure
# here becomes one error line that names the file instead
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
_MASK_MODES = ("P", "L")
_EXIF_ORIENTATION = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last chunk of every PNG: length 0, fixed CRC
_JPEG_SOI = b"\xff\xd8\xff"
# start-of-frame markers (they hold the size): C0..CF except DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@contextlib.contextmanager
def cv2_single_threaded() -> Iterator[None]:
    """cv2 with one thread inside the block: for threads that call cv2 themselves (the parallelism
    is theirs). The caller gets its threads back when the block ends. (Forks need no block: the
    hook in ``tasks/data/__init__.py`` makes every fork with cv2 at one thread.)"""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


class ImageReadError(OSError):
    """An image file exists but cannot be used: undecodable, unsupported channel count or
    dtype, or a size that disagrees with the annotation file."""


class MaskError(ValueError):
    """A mask file exists but cannot be used: wrong mode, size or class ids."""


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def display_path(path: str | bytes | os.PathLike) -> str:
    """``path`` as printable text for an error message: bytes that are not UTF-8 (a name
    ``os.fsdecode`` turned into lone surrogates) become ``\\xff`` escapes, and control
    characters (a newline in a name) their escapes, so that the message stays one line that
    any terminal or log can print."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def max_image_pixels() -> int:
    """The pixel limit: ``$ONETRUNK_MAX_IMAGE_PIXELS`` when set, else ``MAX_IMAGE_PIXELS``."""
    raw = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not raw:
        return MAX_IMAGE_PIXELS
    try:
        value = int(raw.replace("_", "").replace(",", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"${MAX_IMAGE_PIXELS_ENV}={raw!r}: expected a positive number of pixels "
                         f"(default {MAX_IMAGE_PIXELS:,})")
    return value


def _open_file(path: str | bytes | os.PathLike, what: str) -> Any:
    """``path`` opened for reading, once it is known to be a regular file of a plausible size:
    missing is a ``FileNotFoundError``; a folder, a device or pipe (``/dev/zero`` would be read
    for ever), a file larger than any image within the pixel limit could be, or an unreadable
    one an ``ImageReadError``; each names the file."""
    name = display_path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: {what} file not found") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise ImageReadError(f"{name}: cannot read the {what} file ({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(f"{name}: is a folder, not {'an' if what[0] in 'aeiou' else 'a'} {what} file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(f"{name}: not a regular file (a device, pipe or socket), not {what} data")
    # 16-bit RGBA stored raw takes 8 bytes a pixel; anything larger than that at the pixel limit
    # (plus room for metadata) is no image this would decode, and is not read into memory
    most = 8 * max_image_pixels() + (64 << 20)
    if st.st_size > most:
        raise ImageReadError(f"{name}: {st.st_size:,} bytes, more than any {what} within the pixel limit "
                             f"({max_image_pixels():,}; ${MAX_IMAGE_PIXELS_ENV} raises it) can take")
    try:
        return open(path, "rb")
    except OSError as e:
        raise ImageReadError(f"{name}: cannot read the {what} file ({e.strerror or type(e).__name__})") from None


def _read_bytes(path: str | bytes | os.PathLike, what: str) -> bytes:
    """The whole file (``_open_file``'s checks first)."""
    with _open_file(path, what) as f:
        try:
            return f.read()
        except OSError as e:
            raise ImageReadError(f"{display_path(path)}: cannot read the {what} file "
                                 f"({e.strerror or type(e).__name__})") from None


def _jpeg_header(data: bytes) -> tuple[tuple[int, int] | None, bool]:
    """``((width, height) or None, complete)`` of a JPEG, from its marker segments: the size is
    in the start-of-frame segment, and a complete file has the end-of-image marker FF D9 after
    the first scan (inside scan data an FF byte is always followed by 00 or a restart marker,
    so FF D9 there can only be the end; any EXIF thumbnail, with its own FF D9, comes before)."""
    size, i, n = None, 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return size, True  # not a marker where one must be: not ours to judge, OpenCV decides
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker == 0xD9:  # end of image before any scan
            return size, True
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _JPEG_SOF and i + 9 <= n:
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            size = (width, height) if width and height else None
        if marker == 0xDA:  # start of scan: entropy-coded data up to the end marker
            return size, data.rfind(b"\xff\xd9") > i + 2 + length
        i += 2 + length
    return size, False  # the file ends inside its headers


def _pil_open(fp: Any) -> Any:
    """A PIL image opened lazily (the header only) from a file object, without PIL's own
    decompression-bomb check, which warns from 89 M pixels and refuses from 178 M whatever
    ``$ONETRUNK_MAX_IMAGE_PIXELS`` says: every caller has checked the size against that first.
    PNG (masks) goes to its plugin directly; other formats through ``Image.open`` with only
    that warning silenced."""
    from PIL import Image, PngImagePlugin

    fp.seek(0)
    head = fp.read(8)
    fp.seek(0)
    if head == _PNG_SIGNATURE:
        return PngImagePlugin.PngImageFile(fp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(fp)


def _header_size(fp: Any, head: bytes) -> tuple[tuple[int, int] | int | None, bool]:
    """``(size, complete)`` from the first bytes ``head`` of a file (all of it, for the
    completeness check). ``size``: ``(width, height)``; a pixel count alone where PIL refused
    to say more (over twice its own limit); None for a format neither this nor PIL parses
    (OpenCV may still decode it; its own pixel limit then applies). PNG and JPEG are parsed
    here (the hot path: microseconds), other formats by PIL's header parsers."""
    if head.startswith(_PNG_SIGNATURE):
        if len(head) < 24 or head[12:16] != b"IHDR":
            return None, True  # not a valid PNG: OpenCV says so
        return struct.unpack(">II", head[16:24]), head.rfind(_PNG_IEND) > 0
    if head.startswith(_JPEG_SOI):
        return _jpeg_header(head)
    from PIL import Image

    try:
        with _pil_open(fp) as im:
            return im.size, True
    except Image.DecompressionBombError as e:  # "Image size (N pixels) exceeds limit of ..."
        match = re.search(r"\((\d+) pixels\)", str(e))
        return (int(match.group(1)) if match else None), True
    except Exception:  # noqa: BLE001 - a header PIL cannot parse: OpenCV decides
        return None, True


def _check_header(data: bytes, name: str) -> None:
    """Refuse ``data`` before decoding: empty, a truncated PNG / JPEG, or more pixels than the
    limit. Costs a few microseconds for PNG and JPEG; nothing is decoded."""
    if not data:
        raise ImageReadError(f"{name}: empty file (0 bytes)")
    size, complete = _header_size(io.BytesIO(data), data)
    if not complete:
        kind = "PNG" if data.startswith(_PNG_SIGNATURE) else "JPEG"
        raise ImageReadError(f"{name}: truncated {kind} file (its end marker is missing: an interrupted copy or "
                             f"download?)")
    if size is None:
        return
    pixels = size if isinstance(size, int) else size[0] * size[1]
    limit = max_image_pixels()
    if pixels > limit:
        shape = "" if isinstance(size, int) else f"{size[0]}x{size[1]} = "
        raise ImageReadError(f"{name}: {shape}{pixels:,} pixels, over the limit of {limit:,} (a decompression "
                             f"bomb, or an image too large to decode safely; ${MAX_IMAGE_PIXELS_ENV} raises it)")


def read_image_size(path: str | bytes | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header alone: nothing decoded, no limit
    applied (``read_image`` refuses what is too large). ``ImageReadError`` naming the file
    when the header gives no size."""
    name = display_path(path)
    with _open_file(path, "image") as f:
        try:
            head = f.read(1 << 16)
            size, _ = _header_size(f, head)
            if size is None and head.startswith(_JPEG_SOI):  # metadata longer than the first 64 KiB
                f.seek(0)
                size, _ = _jpeg_header(f.read())
        except OSError as e:
            raise ImageReadError(f"{name}: cannot read the image file ({e.strerror or type(e).__name__})") from None
    if isinstance(size, int):
        raise ImageReadError(f"{name}: {size:,} pixels, more than PIL reads the size of")
    if size is None:
        raise ImageReadError(f"{name}: no image size in its header (not a PNG, JPEG or other image format PIL "
                             f"reads)")
    return size[1], size[0]


def exif_orientation(path: str | os.PathLike) -> int:
    """The EXIF orientation tag of an image file (1 = stored upright; 1 when absent or unreadable)."""
    try:
        with _open_file(path, "image") as f:
            return _exif_orientation(f)
    except OSError:
        return 1


def _exif_orientation(fp: Any) -> int:
    try:
        with _pil_open(fp) as im:  # reads the header only
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


def read_image(path: str | bytes | os.PathLike, channels: int = 3, *, exif: bool = False) -> np.ndarray:
    """Any image OpenCV decodes as ``H x W x channels`` uint8: RGB for 3, luminance for 1
    (gray, colour, colour + alpha and 16-bit files alike; alpha is dropped).

    ``exif``: turn the pixels upright by the file's EXIF orientation (off for datasets, whose
    annotations refer to the stored pixel grid). Empty, truncated and oversized files
    (``max_image_pixels``) are refused from their header, before decoding."""
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: images are read as 1 (gray) or 3 (RGB) channels")
    name = display_path(path)
    data = _read_bytes(path, "image")
    _check_header(data, name)
    # IMREAD_UNCHANGED keeps bit depth and alpha so they are converted on purpose, and skips
    # OpenCV's own EXIF rotation (applied below only when asked for)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:  # OpenCV's own size limits (formats whose header is not checked above)
        reason = "over OpenCV's image size limits ($OPENCV_IO_MAX_IMAGE_PIXELS)" \
            if "CV_IO_MAX_IMAGE" in str(e) else (str(e).strip().splitlines() or ["OpenCV error"])[-1]
        raise ImageReadError(f"{name}: cannot decode image ({reason})") from None
    if image is None:
        raise ImageReadError(f"{name}: cannot decode image (corrupt, truncated or not an image format "
                             f"OpenCV reads: {', '.join(IMAGE_EXTENSIONS)})")
    image = _convert_channels(_to_8bit(image, name), channels, name, order="BGR")
    if exif:
        image = apply_orientation(image, _exif_orientation(io.BytesIO(data)))
    return image


def read_mask(path: str | bytes | os.PathLike) -> np.ndarray:
    """A label-map PNG as an HW uint8 array of class ids.

    'P' (palette) masks give their palette *indices*, as PASCAL VOC stores classes: converting
    them to RGB or gray would give colours, not classes. 'L' masks give their gray levels.
    The header is checked as ``read_image`` checks it (truncated, oversized).
    """
    name = display_path(path)
    data = _read_bytes(path, "mask")
    _check_header(data, name)
    try:
        with _pil_open(io.BytesIO(data)) as im:
            if im.mode not in _MASK_MODES:
                raise MaskError(f"{name}: mask mode {im.mode!r}, expected a palette ('P', the index is "
                                f"the class) or 8-bit gray ('L') PNG of class ids; colour-coded masks "
                                f"must be converted to class ids first")
            return np.array(im, dtype=np.uint8)
    except MaskError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL's many errors for undecodable files: OSError, SyntaxError ...
        raise ImageReadError(f"{name}: cannot decode mask ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


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
        label = f"{name} ({display_path(item)})"
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


class Unusable:
    """The samples a dataset found unusable under ``skip_bad``, one flag per sample in shared
    memory: the DataLoader's workers (forked or spawned, and started afresh each epoch) and the
    process that made the dataset see the same flags. So a bad file is read, warned about and
    counted once in a run, not once per epoch and worker, and the run can name every one at its
    end (iterating yields their ``name(index)``). Made in the dataset's ``__init__``, before any
    worker starts."""

    def __init__(self, size: int, name: Callable[[int], str]) -> None:
        self.flags = torch.zeros(max(size, 1), dtype=torch.bool).share_memory_()
        self.name = name

    def __contains__(self, index: int) -> bool:
        return bool(self.flags[index])

    def add(self, index: int) -> None:
        self.flags[index] = True

    def __iter__(self) -> Iterator[str]:
        return (self.name(i) for i in self.flags.nonzero().flatten().tolist())


def with_skip_hint(e: BaseException) -> BaseException:
    """``e`` again (same type), its message ending with how to skip such images instead."""
    return type(e)(f"{e}; --set data.skip_bad=true skips unreadable images")


def load_skipping_bad(load: Callable[[int], Any], index: int, size: int, errors: tuple[type, ...],
                      stats: dict[str, int], source: str, *, replace: bool = True,
                      unusable: Unusable | None = None) -> Any:
    """``load(index)``, or, when it raises one of ``errors``, the next sample (wrapping round)
    that loads (``replace``: training, whose batches keep their size) or None (evaluation: the
    sample leaves the evaluation, which the collate functions drop, so that no image is scored
    twice or under another image's id). Each failure is warned about, counted in
    ``stats["unreadable"]`` and flagged in ``unusable``, whose samples are passed over without
    being read again; a dataset with no usable sample at all raises ``ImageReadError`` naming
    ``source``."""
    def failed(i: int, e: BaseException, what: str) -> None:
        stats["unreadable"] += 1
        if unusable is not None:
            unusable.add(i)
        warnings.warn(f"{what}: {e}", stacklevel=4)

    if not replace:
        if unusable is not None and index in unusable:
            return None
        try:
            return load(index)
        except errors as e:
            failed(index, e, "left out of the evaluation, unusable")
            return None
    for attempt in range(size):
        i = (index + attempt) % size
        if unusable is not None and i in unusable:
            continue
        try:
            return load(i)
        except errors as e:
            failed(i, e, "skipping unusable sample")
    raise ImageReadError(f"{display_path(source)}: none of the {size} samples could be used")
