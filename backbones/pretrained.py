"""Pretrained trunks by name, through the libraries' own caches, offline first.

``weights=`` names (the depth is the model's):

* ``torchvision:IMAGENET1K_V1`` / ``torchvision:IMAGENET1K_V2`` / ``torchvision:DEFAULT``:
  torchvision's weight enum for that ResNet (``ResNet50_Weights.IMAGENET1K_V2`` ...); the file
  is torch.hub's: ``$TORCH_HOME/hub/checkpoints/<name>-<hash>.pth``, downloaded on first use
  (torch.hub checks the hash in the file name and shows a progress bar).
* ``timm:<arch>.<tag>`` (e.g. ``timm:resnet50.a1_in1k``): timm's pretrained config; the file is
  the Hugging Face hub cache's (``$HF_HOME/hub/models--timm--<name>/...``, ``HF_HUB_OFFLINE``
  honoured), downloaded on first use.
* ``imagenet``: ``torchvision:DEFAULT``.

Nothing is downloaded when the file is cached. Offline (``HF_HUB_OFFLINE=1`` /
``ONETRUNK_OFFLINE=1``, or the host does not answer within a few seconds) and not cached: a
one-line ``FileNotFoundError`` naming the file, the folder to put it in and its URL. The
weights' own normalisation (``mean`` / ``std`` of the enum's transforms or timm's config) is
what the task layer then feeds the trunk.
"""
from __future__ import annotations

import difflib
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlparse

__all__ = ["NamedWeights", "is_named", "weights_info", "resolve", "source", "weights_normalization"]

_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class NamedWeights:
    """What a weights name stands for: where its file comes from and how its inputs were normalised."""

    name: str                      # as given: "torchvision:IMAGENET1K_V2"
    library: str                   # torchvision | timm
    arch: str                      # "resnet50"
    url: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hf_repo: str | None = None     # timm: the Hugging Face repo ("timm/resnet50.a1_in1k")
    filename: str | None = None    # torchvision: the torch.hub file name


def is_named(spec: Any) -> bool:
    return isinstance(spec, str) and (spec == "imagenet" or spec.startswith(("torchvision:", "timm:")))


def _did_you_mean(value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.75) or \
        [c for c in choices if c.lower() == value.lower()]
    return f" (did you mean {close[0]}?)" if close else ""


def weights_info(spec: str, arch: str) -> NamedWeights:
    """The ``NamedWeights`` of ``spec`` for a ``resnet<depth>`` trunk, from the libraries'
    metadata alone (no file needed, nothing downloaded); a name that does not exist is a
    one-line ``ValueError`` naming it and listing the ones that do."""
    if spec == "imagenet":
        spec = "torchvision:DEFAULT"
    library, _, tag = spec.partition(":")
    if library == "torchvision":
        import torchvision

        try:
            enum = torchvision.models.get_model_weights(arch)
        except (ValueError, KeyError):
            raise ValueError(f"weights {spec!r}: torchvision has no weights for a {arch}") from None
        valid = ["torchvision:" + m for m in enum.__members__]
        if tag not in enum.__members__:
            raise ValueError(f"weights {spec!r}: torchvision has no {tag!r} weights for {arch}; "
                             f"choose one of {', '.join(valid)}{_did_you_mean('torchvision:' + tag, valid)}")
        w = enum[tag]
        transforms = w.transforms()
        return NamedWeights(spec, "torchvision", arch, w.url, tuple(transforms.mean), tuple(transforms.std),
                            filename=os.path.basename(urlparse(w.url).path))
    if library == "timm":
        import timm
        from timm.models import get_pretrained_cfg, split_model_name_tag

        valid = ["timm:" + name for name in timm.list_pretrained(f"{arch}.*")]
        choose = f"choose one of {', '.join(valid)}" if valid else f"timm lists no pretrained {arch}"
        model_arch, _ = split_model_name_tag(tag)
        if not model_arch:
            raise ValueError(f"weights {spec!r}: expected timm:<arch>.<tag>; for this {arch} trunk {choose}")
        if model_arch != arch:
            if not timm.is_model(model_arch):
                raise ValueError(f"weights {spec!r}: timm has no model {model_arch!r}; for this {arch} trunk "
                                 f"{choose}{_did_you_mean('timm:' + tag, valid)}")
            raise ValueError(f"weights {spec!r} are for a timm {model_arch}, this trunk is a {arch}: "
                             f"name a {arch} tag (e.g. timm:{arch}.a1_in1k) or build a {model_arch}")
        try:  # timm raises a RuntimeError for an unknown tag of a known model
            cfg = get_pretrained_cfg(tag)
        except Exception:  # noqa: BLE001 - whatever timm raises, the name is not one it has
            cfg = None
        if cfg is None:
            raise ValueError(f"weights {spec!r}: timm has no pretrained tag {tag.partition('.')[2]!r} for {arch}; "
                             f"{choose}{_did_you_mean('timm:' + tag, valid)}")
        url = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
        if not url:
            raise ValueError(f"weights {spec!r}: timm gives no download location for them; {choose}")
        return NamedWeights(spec, "timm", arch, url, tuple(cfg.mean), tuple(cfg.std), hf_repo=cfg.hf_hub_id,
                            filename=None if cfg.hf_hub_id else os.path.basename(urlparse(cfg.url).path))
    raise ValueError(f"weights {spec!r}: expected torchvision:<ENUM>, timm:<arch.tag>, imagenet or a file")


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("ONETRUNK_OFFLINE", "HF_HUB_OFFLINE"))


