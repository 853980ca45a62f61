"""Object detection on the shared trunk: FPN + FCOS-style head, COCO data, COCO mAP.

Usage:
    python -m tasks.detect                 # FashionScenes (generated into the cache if missing);
                                           # GPU recipe, or the quick CPU one
    python -m tasks.detect --train-ann A.json --train-images DIR --val-ann B.json --val-images DIR
    python -m tasks.detect --trunk runs/classify/<run>/best.pt     # start from another task's trunk
    python -m tasks.detect --eval-only --weights runs/detect/<run>/best.pt
    python -m tasks.detect --predict street.jpg --weights runs/detect/<run>/best.pt

Images are decoded and augmented (scale jitter, flip, crop; albumentations, box-aware) in
DataLoader workers and normalised on the device. Evaluation is pycocotools' COCOeval: AP,
AP50, AP75, APs/m/l go into metrics.jsonl, the final predictions into predictions.json (COCO
results format), and detections.png shows predicted (coloured) and true (white) boxes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from backbones import build_backbone
from heads import Detector, FCOSHead
from tasks.data.coco import (CocoDetection, collate_detection, collate_detection_padded, coco_evaluate,
                             detections_to_coco, read_image)
from tasks.data.gpu_augment import IMAGENET_MEAN, IMAGENET_STD, BatchAugment
from tasks.data.loaders import DeviceLoader, make_loader, normalize_images
from tasks.data.scenes import ensure_scenes
from tasks.data.transforms import detection_train_transforms, detection_val_transforms
from tasks.engine import distributed
from tasks.engine.checkpoint import load_for_inference
from tasks.engine.cli import Run, common_parser, default_recipe, run_cli, setup_run
from tasks.engine.config import DenseDataConfig, ModelConfig, OptimConfig, TrainConfig
from tasks.engine.loop import Trainer, autocast
from tasks.engine.trunk import load_trunk
from tasks.engine.logging import progress
from tasks.engine.viz import draw_detection_grid

NORMALIZE = BatchAugment(IMAGENET_MEAN, IMAGENET_STD)  # RGB files: ImageNet statistics
TASK = "detect"
GPU_RECIPE, CPU_RECIPE = "scenes_fcos_resnet18", "scenes_quick"


@dataclass
class DetectModelConfig(ModelConfig):
    num_classes: Optional[int] = None   # default: the dataset's category count
    in_features: tuple[str, ...] = ("c3", "c4", "c5")
    fpn_channels: int = 256
    extra: Optional[str] = "p6p7"       # p6p7 | maxpool | null
    num_convs: int = 4
    center_sampling_radius: float = 1.5
    score_thresh: float = 0.05
    nms_thresh: float = 0.6
    topk_candidates: int = 1000
    detections_per_img: int = 100


@dataclass
class DetectDataConfig(DenseDataConfig):
    """FashionScenes or a COCO detection dataset (see ``DenseDataConfig``)."""
    # training targets are padded to a multiple of this many boxes per image: equal shapes from
    # batch to batch (what train.cuda_graph needs) unless an image has more boxes than that
    box_multiple: int = 16


@dataclass
class DetectConfig:
    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- model

def build_head(m: DetectModelConfig, feature_info, num_classes: int) -> FCOSHead:
    return FCOSHead(feature_info, num_classes, in_features=m.in_features, fpn_channels=m.fpn_channels,
                    extra=m.extra, num_convs=m.num_convs, center_sampling_radius=m.center_sampling_radius,
                    score_thresh=m.score_thresh, nms_thresh=m.nms_thresh, topk_candidates=m.topk_candidates,
                    detections_per_img=m.detections_per_img)


def build_model(cfg: DetectConfig, num_classes: int) -> Detector:
    backbone = build_backbone(f"resnet{cfg.model.depth}", **cfg.model.backbone_kwargs())
    # CocoDetection already clips boxes, drops degenerate ones and maps labels into range:
    # checking them again would cost a host sync per step (and rule out CUDA graphs)
    return Detector(backbone, build_head(cfg.model, backbone.feature_info, num_classes), check_targets=False)


# ----------------------------------------------------------------------------- data

def data_paths(cfg: DetectConfig, *, quiet: bool = False) -> dict[str, str]:
    """Annotation files and image folders; FashionScenes is generated first if missing."""
    d = cfg.data
    if d.train_ann or d.val_ann or d.dataset == "coco":
        missing = [f"--{k.replace('_', '-')}" for k in ("train_ann", "train_images", "val_ann", "val_images")
                   if not getattr(d, k)]
        if missing:
            raise ValueError(f"COCO data needs {', '.join(missing)} as well")
        return {k: getattr(d, k) for k in ("train_ann", "train_images", "val_ann", "val_images")}
    if d.dataset != "scenes":
        raise ValueError(f"data.dataset={d.dataset!r}: choose scenes or coco")
    with distributed.main_first():  # under torchrun rank 0 generates, the others wait for it
        root = ensure_scenes(d.scenes_root, train=d.scenes_train, val=d.scenes_val, size=d.scenes_size,
                             seed=d.scenes_seed, data_dir=d.data_dir, progress=not quiet)
    return {"train_ann": str(root / "annotations" / "instances_train.json"),
            "train_images": str(root / "images" / "train"),
            "val_ann": str(root / "annotations" / "instances_val.json"),
            "val_images": str(root / "images" / "val")}


def coco_sets(d: DenseDataConfig, paths: dict[str, str], seed: int, *, train: bool = True
              ) -> tuple[CocoDetection, Optional[CocoDetection]]:
    """Validation and (``train``) training ``CocoDetection`` sets with the box-aware transforms;
    semantic masks come along when ``paths`` names mask folders (multi-task data)."""
    val_set = CocoDetection(paths["val_ann"], paths["val_images"], detection_val_transforms(d.image_size),
                            skip_bad=d.skip_bad, limit=d.limit_val, mask_dir=paths.get("val_masks"))
    if not train:
        return val_set, None
    train_set = CocoDetection(paths["train_ann"], paths["train_images"],
                              detection_train_transforms(d.image_size, (d.scale_min, d.scale_max),
                                                         0.5 if d.hflip else 0.0, seed=seed),
                              skip_bad=d.skip_bad, limit=d.limit_train, mask_dir=paths.get("train_masks"))
    if train_set.cat_ids != val_set.cat_ids:
        raise ValueError(f"{paths['train_ann']} and {paths['val_ann']} have different categories "
                         f"({train_set.cat_ids} vs {val_set.cat_ids})")
    return val_set, train_set


@dataclass
class DetectData:
    val_set: CocoDetection
    train: Any
    val: Any
    class_names: list[str]


def build_data(cfg: DetectConfig, device: torch.device, *, train: bool = True, quiet: bool = False) -> DetectData:
    d = cfg.data
    paths = data_paths(cfg, quiet=quiet)
    val_set, train_set = coco_sets(d, paths, cfg.train.seed, train=train)
    on_device = normalize_images(NORMALIZE, cfg.train.channels_last)

    def loader(ds, shuffle: bool, batch_size: int) -> DataLoader:
        # training: padded targets (few tensors, fixed shapes); validation keeps the per-image
        # dicts, whose ids and scales map predictions back to the files
        collate = partial(collate_detection_padded, box_multiple=d.box_multiple) if shuffle else collate_detection
        return make_loader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=d.num_workers,
                           collate_fn=collate, seed=cfg.train.seed, device=device)

    val = DeviceLoader(loader(val_set, False, d.eval_batch_size), device, on_device)
    train_loader = None
    if train_set is not None:
        train_loader = DeviceLoader(loader(train_set, True, cfg.train.batch_size), device, on_device,
                                    seed=cfg.train.seed)
    return DetectData(val_set, train_loader, val, val_set.class_names)


# ----------------------------------------------------------------------------- evaluation

class DetectionEvaluator:
    """Collects detections as COCO results (file coordinates) and scores them with COCOeval."""

    def __init__(self, dataset: CocoDetection) -> None:
        self.dataset = dataset
        self.results: list[dict] = []

    def update(self, outputs: list[dict[str, torch.Tensor]], targets: list[dict]) -> list[dict[str, torch.Tensor]]:
        """Add a batch; returns the outputs moved to the CPU (float32)."""
        outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]
        self.results += detections_to_coco(outputs, targets, self.dataset.label_to_category)
        return outputs

    def compute(self) -> dict[str, float]:
        return coco_evaluate(self.dataset.coco, self.results)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: DetectData, device: torch.device, amp: bool = True, *,
             predictions_path: Path | None = None, picture_path: Path | None = None,
             quiet: bool = True) -> dict[str, float]:
    """COCO box AP of ``model`` on the validation set (pycocotools), optionally writing the
    predictions (COCO results JSON) and a picture of the first images."""
    was_training = model.training
    model.eval()
    evaluator = DetectionEvaluator(data.val_set)
    shown: tuple[list, list, list] = ([], [], [])
    with autocast(device, amp):
        for images, targets in progress(data.val, total=len(data.val), desc="eval", quiet=quiet):
            outputs = evaluator.update(model(images), targets)
            if picture_path is not None and len(shown[0]) < 8:
                take = 8 - len(shown[0])
                shown[1].extend(outputs[:take])
                shown[2].extend({"boxes": t["boxes"]} for t in targets[:take])
                shown[0].extend(list(NORMALIZE.to_uint8(images[:take]).cpu()))
    model.train(was_training)
    # torchrun: each rank saw its shard of the validation set; COCOeval needs them all
    evaluator.results = distributed.gather_lists(evaluator.results)
    metrics = distributed.on_main(evaluator.compute)  # COCOeval on rank 0, its metrics on every rank
    if not distributed.is_main():
        return metrics
    if predictions_path is not None:
        predictions_path.write_text(json.dumps(evaluator.results))
    if picture_path is not None and shown[0]:
        draw_detection_grid(shown[0], shown[1], data.class_names, picture_path, targets=shown[2])
    return metrics


# ----------------------------------------------------------------------------- prediction

def _load_for_inference(run: Run, num_classes: int) -> Detector:
    model = build_model(run.cfg, num_classes)
    return load_for_inference(model, run.checkpoint, run.device, run.cfg.train.channels_last)


def predict(run: Run, paths: list[str]) -> list[dict[str, Any]]:
    """Boxes for each image file: ``<output>/predictions/<name>.json`` and ``<name>.png``."""
    meta = run.checkpoint.get("meta", {})
    names, size = meta["class_names"], meta["image_size"]
    model = _load_for_inference(run, len(names))
    out_dir = run.output / "predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path in paths:
        image = read_image(path)  # [H, W, 3] RGB
        h, w = image.shape[:2]
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        canvas = np.zeros((size, size, 3), np.uint8)  # as validation: resize, pad bottom / right
        canvas[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        x = NORMALIZE(torch.from_numpy(canvas).permute(2, 0, 1)[None].to(run.device), train=False)  # [1, 3, S, S]
        with torch.no_grad(), autocast(run.device, run.cfg.train.amp):
            det = model(x)[0]
        boxes = det["boxes"].float().cpu() / torch.tensor([nw / w, nh / h, nw / w, nh / h])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        entry = {"image": path, "width": w, "height": h, "detections": [
            {"box_xyxy": [round(v, 2) for v in b.tolist()], "score": round(float(s), 4),
             "label": int(c), "class": names[int(c)]}
            for b, s, c in zip(boxes, det["scores"].float().cpu(), det["labels"].cpu())]}
        stem = Path(path).stem
        (out_dir / f"{stem}.json").write_text(json.dumps(entry, indent=1))
        draw_detection_grid([torch.from_numpy(image).permute(2, 0, 1)],
                            [{"boxes": boxes, "scores": det["scores"].float().cpu(), "labels": det["labels"].cpu()}],
                            names, out_dir / f"{stem}.png", nrow=1)
        shown = [f"{d['class']} {d['score']:.2f}" for d in entry["detections"] if d["score"] >= 0.3]
        print(f"{path}: {len(shown)} objects (score >= 0.3): {', '.join(shown) or '-'} -> {out_dir / stem}.json/.png")
        results.append(entry)
    return results


# ----------------------------------------------------------------------------- entry points

def get_args_parser():
    return common_parser("python -m tasks.detect", __doc__,
                         data_flags=("data_dir", "train_ann", "train_images", "val_ann", "val_images"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    run = setup_run(TASK, DetectConfig, args, default_recipe(GPU_RECIPE, CPU_RECIPE))
    cfg, device, say = run.cfg, run.device, run.console
    if run.summary and not (args.eval_only or args.predict):
        say(run.summary)
    say(f"detect: recipe {run.recipe} on {device} -> {run.output}")

    if args.predict:
        return {"predictions": predict(run, args.predict)}

    data = build_data(cfg, device, train=not args.eval_only, quiet=args.quiet)
    num_classes = cfg.model.num_classes or len(data.class_names)
    if num_classes != len(data.class_names):
        raise ValueError(f"model.num_classes={num_classes} but the data has {len(data.class_names)} categories")

    if args.eval_only:
        model = _load_for_inference(run, num_classes)
        metrics = evaluate(model, data, device, cfg.train.amp, predictions_path=run.output / "predictions.json",
                           picture_path=run.output / "detections.png", quiet=args.quiet)
        print(f"COCO box AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}  AP75 {metrics['AP75']:.4f}  "
              f"APs {metrics['APs']:.4f}  APm {metrics['APm']:.4f}  APl {metrics['APl']:.4f}  ({args.weights})")
        return metrics

    model = build_model(cfg, num_classes)
    if args.trunk:
        load_trunk(model.backbone, args.trunk, cfg.model)  # printed even with --quiet: it changes the run
    meta = {"class_names": data.class_names, "category_ids": data.val_set.cat_ids,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "image_size": cfg.data.image_size}

    def evaluate_epoch(model, final: bool) -> dict[str, float]:
        files = dict(predictions_path=run.output / "predictions.json",
                     picture_path=run.output / "detections.png") if final else {}
        return evaluate(model, data, device, cfg.train.amp, **files)

    trainer = Trainer(TASK, cfg, model, data.train, output=run.output, device=device, quiet=args.quiet,
                      console=say, main_metric="AP", meta=meta, evaluate=evaluate_epoch)
    if run.resume_from is not None:
        trainer.resume(run.resume_from)
    record = trainer.fit()
    metrics = {k: record[f"val_{k}"] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    say(f"done: COCO box AP {metrics['AP']:.4f} (AP50 {metrics['AP50']:.4f}), "
        f"{record.get('train_time_total_s', 0):.1f} s of training, run folder {run.output}")
    return {**record, **metrics, "output": str(run.output)}


if __name__ == "__main__":
    run_cli(main)
