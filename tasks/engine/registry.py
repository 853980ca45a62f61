"""The task registry: one ``TaskSpec`` per task, looked up by name.

A ``TaskSpec`` names a task's config dataclass and the functions the shared machinery calls:
the runner (``python -m tasks.<task>``), ``tasks.load`` (the Python API), ``tasks.export``,
``benchmarks.bench`` (not installed), ``tasks.multitask`` (which composes the detection and segmentation heads)
and ``--trunk`` get everything task-specific from here, never from another task module.

``TASKS["detect"]`` imports ``tasks.detect`` on first use and returns its ``SPEC``: the
registry knows the built-in tasks by module name instead of importing them, so that any
task module can use the registry (``tasks.multitask`` does) without an import circle, and
``python -m tasks.data.scenes`` does not import every task.
"""
from __future__ import annotations

import functools
import importlib
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from tasks.data.preprocess import Preprocess
from tasks.engine.config import upgrade_saved_config

__all__ = ["TaskSpec", "TaskData", "TASKS", "get_task", "spec_for_checkpoint", "read_meta"]

BUILTIN = ("classify", "detect", "segment", "multitask")


@dataclass
class TaskData:
    """What ``TaskSpec.build_data`` returns.

    ``train`` / ``val``: iterables of ``(images, targets)`` already on the device (``len()``
    steps, optional ``set_epoch``); ``train`` is None for evaluation only. ``meta``: the
    checkpoint metadata of a model trained on this data (class names, normalisation,
    ``preprocess``); ``.preprocess`` is its ``Preprocess``. ``val_set``: the validation dataset
    when evaluation needs it (COCO ground truth). ``skipped``: ``{split: paths}`` (an iterable, read when the
    run ends; a ``{path: reason}`` dict is one) of the images left out as unreadable
    (``data.skip_bad``), where the data records them.
    ``targets_checked``: the datasets already guarantee valid targets (labels in range, boxes
    with area, mask ids known), so the models' own per-step checks (a host sync) can go.
    ``fixed_shapes``: False where batch shapes vary (the aspect mode): no CUDA graph then
    (the runner resolves ``train.cuda_graph`` / ``train.graph_eval`` to false)."""

    train: Any
    val: Any
    meta: dict[str, Any]
    val_set: Any = None
    skipped: Optional[dict[str, Iterable[str]]] = None
    targets_checked: bool = False
    fixed_shapes: bool = True  # every batch has one shape (what train.cuda_graph and train.graph_eval need)

    @functools.cached_property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_meta(self.meta)


@dataclass(frozen=True)
class TaskSpec:
    """One task. Signatures (``cfg`` is an instance of ``config``, ``meta`` checkpoint metadata):

    * ``build_model(cfg, meta) -> nn.Module``: the task model for ``meta["class_names"]``.
    * ``build_data(cfg, device, *, train=True, quiet=False) -> TaskData``.
    * ``evaluate(model, data, device, amp=True, *, output=None, quiet=True) -> metrics``: the
      model in eval mode on ``data.val``; with ``output`` (a folder) it also writes the task's
      pictures and files there. Under torchrun the metrics are reduced across ranks and the
      runner passes ``output`` to the main process only (the others get None).
    * ``make_preprocess(cfg, meta=None) -> Preprocess``: how this task feeds images, from the
      config (and the normalisation of ``meta`` when given: old checkpoints without
      ``meta["preprocess"]`` get theirs this way).
    * ``decode(outputs, geometries, meta, **options) -> [result]``: one batch of eval-mode
      model outputs -> per-image results in original image coordinates (the Python API).
    * ``write_prediction(result, image, source, out_dir, stem, meta, *, images) -> entry``: what
      ``--predict`` writes and prints for one image; ``entry`` is JSON-friendly. Without
      ``images`` (``--no-images``) nothing is drawn: only the files the entry names (a mask).
    * ``report(metrics, meta) -> [lines]``: the metrics for a person, first line the summary.
    * ``build_head(model_cfg, feature_info, num_classes)`` (optional): the task head alone,
      for models that compose heads on one trunk.
    * ``predict(predictor, images, batch_size, **options)`` (optional): replaces the default
      batching of ``Predictor.predict`` (segmentation's sliding window).
    * ``add_arguments(parser)`` (optional): the task's own command-line flags.
    * ``resolve_for_run(cfg, steps) -> [lines]`` (optional): the settings that depend on the
      run's length (``steps`` optimizer steps) fixed in ``cfg``, one line each that changed;
      called on a training run's config before it is recorded (detection's ``auto`` box head).
    * ``describe_data(cfg) -> DataFacts | None`` (optional): the user's own data of ``cfg``
      described without decoding it (``tasks.engine.derive``); None for the built-in data. A
      task with it gets settings made for the user's data (``derive``) instead of its recipe.
    """

    name: str
    config: type
    recipes: tuple[str, str]  # (GPU recipe, quick CPU recipe) under configs/<name>/
    main_metric: str          # what best.pt follows (higher is better)
    doc: str
    data_flags: tuple[str, ...]
    build_model: Callable[..., Any]
    build_data: Callable[..., TaskData]
    evaluate: Callable[..., dict[str, Any]]
    make_preprocess: Callable[..., Any]
    decode: Callable[..., list[dict[str, Any]]]
    write_prediction: Callable[..., dict[str, Any]]
    report: Callable[[dict[str, Any], Mapping[str, Any]], list[str]]
    predict_options: tuple[str, ...] = ()  # keyword options decode / predict accept
    build_head: Optional[Callable[..., Any]] = None
    predict: Optional[Callable[..., list[dict[str, Any]]]] = None
    add_arguments: Optional[Callable[[Any], None]] = None
    describe_data: Optional[Callable[[Any], Any]] = None
    resolve_for_run: Optional[Callable[[Any, int], list[str]]] = None
    # ``{"section.key": value}``: what a checkpoint saved before the key existed ran with (its
    # config lacks the key, and today's default differs); filled in when a checkpoint is read
    saved_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def model_config(self) -> type:
        """The dataclass of the config's ``model`` section."""
        return typing.get_type_hints(self.config)["model"]

    @property
    def data_config(self) -> type:
        """The dataclass of the config's ``data`` section."""
        return typing.get_type_hints(self.config)["data"]


