"""Small class-folder sets through the real command: the validation accuracy that
``python -m tasks.classify --train-images DIR/train --val-images DIR/val`` reaches from scratch
on a few hundred images, with the settings made for the data or with ``--set`` variants of them.

    python -m benchmarks.small_sets --out DIR [--sets shapes3,shapes5,fashion4] [--variants NAME=K=V;K=V ...]
        [--default] [--images 200] [--seeds 0] [--jobs 1] [--device cuda] [--workers N] [--result FILE]

The sets, generated into ``DIR/sets/`` (reused when there; ``--images``: other than 200 a split):

* ``shapesN`` (folder ``shapesN-200``): ``python -m benchmarks.shapes --folders --train 200 --val 200
  --seed N`` (4 classes of coloured shapes, any rotation, 64-128 px);
* ``fashion4`` / ``fashion10`` (``fashion4-200``, ...): 200 training and 200 validation images of
  Fashion-MNIST (classes T-shirt/top, Trouser, Sneaker, Bag / all ten), drawn with seed 0 from its
  training split (``FASHION_MNIST_DIR`` or the usual places), 28x28 grayscale PNG.

Each run is the command above with ``--seed S --output DIR/runs/<set>-<variant>-<S> --quiet`` and
the variant's ``--set`` values (``--default``: a variant with none, the settings the data gets);
the result is the last evaluation's ``val_acc`` (the weights ``last.pt`` holds) and the best one
(chosen on these validation images, so optimistic), from the run's ``metrics.jsonl``. Prints one
line per run and the median / min / max per variant and set kind; writes ``--result`` (JSON).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.schema import command_line, write_result
from benchmarks.shapes import ensure_shapes
from tasks.engine.logging import MetricsLog

CLAIM = "validation accuracy of the classify command trained from scratch on 200-image class-folder sets"
FASHION_SETS = {"fashion4": (0, 1, 7, 8), "fashion10": tuple(range(10))}


def fashion_folders(out: Path, classes: tuple[int, ...], per_split: int = 200, seed: int = 0) -> Path:
    """``per_split`` training and validation images (as many of each class) of Fashion-MNIST's
    training split as PNG class folders in ``out`` (kept when already there)."""
    import cv2

    from tasks.data import fashion_mnist

    if (out / "done").is_file():
        return out
    x, y = fashion_mnist.load_fashion_mnist("train")
    x, y = x.numpy(), y.numpy()
    rng = np.random.default_rng(seed)
    per_class = per_split // len(classes)
    for c in classes:
        idx = rng.choice(np.flatnonzero(y == c), 2 * per_class, replace=False)
        name = fashion_mnist.CLASSES[c].replace("/", "_").replace(" ", "_")
        for split, part in (("train", idx[:per_class]), ("val", idx[per_class:])):
            (out / split / name).mkdir(parents=True, exist_ok=True)
            for i in part:
                cv2.imwrite(str(out / split / name / f"{i}.png"), x[i])
    (out / "done").write_text("")
    return out


def make_set(name: str, root: Path, images: int = 200) -> Path:
    if name.startswith("shapes") and name[len("shapes"):].isdigit():
        return ensure_shapes(root / f"{name}-{images}", images, images, int(name[len("shapes"):]), folders=True)
    if name in FASHION_SETS:
        return fashion_folders(root / f"{name}-{images}", FASHION_SETS[name], images)
    raise ValueError(f"--sets: {name!r} is neither shapesN nor one of {sorted(FASHION_SETS)}")


def run_one(data: Path, out: Path, sets: list[str], seed: int, device: str, env: dict) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tasks.classify", "--train-images", str(data / "train"), "--val-images",
           str(data / "val"), "--seed", str(seed), "--output", str(out), "--overwrite", "--quiet", "--device", device]
    for kv in sets:
        cmd += ["--set", kv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    rows = MetricsLog(out / "metrics.jsonl").records()  # a run that died mid-line keeps its whole lines
    accs = [r["val_acc"] for r in rows if "val_acc" in r]
    config = out / "config.yaml"  # the settings made for the data head it as comments
    lines = config.read_text().splitlines() if config.is_file() else []
    derivation = [line[2:] for line in lines if line.startswith("#  ")]
    return {"rc": proc.returncode, "final": accs[-1] if accs else None, "best": max(accs) if accs else None,
            "epochs": len(rows), "curve": accs, "wall_s": round(time.perf_counter() - t0, 1), "derivation": derivation}


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition("=")
    return name, [kv for kv in sets.split(";") if kv]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.small_sets", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where the sets and the runs go")
    p.add_argument("--sets", default="shapes3,shapes5,fashion4")
    p.add_argument("--variants", nargs="*", default=[], help="NAME=KEY=VALUE;KEY=VALUE (the --set values)")
    p.add_argument("--default", action="store_true", help="also the run with the settings made for the data only")
    p.add_argument("--images", type=int, default=200, help="training and validation images of each set")
    p.add_argument("--seeds", default="0")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", type=int, help="data.num_workers of every run (default: the derived)")
    p.add_argument("--result", type=Path)
    args = p.parse_args(argv)
    variants = dict(parse_variant(v) for v in args.variants)
    if args.default or not variants:
        variants = {"default": [], **variants}
    if args.workers is not None:
        variants = {k: [f"data.num_workers={args.workers}", *v] for k, v in variants.items()}
    seeds = [int(s) for s in args.seeds.split(",")]
    sets = {name: make_set(name, args.out / "sets", args.images) for name in args.sets.split(",")}
    env = {**os.environ, "ONETRUNK_OFFLINE": "1"}  # from scratch: the point of the measurement
    jobs = [(s, v, seed) for s in sets for v in variants for seed in seeds]

    def work(job):
        s, v, seed = job
        r = run_one(sets[s], args.out / "runs" / f"{s}-{v}-{seed}", variants[v], seed, args.device, env)
        print(f"{s:10s} {v:24s} seed {seed}: final {r['final']} best {r['best']} ({r['wall_s']} s, rc {r['rc']})",
              flush=True)
        return {"set": s, "variant": v, "seed": seed, **r}

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        runs = list(pool.map(work, jobs))
    summary = {}
    for v in variants:
        for kind in ("shapes", "fashion"):
            acc = [r["final"] for r in runs
                   if r["variant"] == v and r["set"].startswith(kind) and r["final"] is not None]
            if acc:
                summary[f"{v}/{kind}"] = {"median": statistics.median(acc), "min": min(acc), "max": max(acc),
                                          "n": len(acc)}
                print(f"{v:24s} {kind:8s} median {statistics.median(acc):.3f} min {min(acc):.3f} "
                      f"max {max(acc):.3f} (n={len(acc)})")
    if args.result:
        write_result(args.result, claim=CLAIM, numbers=summary, command=command_line("benchmarks.small_sets", argv),
                     extra={"variants": variants, "runs": runs})
    return {"summary": summary, "runs": runs}


if __name__ == "__main__":
    main()
