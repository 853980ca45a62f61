"""Benchmarks against the peers a user would otherwise write, in one process on one GPU.

Usage (from the repository root: ``benchmarks/`` is not installed with the package):
    python -m benchmarks.bench classify [--out DIR] [--recipe FILE[::FLAGS] ...] [--peer-epochs 15] [--no-peer]
    python -m benchmarks.bench detect   [--out DIR] [--set KEY=VALUE ...]
    python -m benchmarks.bench segment  [--out DIR] [--set KEY=VALUE ...]
    python -m benchmarks.bench multitask [--out DIR] [--set KEY=VALUE ...] [--weights CKPT]  # one-pass vs three models
    python -m benchmarks.bench backbone ...  # the same as python -m benchmarks.backbone ...

``classify``: this project's recipe(s) (``python -m tasks.classify``) and the peer of the
issue: torchvision ``resnet18`` with a 3x3/1 one-channel ``conv1`` and no max-pool,
``torchvision.datasets.FashionMNIST`` + ``DataLoader(num_workers=8)`` + torchvision transforms
(RandomCrop(28, padding=2), RandomHorizontalFlip), SGD nesterov 0.1, one-cycle, label smoothing
0.1, bf16 autocast, channels_last, batch 256. Training time excludes evaluation for both;
first-epoch time (worker start-up, cuDNN autotuning, compilation) is included and also
reported apart. Results go to ``<out>/bench_classify.json`` and a Markdown table on stdout.

``detect`` / ``segment``: this project's model and torchvision's (FCOS on ``resnet_fpn_backbone``
with BatchNorm, weights none; ``fcn_resnet50`` and an FCN head on torchvision's ResNet of our
depth through ``IntermediateLayerGetter``) trained by the same engine from the same recipe
(``configs/<task>/scenes_*_resnet18.yaml`` plus ``--set`` overrides): same data pipeline, trunk
depth, image size, epochs, batch, optimizer and schedule, so the difference is the model code.
The peers get the already-normalised batches (their own transform's normalisation is set to
identity). Training images/s, inference images/s (forward + post-processing on device-resident
batches) and the task metric of each go to ``<out>/bench_<task>.json``.

Every result file has the schema of ``benchmarks/schema.py`` (``schema``, ``claim``,
``numbers``, ``command``, ``env``, ``date``; the runs and settings beside them) and is rewritten
after each run.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.schema import command_line, write_result
from tasks.data import fashion_mnist
from tasks.engine.checkpoint import seed_everything
from tasks.engine.config import CONFIG_ROOT, load_config
from tasks.engine.distributed import resolve_device
from tasks.engine.graphs import GraphedInference, inference_models
from tasks.engine.logging import env_info
from tasks.engine.loop import Trainer, autocast, settings_for_run
from tasks.engine.registry import TASKS
from tasks.engine.runner import prog_name, run, run_cli

__all__ = ["peer_fashion_mnist", "ours_classify", "bench_dense", "bench_multitask_inference", "main"]


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
                       lr: float = 0.1, device: str = "cuda", limit: int | None = None, seed: int = 0,
                       log=print) -> dict[str, Any]:
    """The straightforward torchvision recipe (see the module docstring); ``seed`` seeds its
    initialisation and data order."""
    import torchvision
    import torchvision.transforms as T
    from torch import nn
    from torch.utils.data import DataLoader

    torch.manual_seed(seed)
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
    argv = ["--config", recipe, "--output", str(out), "--quiet"] + extra
    if data_dir:
        argv += ["--data-dir", data_dir]
    t0 = time.perf_counter()
    final = run(TASKS["classify"], argv)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_imgs = [r["train_img_per_s"] for r in records]
    epochs = len(records)
    return {"name": f"onetrunk: {Path(recipe).stem} {' '.join(extra)}".strip(), "acc": final["acc"],
            "best_acc": final.get("best_acc"), "epochs": epochs,
            "batch_size": yaml.safe_load((out / "config.yaml").read_text())["train"]["batch_size"],
            "train_time_s": final["train_time_total_s"], "first_epoch_s": records[0]["train_time_s"],
            "img_per_s": sum(r["train_images"] for r in records) / final["train_time_total_s"],
            "steady_img_per_s": statistics.median(steps_imgs[1:] or steps_imgs),
            "eval_time_s": sum(r.get("eval_time_s", 0.0) for r in records), "wall_s": wall,
            "acc_curve": [round(r.get("val_acc", float("nan")), 4) for r in records]}


# ----------------------------------------------------------------------------- detect / segment

class _TorchvisionFCOS(torch.nn.Module):
    """torchvision FCOS behind the ``model(images, targets)`` protocol of our task models."""

    def __init__(self, depth: int, num_classes: int, image_size: int, cfg) -> None:
        super().__init__()
        from torch import nn
        from torchvision.models.detection import FCOS
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7

        from torchvision.ops import FrozenBatchNorm2d

        m, d = cfg.model, cfg.data
        # our trunk's norm and frozen stages: BatchNorm, all trainable, for a trunk trained from
        # scratch; FrozenBatchNorm2d and trainable_layers = 5 - freeze_at as fine-tuning recipes
        frozen = m.norm == "frozen_bn"
        body = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None,
                                   norm_layer=FrozenBatchNorm2d if frozen else nn.BatchNorm2d,
                                   trainable_layers=5 - m.freeze_at, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
        # the square mode feeds it image_size batches; the aspect mode batches it must not
        # resize again in training (_skip_resize), and evaluates at our evaluation size
        sizes = dict(min_size=tuple(d.min_size), max_size=d.max_size, _skip_resize=True) \
            if d.resize == "aspect" else dict(min_size=image_size, max_size=image_size)
        self.fcos = FCOS(body, num_classes, image_mean=[0.0] * 3, image_std=[1.0] * 3, score_thresh=m.score_thresh,
                         nms_thresh=m.nms_thresh, detections_per_img=m.detections_per_img,
                         topk_candidates=m.topk_candidates, center_sampling_radius=m.center_sampling_radius, **sizes)

    def forward(self, images: torch.Tensor, targets=None):
        from heads.detection import is_padded_targets

        if self.training:
            if is_padded_targets(targets):  # our padded training batch -> torchvision's per-image dicts
                keep = targets["labels"] >= 0
                targets = [{"boxes": b[k], "labels": lab[k]}
                           for b, lab, k in zip(targets["boxes"], targets["labels"], keep)]
            return self.fcos(list(images), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        return self.fcos(list(images))


class _TorchvisionFCN(torch.nn.Module):
    """torchvision FCN (``fcn_resnet50``, or its head on a torchvision ResNet through
    ``IntermediateLayerGetter``) behind our protocol: losses in training, logits otherwise."""

    def __init__(self, num_classes: int, depth: int | None = None) -> None:
        super().__init__()
        import torchvision
        from torchvision.models._utils import IntermediateLayerGetter
        from torchvision.models.segmentation import fcn_resnet50
        from torchvision.models.segmentation.fcn import FCN, FCNHead

        if depth is None:
            self.net = fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        else:  # torchvision's BasicBlock cannot dilate: C5 at stride 32 (FCN-32s)
            trunk = getattr(torchvision.models, f"resnet{depth}")(weights=None)
            channels = trunk.fc.in_features
            self.net = FCN(IntermediateLayerGetter(trunk, {"layer4": "out"}), FCNHead(channels, num_classes))

    def forward(self, images: torch.Tensor, masks=None):
        import torch.nn.functional as F

        out = self.net(images)["out"]
        if self.training and masks is not None:
            return {"seg": F.cross_entropy(out.float(), masks, ignore_index=255)}
        return out


@torch.no_grad()
def inference_img_per_s(model: torch.nn.Module, loader, device: torch.device, amp: bool, batches: int = 8) -> float:
    """Images/s of ``model(images)`` in eval mode over device-resident batches (data loading
    excluded), after two warm-up batches; CUDA-synchronised wall time."""
    model.eval()
    held = []
    for i, (images, _) in enumerate(loader):
        held.append(images)
        if i + 1 >= batches:
            break
    with autocast(device, amp):
        for x in held[:2] * 2:  # twice: GraphedInference captures a shape on its third sighting
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 0
        for x in held:
            model(x)
            n += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


CLAIMS = {
    "classify": "Fashion-MNIST classification: this project's recipe(s) against the plain torchvision "
                "ResNet-18 + DataLoader recipe, one process, one GPU: test accuracy, training time, images/s",
    "detect": "FashionScenes detection: this project's FCOS model against torchvision's FCOS (ResNet FPN) "
              "trained by the same engine from the same recipe: AP, training and inference images/s",
    "segment": "FashionScenes segmentation: this project's FCN model against torchvision's FCN head on its "
               "ResNet and fcn_resnet50, same engine and recipe: mIoU, training and inference images/s",
    "multitask": "One-pass multitask inference (one trunk, three heads) against the three single-task models "
                 "run one after another on the same batches: images/s and identical outputs",
}


def bench_dense(task: str, out: Path, overrides: list[str], device: torch.device | None = None,
                recipe: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Ours and the torchvision peers for ``task`` ("detect" / "segment"), one after another,
    on the task's GPU recipe (or ``recipe``). ``command``: the command line to record."""
    spec = TASKS[task]
    recipe = Path(recipe) if recipe else CONFIG_ROOT / task / f"{spec.recipes[0]}.yaml"
    cfg = load_config(spec.config, recipe, overrides)
    device = device or resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = spec.build_data(cfg, device, quiet=True)
    settings_for_run(spec, cfg, data.train)  # as a run of the recipe would (detection's auto box head)
    k = len(data.meta["class_names"])
    metric = spec.main_metric
    models = {f"onetrunk ResNet-{cfg.model.depth}": lambda: spec.build_model(cfg, data.meta)}
    if task == "detect":
        models[f"torchvision FCOS ResNet-{cfg.model.depth} FPN"] = (
            lambda: _TorchvisionFCOS(cfg.model.depth, k, cfg.data.image_size, cfg))
    else:
        models[f"torchvision FCN head on ResNet-{cfg.model.depth} (IntermediateLayerGetter)"] = (
            lambda: _TorchvisionFCN(k, cfg.model.depth))
        models["torchvision fcn_resnet50"] = lambda: _TorchvisionFCN(k)
    if command is None:
        command = command_line("benchmarks.bench", [task, *(a for o in overrides for a in ("--set", o))]
                               + (["--recipe", str(recipe)] if recipe else []))
    results: dict[str, Any] = {"env": env_info(), "recipe": str(recipe), "overrides": overrides, "runs": []}
    for i, (name, build) in enumerate(models.items()):
        seed_everything(cfg.train.seed)
        model = build()
        n_params = sum(p.numel() for p in model.parameters())
        run_dir = out / f"{task}{i}"
        shutil.rmtree(run_dir, ignore_errors=True)

        run_cfg = cfg
        if isinstance(model, (_TorchvisionFCOS, _TorchvisionFCN)) and cfg.train.cuda_graph:
            # torchvision's models sync the host inside forward: no capture
            run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cuda_graph=False))
        graphed = inference_models(run_cfg, device)

        def evaluate(m, final: bool, graphed=graphed):  # as the runner evaluates
            return spec.evaluate(graphed(m), data, device, cfg.train.amp)
        trainer = Trainer(task, run_cfg, model, data.train, evaluate=evaluate, main_metric=metric, output=run_dir,
                          device=device, quiet=True, targets_checked=data.targets_checked)
        record = trainer.fit()
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        row = {"name": name, "params_m": round(n_params / 1e6, 2), "cuda_graph": run_cfg.train.cuda_graph,
               metric: record[f"val_{metric}"],
               f"best_{metric}": record.get(f"best_{metric}"), "epochs": len(records),
               "train_time_s": record["train_time_total_s"], "first_epoch_s": records[0]["train_time_s"],
               "train_img_per_s": statistics.median(r["train_img_per_s"] for r in records[1:] or records),
               "infer_img_per_s": inference_img_per_s(graphed(trainer.eval_model), data.val, device, cfg.train.amp),
               "curve": [round(r.get(f"val_{metric}", float("nan")), 4) for r in records]}
        if task == "detect":
            row.update({key: record[f"val_{key}"] for key in ("AP50", "AP75", "APs", "APm")})
        else:
            row["pixel_acc"] = record["val_pixel_acc"]
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        numbers = {r["name"]: {k: r[k] for k in (metric, "train_img_per_s", "infer_img_per_s", "train_time_s")}
                   for r in results["runs"]}
        write_result(out / f"bench_{task}.json", claim=CLAIMS[task], numbers=numbers, command=command,
                     env=results["env"], extra={k: v for k, v in results.items() if k != "env"})
        del trainer, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(_dense_table(results["runs"], metric))
    return results


