"""Loading trunk weights from local files: torchvision, timm and onetrunk checkpoints.

Everything is read with ``torch.load(weights_only=True)``: a file that would run code while
unpickling is refused, never executed. Keys are matched by name and shape and the result is
reported (loaded / adapted / missing / unexpected / shape-mismatched) instead of loading
silently wrong.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

__all__ = [
    "UnsafeCheckpointError",
    "WeightsMismatchError",
    "LoadReport",
    "read_checkpoint",
    "extract_backbone_state",
    "adapt_input_conv",
    "load_backbone_weights",
]

CKPT_FORMAT = "onetrunk-ckpt-1"
# Wrappers that prefix every key: DDP ("module."), torch.compile ("_orig_mod."), and the
# attribute under which task models and torchvision's BackboneWithFPN keep their trunk.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_TRUNK_PREFIXES = ("backbone.body.", "backbone.", "body.", "trunk.")
# Keys that never decide whether a load is right: BN step counters.
_IGNORABLE_SUFFIXES = ("num_batches_tracked",)


class UnsafeCheckpointError(ValueError):
    """The file is not a plain weights file: unpickling it would need (and could run) code."""


class WeightsMismatchError(ValueError):
    """The weights do not fit the model (missing keys or shapes that differ)."""


@dataclass
class LoadReport:
    """What a weights load did. ``str(report)`` gives a short human-readable summary."""

    source: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched

    def __str__(self) -> str:
        lines = [f"weights from {self.source} ({self.kind}): {len(self.loaded)} tensors loaded"]
        if self.adapted:
            lines.append(f"  adapted: {', '.join(self.adapted)}")
        if self.missing:
            lines.append(f"  missing (left at init): {_short(self.missing)}")
        if self.mismatched:
            shown = [f"{k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched]
            lines.append(f"  shape mismatch (not loaded): {_short(shown)}")
        if self.unexpected:
            lines.append(f"  unused from checkpoint: {_short(self.unexpected)}")
        return "\n".join(lines)


def _short(items: list[str], n: int = 8) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def read_checkpoint(source: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    """Load a checkpoint file safely (``weights_only=True``), or pass a mapping through."""
    if isinstance(source, Mapping):
        return source
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is not a plain weights file and unpickling it would "
            f"need code ({str(e).splitlines()[0]}). Re-save it as a state dict of tensors."
        ) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"cannot read weights file {path}: {e}") from None


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def extract_backbone_state(obj: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Find the trunk's state dict inside a checkpoint; return it with a description.

    Understands onetrunk checkpoints (the EMA weights when present, else ``model``, keys under
    ``backbone.``), timm training checkpoints (``state_dict_ema`` / ``state_dict``), bare
    torchvision / timm ResNet state dicts, and DDP / ``torch.compile`` key prefixes.
    """
    kind = "state dict"
    if obj.get("format") == CKPT_FORMAT:
        task = obj.get("task", "?")
        if obj.get("ema") is not None:
            obj, kind = obj["ema"], f"onetrunk {task} checkpoint, EMA weights"
        else:
            obj, kind = obj["model"], f"onetrunk {task} checkpoint"
    else:
        for key in ("state_dict_ema", "state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj, kind = obj[key], f"checkpoint[{key!r}]"
                break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError("no tensors found in the checkpoint: expected a ResNet state dict")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = _strip(state, prefix)
    for prefix in _TRUNK_PREFIXES:
        trunk = _strip(state, prefix)
        if trunk and any(k.startswith(("conv1", "layer1")) for k in trunk):
            state = trunk
            break
    if kind == "state dict":
        kind = "torchvision/timm ResNet state dict" if "fc.weight" in state else "ResNet state dict"
    return state, kind


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-conv weight ``[O, I, k, k]`` to ``in_chans`` input channels.

    To one channel: sum over input channels, so a gray image gives exactly what the source
    model gives on that image replicated to ``I`` channels. From one channel, or to more
    channels: repeat and rescale so the response to a replicated gray image is unchanged.
    """
    src = weight.shape[1]
    if src == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // src)  # ceil
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (src / in_chans)


def load_backbone_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    first_conv: str = "conv1.weight",
    strict: bool = True,
    verbose: bool = True,
) -> LoadReport:
    """Load trunk weights from ``source`` into ``model`` and report what happened.

    ``strict`` raises ``WeightsMismatchError`` naming the keys when a model tensor is missing
    from the checkpoint or has another shape; with ``strict=False`` those stay at their
    initial values and are listed in the report. Keys the model does not have (``fc``, extra
    heads, stages not built) are reported as unused.
    """
    name = source if not isinstance(source, Mapping) else "<state dict>"
    state, kind = extract_backbone_state(read_checkpoint(source))
    report = LoadReport(source=str(name), kind=kind)
    own = model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        if key not in state:
            if not key.endswith(_IGNORABLE_SUFFIXES):
                report.missing.append(key)
            continue
        value = state[key]
        if key == first_conv and value.dim() == 4 and value.shape[1] != target.shape[1]:
            value = adapt_input_conv(value, target.shape[1])
            report.adapted.append(f"{key} {state[key].shape[1]}->{target.shape[1]} input channels")
        if value.shape != target.shape:
            report.mismatched.append((key, tuple(state[key].shape), tuple(target.shape)))
            continue
        to_load[key] = value.to(dtype=target.dtype)
        report.loaded.append(key)
    report.unexpected = [k for k in state if k not in own]
    if strict and not report.ok:
        raise WeightsMismatchError(
            f"weights from {name} do not fit this {type(model).__name__}:\n{report}"
        )
    model.load_state_dict(to_load, strict=False)
    if verbose:
        print(report)
    return report
