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
one checkpoint. The detection and segmentation heads, their settings and their outputs are
the detect and segment tasks' (through the task registry). Evaluation uses each task's own
metrics: mAP and F1 (multi-label), COCO box AP, mIoU. ``--predict`` writes, per image, a
JSON (classes, boxes, mask file) and one picture.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from backbones import build_backbone
from heads import MultiLabelHead, MultiTaskModel
from tasks.data.coco import CocoEvaluator, collate_detection
from tasks.data.images import pad_batch
from tasks.data.preprocess import Geometry
from tasks.data.segmentation import IGNORE_INDEX
from tasks.engine import distributed
from tasks.engine.config import OptimConfig, TrainConfig, bounded, setting
from tasks.engine.datasets import coco_sets, data_files, dense_preprocess, file_loaders, unusable_samples
from tasks.engine.logging import progress
from tasks.engine.loop import autocast
from tasks.engine.metrics import ConfusionMatrix, by_name, coco_scores, multilabel_metrics
from tasks.engine.predict import Predictor, load_task_model
from tasks.engine.registry import TASKS, TaskData, TaskSpec
from tasks.engine.predict import predict_files
from tasks.engine.runner import build_parser, predict_arguments, run, run_cli
from tasks.engine.viz import (class_colors, detection_tile, draw_segmentation_grid, object_colors, overlay_mask,
                               save_grid, save_palette_mask)

DETECT, SEGMENT = TASKS["detect"], TASKS["segment"]
FILES = ("train_ann", "train_images", "train_masks", "val_ann", "val_images", "val_masks")
PRESENT = 0.5  # multi-label probability from which a class counts as in the image


@dataclass
class MultiTaskModelConfig(DETECT.model_config):
    """The trunk, the detection head (the detect task's fields), the segmentation and multi-label heads."""

    seg_in_features: tuple[str, ...] = setting(("c3", "c4", "c5"), "segmentation head: the segment task's "
                                                                   "model.in_features")
    seg_channels: Optional[int] = bounded(None, 1, help="segmentation head: the segment task's model.channels")
    weight_classify: float = bounded(1.0, 0.0, help="weight of the multi-label loss in the sum")
    weight_detect: float = bounded(1.0, 0.0, help="weight of the detection losses in the sum")
    weight_segment: float = bounded(1.0, 0.0, help="weight of the segmentation loss in the sum")


@dataclass
class MultiTaskConfig:
    model: MultiTaskModelConfig = field(default_factory=MultiTaskModelConfig)
    # FashionScenes, or COCO boxes plus the segment task's mask folders (value = category index + 1)
    data: SEGMENT.data_config = field(default_factory=SEGMENT.data_config)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- model

def build_model(cfg: MultiTaskConfig, meta: Mapping[str, Any]) -> MultiTaskModel:
    """``meta["class_names"]``: the object classes; detection and multi-label use them,
    segmentation adds background (mask value = label + 1)."""
    m, k = cfg.model, len(meta["class_names"])
    backbone = build_backbone(f"resnet{m.depth}", **m.backbone_kwargs())
    info = backbone.feature_info
    seg = SEGMENT.model_config(in_features=m.seg_in_features, channels=m.seg_channels, aux=False)
    heads = {
        "classify": MultiLabelHead(info[-1], k),
        "detect": DETECT.build_head(m, info, k),
        "segment": SEGMENT.build_head(seg, info, k + 1),
    }
    weights = {"classify": m.weight_classify, "detect": m.weight_detect, "segment": m.weight_segment}
    return MultiTaskModel(backbone, heads, weights)


# ----------------------------------------------------------------------------- data

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


def _collate(batch):
    collated = collate_detection(batch)
    if collated is None:  # every sample left out (an evaluation set with skip_bad)
        return None
    images, targets = collated
    masks = pad_batch([t["mask"] for t in targets], fill=IGNORE_INDEX)  # padded like the images, with ignore
    for t, mask in zip(targets, masks):
        t["mask"] = mask[:images.shape[-2], :images.shape[-1]]
    return images, targets


