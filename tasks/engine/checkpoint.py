"""Checkpoints: one dict format for every task, written atomically, read with ``weights_only``.

``{"format": "onetrunk-ckpt-1", "task", "config", "model", "optimizer", "scheduler", "epoch",
"metrics", "rng", "meta"}`` plus ``"ema"`` (the averaged weights, or None), and
``"steps_per_epoch"`` / ``"world_size"`` (a resume with another number of processes moves the
schedule). ``"meta"`` is what inference needs without the data (``read_meta``): ``class_names``,
``category_ids`` (detection), ``in_chans``, ``mean``, ``std``, ``preprocess``. Writing happens on a background thread from a CPU copy of the state, so a save
costs the training loop only the device-to-host copy; a crash mid-write leaves the previous
file intact (temp + replace). Under torchrun only rank 0 writes, with its own RNG state.

A predict-only checkpoint (``python -m tasks.export --format predict``) has the same format with
``"model"`` in float16, ``"ema": None``, no optimizer / schedule / RNG state, and
``"predict_only"`` set: it loads for inference like any other, ``--resume`` refuses it
(``check_resumable``).
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from backbones.weights import CKPT_FORMAT, read_checkpoint, state_checksum

__all__ = ["CKPT_FORMAT", "PREDICT_ONLY", "check_resumable", "write_atomic", "new_temp", "remove_stale_temps", "process_alive", "write_error", "atomic_save", "load_checkpoint", "model_state", "CheckpointWriter",
           "rng_state", "set_rng_state", "seed_everything", "to_cpu"]


def to_cpu(obj: Any) -> Any:
    """A detached CPU copy of every tensor in a nested structure."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def write_error(path: Path, error: BaseException) -> OSError:
    """One line for a failed write: "no space left" when the disk is full (torch.save then
    fails deep in its zip writer with "unexpected pos", never saying so)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = getattr(error, "errno", None) == errno.ENOSPC or (free is not None and free < 16 * 2 ** 20)
    if full:
        left = f" ({free / 2 ** 20:.1f} MiB free)" if free is not None else ""
        return OSError(errno.ENOSPC, f"cannot write {path}: no space left on device{left}; the previous "
                                     f"file (if any) is unchanged")
    reason = (str(error).splitlines() or [type(error).__name__])[0]
    return OSError(f"cannot write {path}: {reason}")


# ".<stem>.tmp<pid>[-n]<suffix>": the name new_temp gives a temp file
TEMP_NAME = re.compile(r"\.(?P<stem>.+)\.tmp(?P<pid>\d+)(?:-\d+)?(?P<suffix>\.[^.]*)?")


def new_temp(path: str | os.PathLike) -> Path:
    """A new, empty temp file beside ``path`` (``.<stem>.tmp<pid><suffix>``: the suffix may
    pick the format; the pattern ``remove_stale_temps`` knows). Created with ``O_EXCL`` (and
    ``O_NOFOLLOW``), so the write that follows goes into a file made here: a link or a file
    that already has the name is never written through or truncated (another name is taken)."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for n in range(100):
        tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{f'-{n}' if n else ''}{path.suffix}")
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot write {path}: 100 temp names beside it are taken")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Any:
    """``write(tmp)`` into a new temp file beside ``path`` (``new_temp``), then ``os.replace``
    over ``path``; returns what ``write`` returned. The name is replaced: a link of that name
    is replaced, never written through, and a file hard-linked elsewhere keeps its bytes. A
    crash or a full disk leaves the previous file intact and no temp file behind (a killed
    process's is removed by the next run: ``remove_stale_temps``); a failed write is one
    ``OSError`` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_temp(path)
        result = write(tmp)
        os.replace(tmp, path)
        tmp = None
        return result
    except (OSError, RuntimeError) as e:  # RuntimeError: torch's zip writer on a full disk
        raise write_error(path, e) from None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            tmp.unlink()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OSError, OverflowError):
        return False
    return True


def remove_stale_temps(folder: str | os.PathLike, keep: set[Path] = frozenset()) -> None:
    """Delete the temp files of killed writes in ``folder`` (``new_temp``'s names whose
    process is gone), and only those: not another file that happens to start with a dot, not a
    folder, not a path in ``keep`` (resolved), nor the temp file of a process still writing."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        match = TEMP_NAME.fullmatch(entry.name)
        if match is None or entry.is_dir(follow_symlinks=False):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or process_alive(pid) or (keep and Path(entry.path).resolve() in keep):
            continue
        Path(entry.path).unlink(missing_ok=True)


def atomic_save(obj: Any, path: str | os.PathLike, verify: Callable[[Path], Any] | None = None) -> Any:
    """``torch.save`` through ``write_atomic``, synced to disk before the rename; ``verify(tmp)``
    (its result returned) may read the file back first, and refuse it by raising."""
    def save(tmp: Path) -> Any:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        return verify(tmp) if verify is not None else None

    return write_atomic(path, save)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read an onetrunk checkpoint safely; errors name the file and what is wrong."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not an onetrunk checkpoint (no format={CKPT_FORMAT!r}); "
                         f"for plain trunk weights use --set model.weights={path}")
    return ckpt


PREDICT_ONLY = "predict_only"  # the key that marks a predict-only checkpoint


def check_resumable(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """A ``ValueError`` (one line) for a checkpoint that training cannot continue from."""
    if ckpt.get(PREDICT_ONLY):
        raise ValueError(f"--resume {path}: predict-only checkpoint: no optimizer state, schedule or RNG state to "
                         f"continue from (tasks.export --format predict wrote it for inference); resume from the "
                         f"run's last.pt, or start a new run from its weights with --trunk {path}")


def model_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The weights to predict with: the EMA when the run kept one (its metrics are the EMA's)."""
    return ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]


class CheckpointWriter:
    """Writes checkpoints one at a time on a background thread; ``wait()`` before exiting.
    ``save(state, *paths, then=fn)`` calls ``fn`` once every path is written (the run's log
    line, so that the log is never ahead of the checkpoints)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any], *paths: str | os.PathLike, then: Callable[[], Any] | None = None) -> None:
        self.wait()
        cpu_state = to_cpu(state)  # synchronous: the live tensors may change after this returns

        def work():
            try:
                # a checksum per weights entry: read_checkpoint refuses weights whose bytes changed
                cpu_state["checksums"] = {k: state_checksum(cpu_state[k]) for k in ("model", "ema")
                                          if isinstance(cpu_state.get(k), dict)}
                for p in paths:
                    atomic_save(cpu_state, p)
                if then is not None:
                    then()
            except BaseException as e:  # surfaced on the next save / wait
                self._error = e

        self._thread = threading.Thread(target=work, name="checkpoint-writer", daemon=False)
        _start_unsignalled(self._thread)

    def wait(self) -> None:
        if self._thread is not None:
            if self._thread.ident is not None:  # else a Ctrl-C came before it was started: nothing to wait for
                self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, OSError) or not isinstance(err, Exception):
                raise err  # a full disk, a vanished folder (one line for the runner); an interrupt as it is
            raise RuntimeError(f"writing a checkpoint failed: {err}") from err


def _start_unsignalled(thread: threading.Thread) -> None:
    """``thread.start()`` with SIGINT and SIGTERM held back until it returns. A Ctrl-C inside
    ``start`` (it waits for the new thread) leaves a thread that may be running, yet cannot be
    joined ("cannot join thread before it is started"): the checkpoint being written would be
    left unwaited-for. Masked here, the signal is handled right after, with the thread started."""
    masked = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if masked else None
    try:
        thread.start()  # the new thread inherits the mask: signals are the main thread's to handle
    finally:
        if masked:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
