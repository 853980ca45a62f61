"""Export a trained model: to ONNX (checked against PyTorch with onnxruntime), or to a
predict-only checkpoint (half-size weights for sharing).

Usage:
    python -m tasks.export --weights runs/classify/<run>/best.pt          # -> runs/classify/<run>/best.onnx
    python -m tasks.export --weights runs/detect/<run>/best.pt --output fcos.onnx --opset 18
    python -m tasks.export --weights runs/detect/<run>/best.pt --raw      # the network only, no NMS
    python -m tasks.export --weights runs/segment/<run>/best.pt --no-check
    python -m tasks.export --weights runs/detect/<run>/best.pt --format predict   # -> best.predict.pt

A checkpoint of any registered task (``tasks.TASKS``: classify, detect, segment, multitask)
is rebuilt through its ``TaskSpec.build_model`` and exported with the dynamo exporter
(``torch.onnx.export(dynamo=True)``). Batch, height and width are dynamic.

Input ``images``: float32 ``[batch, C, height, width]``, already preprocessed the way the task
preprocesses (``tasks.data.preprocess.Preprocess``): resized per ``preprocess``, RGB (or gray)
/ 255, then ``(x - mean) / std`` per channel, the batch padded bottom / right with zeros before
the normalisation (``size_divisible``). ``mean``, ``std``, ``in_chans``, ``preprocess``
(resize mode, size, crop_pct, size_divisible, max_size), ``class_names``, ``task`` and
``image_size`` are in the ONNX ``metadata_props``. Any height and width the PyTorch model
takes work (every resize inside is *to a size*); detection and segmentation were trained and
are checked at multiples of 32, which is what to feed them.

Input ``orig_sizes`` (detection and multitask graphs, not ``--raw``): int64 ``[batch, 2]``,
each image's original ``(height, width)`` in pixels. The graph maps its boxes back with the
resize ``preprocess`` describes: image ``i``'s content fills the top-left ``round(h * s) x
round(w * s)`` of the input, ``s = size / max(h, w)`` ("longest"; "shorter": ``size / min(h,
w)``, at most ``max_size / max(h, w)``), so a box coordinate is divided by ``round(h * s) / h``
(y) or ``round(w * s) / w`` (x), then clipped to the original image.

Outputs, per task:
    classify   ``logits [batch, K]`` (softmax is the caller's)
    segment    ``logits [batch, K, height, width]`` at the input size (argmax is the caller's)
    detect     ``boxes [batch, D, 4]`` (x1, y1, x2, y2 in the original image's pixels),
               ``scores [batch, D]``, ``labels [batch, D]`` int64 (class indices in ``[0, K)``:
               ``class_names``; the COCO ids are ``category_ids``) and ``num_detections [batch]``
               int64: rows ``0 .. num_detections[i] - 1`` of image ``i`` are its detections, best
               first; the other rows are padding (boxes and scores 0, labels -1).
               D = ``detections_per_img`` of the metadata ``postprocess``.
    multitask  ``classify_probs [batch, K]`` (sigmoids), the detection outputs prefixed
               ``detect_``, ``segment_logits [batch, K+1, height, width]``.

Detection inside the graph, per image, as the PyTorch predictor does it on the CPU
(``FCOSHead.postprocess``; the thresholds are in the metadata ``postprocess``):
    1. ``score = sqrt(sigmoid(cls_logits) * sigmoid(centerness)[:, None])``  ``[P, K]``.
    2. Per FPN level, keep the ``topk_candidates`` highest (point, class) scores of that
       level; then drop scores <= ``score_thresh``.
    3. Decode each kept point: ``(x - l*s, y - t*s, x + r*s, y + b*s)`` (``(x, y)`` the cell
       centre, ``s`` the level's stride, ``(l, t, r, b)`` the regression); clip to the network
       input ``[0, width] x [0, height]``, drop boxes with ``x2 <= x1`` or ``y2 <= y1``.
    4. Class-wise NMS at IoU ``nms_thresh`` (ONNX ``NonMaxSuppression``, one class per NMS
       class); keep the ``detections_per_img`` highest scores.
    5. Map to the original pixels (``orig_sizes``, above).
An image's detections depend on the padded input size it is run at, as in PyTorch: the
predictor batches only images whose padded sizes agree (``Preprocess.padded_shape``); do the
same for the predictor's very detections.

``--raw`` keeps the graph at the network: ``images`` in, and for detection ``cls_logits
[batch, P, K]``, ``bbox_reg [batch, P, 4]`` (l, t, r, b >= 0 in units of the point's stride),
``centerness [batch, P]`` (logits), ``points [P, 2]`` (x, y pixel centres of the cells) and
``strides [P]`` out; P runs over the FPN levels fine to coarse, each level row-major (a level
is a run of equal ``strides``). ``postprocess_detections`` does steps 1-4 on them (boxes in
input pixels).

``--check`` (default) runs onnxruntime (CPU) and compares with PyTorch (eval mode, float32);
a mismatch fails and the file is not written. Tensor outputs: at two shapes (batch 2 at the
training size, batch 1 at a larger, non-square size), every element within ``--atol + --rtol
* |pytorch|``. Detections: images of two non-square original sizes (one shrunk, one enlarged),
against ``tasks.load(ckpt).predict`` on the same pixels: the same number and labels per image,
boxes within ``--box-atol`` original pixels, scores within ``--atol + --rtol * |pytorch|``.

``--format predict`` writes the prediction weights (the EMA when the run kept one) with every
float tensor in float16, except the BatchNorm statistics (float32: 0.2% of the file; halving
them too moved no output of a trained FCOS R18 measurably, 2.2e-3 logits either way, but a
variance below 6.1e-5, float16's smallest normal number, would keep only a few bits), with the
config and the metadata to rebuild the model; no optimizer, schedule, EMA, loss-scale or RNG
state (0.17 of that run's ``best.pt``). ``tasks.load``, ``--predict``, ``--eval-only``,
``--trunk`` and this export read it (in float32); ``--resume`` refuses it. ``--check`` loads
the written file back and compares its outputs with the checkpoint's (each within 1% of its
largest value).

Nothing of the user's is replaced: ``--output`` may not be the checkpoint itself (also through
a symbolic or hard link), a folder, or an existing file that is not what this format writes
(an ONNX model; a predict-only checkpoint); a checkpoint whose weights hold NaN or inf is
refused (an exported file of it would only ever output NaN).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torchvision.ops import nms

from heads import FCOSHead, MultiLabelHead, MultiTaskModel
from heads.geometry import split_levels
from tasks.data.preprocess import Preprocess
from tasks.engine.checkpoint import CKPT_FORMAT, PREDICT_ONLY, atomic_save, load_checkpoint, write_atomic
from tasks.engine.predict import Predictor, load_task_model
from tasks.engine.registry import TASKS
from tasks.engine.runner import prog_name, run_cli

__all__ = ["ExportModule", "load_model", "export_onnx", "check_onnx", "check_detections", "check_output_path",
           "nonfinite_weights", "postprocess_detections", "predict_checkpoint", "main"]

INSTALL_HINT = "pip install 'onetrunk[export]' (in a checkout: pip install -e '.[export]')"
DETECTION_OUTPUTS = ("cls_logits", "bbox_reg", "centerness", "points", "strides")  # --raw
DETECTIONS = ("boxes", "scores", "labels", "num_detections")  # the post-processed graph
DYNAMIC_DIMS = {0: "batch", 2: "height", 3: "width"}
MIN_OPSET = 18
FORMATS = {"onnx": ".onnx", "predict": ".predict.pt"}  # --format -> the default output's suffix


def default_output(weights: Path, fmt: str = "onnx") -> Path:
    """Where ``--format fmt`` writes without ``--output``: beside the checkpoint, its stem + suffix."""
    return weights.with_name(weights.stem + FORMATS[fmt])
# torchvision.ops.batched_nms on the CPU shifts each class's boxes apart by label * (max
# coordinate + 1) and runs one NMS up to this many boxes (numel 4000), one NMS per class beyond
_COORDINATE_TRICK_BOXES = 1000


# ----------------------------------------------------------------------------- model

def _same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are one file: the same path once symbolic links are resolved, or two
    names (hard links) of one file."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _is_onnx_file(path: Path) -> bool:
    """Whether ``path`` holds an ONNX model (a file an earlier export wrote, safe to replace)."""
    import onnx

    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a zip (torch.save) or a pickle: a checkpoint
        return False
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf raises its own DecodeError; any failure means "not ONNX"
        return False
    return proto.ir_version > 0 and len(proto.graph.node) > 0


def _is_predict_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a predict-only checkpoint (an earlier ``--format predict``'s)."""
    try:
        return bool(load_checkpoint(path).get(PREDICT_ONLY))
    except (OSError, ValueError):  # not a checkpoint at all
        return False