def _dense_table(rows: list[dict[str, Any]], metric: str) -> str:
    lines = [f"| model | params (M) | {metric} | epochs | train s (1st epoch) | train img/s | infer img/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params_m']} | {r[metric]:.4f} | {r['epochs']} | {r['train_time_s']:.1f} "
                     f"({r['first_epoch_s']:.1f}) | {r['train_img_per_s']:,.0f} | {r['infer_img_per_s']:,.0f} |")
    return "\n".join(lines)


def bench_multitask_inference(out: Path, overrides: list[str], device: torch.device | None = None,
                              batches: int = 8, weights: str | None = None,
                              command: str | None = None) -> dict[str, Any]:
    """Inference images/s of one ``MultiTaskModel`` against the three single-task models
    (same weights, trunk copied into each) run one after another on the same batches, and
    whether their outputs agree. ``weights``: a ``tasks.multitask`` checkpoint of the recipe.
    Without it the initial weights are used, which understates detection: an untrained head
    scores every point near its prior, so all top-k candidates reach NMS."""
    import copy

    from heads import Detector, Segmenter, TaskModel

    spec = TASKS["multitask"]
    recipe = CONFIG_ROOT / "multitask" / f"{spec.recipes[0]}.yaml"
    cfg = load_config(spec.config, recipe, overrides)
    device = device or resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.train.seed)
    data = spec.build_data(cfg, device, train=False, quiet=True)
    merged = spec.build_model(cfg, data.meta)
    if weights:
        from tasks.engine.checkpoint import load_checkpoint, model_state
        merged.load_state_dict(model_state(load_checkpoint(weights)))
    merged = merged.to(device).eval()
    singles = {"classify": TaskModel, "detect": Detector, "segment": Segmenter}
    singles = {name: cls(copy.deepcopy(merged.backbone), merged.heads[name]).to(device).eval()
               for name, cls in singles.items()}
    if cfg.train.channels_last:
        merged = merged.to(memory_format=torch.channels_last)
        singles = {k: m.to(memory_format=torch.channels_last) for k, m in singles.items()}
    held = []
    for i, (images, _) in enumerate(data.val):
        held.append(images)
        if i + 1 >= batches:
            break

    def timed(fn) -> float:
        with torch.no_grad(), autocast(device, cfg.train.amp):
            for x in held[:2]:
                fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for x in held:
                fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return sum(x.shape[0] for x in held) / (time.perf_counter() - t0)

    eager = {"multitask": timed(merged), **{name: timed(m) for name, m in singles.items()}}
    if device.type == "cuda":  # as evaluation runs them with train.cuda_graph: one CUDA graph per model
        graph = dict(amp=cfg.train.amp, capture_after=0, compile=cfg.train.compile_inference)
        merged = GraphedInference(merged, **graph)
        singles = {k: GraphedInference(m, **graph) for k, m in singles.items()}
    merged_ips = timed(merged)
    single_ips = {name: timed(m) for name, m in singles.items()}
    sequential_ips = 1.0 / sum(1.0 / v for v in single_ips.values())  # the three, one after another
    with torch.no_grad(), autocast(device, cfg.train.amp):
        x = held[0]
        a, b = merged(x), {name: m(x) for name, m in singles.items()}
    same = (torch.equal(a["classify"], b["classify"]) and torch.equal(a["segment"], b["segment"])
            and all(torch.equal(p[k], q[k]) for p, q in zip(a["detect"], b["detect"]) for k in p))
    result = {"env": env_info(), "recipe": str(recipe), "overrides": overrides, "weights": weights,
              "batch_size": held[0].shape[0], "image_size": list(held[0].shape[-2:]),
              "multitask_img_per_s": merged_ips, "single_img_per_s": single_ips,
              "sequential_img_per_s": sequential_ips, "speedup": merged_ips / sequential_ips,
              "cuda_graphs": device.type == "cuda", "eager_img_per_s": eager,
              "eager_speedup": eager["multitask"] / (1.0 / sum(1.0 / eager[k] for k in single_ips)),
              "identical_outputs": bool(same)}
    if command is None:
        command = command_line("benchmarks.bench", ["multitask", *(a for o in overrides for a in ("--set", o))]
                               + (["--weights", weights] if weights else []))
    numbers = {k: result[k] for k in ("multitask_img_per_s", "sequential_img_per_s", "speedup", "eager_speedup",
                                      "identical_outputs")}
    write_result(out / "bench_multitask.json", claim=CLAIMS["multitask"], numbers=numbers, command=command,
                 env=result["env"], extra={k: v for k, v in result.items() if k != "env"})
    print(json.dumps(result))
    return result


