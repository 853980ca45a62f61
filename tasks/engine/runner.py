"""One runner for every ``python -m tasks.<task>``: flags, config, device, run folder, resume,
eval-only, predict, train and the final line; each task brings only its ``TaskSpec``.

Config precedence, lowest first: dataclass defaults, the checkpoint's config (``--resume`` /
``--eval-only``), the YAML recipe (``--config`` or the task's default), ``--set key=value``,
then the dedicated flags (``--epochs``, ``--batch-size``, ...). Once the data is built, the
``train`` switches this run cannot use are resolved to false (``resolve_switches``: off CUDA,
batches of varying shape, syncbn under torchrun), with a console line saying why; config.yaml
and every checkpoint then hold that resolved config, and nothing changes it afterwards.

Under ``torchrun --nproc_per_node=N`` every process runs the same command: ``setup_run``
joins the process group, rank 0 chooses the run folder (and tells the others) and alone
writes to it; the other ranks stay quiet. ``--batch-size`` is per process (per GPU).

A training run holds its folder: ``<output>/.lock`` (the pid, host and start time of its
process) is created when the folder is chosen and removed when the run ends, however it ends;
a second run on that folder is refused while the first is alive, and a lock left by a process
that is gone is taken over (said in one line). A folder that holds a previous run's results
is refused unless ``--resume`` or ``--overwrite`` says what to do with them. ``config.yaml`` is
written once the data and model are built and a ``--resume`` checkpoint accepted, right before
training: a refused command leaves the folder as it was. SIGTERM stops a run like Ctrl-C (exit
143 instead of 130), and the last line says what can be resumed.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import contextvars
import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import yaml

from backbones.pretrained import source as weights_source
from tasks.data.voc import read_class_list

from . import distributed
from .checkpoint import check_resumable, load_checkpoint, process_alive, seed_everything, write_atomic
from .config import (CONFIG_ROOT, REMOVED_KEYS, apply_overrides, config_from_dict, config_to_dict, format_keys,
                     locate_recipe, merge_dicts, read_yaml)
from .derive import DataFacts, derivation_lines, derive
from .distributed import resolve_device
from .graphs import inference_model, inference_models
from .logging import Console, MetricsLog
from .viz import write_json
from .loop import Terminated, Trainer, TrainingGuardError, hold_signals, settings_for_run, stop_on_sigterm
from .inputs import expand as expand_inputs
from .predict import Predictor, load_task_model, predict_files
from .registry import TaskSpec, spec_for_checkpoint
from .trunk import load_trunk

__all__ = ["build_parser", "Run", "setup_run", "run", "predict_files", "predict_arguments", "default_recipe",
           "find_config", "run_cli", "RunLock", "LOCK_NAME", "RUN_RESULTS", "resolve_switches", "list_recipes",
           "recipe_summary", "invoked_as", "prog_name"]

LOCK_NAME = ".lock"
# What a run leaves in its folder that a new run would overwrite: a folder holding any of them
# holds a previous run's results (config.yaml alone does not: a run stopped before its first
# checkpoint starts afresh). metrics.jsonl counts once it holds a line.
RUN_RESULTS = ("last.pt", "best.pt", "metrics.jsonl", "metrics.json", "curves.png", "confusion.png", "pr_curve.png",
               "detections.png", "predictions.json", "segmentation.png", "multitask.png", "tensorboard")

# flag (argparse dest) -> config key
FLAG_KEYS = {
    "epochs": "train.epochs", "batch_size": "train.batch_size", "amp": "train.amp", "compile": "train.compile",
    "channels_last": "train.channels_last", "seed": "train.seed", "device": "train.device",
    "limit_train": "data.limit_train", "limit_val": "data.limit_val", "data_dir": "data.data_dir",
    "train_ann": "data.train_ann", "val_ann": "data.val_ann", "train_images": "data.train_images",
    "val_images": "data.val_images", "train_masks": "data.train_masks", "val_masks": "data.val_masks",
    "voc_root": "data.voc_root",
    "download": "data.download",  # tasks.classify's own flag
    "trunk": "model.trunk",
}
DATA_FLAGS = ("data_dir", "train_ann", "val_ann", "train_images", "val_images", "train_masks", "val_masks", "voc_root")


_PROG: contextvars.ContextVar[str | None] = contextvars.ContextVar("onetrunk_prog", default=None)


@contextlib.contextmanager
def invoked_as(prog: str):
    """Parsers built inside name ``prog`` in their usage line (``onetrunk classify`` when the
    console script runs the command) instead of their ``python -m`` form."""
    token = _PROG.set(prog)
    try:
        yield
    finally:
        _PROG.reset(token)


def prog_name(default: str) -> str:
    """The command as it was invoked: ``invoked_as``'s name, else ``default`` (``python -m ...``)."""
    return _PROG.get() or default


