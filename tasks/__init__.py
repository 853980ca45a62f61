"""Tasks on the shared trunk, as a library and as commands (``python -m tasks.classify`` ...).

    from tasks import load
    model = load("runs/detect/<run>/best.pt", device="cuda")   # any task's checkpoint
    results = model.predict(["a.jpg", pil_image, rgb_uint8_array, chw_uint8_tensor], batch_size=32)
    for name, result in model.stream(["photos/", "photos/**/*.jpg", "todo.txt", "clip.mp4"]):
        ...  # folders, glob patterns, .txt lists, videos (frame by frame): one result per image

``TASKS`` is the task registry (``tasks.engine.registry``): ``TASKS["detect"]`` is the
detection task's ``TaskSpec``. Names are resolved on first use, so importing ``tasks`` (or
``tasks.data.*``) loads no task module.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from tasks.engine.predict import Predictor

__all__ = ["load", "TASKS", "Predictor"]


def load(checkpoint: str | os.PathLike | Sequence[str | os.PathLike], device: str = "auto", *,
         task: str | None = None, amp: bool = True) -> "Predictor":
    """A ``Predictor`` for a checkpoint of any task (its EMA weights when the run kept them).

    ``checkpoint``: a ``best.pt`` / ``last.pt`` file; or a list of a detect and a segment
    checkpoint trained on one frozen trunk, merged into one multi-task model (the trunk runs
    once for both). ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
    ``task``: refuse a checkpoint of another task. ``amp``: bf16 autocast on CUDA.

    ``predict(inputs, batch_size=32, *, video_stride=1, progress=False, **options)`` takes
    file paths, folders (recursive), glob patterns, ``.txt`` lists of paths, video files (each
    frame an image; every ``video_stride``-th), PIL images, uint8 numpy arrays (``H x W`` or
    ``H x W x C``, RGB) or uint8 tensors (``C x H x W``), one or a list mixing them, any sizes,
    and returns one result per image in its original pixel coordinates: classification
    ``{"top": [(name, prob), ...], "probs"}``; detection ``{"boxes", "scores", "labels",
    "names"}``; segmentation ``{"mask", "class_fractions"}``; multitask one of each.
    ``stream(...)`` (the same arguments) yields ``(name, result)`` as each batch is done: memory
    holds one batch of decoded images, for a folder or a video of any length.
    """
    from tasks.engine.predict import Predictor, check_load_arguments

    if isinstance(checkpoint, (list, tuple)):
        if task not in (None, "multitask"):
            raise ValueError(f"task={task!r}: a list of checkpoints is merged into a multitask model")
        check_load_arguments(device, None, amp)
        if not checkpoint:
            raise ValueError("load([]): an empty list; expected a checkpoint path, or a list of a detect and a "
                             "segment checkpoint trained on one frozen trunk")
        for i, path in enumerate(checkpoint):
            _check_path(path, f"load(): checkpoint {i} of the list")
        from tasks.multitask import merged_predictor

        return merged_predictor([os.fspath(p) for p in checkpoint], device, amp=amp)
    _check_path(checkpoint, "load()")
    check_load_arguments(device, task, amp)  # before the checkpoint is read
    return Predictor.from_checkpoint(checkpoint, device, task=task, amp=amp)


def _check_path(checkpoint: Any, what: str) -> None:
    """One checkpoint argument: a path (str or ``os.PathLike``) of an existing file."""
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise ValueError(f"{what} takes a checkpoint path (or a list of them), got a {type(checkpoint).__name__}"
                         if what == "load()" else f"{what} is a {type(checkpoint).__name__}, expected a path")
    path = os.fsdecode(os.fspath(checkpoint))
    if not path:
        raise ValueError(f"{what}: an empty checkpoint path ''; expected a best.pt / last.pt file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file"
                                + (" (it is a folder: pass its best.pt)" if os.path.isdir(path) else ""))


def __getattr__(name: str) -> Any:
    if name == "TASKS":
        from tasks.engine.registry import TASKS
        return TASKS
    if name == "Predictor":
        from tasks.engine.predict import Predictor
        return Predictor
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