def check_output_path(output: Path, weights: Path, fmt: str = "onnx") -> None:
    """Refuse an ``--output`` whose writing would destroy something: the input checkpoint (also
    through a link), a folder, or an existing file that is not what ``fmt`` writes (an ONNX
    model; a predict-only checkpoint)."""
    default = default_output(weights, fmt)
    if _same_file(output, weights):
        raise ValueError(f"--output {output} is the input checkpoint --weights {weights}: exporting would replace "
                         f"it; choose another --output (the default is {default})"
                         if not _same_file(default, weights) else
                         f"--output {output} is the input checkpoint --weights {weights}: exporting would replace "
                         f"it; pass --output with another name")
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder: pass a file name, e.g. {output / default.name}")
    replaceable, what = (_is_onnx_file, "an ONNX model") if fmt == "onnx" else \
        (_is_predict_checkpoint, "a predict-only checkpoint")
    if output.exists() and not replaceable(output):
        raise FileExistsError(f"--output {output} exists and is not {what}: exporting would replace it; "
                              f"choose another --output, or delete it first")


def nonfinite_weights(model: nn.Module) -> list[str]:
    """Names of the floating-point weights and buffers of ``model`` holding NaN or inf."""
    return [name for name, t in model.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def load_model(path: str | os.PathLike) -> tuple[str, nn.Module, dict[str, Any]]:
    """``(task, model, meta)`` of a checkpoint: the model on the CPU in eval mode (EMA weights
    when kept), rebuilt by its task's spec; ``meta`` in the current schema."""
    if not Path(path).exists():
        raise FileNotFoundError(f"--weights {path}: no such file")
    spec, model, meta, _ = load_task_model(path)
    return spec.name, model, meta


def task_heads(model: nn.Module, task: str) -> dict[str, nn.Module]:
    return dict(model.heads) if isinstance(model, MultiTaskModel) else {task: model.head}


def detection_outputs(head: FCOSHead, raw: Mapping[str, Any]) -> list[torch.Tensor]:
    """The ``--raw`` detector outputs (``DETECTION_OUTPUTS``) of the head's per-level raw
    outputs: flattened over the levels, with the points and strides of its grid."""
    cls_logits, bbox_reg, centerness, grid = head.flat_outputs(raw)
    return [cls_logits, bbox_reg, centerness, grid.points, grid.strides]


def head_output_names(head: nn.Module, raw: bool = False) -> list[str]:
    if isinstance(head, FCOSHead):
        return list(DETECTION_OUTPUTS if raw else DETECTIONS)
    return ["probs" if isinstance(head, MultiLabelHead) else "logits"]


def output_names(model: nn.Module, task: str, raw: bool = False) -> list[str]:
    heads = task_heads(model, task)
    prefix = len(heads) > 1
    return [f"{name}_{out}" if prefix else out for name, head in heads.items()
            for out in head_output_names(head, raw)]


def has_detections(model: nn.Module, task: str, raw: bool = False) -> bool:
    """Whether the graph post-processes detections (and so takes ``orig_sizes``)."""
    return not raw and any(isinstance(h, FCOSHead) for h in task_heads(model, task).values())


# ----------------------------------------------------------------------------- detection in the graph

@torch.library.custom_op("onetrunk::class_nms", mutates_args=())
def class_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """ONNX ``NonMaxSuppression`` (score threshold 0) as a mask: ``boxes [B, C, 4]`` xyxy,
    ``scores [B, K, C]``; box ``c`` takes part in class ``k``'s NMS where ``scores[b, k, c] >
    0``. Returns ``keep [B, C]`` bool: kept in some class. In the exported graph it is that op
    (``_class_nms_onnx``); this eager form (``torchvision.ops.nms`` per class) is for PyTorch."""
    keep = torch.zeros(scores.shape[0], scores.shape[2], dtype=torch.bool, device=scores.device)
    for b in range(scores.shape[0]):
        for k in (scores[b] > 0).any(dim=1).nonzero()[:, 0].tolist():
            members = (scores[b, k] > 0).nonzero()[:, 0]
            keep[b, members[nms(boxes[b, members], scores[b, k, members], iou_threshold)]] = True
    return keep


@class_nms.register_fake
def _class_nms_fake(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    return scores.new_empty((scores.shape[0], scores.shape[2]), dtype=torch.bool)


def _class_nms_onnx(boxes, scores, iou_threshold: float):
    """``class_nms`` in ONNX: ``NonMaxSuppression`` gives ``[S, 3]`` (batch, class, box) rows;
    ``ScatterND`` marks them in a ``[B, C]`` mask (a box is in one class: no row repeats)."""
    from onnxscript import opset18 as op
    from onnxscript.onnx_types import BOOL

    num_boxes = op.Shape(boxes, start=1, end=2)
    selected = op.NonMaxSuppression(boxes, scores, num_boxes, op.Constant(value_float=iou_threshold),
                                    op.Constant(value_float=0.0))  # [S, 3]
    where = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)  # [S, 2]: (batch, box)
    zeros = op.Expand(op.Constant(value_float=0.0), op.Concat(op.Shape(scores, start=0, end=1), num_boxes, axis=0))
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(where, start=0, end=1))
    return op.Cast(op.ScatterND(zeros, where, ones), to=BOOL.dtype)


