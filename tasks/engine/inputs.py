"""What ``--predict`` and ``Predictor.predict`` take, expanded into the images they predict.

A path argument is, checked in this order:

* an existing folder: its image and video files, recursively, sorted; hidden files and folders
  (names starting with '.') ignored, other files skipped with one warning naming them, as the
  dataset readers do (``tasks.data.folders.list_images``);
* an existing ``.txt`` file: a list, one path per line, relative paths relative to the list
  file's folder, blank lines and ``#`` lines ignored; an entry is an image, a video, a folder
  or a pattern (lists do not nest);
* an existing video file (``VIDEO_EXTENSIONS``): its frames through ``cv2.VideoCapture``,
  every ``video_stride``-th, each an input named ``<video>#frame<N>`` whose outputs are named
  ``<video stem>_frame<N>`` (N counts from 0 in the video, skipped frames included);
* any other existing file: an image (checked and decoded later, as a single file always was);
* a path that does not exist but holds ``*``, ``?`` or ``[``: a glob pattern (``**`` spans
  folders; hidden names match only a pattern that spells the dot), its image and video files,
  sorted;
* anything else: a missing file, reported when it is read (as before).

A pattern that matches no image or video, a folder without one, a list entry that does not
exist and a video OpenCV cannot read are one error naming them (``FileNotFoundError`` /
``ValueError``), raised while expanding, before any model work.

Nothing is decoded while expanding: files stay paths and videos become ``Video`` objects
(opened once, to check them and read their frame count). ``decode_inputs`` then decodes one
image or frame at a time, so memory holds what its caller keeps, never a folder or a video.
"""
from __future__ import annotations

import glob
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import cv2
import numpy as np

from tasks.data.folders import list_images, warn_skipped_files
from tasks.data.images import IMAGE_EXTENSIONS, display_path, image_from_input