def build_data(cfg: MultiTaskConfig, device: torch.device, *, train: bool = True, quiet: bool = False) -> TaskData:
    d = cfg.data
    if d.classes or d.voc_root:
        raise ValueError("multitask reads FashionScenes or COCO files with masks: its classes are the COCO categories "
                         "(no --classes, no --voc-root)")
    pre = dense_preprocess(cfg)
    paths = data_files(d, FILES, "multi-task data from files (COCO boxes plus semantic masks with value = "
                                 "category index + 1, 0 = background, 255 = ignore)",
                       files=d.dataset != "scenes", quiet=quiet)
    val_set, train_set = coco_sets(cfg, paths, pre, train=train)
    k = val_set.num_classes

    def finish(batch):
        x, targets = batch
        # "_meta" keeps the per-image targets (ids, scales) for COCO evaluation; heads ignore it
        return x, {**multitask_targets(targets, k), "_meta": targets}

    train_loader, val = file_loaders(train_set, val_set, cfg=cfg, device=device, normalize=pre.normalize,
                                     train_collate=_collate, val_collate=_collate, finish=finish)
    meta = {"class_names": val_set.class_names, "category_ids": val_set.cat_ids, **pre.to_meta()}
    return TaskData(train_loader, val, meta, val_set=val_set, skipped=unusable_samples(train_set, val_set),
                    fixed_shapes=d.resize != "aspect")


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: MultiTaskModel, data: TaskData, device: torch.device, amp: bool = True, *,
             output: Path | None = None, quiet: bool = True) -> dict[str, Any]:
    """Every head with its task's metrics: ``cls_mAP`` / ``cls_F1``, COCO ``AP``..., ``miou``;
    ``mean`` = the average of cls_mAP, AP and mIoU (what ``best.pt`` follows). Under torchrun
    each rank runs its validation shard: scores and COCO results are gathered (COCOeval runs
    on rank 0), the confusion matrices summed. With ``output``, ``multitask.png``."""
    was_training = model.training
    model.eval()
    names = data.meta["class_names"]
    det_eval = CocoEvaluator(data.val_set)
    cm = ConfusionMatrix(len(names) + 1, device, ignore_index=IGNORE_INDEX)
    scores, hot = [], []
    shown: tuple[list, list, list, list] = ([], [], [], [])
    with autocast(device, amp):
        for images, targets in progress(data.val, total=len(data.val), desc="eval", quiet=quiet):
            out = model(images)
            scores.append(out["classify"].float().cpu())
            hot.append(targets["classify"].cpu())
            dets = det_eval.update(out["detect"], targets["_meta"])
            masks = out["segment"].argmax(1)  # [N, H, W]
            cm.update(masks, targets["segment"])
            if output is not None and len(shown[0]) < 4:
                take = 4 - len(shown[0])
                shown[0].extend(data.preprocess.to_uint8(images[:take]).cpu())
                shown[1].extend(dets[:take])
                shown[2].extend(masks[:take].cpu())
                # the truth too: early in training few boxes pass the picture's threshold
                shown[3].extend({"boxes": t["boxes"].cpu(), "labels": t["labels"].cpu(), "mask": m.cpu()}
                                for t, m in zip(targets["_meta"][:take], targets["segment"][:take]))
    model.train(was_training)
    # every rank's shard: multi-label scores (small) and COCO results gathered, counts summed
    scores, hot = distributed.gather_lists(scores), distributed.gather_lists(hot)
    cls = multilabel_metrics(torch.cat(scores), torch.cat(hot))
    det_eval.results = distributed.gather_lists(det_eval.results)
    det_eval.image_ids = distributed.gather_lists(det_eval.image_ids)
    det = distributed.on_main(lambda: coco_scores(det_eval, data.val_set, names)[0])
    seg = cm.all_reduce().segmentation()
    metrics = {"cls_mAP": cls["mAP"], "cls_F1": cls["F1"], **det, "miou": seg["miou"],
               "pixel_acc": seg["pixel_acc"], "per_class_iou": by_name(["background", *names], seg["iou"])}
    metrics["mean"] = (metrics["cls_mAP"] + metrics["AP"] + metrics["miou"]) / 3
    if output is not None and shown[0]:
        _draw(shown[0], shown[1], shown[2], names, Path(output) / "multitask.png", truth=shown[3])
    return metrics