def _resize_factors(pre: Preprocess, orig_sizes: torch.Tensor) -> torch.Tensor:
    """``[B, 2]`` (height, width) -> ``[B, 2]`` float64 ``resized / original`` per axis: the
    ``Geometry.scale`` that ``Preprocess.transform`` gives, by the same float64 arithmetic and
    the same round-half-to-even (``resized_shape``)."""
    hw = orig_sizes.to(torch.float64)  # [B, 2]

    def ratio(numerator: int, denominator: torch.Tensor) -> torch.Tensor:
        # a tensor over a tensor: `int / tensor` is reciprocal() * int in torch, one rounding
        # more, which made round(936 * 853 / 1872) 427 where Python says 426
        return denominator.new_tensor(float(numerator)) / denominator

    if pre.resize == "longest":
        scale = ratio(pre.size, hw.amax(dim=1))
    elif pre.resize == "shorter":
        scale = ratio(pre.size, hw.amin(dim=1))
        if pre.max_size is not None:
            scale = torch.minimum(scale, ratio(pre.max_size, hw.amax(dim=1)))
    else:
        raise ValueError(f"preprocess resize={pre.resize!r}: detections map back from 'longest' or 'shorter' only")
    resized = torch.round(hw * scale[:, None]).clamp(min=1)  # [B, 2]
    return resized / hw


def graph_detections(head: FCOSHead, raw: Mapping[str, Any], image_size: tuple[int, int], orig_sizes: torch.Tensor,
                     pre: Preprocess) -> list[torch.Tensor]:
    """``boxes [B, D, 4]`` in original pixels, ``scores [B, D]``, ``labels [B, D]``,
    ``num_detections [B]`` with fixed shapes, by ``FCOSPostprocess.postprocess_reference``'s
    steps (the predictor's on the CPU) and ``Geometry.boxes_to_original``."""
    # per-level top-k, score threshold, decode, clip: the head's own code (exports as is)
    boxes, scores, labels, valid = head._candidates(raw, image_size)  # [B, C, 4], [B, C], [B, C], [B, C]
    b, c = scores.shape
    k, d = head.num_classes, head.detections_per_img
    # batched_nms as the predictor runs it: per image, with <= 1000 candidates one NMS over the
    # boxes shifted by label * (max + 1), else one per class. The NMS is per class either way
    # (the shift keeps classes apart), but the shifted boxes' IoU differs in its last bits, and
    # that decides a pair at the threshold: shifted here alike, the kept sets are the same.
    count = valid.sum(dim=1)  # [B]
    top = torch.where(valid[..., None], boxes, 0.0).amax(dim=(1, 2))  # [B]: boxes are >= 0
    shifted = boxes + (labels.to(boxes.dtype) * (top[:, None] + 1.0))[..., None]  # [B, C, 4]
    nms_boxes = torch.where((count <= _COORDINATE_TRICK_BOXES)[:, None, None], shifted, boxes)
    member = labels[:, None, :] == torch.arange(k, device=labels.device)[None, :, None]  # [B, K, C]
    # candidates take part where valid; their scores are > score_thresh >= 0, the rest -1 (out)
    class_scores = torch.where(member & valid[:, None, :], scores[:, None, :], -1.0)  # [B, K, C]
    keep = torch.ops.onetrunk.class_nms(nms_boxes, class_scores, float(head.nms_thresh))  # [B, C]

    # the d best kept, best first; d columns of -1 appended so that D = detections_per_img
    # whatever C is (a small input may have fewer candidates)
    ranked = torch.cat([torch.where(keep, scores, -1.0), scores.new_full((b, d), -1.0)], dim=1)  # [B, C + D]
    best, order = ranked.topk(d, dim=1)  # [B, D]
    taken = best >= 0  # kept candidates (scores > score_thresh >= 0) before any padding
    order = order.clamp(max=c - 1)  # padding points at a real row; masked below
    top_boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))  # [B, D, 4]
    factors = _resize_factors(pre, orig_sizes).to(boxes.dtype)  # [B, 2] (sy, sx): float32 as the predictor's
    limits = orig_sizes.to(boxes.dtype)  # [B, 2] (h, w)
    x = (top_boxes[..., 0::2] / factors[:, None, 1:2]).clamp(min=0.0)
    y = (top_boxes[..., 1::2] / factors[:, None, 0:1]).clamp(min=0.0)
    x, y = torch.minimum(x, limits[:, None, 1:2]), torch.minimum(y, limits[:, None, 0:1])  # [B, D, 2] each
    out_boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)  # [B, D, 4]
    return [torch.where(taken[..., None], out_boxes, 0.0), torch.where(taken, best, 0.0),
            torch.where(taken, labels.gather(1, order), -1), taken.sum(dim=1)]