def _reachable(url: str) -> bool:
    """Whether ``url``'s host accepts a connection within a few seconds: without it a
    download on a machine with no route out could wait far longer before failing. The probe
    runs on a thread of its own: the name lookup before the connection takes no timeout (a
    name server that does not answer: glibc tries twice, 5 s each, per server)."""
    parsed = urlparse(url)
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                     timeout=_PROBE_TIMEOUT_S).close()
            answer.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, name="weights-host-probe", daemon=True)
    thread.start()
    thread.join(_PROBE_TIMEOUT_S)
    return bool(answer)


def _not_available(info: NamedWeights, what: str, folder: str) -> FileNotFoundError:
    return FileNotFoundError(f"weights {info.name}: {what} is not in the cache {folder} and cannot be downloaded "
                             f"here (offline); put it there (from {info.url})")


def _download_failed(info: NamedWeights, what: str, folder: str, error: BaseException) -> FileNotFoundError:
    """A failed download (HTTP error, broken connection, wrong hash) as one line: the libraries'
    messages span several lines, or say nothing of which weights they were fetching."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {' '.join(lines)[:300]}" if lines else type(error).__name__
    return FileNotFoundError(f"weights {info.name}: downloading {what} from {info.url} failed ({reason}); "
                             f"retry, or put the file in the cache {folder}")


def _hf_cache() -> str:
    # read at call time: huggingface_hub reads HF_HOME once, when it is imported
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                     os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(home, "hub")


_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def _hub_file(info: NamedWeights) -> tuple[str, str]:
    """(the torch.hub checkpoints folder, the file's path in it), for weights without a hub repo."""
    import torch

    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    return folder, os.path.join(folder, info.filename)


def _cached(info: NamedWeights) -> str | None:
    """The cached file of ``info``, or None: torch.hub's checkpoints folder, or the Hugging Face
    hub cache (either of ``_HUB_FILES``; None without huggingface_hub)."""
    if info.hf_repo is None:
        path = _hub_file(info)[1]
        return path if os.path.isfile(path) else None
    try:
        import huggingface_hub
    except ImportError:
        return None
    for filename in _HUB_FILES:
        try:
            return huggingface_hub.hf_hub_download(info.hf_repo, filename, cache_dir=_hf_cache(), local_files_only=True)
        except Exception:  # noqa: BLE001 - huggingface_hub's "not cached" errors differ between versions
            continue
    return None


def _downloadable(info: NamedWeights) -> bool:
    """Not offline, and the host of ``info`` answers (a probe of a few seconds at most)."""
    return not _offline() and _reachable(info.url if info.hf_repo is None else "https://huggingface.co")


def resolve(spec: str, arch: str) -> tuple[NamedWeights, str | Mapping[str, Any]]:
    """``(info, weights)`` of a name: ``weights`` is the cached file's path (torch.hub) or the
    state dict read from the hub cache (timm's safetensors), downloading first where allowed."""
    import torch

    info = weights_info(spec, arch)
    if info.hf_repo is None:  # a torch.hub file (torchvision's, or a timm tag without a hub repo)
        cached = _cached(info)
        if cached:
            return info, cached
        folder, path = _hub_file(info)
        if not _downloadable(info):
            raise _not_available(info, info.filename, folder)
        os.makedirs(folder, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(info.filename)
        try:  # torch.hub writes a temporary file and renames it only once complete and hash-checked
            torch.hub.download_url_to_file(info.url, path, match.group(1) if match else None, progress=True)
        except Exception as e:  # noqa: BLE001 - urllib / hash errors: one line naming the weights
            raise _download_failed(info, info.filename, folder, e) from None
        return info, path

    try:
        import huggingface_hub
    except ImportError:
        raise _missing_hub_package("huggingface_hub", info.name) from None

    cache = _hf_cache()
    cached = _cached(info)
    if cached:
        return info, _read_hub_file(cached)
    if not _downloadable(info):
        raise _not_available(info, f"{info.hf_repo} ({' or '.join(_HUB_FILES)})", cache)
    try:
        downloaded = huggingface_hub.hf_hub_download(info.hf_repo, _HUB_FILES[0], cache_dir=cache)
    except Exception as e:  # noqa: BLE001 - HTTP / repository errors: one line naming the weights
        raise _download_failed(info, f"{info.hf_repo}/{_HUB_FILES[0]}", cache, e) from None
    return info, _read_hub_file(downloaded)


def source(spec: str, arch: str, *, network: bool = True) -> str | None:
    """Where ``resolve`` would take the weights of ``spec`` from: ``"cache"``, ``"download"``
    (not offline and the host answers: a probe of a few seconds at most; only with ``network``)
    or None (neither: ``resolve`` would raise)."""
    info = weights_info(spec, arch)
    if _cached(info) is not None:
        return "cache"
    return "download" if network and _downloadable(info) else None


def _missing_hub_package(package: str, what: str) -> ValueError:
    """huggingface_hub / safetensors are dependencies of onetrunk (and of timm), missing only where
    they were left out of the install: one line saying what to install (a ValueError, so that
    run_cli prints it as one line)."""
    return ValueError(f"{what}: timm weights from the Hugging Face hub need the {package} package, which is "
                      f"not installed (onetrunk depends on it): pip install {package}")


def _read_hub_file(path: str) -> str | Mapping[str, Any]:
    """A hub file's weights: a safetensors file read here (a damaged one is a ``ValueError``
    naming it), a pickle file's path for ``read_checkpoint``'s safe loader."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise _missing_hub_package("safetensors", path) from None

        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError ... on a damaged file
            detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"{path} is not a readable safetensors file (corrupt or cut short: {detail}); delete "
                             f"it so that it is downloaded again") from None
    return path


def weights_normalization(spec: Any, arch: str, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """How the inputs of the trunk that ``spec`` loads were normalised, for ``in_chans``
    channels: a name's (its enum's transforms, timm's config), an onetrunk checkpoint's own
    (``meta``: a trunk trained here keeps its normalisation), None for anything else (a plain
    state dict says nothing). RGB statistics become their mean for one channel; gray ones are
    repeated for three (as ``adapt_input_conv`` adapts the first conv)."""
    if spec is None or isinstance(spec, Mapping):
        return None
    if is_named(spec):
        info = weights_info(spec, arch)
        mean, std = info.mean, info.std
    else:
        from .weights import CKPT_FORMAT, read_checkpoint

        ckpt = read_checkpoint(spec)
        meta = (ckpt.get("meta") or {}) if ckpt.get("format") == CKPT_FORMAT else {}
        if not meta.get("mean") or not meta.get("std"):
            return None
        mean, std = tuple(meta["mean"]), tuple(meta["std"])
    if len(mean) != in_chans:
        mean, std = ((sum(mean) / len(mean),), (sum(std) / len(std),)) if in_chans == 1 else \
            (tuple(mean) * in_chans, tuple(std) * in_chans)
    return tuple(float(v) for v in mean[:in_chans]), tuple(float(v) for v in std[:in_chans])