def report(m: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
    """The summary, then the detection and segmentation heads' lines as their own tasks report them."""
    detection, segmentation = DETECT.report(m, meta), SEGMENT.report(m, meta)
    return [f"classification mAP {m['cls_mAP']:.4f} F1 {m['cls_F1']:.4f} | detection AP {m['AP']:.4f} "
            f"AP50 {m['AP50']:.4f} | segmentation mIoU {m['miou']:.4f} pixel acc {m['pixel_acc']:.4f}",
            "  detection: " + detection[0], *detection[1:], *segmentation[1:]]


def _draw(images, detections, masks, class_names, path: Path, *, truth: Sequence[dict] | None = None,
          score_thresh: float = 0.4, gray: bool = True) -> None:
    """One row per image: with ``truth`` (``boxes``, ``labels``, ``mask``), the true mask and
    boxes (white), then the prediction: the predicted mask, the boxes above ``score_thresh``
    over it; the image in grey levels under them (``gray``). A class's boxes take its mask
    colour; a legend names the classes shown."""
    colors = class_colors(len(class_names) + 1)  # [0]: background, never painted
    box_colors = object_colors(len(class_names))  # mask value = label + 1: its colour
    tiles, shown = [], set()
    for i, (img, det, mask) in enumerate(zip(images, detections, masks)):
        layers = [(truth[i]["mask"], None, truth[i]["boxes"])] if truth is not None else []
        for m, d, boxes in layers + [(mask, det, None)]:  # (mask, predicted boxes, true boxes) per tile
            tile, labels = detection_tile(overlay_mask(img, m, colors, IGNORE_INDEX, gray=gray), d, class_names,
                                          box_colors, score_thresh=score_thresh, target_boxes=boxes)
            tiles.append(tile)
            shown |= labels | {c - 1 for c in torch.unique(m).tolist() if 0 < c <= len(class_names)}
        if truth is not None:
            shown |= set(truth[i]["labels"].tolist())
    boxes_drawn = any(len(d["scores"]) and bool((d["scores"] >= score_thresh).any()) for d in detections)
    note = f"boxes: score >= {score_thresh:.2f}" + ("" if boxes_drawn else " (none)")
    if truth is not None:
        note = f"left: truth (mask, white boxes); right: prediction (mask, {note})"
    save_grid(tiles, path, nrow=2 if truth is not None else 1, legend=[(class_names[c], box_colors[c])
                                                                       for c in sorted(shown)], note=note)


# ----------------------------------------------------------------------------- prediction

def decode(outputs: Mapping[str, Any], geometries: list[Geometry], meta: Mapping[str, Any],
           score_thresh: float | None = None) -> list[dict[str, Any]]:
    """Per image, for each head the model has: ``"classify"``: ``{"top": [(class, probability)]``
    (the classes present, probability >= 0.5, best first), ``"probs": [K]}``; ``"detect"`` and
    ``"segment"``: the detect and segment tasks' results (segment class 0 = background)."""
    names = list(meta["class_names"])
    n = len(geometries)
    per_head: dict[str, list] = {}
    if "classify" in outputs:
        probs = outputs["classify"].float().cpu()  # [N, K]
        per_head["classify"] = [{"top": sorted(((names[j], float(p)) for j, p in enumerate(row) if p >= PRESENT),
                                               key=lambda c: -c[1]), "probs": row} for row in probs]
    if "detect" in outputs:
        per_head["detect"] = DETECT.decode(outputs["detect"], geometries, meta, score_thresh)
    if "segment" in outputs:
        per_head["segment"] = SEGMENT.decode(outputs["segment"], geometries,
                                             {**meta, "class_names": ["background", *names]})
    return [{head: results[i] for head, results in per_head.items()} for i in range(n)]


def write_prediction(result: Mapping[str, Any], image: np.ndarray, source: str, out_dir: Path, stem: str,
                     meta: Mapping[str, Any], *, images: bool = True) -> dict[str, Any]:
    """``<stem>.json`` (classes, boxes in file pixels, mask file), ``<stem>_mask.png`` (palette,
    value = class index + 1) and ``<stem>.png`` (mask and boxes over the image); without ``images``
    only the mask (the entry goes into summary.json)."""
    from tasks.engine.viz import write_json  # every file through one writer: no link is written through

    names = list(meta["class_names"])
    out_dir.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"image": source}
    if "classify" in result:
        entry["classes"] = [{"class": c, "probability": round(p, 4)} for c, p in result["classify"]["top"]]
    picture = torch.from_numpy(image).permute(2, 0, 1)
    mask = None
    if "segment" in result:
        mask = result["segment"]["mask"]  # [H, W]: 0 background, label + 1
        save_palette_mask(mask.numpy(), out_dir / f"{stem}_mask.png", len(names) + 1)
        entry["mask"] = str(out_dir / f"{stem}_mask.png")
    if "detect" in result:
        entry["detections"] = [
            {"box_xyxy": [round(v, 2) for v in b.tolist()], "score": round(float(s), 4), "class": c}
            for b, s, c in zip(result["detect"]["boxes"], result["detect"]["scores"], result["detect"]["names"])]
        if images:
            _draw([picture], [result["detect"]],
                  [mask if mask is not None else torch.zeros(image.shape[:2], dtype=torch.long)],
                  names, out_dir / f"{stem}.png", gray=mask is not None)
    elif images:
        draw_segmentation_grid([picture], [mask], ["background", *names], out_dir / f"{stem}.png")
    if images:
        write_json(out_dir / f"{stem}.json", entry)
    found = ", ".join(c["class"] for c in entry.get("classes", [])) or "-"
    print(f"{source}: classes {found}; {sum(1 for d in entry.get('detections', []) if d['score'] >= 0.3)} boxes "
          f"(score >= 0.3) -> {out_dir / stem}.json/.png")
    return entry