class _Registry(Mapping[str, TaskSpec]):
    """The built-in tasks by name; a task module is imported when its spec is first asked for."""

    def __init__(self) -> None:
        self._specs: dict[str, TaskSpec] = {}

    def __getitem__(self, name: str) -> TaskSpec:
        if name not in self._specs:
            if name not in BUILTIN:
                raise KeyError(name)
            self._specs[name] = importlib.import_module(f"tasks.{name}").SPEC
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(BUILTIN)

    def __len__(self) -> int:
        return len(BUILTIN)

    def __contains__(self, name: object) -> bool:
        return name in BUILTIN


TASKS: Mapping[str, TaskSpec] = _Registry()


def get_task(name: Any) -> TaskSpec:
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


def spec_for_checkpoint(ckpt: Mapping[str, Any], source: Any, expected: str | None = None) -> TaskSpec:
    """The spec of the task that wrote ``ckpt``; with ``expected``, a checkpoint of another
    task is a ``ValueError`` naming both. The checkpoint's stored config is brought to today's
    schema in place (``upgrade_saved_config``: removed keys dropped, split keys filled), so a
    checkpoint saved before a key went still loads."""
    task = ckpt.get("task")
    if expected is not None and task != expected:
        hint = f": load it with python -m tasks.{task} or tasks.load" if task in TASKS else ""
        raise ValueError(f"{source} is a {task!r} checkpoint, not a {expected!r} one{hint}")
    if task not in TASKS:
        raise ValueError(f"{source}: checkpoint of an unknown task {task!r}; tasks: {', '.join(TASKS)}")
    spec = TASKS[task]
    config = ckpt.get("config")
    if isinstance(config, dict):  # older checkpoints: the values they ran with, not today's defaults
        for dotted, value in spec.saved_defaults.items():
            section, _, key = dotted.rpartition(".")
            part = config.get(section) if section else config
            if isinstance(part, dict) and key not in part:
                part[key] = value
        upgrade_saved_config(spec.config, config)
    return spec


def read_meta(ckpt: Mapping[str, Any], spec: TaskSpec, cfg: Any) -> dict[str, Any]:
    """The checkpoint's metadata in today's schema: ``class_names``, ``category_ids``
    (detection), ``in_chans``, ``mean``, ``std``, ``preprocess``. Checkpoints written before it
    said ``classes`` and had no ``in_chans`` / ``preprocess``: those come from the config and
    the task's ``make_preprocess``."""
    meta = dict(ckpt.get("meta") or {})
    if "class_names" not in meta and "classes" in meta:
        meta["class_names"] = meta.pop("classes")
    if not meta.get("class_names"):
        k = getattr(cfg.model, "num_classes", None)
        if not k:
            raise ValueError("the checkpoint names no classes (meta) and no model.num_classes")
        meta["class_names"] = [str(i) for i in range(k)]
    meta["class_names"] = [str(n) for n in meta["class_names"]]
    meta.setdefault("in_chans", cfg.model.in_chans)
    if "preprocess" not in meta:
        meta.update(spec.make_preprocess(cfg, meta).to_meta())
    return meta
