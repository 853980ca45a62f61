"""Run-folder logging: ``metrics.jsonl`` (one line per epoch), console lines, progress bars."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

__all__ = ["MetricsLog", "progress", "Console", "format_metrics"]


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
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs after ``epoch`` (a resumed run redoes them)."""
        kept = [r for r in self.records() if r.get("epoch", 0) <= epoch]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def progress(iterable: Iterable, *, total: int | None = None, desc: str = "", quiet: bool = False) -> tqdm:
    """A tqdm bar, off with ``quiet`` or when stderr is not a terminal (logs stay clean)."""
    return tqdm(iterable, total=total, desc=desc, disable=quiet or not sys.stderr.isatty(),
                dynamic_ncols=True, leave=False)


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