def merged_predictor(paths: Sequence[str], device: str | torch.device = "auto", *, amp: bool = True) -> Predictor:
    """One ``MultiTaskModel`` from a detect and / or a segment checkpoint whose trunks are
    identical (trained from one frozen trunk): the trunk runs once for both heads."""
    import os

    if isinstance(paths, (str, bytes, os.PathLike)) or not paths:
        raise ValueError(f"a multitask model merges a list of one detect and/or one segment checkpoint; got "
                         f"{paths!r}")
    models, metas = {}, {}
    for path in paths:
        spec, model, meta, _ = load_task_model(path)
        if spec.name not in ("detect", "segment") or spec.name in models:
            raise ValueError(f"a multitask model merges one detect and/or one segment checkpoint (--from-checkpoints, "
                             f"tasks.load([...])); {path} is "
                             f"{spec.name!r}" + (" again" if spec.name in models else ""))
        models[spec.name], metas[spec.name] = model, meta
    pres = {task: (m["in_chans"], tuple(m["mean"]), tuple(m["std"]), m["preprocess"]) for task, m in metas.items()}
    if len(set(map(str, pres.values()))) > 1:
        raise ValueError(f"{', '.join(paths)}: the models preprocess images differently ({pres}); "
                         f"one trunk pass cannot serve both")
    first = next(iter(metas.values()))
    class_names = metas["detect"]["class_names"] if "detect" in metas else metas["segment"]["class_names"][1:]
    meta = {**first, "class_names": list(class_names)}
    return Predictor(SPEC, MultiTaskModel.from_task_models(models), meta, device, amp=amp)


def _add_arguments(parser) -> None:
    parser.add_argument("--from-checkpoints", nargs="+", metavar="CKPT",
                        help="with --predict: merge a detect and a segment checkpoint that share a frozen trunk")


SPEC = TaskSpec(saved_defaults={"model.reg_activation": "relu"},
    name="multitask", config=MultiTaskConfig, recipes=("scenes_multitask_resnet18", "scenes_quick"),
    main_metric="mean", doc=__doc__,
    data_flags=("data_dir", "train_ann", "train_images", "train_masks", "val_ann", "val_images", "val_masks"),
    build_model=build_model, build_data=build_data, evaluate=evaluate, make_preprocess=dense_preprocess,
    decode=decode, write_prediction=write_prediction, report=report, predict_options=("score_thresh",),
    add_arguments=_add_arguments, resolve_for_run=DETECT.resolve_for_run)


def get_args_parser():
    return build_parser(SPEC)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not args.from_checkpoints:
        return run(SPEC, args)
    if not args.predict:
        parser.error("--from-checkpoints goes with --predict IMG...")
    if distributed.env_world_size() > 1:
        raise ValueError("--predict runs in one process: python -m tasks.multitask --predict ... (not torchrun)")
    predictor = merged_predictor(args.from_checkpoints, args.device or "auto",
                                 amp=args.amp if args.amp is not None else True)
    out = Path(args.output) if args.output else Path(args.from_checkpoints[0]).parent
    print(f"multitask: one trunk, heads {list(predictor.model.heads)} from {', '.join(args.from_checkpoints)}")
    return {"predictions": predict_files(predictor, args.predict, out / "predictions", **predict_arguments(args))}


if __name__ == "__main__":
    run_cli(main)
