"""Object detection on the shared trunk: FPN + FCOS-style head, COCO data, COCO mAP.

Usage:
    python -m tasks.detect                 # FashionScenes (generated into the cache if missing);
                                           # GPU recipe, or the quick CPU one
    python -m tasks.detect --train-ann A.json --train-images DIR --val-ann B.json --val-images DIR
    python -m tasks.detect --voc-root VOCdevkit --config configs/detect/coco_fcos_resnet50.yaml
    python -m tasks.detect --trunk runs/classify/<run>/best.pt     # start from another task's trunk
    python -m tasks.detect --eval-only --weights runs/detect/<run>/best.pt
    python -m tasks.detect --predict street.jpg --weights runs/detect/<run>/best.pt

Images are decoded and augmented (scale jitter, flip, crop; albumentations, box-aware) in
DataLoader workers and normalised on the device. Evaluation and ``--predict`` resize the
longer side to ``data.image_size`` (aspect kept, padded to a multiple of 32) and map boxes
back to the file's pixels. Evaluation is pycocotools' COCOeval: AP, AP50, AP75, APs/m/l and
per-class AP and AP50 go into metrics.jsonl, the final predictions into predictions.json (COCO
results format); detections.png shows predicted (coloured) and true (white) boxes, and
pr_curve.png each class's precision-recall curve at IoU 0.5.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from backbones import build_backbone
from heads import Detector, FCOSHead
from heads.detection import pad_targets
from tasks.data.coco import METRIC_NAMES, CocoEvaluator, collate_detection
from tasks.data.device_cache import DenseAugment
from tasks.data.preprocess import Geometry
from tasks.data.transforms import DETECTION_MIN_VISIBILITY
from tasks.engine import distributed
from tasks.engine.config import DenseDataConfig, ModelConfig, OptimConfig, TrainConfig, bounded, one_of, setting
from tasks.engine.datasets import (cached_train_loader, coco_sets, data_files, dense_preprocess, file_loaders,
                                   unusable_samples)
from tasks.engine.derive import DataFacts
from tasks.engine.describe import describe_coco, describe_voc_config
from tasks.engine.logging import progress
from tasks.engine.loop import autocast
from tasks.engine.registry import TaskData, TaskSpec
from tasks.engine.runner import build_parser, run, run_cli
from tasks.engine.metrics import coco_scores
from tasks.engine.viz import draw_detection_grid, plot_pr_curves, write_file

COCO_FILES = ("train_ann", "train_images", "val_ann", "val_images")
# model.reg_activation=auto: runs of at least this many optimizer steps get softplus, shorter ones
# exp. Measured on both sides, not in between: exp led at 368 steps (FashionScenes-3000, 20 seeds)
# and at 2,057 (a Shapes-3000 default run, mean of 3 seeds, +0.004 AP); softplus at 3,000
# (FashionScenes-8000, 6 of 6 seeds, +0.003)
LONG_RUN_STEPS = 2500


@dataclass
class DetectModelConfig(ModelConfig):
    num_classes: Optional[int] = bounded(None, 1, help="object classes (null: the dataset's category count)")
    in_features: tuple[str, ...] = setting(("c3", "c4", "c5"), "trunk features the FPN takes, fine to coarse")
    fpn_channels: int = bounded(256, 1, help="FPN and head tower width")
    extra: Optional[str] = setting("p6p7", "extra FPN levels: p6p7 | maxpool | null")
    num_convs: int = bounded(4, 0, help="conv + GroupNorm + ReLU layers in each head tower")
    center_sampling_radius: float = bounded(1.5, 0.0, help="positives within radius x stride of a box's "
                                                           "centre (0: the whole box)")
    score_thresh: float = bounded(0.05, 0.0, 1.0, help="post-processing: lowest score kept")
    nms_thresh: float = bounded(0.6, 0.0, 1.0, help="post-processing: class-wise NMS IoU threshold")
    topk_candidates: int = bounded(1000, 1, help="post-processing: best candidates per FPN level before NMS")
    detections_per_img: int = bounded(100, 1, help="post-processing: detections kept per image")
    nms_candidates: int = bounded(1000, 1, help="NMS on the device: the best N candidates of an image")
    # trained scenes model: 999-1000 of 1000 val images converged in 12, 958-964 in 8
    nms_iterations: int = bounded(12, 1, help="NMS on the device: steps per round (an image not done in them "
                                              "is redone exactly)")
    nms_compile: bool = setting(False, "NMS on the device: its matrix and steps through torch.compile (CUDA)")
    # box distances from the regression conv (docs/DETECTION.md). relu can die for good (every
    # distance 0, GIoU loss frozen at 1.0: AP 0 on some seeds); exp(s_l * x) and softplus cannot.
    # exp learns faster (8 epochs of FashionScenes-3000, 368 steps: median AP 0.4653 against
    # softplus's 0.4395 over 20 seeds), softplus ends higher on a long run (24 epochs of
    # FashionScenes-8000, 3,000 steps: 0.8250 against 0.8221, mean of 6 seeds, higher on each):
    # auto picks by the run's length (resolve_for_run)
    reg_activation: str = one_of("auto", "exp", "softplus", "relu",
                                 help=f"box regression activation: auto (exp for a run under {LONG_RUN_STEPS:,} "
                                      f"optimizer steps, softplus from there) | exp (learned scale per level) | "
                                      f"softplus | relu")


@dataclass
class DetectDataConfig(DenseDataConfig):
    """FashionScenes or a COCO detection dataset (see ``DenseDataConfig``)."""
    classes: Optional[tuple[str, ...]] = setting(None, "VOC layout: the object class names (--classes; null: "
                                                       "classes.txt, else the XML files' names)")
    # training targets are padded to a multiple of this many boxes per image: equal shapes from
    # batch to batch (what train.cuda_graph needs) unless an image has more boxes than that
    box_multiple: int = bounded(16, 1, help="training targets padded to a multiple of this many boxes per "
                                            "image (fixed shapes for train.cuda_graph)")


@dataclass
class DetectConfig:
    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- model

def reg_activation_for(steps: int) -> str:
    """The box head ``model.reg_activation=auto`` means for a run of ``steps`` optimizer steps."""
    return "softplus" if steps >= LONG_RUN_STEPS else "exp"


def resolve_for_run(cfg: Any, steps: int) -> list[str]:
    """``model.reg_activation=auto`` -> the head for a run of ``steps`` optimizer steps, in
    ``cfg``; one line saying so (none when a head was named)."""
    if cfg.model.reg_activation != "auto":
        return []
    cfg.model.reg_activation = reg_activation_for(steps)
    other = "exp" if cfg.model.reg_activation == "softplus" else "softplus"
    return [f"model.reg_activation: {cfg.model.reg_activation} (auto: a run of {steps:,} steps; {other} "
            f"{'under' if other == 'exp' else 'from'} {LONG_RUN_STEPS:,})"]


def build_head(m: DetectModelConfig, feature_info, num_classes: int) -> FCOSHead:
    """The FCOS head of ``m``; ``reg_activation=auto`` outside a training run (no run length:
    a model built to load weights into or to time) is ``exp``, the head of short runs."""
    activation = reg_activation_for(0) if m.reg_activation == "auto" else m.reg_activation
    return FCOSHead(feature_info, num_classes, in_features=m.in_features, fpn_channels=m.fpn_channels,
                    extra=m.extra, num_convs=m.num_convs, center_sampling_radius=m.center_sampling_radius,
                    score_thresh=m.score_thresh, nms_thresh=m.nms_thresh, topk_candidates=m.topk_candidates,
                    detections_per_img=m.detections_per_img, nms_candidates=m.nms_candidates,
                    nms_iterations=m.nms_iterations, nms_compile=m.nms_compile,
                    reg_activation=activation)


def build_model(cfg: DetectConfig, meta: Mapping[str, Any]) -> Detector:
    k = len(meta["class_names"])
    if cfg.model.num_classes not in (None, k):
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but the data has {k} categories")
    backbone = build_backbone(f"resnet{cfg.model.depth}", **cfg.model.backbone_kwargs())
    # targets are checked (a host sync per step) unless the data is known good: the Trainer
    # turns the check off for CocoDetection data (TaskData.targets_checked) and CUDA graphs
    return Detector(backbone, build_head(cfg.model, backbone.feature_info, k))


# ----------------------------------------------------------------------------- data

def collate_detection_padded(batch: Sequence[tuple[torch.Tensor, dict]], size_divisible: int = 32,
                             box_multiple: int = 16) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training collate: images as ``collate_detection``, targets as one padded batch
    ``{"boxes": [B, M, 4], "labels": [B, M]}`` (label -1 on padding; M rounded up to
    ``box_multiple``). Two tensors cross from the worker instead of two per image, and a fixed M
    keeps every batch's shapes equal (CUDA graphs)."""
    collated = collate_detection(batch, size_divisible)
    if collated is None:
        return None
    images, targets = collated
    return images, pad_targets(targets, multiple=box_multiple)


