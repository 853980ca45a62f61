"""A trained model for raw images: ``Predictor.predict(inputs)`` -> per-image results.

``tasks.load(ckpt)`` returns one; ``--predict`` is a thin layer over it. Inputs are file
paths (EXIF orientation applied), folders, glob patterns, ``.txt`` lists of paths and video
files (expanded by ``tasks.engine.inputs``: a folder or a video is one argument, many images),
PIL images, ``H x W`` / ``H x W x C`` uint8 numpy arrays (RGB) or ``C x H x W`` uint8
tensors, any sizes mixed. Every input is checked before any device work (a file: that it
exists and is an image format, by its header; a video: that OpenCV reads a frame of it);
files and frames are then decoded ``batch_size`` at a time, so memory stays bounded for a
folder or a video of any size (``stream`` hands each result on as its chunk is done). Each
image goes through the checkpoint's ``Preprocess`` (the one evaluation used), images whose
padded inputs have one shape are batched together (so an image's result never depends on
which other images came with it), the model runs in eval mode without gradients (bf16
autocast and channels_last on CUDA), and the task's ``decode`` maps outputs back to the
original pixels. A model (or checkpoint) holding NaN / inf is refused, and so is a batch
whose outputs do.

``predict_files`` (``--predict``) writes each input's files through a staging step: they
appear together or not at all, under names that no other input's files and no input file
have, as new files (a link in the output folder is replaced, never written through); then
``summary.json`` for the whole call and, for detection, the detections in COCO's results
format with their image table (``coco_results.json``, ``coco_images.json``).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
import os
import sys
import unicodedata
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tasks.data.images import image_from_input, read_image_size
from tasks.data.preprocess import Preprocess

from .checkpoint import load_checkpoint, model_state, new_temp, remove_stale_temps, write_error
from .config import config_from_dict
from .distributed import resolve_device
from .guard import first_nonfinite
from .inputs import Source, Video, decode_inputs, expand, expected_images, item_path
from .logging import progress as progress_bar
from .loop import autocast
from .registry import TASKS, TaskSpec, read_meta, spec_for_checkpoint
from .viz import WRITE_HOOK, write_file, write_json

__all__ = ["Predictor", "predict_images", "load_task_model", "predict_files", "check_load_arguments",
           "SUMMARY", "COCO_RESULTS", "COCO_IMAGES"]


# ----------------------------------------------------------------------------- arguments

def _positive_int(name: str, value: Any) -> int:
    # numpy integers are integers; bools are not (True would mean a batch of 1 by accident)
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and value >= 1:
        return int(value)
    raise ValueError(f"{name}={value!r}: expected a positive integer")


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name}={value!r}: expected True or False")


def _fraction(name: str, value: Any, *, top: bool, allow_none: bool = False) -> float | None:
    """A real number in [0, 1] (``top``: 1 allowed) as a float; NaN, strings and bools refused
    (a NaN threshold compares false with every score: everything would vanish silently)."""
    if value is None and allow_none:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value) \
            and 0 <= value and (value <= 1 if top else value < 1):
        return float(value)
    raise ValueError(f"{name}={value!r}: expected a number in [0, 1{']' if top else ')'}")


# The built-in tasks' predict options, checked (and made plain Python values) before any work;
# an option a task declares but this table lacks is passed on as given.
OPTION_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "topk": _positive_int,
    "score_thresh": lambda name, v: _fraction(name, v, top=True, allow_none=True),
    "tile": _flag,
    "overlap": lambda name, v: _fraction(name, v, top=False),
}


def _device(device: Any) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N``, a ``torch.device`` or a CUDA index; a CUDA
    device this machine lacks is a ``ValueError`` here, not a driver error at the first copy."""
    if device is None:
        device = "auto"
    if isinstance(device, torch.device):
        if device.type == "cuda":
            resolve_device(str(device))
        return device
    if isinstance(device, numbers.Integral) and not isinstance(device, (bool, np.bool_)):
        device = f"cuda:{int(device)}"
    if not isinstance(device, str):
        raise ValueError(f"device={device!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device")
    return resolve_device(device)


