"""The one result-file schema of the benchmarks: every entry point writes its JSON through
``write_result``.

    {"schema": "onetrunk-bench-1",
     "claim":   "what the run measures, one sentence",
     "numbers": {...the headline numbers of the claim...},
     "command": "python -m benchmarks.<script> ARGS (the exact command line)",
     "env":     {...tasks.engine.logging.env_info(): torch, torchvision, python, GPU, CUDA, timm...},
     "date":    "2026-12-04T10:11:12+00:00",
     ...extra: the script's own fields (runs, config, per-epoch curves...), at the top level}

The file is written atomically (``tasks.engine.checkpoint.write_atomic``): a reader, or a run
that is killed, sees the previous complete file or the new one, never half of one, and no temp
file is left behind. The benchmarks rewrite their file after each run, so an interrupted
benchmark keeps what it measured.
"""
from __future__ import annotations

import datetime
import json
import shlex
from pathlib import Path
from typing import Any, Sequence

__all__ = ["SCHEMA", "command_line", "write_result"]

SCHEMA = "onetrunk-bench-1"
FIXED = ("schema", "claim", "numbers", "command", "env", "date")


def command_line(module: str, argv: Sequence[str]) -> str:
    """``python -m <module> ARGS``, shell-quoted: the command that repeats a run."""
    return shlex.join(["python", "-m", module, *map(str, argv)])


def write_result(path: str | Path, *, claim: str, numbers: dict[str, Any], command: str,
                 extra: dict[str, Any] | None = None, env: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the result file ``path`` (JSON, the schema above) atomically and return its
    content. ``env``: the environment to record (default ``env_info()`` now); ``extra`` may not
    reuse the fixed keys."""
    from tasks.engine.checkpoint import write_atomic

    if not claim or not isinstance(claim, str):
        raise ValueError("write_result: claim must be a non-empty string")
    if not isinstance(numbers, dict):
        raise ValueError(f"write_result: numbers must be a dict, not {type(numbers).__name__}")
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(FIXED))
    if clash:
        raise ValueError(f"write_result: extra may not set the schema's own keys {clash}")
    if env is None:
        from tasks.engine.logging import env_info
        env = env_info()
    doc = {"schema": SCHEMA, "claim": claim, "numbers": numbers, "command": command, "env": env,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra}
    text = json.dumps(doc, indent=1)  # before the temp file: a value JSON cannot hold leaves nothing behind
    write_atomic(Path(path), lambda tmp: tmp.write_text(text))
    return doc