def _table(rows: list[dict[str, Any]]) -> str:
    head = "| run | test acc | epochs | train s (1st epoch) | img/s (steady) |\n|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        lines.append(f"| {r['name']} | {r['acc']:.2%} | {r['epochs']} | {r['train_time_s']:.1f} "
                     f"({r['first_epoch_s']:.1f}) | {r['img_per_s']:,.0f} ({r['steady_img_per_s']:,.0f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["backbone"]:  # its own options: python -m benchmarks.bench backbone --help
        from benchmarks import backbone
        return backbone.main(argv[1:])
    command = command_line("benchmarks.bench", argv)
    p = argparse.ArgumentParser(prog=prog_name("python -m benchmarks.bench"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["classify", "detect", "segment", "multitask"])
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="detect / segment: overrides of the GPU recipe, e.g. --set train.epochs=6")
    p.add_argument("--device", help="detect / segment: cpu or cuda (default: the recipe's)")
    p.add_argument("--out", default="runs/bench", help="folder for run folders and the JSON results")
    p.add_argument("--recipe", action="append", default=[], metavar="FILE[::FLAGS]",
                   help="our recipe(s) to run; FLAGS after '::' are passed on (e.g. '::--epochs 40')")
    p.add_argument("--peer-epochs", type=int, default=15)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--data-dir")
    p.add_argument("--weights", metavar="CKPT", help="multitask: a trained checkpoint of the recipe (default: initial weights)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what in ("detect", "segment", "multitask"):
        device = resolve_device(args.device) if args.device else None
        if args.what == "multitask":
            return bench_multitask_inference(out, args.overrides, device, weights=args.weights, command=command)
        return bench_dense(args.what, out, args.overrides, device, recipe=args.recipe[0] if args.recipe else None,
                           command=command)
    results: dict[str, Any] = {"env": env_info(), "runs": []}
    print(json.dumps(results["env"]))
    recipes = args.recipe or ["configs/classify/fashion_mnist_resnet18.yaml"]

    def save():
        numbers = {r["name"]: {k: r[k] for k in ("acc", "train_time_s", "img_per_s", "steady_img_per_s", "epochs")}
                   for r in results["runs"]}
        write_result(out / "bench_classify.json", claim=CLAIMS["classify"], numbers=numbers, command=command,
                     env=results["env"], extra={k: v for k, v in results.items() if k != "env"})

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
    run_cli(main)
