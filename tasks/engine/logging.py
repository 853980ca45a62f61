"""Run-folder logging: ``metrics.jsonl`` (one line per epoch), console lines, progress bars."""
from __future__ import annotations

import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

from .checkpoint import write_atomic

__all__ = ["MetricsLog", "TensorBoardLog", "progress", "Console", "format_metrics", "env_info"]

TENSORBOARD_HINT = "pip install 'onetrunk[tensorboard]' (in a checkout: pip install -e '.[tensorboard]')"


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN / inf
    return v


class MetricsLog:
    """Append-only ``metrics.jsonl``; ``records()`` reads it back (for curves and resume)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """The epoch records. A last line cut short (the process died while writing it) is
        left out with a warning; any other unreadable line is a ``ValueError`` naming it."""
        if not self.path.is_file():
            return []
        text = self.path.read_text()
        lines = text.splitlines()
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i == len(lines) - 1 and not text.endswith("\n"):
                    warnings.warn(f"{self.path}: its last line is cut short (an interrupted write); left out")
                    break
                raise ValueError(f"{self.path}, line {i + 1}: not a JSON record ({e.msg}); fix or delete that "
                                 f"line to resume") from None
        return records

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs after ``epoch`` (a resumed run redoes them)."""
        if not self.path.exists() and epoch == 0:
            return
        kept = [r for r in self.records() if r.get("epoch", 0) <= epoch]
        write_atomic(self.path, lambda tmp: tmp.write_text(  # a crash keeps the old log
            "".join(json.dumps(r) + "\n" for r in kept)))


class TensorBoardLog:
    """``train.tensorboard``: every epoch record's numbers as TensorBoard scalars beside
    ``metrics.jsonl`` (``train_loss`` -> ``train/loss``, ``val_AP`` -> ``val/AP``, step = epoch).
    A resumed run rewrites the epochs it redoes. The writer opens at the first record, so a
    run that fails before training leaves no empty event file."""

    def __init__(self, folder: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            # a ValueError: the runner reports it as one line, like every input problem
            raise ValueError(f"train.tensorboard needs the tensorboard package: {TENSORBOARD_HINT}") from None
        self.folder = Path(folder)
        self._writer_cls = SummaryWriter
        self._writer = None

    def append(self, record: dict[str, Any]) -> None:
        epoch = int(record["epoch"])
        if self._writer is None:
            # purge_step: events of this epoch and later (an interrupted run's) are dropped
            self._writer = self._writer_cls(str(self.folder), purge_step=epoch)
        for key, value in record.items():
            value = _plain(value)
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key
            self._writer.add_scalar(tag, float(value), epoch)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def progress(iterable: Iterable, *, total: int | None = None, desc: str = "", quiet: bool = False) -> tqdm:
    """A tqdm bar, off with ``quiet`` or when stderr is not a terminal (logs stay clean)."""
    return tqdm(iterable, total=total, desc=desc, disable=quiet or not sys.stderr.isatty(),
                dynamic_ncols=True, leave=False)


def _duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class PlainProgress:
    """The progress bar's numbers as a line every ``interval`` seconds, for output that is not
    a terminal (a file, a CI log), where the bar is off: a long epoch would otherwise print
    nothing until it ends. Called at the loop's log points only (already a host sync)."""

    def __init__(self, console: Callable[[str], None], interval: float, epochs: int, steps_per_epoch: int) -> None:
        self.console, self.interval = console, interval
        self.epochs, self.steps = epochs, steps_per_epoch
        self.last = time.perf_counter()

    def update(self, epoch: int, step: int, start: float, images: int, loss: Callable[[], float]) -> bool:
        """``step`` (1-based) steps of epoch ``epoch`` (0-based) done since ``start``; ``images``
        seen; ``loss()`` the mean loss so far (read only when a line is due). True if printed."""
        now = time.perf_counter()
        if self.interval <= 0 or now - self.last < self.interval or step >= self.steps:
            return False  # the epoch's own line follows its last step
        self.last = now
        elapsed = now - start
        left = (self.steps - step) + self.steps * (self.epochs - epoch - 1)
        self.console(f"epoch {epoch + 1}/{self.epochs}  step {step}/{self.steps}  loss {loss():.4g}  "
                     f"{images / max(elapsed, 1e-9):,.0f} img/s  ETA {_duration(elapsed / step * left)} "
                     "(training steps; evaluation not included)")
        return True


def format_metrics(metrics: dict[str, Any], keys: Iterable[str] | None = None) -> str:
    parts = []
    for k in keys or metrics:
        v = metrics.get(k)
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
        elif isinstance(v, (int, str)):
            parts.append(f"{k} {v}")
    return "  ".join(parts)


class Console:
    """Prints run messages unless quiet; errors always go to stderr."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    @staticmethod
    def error(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)


def env_info() -> dict[str, Any]:
    """Software versions, GPU and date: what a measured number was measured on."""
    import torch
    import torchvision

    info = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    try:
        import timm
        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info
