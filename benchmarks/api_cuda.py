"""The Python API on a GPU: what ``tasks.load(...).predict`` costs over the bare network.

Usage (one GPU):
    python -m benchmarks.api_cuda --out DIR

For each task a checkpoint of its GPU recipe's model (ResNet-18; classify 28 px gray, the
dense tasks 256 px RGB) with random weights is loaded through ``tasks.load`` on CUDA. Timed,
interleaved, median of ``--rounds``:

* ``api``: ``predictor.predict(list of uint8 HWC arrays, batch_size)`` from host arrays to
  per-image results (resize, pad, copy, normalise, forward, decode, back on the host);
* ``network``: the same model's eval forward (bf16 autocast, channels_last) on one
  normalised device batch, repeated: what the API could reach at best.

Detection's head is untrained: its classification bias is lowered so that no candidate passes
the score threshold (an untrained head scores every point at its prior and NMS would time
noise); post-processing real detections is not what this measures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


from tasks import TASKS, load  # noqa: E402
from tasks.engine.checkpoint import CKPT_FORMAT, atomic_save  # noqa: E402
from tasks.engine.config import CONFIG_ROOT, config_to_dict, load_config  # noqa: E402
from tasks.engine.logging import env_info  # noqa: E402

NAMES = [f"class{i}" for i in range(10)]


def checkpoint(task: str, folder: Path) -> Path:
    spec = TASKS[task]
    cfg = load_config(spec.config, CONFIG_ROOT / task / f"{spec.recipes[0]}.yaml")
    names = ["background", *NAMES] if task == "segment" else NAMES
    meta = {"class_names": names, **spec.make_preprocess(cfg).to_meta()}
    torch.manual_seed(0)
    model = spec.build_model(cfg, meta)
    heads = [model.head] if task == "detect" else [model.heads["detect"]] if task == "multitask" else []
    for head in heads:
        torch.nn.init.constant_(head.cls_logits.bias, -12.0)
    path = folder / f"{task}.pt"
    atomic_save({"format": CKPT_FORMAT, "task": task, "config": config_to_dict(cfg), "model": model.state_dict(),
                 "ema": None, "meta": meta}, path)
    return path


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script")
    p.add_argument("--profile", action="store_true", help="also a cProfile of one api() per task (<out>/<task>.prof.txt)")
    args = p.parse_args()
    dev = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    import tempfile
    ckpts = Path(tempfile.mkdtemp())
    rows = []
    for task in ("classify", "detect", "segment", "multitask"):
        model = load(checkpoint(task, ckpts), device=args.device)
        size = model.preprocess.size
        rng = np.random.default_rng(0)
        shape = (size, size) if model.preprocess.in_chans == 1 else (size, size, 3)
        n = args.images * (8 if task == "classify" else 1)
        images = [rng.integers(0, 255, shape, dtype=np.uint8) for _ in range(n)]
        batch = model.preprocess.normalize(model.preprocess.batch(
            [model.preprocess.transform(im if im.ndim == 3 else im[:, :, None])[0] for im in images[:args.batch]]).to(dev))
        if model.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)

        def api():
            model.predict(images, batch_size=args.batch)

        def network():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                for _ in range(n // args.batch):
                    model.model(batch)
            sync()

        api(), network()  # warm-up: cuDNN autotuning, allocations
        times = {"api": [], "network": []}
        for _ in range(args.rounds):
            for name, fn in (("api", api), ("network", network)):
                t = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t)
        row = {"task": task, "images": n, "batch": args.batch, "size": size,
               "api_img_per_s": n / statistics.median(times["api"]),
               "network_img_per_s": (n // args.batch * args.batch) / statistics.median(times["network"])}
        row["api_over_network"] = row["api_img_per_s"] / row["network_img_per_s"]
        if args.profile:
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            prof.runcall(api)
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
            (out / f"{task}.prof.txt").write_text(text.getvalue())
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    (out / "api_cuda.json").write_text(json.dumps({"env": env_info(), "rows": rows}, indent=1))
    print("| task | size | batch | api img/s | network img/s | api / network |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['size']} | {r['batch']} | {r['api_img_per_s']:,.0f} | {r['network_img_per_s']:,.0f} "
              f"| {r['api_over_network']:.2f} |")


if __name__ == "__main__":
    main()
