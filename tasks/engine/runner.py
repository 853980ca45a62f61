"""One runner for every ``python -m tasks.<task>``: flags, config, device, run folder, resume,
eval-only, predict, train and the final line; each task brings only its ``TaskSpec``.

Config precedence, lowest first: dataclass defaults, the checkpoint's config (``--resume`` /
``--eval-only``), the YAML recipe (``--config`` or the task's default), ``--set key=value``,
then the dedicated flags (``--epochs``, ``--batch-size``, ...).

Under ``torchrun --nproc_per_node=N`` every process runs the same command: ``setup_run``
joins the process group, rank 0 chooses the run folder (and tells the others) and alone
writes to it; the other ranks stay quiet. ``--batch-size`` is per process (per GPU).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from . import distributed
from .checkpoint import load_checkpoint, seed_everything
from .config import CONFIG_ROOT, apply_overrides, config_from_dict, config_to_dict, merge_dicts, read_yaml
from .distributed import resolve_device
from .graphs import inference_model, inference_models
from .logging import Console
from .loop import Trainer, TrainingGuardError
from .predict import Predictor, load_task_model, predict_files
from .registry import TaskSpec, spec_for_checkpoint
from .trunk import load_trunk

__all__ = ["build_parser", "Run", "setup_run", "run", "predict_files", "default_recipe", "find_config", "run_cli"]

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


def build_parser(spec: TaskSpec) -> argparse.ArgumentParser:
    """The flags every task takes, the data flags of ``spec.data_flags`` and the task's own
    (``spec.add_arguments``)."""
    p = argparse.ArgumentParser(prog=f"python -m tasks.{spec.name}", description=spec.doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--config", metavar="FILE", help="YAML recipe (default: the task's GPU or CPU recipe)")
    g.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override a config key, e.g. --set model.depth=50 (repeatable)")
    g.add_argument("--output", metavar="DIR", help="run folder (default: runs/<task>/<recipe>[-N])")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per GPU (per process under torchrun)")
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
    g.add_argument("--limit-train", type=int, metavar="N", help="use the first N training samples")
    g.add_argument("--limit-val", type=int, metavar="N", help="use the first N validation samples")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    g.add_argument("--predict", nargs="+", metavar="IMG", help="predict these images and exit")
    d = p.add_argument_group("data")
    helps = {"data_dir": "Fashion-MNIST folder (the four IDX .gz files)", "train_ann": "COCO JSON (train)",
             "val_ann": "COCO JSON (val)", "train_images": "image folder (train)", "val_images": "image folder (val)",
             "train_masks": "mask folder, VOC style (train)", "val_masks": "mask folder, VOC style (val)",
             "voc_root": "Pascal VOC (VOCdevkit or VOC20xx folder)"}
    for name in spec.data_flags:
        if name not in DATA_FLAGS:
            raise ValueError(f"unknown data flag {name}")
        d.add_argument("--" + name.replace("_", "-"), metavar="PATH", help=helps[name])
    if spec.add_arguments is not None:
        spec.add_arguments(p)
    return p


def default_recipe(spec: TaskSpec) -> str:
    """The recipe a task runs with no ``--config``: the full one where CUDA is available, else
    the quick CPU one."""
    return spec.recipes[0] if torch.cuda.is_available() else spec.recipes[1]


def find_config(task: str, name: str) -> Path:
    """``configs/<task>/<name>.yaml``."""
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


def _next_free(base: Path) -> Path:
    if not (base / "last.pt").exists() and not (base / "metrics.jsonl").exists():
        return base
    i = 2
    while True:
        cand = base.with_name(f"{base.name}-{i}")
        if not (cand / "last.pt").exists() and not (cand / "metrics.jsonl").exists():
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
    return (folder / "last.pt").exists() or (folder / "metrics.jsonl").exists()


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
        if (output / "last.pt").exists() and not (args.eval_only or args.predict or args.overwrite):
            raise FileExistsError(f"--output {output} already holds a run (last.pt): pass --resume to continue it, "
                                  f"--overwrite to replace it, or choose another --output")
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
    if distributed.env_world_size() > 1:
        if args.predict:
            raise ValueError("--predict runs in one process: python -m tasks.<task> --predict ... (not torchrun)")
        if os.environ.get("RANK", "0") != "0":
            args.quiet = True  # rank 0 prints for everyone
    console = Console(args.quiet)
    recipe_path = Path(args.config) if args.config else find_config(task, default_recipe(spec))
    recipe = recipe_path.stem
    runs_root = Path(os.environ.get("ONETRUNK_RUNS", "runs")) / task / recipe

    # Which checkpoint, if any, provides the base config?
    resume_from: Path | None = None
    checkpoint = None
    base: dict[str, Any] = {}
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
        spec_for_checkpoint(resumed, f"--resume {resume_from}", expected=task)
        base = resumed["config"]
    elif args.eval_only or args.predict:
        if args.predict and not args.weights:
            # predicting with the newest trained model of this recipe is what a user means
            folder = Path(args.output) if args.output else _latest_run(runs_root)
            if folder is None or not (folder / "best.pt").is_file():
                raise FileNotFoundError(f"--predict needs --weights CKPT (no trained run under {runs_root.parent})")
            args.weights = str(folder / "best.pt")
        if args.weights:
            checkpoint = load_checkpoint(args.weights)
            spec_for_checkpoint(checkpoint, f"--weights {args.weights}", expected=task)
            base = checkpoint["config"]
        elif args.eval_only:
            raise ValueError("--eval-only needs --weights CKPT (a checkpoint of this task)")

    data: dict[str, Any] = dict(base)
    if args.config or not base:
        data = merge_dicts(data, read_yaml(recipe_path))
    data = apply_overrides(data, args.overrides, spec.config)
    flags: dict[str, Any] = {}
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            section, name = key.split(".")
            flags.setdefault(section, {})[name] = value
    data = merge_dicts(data, flags)
    cfg = config_from_dict(spec.config, data, where=f"{recipe_path} (with --set / flags):")
    device = distributed.init(resolve_device(cfg.train.device))  # no-op without torchrun

    # Rank 0 picks the folder (runs/<task>/<recipe>-N must not race) and creates it; the
    # others get its choice, or its error, so that every rank stops with the same message.
    output: Path | None = None
    error: Exception | None = None
    if distributed.is_main():
        try:
            output = _choose_output(args, runs_root, resume_from)
            output.mkdir(parents=True, exist_ok=True)
            if not (args.eval_only or args.predict):
                (output / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        except (ValueError, OSError) as e:
            error = e
    output, error = distributed.broadcast_object((output, error))
    if error is not None:
        raise error
    seed_everything(cfg.train.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        torch.backends.cudnn.benchmark_limit = cfg.train.cudnn_benchmark_limit
        # TF32 for any fp32 matmul / conv left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    summary = ""
    own_data = any(getattr(cfg.data, k, None) for k in DATA_FLAGS if k != "data_dir")
    if recipe_path.is_file() and not own_data:  # the recipe's first line describes its own data
        first = recipe_path.read_text().splitlines()[:1]
        summary = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return Run(spec=spec, cfg=cfg, args=args, output=output, device=device, console=console, recipe=recipe,
               summary=summary, resume_from=resume_from, checkpoint=checkpoint)


def _weights_model(run: Run) -> tuple[Any, dict[str, Any]]:
    """The ``--weights`` model (CPU, eval mode) and its metadata, built under the run's config:
    the checkpoint's, with ``--set`` overrides such as post-processing thresholds."""
    _, model, meta, _ = load_task_model(run.checkpoint, task=run.spec.name, cfg=run.cfg)
    return model, meta


