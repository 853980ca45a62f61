"""Semantic segmentation on the shared trunk: an FCN-8s style head, mIoU on the device.

Usage:
    python -m tasks.segment                # FashionScenes masks (generated if missing);
                                           # GPU recipe, or the quick CPU one
    python -m tasks.segment --train-images DIR --train-masks DIR --val-images DIR --val-masks DIR \\
                            --set model.num_classes=21              # VOC-style PNG masks, 255 = ignore
    python -m tasks.segment --train-ann A.json --train-images DIR --val-ann B.json --val-images DIR
    python -m tasks.segment --trunk runs/classify/<run>/best.pt      # start from another task's trunk
    python -m tasks.segment --eval-only --weights runs/segment/<run>/best.pt
    python -m tasks.segment --predict scene.png --weights runs/segment/<run>/best.pt
    torchrun --nproc_per_node=2 -m tasks.segment     # one process per GPU, batch size per GPU

Images and masks are transformed jointly (scale, crop with ignore padding, flip) in DataLoader
workers and normalised on the device. Metrics: mIoU, per-class IoU and pixel accuracy from a
confusion matrix accumulated on the device; segmentation.png shows image, true and predicted
masks; ``--predict`` writes a palette PNG mask and an overlay per image.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from backbones import build_backbone
from heads import FCNHead, Segmenter
from tasks.data.coco import read_image
from tasks.data.gpu_augment import IMAGENET_MEAN, IMAGENET_STD, BatchAugment
from tasks.data.loaders import DeviceLoader, make_loader, normalize_images
from tasks.data.scenes import ensure_scenes
from tasks.data.segmentation import (IGNORE_INDEX, CocoSemanticDataset, MaskFolderDataset, collate_segmentation,
                                     scenes_segmentation)
from tasks.data.transforms import segmentation_train_transforms, segmentation_val_transforms
from tasks.engine.checkpoint import load_for_inference
from tasks.engine import distributed
from tasks.engine.cli import Run, common_parser, default_recipe, run_cli, setup_run
from tasks.engine.config import DenseDataConfig, ModelConfig, OptimConfig, TrainConfig
from tasks.engine.loop import Trainer, autocast
from tasks.engine.trunk import load_trunk
from tasks.engine.logging import progress
from tasks.engine.metrics import ConfusionMatrix
from tasks.engine.viz import draw_segmentation_grid, save_palette_mask

NORMALIZE = BatchAugment(IMAGENET_MEAN, IMAGENET_STD)  # RGB files: ImageNet statistics
TASK = "segment"
GPU_RECIPE, CPU_RECIPE = "scenes_fcn_resnet18", "scenes_quick"


@dataclass
class SegmentModelConfig(ModelConfig):
    num_classes: Optional[int] = None   # background included; default: the dataset's
    in_features: tuple[str, ...] = ("c3", "c4", "c5")
    channels: Optional[int] = None      # conv block width (default: C5 channels / 4)
    dropout: float = 0.1
    aux: bool = False                   # auxiliary head on C4
    aux_weight: float = 0.4


@dataclass
class SegmentDataConfig(DenseDataConfig):
    """FashionScenes masks, COCO instances or VOC-style mask folders (set by --train-masks)."""

    train_masks: Optional[str] = None
    val_masks: Optional[str] = None


@dataclass
class SegmentConfig:
    model: SegmentModelConfig = field(default_factory=SegmentModelConfig)
    data: SegmentDataConfig = field(default_factory=SegmentDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- model

def build_head(feature_info, num_classes: int, *, in_features, channels, dropout, aux, aux_weight) -> FCNHead:
    return FCNHead(feature_info, num_classes, in_features=in_features, channels=channels, dropout=dropout,
                   aux=aux, aux_weight=aux_weight, ignore_index=IGNORE_INDEX)


def build_model(cfg: SegmentConfig, num_classes: int) -> Segmenter:
    m = cfg.model
    backbone = build_backbone(f"resnet{m.depth}", **m.backbone_kwargs())
    return Segmenter(backbone, build_head(backbone.feature_info, num_classes, in_features=m.in_features,
                                          channels=m.channels, dropout=m.dropout, aux=m.aux, aux_weight=m.aux_weight))


# ----------------------------------------------------------------------------- data

@dataclass
class SegmentData:
    train: Any
    val: Any
    val_set: Any
    class_names: list[str]


def _datasets(cfg: SegmentConfig, train: bool, quiet: bool):
    """(train set or None, val set) from FashionScenes, COCO or mask folders."""
    d = cfg.data
    size = d.image_size
    train_tf = segmentation_train_transforms(size, (d.scale_min, d.scale_max), 0.5 if d.hflip else 0.0,
                                             seed=cfg.train.seed, base_size=size)
    val_tf = segmentation_val_transforms(size)
    common = dict(skip_bad=d.skip_bad)
    if d.train_ann or d.val_ann or d.dataset == "coco":
        need = ("train_ann", "train_images", "val_ann", "val_images")
        missing = [f"--{k.replace('_', '-')}" for k in need if not getattr(d, k)]
        if missing:
            raise ValueError(f"COCO segmentation data needs {', '.join(missing)} as well")
        val = CocoSemanticDataset(d.val_ann, d.val_images, transforms=val_tf, limit=d.limit_val, **common)
        tr = CocoSemanticDataset(d.train_ann, d.train_images, transforms=train_tf, limit=d.limit_train,
                                 **common) if train else None
        return tr, val
    if d.train_masks or d.val_masks or d.dataset == "folders":
        need = ("train_images", "train_masks", "val_images", "val_masks")
        missing = [f"--{k.replace('_', '-')}" for k in need if not getattr(d, k)]
        if missing:
            raise ValueError(f"mask-folder data needs {', '.join(missing)} as well")
        if not cfg.model.num_classes:
            raise ValueError("mask-folder data needs --set model.num_classes=K (background included)")
        k = cfg.model.num_classes
        val = MaskFolderDataset(d.val_images, d.val_masks, num_classes=k, transforms=val_tf, limit=d.limit_val,
                                **common)
        tr = MaskFolderDataset(d.train_images, d.train_masks, num_classes=k, transforms=train_tf,
                               limit=d.limit_train, **common) if train else None
        return tr, val
    if d.dataset != "scenes":
        raise ValueError(f"data.dataset={d.dataset!r}: choose scenes, coco or folders")
    with distributed.main_first():  # under torchrun rank 0 generates, the others wait for it
        root = ensure_scenes(d.scenes_root, train=d.scenes_train, val=d.scenes_val, size=d.scenes_size,
                             seed=d.scenes_seed, data_dir=d.data_dir, progress=not quiet)
    val = scenes_segmentation(root, "val", transforms=val_tf, limit=d.limit_val, **common)
    tr = scenes_segmentation(root, "train", transforms=train_tf, limit=d.limit_train, **common) if train else None
    return tr, val


def build_data(cfg: SegmentConfig, device: torch.device, *, train: bool = True, quiet: bool = False) -> SegmentData:
    d = cfg.data
    train_set, val_set = _datasets(cfg, train, quiet)
    if train_set is not None and train_set.class_names != val_set.class_names:
        raise ValueError(f"train and val data have different classes: {train_set.class_names} vs {val_set.class_names}")
    on_device = normalize_images(NORMALIZE, cfg.train.channels_last)

    def loader(ds, shuffle: bool, batch_size: int):
        return make_loader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=d.num_workers,
                           collate_fn=collate_segmentation, seed=cfg.train.seed, device=device)

    val = DeviceLoader(loader(val_set, False, d.eval_batch_size), device, on_device)
    train_loader = None
    if train_set is not None:
        train_loader = DeviceLoader(loader(train_set, True, cfg.train.batch_size), device, on_device,
                                    seed=cfg.train.seed)
    return SegmentData(train_loader, val, val_set, list(val_set.class_names))


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: torch.nn.Module, data: SegmentData, device: torch.device, amp: bool = True, *,
             picture_path: Path | None = None, quiet: bool = True) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy over the validation set (ignore index skipped);
    under torchrun each rank scores its shard and the confusion matrices are summed."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(len(data.class_names), device, ignore_index=IGNORE_INDEX)
    shown: tuple[list, list, list] = ([], [], [])
    with autocast(device, amp):
        for images, masks in progress(data.val, total=len(data.val), desc="eval", quiet=quiet):
            pred = model(images).argmax(1)  # [N, H, W]
            cm.update(pred, masks)
            if picture_path is not None and len(shown[0]) < 4:
                take = 4 - len(shown[0])
                shown[0].extend(list(NORMALIZE.to_uint8(images[:take]).cpu()))
                shown[1].extend(pred[:take].cpu())
                shown[2].extend(masks[:take].cpu())
    model.train(was_training)
    if picture_path is not None and shown[0]:
        draw_segmentation_grid(shown[0], shown[1], data.class_names, picture_path, targets=shown[2])
    return segmentation_metrics(cm.all_reduce())


def segmentation_metrics(cm: ConfusionMatrix) -> dict[str, Any]:
    m = cm.compute()
    return {"miou": m["miou"], "pixel_acc": m["acc"], "iou": m["iou"]}


# ----------------------------------------------------------------------------- prediction

def _load_for_inference(run: Run, num_classes: int) -> Segmenter:
    model = build_model(run.cfg, num_classes)
    return load_for_inference(model, run.checkpoint, run.device, run.cfg.train.channels_last)


def predict(run: Run, paths: list[str]) -> list[dict[str, Any]]:
    """Per image: ``<output>/predictions/<name>_mask.png`` (palette PNG, pixel = class) and
    ``<name>_overlay.png``; predicted at the file's own resolution."""
    names = run.checkpoint.get("meta", {})["class_names"]
    model = _load_for_inference(run, len(names))
    out_dir = run.output / "predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path in paths:
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1)  # [3, H, W] uint8
        x = NORMALIZE(image[None].to(run.device), train=False)  # [1, 3, H, W]
        with torch.no_grad(), autocast(run.device, run.cfg.train.amp):
            mask = model(x)[0].argmax(0).cpu()  # [H, W]
        stem = Path(path).stem
        save_palette_mask(mask.numpy(), out_dir / f"{stem}_mask.png", len(names))
        draw_segmentation_grid([image], [mask], names, out_dir / f"{stem}_overlay.png")
        counts = torch.bincount(mask.flatten(), minlength=len(names))
        present = {names[i]: round(float(c) / mask.numel(), 4) for i, c in enumerate(counts.tolist()) if c and i}
        results.append({"image": path, "mask": str(out_dir / f"{stem}_mask.png"), "class_fractions": present})
        print(f"{path}: " + (", ".join(f"{k} {v:.1%}" for k, v in present.items()) or "background only")
              + f" -> {out_dir / stem}_mask.png")
    (out_dir / "summary.json").write_text(json.dumps(results, indent=1))
    return results