class _PrintAndExit(argparse.Action):
    """A flag that prints ``text()`` and exits 0, as ``--help`` does (no other flag is needed)."""

    def __init__(self, option_strings, dest, text, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.text = text

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(self.text())
        parser.exit()


def recipe_summary(path: Path) -> str:
    """A recipe file's first line, when it is a comment (every shipped recipe's: what it is)."""
    try:
        first = path.read_text().splitlines()[:1]
    except (OSError, UnicodeDecodeError):
        return ""
    return first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""


def list_recipes(spec: TaskSpec) -> str:
    """``--list-recipes``: each shipped recipe of ``spec`` with its first comment line."""
    paths = sorted((CONFIG_ROOT / spec.name).glob("*.yaml"))
    width = max((len(p.stem) for p in paths), default=0)
    lines = [f"recipes of {spec.name} (--config configs/{spec.name}/<name>.yaml; without --config: "
             f"{spec.recipes[0]} where CUDA is available, else {spec.recipes[1]}):"]
    lines += [f"  {p.stem:<{width}}  {recipe_summary(p)}" for p in paths]
    return "\n".join(lines)


def build_parser(spec: TaskSpec) -> argparse.ArgumentParser:
    """The flags every task takes, the data flags of ``spec.data_flags`` and the task's own
    (``spec.add_arguments``)."""
    p = argparse.ArgumentParser(prog=prog_name(f"python -m tasks.{spec.name}"), description=spec.doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--config", metavar="FILE", help="YAML recipe (default: the task's GPU or CPU recipe; "
                                                     "--list-recipes names them)")
    g.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override a config key, e.g. --set model.depth=50 (repeatable; --list-keys lists them)")
    g.add_argument("--list-recipes", action=_PrintAndExit, text=lambda: list_recipes(spec),
                   help="list this task's recipes, each with its first comment line, and exit")
    g.add_argument("--list-keys", action=_PrintAndExit, text=lambda: format_keys(spec.config),
                   help="list every config key with its default and its one-line help, and exit")
    g.add_argument("--output", metavar="DIR", help="run folder (default: runs/<task>/<recipe>[-N])")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per GPU (per process under torchrun); --predict: images per batch (32)")
    g.add_argument("--seed", type=int)
    g.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="continue a run (default CKPT: <output>/last.pt)")
    g.add_argument("--overwrite", action="store_true",
                   help="let --output replace the run already in that folder (its log and checkpoints)")
    g.add_argument("--eval-only", action="store_true", help="evaluate --weights CKPT and exit")
    g.add_argument("--weights", metavar="CKPT", help="a checkpoint of this task (for --eval-only / --predict)")
    g.add_argument("--trunk", metavar="CKPT", help="start the backbone from another checkpoint's trunk")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast on CUDA (to train.amp_dtype: bf16 unless a recipe sets float16)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--limit-train", type=int, metavar="N", help="train on a seeded random subset of N samples (class-balanced for classify)")
    g.add_argument("--limit-val", type=int, metavar="N", help="evaluate a seeded random subset of N samples")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    g.add_argument("--predict", nargs="+", metavar="INPUT",
                   help="predict and exit: image files, folders (recursive), quoted glob patterns ('photos/**/*.jpg'), "
                        ".txt lists of paths, videos; summary.json and the task's files in <output>/predictions")
    g.add_argument("--video-stride", type=int, metavar="N",
                   help="with --predict: every N-th frame of a video (default 1)")
    g.add_argument("--images", action=argparse.BooleanOptionalAction, default=None,
                   help="with --predict: each image's pictures and own JSON (default); --no-images: only summary.json, "
                        "the COCO results and segmentation masks, and no line per image")
    d = p.add_argument_group("data")
    helps = {"data_dir": "Fashion-MNIST folder (the four IDX .gz files)", "train_ann": "COCO JSON (train)",
             "val_ann": "COCO JSON (val)", "train_images": "image folder (train)", "val_images": "image folder (val)",
             "train_masks": "mask folder, VOC style (train)", "val_masks": "mask folder, VOC style (val)",
             "voc_root": "Pascal VOC (VOCdevkit or VOC20xx folder)"}
    for name in spec.data_flags:
        if name not in DATA_FLAGS:
            raise ValueError(f"unknown data flag {name}")
        d.add_argument("--" + name.replace("_", "-"), metavar="PATH", help=helps[name])
    if "classes" in {f.name for f in dataclasses.fields(spec.data_config)}:
        d.add_argument("--classes", metavar="NAMES|FILE", help="class names, comma-separated or one per line in a "
                       "file (VOC layout, mask folders; segmentation: background first); default: from the data")
    if spec.add_arguments is not None:
        spec.add_arguments(p)
    return p


def default_recipe(spec: TaskSpec) -> str:
    """The recipe a task runs with no ``--config``: the full one where CUDA is available, else
    the quick CPU one."""
    return spec.recipes[0] if torch.cuda.is_available() else spec.recipes[1]


def find_config(task: str, name: str) -> Path:
    """``configs/<task>/<name>.yaml`` of a checkout, ``tasks/configs/...`` of an installed wheel."""
    return CONFIG_ROOT / task / f"{name}.yaml"


@dataclass
class Run:
    spec: TaskSpec
    cfg: Any
    args: argparse.Namespace
    output: Path
    device: torch.device
    console: Console
    recipe: str
    summary: str = ""  # the recipe file's first comment line
    resume_from: Path | None = None
    checkpoint: dict[str, Any] | None = None  # the --weights checkpoint (eval-only / predict)
    lock: "RunLock | None" = None  # a training run's hold on its folder (rank 0)
    resume_epoch: int | None = None  # the epoch the --resume checkpoint holds
    trainer: Any = None  # set once built: what an interrupted run can be resumed from
    created: list[Path] = field(default_factory=list)  # folders made for it: removed again while empty
    derivation: list[str] = field(default_factory=list)  # the settings made for the user's data, and why


# ----------------------------------------------------------------------------- the run folder's lock

def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc on Linux): with the pid, it
    tells a live run from a new process that got a dead run's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the command name may hold spaces


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace")


