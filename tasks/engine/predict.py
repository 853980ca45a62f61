"""A trained model for raw images: ``Predictor.predict(inputs)`` -> per-image results.

``tasks.load(ckpt)`` returns one; ``--predict`` is a thin layer over it. Inputs are file
paths (EXIF orientation applied), PIL images, ``H x W`` / ``H x W x C`` uint8 numpy arrays
(RGB) or ``C x H x W`` uint8 tensors, any sizes mixed. Every input is checked before any
device work; then each image goes through the checkpoint's ``Preprocess`` (the one
evaluation used), images whose padded inputs have one shape are batched together (so an
image's result never depends on which other images came with it), the model runs in eval
mode without gradients (bf16 autocast and channels_last on CUDA), and the task's ``decode``
maps outputs back to the original pixels.
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from tasks.data.images import image_from_input
from tasks.data.preprocess import Preprocess

from .checkpoint import load_checkpoint, model_state
from .config import config_from_dict
from .distributed import resolve_device
from .loop import autocast
from .registry import TaskSpec, read_meta, spec_for_checkpoint

__all__ = ["Predictor", "predict_images", "load_task_model", "predict_files", "unique_stems"]


def load_task_model(source: str | os.PathLike | Mapping[str, Any], *, task: str | None = None,
                    cfg: Any = None) -> tuple[TaskSpec, nn.Module, dict[str, Any], Any]:
    """``(spec, model, meta, cfg)`` of a checkpoint file (or dict): the model on the CPU in
    eval mode with the prediction weights (the EMA when the run kept one). ``task``: refuse
    another task's checkpoint, naming both. ``cfg``: build from this config (the checkpoint's
    with a run's overrides) instead of the checkpoint's own."""
    ckpt = load_checkpoint(source) if not isinstance(source, Mapping) else source
    name = source if not isinstance(source, Mapping) else "checkpoint"
    spec = spec_for_checkpoint(ckpt, name, expected=task)
    if cfg is None:
        cfg = config_from_dict(spec.config, ckpt.get("config") or {}, where=f"{name} config:")
    # the checkpoint holds every weight: the trunk files the run started from may be gone
    cfg.model.weights = cfg.model.trunk = None
    meta = read_meta(ckpt, spec, cfg)
    model = spec.build_model(cfg, meta)
    model.load_state_dict(model_state(ckpt))
    return spec, model.eval(), meta, cfg


class Predictor:
    """``predict(inputs, batch_size=32, **options)``; ``options`` are the task's
    (``spec.predict_options``: e.g. ``topk`` for classification, ``tile`` for segmentation)."""

    def __init__(self, spec: TaskSpec, model: nn.Module, meta: Mapping[str, Any],
                 device: str | torch.device = "auto", *, amp: bool = True, channels_last: bool | None = None) -> None:
        self.spec = spec
        self.meta = dict(meta)
        self.preprocess = Preprocess.from_meta(meta)
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.amp = amp and self.device.type == "cuda"
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        model = model.to(self.device).eval()
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model

    @classmethod
    def from_checkpoint(cls, source: str | os.PathLike | Mapping[str, Any], device: str | torch.device = "auto",
                        *, task: str | None = None, amp: bool = True) -> "Predictor":
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

    def read(self, inputs: Any) -> list[np.ndarray]:
        """Every input as ``H x W x in_chans`` uint8 (checked before anything runs)."""
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
            inputs = list(inputs)  # [N, C, H, W]: N images
        elif isinstance(inputs, (str, os.PathLike, np.ndarray, torch.Tensor)) or not isinstance(inputs, Sequence):
            inputs = [inputs]  # one image
        if len(inputs) == 0:
            raise ValueError("predict() got an empty list of inputs: pass file paths, PIL images, uint8 arrays "
                             "or uint8 tensors")
        return [image_from_input(x, self.preprocess.in_chans, f"input {i}") for i, x in enumerate(inputs)]

    # ------------------------------------------------------------------ running

    def batch(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """Transformed images -> a uint8 batch, page-locked when it goes to a GPU."""
        return self.preprocess.batch(pixels, pin_memory=self.device.type == "cuda")

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> Any:
        """Eval-mode outputs of the model for a uint8 ``[N, C, H, W]`` batch (already resized)."""
        x = self.preprocess.normalize(images.to(self.device, non_blocking=True))
        # the batch comes channels_last; NCHW otherwise, as evaluation feeds the model
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        with autocast(self.device, self.amp):
            return self.model(x)

    def predict(self, inputs: Any, batch_size: int = 32, **options: Any) -> list[dict[str, Any]]:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
        unknown = sorted(set(options) - set(self.spec.predict_options))
        if unknown:
            valid = ", ".join(self.spec.predict_options) or "none"
            raise ValueError(f"predict(): unknown option(s) {', '.join(unknown)} for a {self.task} model "
                             f"(options: {valid})")
        images = self.read(inputs)
        run = self.spec.predict or predict_images
        return run(self, images, batch_size, **options)

    __call__ = predict


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


def unique_stems(paths: Sequence[str]) -> list[str]:
    """File stems for outputs, made distinct (``a/img.png`` and ``b/img.png`` -> ``img``, ``img-2``;
    ``summary`` is taken by ``summary.json``)."""
    stems, seen = [], {"summary"}
    for path in paths:
        stem, i = Path(path).stem, 2
        candidate = stem
        while candidate in seen:
            candidate, i = f"{stem}-{i}", i + 1
        seen.add(candidate)
        stems.append(candidate)
    return stems


def predict_files(predictor: Predictor, paths: Sequence[str], out_dir: Path, batch_size: int = 32) -> list[dict]:
    """``--predict``: every readable file through ``predictor``, then the task's
    ``write_prediction`` (files under ``out_dir``, one printed line each); where the task wrote
    files, ``out_dir/summary.json`` lists every entry. A file that cannot be read is reported
    (stderr) and the others are still predicted; then a ``ValueError`` names what failed."""
    good, images, failed = [], [], []
    for i, path in enumerate(paths):
        try:
            images.append(image_from_input(path, predictor.preprocess.in_chans, f"input {i}"))
            good.append(i)
        except (ValueError, FileNotFoundError) as e:  # the message names the input and its file
            failed.append((str(path), str(e)))
            sys.stderr.write(f"skipped {e}\n")
    stems = unique_stems(paths)
    results = predictor.predict(images, batch_size=batch_size) if images else []
    entries = [predictor.spec.write_prediction(result, image, str(paths[i]), out_dir, stems[i], predictor.meta)
               for result, image, i in zip(results, images, good, strict=True)]
    if out_dir.is_dir():
        errors = [{"image": path, "error": why} for path, why in failed]
        (out_dir / "summary.json").write_text(json.dumps(entries + errors, indent=1))
    if failed:
        raise ValueError(f"{len(failed)} of {len(paths)} inputs could not be read"
                         + (f" (the other {len(entries)} were predicted)" if entries else "") + f": {failed[0][1]}")
    return entries
