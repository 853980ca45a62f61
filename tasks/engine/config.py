"""Typed run configuration: dataclasses hold every default, YAML and ``--set`` only override.

Unknown keys are an error that names the key and the valid ones, so a typo in a recipe
never silently trains the default instead.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

__all__ = ["ConfigError", "ModelConfig", "DenseDataConfig", "OptimConfig", "TrainConfig", "load_config", "apply_overrides",
           "config_to_dict", "config_from_dict", "CONFIG_ROOT"]

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A config file or override is wrong: unknown key, bad type, unreadable file."""


@dataclass
class ModelConfig:
    """The trunk (``backbones.resnet`` arguments) shared by every task."""

    depth: int = 18                # ResNet-18/34/50/101/152
    stem: str = "imagenet"         # imagenet | cifar | deep
    in_chans: int = 3
    output_stride: int = 32
    norm: str = "bn"               # bn | syncbn | frozen_bn | gn
    freeze_at: int = 0
    zero_init_residual: bool = False
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    weights: Optional[str] = None  # trunk weights: torchvision / timm / onetrunk checkpoint

    def backbone_kwargs(self) -> dict[str, Any]:
        return dict(in_chans=self.in_chans, stem=self.stem, output_stride=self.output_stride, norm=self.norm,
                    freeze_at=self.freeze_at, zero_init_residual=self.zero_init_residual,
                    drop_path_rate=self.drop_path_rate, grad_checkpointing=self.grad_checkpointing,
                    weights=self.weights)


@dataclass
class DenseDataConfig:
    """Data of the dense tasks (detection, segmentation): FashionScenes or COCO files."""

    dataset: str = "scenes"             # scenes | coco (set by --train-ann)
    train_ann: Optional[str] = None
    train_images: Optional[str] = None
    val_ann: Optional[str] = None
    val_images: Optional[str] = None
    data_dir: Optional[str] = None      # Fashion-MNIST, to generate FashionScenes
    scenes_root: Optional[str] = None   # default: $ONETRUNK_DATA/scenes-<size>-<train>-<val>-s<seed>
    scenes_train: int = 8000
    scenes_val: int = 1000
    scenes_size: int = 256
    scenes_seed: int = 0
    image_size: int = 256               # longest side after resizing; training crops are square
    scale_min: float = 0.75             # training scale jitter
    scale_max: float = 1.25
    hflip: bool = True
    limit_train: Optional[int] = None
    limit_val: Optional[int] = None
    num_workers: int = 8
    skip_bad: bool = False              # skip (and count) unreadable images instead of stopping
    eval_batch_size: int = 32


@dataclass
class OptimConfig:
    name: str = "sgd"              # sgd (nesterov by default) | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    norm_weight_decay: float = 0.0  # norm and bias parameters: decay hurts them
    schedule: str = "cosine"       # cosine | onecycle | constant
    warmup_epochs: float = 1.0     # linear warm-up (cosine / constant)
    final_lr_ratio: float = 0.0    # last lr as a fraction of lr
    label_smoothing: float = 0.0
    clip_grad_norm: Optional[float] = None
    ema: bool = False              # evaluate and save an exponential moving average of the weights
    ema_decay: float = 0.999


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256          # per GPU: torchrun with N processes steps on N x batch_size images
    amp: bool = True               # bf16 autocast on CUDA; fp32 on CPU
    compile: bool = False
    compile_tune: bool = False     # with compile: inductor's coordinate-descent kernel tuning (minutes more compile)
    cuda_graph: bool = False       # replay forward + backward as one CUDA graph (fixed batch shapes)
    channels_last: bool = True
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    eval_every: int = 1
    save_every: int = 1            # epochs between last.pt writes (the final epoch always saves)
    log_every: int = 50            # steps between progress-bar loss updates (each costs a device sync)
    cudnn_benchmark: bool = True
    tensorboard: bool = False      # also write each epoch's scalars to <output>/tensorboard (extra [tensorboard])


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
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return config_from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
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
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def config_from_dict(cls: type, data: dict[str, Any], where: str = "config:") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``ConfigError`` naming them."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where} {k}" if where.endswith(":") else f"{where}.{k}")
              for k, v in data.items()}
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain (YAML / ``weights_only``-safe) dict: tuples become lists."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` strings (values parsed as YAML: ``true``, ``0.1``, ``[1, 2]``, ``null``)."""
    out = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set model.depth=50")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: cannot parse the value ({e})") from None
        if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
            value = raw  # "path/with: colon" is a string, not a mapping
        nested: Any = value
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        out = merge_dicts(out, nested)
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type, path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                base: dict[str, Any] | None = None) -> Any:
    """Defaults of ``cls`` <- ``base`` (e.g. a checkpoint's config) <- YAML file <- overrides."""
    data: dict[str, Any] = dict(base or {})
    where = "config:"
    if path is not None:
        data = merge_dicts(data, read_yaml(path))
        where = f"{path}:"
    data = apply_overrides(data, overrides)
    return config_from_dict(cls, data, where)
