"""Export a trained model to ONNX, checked against PyTorch with onnxruntime.

Usage:
    python -m tasks.export --weights runs/classify/<run>/best.pt          # -> runs/classify/<run>/best.onnx
    python -m tasks.export --weights runs/detect/<run>/best.pt --output fcos.onnx --opset 18
    python -m tasks.export --weights runs/segment/<run>/best.pt --no-check

A checkpoint of any registered task (``tasks.TASKS``: classify, detect, segment, multitask)
is rebuilt through its ``TaskSpec.build_model`` and exported with the dynamo exporter
(``torch.onnx.export(dynamo=True)``). Batch, height and width are dynamic.

Input ``images``: float32 ``[batch, C, height, width]``, already preprocessed the way the task
preprocesses (``tasks.data.preprocess.Preprocess``): resized per ``preprocess``, RGB (or gray)
/ 255, then ``(x - mean) / std`` per channel. ``mean``, ``std``, ``in_chans``, ``preprocess``
(resize mode, size, crop_pct, size_divisible), ``class_names``, ``task`` and ``image_size``
are in the ONNX ``metadata_props``. Any height and width the PyTorch model takes work (every
resize inside is *to a size*); detection and segmentation were trained and are checked at
multiples of 32, which is what to feed them.

Outputs, per task:
    classify   ``logits [batch, K]`` (softmax is the caller's)
    segment    ``logits [batch, K, height, width]`` at the input size (argmax is the caller's)
    detect     the network only: ``cls_logits [batch, P, K]``, ``bbox_reg [batch, P, 4]`` (l, t, r, b
               >= 0 in units of the point's stride), ``centerness [batch, P]`` (logits),
               ``points [P, 2]`` (x, y pixel centres of the cells) and ``strides [P]``; P runs
               over the FPN levels fine to coarse, each level row-major.
    multitask  ``classify_probs [batch, K]`` (sigmoids), the detection outputs prefixed
               ``detect_``, ``segment_logits [batch, K+1, height, width]``.

Detector post-processing (outside the graph; ``FCOSHead.postprocess``, thresholds in the
ONNX metadata ``postprocess``), per image:
    1. ``score = sqrt(sigmoid(cls_logits) * sigmoid(centerness)[:, None])``  ``[P, K]``.
    2. Per FPN level (the runs of equal ``strides``), keep the ``topk_candidates`` highest
       (point, class) scores of that level; then drop scores <= ``score_thresh``.
    3. Decode each kept point: ``(x - l*s, y - t*s, x + r*s, y + b*s)`` with ``(x, y) = points``,
       ``s = strides`` and ``(l, t, r, b) = bbox_reg``; clip to ``[0, width] x [0, height]``
       of the network input and drop boxes with ``x2 <= x1`` or ``y2 <= y1``.
    4. Class-wise NMS at IoU ``nms_thresh`` (``torchvision.ops.batched_nms``), keep the
       ``detections_per_img`` highest scores. Labels are class indices in ``[0, K)``
       (``class_names``; the COCO ids are ``category_ids``). Boxes are in input pixels: undo
       the pre-processing (``preprocess`` "longest": the longer side resized to ``size``, the
       batch padded bottom / right, so divide by the resize factor).
    ``postprocess_detections`` does exactly this for onnxruntime outputs.

``--check`` (default) runs onnxruntime (CPU) at two shapes (batch 2 at the training size,
batch 1 at a larger, non-square size) and compares every output with the PyTorch model in
eval mode, float32; a difference above ``--atol + --rtol * |pytorch|`` fails and the file is
not written.

Nothing of the user's is replaced: ``--output`` may not be the checkpoint itself (also through
a symbolic or hard link), a folder, or an existing file that is not an ONNX model; a checkpoint
whose weights hold NaN or inf is refused (an ONNX file of it would only ever output NaN).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from heads import FCOSHead, MultiLabelHead, MultiTaskModel
from heads.geometry import split_levels
from tasks.data.preprocess import Preprocess
from tasks.engine.checkpoint import write_atomic
from tasks.engine.predict import load_task_model
from tasks.engine.runner import prog_name, run_cli

__all__ = ["ExportModule", "load_model", "export_onnx", "check_onnx", "check_output_path", "nonfinite_weights",
           "postprocess_detections", "main"]

INSTALL_HINT = "pip install 'onetrunk[export]' (in a checkout: pip install -e '.[export]')"
DETECTION_OUTPUTS = ("cls_logits", "bbox_reg", "centerness", "points", "strides")
DYNAMIC_DIMS = {0: "batch", 2: "height", 3: "width"}
MIN_OPSET = 18


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


def check_output_path(output: Path, weights: Path) -> None:
    """Refuse an ``--output`` whose writing would destroy something: the input checkpoint (also
    through a link), a folder, or an existing file that is not an ONNX model."""
    if _same_file(output, weights):
        raise ValueError(f"--output {output} is the input checkpoint --weights {weights}: exporting would replace "
                         f"it; choose another --output (the default is {weights.with_suffix('.onnx')})"
                         if weights.suffix != ".onnx" else
                         f"--output {output} is the input checkpoint --weights {weights}: exporting would replace "
                         f"it; pass --output with another name")
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder: pass a file name, e.g. "
                         f"{output / weights.with_suffix('.onnx').name}")
    if output.exists() and not _is_onnx_file(output):
        raise FileExistsError(f"--output {output} exists and is not an ONNX model: exporting would replace it; "
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
    """The exported detector outputs (``DETECTION_OUTPUTS``) of the head's per-level raw outputs:
    flattened over the levels, with the points and strides of its grid."""
    cls_logits, bbox_reg, centerness, grid = head.flat_outputs(raw)
    return [cls_logits, bbox_reg, centerness, grid.points, grid.strides]


def head_output_names(head: nn.Module) -> list[str]:
    if isinstance(head, FCOSHead):
        return list(DETECTION_OUTPUTS)
    return ["probs" if isinstance(head, MultiLabelHead) else "logits"]


def output_names(model: nn.Module, task: str) -> list[str]:
    heads = task_heads(model, task)
    prefix = len(heads) > 1
    return [f"{name}_{out}" if prefix else out for name, head in heads.items() for out in head_output_names(head)]


class ExportModule(nn.Module):
    """The trunk and every head of ``model``, returning a flat tuple of tensors (ONNX outputs
    are positional): each head's post-processed output, except detection, whose graph stops at
    the raw network tensors (top-k, thresholds and NMS have data-dependent shapes)."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.heads = nn.ModuleDict(task_heads(model, task))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image_size = (images.shape[-2], images.shape[-1])
        features = self.backbone(images)
        outputs: list[torch.Tensor] = []
        for head in self.heads.values():
            raw = head(features, image_size)
            if isinstance(head, FCOSHead):
                outputs += detection_outputs(head, raw)
            else:
                outputs.append(head.postprocess(raw, image_size))
        return tuple(outputs)