def describe_data(cfg: DetectConfig) -> DataFacts | None:
    """A COCO or VOC-layout set described for the settings made for it; None for FashionScenes."""
    d = cfg.data
    voc = describe_voc_config(d, cfg.train.seed, segmentation=False)
    if voc is not None:
        return voc
    if any(getattr(d, k) for k in COCO_FILES) or d.dataset == "coco":
        return describe_coco(data_files(d, COCO_FILES, "COCO data", files=True), background=False,
                             classes=d.classes, limit_train=d.limit_train, limit_val=d.limit_val)
    return None


def build_data(cfg: DetectConfig, device: torch.device, *, train: bool = True, quiet: bool = False) -> TaskData:
    d = cfg.data
    if d.dataset not in ("scenes", "coco", "voc"):
        raise ValueError(f"data.dataset={d.dataset!r}: choose scenes, coco or voc")
    pre = dense_preprocess(cfg)
    if d.voc_root or d.dataset == "voc":
        if not d.voc_root:
            raise ValueError("data.dataset=voc needs --voc-root DIR")
        paths = {"voc_root": d.voc_root}
    else:
        paths = data_files(d, COCO_FILES, "COCO data", files=d.dataset == "coco", quiet=quiet)
    val_set, train_set = coco_sets(cfg, paths, pre, train=train)
    # data.cache: decoded once, detection_train_transforms redone on the device
    cached = cached_train_loader(
        train_set, cfg=cfg, device=device, pre=pre, targets="boxes", quiet=quiet,
        augment=DenseAugment(d.image_size, (d.scale_min, d.scale_max), 0.5 if d.hflip else 0.0, flip_first=True,
                             normalize=pre.normalize, min_visibility=DETECTION_MIN_VISIBILITY))
    # training: padded targets (few tensors, fixed shapes); validation keeps the per-image
    # dicts, whose ids and scales map predictions back to the files
    train_loader, val = file_loaders(None if cached else train_set, val_set, cfg=cfg, device=device,
                                     normalize=pre.normalize,
                                     train_collate=partial(collate_detection_padded, box_multiple=d.box_multiple),
                                     val_collate=collate_detection)
    train_loader = cached or train_loader
    meta = {"class_names": val_set.class_names, "category_ids": val_set.cat_ids, **pre.to_meta()}
    # CocoDetection clips boxes, drops degenerate ones and maps labels into range
    return TaskData(train_loader, val, meta, val_set=val_set, targets_checked=True,
                    skipped=unusable_samples(train_set, val_set), fixed_shapes=cfg.data.resize != "aspect")


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TaskData, device: torch.device, amp: bool = True, *,
             output: Path | None = None, quiet: bool = True) -> dict[str, Any]:
    """COCO box AP of ``model`` on the validation set (pycocotools), overall and per class
    (``per_class_AP`` / ``per_class_AP50``: ``{class name: AP}``, -1 for a class without
    ground truth); with ``output``, the predictions (``predictions.json``, COCO results),
    ``detections.png`` (first 8 images) and ``pr_curve.png``."""
    was_training = model.training
    model.eval()
    evaluator = CocoEvaluator(data.val_set)
    shown: tuple[list, list, list] = ([], [], [])
    with autocast(device, amp):
        for images, targets in progress(data.val, total=len(data.val), desc="eval", quiet=quiet):
            outputs = evaluator.update(model(images), targets)
            if output is not None and len(shown[0]) < 8:
                take = 8 - len(shown[0])
                shown[1].extend(outputs[:take])
                shown[2].extend({"boxes": t["boxes"]} for t in targets[:take])
                shown[0].extend(list(data.preprocess.to_uint8(images[:take]).cpu()))
    model.train(was_training)
    # torchrun: each rank saw its shard of the validation set; COCOeval needs them all
    evaluator.results = distributed.gather_lists(evaluator.results)
    evaluator.image_ids = distributed.gather_lists(evaluator.image_ids)
    names = data.meta["class_names"]

    def score() -> dict[str, Any]:
        metrics, per_class = coco_scores(evaluator, data.val_set, names)
        if output is not None:
            plot_pr_curves(per_class["recall"], per_class["precision50"], names, Path(output) / "pr_curve.png",
                           ap=per_class["AP50"], title=f"precision-recall at IoU 0.5 (AP50 {metrics['AP50']:.3f})")
        return metrics

    metrics = distributed.on_main(score)  # COCOeval on rank 0, its metrics on every rank
    if output is not None:
        results = json.dumps(evaluator.results)
        write_file(Path(output) / "predictions.json", lambda tmp: tmp.write_text(results))
        if shown[0]:
            draw_detection_grid(shown[0], shown[1], names, Path(output) / "detections.png", targets=shown[2])
    return metrics


