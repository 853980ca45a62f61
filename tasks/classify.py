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
is decoded in DataLoader workers with albumentations. Evaluation and ``--predict`` see an
image the same way (``Preprocess``: shorter side to size / crop_pct, centre crop; the
identity for 28 px Fashion-MNIST images). The run folder gets config.yaml, metrics.jsonl,
curves.png, last.pt / best.pt and confusion.png.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from backbones import build_backbone
from heads import ClassificationHead, TaskModel
from tasks.data import fashion_mnist
from tasks.data.folders import ImageFolderDataset, collate_skip_bad
from tasks.data.gpu_augment import IMAGENET_MEAN, IMAGENET_STD, BatchAugment, CutMix
from tasks.data.preprocess import Geometry, Preprocess
from tasks.data.transforms import classification_train_transforms
from tasks.engine import distributed
from tasks.engine.config import ModelConfig, OptimConfig, TrainConfig, bounded, setting
from tasks.engine.derive import DataFacts
from tasks.engine.describe import describe_folders
from tasks.engine.loaders import DeviceLoader, TensorLoader, make_loader
from tasks.engine.loop import autocast
from tasks.engine.metrics import ConfusionMatrix, by_name
from tasks.engine.registry import TaskData, TaskSpec
from tasks.engine.runner import build_parser, run, run_cli
from tasks.engine.viz import plot_confusion

FOLDERS_CROP_PCT = 7 / 8  # evaluation resizes the shorter side to size * 8/7, then crops (torchvision's 256 -> 224)


@dataclass
class ClassifyModelConfig(ModelConfig):
    num_classes: int = bounded(10, 1, help="classes (the data's must match)")


@dataclass
class ClassifyDataConfig:
    dataset: str = setting("fashion_mnist", "fashion_mnist | folders (set by --train-images)")
    data_dir: Optional[str] = setting(None, "Fashion-MNIST folder: the four IDX .gz files (--data-dir)")
    download: bool = setting(False, "fetch Fashion-MNIST through torchvision if missing (--download)")
    train_images: Optional[str] = setting(None, "training images as <root>/<class>/*.png (--train-images)")
    val_images: Optional[str] = setting(None, "validation images as <root>/<class>/*.png (--val-images)")
    image_size: Optional[int] = bounded(None, 8, help="folders: the crop size (null: 224); Fashion-MNIST: 28")
    limit_train: Optional[int] = bounded(None, 1, help="train on a random subset of N samples drawn with "
                                                       "train.seed (classify: class-balanced; null: all; --limit-train)")
    limit_val: Optional[int] = bounded(None, 1, help="evaluate a random subset of N samples, as limit_train "
                                                     "(null: all; --limit-val)")
    crop_padding: int = bounded(2, 0, help="Fashion-MNIST: random crop after zero padding by this many pixels "
                                           "(0: off)")
    hflip: bool = setting(True, "random horizontal flips in training")
    rot90: bool = setting(False, "folders: random quarter turns in training")
    random_erasing: float = bounded(0.0, 0.0, 1.0, help="probability of erasing a random rectangle of an image")
    # measured on the long recipe: 95.95% with CutMix 1.0 against 95.68% without (docs/BENCHMARKS.md)
    cutmix_alpha: float = bounded(0.0, 0.0, help="Fashion-MNIST: CutMix of every batch on the GPU, area from "
                                                 "Beta(alpha, alpha) (0: off)")
    on_device: bool = setting(True, "keep Fashion-MNIST on the GPU (false: in host memory, copied per batch)")
    num_workers: int = bounded(8, 0, help="folders: DataLoader worker processes")
    skip_bad: bool = setting(False, "folders: skip (and count) unreadable images instead of stopping")
    eval_batch_size: int = bounded(1024, 1, help="images per evaluation batch")


@dataclass
class ClassifyConfig:
    model: ClassifyModelConfig = field(default_factory=ClassifyModelConfig)
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _uses_folders(cfg: ClassifyConfig) -> bool:
    d = cfg.data
    if d.dataset not in ("fashion_mnist", "folders"):
        raise ValueError(f"data.dataset={d.dataset!r}: choose fashion_mnist or folders")
    return bool(d.train_images) or d.dataset == "folders"


# ----------------------------------------------------------------------------- model

def build_model(cfg: ClassifyConfig, meta: Mapping[str, Any]) -> TaskModel:
    m, k = cfg.model, len(meta["class_names"])
    if m.num_classes != k:
        raise ValueError(f"the data has {k} classes but model.num_classes={m.num_classes}: "
                         f"pass --set model.num_classes={k}")
    backbone = build_backbone(f"resnet{m.depth}", **m.backbone_kwargs())
    head = ClassificationHead(backbone.feature_info[-1], k, label_smoothing=cfg.optim.label_smoothing)
    return TaskModel(backbone, head)


