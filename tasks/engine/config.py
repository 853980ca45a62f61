"""Typed run configuration: dataclasses hold every default, YAML and ``--set`` only override.

Unknown keys are an error that names the key and the valid ones, so a typo in a recipe
never silently trains the default instead. YAML is read strictly: a key given twice in one
mapping (YAML keeps the last, silently) is an error naming both lines, and every YAML error is
one line naming the file, the line and the column.
"""
from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

__all__ = ["ConfigError", "ModelConfig", "DenseDataConfig", "OptimConfig", "TrainConfig", "load_config", "apply_overrides",
           "config_to_dict", "config_from_dict", "setting", "bounded", "one_of", "CONFIG_ROOT", "recipe_root",
           "locate_recipe", "REMOVED_KEYS", "SPLIT_FROM", "removed_key_message", "upgrade_saved_config",
           "config_keys", "format_keys"]


def recipe_root(package: Path) -> Path:
    """Where the recipes of the ``tasks`` package at ``package`` are: ``tasks/configs/`` in an
    installed wheel (pyproject.toml maps the top-level ``configs/`` there), else the
    ``configs/`` beside ``tasks/`` of a source checkout or editable install."""
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


CONFIG_ROOT = recipe_root(Path(__file__).resolve().parents[1])


def locate_recipe(path: str | os.PathLike) -> Path:
    """``--config PATH`` as given, except a relative ``configs/<task>/<name>.yaml`` that is not
    there (an installed package run from another folder, as the README's commands are written):
    then the shipped recipe of that name, where one exists."""
    given = Path(path)
    parts = given.parts
    if not given.is_absolute() and len(parts) > 1 and parts[0] == "configs" and not given.exists():
        shipped = CONFIG_ROOT.joinpath(*parts[1:])
        if shipped.is_file():
            return shipped
    return given


class ConfigError(ValueError):
    """A config file or override is wrong: unknown or removed key, bad type, value out of range, unreadable file."""


# ----------------------------------------------------------------------------- keys that are gone

CONFIG_DOC = "docs/CONFIG.md"
# Keys that existed and were removed, with why. A config file or --set that gives one is an
# error saying so; a checkpoint's stored config drops them (``upgrade_saved_config``).
REMOVED_KEYS: dict[str, str] = {
    "data.mixup_alpha": "Mixup trained to 95.09% against 95.39% without it (Fashion-MNIST, seed 7) and no recipe "
                        "used it; CutMix stays (data.cutmix_alpha)",
    "data.mix_prob": "CutMix mixes every batch, as the long recipe was measured; a per-batch probability never was",
    "data.mix_switch_prob": "it chose between Mixup and CutMix per batch, and Mixup is gone",
    "data.mix_off_epochs": "training the last epochs unmixed measured no gain (95.97% against 95.95%, 3 seeds)",
    "model.dice_weight": "the soft Dice loss term was never measured to help, and no recipe used it",
    "model.dropout": "no recipe set it and no measurement backs another value: the heads keep their built-in "
                     "dropout (classification none, segmentation 0.1)",
    "model.cls_dropout": "no recipe set it and no measurement backs another value: the multi-label head has none",
    "model.seg_dropout": "no recipe set it and no measurement backs another value: the segmentation head keeps 0.1",
    "optim.betas": "no recipe set it and nothing measured another value: AdamW runs with PyTorch's (0.9, 0.999)",
    "optim.final_lr_ratio": "no recipe set it and nothing measured another value: cosine schedules end at 0",
    "train.cudnn_benchmark_limit": "PyTorch's default (10 algorithms timed per shape) measured as fast as any "
                                   "other limit (Fashion-MNIST ResNet-18, H200)",
}
# Keys added by splitting another: a config saved before the split ran with the old key's value
# (train.cuda_graph also graphed evaluation until train.graph_eval took that over)
SPLIT_FROM: dict[str, str] = {"train.graph_eval": "train.cuda_graph"}


def removed_key_message(key: str) -> str:
    """``<key> was removed (<why>); see docs/CONFIG.md``: the one line a config giving it fails with."""
    return f"{key} was removed ({REMOVED_KEYS[key]}); see {CONFIG_DOC}, \"Removed keys\""