__all__ = ["VIDEO_EXTENSIONS", "LIST_EXTENSION", "Video", "Source", "expand", "decode_inputs", "expected_images",
           "item_path"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
LIST_EXTENSION = ".txt"
_USABLE = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
_PATTERN = re.compile(r"[*?[]")

# FFmpeg (OpenCV's video reader) prints lines of its own for a file it cannot open ("moov atom
# not found"); each failure here is one error that names the file instead. FFmpeg reads this
# when OpenCV first opens a video, so it is set on import; a user's own setting wins.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET


class Video:
    """A video file's frames, every ``stride``-th, decoded one at a time while iterated
    (``frames()``). Made only for a file OpenCV opens and reads a first frame of, else a
    ``ValueError`` naming it. ``frame_count``: what the container reports, None when it
    reports nothing (a stream without an index): the progress bar then has no total."""

    def __init__(self, path: str, stride: int = 1) -> None:
        self.path, self.stride = path, stride
        name = display_path(path)
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:  # cv2.VideoCapture segfaults on such a name (OpenCV 5.1)
            raise ValueError(f"{name}: OpenCV cannot open a video whose file name is not valid UTF-8; "
                             f"rename it") from None
        cap = cv2.VideoCapture(path)
        try:
            readable = cap.isOpened() and cap.read()[0]
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if readable else 0
        finally:
            cap.release()
        if not readable:
            raise ValueError(f"{name}: cannot read this video (OpenCV decodes no frame of it: damaged, empty, or "
                             f"a codec this OpenCV build lacks)")
        self.frame_count = count if count > 0 else None

    @property
    def stem(self) -> str:
        return Path(self.path).stem

    def expected(self) -> int | None:
        """How many frames ``frames()`` should give (the container's count may be off)."""
        return None if self.frame_count is None else math.ceil(self.frame_count / self.stride)

    def frames(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(frame number, BGR frame)``; skipped frames are grabbed, not decoded."""
        cap = cv2.VideoCapture(self.path)
        try:
            number = 0
            while True:
                if number % self.stride:
                    if not cap.grab():
                        return
                else:
                    ok, frame = cap.read()
                    if not ok:
                        return
                    yield number, frame
                number += 1
        finally:
            cap.release()

    def __repr__(self) -> str:
        return f"Video({self.path!r}, stride={self.stride}, frames={self.frame_count})"


class Source(NamedTuple):
    """Where one image came from."""

    index: int                # its input's position in the expanded inputs (a video counts once)
    name: str                 # how results and errors name it: the path, "input 3", "<video>#frame<N>"
    stem: str                 # the base of its output file names
    video: str | None = None  # a video frame: the video file ...
    frame: int | None = None  # ... and the frame's number in it


def item_path(item: Any) -> str | None:
    """The file an expanded input reads (a path, a video's path), or None (in memory)."""
    if isinstance(item, Video):
        return item.path
    if isinstance(item, (str, os.PathLike)):
        return os.fsdecode(os.fspath(item))
    return None


def expand(inputs: Iterable[Any], *, video_stride: int = 1, exclude: str | os.PathLike | None = None) -> list[Any]:
    """Each path argument as the files (``str``) and videos (``Video``) it names (see the
    module's docstring); other inputs (arrays, PIL images, tensors, ``Video`` objects) as
    given. ``exclude``: a folder (the output folder) whose files folders and patterns leave
    out, with one warning each; an argument inside it is kept, for the caller to name."""
    root = Path(exclude).resolve() if exclude is not None else None
    items: list[Any] = []
    for item in inputs:
        if isinstance(item, (str, os.PathLike)):
            items.extend(_expand_path(os.fsdecode(os.fspath(item)), video_stride, root, lists=True))
        else:
            items.append(item)
    return items


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _inside(path: str, root: Path | None) -> bool:
    if root is None:
        return False
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop: reported when it is read
        return False
    return resolved == root or root in resolved.parents


def _files(found: Sequence[str], stride: int) -> list[Any]:
    return [Video(p, stride) if _suffix(p) in VIDEO_EXTENSIONS else p for p in found]


def _leave_out_outputs(found: list[str], root: Path | None, what: str) -> tuple[list[str], int]:
    """``found`` without the files inside the output folder ``root`` (an earlier prediction's
    outputs: never read as inputs), and how many were left out (warned, once)."""
    kept = [p for p in found if not _inside(p, root)]
    n = len(found) - len(kept)
    if n:
        warnings.warn(f"{what}: leaving out {n} file{'s' if n > 1 else ''} inside the output folder {root} (an earlier "
                      f"prediction's outputs are not read as inputs)", stacklevel=4)
    return kept, n


def _expand_path(path: str, stride: int, root: Path | None, *, lists: bool) -> list[Any]:
    if os.path.isdir(path):
        if _inside(path, root):
            return [path]  # the caller names it as inside the output folder
        return _folder(path, stride, root)
    if os.path.isfile(path):
        suffix = _suffix(path)
        if suffix == LIST_EXTENSION and lists:
            return _list_file(path, stride, root)
        if suffix in VIDEO_EXTENSIONS:
            return [Video(path, stride)]
        return [path]
    if _PATTERN.search(path) and not os.path.lexists(path):
        return _pattern(path, stride, root)
    return [path]


def _folder(path: str, stride: int, root: Path | None) -> list[Any]:
    name = display_path(path)
    found, skipped = list_images(Path(path), _USABLE)
    kept, outputs = _leave_out_outputs([str(p) for p in found], root, name)
    skipped = [p for p in skipped if not _inside(str(p), root)]  # an earlier run's JSON files are no news
    warn_skipped_files(Path(path), skipped, _USABLE, stacklevel=5)
    if not kept:
        raise ValueError(f"{name}: a folder with no image or video files ({'/'.join(_USABLE)}) in it or its "
                         f"subfolders" + (" outside the output folder" if outputs else "")
                         + (f"; {len(skipped)} other file(s)" if skipped else ""))
    return _files(kept, stride)


def _pattern(pattern: str, stride: int, root: Path | None) -> list[Any]:
    name = display_path(pattern)
    matched = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    found = [p for p in matched if _suffix(p) in _USABLE]
    skipped = [Path(p) for p in matched if _suffix(p) not in _USABLE and not _inside(p, root)]
    # the folder the matches are under: the pattern's leading components without wildcards
    warn_skipped_files(Path(*_literal_parts(pattern)), skipped, _USABLE, stacklevel=5)
    kept, outputs = _leave_out_outputs(found, root, name)
    if not kept:
        what = ("only files inside the output folder" if outputs else
                f"no image or video file ({len(skipped)} other file(s))" if skipped else "no file")
        raise FileNotFoundError(f"{name}: no such file, and as a pattern it matches {what}")
    return _files(kept, stride)


def _literal_parts(pattern: str) -> list[str]:
    parts = []
    for part in Path(pattern).parts[:-1]:
        if _PATTERN.search(part):
            break
        parts.append(part)
    return parts


def _list_file(path: str, stride: int, root: Path | None) -> list[Any]:
    name = display_path(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{name}: a .txt input is a list of paths, one a line, and this one is not UTF-8 "
                         f"text") from None
    base = os.path.dirname(path)
    items: list[Any] = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        where = f"{name} line {number}"
        entry = os.path.expanduser(entry)
        full = os.path.join(base, entry)  # an absolute entry stays as it is
        if os.path.isfile(full) and _suffix(full) == LIST_EXTENSION:
            raise ValueError(f"{where}: {display_path(entry)} is a list file; lists do not nest")
        if not os.path.lexists(full) and not _PATTERN.search(entry):
            raise FileNotFoundError(f"{where}: {display_path(entry)}: no such file"
                                    + (f" ({display_path(full)})" if base else ""))
        try:
            if os.path.lexists(full):
                items.extend(_expand_path(full, stride, root, lists=False))
            else:  # a pattern: wildcards in the list file's own folder name are literal
                items.extend(_pattern(os.path.join(glob.escape(base), entry), stride, root))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{where}: {e}") from None
    if not items:
        raise ValueError(f"{name}: a list with no paths in it (only blank lines and # comments)")
    return items


def expected_images(items: Sequence[Any]) -> int | None:
    """How many images ``items`` give (a video: its frames), None when a video does not say."""
    total = 0
    for item in items:
        n = item.expected() if isinstance(item, Video) else 1
        if n is None:
            return None
        total += n
    return total


def _frame_pixels(frame: np.ndarray, channels: int) -> np.ndarray:
    """An OpenCV BGR (or gray) frame as ``H x W x channels`` RGB / gray uint8."""
    if frame.ndim == 2:
        return frame[:, :, None] if channels == 1 else cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    code = cv2.COLOR_BGR2GRAY if channels == 1 else cv2.COLOR_BGR2RGB
    pixels = cv2.cvtColor(frame, code)
    return pixels[:, :, None] if channels == 1 else pixels


def decode_inputs(items: Iterable[tuple[int, Any]], channels: int) -> Iterator[tuple[Source, np.ndarray | Exception]]:
    """``(source, image)`` for each ``(index, item)``, one image decoded at a time: a file
    (EXIF orientation applied), each frame of a video, an input already in memory (as it is).
    A file that cannot be read gives its error (``ValueError`` / ``FileNotFoundError``, naming
    it) in place of the image: the caller raises it or reports it and goes on."""
    for index, item in items:
        if isinstance(item, Video):
            for number, frame in item.frames():
                yield (Source(index, f"{item.path}#frame{number}", f"{item.stem}_frame{number}", item.path, number),
                       _frame_pixels(frame, channels))
        elif isinstance(item, (str, os.PathLike)):
            path = os.fsdecode(os.fspath(item))
            try:
                image: np.ndarray | Exception = image_from_input(item, channels, f"input {index}")
            except (ValueError, FileNotFoundError) as e:
                image = e
            yield Source(index, path, Path(path).stem), image
        else:
            yield Source(index, f"input {index}", f"input{index}"), item