def make_preprocess(cfg: ClassifyConfig, meta: Mapping[str, Any] | None = None) -> Preprocess:
    """Fashion-MNIST: 28 px, its own statistics, no resize for its own images. Image folders:
    ImageNet statistics (their channel mean for gray), shorter side to size * 8/7, centre crop."""
    chans = cfg.model.in_chans
    meta = meta or {}
    pretrained = cfg.model.normalization() if "mean" not in meta else None  # the trunk's own, if it has any
    if _uses_folders(cfg):
        size, crop_pct = cfg.data.image_size or 224, FOLDERS_CROP_PCT
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if chans == 3 else ((sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,))
    else:
        if chans != 1:
            raise ValueError(f"Fashion-MNIST is grayscale: set model.in_chans=1 (got {chans})")
        size, crop_pct = 28, 1.0
        mean, std = (fashion_mnist.MEAN,), (fashion_mnist.STD,)
    if pretrained is not None:
        mean, std = pretrained
    return Preprocess(in_chans=chans, mean=tuple(meta.get("mean", mean)), std=tuple(meta.get("std", std)),
                      resize="crop", size=int(meta.get("image_size", size)), crop_pct=crop_pct)


# ----------------------------------------------------------------------------- data

def _fashion_mnist(cfg: ClassifyConfig, device: torch.device, pre: Preprocess, train: bool
                   ) -> tuple[Any, Any, list[str]]:
    d = cfg.data
    if d.download:
        with distributed.main_first():  # one download, the other ranks then find the files
            try:
                fashion_mnist.find_data_dir(d.data_dir)
            except FileNotFoundError:
                fashion_mnist.download()
    where = device if d.on_device else torch.device("cpu")
    aug = BatchAugment(pre.mean, pre.std, crop_padding=d.crop_padding, hflip=0.5 if d.hflip else 0.0,
                       erasing=d.random_erasing)
    cl = cfg.train.channels_last
    val_x, val_y = fashion_mnist.load_fashion_mnist("test", d.data_dir, d.limit_val, cfg.train.seed)
    val = TensorLoader(val_x.to(where), val_y.to(where), batch_size=d.eval_batch_size, augment=aug, train=False,
                       channels_last=cl)
    train_loader = None
    if train:
        train_x, train_y = fashion_mnist.load_fashion_mnist("train", d.data_dir, d.limit_train, cfg.train.seed)
        mix = CutMix(len(fashion_mnist.CLASSES), d.cutmix_alpha) if d.cutmix_alpha > 0 else None
        train_loader = TensorLoader(train_x.to(where), train_y.to(where), batch_size=cfg.train.batch_size,
                                    augment=aug, train=True, seed=cfg.train.seed, channels_last=cl, mix=mix)
    if where != device:  # data on the host, model on the device
        val = DeviceLoader(val, device)
        train_loader = DeviceLoader(train_loader, device) if train_loader is not None else None
    return train_loader, val, list(fashion_mnist.CLASSES)


def _folders(cfg: ClassifyConfig, device: torch.device, pre: Preprocess, train: bool,
             skipped: dict[str, dict[str, str]]) -> tuple[Any, Any, list[str]]:
    d = cfg.data
    if not d.train_images or not d.val_images:
        raise ValueError("image-folder data needs both --train-images DIR and --val-images DIR")
    if d.cutmix_alpha:
        raise ValueError("data.cutmix_alpha works with in-memory data (Fashion-MNIST), not image folders")
    chans = cfg.model.in_chans
    # the training folder fixes the classes and their order, also when only evaluating
    train_ds = ImageFolderDataset(d.train_images, channels=chans, skip_bad=d.skip_bad, limit=d.limit_train,
                                  seed=cfg.train.seed,
                                  transforms=classification_train_transforms(pre.size, hflip=d.hflip, rot90=d.rot90,
                                                                             seed=cfg.train.seed))
    val_ds = ImageFolderDataset(d.val_images, channels=chans, classes=train_ds.classes, skip_bad=d.skip_bad,
                                limit=d.limit_val, seed=cfg.train.seed, transforms=pre.albumentations())
    aug = BatchAugment(pre.mean, pre.std, erasing=d.random_erasing)  # crop / flip already done by albumentations

    def finish(training: bool):
        def on_device(batch):
            images, labels, bad = batch
            seen = skipped["train" if training else "val"]
            for b in bad:
                if b.path not in seen:  # once per file, not per epoch
                    seen[b.path] = b.reason
                    warnings.warn(f"skipping an unreadable image (data.skip_bad): {b.reason}", stacklevel=2)
            if images is None:
                return None  # every image of the batch was unreadable
            x = aug(images, train=training)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return x, labels
        return on_device

    def loader(ds, shuffle: bool, batch: int):
        return make_loader(ds, batch_size=batch, shuffle=shuffle, num_workers=d.num_workers,
                           collate_fn=collate_skip_bad, seed=cfg.train.seed, device=device)

    val = DeviceLoader(loader(val_ds, False, d.eval_batch_size), device, finish(False))
    train_loader = None
    if train:
        train_loader = DeviceLoader(loader(train_ds, True, cfg.train.batch_size), device, finish(True),
                                    seed=cfg.train.seed)
    return train_loader, val, train_ds.classes


