"""Image classification on the shared trunk.

Usage:
    python -m tasks.classify                      # Fashion-MNIST; GPU recipe, or the quick CPU one
    python -m tasks.classify --config configs/classify/fashion_mnist_resnet18.yaml --epochs 40
    python -m tasks.classify --resume             # continue the newest run of the recipe
    python -m tasks.classify --eval-only --weights runs/classify/<run>/best.pt
    python -m tasks.classify --predict shirt.png boot.png [--weights CKPT]
    python -m tasks.classify --train-images data/train --val-images data/val --set data.image_size=64

Several GPUs (batch size per GPU; each process keeps the data on its GPU and trains on
its 1/N share of every epoch):
    torchrun --nproc_per_node=2 -m tasks.classify

Fashion-MNIST lives on the GPU as one uint8 tensor and is augmented there per batch (random
crop with padding, horizontal flip, random erasing). Image-folder data (``<root>/<class>/*``)
is decoded in DataLoader workers with albumentations. The run folder gets config.yaml,
metrics.jsonl, curves.png, last.pt / best.pt and confusion.png.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import cv2
import torch
from torch.utils.data import DataLoader

from backbones import build_backbone
from heads import ClassificationHead, Classifier
from tasks.data import fashion_mnist
from tasks.data.folders import ImageFolderDataset, classification_transforms, collate_skip_bad, read_image
from tasks.data.gpu_augment import IMAGENET_MEAN, IMAGENET_STD, BatchAugment
from tasks.data.loaders import DeviceLoader, TensorLoader, make_loader
from tasks.engine import distributed
from tasks.engine.checkpoint import load_for_inference
from tasks.engine.cli import Run, common_parser, default_recipe, run_cli, setup_run
from tasks.engine.config import ModelConfig, OptimConfig, TrainConfig
from tasks.engine.loop import Trainer, autocast
from tasks.engine.trunk import load_trunk
from tasks.engine.metrics import ConfusionMatrix
from tasks.engine.viz import plot_confusion

TASK = "classify"
GPU_RECIPE, CPU_RECIPE = "fashion_mnist_resnet18", "fashion_mnist_quick"


@dataclass
class ClassifyModelConfig(ModelConfig):
    num_classes: int = 10
    dropout: float = 0.0


@dataclass
class ClassifyDataConfig:
    dataset: str = "fashion_mnist"      # fashion_mnist | folders (set by --train-images)
    data_dir: Optional[str] = None      # Fashion-MNIST folder
    download: bool = False              # fetch Fashion-MNIST through torchvision if missing
    train_images: Optional[str] = None  # <root>/<class>/*.png
    val_images: Optional[str] = None
    image_size: Optional[int] = None    # folders: crop size (default 224); Fashion-MNIST: 28
    limit_train: Optional[int] = None
    limit_val: Optional[int] = None
    crop_padding: int = 2               # random crop after zero padding (0: off)
    hflip: bool = True
    random_erasing: float = 0.0         # probability per image
    on_device: bool = True              # keep in-memory datasets on the GPU
    num_workers: int = 8
    skip_bad: bool = False              # skip unreadable images (counted) instead of stopping
    eval_batch_size: int = 1024


@dataclass
class ClassifyConfig:
    model: ClassifyModelConfig = field(default_factory=ClassifyModelConfig)
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- model

def build_model(cfg: ClassifyConfig) -> Classifier:
    m = cfg.model
    backbone = build_backbone(f"resnet{m.depth}", **m.backbone_kwargs())
    head = ClassificationHead(backbone.feature_info[-1], m.num_classes, dropout=m.dropout,
                              label_smoothing=cfg.optim.label_smoothing)
    return Classifier(backbone, head)


# ----------------------------------------------------------------------------- data

@dataclass
class ClassifyData:
    train: Any
    val: Any
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int


def _fashion_mnist(cfg: ClassifyConfig, device: torch.device) -> ClassifyData:
    d = cfg.data
    if cfg.model.in_chans != 1:
        raise ValueError(f"Fashion-MNIST is grayscale: set model.in_chans=1 (got {cfg.model.in_chans})")
    if d.download:
        with distributed.main_first():  # one download, the other ranks then find the files
            try:
                fashion_mnist.find_data_dir(d.data_dir)
            except FileNotFoundError:
                fashion_mnist.download()
    train_x, train_y = fashion_mnist.load_fashion_mnist("train", d.data_dir, d.limit_train)
    val_x, val_y = fashion_mnist.load_fashion_mnist("test", d.data_dir, d.limit_val)
    where = device if d.on_device else torch.device("cpu")
    mean, std = (fashion_mnist.MEAN,), (fashion_mnist.STD,)
    aug = BatchAugment(mean, std, crop_padding=d.crop_padding, hflip=0.5 if d.hflip else 0.0,
                       erasing=d.random_erasing)
    cl = cfg.train.channels_last
    train = TensorLoader(train_x.to(where), train_y.to(where), batch_size=cfg.train.batch_size, augment=aug,
                         train=True, seed=cfg.train.seed, channels_last=cl)
    val = TensorLoader(val_x.to(where), val_y.to(where), batch_size=d.eval_batch_size, augment=aug, train=False,
                       channels_last=cl)
    if where != device:  # data on the host, model on the device
        train, val = DeviceLoader(train, device), DeviceLoader(val, device)
    return ClassifyData(train, val, list(fashion_mnist.CLASSES), mean, std, 28)


def _folders(cfg: ClassifyConfig, device: torch.device) -> ClassifyData:
    d = cfg.data
    if not d.train_images or not d.val_images:
        raise ValueError("image-folder data needs both --train-images DIR and --val-images DIR")
    size = d.image_size or 224
    chans = cfg.model.in_chans
    train_ds = ImageFolderDataset(d.train_images, channels=chans, skip_bad=d.skip_bad, limit=d.limit_train,
                                  transforms=classification_transforms(size, True, hflip=d.hflip, seed=cfg.train.seed))
    val_ds = ImageFolderDataset(d.val_images, channels=chans, classes=train_ds.classes, skip_bad=d.skip_bad,
                                limit=d.limit_val, transforms=classification_transforms(size, False))
    if len(train_ds.classes) != cfg.model.num_classes:
        raise ValueError(f"{d.train_images} has {len(train_ds.classes)} classes but model.num_classes="
                         f"{cfg.model.num_classes}: pass --set model.num_classes={len(train_ds.classes)}")
    mean = IMAGENET_MEAN if chans == 3 else (sum(IMAGENET_MEAN) / 3,)
    std = IMAGENET_STD if chans == 3 else (sum(IMAGENET_STD) / 3,)
    aug = BatchAugment(mean, std, erasing=d.random_erasing)  # crop / flip already done by albumentations
    skipped = {"n": 0}

    def finish(train: bool):
        def on_device(batch):
            images, labels, n_bad = batch
            skipped["n"] += int(n_bad)
            x = aug(images, train=train)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return x, labels
        return on_device

    def loader(ds, train: bool, batch: int) -> DataLoader:
        return make_loader(ds, batch_size=batch, shuffle=train, num_workers=d.num_workers,
                           collate_fn=collate_skip_bad, seed=cfg.train.seed, device=device)

    train = DeviceLoader(loader(train_ds, True, cfg.train.batch_size), device, finish(True), seed=cfg.train.seed)
    val = DeviceLoader(loader(val_ds, False, d.eval_batch_size), device, finish(False))
    train.skipped = val.skipped = skipped
    return ClassifyData(train, val, train_ds.classes, mean, std, size)


def build_data(cfg: ClassifyConfig, device: torch.device) -> ClassifyData:
    if cfg.data.train_images or cfg.data.dataset == "folders":
        return _folders(cfg, device)
    if cfg.data.dataset != "fashion_mnist":
        raise ValueError(f"data.dataset={cfg.data.dataset!r}: choose fashion_mnist or folders")
    return _fashion_mnist(cfg, device)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, num_classes: int, device: torch.device,
             amp: bool = True) -> tuple[dict[str, Any], torch.Tensor]:
    """Top-1 accuracy, per-class accuracy and the confusion matrix (rows: true class), over
    every rank's validation shard under torchrun."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, device)
    with autocast(device, amp):
        for images, labels in loader:
            cm.update(model(images).argmax(1), labels)
    model.train(was_training)
    m = cm.all_reduce().compute()
    return {"acc": m["acc"], "per_class_acc": m["per_class_acc"]}, cm.mat.cpu()