def upgrade_saved_config(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """A config a checkpoint stored, in today's schema of ``cls``, changed in place: removed keys
    dropped (the checkpoint loads as before), keys split from another filled from it."""
    sections = {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}
    for dotted in REMOVED_KEYS:
        section, _, key = dotted.partition(".")
        part, tp = data.get(section), sections.get(section)
        if isinstance(part, dict) and key in part and not (dataclasses.is_dataclass(tp) and key in _names(tp)):
            del part[key]
    for dotted, source in SPLIT_FROM.items():
        section, _, key = dotted.partition(".")
        src_section, _, src_key = source.partition(".")
        part, src = data.get(section), data.get(src_section)
        if isinstance(part, dict) and isinstance(src, dict) and key not in part and src_key in src:
            part[key] = src[src_key]
    return data


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# ----------------------------------------------------------------------------- YAML, strictly

# A config nests three levels (section, key, list); far deeper is a broken or hostile file,
# refused before PyYAML's recursive composer runs out of Python stack (a RecursionError)
_MAX_YAML_DEPTH = 64
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _YAMLDuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: Any, second: Any) -> None:  # marks: 0-based line and column
        where = f"lines {first.line + 1} and {second.line + 1}" if first.line != second.line else \
            f"line {first.line + 1}, columns {first.column + 1} and {second.column + 1}"
        super().__init__(f"duplicate key {_brief(key)} at {where} (YAML would keep only the last; remove one)")