def describe_data(cfg: ClassifyConfig) -> DataFacts | None:
    """Image folders described for the settings made for them; None for Fashion-MNIST."""
    if not _uses_folders(cfg):
        return None
    d = cfg.data
    if not d.train_images or not d.val_images:
        raise ValueError("image-folder data needs both --train-images DIR and --val-images DIR")
    return describe_folders(d.train_images, d.val_images, limit_train=d.limit_train, limit_val=d.limit_val,
                            seed=cfg.train.seed)


def build_data(cfg: ClassifyConfig, device: torch.device, *, train: bool = True, quiet: bool = False) -> TaskData:
    pre = make_preprocess(cfg)
    skipped: dict[str, dict[str, str]] | None = None  # only files can be unreadable
    if _uses_folders(cfg):
        skipped = {"train": {}, "val": {}}
        train_loader, val, classes = _folders(cfg, device, pre, train, skipped)
    else:
        train_loader, val, classes = _fashion_mnist(cfg, device, pre, train)
    return TaskData(train_loader, val, {"class_names": classes, **pre.to_meta()}, skipped=skipped)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TaskData, device: torch.device, amp: bool = True, *,
             output: Path | None = None, quiet: bool = True) -> dict[str, Any]:
    """Top-1 accuracy, per-class accuracy (a list in class order) and per-class precision and
    recall (``{class name: value}``; recall = per-class accuracy) over every rank's validation
    shard; with ``output``, ``confusion.png`` (rows: true class)."""
    names = data.meta["class_names"]
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(len(names), device)
    with autocast(device, amp):
        for images, labels in data.val:
            cm.update(model(images).argmax(1), labels)
    model.train(was_training)
    m = cm.all_reduce().compute()
    if output is not None:
        plot_confusion(cm.mat.cpu().numpy(), names, Path(output) / "confusion.png",
                       title=f"accuracy {m['acc']:.2%} on {int(cm.mat.sum())} images")
    return {"acc": m["acc"], "per_class_acc": m["per_class_acc"],
            "per_class_precision": by_name(names, m["precision"]), "per_class_recall": by_name(names, m["recall"])}


def report(metrics: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
    names = meta["class_names"]
    p, r = metrics.get("per_class_precision"), metrics.get("per_class_recall")
    if p and r:
        per_class = "precision/recall per class: " + "  ".join(f"{n} {p[n]:.3f}/{r[n]:.3f}" for n in names)
    else:  # metrics recorded before precision and recall were
        per_class = "accuracy per class: " + "  ".join(f"{n} {a:.3f}" for n, a in zip(names, metrics["per_class_acc"]))
    return [f"accuracy {metrics['acc']:.4f}", f"  {per_class}"]


# ----------------------------------------------------------------------------- prediction

def decode(logits: torch.Tensor, geometries: list[Geometry], meta: Mapping[str, Any], topk: int = 5
           ) -> list[dict[str, Any]]:
    """Per image ``{"top": [(class name, probability), ...] (best first), "probs": [K]}``."""
    names = meta["class_names"]
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk={topk!r}: expected a positive integer")
    probs = logits.float().softmax(1).cpu()  # [N, K]
    top = probs.topk(min(topk, len(names)), dim=1)
    # tolist() once per batch: float() / int() on tensor elements cost a microsecond or more each
    return [{"top": [(names[i], p) for p, i in zip(vals, idx)], "probs": row}
            for vals, idx, row in zip(top.values.tolist(), top.indices.tolist(), probs)]


def write_prediction(result: Mapping[str, Any], image: np.ndarray, source: str, out_dir: Path, stem: str,
                     meta: Mapping[str, Any], *, images: bool = True) -> dict[str, Any]:
    """Prints the three best classes; nothing is written."""
    top3 = result["top"][:3]
    print(f"{source}: " + ", ".join(f"{c} {p:.1%}" for c, p in top3))
    return {"image": source, "top3": top3}


def _add_arguments(parser) -> None:
    parser.add_argument("--download", action="store_const", const=True, default=None,
                        help="fetch Fashion-MNIST through torchvision if missing (data.download)")


SPEC = TaskSpec(
    name="classify", config=ClassifyConfig, recipes=("fashion_mnist_resnet18", "fashion_mnist_quick"),
    main_metric="acc", doc=__doc__, data_flags=("data_dir", "train_images", "val_images"),
    build_model=build_model, build_data=build_data, evaluate=evaluate, make_preprocess=make_preprocess,
    decode=decode, write_prediction=write_prediction, report=report, predict_options=("topk",),
    add_arguments=_add_arguments, describe_data=describe_data)


def get_args_parser():
    return build_parser(SPEC)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(SPEC, argv)


if __name__ == "__main__":
    run_cli(main)