def run(spec: TaskSpec, argv: Sequence[str] | argparse.Namespace | None = None) -> dict[str, Any]:
    """``python -m tasks.<spec.name>``: returns the final metrics (or the predictions)."""
    args = argv if isinstance(argv, argparse.Namespace) else build_parser(spec).parse_args(argv)
    r = setup_run(spec, args)
    cfg, device, say = r.cfg, r.device, r.console
    if r.summary and not (args.eval_only or args.predict):
        say(r.summary)
    # a run from a checkpoint carries that checkpoint's config, not the default recipe's
    source = (f"checkpoint {r.resume_from or args.weights}" if (r.resume_from or r.checkpoint) and not args.config
              else f"recipe {r.recipe}")
    say(f"{spec.name}: {source} on {device} -> {r.output}")

    if args.predict:
        predictor = Predictor(spec, *_weights_model(r), device, amp=cfg.train.amp)
        return {"predictions": predict_files(predictor, args.predict, r.output / "predictions")}

    data = spec.build_data(cfg, device, train=not args.eval_only, quiet=args.quiet)
    if len(data.val) == 0:  # every metric would be 0 and look like a result
        source = getattr(data.val_set, "ann_file", None) or getattr(data.val_set, "image_dir", None) or "the data"
        raise ValueError(f"the validation set is empty ({source}): there is nothing to evaluate")
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
        lines = spec.report(metrics, meta)
        print(f"{lines[0]}  ({args.weights})")
        for line in lines[1:]:
            print(line)
        return metrics

    if not data.fixed_shapes:
        if cfg.train.cuda_graph:
            # one graph replays one shape; this data's batches vary: eager steps (BENCHMARKS.md)
            say("train.cuda_graph is off: the batches of data.resize=aspect vary in shape (eager steps)")
            cfg.train.cuda_graph = False
        if device.type == "cuda" and torch.backends.cudnn.benchmark:
            # cuDNN autotunes every new input shape, and these are many: on an H200 (FCOS R18,
            # 512 px scenes, 4 epochs) training took 86.3 s with autotuning, 19.7 s without
            say("cuDNN autotuning is off: the batches of data.resize=aspect vary in shape")
            torch.backends.cudnn.benchmark = False
    model = spec.build_model(cfg, data.meta)
    if cfg.model.trunk and r.resume_from is None:  # a resumed run has its trunk in the checkpoint
        load_trunk(model.backbone, cfg.model.trunk, cfg.model)  # printed even with --quiet: it changes the run

    graphed = inference_models(cfg, device)

    def evaluate(m, final: bool) -> dict[str, Any]:
        return spec.evaluate(graphed(m), data, device, cfg.train.amp, output=r.output if final else None)

    trainer = Trainer(spec.name, cfg, model, data.train, output=r.output, device=device, quiet=args.quiet,
                      console=say, main_metric=spec.main_metric, meta=data.meta, evaluate=evaluate,
                      targets_checked=data.targets_checked)
    if r.resume_from is not None:
        trainer.resume(r.resume_from)
    record = trainer.fit()
    metrics = {k[len("val_"):]: v for k, v in record.items() if k.startswith("val_")}
    if data.skipped is not None:
        skipped = data.skipped["n"]
        if distributed.world_size() > 1:  # every rank's shard
            skipped = int(distributed.all_reduce_sum(torch.tensor(skipped, device=device)))
        if skipped:
            say(f"skipped {skipped} unreadable training images (data.skip_bad)")
    lines = spec.report(metrics, data.meta)
    say(f"done: {lines[0]}, {record.get('train_time_total_s', 0):.1f} s of training, run folder {r.output}")
    for line in lines[1:]:
        say(line)
    return {**record, **metrics, "output": str(r.output)}


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


def run_cli(main) -> None:
    """``if __name__ == "__main__"`` of every command: a mistake in the input (bad config, missing
    file, wrong data) ends with one line naming it instead of a traceback, exit status 2; a run
    the training guard stopped (not learning, non-finite values) exits 3; Ctrl-C exits 130.
    ``ONETRUNK_DEBUG=1`` shows the full traceback. Under torchrun each failing rank prints its
    line (``error [rank R]:`` on ranks other than 0), and the process group is left in every
    case."""
    code = 0
    try:
        main()
    except KeyboardInterrupt:
        code = 130
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
        distributed.destroy()
    if code:
        sys.exit(code)