class _YAMLTooDeep(yaml.YAMLError):
    def __init__(self, line: int) -> None:
        super().__init__(f"nested more than {_MAX_YAML_DEPTH} levels deep at line {line} (a config nests a few)")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping and nesting deeper
    than ``_MAX_YAML_DEPTH``. Merge keys (``<<: *base`` then an override) stay legal."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > _MAX_YAML_DEPTH:
                raise _YAMLTooDeep(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            marks: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = marks.get(key)
                except TypeError:  # an unhashable key: the base class names it
                    continue
                if first is not None:
                    raise _YAMLDuplicateKey(key, first, key_node.start_mark)
                marks[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _yaml_problem(e: BaseException) -> str:
    """A YAML error as one line: what is wrong, then where (PyYAML's own message spans several
    lines, quoting the offending text with a caret under it)."""
    if isinstance(e, (_YAMLDuplicateKey, _YAMLTooDeep)):
        return str(e)
    if isinstance(e, RecursionError):
        return "nested too deeply (a config nests a few levels)"
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        what = ": ".join(part for part in (e.context, e.problem) if part) or "syntax error"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"not valid YAML ({what}{where})"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"not valid YAML ({first})"


def _load_yaml(text: str) -> Any:
    """``yaml.load`` with ``_StrictLoader``; errors as raised (``_yaml_problem`` words them)."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 6
_REPR.maxlevel = 3


def _brief(value: Any) -> str:
    """``repr(value)`` cut short: a value quoted in an error stays one readable line (a YAML
    alias can make a list of a billion items that a full repr would take minutes to print)."""
    text = _REPR.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _printable(path: Any) -> str:
    """A path for an error line: bytes that are not UTF-8 as ``\\xff`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def setting(default: Any, help: str) -> Any:
    """A config field and its one-line help (what ``--list-keys`` prints)."""
    return dataclasses.field(default=default, metadata={"help": help})


def bounded(default: Any, low: float, high: float | None = None, *, help: str = "") -> Any:
    """A field whose value must lie in ``[low, high]`` (``None`` passes where the type allows
    it): ``config_from_dict`` names the key when it does not, before anything runs."""
    return dataclasses.field(default=default, metadata={"min": low, "max": high, "help": help})


def one_of(default: str, *choices: str, help: str = "") -> Any:
    """A string field whose value must be one of ``choices`` (the default first among them)."""
    return dataclasses.field(default=default, metadata={"choices": (default, *choices), "help": help})


@dataclass
class ModelConfig:
    """The trunk (``backbones.resnet`` arguments) shared by every task."""

    depth: int = setting(18, "ResNet depth: 18, 34, 50, 101 or 152")
    stem: str = setting("imagenet", "imagenet (7x7/2 conv + max-pool) | cifar (3x3/1, no pool: 28-64 px images) | "
                                    "deep (three 3x3 convs)")
    in_chans: int = setting(3, "input channels (1: grayscale); pretrained conv1 weights are adapted to it")
    output_stride: int = setting(32, "32 | 16 | 8: C5 (and C4 at 8) dilated instead of strided")
    norm: str = setting("bn", "bn | syncbn (statistics across torchrun processes) | frozen_bn | gn")
    freeze_at: int = bounded(0, 0, 5, help="freeze stem..C(k) (1: the stem): no gradients, frozen norm statistics")
    zero_init_residual: bool = setting(False, "start the last norm of every residual block at zero weight")
    drop_path_rate: float = bounded(0.0, 0.0, 1.0, help="stochastic depth of the deepest block (rising linearly to it)")
    grad_checkpointing: bool = setting(False, "recompute each block's activations in backward: less memory, more time")
    # the tests build narrow trunks with it; on Fashion-MNIST 48 / 96 measured 95.12% / 95.42% against 95.39% at 64
    # (docs/CONFIG.md); pretrained weights exist only for 64
    width: int = bounded(64, 1, help="stem channels; stage i has width * 2**i planes (64: the standard ResNet)")
    weights: Optional[str] = setting(None, "trunk weights: a file (torchvision / timm state dict, onetrunk checkpoint) "
                                           "or a name: imagenet, torchvision:<ENUM>, timm:<arch.tag>")
    trunk: Optional[str] = setting(None, "another run's checkpoint whose trunk starts this one (--trunk), "
                                         "loaded with a report")

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The mean / std the trunk's weights were trained with (``weights`` by name, or an
        onetrunk checkpoint in ``weights`` / ``trunk``), or None: the task's default then."""
        from backbones.pretrained import weights_normalization

        for source in (self.weights, self.trunk):
            found = weights_normalization(source, f"resnet{self.depth}", self.in_chans)
            if found is not None:
                return found
        return None

    def backbone_kwargs(self) -> dict[str, Any]:
        return dict(in_chans=self.in_chans, stem=self.stem, output_stride=self.output_stride, norm=self.norm,
                    freeze_at=self.freeze_at, zero_init_residual=self.zero_init_residual,
                    drop_path_rate=self.drop_path_rate, grad_checkpointing=self.grad_checkpointing,
                    width=self.width, weights=self.weights)


@dataclass
class DenseDataConfig:
    """Data of the dense tasks (detection, segmentation): FashionScenes or COCO files."""

    dataset: str = setting("scenes", "scenes (FashionScenes, generated) | coco (set by --train-ann) | "
                                     "voc (set by --voc-root)")
    train_ann: Optional[str] = setting(None, "COCO JSON of the training set (--train-ann)")
    train_images: Optional[str] = setting(None, "image folder of the training set (--train-images)")
    val_ann: Optional[str] = setting(None, "COCO JSON of the validation set (--val-ann)")
    val_images: Optional[str] = setting(None, "image folder of the validation set (--val-images)")
    voc_root: Optional[str] = setting(None, "Pascal VOC: VOCdevkit/ or VOCdevkit/VOC20xx/ (--voc-root)")
    voc_train: str = setting("train", "the VOC ImageSets split list to train on")
    voc_val: str = setting("val", "the VOC ImageSets split list to evaluate on")
    data_dir: Optional[str] = setting(None, "Fashion-MNIST folder, to generate FashionScenes from (--data-dir)")
    scenes_root: Optional[str] = setting(None, "FashionScenes folder (default: "
                                               "$ONETRUNK_DATA/scenes-<size>-<train>-<val>-s<seed>)")
    scenes_train: int = bounded(8000, 1, help="FashionScenes training scenes")
    scenes_val: int = bounded(1000, 1, help="FashionScenes validation scenes")
    scenes_size: int = bounded(256, 32, help="FashionScenes scene size in pixels (the longer side)")
    scenes_seed: int = setting(0, "FashionScenes generator seed (part of the folder name: another seed, other scenes)")
    scenes_aspect: Optional[tuple[float, float]] = setting(None, "crop scenes to width / height in [lo, hi] "
                                                                 "(photos that are not square)")
    # square: the longer side to image_size, training crops of image_size x image_size (FashionScenes);
    # aspect: the shorter side to one of min_size (per batch; evaluation: the last), the longer at
    # most max_size, images of similar aspect ratio batched together (a user's photos)
    resize: str = setting("square", "square (longer side to image_size, square training crops) | "
                                    "aspect (shorter side to min_size, batches of one aspect ratio)")
    image_size: int = bounded(256, 32, help="square: the longer side after resizing, and the training crop size")
    min_size: tuple[int, ...] = setting((800,), "aspect: the shorter side, one drawn per training batch "
                                                "(evaluation: the last)")
    max_size: int = bounded(1333, 32, help="aspect: the longer side at most")
    scale_min: float = setting(0.75, "square: smallest training scale jitter factor")
    scale_max: float = setting(1.25, "square: largest training scale jitter factor")
    hflip: bool = setting(True, "random horizontal flips in training")
    limit_train: Optional[int] = bounded(None, 1, help="train on a random subset of N samples drawn with "
                                                       "train.seed (classify: class-balanced; null: all; --limit-train)")
    limit_val: Optional[int] = bounded(None, 1, help="evaluate a random subset of N samples, as limit_train "
                                                     "(null: all; --limit-val)")
    num_workers: int = bounded(8, 0, help="DataLoader worker processes")
    skip_bad: bool = setting(False, "skip (and count) unreadable images instead of stopping")
    eval_batch_size: int = bounded(32, 1, help="images per evaluation batch")
    # device (kept in GPU memory) | host (pinned memory, copied per batch) | none (DataLoader workers,
    # albumentations) | auto (device on a GPU when the set takes under a quarter of its free memory, else none)
    cache: str = setting("auto", "square mode: training images decoded once, augmented on the GPU: "
                                 "auto | device | host | none")


@dataclass
class OptimConfig:
    name: str = setting("sgd", "sgd | adamw")
    lr: float = bounded(0.1, 0.0, help="peak learning rate")
    momentum: float = setting(0.9, "SGD momentum (OneCycle cycles it)")
    nesterov: bool = setting(True, "SGD with Nesterov momentum")
    weight_decay: float = bounded(5e-4, 0.0, help="weight decay of conv and linear weights (norm weights and "
                                                  "biases: none)")
    norm_weight_decay: float = bounded(0.0, 0.0, help="weight decay of norm weights and biases (torchvision's "
                                                     "--norm-weight-decay)")
    schedule: str = setting("cosine", "cosine | onecycle | constant (per step)")
    warmup_epochs: float = bounded(1.0, 0.0, help="linear warm-up epochs (onecycle: its rising phase)")
    label_smoothing: float = bounded(0.0, 0.0, 1.0, help="classification: label smoothing of the cross-entropy")
    clip_grad_norm: Optional[float] = bounded(None, 0.0, help="clip the gradient norm to this (null: no clipping)")
    trunk_lr_mult: float = bounded(1.0, 0.0, help="the trunk's learning rate as a fraction of lr (fine-tuning)")
    ema: bool = setting(False, "evaluate and save an exponential moving average of the weights")
    ema_decay: float = bounded(0.999, 0.0, 1.0, help="with ema: the average's decay per step")


@dataclass
class TrainConfig:
    """How the run trains. The switches marked "resolved" are written to config.yaml (and the
    checkpoints) as the run used them: a switch this run cannot use is false there, and the
    console says why when the recipe or a --set asked for it."""

    epochs: int = bounded(10, 1, help="training epochs")
    batch_size: int = bounded(256, 1, help="images per step and process (torchrun, N processes: N x batch_size)")
    accumulate: int = bounded(1, 1, help="gradient accumulation: one optimizer step per K batches (effective batch "
                                         "K x batch_size per process; the schedule, guard and log_every count "
                                         "optimizer steps; an epoch's last group may be shorter)")
    amp: bool = setting(True, "autocast to amp_dtype on CUDA; resolved: false on the CPU (fp32 there)")
    # the training step's autocast dtype. float16 adds dynamic loss scaling (GradScaler; no host
    # sync with the fused optimizers) and sends BatchNorm to cuDNN, which PyTorch does not use for
    # bf16: ResNet-18 at 28x28, batch 256, BN forward + backward 1.00 ms per step against 1.55
    # (H200, docs/BENCHMARKS.md). Evaluation and inference stay bf16.
    amp_dtype: str = one_of("bfloat16", "float16", help="the training step's autocast dtype (float16: loss "
                                                        "scaling, cuDNN BatchNorm); evaluation stays bfloat16")
    compile: bool = setting(False, "torch.compile the training step (--compile)")
    compile_tune: bool = setting(False, "with compile: inductor's coordinate-descent kernel tuning "
                                        "(minutes more compiling)")
    # measured (H100, Fashion-MNIST): first epoch 4.8 s against 23.5 s cold (docs/BENCHMARKS.md)
    compile_cache: Optional[str] = setting(None, "with compile: a torch.compiler cache-artifacts file, read "
                                                 "before compiling, written after epoch 1 when it did not load")
    cuda_graph: bool = setting(False, "replay the training step (forward + loss + backward) as one CUDA graph; "
                                      "resolved: false off CUDA, for batches of varying shape, for syncbn "
                                      "under torchrun, with accumulate > 1")
    graph_eval: bool = setting(False, "evaluate through CUDA graphs of the model (network + device "
                                      "post-processing); resolved: false off CUDA and for varying shapes")
    compile_inference: bool = setting(False, "with graph_eval: compile what evaluation replays (about 20 s "
                                             "more); resolved: false without graph_eval")
    channels_last: bool = setting(True, "channels_last memory format for the model and its batches")
    seed: int = setting(0, "seed of the initial weights, the data order and the augmentation")
    device: str = setting("auto", "auto (CUDA when available) | cpu | cuda | cuda:N; kept as asked, so that a "
                                  "checkpoint moves between machines (the first line names the device)")
    eval_every: int = bounded(1, 1, help="epochs between evaluations (the last epoch always evaluates)")
    save_every: int = bounded(1, 1, help="epochs between last.pt writes (the last epoch always saves)")
    patience: Optional[int] = bounded(None, 1, help="early stopping: end the run once the validation metric best.pt "
                                      "follows has not improved for N epochs (checked at evaluations, so with "
                                      "eval_every k after up to N + k - 1); null: off")
    log_every: int = bounded(50, 1, help="steps between progress-bar loss updates (each costs a device sync)")
    log_seconds: float = bounded(30.0, 0.0, help="without a terminal (output to a file or a CI log): a progress line "
                                 "(epoch, step, loss, img/s, ETA) at least every N seconds, at log points; 0: off")
    cudnn_benchmark: bool = setting(True, "cuDNN autotuning of each new convolution shape; resolved: false "
                                          "off CUDA and for batches of varying shape")
    tensorboard: bool = setting(False, "also write each epoch's scalars to <output>/tensorboard "
                                       "(extra [tensorboard])")
    guard: bool = setting(True, "stop a run that is not learning (diverging loss, frozen loss term, metric at "
                                "0 after warm-up); non-finite values always stop it")


# ----------------------------------------------------------------------------- (de)serialising

def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed (expected {getattr(tp, '__name__', tp)})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {_brief(value)}")
        return config_from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_brief(value)}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        seq = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {_brief(value)}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {_brief(value)}")
        if not math.isfinite(number):  # .nan / inf would train silently wrong
            raise ConfigError(f"{where}: expected a finite number, got {_brief(value)}")
        return number
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {_brief(value)}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {_brief(value)}")
    return value


def config_from_dict(cls: type, data: dict[str, Any], where: str = "config:") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``ConfigError`` naming them."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for section, part in data.items():  # a removed key: why it went, rather than "unknown"
        tp = _strip_optional(hints.get(section))[0] if section in names else None
        if isinstance(part, dict) and dataclasses.is_dataclass(tp):
            for key in part:
                if f"{section}.{key}" in REMOVED_KEYS and key not in _names(tp):
                    raise ConfigError(f"{where.rstrip(':')}: {removed_key_message(f'{section}.{key}')}")
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where.rstrip(':')}: unknown key {_brief(unknown[0])}; valid keys: {', '.join(names)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{where} {k}" if where.endswith(":") else f"{where}.{k}"
        kwargs[k] = _check_bounds(_coerce(v, hints[k], key), fields[k].metadata, key)
    return cls(**kwargs)


def _check_bounds(value: Any, meta: Any, where: str) -> Any:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {_brief(value)} is not one of {', '.join(map(repr, choices))}")
    low, high = meta.get("min"), meta.get("max")
    if value is None or (low is None and high is None):
        return value
    if (low is not None and value < low) or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{where}: {_brief(value)} is out of range, expected a value {span}")
    return value


def config_keys(cls: type) -> list[tuple[str, Any, str]]:
    """``(section.key, default, one-line help)`` for every key of the task config ``cls``, in
    declaration order (the help is each field's ``metadata["help"]``)."""
    rows = []
    for section in dataclasses.fields(cls):
        tp = _strip_optional(typing.get_type_hints(cls)[section.name])[0]
        defaults = config_to_dict(tp())
        for f in dataclasses.fields(tp):
            rows.append((f"{section.name}.{f.name}", defaults[f.name], f.metadata.get("help", "")))
    return rows


def format_keys(cls: type) -> str:
    """``--list-keys``: one line per key, ``key = default`` then its help, as YAML writes values."""
    def show(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("\n...").strip()

    rows = [(key, show(default), text) for key, default, text in config_keys(cls)]
    width = max(len(f"{k} = {d}") for k, d, _ in rows)
    return "\n".join(f"{f'{k} = {d}':<{width}}  {text}" for k, d, text in rows)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain (YAML / ``weights_only``-safe) dict: tuples become lists."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def merge_dicts(base: dict[str, Any], update: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``update`` over ``base``, recursively. A section on one side and a plain value on the
    other is a ``ConfigError``: merging it either way would drop a whole section silently."""
    out = dict(base)
    for k, v in update.items():
        old, key = out.get(k), f"{where}.{k}" if where else k
        if isinstance(v, dict) and isinstance(old, dict):
            out[k] = merge_dicts(old, v, key)
        elif isinstance(v, dict) != isinstance(old, dict) and old is not None and k in out:
            section, value = (key, old) if isinstance(v, dict) else (key, v)
            raise ConfigError(f"{section}: {_brief(value)} where a section of settings is expected "
                              f"(set its keys, e.g. {section}.<key>=...)")
        else:
            out[k] = v
    return out


def _check_path(cls: type, key: str, value: Any, item: str) -> None:
    """``--set key=value`` against the config's schema: every part a field, sections given
    mappings, so that a typo or a scalar in place of a section is named at once."""
    tp: Any = cls
    parts = key.split(".")
    for i, part in enumerate(parts):
        tp, _ = _strip_optional(tp)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"--set {item}: {'.'.join(parts[:i])} is a value, not a section")
        names = [f.name for f in dataclasses.fields(tp)]
        if part not in names:
            if ".".join(parts[:i + 1]) in REMOVED_KEYS:
                raise ConfigError(f"--set {_brief(item)}: {removed_key_message('.'.join(parts[:i + 1]))}")
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"--set {item}: unknown key {part!r} in {where}; valid keys: {', '.join(names)}")
        tp = typing.get_type_hints(tp)[part]
    tp, _ = _strip_optional(tp)
    if dataclasses.is_dataclass(tp) and not isinstance(value, dict):
        fields = ", ".join(f.name for f in dataclasses.fields(tp))
        raise ConfigError(f"--set {item}: {key} is a section ({fields}); set one of its keys, "
                          f"e.g. --set {key}.{dataclasses.fields(tp)[0].name}=...")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], cls: type | None = None) -> dict[str, Any]:
    """Apply ``a.b=c`` strings (values parsed as YAML: ``true``, ``0.1``, ``[1, 2]``, ``null``);
    with ``cls`` (the config dataclass) each key is checked against it first."""
    out = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {_brief(item)}: expected key=value, e.g. --set model.depth=50")
        key, raw = item.split("=", 1)
        try:
            value = _load_yaml(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"--set {_brief(item)}: cannot parse the value: {_yaml_problem(e)}") from None
        if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
            value = raw  # "path/with: colon" is a string, not a mapping
        if cls is not None:
            _check_path(cls, key.strip(), value, item)
        nested: Any = value
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        out = merge_dicts(out, nested)
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config file's top-level mapping. Every problem is one ``ConfigError`` line that
    names the file: missing or unreadable, not UTF-8 text, not YAML (with line and column), a
    key given twice in one mapping (both lines), nesting deeper than a config ever needs."""
    path = Path(path)
    name = _printable(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {name}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{name}: cannot read the config file ({e.strerror or type(e).__name__})") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is fine
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): not a YAML "
                          f"config file?") from None
    try:
        data = _load_yaml(text)
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"{name}: {_yaml_problem(e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type, path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                base: dict[str, Any] | None = None) -> Any:
    """Defaults of ``cls`` <- ``base`` (e.g. a checkpoint's config) <- YAML file <- overrides."""
    data: dict[str, Any] = dict(base or {})
    where = "config:"
    if path is not None:
        data = merge_dicts(data, read_yaml(path))
        where = f"{path}:"
    data = apply_overrides(data, overrides, cls)
    return config_from_dict(cls, data, where)