class RunLock:
    """``<folder>/.lock``: the pid of the run that writes the folder (first line), then its host
    and start time. ``acquire`` refuses a folder whose lock names a live process, takes over one
    whose process is gone (saying so), and on POSIX also holds an advisory ``flock`` on the file
    so that two runs starting at the same instant cannot both take over a stale lock. ``release``
    removes it; locks still held when the interpreter exits are removed then."""

    _held: dict[Path, "RunLock"] = {}

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    @staticmethod
    def holder(folder: Path) -> dict[str, Any] | None:
        """The live process holding ``folder``'s lock (``{"pid", "host"}``), or None."""
        path = Path(folder) / LOCK_NAME
        try:
            text = path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError:
            text = ""
        info = RunLock._parse(text)
        if path.resolve() in RunLock._held and info.get("pid") == os.getpid():
            return info  # a run of this process
        return info if RunLock._alive(info) else None

    @staticmethod
    def _parse(text: str) -> dict[str, Any]:
        lines = text.split("\n")
        info: dict[str, Any] = {}
        match = re.match(r"\s*(\d+)", lines[0] if lines else "")
        if match:
            info["pid"] = int(match.group(1))
        for line in lines[1:]:
            key, _, value = line.partition(" ")
            if key in ("host", "started", "command"):
                info[key] = value.strip()
        return info

    @staticmethod
    def _alive(info: dict[str, Any]) -> bool:
        pid = info.get("pid")
        if pid is None:
            return False  # an empty or unreadable lock: a run killed while writing it
        if info.get("host") and info["host"] != socket.gethostname():
            return True  # another machine's process: it cannot be checked from here
        if pid == os.getpid():
            return False  # this process, and no run of it holds the lock: left by an earlier run here
        if not process_alive(pid):
            return False
        started = info.get("started")
        return not (started and _process_start(pid) not in (None, started))  # else the pid was reused

    @classmethod
    def acquire(cls, folder: Path, console: Console | None = None) -> "RunLock":
        """Hold ``folder`` for this run; ``FileExistsError`` naming the other run's pid when it is
        held."""
        path = Path(folder) / LOCK_NAME
        for _ in range(8):  # a lock released or replaced between the open and the flock: again
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not cls._flock(fd):
                    info = cls._parse(_read_fd(fd))
                    raise cls._in_use(folder, path, info)
                try:
                    same = os.fstat(fd).st_ino == os.stat(path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                text = _read_fd(fd)
                info = cls._parse(text)
                if path.resolve() in cls._held or cls._alive(info):
                    raise cls._in_use(folder, path, info)
                if text.strip():
                    what = (f"pid {info['pid']}, which is no longer running" if "pid" in info
                            else "an unreadable lock")
                    (console.error if console is not None else Console.error)(
                        f"{path}: taking over the lock of {what} (a run that was killed)")
                started = _process_start(os.getpid())
                content = (f"{os.getpid()}\nhost {socket.gethostname()}\n" + (f"started {started}\n" if started else "")
                           + f"command {' '.join(sys.argv)[:500]}\n")
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, content.encode())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            lock = cls(path, fd)
            cls._held[path.resolve()] = lock
            return lock
        raise FileExistsError(f"--output {folder}: could not take its lock {path} (other runs keep replacing it)")

    @staticmethod
    def _flock(fd: int) -> bool:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): the pid check alone
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as e:  # a file system without locks: the pid check alone
            return e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN)
        return True

    @staticmethod
    def _in_use(folder: Path, path: Path, info: dict[str, Any]) -> FileExistsError:
        who = f"pid {info['pid']}" if "pid" in info else "another process"
        if info.get("host") and info["host"] != socket.gethostname():
            who += f" on {info['host']}"
        return FileExistsError(f"--output {folder} is in use by another run ({who}, lock file {path}): two runs would "
                               f"mix one log and one checkpoint; wait for it to end or choose another --output (if "
                               f"no run uses it any more, delete {path})")

    def release(self) -> None:
        """Remove the lock file (if it is still this run's) and let go of it."""
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        except OSError:
            pass  # the folder was removed: nothing left to unlock
        finally:
            os.close(self._fd)
            self._fd = None
            RunLock._held.pop(self.path.resolve(), None)


@atexit.register
def _release_all_locks() -> None:
    """A lock still held when the interpreter exits (a caller of setup_run that never ran it)."""
    for lock in list(RunLock._held.values()):
        lock.release()


# ----------------------------------------------------------------------------- choosing the folder

def _results(folder: Path) -> list[str]:
    """The names of ``RUN_RESULTS`` that ``folder`` holds (a previous run's results)."""
    found = []
    for name in RUN_RESULTS:
        path = folder / name
        if name == "metrics.jsonl":
            try:
                if path.is_file() and path.read_text().strip():
                    found.append(name)
            except OSError:
                found.append(name)
        elif path.exists():
            found.append(name)
    return found