class ExportModule(nn.Module):
    """The trunk and every head of ``model``, returning a flat tuple of tensors (ONNX outputs
    are positional): each head's post-processed output. Detection heads: with ``preprocess``
    (the checkpoint's ``Preprocess``) the detections in original pixels (``graph_detections``;
    ``forward`` then takes ``orig_sizes``), without it the network's raw tensors (``--raw``)."""

    def __init__(self, model: nn.Module, task: str, preprocess: Preprocess | None = None) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.heads = nn.ModuleDict(task_heads(model, task))
        self.preprocess = preprocess

    def forward(self, images: torch.Tensor, orig_sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        image_size = (images.shape[-2], images.shape[-1])
        features = self.backbone(images)
        outputs: list[torch.Tensor] = []
        for head in self.heads.values():
            raw = head(features, image_size)
            if isinstance(head, FCOSHead):
                if self.preprocess is None:
                    outputs += detection_outputs(head, raw)
                else:
                    outputs += graph_detections(head, raw, image_size, orig_sizes, self.preprocess)
            else:
                outputs.append(head.postprocess(raw, image_size))
        return tuple(outputs)


@torch.no_grad()
def pytorch_outputs(model: nn.Module, task: str, images: torch.Tensor, raw: bool = True) -> list[torch.Tensor]:
    """The reference for ``--check``'s tensor outputs, in the ONNX output order: eval-mode
    ``model(images)`` for classification and segmentation; for detection the head's raw
    tensors with ``raw``, nothing otherwise (``check_detections`` compares those)."""
    heads = task_heads(model, task)
    evaluated = model(images) if any(not isinstance(h, FCOSHead) for h in heads.values()) else None
    outputs: list[torch.Tensor] = []
    for name, head in heads.items():
        if isinstance(head, FCOSHead):
            if raw:
                outputs += detection_outputs(head, head(model.backbone(images), (images.shape[-2], images.shape[-1])))
        else:
            outputs.append(evaluated[name] if isinstance(model, MultiTaskModel) else evaluated)
    return outputs


def tensor_output_names(model: nn.Module, task: str, raw: bool = True) -> list[str]:
    """The outputs ``pytorch_outputs`` gives, in order."""
    skip = set() if raw else set(DETECTIONS)
    return [n for n in output_names(model, task, raw) if n.removeprefix("detect_") not in skip]


def in_channels(model: nn.Module) -> int:
    return next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)).in_channels


def coarsest_stride(model: nn.Module, task: str) -> int:
    strides = [model.backbone.feature_info[-1].stride]
    strides += [h.strides[-1] for h in task_heads(model, task).values() if isinstance(h, FCOSHead)]
    return max(strides)