def check_load_arguments(device: Any = "auto", task: Any = None, amp: Any = True) -> None:
    """``tasks.load``'s ``device``, ``task`` and ``amp``, checked before a checkpoint is read."""
    if task is not None and (not isinstance(task, str) or task not in TASKS):
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)} (or None: any task)")
    _flag("amp", amp)
    _device(device)


def _check_finite(model: nn.Module, meta: Mapping[str, Any], name: str, which: str) -> None:
    """Refuse to predict with weights, BatchNorm statistics or a normalisation that would make
    every output NaN or inf: a run that diverged, or a file written by another tool."""
    state = model.state_dict()
    bad = first_nonfinite(state)
    if bad is not None:
        t = state[bad].detach()
        n = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: its {which} weights hold NaN or inf, first in {bad} ({n} of {t.numel()} "
                         f"values): refusing to predict with them (the run diverged? use an earlier checkpoint)")
    for key, t in state.items():
        if key.endswith("running_var") and t.is_floating_point() and bool((t < 0).any()):
            raise ValueError(f"{name}: BatchNorm statistic {key} of its {which} weights holds negative variances "
                             f"(NaN after the square root): refusing to predict with them")
    pre = Preprocess.from_meta(meta)
    if not all(math.isfinite(m) for m in pre.mean) or not all(math.isfinite(v) and v > 0 for v in pre.std):
        raise ValueError(f"{name}: its normalisation (meta mean {list(pre.mean)}, std {list(pre.std)}) is not "
                         f"finite with std > 0: refusing to predict with it")


def load_task_model(source: str | os.PathLike | Mapping[str, Any], *, task: str | None = None,
                    cfg: Any = None, name: str | os.PathLike | None = None
                    ) -> tuple[TaskSpec, nn.Module, dict[str, Any], Any]:
    """``(spec, model, meta, cfg)`` of a checkpoint file (or dict): the model on the CPU in
    eval mode with the prediction weights (the EMA when the run kept one). ``task``: refuse
    another task's checkpoint, naming both. ``cfg``: build from this config (the checkpoint's
    with a run's overrides) instead of the checkpoint's own. ``name``: the file a dict came
    from, for errors. Weights or BatchNorm statistics holding NaN / inf are refused, naming
    the file and the first bad tensor: such a model would serve NaN, or nothing, silently."""
    if not isinstance(source, (str, os.PathLike, Mapping)):
        raise ValueError(f"checkpoint: expected the path of a checkpoint file (or its loaded dict), "
                         f"got a {type(source).__name__}")
    if task is not None and (not isinstance(task, str) or task not in TASKS):
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)} (or None: any task)")
    ckpt = load_checkpoint(source) if not isinstance(source, Mapping) else source
    name = os.fspath(name) if name is not None else source if not isinstance(source, Mapping) else "checkpoint"
    spec = spec_for_checkpoint(ckpt, name, expected=task)
    if cfg is None:
        cfg = config_from_dict(spec.config, ckpt.get("config") or {}, where=f"{name} config:")
    # the checkpoint holds every weight: the trunk files the run started from may be gone
    cfg.model.weights = cfg.model.trunk = None
    meta = read_meta(ckpt, spec, cfg)
    which = "EMA" if ckpt.get("ema") is not None else "model"
    state = model_state(ckpt) if ckpt.get("ema") is not None or "model" in ckpt else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{name}: holds no model weights (no 'model' state dict)")
    model = spec.build_model(cfg, meta)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # torch lists the keys over many lines: one line of them, cut
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:])
        raise ValueError(f"{name}: its {which} weights do not fit the {spec.name} model its config describes: "
                         f"{detail[:300]}{'...' if len(detail) > 300 else ''}") from e
    _check_finite(model, meta, os.fspath(name), which)
    return spec, model.eval(), meta, cfg


_NO_INPUTS = object()  # predict() called without inputs


