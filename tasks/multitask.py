"""One trunk, three heads: joint training on FashionScenes and one-pass inference.

Usage:
    python -m tasks.multitask               # joint training: multi-label classification (which
                                            # classes appear), FCOS detection, FCN segmentation
    python -m tasks.multitask --eval-only --weights runs/multitask/<run>/best.pt
    python -m tasks.multitask --predict scene.png --weights runs/multitask/<run>/best.pt
    python -m tasks.multitask --predict scene.png --from-checkpoints DET.pt SEG.pt
                                            # merge single-task models that share a frozen trunk
    torchrun --nproc_per_node=2 -m tasks.multitask   # one process per GPU, batch size per GPU

The trunk runs once per batch; the loss is the weighted sum of the three heads' losses
(``model.weight_classify`` / ``weight_detect`` / ``weight_segment``), with one optimizer and
one checkpoint. Evaluation uses each task's own metrics: mAP and F1 (multi-label), COCO box AP,
mIoU. ``--predict`` writes, per image, a JSON (classes, boxes, mask file) and one picture.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from backbones import build_backbone
from heads import MultiLabelHead, MultiTaskModel
from tasks import detect, segment
from tasks.data.coco import CocoDetection, collate_detection, read_image
from tasks.data.gpu_augment import IMAGENET_MEAN, IMAGENET_STD, BatchAugment
from tasks.data.loaders import DeviceLoader, make_loader, normalize_images
from tasks.data.scenes import ensure_scenes
from tasks.data.segmentation import IGNORE_INDEX
from tasks.engine import distributed
from tasks.engine.checkpoint import load_checkpoint, load_for_inference
from tasks.engine.cli import common_parser, default_recipe, run_cli, setup_run
from tasks.engine.config import OptimConfig, TrainConfig, config_from_dict
from tasks.engine.logging import progress
from tasks.engine.loop import Trainer, autocast
from tasks.engine.metrics import ConfusionMatrix, multilabel_metrics
from tasks.engine.trunk import load_trunk
from tasks.engine.viz import (class_colors, draw_detection_grid, draw_segmentation_grid, overlay_mask,
                              save_palette_mask)

NORMALIZE = BatchAugment(IMAGENET_MEAN, IMAGENET_STD)
TASK = "multitask"
GPU_RECIPE, CPU_RECIPE = "scenes_multitask_resnet18", "scenes_quick"
TASKS = ("classify", "detect", "segment")


@dataclass
class MultiTaskModelConfig(detect.DetectModelConfig):
    """The trunk, the detection head (inherited fields), the segmentation and multi-label heads."""

    seg_in_features: tuple[str, ...] = ("c3", "c4", "c5")
    seg_channels: Optional[int] = None
    seg_dropout: float = 0.1
    cls_dropout: float = 0.0
    weight_classify: float = 1.0
    weight_detect: float = 1.0
    weight_segment: float = 1.0


@dataclass
class MultiTaskConfig:
    model: MultiTaskModelConfig = field(default_factory=MultiTaskModelConfig)
    data: segment.SegmentDataConfig = field(default_factory=segment.SegmentDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- model

def build_model(cfg: MultiTaskConfig, num_classes: int) -> MultiTaskModel:
    """``num_classes`` object classes: detection and multi-label use them, segmentation adds
    background (mask value = label + 1)."""
    m = cfg.model
    backbone = build_backbone(f"resnet{m.depth}", **m.backbone_kwargs())
    info = backbone.feature_info
    heads = {
        "classify": MultiLabelHead(info[-1], num_classes, dropout=m.cls_dropout),
        "detect": detect.build_head(m, info, num_classes),
        "segment": segment.build_head(info, num_classes + 1, in_features=m.seg_in_features, channels=m.seg_channels,
                                      dropout=m.seg_dropout, aux=False, aux_weight=0.0),
    }
    weights = {"classify": m.weight_classify, "detect": m.weight_detect, "segment": m.weight_segment}
    return MultiTaskModel(backbone, heads, weights)


# ----------------------------------------------------------------------------- data

def data_paths(cfg: MultiTaskConfig, *, quiet: bool = False) -> dict[str, str]:
    """COCO files + image folders + semantic mask folders (FashionScenes generated if missing)."""
    d = cfg.data
    keys = ("train_ann", "train_images", "train_masks", "val_ann", "val_images", "val_masks")
    if any(getattr(d, k) for k in keys) or d.dataset != "scenes":
        missing = [f"--{k.replace('_', '-')}" for k in keys if not getattr(d, k)]
        if missing:
            raise ValueError(f"multi-task data from files needs {', '.join(missing)} (COCO boxes plus "
                             f"semantic masks with value = category index + 1, 0 = background, 255 = ignore)")
        return {k: getattr(d, k) for k in keys}
    with distributed.main_first():  # under torchrun rank 0 generates, the others wait for it
        root = ensure_scenes(d.scenes_root, train=d.scenes_train, val=d.scenes_val, size=d.scenes_size,
                             seed=d.scenes_seed, data_dir=d.data_dir, progress=not quiet)
    return {f"{split}_{kind}": str(root / folder) for split in ("train", "val")
            for kind, folder in (("ann", f"annotations/instances_{split}.json"), ("images", f"images/{split}"),
                                 ("masks", f"masks/{split}"))}


def multitask_targets(targets: list[dict], num_classes: int) -> dict[str, Any]:
    """Per-image COCO targets (with ``mask``) -> ``{"classify": multi-hot [N, K], "detect":
    [dict(boxes, labels)], "segment": masks [N, H, W]}``; the classes present are the boxes'
    labels after augmentation (an item cropped away is not in the image)."""
    device = targets[0]["boxes"].device
    hot = torch.zeros(len(targets), num_classes, device=device)
    for i, t in enumerate(targets):  # a handful of index writes per image, no host sync
        hot[i].index_fill_(0, t["labels"], 1.0)
    return {"classify": hot,
            "detect": [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets],
            "segment": torch.stack([t["mask"] for t in targets])}


@dataclass
class MultiTaskData:
    train: Any
    val: Any
    val_set: CocoDetection
    class_names: list[str]


def build_data(cfg: MultiTaskConfig, device: torch.device, *, train: bool = True, quiet: bool = False) -> MultiTaskData:
    d = cfg.data
    paths = data_paths(cfg, quiet=quiet)
    val_set, train_set = detect.coco_sets(d, paths, cfg.train.seed, train=train)
    k = val_set.num_classes
    normalize = normalize_images(NORMALIZE, cfg.train.channels_last)

    def on_device(batch):
        x, targets = normalize(batch)
        # "_meta" keeps the per-image targets (ids, scales) for COCO evaluation; heads ignore it
        return x, {**multitask_targets(targets, k), "_meta": targets}

    def loader(ds, shuffle: bool, batch_size: int):
        return make_loader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=d.num_workers,
                           collate_fn=_collate, seed=cfg.train.seed, device=device)

    val = DeviceLoader(loader(val_set, False, d.eval_batch_size), device, on_device)
    train_loader = None
    if train_set is not None:
        train_loader = DeviceLoader(loader(train_set, True, cfg.train.batch_size), device, on_device,
                                    seed=cfg.train.seed)
    return MultiTaskData(train_loader, val, val_set, val_set.class_names)


def _collate(batch):
    images, targets = collate_detection(batch)
    h, w = images.shape[-2:]
    for t in targets:  # pad masks like the images: bottom / right, with ignore
        mh, mw = t["mask"].shape
        if (mh, mw) != (h, w):
            padded = torch.full((h, w), IGNORE_INDEX, dtype=t["mask"].dtype)
            padded[:mh, :mw] = t["mask"]
            t["mask"] = padded
    return images, targets


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: MultiTaskModel, data: MultiTaskData, device: torch.device, amp: bool = True, *,
             picture_path: Path | None = None, quiet: bool = True) -> dict[str, Any]:
    """Every head with its task's metrics: ``cls_mAP`` / ``cls_F1``, COCO ``AP``..., ``miou``;
    ``mean`` = the average of cls_mAP, AP and mIoU (what ``best.pt`` follows). Under torchrun
    each rank runs its validation shard: scores and COCO results are gathered (COCOeval runs
    on rank 0), the confusion matrices summed."""
    was_training = model.training
    model.eval()
    k = len(data.class_names)
    det_eval = detect.DetectionEvaluator(data.val_set)
    cm = ConfusionMatrix(k + 1, device, ignore_index=IGNORE_INDEX)
    scores, hot = [], []
    shown: tuple[list, list, list] = ([], [], [])
    with autocast(device, amp):
        for images, targets in progress(data.val, total=len(data.val), desc="eval", quiet=quiet):
            out = model(images)
            scores.append(out["classify"].float().cpu())
            hot.append(targets["classify"].cpu())
            dets = det_eval.update(out["detect"], targets["_meta"])
            masks = out["segment"].argmax(1)  # [N, H, W]
            cm.update(masks, targets["segment"])
            if picture_path is not None and len(shown[0]) < 4:
                take = 4 - len(shown[0])
                shown[0].extend(NORMALIZE.to_uint8(images[:take]).cpu())
                shown[1].extend(dets[:take])
                shown[2].extend(masks[:take].cpu())
    model.train(was_training)
    # every rank's shard: multi-label scores (small) and COCO results gathered, counts summed
    scores, hot = distributed.gather_lists(scores), distributed.gather_lists(hot)
    cls = multilabel_metrics(torch.cat(scores), torch.cat(hot))
    det_eval.results = distributed.gather_lists(det_eval.results)
    det = distributed.on_main(det_eval.compute)
    seg = segment.segmentation_metrics(cm.all_reduce())
    metrics = {"cls_mAP": cls["mAP"], "cls_F1": cls["F1"], **det, "miou": seg["miou"],
               "pixel_acc": seg["pixel_acc"]}
    metrics["mean"] = (metrics["cls_mAP"] + metrics["AP"] + metrics["miou"]) / 3
    if picture_path is not None and shown[0]:
        _draw(shown[0], shown[1], shown[2], data.class_names, picture_path)
    return metrics


def _draw(images, detections, masks, class_names, path: Path) -> None:
    """Masks painted first, boxes over them: one tile per image."""
    colors = class_colors(len(class_names) + 1)
    painted = [overlay_mask(img, m, colors, IGNORE_INDEX) for img, m in zip(images, masks)]
    draw_detection_grid(painted, detections, class_names, path, nrow=2)


# ----------------------------------------------------------------------------- inference

def _merged_model(paths: list[str], device: torch.device) -> tuple[MultiTaskModel, dict[str, Any]]:
    """A ``MultiTaskModel`` from single-task checkpoints whose trunks are identical."""
    models, meta = {}, {}
    for path in paths:
        ckpt = load_checkpoint(path)
        task = ckpt.get("task")
        if task not in ("detect", "segment") or task in models:
            raise ValueError(f"--from-checkpoints takes one detect and/or one segment checkpoint; {path} is "
                             f"{task!r}" + (" again" if task in models else ""))
        mod = {"detect": detect, "segment": segment}[task]
        cfg = config_from_dict(mod.DetectConfig if task == "detect" else mod.SegmentConfig, ckpt["config"])
        names = ckpt["meta"]["class_names"]
        models[task] = load_for_inference(mod.build_model(cfg, len(names)), ckpt, device, cfg.train.channels_last)
        meta[task] = ckpt["meta"]
    merged = MultiTaskModel.from_task_models(models).to(device).eval()
    class_names = meta.get("detect", {}).get("class_names") or meta["segment"]["class_names"][1:]
    return merged, {"class_names": class_names, "image_size": next(iter(meta.values()))["image_size"]}


def predict(model: MultiTaskModel, meta: dict[str, Any], paths: list[str], out_dir: Path, device: torch.device,
            amp: bool) -> list[dict[str, Any]]:
    """Per image: ``<name>.json`` (classes, boxes in file pixels, mask file), ``<name>_mask.png``
    (palette, value = class index + 1) and ``<name>.png`` (mask and boxes over the image).
    Prediction runs at the file's resolution (every head handles any size)."""
    names = meta["class_names"]
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path in paths:
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1)  # [3, H, W] uint8
        x = NORMALIZE(image[None].to(device), train=False)
        with torch.no_grad(), autocast(device, amp):
            out = model(x)
        stem = Path(path).stem
        entry: dict[str, Any] = {"image": path}
        if "classify" in out:
            probs = out["classify"][0].float().cpu()
            entry["classes"] = [{"class": names[i], "probability": round(float(p), 4)}
                                for i, p in enumerate(probs) if p >= 0.5]
        dets = None
        if "detect" in out:
            dets = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out["detect"][0].items()}
            entry["detections"] = [{"box_xyxy": [round(v, 2) for v in b.tolist()], "score": round(float(s), 4),
                                    "class": names[int(c)]}
                                   for b, s, c in zip(dets["boxes"], dets["scores"], dets["labels"])]
        mask = None
        if "segment" in out:
            mask = out["segment"][0].argmax(0).cpu()  # [H, W]: 0 background, label + 1
            save_palette_mask(mask.numpy(), out_dir / f"{stem}_mask.png", len(names) + 1)
            entry["mask"] = str(out_dir / f"{stem}_mask.png")
        (out_dir / f"{stem}.json").write_text(json.dumps(entry, indent=1))
        if dets is not None:
            _draw([image], [dets], [mask if mask is not None else torch.zeros(image.shape[1:], dtype=torch.long)],
                  names, out_dir / f"{stem}.png")
        else:
            draw_segmentation_grid([image], [mask], ["background", *names], out_dir / f"{stem}.png")
        found = ", ".join(c["class"] for c in entry.get("classes", [])) or "-"
        print(f"{path}: classes {found}; {sum(1 for d in entry.get('detections', []) if d['score'] >= 0.3)} boxes "
              f"(score >= 0.3) -> {out_dir / stem}.json/.png")
        results.append(entry)
    return results