@torch.no_grad()
def pytorch_outputs(model: nn.Module, task: str, images: torch.Tensor) -> list[torch.Tensor]:
    """The reference for ``--check``, in the ONNX output order: eval-mode ``model(images)`` for
    classification and segmentation, the head's raw tensors for detection."""
    heads = task_heads(model, task)
    evaluated = model(images) if any(not isinstance(h, FCOSHead) for h in heads.values()) else None
    outputs: list[torch.Tensor] = []
    for name, head in heads.items():
        if isinstance(head, FCOSHead):
            outputs += detection_outputs(head, head(model.backbone(images), (images.shape[-2], images.shape[-1])))
        else:
            outputs.append(evaluated[name] if isinstance(model, MultiTaskModel) else evaluated)
    return outputs


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


def export_onnx(model: nn.Module, task: str, example: torch.Tensor, opset: int | None = None):
    """An ``onnx.ModelProto`` of ``ExportModule(model, task)`` with dynamic batch, height, width."""
    module = ExportModule(model, task).eval()
    names = output_names(model, task)
    # The dynamo exporter (torch.export + onnxscript) keeps H and W symbolic through the FPN and
    # FCN resizes (both resize *to a size*, and FCNHead takes the size through torch.sym_int,
    # which does not specialise); named string dims become Dim.DYNAMIC and name the ONNX dims.
    # The TorchScript exporter (dynamo=False) was not needed. Were a later version to fall back
    # to static shapes, _check_dynamic and --check say so.
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"], output_names=names,
                                dynamic_shapes={"images": dict(DYNAMIC_DIMS)}, opset_version=opset,
                                verbose=False)
    proto = program.model_proto
    _name_point_dims(proto)
    return proto


def metadata(task: str, meta: Mapping[str, Any], model: nn.Module, path: str) -> dict[str, str]:
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
    if meta.get("category_ids") is not None:
        props["category_ids"] = meta["category_ids"]
    for head in task_heads(model, task).values():
        if isinstance(head, FCOSHead):
            props["postprocess"] = {"score_thresh": head.score_thresh, "nms_thresh": head.nms_thresh,
                                    "topk_candidates": head.topk_candidates,
                                    "detections_per_img": head.detections_per_img}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items() if v is not None}


def interface_doc() -> str:
    """The input / outputs / post-processing part of this module's docstring (the ONNX doc_string)."""
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


