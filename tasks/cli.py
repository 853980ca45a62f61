"""The ``onetrunk`` command (pyproject.toml ``[project.scripts]``): one console script for the
task entry points.

    onetrunk classify ARGS...    # the same as: python -m tasks.classify ARGS...
    onetrunk detect | segment | multitask | export | bench ARGS...
    onetrunk --help              # the subcommands, one line each

``onetrunk <name> ARGS`` runs ``tasks.<name>.main(ARGS)`` under the same ``run_cli`` wrapper
as ``python -m tasks.<name>`` (one error line and exit 2 for bad input, 130 / 143 on Ctrl-C /
SIGTERM), so both forms behave alike; the ``python -m`` forms stay. ``COMMANDS`` is the one
dispatch table. Only the chosen command's module is imported (``onetrunk --help`` loads no torch).
"""
from __future__ import annotations

import difflib
import importlib
import sys
from typing import Sequence

__all__ = ["COMMANDS", "main", "usage"]

# subcommand -> (module whose main(argv) it runs, one line for --help)
COMMANDS: dict[str, tuple[str, str]] = {
    "classify": ("tasks.classify", "image classification (Fashion-MNIST, or image folders)"),
    "detect": ("tasks.detect", "object detection: FPN + FCOS-style head (FashionScenes, COCO, VOC)"),
    "segment": ("tasks.segment", "semantic segmentation: FCN head (FashionScenes, VOC-style masks)"),
    "multitask": ("tasks.multitask", "one trunk, three heads: joint training and one-pass inference"),
    "export": ("tasks.export", "export a trained checkpoint to ONNX, checked with onnxruntime"),
    "bench": ("tasks.bench", "benchmarks against the torchvision peers (bench backbone: the trunk)"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onetrunk")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown (not installed)"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: onetrunk <command> [ARGS...]   (onetrunk <command> --help: the command's options)", "",
             "commands (each the same as python -m tasks.<command>):"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``onetrunk <command> ARGS``; exits with the command's status (2: a usage error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        sys.exit(2)
    command, rest = args[0], args[1:]
    if command in ("-h", "--help", "help"):
        print(usage())
        return
    if command in ("-V", "--version"):
        print(f"onetrunk {_version()}")
        return
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        print(f"onetrunk: unknown command {command!r}: {hint}choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[command][0])
    from tasks.engine.runner import run_cli

    run_cli(lambda: module.main(rest))


if __name__ == "__main__":
    main()