def example_size(train_size: int, stride: int) -> int:
    """Side of the traced example: the training size, but at least 2 cells on the coarsest
    level, rounded up to a multiple of it. Traced where P7 is 1x1 (a 64 px detector), the
    exporter records 1x1 shapes for those levels and onnxruntime then fails on larger inputs
    ("Shape mismatch attempting to re-use buffer"; torch 2.14, onnxruntime 1.31)."""
    size = max(train_size, 2 * stride)
    return -(-size // stride) * stride


# ----------------------------------------------------------------------------- ONNX

def _require(*modules: str) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            # a ValueError so that run_cli prints one line, like every other input problem
            raise ValueError(f"ONNX export needs the {name} package: {INSTALL_HINT}") from None


def _name_point_dims(proto) -> None:
    """The exporter names P by its formula in H and W; call it ``num_points`` on the outputs."""
    for out in proto.graph.output:
        if out.name.removeprefix("detect_") in DETECTION_OUTPUTS:
            for dim in out.type.tensor_type.shape.dim:
                if dim.dim_param and not re.fullmatch(r"\w+", dim.dim_param):
                    dim.dim_param = "num_points"


def _check_dynamic(proto, path: Path) -> None:
    """torch.onnx quietly falls back to static shapes when it cannot keep a dim dynamic."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    static = [DYNAMIC_DIMS[i] for i in DYNAMIC_DIMS if not dims[i].dim_param]
    if static:
        raise ValueError(f"{path}: the exporter could not keep {', '.join(static)} dynamic; "
                         f"rerun with ONETRUNK_DEBUG=1 and TORCH_LOGS=+dynamic to see where it specialised")


def export_onnx(model: nn.Module, task: str, example: torch.Tensor, opset: int | None = None,
                preprocess: Preprocess | None = None):
    """An ``onnx.ModelProto`` of ``ExportModule(model, task, preprocess)`` with dynamic batch,
    height, width: detections in the graph with ``preprocess`` (input ``orig_sizes`` too), the
    raw detector outputs without it."""
    module = ExportModule(model, task, preprocess if has_detections(model, task) else None).eval()
    names = output_names(model, task, raw=module.preprocess is None)
    # The dynamo exporter (torch.export + onnxscript) keeps H and W symbolic through the FPN and
    # FCN resizes (both resize *to a size*, and FCNHead takes the size through torch.sym_int,
    # which does not specialise), and through the per-level top-k (its k, min(topk_candidates,
    # H_l * W_l * K), becomes a sym_min); named string dims become Dim.DYNAMIC and name the ONNX
    # dims. The TorchScript exporter (dynamo=False) was not needed. Were a later version to fall
    # back to static shapes, _check_dynamic and --check say so.
    args: tuple[torch.Tensor, ...] = (example,)
    inputs, dynamic = ["images"], {"images": dict(DYNAMIC_DIMS)}
    if module.preprocess is not None:
        args += (torch.tensor([[example.shape[2], example.shape[3]]] * example.shape[0]),)
        inputs.append("orig_sizes")
        dynamic["orig_sizes"] = {0: "batch"}
    # NMS: torchvision.ops.batched_nms does export (torchvision::nms has a translation), but only
    # as one NMS over boxes shifted apart per class and image, whose IoU then differs from the
    # predictor's in the last bits; class_nms is ONNX NonMaxSuppression with a class axis
    with warnings.catch_warnings():
        # orig_sizes shares the images' batch dim by name; the exporter warns that it keeps one name
        warnings.filterwarnings("ignore", message=r"# The axis name: batch will not be used")
        program = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=names,
                                    dynamic_shapes=dynamic, opset_version=opset, verbose=False,
                                    custom_translation_table={torch.ops.onetrunk.class_nms.default: _class_nms_onnx})
    proto = program.model_proto
    _name_point_dims(proto)
    return proto


def metadata(task: str, meta: Mapping[str, Any], model: nn.Module, path: str, raw: bool = False) -> dict[str, str]:
    """What a consumer of the ONNX file needs: preprocessing, normalisation, classes,
    detection thresholds (the checkpoint's metadata, ``Preprocess``'s fields)."""
    pre = Preprocess.from_meta(meta)
    props: dict[str, Any] = {
        "producer": "onetrunk tasks.export", "task": task, "checkpoint": Path(path).name,
        "mean": list(pre.mean), "std": list(pre.std), "in_chans": pre.in_chans, "image_size": pre.size,
        "preprocess": meta["preprocess"], "class_names": list(meta["class_names"]),
        "input": "images: float32 [batch, C, height, width] = (pixels / 255 - mean) / std per channel (RGB or gray), "
                 "resized as 'preprocess' says",
    }
    if has_detections(model, task, raw):
        props["input"] += ("; orig_sizes: int64 [batch, 2], each image's original (height, width) in pixels: "
                           "boxes come out in those pixels")
        props["detections"] = ("boxes [batch, D, 4] x1, y1, x2, y2 in original pixels, scores [batch, D], labels "
                               "[batch, D] int64, num_detections [batch] int64: the first num_detections rows of "
                               "each image, best first, are detections, the rest padding (0, labels -1)")
    if meta.get("category_ids") is not None:
        props["category_ids"] = meta["category_ids"]
    for head in task_heads(model, task).values():
        if isinstance(head, FCOSHead):
            props["postprocess"] = {"score_thresh": head.score_thresh, "nms_thresh": head.nms_thresh,
                                    "topk_candidates": head.topk_candidates,
                                    "detections_per_img": head.detections_per_img,
                                    "in_graph": not raw}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items() if v is not None}


def interface_doc() -> str:
    """The inputs / outputs / post-processing part of this module's docstring (the ONNX doc_string)."""
    doc = __doc__ or ""
    return doc[doc.find("Input ``images``"):doc.find("``--check`` (default)")].strip()


def _set_metadata(proto, props: Mapping[str, str], doc: str) -> None:
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = doc


def check_shapes(size: int, channels: int) -> list[tuple[int, int, int, int]]:
    """Batch 2 at the training size; batch 1 at a larger, non-square size (multiples of 32
    stay multiples of 32): a graph that froze any dim fails the second."""
    return [(2, channels, size, size), (1, channels, size + 32, size + 64)]


def _session(path: str | os.PathLike):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors reach the caller as exceptions; no duplicate log lines
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, feed: Mapping[str, np.ndarray], names: Sequence[str], what: str) -> list[np.ndarray]:
    try:
        return session.run(list(names), dict(feed))
    except Exception as e:  # onnxruntime raises its own exception types
        raise ValueError(f"onnxruntime failed at {what}: {str(e).splitlines()[0]}") from None


