"""The ``onetrunk`` command (pyproject.toml ``[project.scripts]``): one console script for the
task entry points.

    onetrunk classify ARGS...    # the same as: python -m tasks.classify ARGS...
    onetrunk detect | segment | multitask | export | bench ARGS...
    onetrunk --help              # the subcommands, one line each

``onetrunk <name> ARGS`` runs ``tasks.<name>.main(ARGS)`` under the same ``run_cli`` wrapper
as ``python -m tasks.<name>`` (one error line and exit 2 for bad input, 130 / 143 on Ctrl-C /
SIGTERM), so both forms behave alike (``--help`` names the form that was typed); the ``python -m``
forms stay. ``COMMANDS`` is the one
dispatch table. Only the chosen command's module is imported (``onetrunk --help`` loads no torch).
``onetrunk bench`` runs ``benchmarks.bench`` (``python -m benchmarks.bench``), which is not installed:
it needs a source checkout (an editable install's, or the current folder's); without one it
exits 2 with one line saying so.
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
    # not installed: benchmarks/ of a source checkout (_import_bench)
    "bench": ("benchmarks.bench", "benchmarks against the torchvision peers, from a source checkout"),
}
BENCH_MISSING = ("onetrunk bench: the benchmarks are not installed with the package; they live in the source "
                 "repository's benchmarks/ folder: run them from a checkout (python -m benchmarks.bench ...)")


def _import_bench():
    """``benchmarks.bench``, which only a source checkout has: importable as it is (run from the
    repository root, or the root on sys.path), or the checkout this ``tasks`` package was
    imported from (an editable install), or the current folder's. None when there is none."""
    from pathlib import Path

    def attempt():
        try:
            return importlib.import_module("benchmarks.bench")
        except ModuleNotFoundError as e:
            if e.name not in ("benchmarks", "benchmarks.bench"):
                raise  # the benchmarks are there but something they import is not
            return None

    module = attempt()
    if module is not None:
        return module
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / "benchmarks" / "bench.py").is_file() and (root / "tasks" / "cli.py").is_file():
            other = sys.modules.get("benchmarks")
            if other is not None and Path(getattr(other, "__file__", None) or "/").parent != root / "benchmarks":
                del sys.modules["benchmarks"]  # another distribution's top-level "benchmarks"
            sys.path.insert(0, str(root))
            importlib.invalidate_caches()
            return attempt()
    return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onetrunk")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown (not installed)"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: onetrunk <command> [ARGS...]   (onetrunk <command> --help: the command's options)", "",
             "commands (each the same as python -m <module>):"]
    lines += [f"  {name:<{width}}  {about} ({module})" for name, (module, about) in COMMANDS.items()]
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
    if command == "bench":
        module = _import_bench()
        if module is None:
            asked_help = rest[:1] in (["-h"], ["--help"])  # the answer to --help, not a usage error
            print(BENCH_MISSING, file=sys.stdout if asked_help else sys.stderr)
            sys.exit(0 if asked_help else 2)
    else:
        module = importlib.import_module(COMMANDS[command][0])
    from tasks.engine.runner import invoked_as, run_cli

    with invoked_as(f"onetrunk {command}"):  # usage lines name the command as it was typed
        run_cli(lambda: module.main(rest))


if __name__ == "__main__":
    main()
