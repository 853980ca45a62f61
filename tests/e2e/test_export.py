"""python -m tasks.export: ONNX files that onnxruntime runs like PyTorch, at any batch and size."""
import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from torchvision.ops import batched_nms  # noqa: E402

from tasks import classify, detect, export, multitask, segment  # noqa: E402
from tasks.engine.checkpoint import CKPT_FORMAT, atomic_save  # noqa: E402
from tasks.engine.runner import run_cli  # noqa: E402
from tasks.engine.config import config_to_dict  # noqa: E402

NAMES = ["shirt", "boot", "bag"]
RGB = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _write_checkpoint(path, task, cfg, model, meta):
    """The keys ``Trainer.state_dict`` writes that inference reads."""
    atomic_save({"format": CKPT_FORMAT, "task": task, "config": config_to_dict(cfg), "model": model.state_dict(),
                 "ema": None, "epoch": 1, "metrics": {}, "meta": meta}, path)
    return path


def _classifier(path):
    cfg = classify.ClassifyConfig()  # the Fashion-MNIST shape: gray, cifar stem, 28 px
    cfg.model.in_chans, cfg.model.stem, cfg.model.num_classes = 1, "cifar", len(NAMES)
    meta = {"classes": NAMES, "mean": [0.286], "std": [0.353], "image_size": 28}
    return _write_checkpoint(path, "classify", cfg, classify.build_model(cfg, {"class_names": NAMES}), meta)


def _segmenter(path):
    cfg = segment.SegmentConfig()
    cfg.data.image_size = 64
    meta = {"class_names": ["background", *NAMES], **RGB, "image_size": 64}
    return _write_checkpoint(path, "segment", cfg, segment.build_model(cfg, {"class_names": ["background", *NAMES]}), meta)


def _detector(path):
    cfg = detect.DetectConfig()
    cfg.model.fpn_channels, cfg.model.num_convs, cfg.model.topk_candidates = 32, 1, 40  # top-k cuts levels
    cfg.data.image_size = 64
    model = detect.build_model(cfg, {"class_names": NAMES})
    # an untrained head scores every point alike (prior init); spread the scores and boxes so
    # that thresholds, top-k and NMS are not decided by float noise
    for conv in (model.head.cls_logits, model.head.centerness, model.head.bbox_reg):
        torch.nn.init.normal_(conv.weight, std=0.2)
    torch.nn.init.constant_(model.head.bbox_reg.bias, 1.0)
    meta = {"class_names": NAMES, "category_ids": [1, 5, 9], **RGB, "image_size": 64}
    return _write_checkpoint(path, "detect", cfg, model, meta)


MAKERS = {"classify": _classifier, "segment": _segmenter, "detect": _detector}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """task -> (checkpoint, main()'s result); each task exported (and checked) once."""
    root = tmp_path_factory.mktemp("export")
    cache = {}

    def get(task):
        if task not in cache:
            ckpt = MAKERS[task](root / f"{task}.pt")
            cache[task] = ckpt, export.main(["--weights", str(ckpt)])
        return cache[task]
    return get


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("task", ["classify", "segment", "detect"])
def test_export_writes_checked_onnx_with_metadata(exported, task, capsys):
    ckpt, result = exported(task)
    path = ckpt.with_suffix(".onnx")  # the default: beside the checkpoint
    assert result["output"] == str(path) and path.is_file()
    assert not list(path.parent.glob(".*tmp*")), "temp file left behind"
    # bbox_reg is exp(s * x): distances of many strides, where export's own check (1e-3 + 1e-3 *
    # |pytorch|) bounds the relative error; every other output is O(1)
    assert result["max_abs_diff"] and all(d < (1e-2 if k == "bbox_reg" else 1e-3)
                                          for k, d in result["max_abs_diff"].items()), result
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1 if task == "classify" else 3, "height", "width"]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["task"] == task
    assert json.loads(props["class_names"])[-len(NAMES):] == NAMES
    assert json.loads(props["mean"]) == ([0.286] if task == "classify" else RGB["mean"])
    assert json.loads(props["std"]) == ([0.353] if task == "classify" else RGB["std"])
    # these checkpoints predate meta["preprocess"]: the task's own policy fills it in
    pre = json.loads(props["preprocess"])
    assert pre["resize"] == ("crop" if task == "classify" else "longest") and pre["size"] == (28 if task == "classify" else 64)
    if task == "detect":
        assert json.loads(props["postprocess"])["topk_candidates"] == 40
        assert json.loads(props["category_ids"]) == [1, 5, 9]
        assert "sqrt(sigmoid(cls_logits)" in model.doc_string


@pytest.mark.parametrize("task, shape", [("classify", (3, 1, 44, 36)), ("segment", (3, 3, 96, 160)),
                                         ("detect", (3, 3, 128, 96)), ("segment", (1, 3, 97, 131)),
                                         ("detect", (1, 3, 97, 131))])