def report(metrics: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
    # -1: COCOeval's "no object of that size" (APl on small images), shown as "-"
    lines = ["COCO box " + "  ".join(f"{k} " + ("-" if metrics[k] == -1 else f"{metrics[k]:.4f}")
                                     for k in METRIC_NAMES)]
    ap, ap50 = metrics.get("per_class_AP"), metrics.get("per_class_AP50")
    if ap and ap50:  # -1: no ground truth of the class
        lines.append("  AP (AP50) per class: " + "  ".join(
            f"{n} " + ("-" if ap[n] < 0 else f"{ap[n]:.3f} ({ap50[n]:.3f})") for n in ap))
    return lines


# ----------------------------------------------------------------------------- prediction

def decode(outputs: list[dict[str, torch.Tensor]], geometries: list[Geometry], meta: Mapping[str, Any],
           score_thresh: float | None = None) -> list[dict[str, Any]]:
    """Per image ``{"boxes": [D, 4] xyxy in the original pixels, "scores": [D], "labels": [D]
    int64, "names": [D]}``, best first; ``score_thresh`` keeps only scores >= it (on top of
    the model's own ``score_thresh``)."""
    names = meta["class_names"]
    # the whole batch to the host in three copies, not three per image (each is a sync)
    counts = [len(det["scores"]) for det in outputs]
    host = [torch.cat([det[k] for det in outputs]).cpu().split(counts) for k in ("boxes", "scores", "labels")]
    results = []
    for boxes, scores, labels, geom in zip(*host, geometries, strict=True):
        boxes, scores = boxes.float(), scores.float()
        if score_thresh is not None:
            keep = scores >= score_thresh
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        results.append({"boxes": geom.boxes_to_original(boxes), "scores": scores, "labels": labels,
                        "names": [names[int(c)] for c in labels]})
    return results


def detections_json(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"box_xyxy": [round(v, 2) for v in b.tolist()], "score": round(float(s), 4), "label": int(c),
             "class": n} for b, s, c, n in zip(result["boxes"], result["scores"], result["labels"], result["names"])]