# ----------------------------------------------------------------------------- entry points

def get_args_parser():
    return common_parser("python -m tasks.segment", __doc__,
                         data_flags=("data_dir", "train_ann", "train_images", "train_masks", "val_ann", "val_images",
                                     "val_masks"))


def _print_ious(metrics: dict[str, Any], names: list[str], say) -> None:
    say("  " + "  ".join(f"{n} {iou:.3f}" for n, iou in zip(names, metrics["iou"])))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    run = setup_run(TASK, SegmentConfig, args, default_recipe(GPU_RECIPE, CPU_RECIPE))
    cfg, device, say = run.cfg, run.device, run.console
    if run.summary and not (args.eval_only or args.predict):
        say(run.summary)
    say(f"segment: recipe {run.recipe} on {device} -> {run.output}")

    if args.predict:
        return {"predictions": predict(run, args.predict)}

    data = build_data(cfg, device, train=not args.eval_only, quiet=args.quiet)
    num_classes = cfg.model.num_classes or len(data.class_names)
    if num_classes != len(data.class_names):
        raise ValueError(f"model.num_classes={num_classes} but the data has {len(data.class_names)} classes")

    if args.eval_only:
        model = _load_for_inference(run, num_classes)
        metrics = evaluate(model, data, device, cfg.train.amp, quiet=args.quiet,
                           picture_path=run.output / "segmentation.png" if distributed.is_main() else None)
        print(f"mIoU {metrics['miou']:.4f}  pixel accuracy {metrics['pixel_acc']:.4f}  ({args.weights})")
        _print_ious(metrics, data.class_names, print)
        return metrics

    model = build_model(cfg, num_classes)
    if args.trunk:
        load_trunk(model.backbone, args.trunk, cfg.model)  # printed even with --quiet: it changes the run
    meta = {"class_names": data.class_names, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "image_size": cfg.data.image_size}

    def evaluate_epoch(m, final: bool) -> dict[str, Any]:
        return evaluate(m, data, device, cfg.train.amp,
                        picture_path=run.output / "segmentation.png" if final else None)

    trainer = Trainer(TASK, cfg, model, data.train, output=run.output, device=device, quiet=args.quiet,
                      console=say, main_metric="miou", meta=meta, evaluate=evaluate_epoch)
    if run.resume_from is not None:
        trainer.resume(run.resume_from)
    record = trainer.fit()
    metrics = {"miou": record["val_miou"], "pixel_acc": record["val_pixel_acc"], "iou": record["val_iou"]}
    say(f"done: mIoU {metrics['miou']:.4f}, pixel accuracy {metrics['pixel_acc']:.4f}, "
        f"{record.get('train_time_total_s', 0):.1f} s of training, run folder {run.output}")
    _print_ious(metrics, data.class_names, say)
    return {**record, **metrics, "output": str(run.output)}


if __name__ == "__main__":
    run_cli(main)
