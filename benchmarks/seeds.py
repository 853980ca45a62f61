"""Seed sweep: does a recipe train on every seed, or only on the ones it was tuned with?

    python -m benchmarks.seeds detect   [--seeds 20] [--epochs 12] [--jobs 4] [--set KEY=VALUE ...]
    python -m benchmarks.seeds segment  [...]
    python -m benchmarks.seeds classify [...]
        [--first-seed 0] [--variant NAME:KEY=VALUE,KEY=VALUE ...] [--no-peer] [--stop-after K] [--out DIR]
    python -m benchmarks.seeds merge OUT.json IN.json [IN.json ...]

Trains a short schedule of the task's recipe once per seed (``train.seed``; the data is the same
for every seed) and reports, per seed, the final metric and whether the run collapsed: its metric
is under half the median of its model's runs (or 0), or the training guard stopped it. Then min / median
/ max and the collapse count per model. The torchvision peer of ``benchmarks.bench`` (FCOS, the FCN
head on a torchvision ResNet of the same depth, the plain torchvision ResNet-18 recipe) runs the
same seeds unless ``--no-peer``.

Defaults per task (the data and schedule where a collapse would show; ``--set`` adds to them):

* detect: ``configs/detect/scenes_fcos_resnet18.yaml`` on FashionScenes with 3,000 train scenes,
  8 epochs, evaluated after epochs 4 and 8; the peer is torchvision's FCOS trained by the same engine on the same batches.
* segment: ``configs/segment/scenes_fcn_resnet18.yaml`` on FashionScenes with 3,000 train
  scenes, 8 epochs, evaluated after epochs 4 and 8; the peer is torchvision's FCN head on its ResNet-18.
* classify: ``configs/classify/fashion_mnist_quick.yaml`` (3 epochs); the peer is the torchvision
  ResNet-18 recipe of ``python -m benchmarks.bench classify`` for as many epochs.

``--variant NAME:KEY=VALUE,...`` adds a model of ours with more overrides (a before / after on the
same seeds); ``--stop-after K`` trains only the first K epochs of the schedule (the learning-rate
schedule stays that of ``--epochs``): enough to see an early collapse for a fraction of the time.

``--jobs N`` runs N seeds at once, each in its own process on the one GPU (each process builds
the data once and trains its seeds one after another): the sweep is about accuracy, so the
training times it records are shared-GPU times, not speed measurements. Results:
``<out>/seeds_<task>.json`` (the schema of ``benchmarks/schema.py``: ``numbers`` is the per-model
summary; every run, with its per-epoch losses, under ``runs``) and a Markdown table on stdout.

``merge`` joins the result files of several invocations of one task (a sweep split over calls
of a time-limited machine: other seeds, or the peer apart) into one file with the summary
recomputed over all runs; a (model, seed) measured twice keeps the later file's run, and every
command that produced a run is listed under ``commands``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

RECIPES = {
    "detect": ("configs/detect/scenes_fcos_resnet18.yaml", ["data.scenes_train=3000", "train.eval_every=4"], 8),
    "segment": ("configs/segment/scenes_fcn_resnet18.yaml", ["data.scenes_train=3000", "train.eval_every=4"], 8),
    "classify": ("configs/classify/fashion_mnist_quick.yaml", [], 3),
}
PEERS = {"detect": "torchvision FCOS", "segment": "torchvision FCN head", "classify": "torchvision ResNet-18"}
OURS = "onetrunk"
# a run whose metric is under this fraction of its model's median counts as collapsed
COLLAPSE_FRACTION = 0.5


# ----------------------------------------------------------------------------- one run (in a worker)

_DATA: dict[str, Any] = {}  # per worker process: the built data of each distinct data config


def _data_for(spec, cfg, device):
    """The task's data for ``cfg``, built once per worker and data config; its training loader
    is reseeded per run (the loaders draw order and augmentation from ``(seed, epoch)``)."""
    from tasks.engine.config import config_to_dict

    key = json.dumps([config_to_dict(cfg.data), cfg.train.batch_size, cfg.train.channels_last, cfg.model.in_chans],
                     sort_keys=True, default=str)
    if key not in _DATA:
        _DATA.clear()  # one data set at a time in memory
        _DATA[key] = spec.build_data(cfg, device, quiet=True)
    data = _DATA[key]
    loader = data.train
    for obj in (loader, getattr(loader, "batch_sampler", None)):
        if obj is not None and hasattr(obj, "seed"):
            obj.seed = cfg.train.seed
    return data


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _losses(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = ("epoch", "train_time_s", "eval_time_s")
    return [{k: v for k, v in r.items() if k.startswith(("train_loss", "val_")) or k in keep} for r in rows]


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (model, seed) and return its row. Never raises: errors are recorded."""
    import torch

    from tasks.engine.checkpoint import seed_everything
    from tasks.engine.config import load_config
    from tasks.engine.distributed import resolve_device
    from tasks.engine.registry import TASKS

    task, seed, model_name = job["task"], job["seed"], job["model"]
    row: dict[str, Any] = {"model": model_name, "seed": seed, "metric": None, "guard": None, "error": None}
    run_dir = Path(job["runs"]) / f"{job['slug']}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        if task == "classify" and job["peer"]:
            from benchmarks.bench import peer_fashion_mnist

            device = resolve_device(load_config(TASKS[task].config, job["recipe"], job["overrides"]).train.device)
            result = peer_fashion_mnist(epochs=job["epochs"], seed=seed, device=str(device), log=lambda *a: None)
            row.update(metric=result["acc"], train_time_s=result["train_time_s"], epochs_run=job["epochs"])
            return row
        from benchmarks.bench import _TorchvisionFCN, _TorchvisionFCOS
        from tasks.engine.graphs import inference_models
        from tasks.engine.loop import Trainer, settings_for_run

        try:
            from tasks.engine.guard import TrainingGuardError
        except ImportError:  # an engine without the guard (a before / after on an old commit)
            TrainingGuardError = ()  # noqa: N806

        spec = TASKS[task]
        # checkpoints only at the end: a sweep keeps none, and six processes writing ~230 MB each
        # per epoch kept the GPU idle most of the time (H200 machine, 6 jobs)
        overrides = job["overrides"] + [f"train.seed={seed}", f"train.epochs={job['epochs']}",
                                        f"train.save_every={job['epochs']}"]
        if job["peer"] and task in ("detect", "segment"):
            overrides.append("train.cuda_graph=false")  # torchvision's models sync the host in forward
        cfg = load_config(spec.config, job["recipe"], overrides)
        device = resolve_device(cfg.train.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        seed_everything(seed)
        t_data = time.perf_counter()
        data = _data_for(spec, cfg, device)
        row["data_s"] = round(time.perf_counter() - t_data, 1)
        settings_for_run(spec, cfg, data.train)  # as a run of the recipe would (detection's auto box head)
        seed_everything(seed)  # the model's initialisation depends on the seed alone
        k = len(data.meta["class_names"])
        if not job["peer"]:
            model = spec.build_model(cfg, data.meta)
        elif task == "detect":
            model = _TorchvisionFCOS(cfg.model.depth, k, cfg.data.image_size, cfg)
        else:
            model = _TorchvisionFCN(k, cfg.model.depth)
        graphed = inference_models(cfg, device)

        def evaluate(m, final: bool):
            return spec.evaluate(graphed(m), data, device, cfg.train.amp)

        trainer = Trainer(task, cfg, model, data.train, evaluate=evaluate, main_metric=spec.main_metric,
                          output=run_dir, device=device, quiet=True, targets_checked=data.targets_checked)
        if job["stop_after"]:
            trainer.epochs = min(trainer.epochs, job["stop_after"])  # the schedule stays that of cfg.train.epochs
        try:
            record = trainer.fit()
            row["metric"] = record.get(f"val_{spec.main_metric}")
            row["train_time_s"] = record.get("train_time_total_s")
        except TrainingGuardError as e:
            row["guard"] = str(e)
        row["curve"] = _losses(run_dir)
        row["epochs_run"] = len(row["curve"]) or None
        row["eval_s"] = round(sum(r.get("eval_time_s", 0.0) for r in row["curve"]), 1)
        del trainer, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - a sweep records every failure and goes on
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=8)
    finally:
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of a sweep are not kept
    return row