# ----------------------------------------------------------------------------- entry points

def get_args_parser():
    p = common_parser("python -m tasks.classify", __doc__, data_flags=("data_dir", "train_images", "val_images"))
    p.add_argument("--download", action="store_true", help="fetch Fashion-MNIST through torchvision if missing")
    return p


def _load_for_inference(run: Run) -> Classifier:
    model = build_model(run.cfg)
    return load_for_inference(model, run.checkpoint, run.device, run.cfg.train.channels_last)


def predict(run: Run, paths: list[str]) -> list[dict[str, Any]]:
    """Top-3 classes per image file, printed and returned."""
    meta = run.checkpoint.get("meta", {})
    classes, size = meta["classes"], meta["image_size"]
    model = _load_for_inference(run)
    aug = BatchAugment(tuple(meta["mean"]), tuple(meta["std"]))
    results = []
    for path in paths:
        img = cv2.resize(read_image(path, run.cfg.model.in_chans), (size, size), interpolation=cv2.INTER_AREA)
        img = img.reshape(size, size, -1)  # cv2 drops the channel axis of 1-channel images
        x = aug(torch.from_numpy(img).permute(2, 0, 1)[None].to(run.device), train=False)  # [1, C, H, W]
        with torch.no_grad(), autocast(run.device, run.cfg.train.amp):
            probs = model(x).float().softmax(1)[0]
        top = probs.topk(min(3, len(classes)))
        entry = {"image": path, "top3": [(classes[int(i)], float(p)) for p, i in zip(top.values, top.indices)]}
        results.append(entry)
        print(f"{path}: " + ", ".join(f"{c} {p:.1%}" for c, p in entry["top3"]))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    run = setup_run(TASK, ClassifyConfig, args, default_recipe(GPU_RECIPE, CPU_RECIPE))
    cfg, device, say = run.cfg, run.device, run.console
    if run.summary and not (args.eval_only or args.predict):
        say(run.summary)
    say(f"classify: recipe {run.recipe} on {device} -> {run.output}")

    if args.predict:
        return {"predictions": predict(run, args.predict)}

    data = build_data(cfg, device)

    if args.eval_only:
        model = _load_for_inference(run)
        metrics, cm = evaluate(model, data.val, cfg.model.num_classes, device, cfg.train.amp)
        if distributed.is_main():
            plot_confusion(cm.numpy(), data.classes, run.output / "confusion.png",
                           title=f"{Path(args.weights).name}: accuracy {metrics['acc']:.2%}")
        print(f"accuracy {metrics['acc']:.4f} on {int(cm.sum())} images ({args.weights})")
        for name, acc in zip(data.classes, metrics["per_class_acc"]):
            print(f"  {name:<12} {acc:.4f}")
        return metrics

    model = build_model(cfg)
    if args.trunk:
        load_trunk(model.backbone, args.trunk, cfg.model)  # printed even with --quiet: it changes the run
    meta = {"classes": data.classes, "mean": list(data.mean), "std": list(data.std), "image_size": data.image_size}

    def evaluate_epoch(model, final: bool) -> dict[str, Any]:
        metrics, cm = evaluate(model, data.val, cfg.model.num_classes, device, cfg.train.amp)
        if final:
            plot_confusion(cm.numpy(), data.classes, run.output / "confusion.png",
                           title=f"{run.recipe}, {cfg.train.epochs} epochs: accuracy {metrics['acc']:.2%}")
        return metrics

    trainer = Trainer(TASK, cfg, model, data.train, output=run.output, device=device, quiet=args.quiet,
                      console=say, main_metric="acc", meta=meta, evaluate=evaluate_epoch)
    if run.resume_from is not None:
        trainer.resume(run.resume_from)
    record = trainer.fit()
    metrics = {"acc": record["val_acc"], "per_class_acc": record["val_per_class_acc"]}
    skipped = getattr(data.train, "skipped", {}).get("n", 0)
    if distributed.world_size() > 1:  # every rank's shard
        skipped = int(distributed.all_reduce_sum(torch.tensor(skipped, device=device)))
    if skipped:
        say(f"skipped {skipped} unreadable training images (data.skip_bad)")
    say(f"done: accuracy {metrics['acc']:.4f}, {record.get('train_time_total_s', 0):.1f} s of training, "
        f"run folder {run.output}")
    return {**record, "acc": metrics["acc"], "per_class_acc": metrics["per_class_acc"], "output": str(run.output)}


if __name__ == "__main__":
    run_cli(main)