def _next_free(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ...: the first that holds no run's results and is not
    in use by a live run."""
    def free(folder: Path) -> bool:
        return not _holds_run(folder) and RunLock.holder(folder) is None

    if free(base):
        return base
    i = 2
    while True:
        cand = base.with_name(f"{base.name}-{i}")
        if free(cand):
            return cand
        i += 1


def _latest_run(base: Path) -> Path | None:
    pattern = re.compile(re.escape(base.name) + r"(-\d+)?$")
    runs = [p for p in base.parent.glob(base.name + "*") if pattern.fullmatch(p.name) and (p / "last.pt").exists()]
    return max(runs, key=lambda p: (p / "last.pt").stat().st_mtime) if runs else None


def _folder(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--output {path} is a file, not a folder")
    return path


def _holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a previous run's results (``RUN_RESULTS``)."""
    return bool(_results(folder))


def _written_by_a_run(path: Path, spec: TaskSpec) -> bool:
    """Whether ``path`` (a folder's config.yaml) is one a run wrote: the whole resolved config of
    the task (a run stopped before its first checkpoint leaves one), not a recipe of the user's,
    which sets a few keys and which the run must not replace."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    full = config_to_dict(config_from_dict(spec.config, {}))
    if not isinstance(data, dict) or set(data) != set(full):
        return False
    total = have = 0
    for section, fields in full.items():
        if isinstance(fields, dict):
            theirs = data[section]
            gone = {k.partition(".")[2] for k in REMOVED_KEYS if k.startswith(section + ".")}
            # a run of an older version may have written keys that are gone since
            if not isinstance(theirs, dict) or not set(theirs) - gone <= set(fields):
                return False
            total, have = total + len(fields), have + len(theirs)
    return have >= 0.8 * total  # a config of an older version may lack a few newer keys


def _choose_output(args: argparse.Namespace, runs_root: Path, resume_from: Path | None) -> Path:
    if resume_from is not None:
        if not args.output:
            return resume_from.parent
        output = _folder(Path(args.output))
        if _holds_run(output) and resume_from.resolve().parent != output.resolve() and not args.overwrite:
            raise FileExistsError(f"--output {output} holds another run, and --resume {resume_from} is not from it: "
                                  f"resuming there would overwrite that run's metrics.jsonl and checkpoints. Resume "
                                  f"into a new --output, or pass --overwrite to replace that run")
        return output
    if (args.eval_only or args.predict) and not args.output:
        # beside the checkpoint they come from, never over the training run's own pictures and files
        weights = Path(args.weights)
        return weights.parent if args.predict else weights.parent / f"eval-{weights.stem}"
    if args.output:
        output = _folder(Path(args.output))
        found = _results(output)
        trained = [name for name in found if name in ("last.pt", "best.pt", "metrics.jsonl")]
        if args.eval_only and trained and not args.overwrite:
            # its pictures (and predictions.json) would replace the training run's own
            raise FileExistsError(f"--output {output} holds a training run ({', '.join(trained)}): --eval-only would "
                                  f"write its pictures over that run's; leave --output out (it then writes into "
                                  f"{Path(args.weights).parent / ('eval-' + Path(args.weights).stem)}), or choose "
                                  f"another folder")
        if found and not (args.eval_only or args.predict or args.overwrite):
            raise FileExistsError(f"--output {output} already holds a run ({', '.join(found)}): pass --resume to "
                                  f"continue it, --overwrite to replace it, or choose another --output")
        return output
    return _next_free(runs_root)


def setup_run(spec: TaskSpec, args: argparse.Namespace) -> Run:
    """Resolve config, output folder, device and seed from the parsed flags; under torchrun,
    join the process group (every rank calls this with the same flags)."""
    task = spec.name
    modes = [flag for flag, on in (("--resume", args.resume), ("--eval-only", args.eval_only),
                                   ("--predict", args.predict)) if on]
    if len(modes) > 1:
        raise ValueError(f"{' and '.join(modes)} do not go together: choose one")
    if args.weights and not (args.eval_only or args.predict):
        raise ValueError("--weights goes with --eval-only or --predict; to train from a checkpoint's trunk pass "
                         "--trunk CKPT, to continue a run --resume CKPT")
    predict_arguments(args)  # --video-stride / --no-images without --predict: refused before any work
    if distributed.env_world_size() > 1:
        if args.predict:
            raise ValueError("--predict runs in one process: python -m tasks.<task> --predict ... (not torchrun)")
        if os.environ.get("RANK", "0") != "0":
            args.quiet = True  # rank 0 prints for everyone
    console = Console(args.quiet)
    recipe_path = locate_recipe(args.config) if args.config else find_config(task, default_recipe(spec))
    recipe = recipe_path.stem
    runs_root = Path(os.environ.get("ONETRUNK_RUNS", "runs")) / task / recipe

    # Which checkpoint, if any, provides the base config?
    resume_from: Path | None = None
    resume_epoch: int | None = None
    checkpoint = None
    base: dict[str, Any] = {}
    training = not (args.eval_only or args.predict)
    afresh = ""  # said once the folder is ours (locked)
    if args.resume == "auto" and args.output and not (Path(args.output) / "last.pt").exists() \
            and Path(args.output).is_dir():
        # A run stopped before its first checkpoint left nothing to resume: the same command
        # starts it afresh (a restart loop with --resume keeps working) unless the folder holds
        # results of a run that --resume would not continue.
        out = Path(args.output)
        found = _results(out)
        if (out / "best.pt").is_file():
            raise FileNotFoundError(f"--resume: {out} holds no last.pt but a best.pt (its run stopped while saving "
                                    f"its first checkpoint): resume from it with --resume {out / 'best.pt'}, or pass "
                                    f"--overwrite without --resume to start again")
        if found:
            raise FileNotFoundError(f"--resume: {out} holds no last.pt (only {', '.join(found)}): nothing to resume; "
                                    f"pass --overwrite without --resume to start again, or choose another --output")
        afresh = f"--resume: {out} holds no checkpoint yet (its run stopped before saving one): starting it afresh"
        args.resume = None
    if args.resume:
        if args.resume != "auto":
            resume_from = Path(args.resume)
        elif args.output:
            resume_from = Path(args.output) / "last.pt"
        else:
            latest = _latest_run(runs_root)
            if latest is None:
                raise FileNotFoundError(f"--resume: no run with last.pt under {runs_root.parent}; pass --output DIR")
            resume_from = latest / "last.pt"
        if resume_from.is_dir():  # a run folder: its last checkpoint
            if not (resume_from / "last.pt").is_file():
                raise FileNotFoundError(f"--resume {resume_from} is a folder, not a checkpoint file, and holds no "
                                        f"last.pt (not a run folder, or its run never saved one)")
            resume_from = resume_from / "last.pt"
        if not resume_from.is_file():
            raise FileNotFoundError(f"--resume: {resume_from} does not exist")
        resumed = load_checkpoint(resume_from)
        check_resumable(resumed, resume_from)  # a predict-only checkpoint: one line, not a KeyError later
        spec_for_checkpoint(resumed, f"--resume {resume_from}", expected=task)
        base = resumed["config"]
        resume_epoch = int(resumed.get("epoch", 0))
        del resumed  # the weights are read again by Trainer.resume, once the model is built
    elif args.eval_only or args.predict:
        if args.predict and not args.weights:
            # Never a model picked silently (the newest run may be of other data): --output naming
            # a run folder means its best.pt, said on the console; otherwise --weights is needed.
            if args.output and (Path(args.output) / "best.pt").is_file():
                args.weights = str(Path(args.output) / "best.pt")
                Console(args.quiet)(f"--predict: the run folder's model, {args.weights}")
            else:
                latest = _latest_run(runs_root)
                hint = (f" (the newest run of this recipe: --weights {latest / 'best.pt'})"
                        if latest is not None and (latest / "best.pt").is_file() else "")
                raise ValueError(f"--predict needs --weights CKPT, or --output naming a run folder with a best.pt{hint}")
        if args.weights:
            checkpoint = load_checkpoint(args.weights)
            spec_for_checkpoint(checkpoint, f"--weights {args.weights}", expected=task)
            base = checkpoint["config"]
        elif args.eval_only:
            raise ValueError("--eval-only needs --weights CKPT (a checkpoint of this task)")

    data: dict[str, Any] = dict(base)
    if args.config or not base:
        data = merge_dicts(data, read_yaml(recipe_path))
    user = merge_dicts(apply_overrides({}, args.overrides, spec.config), _flag_values(args))
    data = merge_dicts(data, user)
    cfg = config_from_dict(spec.config, data, where=f"{recipe_path} (with --set / flags):")
    derivation: list[str] = []
    if training and resume_from is None and spec.describe_data is not None:
        facts = spec.describe_data(cfg)  # None: the built-in data, which the recipe is for
        if facts is not None:
            cfg, derivation = _made_for_data(spec, facts, args, recipe_path, user, cfg)
            recipe = facts.name
            runs_root = Path(os.environ.get("ONETRUNK_RUNS", "runs")) / task / recipe
    device = distributed.init(resolve_device(cfg.train.device))  # no-op without torchrun

    # Rank 0 picks the folder (runs/<task>/<recipe>-N must not race) and creates it; the
    # others get its choice, or its error, so that every rank stops with the same message.
    # A training run holds its folder with a lock (rank 0); config.yaml is written by run() once
    # the run really starts (data and model built, a --resume checkpoint accepted).
    output: Path | None = None
    error: Exception | None = None
    lock: RunLock | None = None
    created: list[Path] = []  # the folders this command made for its run folder
    if distributed.is_main():
        try:
            holder = RunLock.holder(Path(args.output)) if training and args.output else None
            if holder is not None:  # before the results check: "in use" is what a user needs to hear
                raise RunLock._in_use(Path(args.output), Path(args.output) / LOCK_NAME, holder)
            output = _choose_output(args, runs_root, resume_from)
            same_run = resume_from is not None and resume_from.resolve().parent == output.resolve()
            if training and not (same_run or args.overwrite) and (output / "config.yaml").exists() \
                    and not _written_by_a_run(output / "config.yaml", spec):
                raise FileExistsError(f"--output {output} holds a config.yaml that no run wrote (a recipe of yours?): "
                                      f"a run writes its resolved config there; move it, choose another --output, or "
                                      f"pass --overwrite")
            created = _missing_folders(output)
            output.mkdir(parents=True, exist_ok=True)
            if training:
                lock = RunLock.acquire(output, console)
            if afresh:
                console.error(afresh)
        except (ValueError, OSError) as e:
            error = e
    output, error = distributed.broadcast_object((output, error))
    if error is not None:
        raise error
    try:
        r = _finish_setup(spec, args, cfg, output, device, console, recipe_path, resume_from, resume_epoch,
                          checkpoint, lock)
        r.created = created
        r.derivation = derivation
        if derivation:
            r.recipe = recipe  # the data's name
        return r
    except BaseException:
        if lock is not None:
            lock.release()
        _remove_empty(created)  # a refused command leaves no empty run folder behind
        raise


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config sections the flags set (``--epochs 3`` -> ``{"train": {"epochs": 3}}``)."""
    flags: dict[str, Any] = {}
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            section, name = key.split(".")
            flags.setdefault(section, {})[name] = value
    classes = getattr(args, "classes", None)
    if classes is not None:  # names, comma-separated, or a file of one name per line
        names = read_class_list(classes) if Path(classes).is_file() else [c.strip() for c in classes.split(",")]
        if not all(names) or len(set(names)) != len(names):
            raise ValueError(f"--classes {classes!r}: expected distinct names separated by commas, or a file of one "
                             f"name per line")
        flags.setdefault("data", {})["classes"] = names
    return flags


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def _made_for_data(spec: TaskSpec, facts: DataFacts, args: argparse.Namespace, recipe_path: Path,
                   user: dict[str, Any], cfg: Any) -> tuple[Any, list[str]]:
    """The config of a run on the user's own data: the settings ``derive`` makes for it (only
    its facts under a ``--config`` recipe), the user's ``--set`` / flags over them; and the
    lines that say what was chosen and why."""
    named = bool(args.config)
    given = _flatten(user)
    derived = derive(spec.name, facts, device=resolve_device(cfg.train.device).type, given=given,
                     named_recipe=named, pretrained=bool(cfg.model.weights or cfg.model.trunk),
                     imagenet_source=lambda: weights_source("imagenet", f"resnet{cfg.model.depth}",
                                                            network=distributed.env_world_size() == 1))
    base = read_yaml(recipe_path) if named else {}
    made = _nest({d.key: d.value for d in derived if not d.yours})
    data = merge_dicts(merge_dicts(base, made), user)
    where = recipe_path if named else f"the settings made for {facts.where}"
    cfg = config_from_dict(spec.config, data, where=f"{where} (with --set / flags):")
    return cfg, derivation_lines(facts, derived, _flatten(config_to_dict(cfg)))


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is still empty; stop at the first that
    is not (another process may have written into it since)."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:
            return


def _finish_setup(spec: TaskSpec, args: argparse.Namespace, cfg: Any, output: Path, device: torch.device,
                  console: Console, recipe_path: Path, resume_from: Path | None, resume_epoch: int | None,
                  checkpoint: dict[str, Any] | None, lock: "RunLock | None") -> Run:
    seed_everything(cfg.train.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark  # until resolve_switches has seen the data
        # TF32 for any fp32 matmul / conv left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    own_data = any(getattr(cfg.data, k, None) for k in DATA_FLAGS if k != "data_dir")
    # the recipe's first line describes its own data
    summary = recipe_summary(recipe_path) if recipe_path.is_file() and not own_data else ""
    return Run(spec=spec, cfg=cfg, args=args, output=output, device=device, console=console, recipe=recipe_path.stem,
               summary=summary, resume_from=resume_from, checkpoint=checkpoint, lock=lock, resume_epoch=resume_epoch)


def predict_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``predict_files``' keywords from ``--video-stride``, ``--images/--no-images``,
    ``--batch-size`` and ``--quiet`` (no progress bar); the first two without ``--predict`` are refused."""
    stride, images = getattr(args, "video_stride", None), getattr(args, "images", None)
    if not args.predict and (stride is not None or images is not None):
        raise ValueError("--video-stride and --images / --no-images go with --predict")
    if stride is not None and stride < 1:
        raise ValueError(f"--video-stride {stride}: expected a positive number of frames (1: every frame)")
    batch = getattr(args, "batch_size", None)  # --predict: --batch-size images at a time (the config refuses < 1)
    return {"images": images is not False, "video_stride": stride or 1, "progress": not args.quiet,
            "batch_size": batch or 32}


def _weights_model(run: Run) -> tuple[Any, dict[str, Any]]:
    """The ``--weights`` model (CPU, eval mode) and its metadata, built under the run's config:
    the checkpoint's, with ``--set`` overrides such as post-processing thresholds."""
    _, model, meta, _ = load_task_model(run.checkpoint, task=run.spec.name, cfg=run.cfg)
    return model, meta


def run(spec: TaskSpec, argv: Sequence[str] | argparse.Namespace | None = None) -> dict[str, Any]:
    """``python -m tasks.<spec.name>``: returns the final metrics (or the predictions).

    SIGTERM raises ``Terminated`` (a KeyboardInterrupt) like Ctrl-C: the checkpoint being written
    is finished, the lock released, and a training run says what can be resumed."""
    args = argv if isinstance(argv, argparse.Namespace) else build_parser(spec).parse_args(argv)
    training = not (args.eval_only or args.predict)
    with stop_on_sigterm():
        try:
            r = setup_run(spec, args)
        except KeyboardInterrupt as stop:
            if training and distributed.is_main():
                Console.error(f"stopped ({_signal_name(stop)}) before the run started: nothing was written")
            raise
        stopped: KeyboardInterrupt | None = None
        try:
            return _run(r)
        except KeyboardInterrupt as stop:
            stopped = stop
            raise
        finally:
            with hold_signals():  # a second Ctrl-C must not cut the last line short, nor leave the lock behind
                if stopped is not None and training and distributed.is_main():
                    Console.error(_stop_line(r, stopped))
                if r.lock is not None:
                    r.lock.release()
                _remove_empty(r.created)  # a run that failed before writing anything leaves no folder
            # The trainer's evaluate closure holds r: without this the cycle keeps the DDP model
            # (and its hold on the process group) alive past distributed.destroy(), until the
            # interpreter's teardown, where destroying it aborted a torchrun rank.
            r.trainer = None


def _signal_name(stop: BaseException) -> str:
    return "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"


def _stop_line(r: Run, stop: BaseException) -> str:
    """What an interrupted training run can be resumed from, in one line."""
    how, total, t = _signal_name(stop), r.cfg.train.epochs, r.trainer
    at = f" in epoch {t.current_epoch} of {total}" if t is not None and t.current_epoch else ""
    own_last = r.resume_from is not None and r.resume_from.resolve() == (r.output / "last.pt").resolve()
    saved = t.saved_epoch if t is not None else (r.resume_epoch if own_last else None)
    if saved is not None:
        return f"stopped ({how}){at}: last.pt holds epoch {saved} of {total}; resume with --resume {r.output}"
    best = t.best_saved_epoch if t is not None else None
    if best is not None:  # train.save_every > 1: best.pt is the only checkpoint so far
        return (f"stopped ({how}){at}: no last.pt yet, best.pt holds epoch {best} of {total}; resume with --resume "
                f"{r.output / 'best.pt'}")
    if r.resume_from is not None:
        again = f"--resume {r.resume_from} --output {r.output}" + (" --overwrite" if _holds_run(r.output) else "")
        return f"stopped ({how}){at}: no checkpoint was saved in {r.output} yet; resume again with {again}"
    return f"stopped ({how}){at}: no checkpoint was saved yet: nothing to resume, start again"


# train switches that act only on CUDA, and those that need every batch of one shape
_CUDA_ONLY = ("amp", "cuda_graph", "graph_eval", "cudnn_benchmark")
_FIXED_SHAPES = ("cuda_graph", "graph_eval", "cudnn_benchmark")


def resolve_switches(cfg: Any, device: torch.device, *, fixed_shapes: bool = True, world: int = 1) -> list[str]:
    """Set each ``train`` switch this run cannot use to false, in ``cfg``, and return one line
    per reason naming the switches it turned off. What it resolves, and why:

    * off CUDA: ``amp``, ``cuda_graph``, ``graph_eval``, ``cudnn_benchmark`` (CUDA features;
      the CPU runs fp32, eager, untuned);
    * batches that vary in shape (``fixed_shapes`` False: ``data.resize=aspect``):
      ``cuda_graph`` and ``graph_eval`` (a graph replays one shape: eager steps), and
      ``cudnn_benchmark`` (it autotunes every new shape: on an H200, FCOS R18 on 512 px
      scenes, 4 epochs, training took 86.3 s with autotuning and 19.7 s without);
    * ``cuda_graph`` with ``model.norm=syncbn`` under torchrun (its collectives run inside the
      forward, which a graph cannot capture);
    * ``cuda_graph`` with ``train.accumulate`` > 1 (each replay of the captured backward writes
      the gradients afresh: micro-batches cannot add up in them);
    * ``compile_inference`` without ``graph_eval`` (it compiles what that replays).

    Called before config.yaml is written, so that it and the checkpoints hold what ran. A line
    comes back for the CPU only where a value other than the default was asked for (every
    CPU run has amp and cudnn_benchmark off; the first line names the device)."""
    t, default = cfg.train, type(cfg.train)()
    off: dict[str, list[str]] = {}  # reason -> the switches it turns off
    no_cuda = f"CUDA only; the device is {device.type}"
    if device.type != "cuda":
        asked = [k for k in _CUDA_ONLY if getattr(t, k)]
        if asked:
            off[no_cuda] = asked
    else:
        if not fixed_shapes:
            asked = [k for k in _FIXED_SHAPES if getattr(t, k)]
            if asked:
                off["the batches of data.resize=aspect vary in shape: eager steps, no autotuning"] = asked
        if t.cuda_graph and world > 1 and getattr(cfg.model, "norm", None) == "syncbn":
            off["model.norm=syncbn under torchrun runs its collectives inside the forward"] = ["cuda_graph"]
        if t.cuda_graph and t.accumulate > 1 and not any("cuda_graph" in keys for keys in off.values()):
            off[f"train.accumulate={t.accumulate}: a replayed graph writes the gradients afresh, it cannot add "
                "micro-batches up"] = ["cuda_graph"]
    for keys in off.values():
        for k in keys:
            setattr(t, k, False)
    if t.compile_inference and not t.graph_eval:
        off["it compiles what train.graph_eval replays, and that is off"] = ["compile_inference"]
        t.compile_inference = False
    lines = []
    for why, keys in off.items():
        if why == no_cuda:
            keys = [k for k in keys if getattr(default, k) is False]  # asked for, not the default
        if keys:
            lines.append(f"{', '.join('train.' + k for k in keys)}: false ({why})")
    return lines


def _derivation_of(config_yaml: Path) -> list[str]:
    """The comment lines atop a run's config.yaml: the settings made for its data, and why."""
    try:
        text = config_yaml.read_text()
    except (OSError, UnicodeDecodeError):
        return []
    lines = []
    for line in text.splitlines():
        if not line.startswith("# "):
            break
        lines.append(line[2:])
    return lines


def _start_run(r: Run, trainer: Trainer) -> None:
    """The run really starts (data and model built, a --resume checkpoint accepted): only now is
    its folder changed. Results of the run it replaces go (there only with --overwrite: a mix of
    two runs' checkpoints, log and pictures is a broken result); a run resumed from another
    folder takes that run's log up to the resumed epoch; config.yaml is written (atomically)."""
    if not distributed.is_main():
        return
    out = r.output
    elsewhere = r.resume_from is not None and r.resume_from.resolve().parent != out.resolve()
    if r.resume_from is None or elsewhere:
        for name in _results(out):
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    if elsewhere:
        try:
            kept = [rec for rec in MetricsLog(r.resume_from.parent / "metrics.jsonl").records()
                    if rec.get("epoch", 0) <= trainer.start_epoch]
        except ValueError as e:  # a damaged log beside the checkpoint: the new log starts without it
            r.console.error(f"{e}; {out / 'metrics.jsonl'} starts at epoch {trainer.start_epoch + 1}")
            kept = []
        if kept:
            write_atomic(out / "metrics.jsonl", lambda tmp: tmp.write_text(
                "".join(json.dumps(rec) + "\n" for rec in kept)))
    # the settings made for the data, and why; a resumed run keeps those of the run it continues
    derivation = r.derivation or (_derivation_of(r.resume_from.parent / "config.yaml") if r.resume_from else [])
    header = "".join(f"# {line}\n" for line in derivation)
    write_atomic(out / "config.yaml", lambda tmp: tmp.write_text(header + yaml.safe_dump(config_to_dict(r.cfg),
                                                                                          sort_keys=False)))


def _run(r: Run) -> dict[str, Any]:
    spec, args = r.spec, r.args
    cfg, device, say = r.cfg, r.device, r.console
    if r.summary and not (args.eval_only or args.predict):
        say(r.summary)
    for line in r.derivation:
        say(line)
    # a run from a checkpoint carries that checkpoint's config, not the default recipe's
    source = (f"checkpoint {r.resume_from or args.weights}" if (r.resume_from or r.checkpoint) and not args.config
              else f"settings made for the data ({r.recipe})" if r.derivation and not args.config
              else f"recipe {r.recipe}")
    say(f"{spec.name}: {source} on {device} -> {r.output}")

    if args.predict:
        options, out = predict_arguments(args), r.output / "predictions"
        # the inputs before the model: a pattern matching nothing is named before any model work
        inputs = expand_inputs(args.predict, video_stride=options["video_stride"], exclude=out)
        predictor = Predictor(spec, *_weights_model(r), device, amp=cfg.train.amp)
        return {"predictions": predict_files(predictor, inputs, out, **options)}

    data = spec.build_data(cfg, device, train=not args.eval_only, quiet=args.quiet)
    if len(data.val) == 0:  # every metric would be 0 and look like a result
        source = getattr(data.val_set, "ann_file", None) or getattr(data.val_set, "image_dir", None) or "the data"
        raise ValueError(f"the validation set is empty ({source}): there is nothing to evaluate")
    # cfg as this run will use it (config.yaml and the checkpoints record it): nothing changes it after this
    resolved = resolve_switches(cfg, device, fixed_shapes=data.fixed_shapes, world=distributed.world_size())
    if not args.eval_only and r.resume_from is None:  # a resumed run keeps its checkpoint's settings
        resolved += settings_for_run(spec, cfg, data.train)
    if not args.eval_only:  # evaluating a checkpoint elsewhere: its training switches are no news
        for line in resolved:
            say(line)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    if args.eval_only:
        model, meta = _weights_model(r)
        if len(meta["class_names"]) != len(data.meta["class_names"]):
            raise ValueError(f"--weights {args.weights} predicts {len(meta['class_names'])} classes but the "
                             f"validation data has {len(data.meta['class_names'])}")
        model = model.to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        metrics = spec.evaluate(inference_model(model, cfg, device), data, device, cfg.train.amp,
                                output=r.output if distributed.is_main() else None, quiet=args.quiet)
        if distributed.is_main():  # the numbers as a file too, beside the pictures
            write_json(r.output / "metrics.json", {"weights": str(args.weights), **metrics})
        lines = spec.report(metrics, meta)
        print(f"{lines[0]}  ({args.weights})")
        for line in lines[1:]:
            print(line)
        return metrics

    model = spec.build_model(cfg, data.meta)
    if cfg.model.trunk and r.resume_from is None:  # a resumed run has its trunk in the checkpoint
        load_trunk(model.backbone, cfg.model.trunk, cfg.model)  # printed even with --quiet: it changes the run

    graphed = inference_models(cfg, device)

    def evaluate(m, final: bool) -> dict[str, Any]:
        return spec.evaluate(graphed(m), data, device, cfg.train.amp,
                             output=r.output if final and distributed.is_main() else None)

    # (a graphed step turns the models' per-step target checks off in the Trainer: they sync the host)
    trainer = Trainer(spec.name, cfg, model, data.train, output=r.output, device=device, quiet=args.quiet,
                      console=say, main_metric=spec.main_metric, meta=data.meta, evaluate=evaluate,
                      targets_checked=data.targets_checked)
    r.trainer = trainer
    if r.resume_from is not None:
        trainer.resume(r.resume_from)
    _start_run(r, trainer)
    record = trainer.fit()
    metrics = {k[len("val_"):]: v for k, v in record.items() if k.startswith("val_")}
    if data.skipped is not None:
        for line in skipped_lines(data.skipped):
            say(line)
    lines = spec.report(metrics, data.meta)
    say(f"done: {lines[0]}, {record.get('train_time_total_s', 0):.1f} s of training, run folder {r.output}")
    for line in lines[1:]:
        say(line)
    return {**record, **metrics, "output": str(r.output)}


def skipped_lines(skipped: dict[str, Iterable[str]], show: int = 3) -> list[str]:
    """One line per split that left unreadable images out (``TaskData.skipped``: split -> paths,
    of every rank under torchrun), naming the first ``show`` of them."""
    lines = []
    for split, seen in skipped.items():
        paths = sorted({p for part in distributed.all_gather_object(sorted(seen)) for p in part})
        if paths:
            named = ", ".join(paths[:show]) + (f", ... ({len(paths)})" if len(paths) > show else "")
            kind = {"train": "training", "val": "validation"}.get(split, split)
            lines.append(f"skipped {len(paths)} unreadable {kind} image{'s' if len(paths) > 1 else ''} "
                         f"(data.skip_bad): {named}")
    return lines


def error_line(e: BaseException) -> str:
    """The message of ``e`` as one line. An error raised in a DataLoader worker reaches the
    main process re-raised with "Caught X in DataLoader worker process N" and the worker's
    whole traceback as its message: its last line is the original error, which is what a
    user needs (the same line as with ``num_workers=0``)."""
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        match = re.match(r"[A-Za-z_][\w.]*: (.*)", last)
        text = match.group(1) if match else last
    return text


def _warning_text(message, category, filename, lineno, line=None) -> str:
    """``warnings.formatwarning`` of the commands: one line, ``warning: <message>`` (another
    category than UserWarning is named), without Python's file, line number and source line."""
    kind = "warning" if category is UserWarning else category.__name__
    return f"{kind}: {' '.join(str(message).split())}\n"


def run_cli(main) -> None:
    """``if __name__ == "__main__"`` of every command: a mistake in the input (bad config, missing
    file, wrong data) ends with one line naming it instead of a traceback, exit status 2; a run
    the training guard stopped (not learning, non-finite values) exits 3; Ctrl-C exits 130 and
    SIGTERM 143 (128 + the signal, as a shell reports them; both stop a run cleanly, ``run``).
    ``ONETRUNK_DEBUG=1`` shows the full traceback. Under torchrun each failing rank prints its
    line (``error [rank R]:`` on ranks other than 0), and the process group is left in every
    case. Warnings print as one ``warning: ...`` line each (``ONETRUNK_DEBUG=1``: Python's form)."""
    code = 0
    formatwarning = warnings.formatwarning
    if not os.environ.get("ONETRUNK_DEBUG"):
        warnings.formatwarning = _warning_text
    try:
        with stop_on_sigterm():  # every command: a temp file being written is removed, not left behind
            main()
    except KeyboardInterrupt as e:
        code = 143 if isinstance(e, Terminated) else 130
    except (ValueError, OSError, TrainingGuardError) as e:  # ConfigError, IDXError ... are ValueErrors
        if os.environ.get("ONETRUNK_DEBUG"):
            raise
        rank = os.environ.get("RANK", "0") if distributed.env_world_size() > 1 else "0"
        stopped = isinstance(e, TrainingGuardError)
        # one write per line: the lines of several ranks do not interleave
        sys.stderr.write(f"{'training stopped' if stopped else 'error'}{'' if rank == '0' else f' [rank {rank}]'}: "
                         f"{error_line(e)}\n")
        sys.stderr.flush()
        code = 3 if stopped else 2
    finally:
        warnings.formatwarning = formatwarning
        # stopping already (130 / 143): another Ctrl-C now would only turn the exit into a traceback
        with hold_signals("stopping", reraise=code not in (130, 143)):
            distributed.destroy()
    if code in (130, 143):
        _stopping["now"] = True
    if code:
        sys.exit(code)


_stopping = {"now": False}


@atexit.register
def _quiet_exit() -> None:
    """After a Ctrl-C / SIGTERM stop, another one during the interpreter's teardown (torch's exit
    handlers take a while) would only print a traceback: the process is exiting anyway."""
    if _stopping["now"] and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