def check_onnx(path: str | os.PathLike, model: nn.Module, task: str, shapes: Sequence[tuple[int, ...]],
               atol: float = 1e-3, rtol: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Run ``path`` with onnxruntime (CPU) on random inputs of ``shapes`` and compare with the
    PyTorch model in float32. Returns the max abs difference per output (over all shapes);
    raises ``ValueError`` naming the output and the input shape when an element is off by more
    than ``atol + rtol * |pytorch|``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors reach the caller as exceptions; no duplicate log lines
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    generator = torch.Generator().manual_seed(seed)
    worst = dict.fromkeys(names, 0.0)
    for shape in shapes:
        images = torch.randn(shape, generator=generator)
        expected = pytorch_outputs(model, task, images)
        for name, e in zip(names, expected):
            # equal_nan below would let NaN pass as "equal": a model that outputs NaN is broken
            if e.is_floating_point() and not bool(torch.isfinite(e).all()):
                raise ValueError(f"output {name} of the PyTorch model holds NaN or inf at input {list(shape)}")
        try:
            got = session.run(names, {"images": images.numpy()})
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"onnxruntime failed at input {list(shape)}: {str(e).splitlines()[0]}") from None
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


# ----------------------------------------------------------------------------- entry points

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog_name("python -m tasks.export"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, metavar="CKPT", help="a checkpoint of any task (best.pt, last.pt)")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--output", metavar="FILE", help="default: beside the checkpoint, <ckpt stem>.onnx")
    p.add_argument("--opset", type=int, metavar="N", help=f"ONNX opset, {MIN_OPSET} or newer (default: the exporter's)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare onnxruntime with PyTorch at two shapes before writing (default: on)")
    p.add_argument("--atol", type=float, default=1e-3, help="--check tolerance: atol + rtol * |pytorch|")
    p.add_argument("--rtol", type=float, default=1e-3)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    _require("onnx", "onnxscript", *(["onnxruntime"] if args.check else []))
    if args.opset is not None and args.opset < MIN_OPSET:
        # the exporter writes 18 and converts down; onnx 1.23 fails on these graphs (ReduceMean
        # axes) and the exporter then keeps 18 with a logged traceback
        raise ValueError(f"--opset {args.opset}: the dynamo exporter writes opset {MIN_OPSET} or newer")
    weights = Path(args.weights)
    output = Path(args.output) if args.output else weights.with_suffix(".onnx")
    task, model, meta = load_model(weights)
    check_output_path(output, weights)  # before the export's minutes: nothing of the user's is replaced
    bad = nonfinite_weights(model)
    if bad:
        raise ValueError(f"--weights {weights}: {len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]}); "
                         f"not exported, the model would only output NaN (export an earlier checkpoint, e.g. best.pt)")
    size, channels = Preprocess.from_meta(meta).size, in_channels(model)
    side = example_size(size, coarsest_stride(model, task))
    example = torch.randn(2, channels, side, side)  # batch 2: the exporter specialises sizes 0 and 1
    print(f"export: {task} checkpoint {weights} -> {output} (traced at {list(example.shape)})")
    with torch.no_grad():
        proto = export_onnx(model, task, example, args.opset)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if args.opset is not None and opset != args.opset:
        raise ValueError(f"--opset {args.opset}: the exporter could not convert to it and wrote opset {opset}")
    _check_dynamic(proto, output)
    _set_metadata(proto, metadata(task, meta, model, str(weights)), interface_doc())
    shapes = check_shapes(size, channels)

    def verify(tmp: Path) -> dict[str, float]:
        if not args.check:
            return {}
        try:
            return check_onnx(tmp, model, task, shapes, atol=args.atol, rtol=args.rtol)
        except ValueError as e:
            raise ValueError(f"--check failed, {output} not written (--no-check writes it unchecked): {e}") from None

    def save_checked(tmp: Path) -> dict[str, float]:
        import onnx

        onnx.save(proto, tmp)
        return verify(tmp)  # before the rename: a file that fails the check is never written

    diffs = write_atomic(output, save_checked)
    outs = ", ".join(f"{o.name} [{', '.join(d.dim_param or str(d.dim_value) for d in o.type.tensor_type.shape.dim)}]"
                     for o in proto.graph.output)
    print(f"wrote {output} (opset {opset}, {output.stat().st_size / 2**20:.1f} MiB): images "
          f"[batch, {channels}, height, width] -> {outs}")
    if args.check:
        print(f"check (onnxruntime CPU vs PyTorch, inputs {[list(s) for s in shapes]}): max abs diff "
              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return {"output": str(output), "task": task, "opset": opset, "outputs": [o.name for o in proto.graph.output],
            "max_abs_diff": diffs}


if __name__ == "__main__":
    run_cli(main)