# ----------------------------------------------------------------------------- entry points

def get_args_parser():
    p = common_parser("python -m tasks.multitask", __doc__,
                      data_flags=("data_dir", "train_ann", "train_images", "train_masks", "val_ann", "val_images",
                                  "val_masks"))
    p.add_argument("--from-checkpoints", nargs="+", metavar="CKPT",
                   help="with --predict: merge a detect and a segment checkpoint that share a frozen trunk")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.from_checkpoints:
        if not args.predict:
            parser.error("--from-checkpoints goes with --predict IMG...")
        if distributed.env_world_size() > 1:
            raise ValueError("--predict runs in one process: python -m tasks.multitask --predict ... (not torchrun)")
        return _main_merged(args)
    run = setup_run(TASK, MultiTaskConfig, args, default_recipe(GPU_RECIPE, CPU_RECIPE))
    cfg, device, say = run.cfg, run.device, run.console
    if run.summary and not (args.eval_only or args.predict):
        say(run.summary)
    say(f"multitask: recipe {run.recipe} on {device} -> {run.output}")

    if args.predict:
        meta = run.checkpoint["meta"]
        model = load_for_inference(build_model(cfg, len(meta["class_names"])), run.checkpoint, device,
                                   cfg.train.channels_last)
        return {"predictions": predict(model, meta, args.predict, run.output / "predictions", device, cfg.train.amp)}

    data = build_data(cfg, device, train=not args.eval_only, quiet=args.quiet)
    k = len(data.class_names)
    if args.eval_only:
        model = load_for_inference(build_model(cfg, k), run.checkpoint, device, cfg.train.channels_last)
        metrics = evaluate(model, data, device, cfg.train.amp, quiet=args.quiet,
                           picture_path=run.output / "multitask.png" if distributed.is_main() else None)
        _print_metrics(metrics, print)
        return metrics

    model = build_model(cfg, k)
    if args.trunk:
        load_trunk(model.backbone, args.trunk, cfg.model)
    meta = {"class_names": data.class_names, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "image_size": cfg.data.image_size}

    def evaluate_epoch(m, final: bool) -> dict[str, Any]:
        return evaluate(m, data, device, cfg.train.amp, picture_path=run.output / "multitask.png" if final else None)

    trainer = Trainer(TASK, cfg, model, data.train, output=run.output, device=device, quiet=args.quiet,
                      console=say, main_metric="mean", meta=meta, evaluate=evaluate_epoch)
    if run.resume_from is not None:
        trainer.resume(run.resume_from)
    record = trainer.fit()
    metrics = {k[len("val_"):]: v for k, v in record.items() if k.startswith("val_")}
    _print_metrics(metrics, say)
    say(f"{record.get('train_time_total_s', 0):.1f} s of training, run folder {run.output}")
    return {**record, **metrics, "output": str(run.output)}


def _print_metrics(m: dict[str, Any], say) -> None:
    say(f"classification mAP {m['cls_mAP']:.4f} F1 {m['cls_F1']:.4f} | detection AP {m['AP']:.4f} "
        f"AP50 {m['AP50']:.4f} | segmentation mIoU {m['miou']:.4f} pixel acc {m['pixel_acc']:.4f}")


def _main_merged(args) -> dict[str, Any]:
    from tasks.engine.cli import resolve_device

    device = resolve_device(args.device or "auto")
    model, meta = _merged_model(args.from_checkpoints, device)
    out = Path(args.output) if args.output else Path(args.from_checkpoints[0]).parent
    print(f"multitask: one trunk, heads {list(model.heads)} from {', '.join(args.from_checkpoints)}")
    amp = args.amp if args.amp is not None else True
    return {"predictions": predict(model, meta, args.predict, out / "predictions", device, amp)}


if __name__ == "__main__":
    run_cli(main)