# ----------------------------------------------------------------------------- summary

def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: n, min / median / max of the final metric, min / median, and the collapsed
    seeds (guard fired, or metric < ``COLLAPSE_FRACTION`` x the model's median)."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        values = [r["metric"] for r in mine if r["metric"] is not None]
        median = statistics.median(values) if values else None
        for r in mine:
            r["collapsed"] = bool(r["guard"] or r["error"] or r["metric"] is None or r["metric"] <= 0
                                  or (median is not None and r["metric"] < COLLAPSE_FRACTION * median))
        out[name] = {"n": len(mine), "min": min(values) if values else None, "median": median,
                     "max": max(values) if values else None,
                     "min_over_median": (min(values) / median) if values and median else None,
                     "collapses": sum(r["collapsed"] for r in mine),
                     "collapsed_seeds": [r["seed"] for r in mine if r["collapsed"]],
                     "guard_fired": sum(bool(r["guard"]) for r in mine),
                     "errors": sum(bool(r["error"]) for r in mine)}
    return out


def table(summary: dict[str, dict[str, Any]], metric: str) -> str:
    def f(v):
        return "-" if v is None else f"{v:.4f}"
    lines = [f"| model | seeds | {metric} min | median | max | min / median | collapses (seeds) | guard fired |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        seeds = ", ".join(map(str, s["collapsed_seeds"])) or "-"
        lines.append(f"| {name} | {s['n']} | {f(s['min'])} | {f(s['median'])} | {f(s['max'])} | "
                     f"{f(s['min_over_median'])} | {s['collapses']} ({seeds}) | {s['guard_fired']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _prepare_data(task: str, recipe: str, overrides: list[str]) -> None:
    """Generate FashionScenes once, before the workers start (they would race for it)."""
    if task not in ("detect", "segment"):
        return
    from tasks.data.scenes import ensure_scenes
    from tasks.engine.config import load_config
    from tasks.engine.registry import TASKS

    d = load_config(TASKS[task].config, recipe, overrides).data
    if d.dataset == "scenes":
        ensure_scenes(d.scenes_root, train=d.scenes_train, val=d.scenes_val, size=d.scenes_size, seed=d.scenes_seed,
                      data_dir=d.data_dir, progress=False, aspect=d.scenes_aspect)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.seeds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(RECIPES))
    p.add_argument("--seeds", type=int, default=20, help="how many seeds (default 20)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--seed-list", help="comma-separated seeds instead of --seeds / --first-seed")
    p.add_argument("--epochs", type=int, help="schedule length (default: the task's, see above)")
    p.add_argument("--stop-after", type=int, help="train only the first K epochs of that schedule")
    p.add_argument("--recipe", help="our recipe (default: the task's, see above)")
    p.add_argument("--set", action="append", default=None, dest="overrides", metavar="KEY=VALUE",
                   help="overrides for every run (default: the task's, see above)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="another model of ours: the base overrides plus these")
    p.add_argument("--no-ours", action="store_true", help="only the variants (and the peer)")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (processes sharing the GPU)")
    p.add_argument("--out", default="runs/seeds")
    return p


CLAIM = ("Seed robustness: the task's recipe (and its variants / the torchvision peer) trained once per seed; "
         "min / median / max of the final metric and the collapsed seeds per model")


def merge(out: str | Path, inputs: list[str | Path], command: str) -> dict[str, Any]:
    """Join seed-sweep result files of one task into ``out`` (see the module docstring)."""
    from benchmarks.schema import write_result

    if not inputs:
        raise SystemExit("merge: give the output file and at least one input file")
    docs = []
    for path in inputs:
        try:
            docs.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise SystemExit(f"merge: {path} is not a readable result file ({e})") from None
    tasks = {d.get("task") for d in docs}
    if len(tasks) != 1 or None in tasks:
        raise SystemExit(f"merge: the inputs hold different tasks ({', '.join(map(str, sorted(map(str, tasks))))})")
    metrics = {d.get("metric") for d in docs}
    if len(metrics) != 1:
        raise SystemExit(f"merge: the inputs measure different metrics ({', '.join(map(str, metrics))})")
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    models: dict[str, list[str]] = {}
    commands: list[str] = []
    for d in docs:
        models.update(d.get("models", {}))
        for c in d.get("commands") or [d["command"]]:
            if c not in commands:
                commands.append(c)
        for r in d.get("runs", []):
            runs[(r["model"], r["seed"])] = r
    order = list(models)
    rows = sorted(runs.values(), key=lambda r: (order.index(r["model"]) if r["model"] in order else len(order),
                                                r["seed"]))
    summary = summarise(rows)
    first = docs[0]
    keep = {k: first[k] for k in ("task", "recipe", "overrides", "epochs", "stop_after", "metric") if k in first}
    write_result(out, claim=CLAIM, numbers=summary, command=command, env=first.get("env"),
                 extra={**keep, "models": models, "seeds": sorted({r["seed"] for r in rows}), "commands": commands,
                        "runs": rows, "summary": summary})
    print(table(summary, first["metric"]))
    print(f"{len(rows)} runs of {len(docs)} files -> {out}")
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.schema import command_line, write_result

    argv = sys.argv[1:] if argv is None else list(argv)
    command = command_line("benchmarks.seeds", argv)
    if argv[:1] == ["merge"]:
        if len(argv) < 3:
            raise SystemExit("usage: python -m benchmarks.seeds merge OUT.json IN.json [IN.json ...]")
        return merge(argv[1], argv[2:], command)
    args = get_args_parser().parse_args(argv)
    task = args.task
    recipe, default_overrides, default_epochs = RECIPES[task]
    recipe = args.recipe or recipe
    overrides = default_overrides if args.overrides is None else args.overrides
    epochs = args.epochs or default_epochs
    seeds = ([int(s) for s in args.seed_list.split(",")] if args.seed_list
             else list(range(args.first_seed, args.first_seed + args.seeds)))
    models: list[tuple[str, list[str], bool]] = [] if args.no_ours else [(OURS, [], False)]
    for v in args.variant:
        name, _, sets = v.partition(":")
        if not name or not sets:
            raise SystemExit(f"--variant {v!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
        models.append((name, [s for s in sets.split(",") if s], False))
    if not args.no_peer:
        models.append((PEERS[task], [], True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _prepare_data(task, recipe, overrides)
    # run folders (deleted after each run) in memory where the machine has a tmpfs
    shm = Path("/dev/shm")
    runs = Path(tempfile.mkdtemp(prefix="seeds-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))

    from tasks.engine.logging import env_info
    from tasks.engine.registry import TASKS

    metric = TASKS[task].main_metric
    # seed-major order: an interrupted sweep has every model on the first seeds
    if args.jobs > 1 and not any(o.startswith("data.num_workers=") for o in overrides):
        # each process its share of the cores for its loader workers (the recipes' 12 each, times
        # the jobs, oversubscribe the machine)
        overrides = overrides + [f"data.num_workers={max(1, (os.cpu_count() or 1) // args.jobs)}"]
    jobs = [{"task": task, "seed": s, "model": name, "slug": _slug(name), "overrides": overrides + extra,
             "peer": peer, "recipe": recipe, "epochs": epochs, "stop_after": args.stop_after, "runs": str(runs)}
            for s in seeds for name, extra, peer in models]
    result: dict[str, Any] = {"env": env_info(), "task": task, "recipe": recipe, "overrides": overrides,
                              "epochs": epochs, "stop_after": args.stop_after, "seeds": seeds, "jobs": args.jobs,
                              "models": {name: extra for name, extra, _ in models}, "metric": metric,
                              "command": command, "runs": []}
    path = out / f"seeds_{task}.json"
    t0 = time.perf_counter()

    def save() -> None:
        write_result(path, claim=CLAIM, numbers=result.get("summary", {}), command=command, env=result["env"],
                     extra={k: v for k, v in result.items() if k not in ("env", "command")})

    def record(row: dict[str, Any]) -> None:
        result["runs"].append(row)
        result["summary"] = summarise(result["runs"])
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        save()
        value = "-" if row["metric"] is None else f"{row['metric']:.4f}"
        why = row["guard"] or row["error"] or ""
        print(f"{row['model']} seed {row['seed']}: {metric} {value} ({row['wall_s']} s) {why}".rstrip(), flush=True)

    if args.jobs <= 1:
        for job in jobs:
            record(run_one(job))
    else:
        # spawn: CUDA cannot be re-initialised in a forked child. Not multiprocessing.Pool: its
        # workers are daemonic and may not start the data loaders' own worker processes
        ctx = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // args.jobs)  # no oversubscribed intra-op threads
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker,
                                                    initargs=(threads,)) as pool:
            for done in concurrent.futures.as_completed([pool.submit(run_one, job) for job in jobs]):
                record(done.result())
    shutil.rmtree(runs, ignore_errors=True)
    result["runs"].sort(key=lambda r: (list(result["models"]).index(r["model"]), r["seed"]))
    result["summary"] = summarise(result["runs"])
    save()
    print(table(result["summary"], metric))
    print(f"{len(jobs)} runs in {time.perf_counter() - t0:.0f} s -> {path}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
