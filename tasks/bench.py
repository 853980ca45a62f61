"""Benchmarks against the peers a user would otherwise write, in one process on one GPU.

Usage:
    python -m tasks.bench classify [--out DIR] [--recipe FILE ...] [--set KEY=VALUE ...]
                                   [--peer-epochs 15] [--no-peer] [--data-dir FMNIST]

``classify``: this project's recipe(s) (``python -m tasks.classify``) and the peer of the
issue: torchvision ``resnet18`` with a 3x3/1 one-channel ``conv1`` and no max-pool,
``torchvision.datasets.FashionMNIST`` + ``DataLoader(num_workers=8)`` + torchvision transforms
(RandomCrop(28, padding=2), RandomHorizontalFlip), SGD nesterov 0.1, one-cycle, label smoothing
0.1, bf16 autocast, channels_last, batch 256. Training time excludes evaluation for both;
first-epoch time (worker start-up, cuDNN autotuning, compilation) is included and also
reported apart. Results go to ``<out>/bench_classify.json`` and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import gzip
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from tasks.data import fashion_mnist

__all__ = ["env_info", "peer_fashion_mnist", "ours_classify", "main"]


def env_info() -> dict[str, Any]:
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


def _torchvision_root(data_dir: str | None, tmp: Path) -> Path:
    """torchvision's FashionMNIST wants <root>/FashionMNIST/raw/<unpacked IDX files>."""
    src = fashion_mnist.find_data_dir(data_dir)
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for imgs, lbls, _ in fashion_mnist.SPLITS.values():
        for stem in (imgs, lbls):
            gz = src / (stem + ".gz")
            if gz.is_file():
                (raw / stem).write_bytes(gzip.decompress(gz.read_bytes()))
            else:
                shutil.copy(src / stem, raw / stem)
    return tmp


def peer_fashion_mnist(data_dir: str | None = None, *, epochs: int = 15, batch_size: int = 256, workers: int = 8,
                       lr: float = 0.1, device: str = "cuda", limit: int | None = None, log=print) -> dict[str, Any]:
    """The straightforward torchvision recipe (see the module docstring)."""
    import torchvision
    import torchvision.transforms as T
    from torch import nn
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        root = _torchvision_root(data_dir, Path(tmp))
        norm = T.Normalize((fashion_mnist.MEAN,), (fashion_mnist.STD,))
        train_set = torchvision.datasets.FashionMNIST(
            str(root), train=True, transform=T.Compose([T.RandomCrop(28, padding=2), T.RandomHorizontalFlip(),
                                                        T.ToTensor(), norm]))
        test_set = torchvision.datasets.FashionMNIST(str(root), train=False, transform=T.Compose([T.ToTensor(), norm]))
        if limit:  # quick checks only
            train_set = torch.utils.data.Subset(train_set, range(limit))
            test_set = torch.utils.data.Subset(test_set, range(limit))
        train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
                                  pin_memory=True, drop_last=True, persistent_workers=True)
        test_loader = DataLoader(test_set, batch_size=1024, num_workers=workers, pin_memory=True)

        model = torchvision.models.resnet18(num_classes=10)
        model.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        model = model.to(dev, memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=len(train_loader))
        crit = nn.CrossEntropyLoss(label_smoothing=0.1)
        epoch_times = []
        for epoch in range(epochs):
            model.train()
            t0 = time.perf_counter()
            for x, y in train_loader:
                x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
                y = y.to(dev, non_blocking=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    loss = crit(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            epoch_times.append(time.perf_counter() - t0)
            log(f"peer epoch {epoch + 1}/{epochs}: {epoch_times[-1]:.2f} s, loss {loss.item():.3f}")
        model.eval()
        correct = total = 0
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            for x, y in test_loader:
                x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
                pred = model(x).argmax(1).cpu()
                correct += int((pred == y).sum())
                total += len(y)
    n_train = len(train_loader) * batch_size
    train_s = sum(epoch_times)
    return {"name": "peer: torchvision resnet18 + DataLoader(8 workers)", "acc": correct / total,
            "epochs": epochs, "batch_size": batch_size, "train_time_s": train_s,
            "first_epoch_s": epoch_times[0], "img_per_s": n_train * epochs / train_s,
            "steady_img_per_s": n_train / statistics.median(epoch_times[1:] or epoch_times)}


def ours_classify(recipe: str, out: Path, extra: list[str], data_dir: str | None = None) -> dict[str, Any]:
    """One ``python -m tasks.classify`` run; numbers from its return value and metrics.jsonl."""
    from tasks import classify

    argv = ["--config", recipe, "--output", str(out), "--quiet"] + extra
    if data_dir:
        argv += ["--data-dir", data_dir]
    t0 = time.perf_counter()
    final = classify.main(argv)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_imgs = [r["train_img_per_s"] for r in records]
    epochs = len(records)
    n_imgs = steps_imgs[0] * records[0]["train_time_s"]  # images per epoch
    return {"name": f"onetrunk: {Path(recipe).stem} {' '.join(extra)}".strip(), "acc": final["acc"],
            "best_acc": final.get("best_acc"), "epochs": epochs,
            "batch_size": yaml.safe_load((out / "config.yaml").read_text())["train"]["batch_size"],
            "train_time_s": final["train_time_total_s"], "first_epoch_s": records[0]["train_time_s"],
            "img_per_s": n_imgs * epochs / final["train_time_total_s"],
            "steady_img_per_s": statistics.median(steps_imgs[1:] or steps_imgs),
            "eval_time_s": sum(r.get("eval_time_s", 0.0) for r in records), "wall_s": wall,
            "acc_curve": [round(r.get("val_acc", float("nan")), 4) for r in records]}


def _table(rows: list[dict[str, Any]]) -> str:
    head = "| run | test acc | epochs | train s (1st epoch) | img/s (steady) |\n|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        lines.append(f"| {r['name']} | {r['acc']:.2%} | {r['epochs']} | {r['train_time_s']:.1f} "
                     f"({r['first_epoch_s']:.1f}) | {r['img_per_s']:,.0f} ({r['steady_img_per_s']:,.0f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m tasks.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["classify"])
    p.add_argument("--out", default="runs/bench", help="folder for run folders and the JSON results")
    p.add_argument("--recipe", action="append", default=[], metavar="FILE[::FLAGS]",
                   help="our recipe(s) to run; FLAGS after '::' are passed on (e.g. '::--epochs 40')")
    p.add_argument("--peer-epochs", type=int, default=15)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--data-dir")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"env": env_info(), "runs": []}
    print(json.dumps(results["env"]))
    recipes = args.recipe or ["configs/classify/fashion_mnist_resnet18.yaml"]

    def save():
        (out / "bench_classify.json").write_text(json.dumps(results, indent=1))

    for i, spec in enumerate(recipes):
        recipe, _, flags = spec.partition("::")
        shutil.rmtree(out / f"ours{i}", ignore_errors=True)  # the bench's own scratch run folder
        r = ours_classify(recipe, out / f"ours{i}", flags.split(), args.data_dir)
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
        save()
    if not args.no_peer:
        r = peer_fashion_mnist(args.data_dir, epochs=args.peer_epochs)
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
        save()
    print(_table(results["runs"]))
    return results


if __name__ == "__main__":
    main()