def test_onnxruntime_matches_pytorch_at_a_new_shape(exported, task, shape):
    """Neither the traced example's shape nor --check's: batch, height and width are free (odd
    sizes too: every resize inside is to a size)."""
    ckpt, result = exported(task)
    _, model, _ = export.load_model(ckpt)
    images = torch.randn(shape)
    expected = export.pytorch_outputs(model, task, images)
    got = _session(result["output"]).run(result["outputs"], {"images": images.numpy()})
    assert len(got) == len(expected) == len(result["outputs"])
    for name, g, e in zip(result["outputs"], got, expected):
        assert g.shape == tuple(e.shape), name
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-3, atol=1e-4, err_msg=name)
    if task == "segment":
        assert got[0].shape == (shape[0], len(NAMES) + 1, *shape[2:])  # logits at the input size


def _documented_postprocess(out, i, image_size, p):
    """The detector post-processing exactly as the module docstring / README state it (numpy),
    for image ``i`` of a batch of ONNX outputs; NMS through torchvision."""
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    score = np.sqrt(sigmoid(out["cls_logits"][i]) * sigmoid(out["centerness"][i])[:, None])  # [P, K]
    k = score.shape[1]
    strides, points = out["strides"], out["points"]
    edges = [0, *(np.flatnonzero(np.diff(strides)) + 1), len(strides)]  # levels: runs of one stride
    s, pt, lab = [], [], []
    for a, b in zip(edges[:-1], edges[1:]):
        flat = score[a:b].reshape(-1)
        top = np.argsort(-flat, kind="stable")[:p["topk_candidates"]]
        s.append(flat[top]), pt.append(a + top // k), lab.append(top % k)
    s, pt, lab = np.concatenate(s), np.concatenate(pt), np.concatenate(lab)
    ltrb = out["bbox_reg"][i][pt] * strides[pt][:, None]
    boxes = np.concatenate([points[pt] - ltrb[:, :2], points[pt] + ltrb[:, 2:]], axis=1)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, image_size[1])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, image_size[0])
    keep = (s > p["score_thresh"]) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    b, s, lab = (torch.from_numpy(np.ascontiguousarray(x[keep])) for x in (boxes, s, lab))
    kept = batched_nms(b, s, lab, p["nms_thresh"])[: p["detections_per_img"]]
    return {"boxes": b[kept], "scores": s[kept], "labels": lab[kept]}


def test_detector_postprocessed_onnx_outputs_equal_pytorch_boxes(exported):
    ckpt, result = exported("detect")
    _, model, _ = export.load_model(ckpt)
    params = json.loads({p.key: p.value for p in onnx.load(result["output"]).metadata_props}["postprocess"])
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = model(images)  # eval mode: the post-processed detections
    raw = dict(zip(result["outputs"], _session(result["output"]).run(result["outputs"], {"images": images.numpy()})))
    by_head = export.postprocess_detections(model.head, raw, (96, 128))
    for i, want in enumerate(expected):
        assert 0 < len(want["boxes"]) <= params["detections_per_img"]
        for got in (_documented_postprocess(raw, i, (96, 128), params), by_head[i]):
            assert torch.equal(got["labels"].long(), want["labels"])
            torch.testing.assert_close(got["boxes"], want["boxes"], rtol=0, atol=1e-3)
            torch.testing.assert_close(got["scores"], want["scores"], rtol=0, atol=1e-4)


@pytest.mark.slow  # a fourth export (~30 s on 2 cores)
def test_multitask_exports_every_head(tmp_path):
    cfg = multitask.MultiTaskConfig()
    cfg.model.fpn_channels, cfg.model.num_convs = 32, 1
    cfg.data.image_size = 64
    ckpt = _write_checkpoint(tmp_path / "mt.pt", "multitask", cfg, multitask.build_model(cfg, {"class_names": NAMES}),
                             {"class_names": NAMES, **RGB, "image_size": 64})
    result = export.main(["--weights", str(ckpt)])
    assert result["outputs"] == ["classify_probs", *(f"detect_{k}" for k in export.DETECTION_OUTPUTS),
                                 "segment_logits"]
    assert all(d < 1e-3 for d in result["max_abs_diff"].values()), result


def test_check_fails_beyond_tolerance(exported):
    ckpt, result = exported("classify")
    _, model, _ = export.load_model(ckpt)
    with pytest.raises(ValueError, match=r"output logits differs from PyTorch by up to .* at input \[1, 1, 28, 28\]"):
        export.check_onnx(result["output"], model, "classify", [(1, 1, 28, 28)], atol=0.0, rtol=0.0)


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: export.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_weights_give_one_line_errors(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert f"--weights {missing}: no such file" in _cli_error(["--weights", str(missing)], capsys)
    junk = tmp_path / "junk.pt"
    torch.save({"state": torch.zeros(1)}, junk)  # readable, but no onetrunk checkpoint
    assert "not an onetrunk checkpoint" in _cli_error(["--weights", str(junk)], capsys)
    assert not junk.with_suffix(".onnx").exists()


def test_missing_onnxruntime_names_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # import raises ImportError
    err = _cli_error(["--weights", str(tmp_path / "any.pt")], capsys)
    assert "onnxruntime" in err and "pip install 'onetrunk[export]'" in err
