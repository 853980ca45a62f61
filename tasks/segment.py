"""Semantic segmentation on the shared trunk: an FCN-8s style head, mIoU on the device.

Usage:
    python -m tasks.segment                # FashionScenes masks (generated if missing);
                                           # GPU recipe, or the quick CPU one
    python -m tasks.segment --train-images DIR --train-masks DIR --val-images DIR --val-masks DIR \\
                            --set model.num_classes=21              # VOC-style PNG masks, 255 = ignore
    python -m tasks.segment --train-ann A.json --train-images DIR --val-ann B.json --val-images DIR
    python -m tasks.segment --voc-root VOCdevkit --config configs/segment/voc_fcn_resnet50.yaml
    python -m tasks.segment --trunk runs/classify/<run>/best.pt      # start from another task's trunk
    python -m tasks.segment --eval-only --weights runs/segment/<run>/best.pt
    python -m tasks.segment --predict scene.png --weights runs/segment/<run>/best.pt
    torchrun --nproc_per_node=2 -m tasks.segment     # one process per GPU, batch size per GPU

Images and masks are transformed jointly (scale, crop with ignore padding, flip) in DataLoader
workers and normalised on the device. Evaluation resizes the longer side to
``data.image_size`` (masks with nearest neighbour) and scores at that scale. Metrics: mIoU,
per-class IoU and pixel accuracy from a confusion matrix accumulated on the device;
segmentation.png shows image, true and predicted masks. ``--predict`` (and
``tasks.load(...).predict``) runs at the training scale and upsamples the logits to the
file's size; ``predict(..., tile=True)`` instead slides tiles of the training size over
large images at full resolution, averaging the logits where they overlap. ``--predict``
writes a palette PNG mask and an overlay per image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from backbones import build_backbone
from heads import FCNHead, Segmenter
from tasks.data.device_cache import DenseAugment
from tasks.data.preprocess import Geometry, Preprocess
from tasks.data.segmentation import (IGNORE_INDEX, CocoSemanticDataset, MaskFolderDataset, collate_segmentation,
                                     scenes_segmentation)
from tasks.data.transforms import segmentation_train_transforms
from tasks.data.voc import voc_segmentation
from tasks.engine.config import DenseDataConfig, ModelConfig, OptimConfig, TrainConfig, bounded, setting
from tasks.engine.datasets import (cached_train_loader, data_files, dense_preprocess, dense_train_transforms,
                                   file_loaders, unusable_samples)
from tasks.engine.derive import DataFacts
from tasks.engine.describe import describe_coco, describe_masks, describe_voc_config
from tasks.engine.logging import progress
from tasks.engine.loop import autocast
from tasks.engine.metrics import ConfusionMatrix, by_name
from tasks.engine.predict import predict_images
from tasks.engine.registry import TaskData, TaskSpec
from tasks.engine.runner import build_parser, run, run_cli
from tasks.engine.viz import draw_segmentation_grid, save_palette_mask

# How many logits (K x H x W) upsampling to an original size holds at once: a 4000 x 3000
# photo with 21 classes would be 1 GB of float32 in one piece
_UPSAMPLE_ELEMENTS = 1 << 26


@dataclass
class SegmentModelConfig(ModelConfig):
    num_classes: Optional[int] = bounded(None, 1, help="classes, background included (null: the dataset's)")
    in_features: tuple[str, ...] = setting(("c3", "c4", "c5"), "trunk features the head fuses, fine to coarse: "
                                                              "the last gets the conv block, the others skips")
    channels: Optional[int] = bounded(None, 1, help="width of the conv block on the coarsest feature "
                                                    "(null: its channels / 4)")
    aux: bool = setting(False, "auxiliary head on C4 (training loss only)")
    aux_weight: float = bounded(0.4, 0.0, help="with aux: the weight of its loss")


@dataclass
class SegmentDataConfig(DenseDataConfig):
    """FashionScenes masks, COCO instances or VOC-style mask folders (set by --train-masks)."""

    classes: Optional[tuple[str, ...]] = setting(None, "VOC layout / mask folders: the names of class ids 0, 1, "
                                                       "..., background first (--classes; null: classes.txt, else "
                                                       "from the masks)")
    train_masks: Optional[str] = setting(None, "mask folder of the training set, VOC style (--train-masks)")
    val_masks: Optional[str] = setting(None, "mask folder of the validation set, VOC style (--val-masks)")


@dataclass
class SegmentConfig:
    model: SegmentModelConfig = field(default_factory=SegmentModelConfig)
    data: SegmentDataConfig = field(default_factory=SegmentDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- model

def build_head(m: SegmentModelConfig, feature_info, num_classes: int) -> FCNHead:
    return FCNHead(feature_info, num_classes, in_features=m.in_features, channels=m.channels, aux=m.aux,
                   aux_weight=m.aux_weight, ignore_index=IGNORE_INDEX)


def build_model(cfg: SegmentConfig, meta: Mapping[str, Any]) -> Segmenter:
    m, k = cfg.model, len(meta["class_names"])
    if m.num_classes not in (None, k):
        raise ValueError(f"model.num_classes={m.num_classes} but the data has {k} classes")
    backbone = build_backbone(f"resnet{m.depth}", **m.backbone_kwargs())
    return Segmenter(backbone, build_head(m, backbone.feature_info, k))


# ----------------------------------------------------------------------------- data

def _datasets(cfg: SegmentConfig, pre: Preprocess, train: bool, quiet: bool):
    """(train set or None, val set) from FashionScenes, COCO or mask folders."""
    d = cfg.data
    if d.dataset not in ("scenes", "coco", "folders", "voc"):
        raise ValueError(f"data.dataset={d.dataset!r}: choose scenes, coco, folders or voc")
    size = d.image_size
    train_tf = dense_train_transforms(cfg, boxes=False) or segmentation_train_transforms(
        size, (d.scale_min, d.scale_max), 0.5 if d.hflip else 0.0, seed=cfg.train.seed, base_size=size)
    val_tf = pre.albumentations()
    common = dict(skip_bad=d.skip_bad, seed=cfg.train.seed)
    if d.voc_root or d.dataset == "voc":
        if not d.voc_root:
            raise ValueError("data.dataset=voc needs --voc-root DIR")
        common["classes"] = d.classes
        val = voc_segmentation(d.voc_root, d.voc_val, transforms=val_tf, limit=d.limit_val, evaluation=True, **common)
        tr = voc_segmentation(d.voc_root, d.voc_train, transforms=train_tf, limit=d.limit_train,
                              **common) if train else None
        return tr, val
    if d.train_ann or d.val_ann or d.dataset == "coco":
        p = data_files(d, ("train_ann", "train_images", "val_ann", "val_images"), "COCO segmentation data",
                       files=True)
        val = CocoSemanticDataset(p["val_ann"], p["val_images"], transforms=val_tf, limit=d.limit_val, evaluation=True,
                                  **common)
        tr = CocoSemanticDataset(p["train_ann"], p["train_images"], transforms=train_tf, limit=d.limit_train,
                                 **common) if train else None
        return tr, val
    if d.train_masks or d.val_masks or d.dataset == "folders":
        p = data_files(d, ("train_images", "train_masks", "val_images", "val_masks"), "mask-folder data", files=True)
        k = cfg.model.num_classes or (len(d.classes) if d.classes else None)
        if not k:
            raise ValueError("mask-folder data needs its classes: --classes NAMES|FILE or --set model.num_classes=K "
                             "(background included)")
        if d.classes and len(d.classes) != k:
            raise ValueError(f"data.classes names {len(d.classes)} classes but model.num_classes={k}")
        common["class_names"] = d.classes
        val = MaskFolderDataset(p["val_images"], p["val_masks"], num_classes=k, transforms=val_tf,
                                limit=d.limit_val, evaluation=True, **common)
        tr = MaskFolderDataset(p["train_images"], p["train_masks"], num_classes=k, transforms=train_tf,
                               limit=d.limit_train, **common) if train else None
        return tr, val
    p = data_files(d, ("train_images", "train_masks", "val_images", "val_masks"), "FashionScenes", quiet=quiet)
    root = Path(p["val_images"]).parents[1]
    val = scenes_segmentation(root, "val", transforms=val_tf, limit=d.limit_val, evaluation=True, **common)
    tr = scenes_segmentation(root, "train", transforms=train_tf, limit=d.limit_train, **common) if train else None
    return tr, val


def describe_data(cfg: SegmentConfig) -> DataFacts | None:
    """A COCO, VOC-layout or mask-folder set described for the settings made for it; None for
    FashionScenes."""
    d = cfg.data
    limits = dict(limit_train=d.limit_train, limit_val=d.limit_val)
    voc = describe_voc_config(d, cfg.train.seed, segmentation=True)
    if voc is not None:
        return voc
    if d.train_ann or d.val_ann or d.dataset == "coco":
        files = data_files(d, ("train_ann", "train_images", "val_ann", "val_images"), "COCO segmentation data",
                           files=True)
        return describe_coco(files, background=True, classes=d.classes, **limits)
    if d.train_masks or d.val_masks or d.dataset == "folders":
        files = data_files(d, ("train_images", "train_masks", "val_images", "val_masks"), "mask-folder data",
                           files=True)
        return describe_masks(files, classes=d.classes, seed=cfg.train.seed, **limits)
    return None


def build_data(cfg: SegmentConfig, device: torch.device, *, train: bool = True, quiet: bool = False) -> TaskData:
    pre = dense_preprocess(cfg)
    train_set, val_set = _datasets(cfg, pre, train, quiet)
    if train_set is not None and train_set.class_names != val_set.class_names:
        raise ValueError(f"train and val data have different classes: {train_set.class_names} vs {val_set.class_names}")
    d = cfg.data
    # data.cache: decoded once, segmentation_train_transforms redone on the device
    cached = cached_train_loader(
        train_set, cfg=cfg, device=device, pre=pre, targets="masks", quiet=quiet,
        augment=DenseAugment(d.image_size, (d.scale_min, d.scale_max), 0.5 if d.hflip else 0.0, flip_first=False,
                             normalize=pre.normalize, mask_fill=IGNORE_INDEX))
    train_loader, val = file_loaders(None if cached else train_set, val_set, cfg=cfg, device=device,
                                     normalize=pre.normalize, train_collate=collate_segmentation,
                                     val_collate=collate_segmentation)
    train_loader = cached or train_loader
    # the mask datasets check every class id when they read a mask
    return TaskData(train_loader, val, {"class_names": list(val_set.class_names), **pre.to_meta()},
                    val_set=val_set, targets_checked=True, skipped=unusable_samples(train_set, val_set),
                    fixed_shapes=cfg.data.resize != "aspect")


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TaskData, device: torch.device, amp: bool = True, *,
             output: Path | None = None, quiet: bool = True) -> dict[str, Any]:
    """mIoU, per-class IoU (``iou``, a list in class order, and ``per_class_iou``, ``{class
    name: IoU}``) and pixel accuracy over the validation set (ignore index skipped); under
    torchrun each rank scores its shard and the confusion matrices are summed. With
    ``output``, ``segmentation.png`` (the first 4 images)."""
    names = data.meta["class_names"]
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(len(names), device, ignore_index=IGNORE_INDEX)
    shown: tuple[list, list, list] = ([], [], [])
    with autocast(device, amp):
        for images, masks in progress(data.val, total=len(data.val), desc="eval", quiet=quiet):
            pred = model(images).argmax(1)  # [N, H, W]
            cm.update(pred, masks)
            if output is not None and len(shown[0]) < 4:
                take = 4 - len(shown[0])
                shown[0].extend(list(data.preprocess.to_uint8(images[:take]).cpu()))
                shown[1].extend(pred[:take].cpu())
                shown[2].extend(masks[:take].cpu())
    model.train(was_training)
    if output is not None and shown[0]:
        draw_segmentation_grid(shown[0], shown[1], names, Path(output) / "segmentation.png", targets=shown[2])
    metrics = cm.all_reduce().segmentation()
    return {**metrics, "per_class_iou": by_name(names, metrics["iou"])}


def report(metrics: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
    iou = metrics.get("per_class_iou") or by_name(meta["class_names"], metrics["iou"])
    return [f"mIoU {metrics['miou']:.4f}  pixel accuracy {metrics['pixel_acc']:.4f}",
            "  IoU per class: " + "  ".join(f"{n} {v:.3f}" for n, v in iou.items())]


# ----------------------------------------------------------------------------- prediction

def upsample_argmax(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[K, h, w]`` logits -> the ``[H, W]`` int64 argmax of their bilinear upsampling to
    ``size`` (``F.interpolate``, align_corners=False), a band of rows at a time when the whole
    would exceed ``_UPSAMPLE_ELEMENTS``: the vertical step by hand with interpolate's source
    rows and weights, the horizontal one by interpolate itself."""
    k, h, w = logits.shape
    height, width = size
    if (h, w) == (height, width):
        return logits.argmax(0)
    if k * height * width <= _UPSAMPLE_ELEMENTS:
        return F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0].argmax(0)
    ys = ((torch.arange(height, device=logits.device, dtype=torch.float32) + 0.5) * (h / height) - 0.5).clamp(min=0)
    y0 = ys.floor().long().clamp(max=h - 1)
    y1 = (y0 + 1).clamp(max=h - 1)
    wy = (ys - y0)[None, :, None]  # [1, H, 1]
    out = torch.empty(height, width, dtype=torch.int64, device=logits.device)
    band = max(1, _UPSAMPLE_ELEMENTS // (k * width))
    src = logits.float()
    for start in range(0, height, band):
        rows = slice(start, min(height, start + band))
        mixed = src[:, y0[rows]] * (1 - wy[:, rows]) + src[:, y1[rows]] * wy[:, rows]  # [K, b, w]
        out[rows] = F.interpolate(mixed[None], size=(mixed.shape[1], width), mode="bilinear",
                                  align_corners=False)[0].argmax(0)
    return out


def _results(masks: Sequence[torch.Tensor], names: Sequence[str]) -> list[dict[str, Any]]:
    """Device masks -> results on the host. Pixels are counted per class on the device
    (``index_add_``: no host sync, unlike ``bincount``); masks that share a shape cross in one
    copy, as uint8 when the class ids fit (an eighth of int64's bytes), widened there in one
    op (per mask on the host, ``bincount`` and ``long()`` took 0.46 of the API's 0.75 ms per
    image, by cProfile on the H200 machine)."""
    k = len(names)
    small = torch.uint8 if k <= 256 else torch.int32
    counts = torch.stack([torch.zeros(k, dtype=torch.int64, device=m.device).index_add_(
        0, m.flatten(), torch.ones(m.numel(), dtype=torch.int64, device=m.device)) for m in masks]).tolist()
    if len({tuple(m.shape) for m in masks}) == 1:
        host = list(torch.stack(list(masks)).to(small).cpu().long())
    else:
        host = [m.to(small).cpu().long() for m in masks]
    return [{"mask": mask, "class_fractions": {names[i]: c / mask.numel() for i, c in enumerate(row) if c}}
            for mask, row in zip(host, counts)]


def decode(logits: torch.Tensor, geometries: list[Geometry], meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per image ``{"mask": [H, W] int64 class ids at the original size, "class_fractions":
    {class name: fraction of the pixels}}`` (classes present only)."""
    if all(g.resized == g.size for g in geometries):  # no upsampling: one argmax for the batch
        best = logits.argmax(1)  # [N, H, W]
        masks = [m[:h, :w] for m, (h, w) in zip(best, (g.size for g in geometries), strict=True)]
    else:
        masks = [upsample_argmax(lg[:, :g.resized[0], :g.resized[1]], g.size)
                 for lg, g in zip(logits, geometries, strict=True)]
    return _results(masks, meta["class_names"])


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def predict(predictor, images: Sequence[np.ndarray], batch_size: int, tile: bool = False,
            overlap: float = 1 / 3) -> list[dict[str, Any]]:
    """Whole images at the training scale (``decode``), or with ``tile``: every image larger
    than one tile (the training size) at its own resolution, in tiles of the training size
    that overlap by ``overlap`` of a tile, the logits averaged; smaller images as without."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap={overlap!r}: expected a fraction of a tile in [0, 1)")
    size = predictor.preprocess.size
    whole = [i for i, im in enumerate(images) if not tile or max(im.shape[:2]) <= size]
    results: list[Any] = [None] * len(images)
    for i, r in zip(whole, predict_images(predictor, [images[i] for i in whole], batch_size) if whole else []):
        results[i] = r
    stride = max(1, round(size * (1 - overlap)))
    names = predictor.class_names
    for i in sorted(set(range(len(images))) - set(whole)):
        image = images[i]
        h, w = image.shape[:2]
        boxes = [(y, x, min(size, h), min(size, w)) for y in _tile_starts(h, size, stride)
                 for x in _tile_starts(w, size, stride)]
        total = count = None
        for start in range(0, len(boxes), batch_size):
            chunk = boxes[start:start + batch_size]
            logits = predictor.forward(predictor.batch([image[y:y + th, x:x + tw] for y, x, th, tw in chunk]))
            if total is None:
                total = torch.zeros(logits.shape[1], h, w, device=logits.device)
                count = torch.zeros(1, h, w, device=logits.device)
            for lg, (y, x, th, tw) in zip(logits, chunk):
                total[:, y:y + th, x:x + tw] += lg[:, :th, :tw].float()
                count[:, y:y + th, x:x + tw] += 1
        results[i] = _results([(total / count).argmax(0)], names)[0]
    return results


def write_prediction(result: Mapping[str, Any], image: np.ndarray, source: str, out_dir: Path, stem: str,
                     meta: Mapping[str, Any], *, images: bool = True) -> dict[str, Any]:
    """``<stem>_mask.png`` (palette PNG, pixel = class id) and, with ``images``, ``<stem>_overlay.png``."""
    names = meta["class_names"]
    out_dir.mkdir(parents=True, exist_ok=True)
    mask = result["mask"]
    save_palette_mask(mask.numpy(), out_dir / f"{stem}_mask.png", len(names))
    if images:
        draw_segmentation_grid([torch.from_numpy(image).permute(2, 0, 1)], [mask], names,
                               out_dir / f"{stem}_overlay.png")
    present = {k: round(v, 4) for k, v in result["class_fractions"].items() if k != names[0]}
    print(f"{source}: " + (", ".join(f"{k} {v:.1%}" for k, v in present.items()) or f"{names[0]} only")
          + f" -> {out_dir / stem}_mask.png")
    return {"image": source, "mask": str(out_dir / f"{stem}_mask.png"), "class_fractions": present}


SPEC = TaskSpec(
    name="segment", config=SegmentConfig, recipes=("scenes_fcn_resnet18", "scenes_quick"), main_metric="miou",
    doc=__doc__, data_flags=("data_dir", "train_ann", "train_images", "train_masks", "val_ann", "val_images",
                             "val_masks", "voc_root"),
    build_model=build_model, build_data=build_data, evaluate=evaluate, make_preprocess=dense_preprocess,
    decode=decode, write_prediction=write_prediction, report=report, predict_options=("tile", "overlap"),
    build_head=build_head, predict=predict, describe_data=describe_data)


def get_args_parser():
    return build_parser(SPEC)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(SPEC, argv)


if __name__ == "__main__":
    run_cli(main)