def write_prediction(result: Mapping[str, Any], image: np.ndarray, source: str, out_dir: Path, stem: str,
                     meta: Mapping[str, Any], *, images: bool = True) -> dict[str, Any]:
    """``<out_dir>/<stem>.json`` (boxes in the file's pixels) and ``<stem>.png`` (boxes drawn);
    without ``images`` no file (the entry goes into summary.json)."""
    from tasks.engine.viz import write_json  # every file through one writer: no link is written through

    out_dir.mkdir(parents=True, exist_ok=True)
    h, w = image.shape[:2]
    entry = {"image": source, "width": w, "height": h, "detections": detections_json(result)}
    if images:
        write_json(out_dir / f"{stem}.json", entry)
        draw_detection_grid([torch.from_numpy(image).permute(2, 0, 1)], [result], meta["class_names"],
                            out_dir / f"{stem}.png", nrow=1)
    shown = [f"{d['class']} {d['score']:.2f}" for d in entry["detections"] if d["score"] >= 0.3]
    print(f"{source}: {len(shown)} objects (score >= 0.3): {', '.join(shown) or '-'} -> {out_dir / stem}.json/.png")
    return entry


SPEC = TaskSpec(
    name="detect", config=DetectConfig, recipes=("scenes_fcos_resnet18", "scenes_quick"), main_metric="AP",
    doc=__doc__, data_flags=("data_dir", "train_ann", "train_images", "val_ann", "val_images", "voc_root"),
    build_model=build_model, build_data=build_data, evaluate=evaluate, make_preprocess=dense_preprocess,
    decode=decode, write_prediction=write_prediction, report=report, predict_options=("score_thresh",),
    build_head=build_head, saved_defaults={"model.reg_activation": "relu"}, describe_data=describe_data,
    resolve_for_run=resolve_for_run)


def get_args_parser():
    return build_parser(SPEC)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(SPEC, argv)


if __name__ == "__main__":
    run_cli(main)