def check_onnx(path: str | os.PathLike, model: nn.Module, task: str, shapes: Sequence[tuple[int, ...]],
               atol: float = 1e-3, rtol: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Run ``path`` with onnxruntime (CPU) on random inputs of ``shapes`` and compare its tensor
    outputs (all but post-processed detections: ``check_detections``) with the PyTorch model
    in float32. Returns the max abs difference per output (over all shapes); raises
    ``ValueError`` naming the output and the input shape when an element is off by more than
    ``atol + rtol * |pytorch|``."""
    session = _session(path)
    inputs = [i.name for i in session.get_inputs()]
    raw = "orig_sizes" not in inputs
    names = tensor_output_names(model, task, raw)
    generator = torch.Generator().manual_seed(seed)
    worst = dict.fromkeys(names, 0.0)
    if not names:
        return worst
    for shape in shapes:
        images = torch.randn(shape, generator=generator)
        expected = pytorch_outputs(model, task, images, raw)
        for name, e in zip(names, expected):
            # equal_nan below would let NaN pass as "equal": a model that outputs NaN is broken
            if e.is_floating_point() and not bool(torch.isfinite(e).all()):
                raise ValueError(f"output {name} of the PyTorch model holds NaN or inf at input {list(shape)}")
        feed = {"images": images.numpy()}
        if not raw:  # any sizes: the detections this graph also gives are not compared here
            feed["orig_sizes"] = np.array([shape[2:]] * shape[0], dtype=np.int64)
        got = _run(session, feed, names, f"input {list(shape)}")
        for name, g, e in zip(names, got, expected):
            e = e.float().numpy()
            if g.shape != e.shape:
                raise ValueError(f"output {name} has shape {list(g.shape)}, PyTorch {list(e.shape)} "
                                 f"(input {list(shape)})")
            diff = float(np.abs(g.astype(np.float64) - e).max()) if g.size else 0.0
            worst[name] = max(worst[name], diff)
            if not np.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True).all():
                raise ValueError(f"output {name} differs from PyTorch by up to {diff:.3g} at input "
                                 f"{list(shape)} (tolerance {atol:g} + {rtol:g} * |pytorch|)")
    return worst


def check_images(pre: Preprocess, seed: int = 0) -> list[list[np.ndarray]]:
    """uint8 originals for ``check_detections``, in batches of one padded shape (the predictor's
    batching): two images of a landscape size that is shrunk, one of a portrait size that is
    enlarged, neither side a multiple of 32. Smoothed noise: blobs and edges at many scales,
    so that an untrained or trained head scores some points high and most low."""
    import cv2

    rng = np.random.default_rng(seed)
    s = pre.size

    def image(h: int, w: int) -> np.ndarray:
        noise = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), pre.in_chans), dtype=np.uint8)
        smooth = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, pre.in_chans)
        return np.clip(smooth.astype(np.int16) + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)

    big, small = (s + s // 3 + 5, 2 * s + 7), (s // 2 + 3, s // 3 + 5)
    return [[image(*big), image(*big)], [image(*small)]]


def _detections_of(result: Mapping[str, Any]) -> Mapping[str, Any]:
    return result.get("detect", result)  # a multitask result holds one per head


def check_detections(path: str | os.PathLike, model: nn.Module, task: str, meta: Mapping[str, Any],
                     batches: Sequence[Sequence[np.ndarray]], atol: float = 1e-3, rtol: float = 1e-3,
                     box_atol: float = 1e-2) -> dict[str, float]:
    """Run ``path`` with onnxruntime alone on ``batches`` of uint8 ``H x W x C`` originals (one
    padded shape per batch), preprocessed by the checkpoint's ``Preprocess``, and compare the
    detections with the PyTorch predictor's (``Predictor.predict``, CPU, float32) on the same
    images: per image the same number and labels, boxes within ``box_atol`` original pixels,
    scores within ``atol + rtol * |pytorch|``. Returns the max box and score differences and
    the number of detections compared; a mismatch is a ``ValueError`` naming the image."""
    session = _session(path)
    prefix = "detect_" if isinstance(model, MultiTaskModel) else ""
    names = [prefix + n for n in DETECTIONS]
    predictor = Predictor(TASKS[task], model, meta, "cpu")
    pre = predictor.preprocess
    worst = {"boxes_px": 0.0, "scores": 0.0, "detections": 0}
    for images in batches:
        prepared = [pre.transform(image) for image in images]
        shapes = {pre.padded_shape(*pixels.shape[:2]) for pixels, _ in prepared}
        if len(shapes) != 1:
            raise ValueError(f"check_detections: a batch mixes padded shapes {sorted(shapes)}")
        x = pre.normalize(pre.batch([pixels for pixels, _ in prepared])).contiguous()
        where = f"input {list(x.shape)}, originals {[list(i.shape[:2]) for i in images]}"
        boxes, scores, labels, num = _run(session, {"images": x.numpy(), "orig_sizes": np.array(
            [i.shape[:2] for i in images], dtype=np.int64)}, names, where)
        expected = predictor.predict(list(images), batch_size=len(images))
        for i, want in enumerate(map(_detections_of, expected)):
            n, what = int(num[i]), f"image {i} of {where}"
            if n != len(want["labels"]):
                raise ValueError(f"{what}: {n} detections from onnxruntime, {len(want['labels'])} from PyTorch")
            if not np.array_equal(labels[i, :n], want["labels"].numpy()):
                raise ValueError(f"{what}: labels {labels[i, :n].tolist()} from onnxruntime, "
                                 f"{want['labels'].tolist()} from PyTorch")
            if n:
                box_diff = float(np.abs(boxes[i, :n].astype(np.float64) - want["boxes"].numpy()).max())
                e = want["scores"].numpy()
                score_diff = float(np.abs(scores[i, :n].astype(np.float64) - e).max())
                worst["boxes_px"] = max(worst["boxes_px"], box_diff)
                worst["scores"] = max(worst["scores"], score_diff)
                if box_diff > box_atol:
                    raise ValueError(f"{what}: boxes differ from PyTorch by up to {box_diff:.3g} px "
                                     f"(tolerance {box_atol:g})")
                if not np.isclose(scores[i, :n], e, rtol=rtol, atol=atol).all():
                    raise ValueError(f"{what}: scores differ from PyTorch by up to {score_diff:.3g} "
                                     f"(tolerance {atol:g} + {rtol:g} * |pytorch|)")
            if (labels[i, n:] != -1).any() or boxes[i, n:].any() or scores[i, n:].any():
                raise ValueError(f"{what}: the rows after num_detections = {n} are not padding")
            worst["detections"] += n
    return worst


# ----------------------------------------------------------------------------- detection

def _level_sizes(points: torch.Tensor, strides: torch.Tensor) -> list[tuple[int, int]]:
    """``(H_l, W_l)`` per FPN level from the exported points: a level is a run of one stride,
    row-major, so its width is the number of points on its first row."""
    sizes, start = [], 0
    for count in torch.unique_consecutive(strides, return_counts=True)[1].tolist():
        ys = points[start:start + count, 1]
        width = int((ys == ys[0]).sum())
        sizes.append((count // width, width))
        start += count
    return sizes


def postprocess_detections(head: FCOSHead, outputs: Mapping[str, Any], image_size: tuple[int, int]
                           ) -> list[dict[str, torch.Tensor]]:
    """Boxes from the exported detector's outputs (name -> array, ``detect_`` prefix allowed),
    through ``head.postprocess``: the same thresholds and steps as the PyTorch ``Detector``.
    ``image_size`` is the network input's ``(height, width)``; ``head`` is the checkpoint's
    (``load_model(ckpt)[1].head``)."""
    flat = {k.removeprefix("detect_"): torch.as_tensor(np.asarray(v)) for k, v in outputs.items()}
    sizes = _level_sizes(flat["points"], flat["strides"])
    # the head's raw form: per-level outputs (the head's grid gives the same points and strides)
    raw = {k: split_levels(flat[k], sizes) for k in ("cls_logits", "bbox_reg", "centerness")}
    return head.postprocess(raw, image_size)


# ----------------------------------------------------------------------------- predict-only checkpoint

def _float32_keys(model: nn.Module) -> set[str]:
    """The BatchNorm running statistics: kept in float32 by ``predict_checkpoint``."""
    from torchvision.ops import FrozenBatchNorm2d

    return {f"{name}.{stat}".lstrip(".") for name, m in model.named_modules()
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))
            for stat in ("running_mean", "running_var")}


def predict_checkpoint(source: str | os.PathLike | Mapping[str, Any], name: str | os.PathLike | None = None
                       ) -> dict[str, Any]:
    """The predict-only checkpoint of a checkpoint file (or dict): its prediction weights (the
    EMA when kept) with float tensors in float16 but the BatchNorm statistics (and any tensor
    float16 cannot hold: kept in float32, named under ``predict_only``), the config (trunk
    sources cleared: the weights are all here) and the completed metadata."""
    ckpt = load_checkpoint(source) if not isinstance(source, Mapping) else source
    name = os.fspath(name if name is not None else source if not isinstance(source, Mapping) else "checkpoint")
    return _predict_only(ckpt, name)[0]


def _predict_only(ckpt: Mapping[str, Any], name: str) -> tuple[dict[str, Any], nn.Module]:
    """``predict_checkpoint``'s checkpoint of ``ckpt`` and the float32 model it came from."""
    from backbones.weights import state_checksum
    from tasks.engine.config import config_to_dict

    spec, model, meta, cfg = load_task_model(ckpt, name=name)  # the loader's checks: fits the config, finite
    keep = _float32_keys(model)
    state, beyond = {}, []
    for key, t in model.state_dict().items():
        if t.is_floating_point() and key not in keep:
            half = t.detach().half()
            if bool(torch.isfinite(half).all()):
                state[key] = half
                continue
            beyond.append(key)  # |x| > 65504: inf in float16
        state[key] = t.detach().clone()
    return {"format": CKPT_FORMAT, "task": spec.name, "config": config_to_dict(cfg), "meta": meta, "model": state,
            "ema": None, "epoch": ckpt.get("epoch"), "metrics": ckpt.get("metrics") or {},
            PREDICT_ONLY: {"source": Path(name).name, "dtype": "float16", "float32": sorted(keep) + beyond},
            "checksums": {"model": state_checksum(state)}}, model


def check_predict_checkpoint(path: str | os.PathLike, model: nn.Module, task: str,
                             shapes: Sequence[tuple[int, ...]], rtol: float = 1e-2, seed: int = 0) -> dict[str, float]:
    """Load ``path`` back through ``load_task_model`` (what ``tasks.load`` and ``--predict``
    do) and compare its outputs (``pytorch_outputs``, detection raw) with ``model``'s on random
    inputs of ``shapes``. Returns the max abs difference per output; an output off by more than
    ``rtol`` times its largest magnitude is a ``ValueError``."""
    _, half, _, _ = load_task_model(path, task=task)
    names = tensor_output_names(model, task, raw=True)
    generator = torch.Generator().manual_seed(seed)
    worst = dict.fromkeys(names, 0.0)
    for shape in shapes:
        images = torch.randn(shape, generator=generator)
        for name, e, g in zip(names, pytorch_outputs(model, task, images), pytorch_outputs(half, task, images)):
            diff = float((g.double() - e.double()).abs().max())
            worst[name] = max(worst[name], diff)
            scale = float(e.double().abs().max())
            if not diff <= rtol * scale:  # NaN fails too
                raise ValueError(f"output {name} of the float16 weights differs by up to {diff:.3g} at input "
                                 f"{list(shape)}, more than {rtol:g} of its largest value {scale:.3g}")
    return worst


def export_predict(weights: Path, output: Path, check: bool) -> dict[str, Any]:
    """``--format predict``: ``predict_checkpoint`` written atomically to ``output``; with
    ``check`` loaded back and compared before the rename."""
    if not weights.exists():
        raise FileNotFoundError(f"--weights {weights}: no such file")
    check_output_path(output, weights, "predict")
    ckpt, model = _predict_only(load_checkpoint(weights), str(weights))  # read and built once
    task = ckpt["task"]

    shapes = check_shapes(Preprocess.from_meta(ckpt["meta"]).size, in_channels(model))

    def verify(tmp: Path) -> dict[str, float]:
        if not check:
            return {}
        try:
            return check_predict_checkpoint(tmp, model, task, shapes)
        except ValueError as e:
            raise ValueError(f"--check failed, {output} not written (--no-check writes it unchecked): {e}") from None

    diffs = atomic_save(ckpt, output, verify)
    size, before = output.stat().st_size, weights.stat().st_size
    print(f"wrote {output}: {task} weights in float16 for prediction, {size / 2**20:.1f} MiB "
          f"({size / before:.2f} of {weights}'s {before / 2**20:.1f} MiB)")
    if check:
        print(f"check (loaded back, float16 vs float32 weights, inputs {[list(s) for s in shapes]}): max abs diff "
              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return {"output": str(output), "task": task, "format": "predict", "size_ratio": size / before,
            "max_abs_diff": diffs}


# ----------------------------------------------------------------------------- entry points

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog_name("python -m tasks.export"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, metavar="CKPT", help="a checkpoint of any task (best.pt, last.pt)")
    p.add_argument("--format", default="onnx", choices=list(FORMATS),
                   help="onnx, or predict: a predict-only checkpoint in float16 (default: onnx)")
    p.add_argument("--output", metavar="FILE", help="default: beside the checkpoint, <ckpt stem>.onnx / "
                                                   "<ckpt stem>.predict.pt")
    p.add_argument("--raw", action="store_true",
                   help="ONNX: detection outputs the network's tensors, without decoding, thresholds and NMS")
    p.add_argument("--opset", type=int, metavar="N", help=f"ONNX opset, {MIN_OPSET} or newer (default: the exporter's)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare the written model with PyTorch before the file is written (default: on)")
    p.add_argument("--atol", type=float, default=1e-3, help="--check tolerance: atol + rtol * |pytorch|")
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--box-atol", type=float, default=1e-2, metavar="PX",
                   help="--check tolerance of detection boxes, in original pixels (default: 0.01)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    weights = Path(args.weights)
    if args.format == "predict":
        if args.raw or args.opset is not None:
            raise ValueError(f"{'--raw' if args.raw else '--opset'} goes with --format onnx, not --format predict")
        output = Path(args.output) if args.output else default_output(weights, "predict")
        return export_predict(weights, output, args.check)
    _require("onnx", "onnxscript", *(["onnxruntime"] if args.check else []))
    if args.opset is not None and args.opset < MIN_OPSET:
        # the exporter writes 18 and converts down; onnx 1.23 fails on these graphs (ReduceMean
        # axes) and the exporter then keeps 18 with a logged traceback
        raise ValueError(f"--opset {args.opset}: the dynamo exporter writes opset {MIN_OPSET} or newer")
    output = Path(args.output) if args.output else default_output(weights)
    task, model, meta = load_model(weights)
    check_output_path(output, weights)  # before the export's minutes: nothing of the user's is replaced
    bad = nonfinite_weights(model)
    if bad:
        raise ValueError(f"--weights {weights}: {len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]}); "
                         f"not exported, the model would only output NaN (export an earlier checkpoint, e.g. best.pt)")
    pre, channels = Preprocess.from_meta(meta), in_channels(model)
    detections = has_detections(model, task, args.raw)
    side = example_size(pre.size, coarsest_stride(model, task))
    example = torch.randn(2, channels, side, side)  # batch 2: the exporter specialises sizes 0 and 1
    print(f"export: {task} checkpoint {weights} -> {output} (traced at {list(example.shape)}"
          f"{', detections in the graph' if detections else ''})")
    with torch.no_grad():
        proto = export_onnx(model, task, example, args.opset, None if args.raw else pre)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if args.opset is not None and opset != args.opset:
        raise ValueError(f"--opset {args.opset}: the exporter could not convert to it and wrote opset {opset}")
    _check_dynamic(proto, output)
    _set_metadata(proto, metadata(task, meta, model, str(weights), args.raw), interface_doc())
    shapes = check_shapes(pre.size, channels)
    originals = check_images(pre) if detections and args.check else []

    def verify(tmp: Path) -> dict[str, float]:
        if not args.check:
            return {}
        try:
            diffs = check_onnx(tmp, model, task, shapes, atol=args.atol, rtol=args.rtol)
            if detections:
                diffs.update(check_detections(tmp, model, task, meta, originals, atol=args.atol, rtol=args.rtol,
                                              box_atol=args.box_atol))
            return diffs
        except ValueError as e:
            raise ValueError(f"--check failed, {output} not written (--no-check writes it unchecked): {e}") from None

    def save_checked(tmp: Path) -> dict[str, float]:
        import onnx

        onnx.save(proto, tmp)
        return verify(tmp)  # before the rename: a file that fails the check is never written

    diffs = write_atomic(output, save_checked)
    dims = lambda v: ", ".join(d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim)  # noqa: E731
    ins = ", ".join(f"{i.name} [{dims(i)}]" for i in proto.graph.input)
    outs = ", ".join(f"{o.name} [{dims(o)}]" for o in proto.graph.output)
    print(f"wrote {output} (opset {opset}, {output.stat().st_size / 2**20:.1f} MiB): {ins} -> {outs}")
    if args.check:
        tensors = {k: v for k, v in diffs.items() if k not in ("boxes_px", "scores", "detections")}
        if tensors:
            print(f"check (onnxruntime CPU vs PyTorch, inputs {[list(s) for s in shapes]}): max abs diff "
                  + ", ".join(f"{k} {v:.2e}" for k, v in tensors.items()))
        if detections:
            sizes = sorted({tuple(i.shape[:2]) for b in originals for i in b})
            print(f"check (onnxruntime CPU vs tasks.load().predict, {sum(map(len, originals))} images of original "
                  f"sizes {sizes}): the same {diffs['detections']} detections and labels, boxes within "
                  f"{diffs['boxes_px']:.2e} px, scores within {diffs['scores']:.2e}")
    return {"output": str(output), "task": task, "opset": opset, "outputs": [o.name for o in proto.graph.output],
            "inputs": [i.name for i in proto.graph.input], "max_abs_diff": diffs}


if __name__ == "__main__":
    run_cli(main)