class Predictor:
    """``predict(inputs, batch_size=32, **options)``; ``options`` are the task's
    (``spec.predict_options``: e.g. ``topk`` for classification, ``tile`` for segmentation)."""

    def __init__(self, spec: TaskSpec, model: nn.Module, meta: Mapping[str, Any],
                 device: str | torch.device = "auto", *, amp: bool = True, channels_last: bool | None = None) -> None:
        self.spec = spec
        self.meta = dict(meta)
        self.preprocess = Preprocess.from_meta(meta)
        self.device = _device(device)
        self.amp = _flag("amp", amp) and self.device.type == "cuda"
        self.channels_last = self.device.type == "cuda" if channels_last is None else _flag("channels_last",
                                                                                             channels_last)
        model = model.to(self.device).eval()
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model

    @classmethod
    def from_checkpoint(cls, source: str | os.PathLike | Mapping[str, Any], device: str | torch.device = "auto",
                        *, task: str | None = None, amp: bool = True) -> "Predictor":
        check_load_arguments(device, task, amp)  # before the checkpoint is read and the model built
        spec, model, meta, _ = load_task_model(source, task=task)
        return cls(spec, model, meta, device, amp=amp)

    @property
    def task(self) -> str:
        return self.spec.name

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def __repr__(self) -> str:
        return (f"Predictor(task={self.task!r}, classes={len(self.class_names)}, device={self.device}, "
                f"preprocess={self.preprocess})")

    # ------------------------------------------------------------------ inputs

    def _items(self, inputs: Any, video_stride: int = 1) -> list[Any]:
        """The inputs, expanded (``inputs.expand``: folders, patterns, ``.txt`` lists, videos)
        and checked, as a list of image file paths and ``Video``s (decoded later, a chunk at a
        time) and ``H x W x in_chans`` arrays (inputs already in memory, converted once).
        Errors name an input by its position in this list ("input 3"; a video counts once)."""
        if inputs is None:
            raise ValueError("predict(None): expected file paths, PIL images, uint8 arrays or uint8 tensors "
                             "(one, or a list)")
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
            inputs = list(inputs)  # [N, C, H, W]: N images
        elif isinstance(inputs, (str, bytes, os.PathLike, np.ndarray, torch.Tensor, Mapping)) \
                or not isinstance(inputs, (Sequence, Iterator)):
            inputs = [inputs]  # one image (bytes and dicts too: named as what they are, not iterated)
        else:
            inputs = list(inputs)  # a list, a tuple, a generator
        if len(inputs) == 0:
            raise ValueError("predict() got no inputs (an empty list, or an iterator already used up): pass file "
                             "paths, PIL images, uint8 arrays or uint8 tensors")
        items = expand(inputs, video_stride=video_stride)
        return [self._check_path(x, f"input {i}") if isinstance(x, (str, os.PathLike))
                else x if isinstance(x, Video)
                else image_from_input(x, self.preprocess.in_chans, f"input {i}") for i, x in enumerate(items)]

    def _check_path(self, item: str | os.PathLike, name: str) -> str | os.PathLike:
        """A file input, checked without decoding it: it exists and its header is one of an
        image format (what decoding it would say otherwise is raised now, before any work)."""
        path = os.fsdecode(os.fspath(item))
        if path == "":
            raise ValueError(f"{name}: an empty path ''; expected the path of an image file")
        # the header alone (read_image_size), not cv2.haveImageReader: that segfaults on a name
        # that is not valid UTF-8
        try:
            read_image_size(path)
            known = True
        except (OSError, ValueError):
            known = False
        if not known:
            image_from_input(item, self.preprocess.in_chans, name)  # raises the reader's own error
        return item

    def read(self, inputs: Any, *, video_stride: int = 1) -> list[np.ndarray]:
        """Every input as ``H x W x in_chans`` uint8 (checked before anything runs; a video:
        each of its frames, all in memory: ``stream`` is the way through a long one)."""
        items = self._items(inputs, _positive_int("video_stride", video_stride))
        images = []
        for _, image in decode_inputs(enumerate(items), self.preprocess.in_chans):
            if isinstance(image, Exception):
                raise image
            images.append(image)
        return images

    # ------------------------------------------------------------------ running

    def batch(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """Transformed images -> a uint8 batch, page-locked when it goes to a GPU."""
        return self.preprocess.batch(pixels, pin_memory=self.device.type == "cuda")

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> Any:
        """Eval-mode outputs of the model for a uint8 ``[N, C, H, W]`` batch (already resized).
        Outputs holding NaN or inf are a ``ValueError``: no result is ever served from them
        (one host sync per batch, which decoding the outputs needs anyway)."""
        x = self.preprocess.normalize(images.to(self.device, non_blocking=True))
        # the batch comes channels_last; NCHW otherwise, as evaluation feeds the model
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        with autocast(self.device, self.amp):
            outputs = self.model(x)
        bad = first_nonfinite(outputs)
        if bad is not None:
            raise ValueError(f"the {self.task} model's output{f' {bad}' if bad else ''} holds NaN or inf for a batch "
                             f"of {images.shape[0]} image(s): refusing to serve it (weights out of range?)")
        return outputs

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The task's predict options, checked (one line naming the option) before any work."""
        unknown = sorted(set(options) - set(self.spec.predict_options))
        if unknown:
            valid = ", ".join(self.spec.predict_options) or "none"
            raise ValueError(f"predict(): unknown option(s) {', '.join(unknown)} for a {self.task} model "
                             f"(options: {valid})")
        return {k: OPTION_CHECKS[k](k, v) if k in OPTION_CHECKS else v for k, v in options.items()}

    def predict(self, inputs: Any = _NO_INPUTS, batch_size: int = 32, *, video_stride: int = 1,
                progress: bool = False, **options: Any) -> list[dict[str, Any]]:
        """One result per image, in order (a video: one per frame it gives). ``video_stride``:
        every how many-th frame of a video is predicted; ``progress``: a tqdm bar on stderr
        (on a terminal). A long video's results all stay in the list: ``stream`` hands each
        on instead."""
        return [result for _, result in self.stream(inputs, batch_size, video_stride=video_stride,
                                                     progress=progress, **options)]

    __call__ = predict

    def stream(self, inputs: Any = _NO_INPUTS, batch_size: int = 32, *, video_stride: int = 1,
               progress: bool = False, **options: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(name, result)`` for each image of ``inputs`` (as ``predict`` takes them), each
        handed on as soon as its chunk of ``batch_size`` is predicted: memory holds one chunk
        of decoded images and what the caller keeps, for a folder or a video of any length.
        ``name``: the file's path, ``"input <i>"`` for an image in memory, ``"<video>#frame<N>"``
        for a video's frame. The inputs are checked here, before the first result is asked for."""
        if inputs is _NO_INPUTS:
            raise ValueError("predict() needs inputs: file paths, folders, glob patterns, .txt lists, videos, PIL "
                             "images, uint8 arrays or uint8 tensors (one, or a list)")
        batch_size = _positive_int("batch_size", batch_size)
        video_stride = _positive_int("video_stride", video_stride)
        progress = _flag("progress", progress)
        options = self.check_options(options)
        items = self._items(inputs, video_stride)
        return ((source.name, result) for source, _, result in
                self.predict_items(list(enumerate(items)), batch_size, options, progress=progress))

    def predict_items(self, items: Sequence[tuple[int, Any]], batch_size: int, options: Mapping[str, Any], *,
                      progress: bool = False, raise_errors: bool = True
                      ) -> Iterator[tuple[Source, np.ndarray | None, dict[str, Any] | Exception]]:
        """``(source, image, result)`` for each image of checked ``(index, item)`` pairs
        (``_items``), in order: ``batch_size`` images are decoded, predicted and handed on
        before the next are decoded, so memory holds one chunk of decoded images, not all (a
        video is decoded as it goes). The task's ``predict`` batches each chunk by padded shape
        as before: an image's result does not depend on its batch (inputs of one padded shape in
        order even get the very batches, and bits, of one call for all). A file that does not
        decode is raised, or with ``raise_errors=False`` handed on as ``(source, None, error)``.
        ``progress``: a tqdm bar over the images (total: the files plus the videos' frame counts)."""
        run = self.spec.predict or predict_images
        with progress_bar(None, total=expected_images([item for _, item in items]), desc="predict",
                          quiet=not progress) as bar:
            chunk: list[tuple[Source, np.ndarray]] = []
            for source, image in decode_inputs(items, self.preprocess.in_chans):
                if isinstance(image, Exception):
                    if raise_errors:
                        raise image
                    yield source, None, image
                    bar.update()
                    continue
                chunk.append((source, image))
                if len(chunk) == batch_size:
                    yield from self._run_chunk(run, chunk, batch_size, options, bar)
                    chunk = []  # the chunk's images go before the next chunk is decoded
            if chunk:
                yield from self._run_chunk(run, chunk, batch_size, options, bar)

    def _run_chunk(self, run: Callable[..., list[dict[str, Any]]], chunk: list[tuple[Source, np.ndarray]],
                   batch_size: int, options: Mapping[str, Any], bar: Any
                   ) -> Iterator[tuple[Source, np.ndarray, dict[str, Any]]]:
        results = run(self, [image for _, image in chunk], batch_size, **options)
        for (source, image), result in zip(chunk, results, strict=True):
            yield source, image, result
            bar.update()


def predict_images(predictor: Predictor, images: Sequence[np.ndarray], batch_size: int,
                   **options: Any) -> list[dict[str, Any]]:
    """The default ``TaskSpec.predict``: preprocess, batch images of one padded shape, decode."""
    pre = predictor.preprocess
    prepared = [pre.transform(image) for image in images]  # (pixels, geometry)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (pixels, _) in enumerate(prepared):
        groups[(pixels.shape[2], *pre.padded_shape(*pixels.shape[:2]))].append(i)
    results: list[dict[str, Any] | None] = [None] * len(images)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            outputs = predictor.forward(predictor.batch([prepared[i][0] for i in chunk]))
            decoded = predictor.spec.decode(outputs, [prepared[i][1] for i in chunk], predictor.meta, **options)
            for i, result in zip(chunk, decoded, strict=True):
                results[i] = result
    return results  # type: ignore[return-value]


_STEM_BYTES = 100  # a stem plus "_overlay.png" and a temp name's ".tmp<pid>" stays far below NAME_MAX (255)
SUMMARY, COCO_RESULTS, COCO_IMAGES = "summary.json", "coco_results.json", "coco_images.json"  # the call's own files
_OWN = (SUMMARY, COCO_RESULTS, COCO_IMAGES)


def _name_key(name: str) -> str:
    """Two file names one folder cannot hold apart on some disk (macOS and Windows ignore case,
    macOS normalises Unicode): compared as this key."""
    return unicodedata.normalize("NFC", name).casefold()


class _Stems:
    """Output stems, each distinct from those given before (``a/img.png`` and ``b/img.png``
    -> ``img``, ``img-2``; ``summary`` and the COCO files' stems are taken). Distinct also
    where a disk ignores case (``IMG`` and ``img``); leading dots dropped (outputs are not
    hidden files, nor look like temp files); cut to 100 bytes (a file name has at most 255).
    ``taken``: the name keys in use."""

    def __init__(self) -> None:
        self.taken = {_name_key(Path(name).stem) for name in _OWN}

    def add(self, stem: str) -> str:
        stem = stem.lstrip(".")
        stem = stem.encode("utf-8", "surrogateescape")[:_STEM_BYTES].decode("utf-8", "ignore") or "image"
        candidate, i = stem, 2
        while _name_key(candidate) in self.taken:
            candidate, i = f"{stem}-{i}", i + 1
        self.taken.add(_name_key(candidate))
        return candidate


class _NameTaken(Exception):
    """An output name that belongs to another input's files, or is an input file itself."""


class _Outputs:
    """The files ``predict_files`` writes into ``folder``. Each input's files are staged
    (written to new temp files) while its ``write_prediction`` runs and renamed into place
    when it returns, so they appear together or not at all. A name is refused (the input gets
    the next free stem) when another input's files already have it (``a/img.png``'s mask
    ``img_mask.png`` and ``c/img_mask.png``'s picture), or when it is an input file. Writes
    go only into ``folder`` (the folder itself may be a link: the user's choice)."""

    def __init__(self, folder: Path, inputs: Sequence[str]) -> None:
        self.folder = folder
        self.root = folder.resolve()
        self.owner: dict[str, int] = {_name_key(name): -1 for name in _OWN}  # name key -> input index
        self.inputs: set[Path] = set()
        self.input_ids: set[tuple[int, int]] = set()
        for path in inputs:
            try:
                self.inputs.add(Path(path).resolve())
                st = os.stat(path)
                self.input_ids.add((st.st_dev, st.st_ino))
            except (OSError, RuntimeError, ValueError):  # missing / a link loop: reported when read
                pass
        self.staged: dict[str, tuple[Path, Path]] = {}
        self.current = -1

    def outside(self, index: int, path: str) -> str | None:
        """Why input ``path`` must not be predicted into this folder, or None. (A folder that
        holds this one is read without it: ``inputs.expand`` leaves it out.)"""
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError, ValueError):
            return None  # the read names what is wrong with it
        if resolved == self.root or self.root in resolved.parents:
            return (f"input {index} ({path}): it is inside the output folder {self.folder} (an earlier prediction?): "
                    f"it is not read, so that no output is predicted from outputs or written over an input")
        return None

    def _is_input(self, path: Path) -> bool:
        """Whether the folder entry ``path`` is an input file (a link of that name is not: it
        is replaced, which leaves its target alone)."""
        if self.root / path.name in self.inputs:
            return True
        try:
            st = os.lstat(path)
        except OSError:
            return False
        # the same file under another name: a hard link, or another case on a case-blind disk
        return not os.path.islink(path) and (st.st_dev, st.st_ino) in self.input_ids

    def stage(self, path: Path, write: Callable[[Path], Any]) -> Any:
        """``viz.write_file`` while an input's files are written: ``write`` into a new temp file."""
        path = Path(path)
        if path.parent.resolve() != self.root:
            raise ValueError(f"{path}: --predict writes only into its output folder {self.folder}")
        key = _name_key(path.name)
        if self.owner.get(key, self.current) != self.current or self._is_input(path) \
                or (path.is_dir() and not path.is_symlink()):  # a user's folder of that name stays as it is
            raise _NameTaken(path)
        if key in self.staged:  # the same file written twice: the last write counts
            os.unlink(self.staged.pop(key)[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_temp(path)
        try:
            result = write(tmp)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, (OSError, RuntimeError)):  # RuntimeError: a writer's own error on a full disk
                raise write_error(path, e) from None
            raise
        self.staged[key] = (tmp, path)
        return result

    def write(self, index: int, stem: str, write_prediction: Callable[[str], dict[str, Any]],
              taken: set[str]) -> dict[str, Any]:
        """``write_prediction(stem)`` with its files staged, then renamed into place; the entry
        gets ``files``: the paths written. ``taken``: stems in use (name keys)."""
        base, n = stem, 2
        for attempt in range(100):
            self.current, self.staged = index, {}
            token = WRITE_HOOK.set(self.stage)
            try:
                entry = write_prediction(stem)
            except _NameTaken as e:
                self._discard()
                if attempt == 99:  # a name that does not come from the stem: no other stem helps
                    raise ValueError(f"input {index}: its output {e.args[0]} is another input's output, or an "
                                     f"input file, under any name tried") from None
                while _name_key(stem := f"{base}-{n}") in taken:
                    n += 1
                taken.add(_name_key(stem))
                continue
            except BaseException:
                self._discard()
                raise
            finally:
                WRITE_HOOK.reset(token)
            return {**entry, "files": self._commit()}
        raise AssertionError("unreachable")

    def _commit(self) -> list[str]:
        staged, self.staged = list(self.staged.items()), {}
        done = []
        try:
            for key, (tmp, path) in staged:
                # replaces the name: a link of that name is replaced, never written through
                os.replace(tmp, path)
                self.owner[key] = self.current
                done.append(str(path))
        except OSError as e:
            for _, (tmp, _path) in staged:
                tmp.unlink(missing_ok=True)
            raise write_error(path, e) from None
        return done

    def _discard(self) -> None:
        for tmp, _ in self.staged.values():
            tmp.unlink(missing_ok=True)
        self.staged = {}


def _detections(result: Any) -> Mapping[str, Any] | None:
    """A result's detections: a detection result, or a multitask one's ``detect``; else None."""
    for candidate in (result, result.get("detect") if isinstance(result, Mapping) else None):
        if isinstance(candidate, Mapping) and {"boxes", "scores", "labels"} <= candidate.keys():
            return candidate
    return None


class _CocoResults:
    """Detections in COCO's results format, ``[{"image_id", "category_id", "bbox": [x, y, w,
    h], "score"}]`` (the dataset's own category ids, from the checkpoint's ``category_ids``),
    and the image table they refer to, as a COCO dataset without annotations: pycocotools
    reads them as ``COCO("coco_images.json").loadRes("coco_results.json")``. Image ids count
    the predicted images from 1, in order; ``file_name`` is the input's name (a frame's
    ``<video>#frame<N>``, with ``video`` and ``frame`` beside it)."""

    def __init__(self, meta: Mapping[str, Any]) -> None:
        names = list(meta["class_names"])
        self.category_ids = [int(c) for c in meta.get("category_ids") or range(1, len(names) + 1)]
        self.categories = [{"id": c, "name": n} for c, n in zip(self.category_ids, names)]
        self.images: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []

    def add(self, result: Any, source: Source, size: tuple[int, int]) -> None:
        detections = _detections(result)
        if detections is None:
            return
        image_id = len(self.images) + 1
        h, w = size
        where = {"video": source.video, "frame": source.frame} if source.video is not None else {}
        self.images.append({"id": image_id, "file_name": source.name, "width": w, "height": h, **where})
        # tolist() once per image: float() on tensor elements costs a microsecond or more each
        for (x1, y1, x2, y2), score, label in zip(detections["boxes"].tolist(), detections["scores"].tolist(),
                                                  detections["labels"].tolist()):
            self.results.append({"image_id": image_id, "category_id": self.category_ids[label],
                                 "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                                 "score": round(score, 4)})

    def write(self, folder: Path) -> None:
        if not self.images:
            return
        # an image, a detection a line: results run to millions of them, indented JSON to ten lines each
        table = (f'{{"images": {_json_lines(self.images)},\n"annotations": [],\n'
                 f'"categories": {json.dumps(self.categories)}}}\n')
        results = _json_lines(self.results) + "\n"
        write_file(folder / COCO_IMAGES, lambda tmp: tmp.write_text(table))
        write_file(folder / COCO_RESULTS, lambda tmp: tmp.write_text(results))


def _json_lines(items: Sequence[Any]) -> str:
    """A JSON list, an item a line."""
    return "[\n" + ",\n".join(json.dumps(item) for item in items) + "\n]" if items else "[]"


@contextlib.contextmanager
def _lines(shown: bool):
    """What a task's ``write_prediction`` prints: past the progress bar (it is cleared and
    drawn again), or nowhere."""
    if not shown:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
        return
    with tqdm.external_write_mode(file=sys.stdout):
        yield


def _report(line: str) -> None:
    with tqdm.external_write_mode(file=sys.stderr):
        sys.stderr.write(line + "\n")


def predict_files(predictor: Predictor, inputs: Sequence[Any], out_dir: Path, batch_size: int = 32, *,
                  images: bool = True, video_stride: int = 1, progress: bool = False) -> list[dict]:
    """``--predict``: every image of ``inputs`` (files, folders, glob patterns, ``.txt``
    lists, videos: ``inputs.expand``) through ``predictor``, then the task's
    ``write_prediction`` (files under ``out_dir``, one printed line each); ``out_dir/summary.json``
    lists every entry (the task's result: classify's top classes, detection's boxes...), each
    with the ``files`` written for it (a video frame's with its ``video`` and ``frame``); for
    detection (and multitask) ``coco_results.json`` and ``coco_images.json`` hold the boxes in
    COCO's results format (``_CocoResults``); a last line (stdout) names them. ``images=False``:
    only the files an entry names (segmentation masks) are written, no pictures and no per-image
    JSON or line.
    Files are read, predicted and written ``batch_size`` at a time, video frames decoded as
    they go (memory stays bounded for a folder or a video of any size); ``progress``: a tqdm
    bar. Files inside ``out_dir`` (an earlier run's outputs) are never read nor written over:
    folders and patterns leave them out (a warning says how many), a file named on its own is
    skipped and named. A file that cannot be read is reported (stderr) and the others are still
    predicted; then a ``ValueError`` names what failed. An argument that names nothing usable
    (a pattern matching nothing, an empty folder, a missing list entry, an unreadable video) is
    an error before anything is predicted."""
    out_dir = Path(out_dir)
    batch_size = _positive_int("batch_size", batch_size)
    video_stride = _positive_int("video_stride", video_stride)
    images = _flag("images", images)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    items = expand(inputs, video_stride=video_stride, exclude=out_dir)
    if not items or any(item_path(item) is None for item in items):
        raise ValueError("predict_files() takes paths: image files, folders, glob patterns, .txt lists or videos "
                         "(images in memory: Predictor.predict)")
    paths = [item_path(item) for item in items]
    outputs = _Outputs(out_dir, paths)
    # temp files of a --predict that was killed (its process gone); a live one's are kept
    remove_stale_temps(outputs.folder, keep=outputs.inputs)
    failed: list[tuple[int, str]] = []  # (input index, why)
    todo = []
    for i, path in enumerate(paths):
        why = outputs.outside(i, path)
        if why is None:
            todo.append((i, items[i]))
        else:
            failed.append((i, why))
            _report(f"skipped {why}")
    skipped = len(failed)
    stems = _Stems()
    spec, meta = predictor.spec, predictor.meta
    entries: list[dict] = []
    coco = _CocoResults(meta)
    done = False
    out_dir.mkdir(parents=True, exist_ok=True)  # summary.json for every task (classify writes nothing else)
    try:
        for source, image, result in predictor.predict_items(todo, batch_size, {}, progress=progress,
                                                             raise_errors=False):
            if isinstance(result, Exception):  # the message names the input and its file
                failed.append((source.index, str(result)))
                _report(f"skipped {result}")
                continue
            where = {"video": source.video, "frame": source.frame} if source.video is not None else {}
            with _lines(shown=images):
                entries.append(outputs.write(source.index, stems.add(source.stem), lambda stem: {
                    **spec.write_prediction(result, image, source.name, out_dir, stem, meta, images=images), **where}, stems.taken))
            coco.add(result, source, image.shape[:2])
        done = True
    finally:
        if out_dir.is_dir():  # what is on disk, also when a write or the model failed half-way
            errors = [{"image": paths[i], "error": why} for i, why in sorted(failed)]
            try:
                write_json(out_dir / SUMMARY, entries + errors)
                coco.write(out_dir)
            except OSError:
                if done:
                    raise
    if failed:
        what = "could not be read" if not skipped else \
            "were skipped" if skipped == len(failed) else "were skipped or could not be read"
        n = len(entries)  # a video is one input and gives many images
        predicted = f"the other {n} were predicted" if n == len(paths) - len(failed) else f"{n} images were predicted"
        raise ValueError(f"{len(failed)} of {len(paths)} inputs {what}" + (f" ({predicted})" if entries else "")
                         + f": {min(failed)[1]}")
    detections = f", {len(coco.results)} detections in {COCO_RESULTS}" if coco.images else ""
    print(f"done: {len(entries)} image{'s' if len(entries) != 1 else ''} -> {out_dir / SUMMARY}{detections}")
    return entries
