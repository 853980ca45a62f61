"""python -m tasks.export: ONNX files that onnxruntime runs like PyTorch, at any batch and size
(detections in original pixels, from onnxruntime alone), and predict-only checkpoints."""
import json
from functools import partial

import cv2
import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from torchvision.ops import batched_nms  # noqa: E402

import tasks  # noqa: E402
from tasks import classify, detect, export, multitask, segment  # noqa: E402
from tasks.engine.checkpoint import CKPT_FORMAT, atomic_save  # noqa: E402
from tasks.engine.predict import Predictor  # noqa: E402
from tasks.engine.registry import TASKS  # noqa: E402
from tasks.engine.runner import run_cli  # noqa: E402
from tasks.engine.config import config_to_dict  # noqa: E402
from tests.fakes import task_meta, tiny_scenes_args, write_task_checkpoint  # noqa: E402

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


def _detector_model(topk: int = 40, reg_activation: str = "auto"):
    cfg = detect.DetectConfig()
    cfg.model.reg_activation = reg_activation
    cfg.model.fpn_channels, cfg.model.num_convs, cfg.model.topk_candidates = 32, 1, topk  # top-k cuts levels
    cfg.data.image_size = 64
    torch.manual_seed(0)
    model = detect.build_model(cfg, {"class_names": NAMES})
    # an untrained head scores every point alike (prior init); spread the scores and boxes so
    # that thresholds, top-k and NMS are not decided by float noise
    for conv in (model.head.cls_logits, model.head.centerness, model.head.bbox_reg):
        torch.nn.init.normal_(conv.weight, std=0.2)
    torch.nn.init.constant_(model.head.bbox_reg.bias, 1.0)
    return cfg, model.eval()


def _detector(path, reg_activation: str = "auto"):
    cfg, model = _detector_model(reg_activation=reg_activation)
    meta = {"class_names": NAMES, "category_ids": [1, 5, 9], **RGB, "image_size": 64}
    return _write_checkpoint(path, "detect", cfg, model, meta)


def _originals(gray: int | None = None):
    """Originals of non-square sizes that the 64 px detector resizes, in batches of one padded
    shape: landscape ones shrunk to 29 x 64 (padded 32 x 64), portrait ones enlarged to 64 x 36
    or 37 (padded 64 x 64). Smoothed noise (edges and blobs at several scales), and in the
    first batch a blank image of ``gray`` (default: ``BLANK``, ``_calibrated_detector``'s)."""
    rng = np.random.default_rng(0)

    def image(h, w):
        noise = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
        return cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    gray = BLANK.get("gray", 128) if gray is None else gray
    return [[image(45, 100), image(50, 110), np.full((47, 103, 3), gray, np.uint8)], [image(40, 23), image(37, 21)]]


BLANK: dict[str, int] = {}


def _calibrated_detector(path):
    """The detector with ``score_thresh`` just above the best score of a blank image (the gray
    level whose best score is lowest), far below every other image of ``_originals``' best:
    the blank image has no detections, each other one some, whatever the float rounding."""
    cfg, model = _detector_model()
    meta = task_meta("detect", cfg)
    model.head.score_thresh = 0.0
    predictor = Predictor(TASKS["detect"], model, meta, "cpu")

    def best(images):
        return [float(r["scores"].max()) for r in predictor.predict(images)]
    levels = dict(zip(range(0, 256, 15), best([np.full((47, 103, 3), v, np.uint8) for v in range(0, 256, 15)])))
    BLANK["gray"] = min(levels, key=levels.get)
    thresh = levels[BLANK["gray"]] + 0.01
    originals = _originals()
    others = best(originals[0][:2] + originals[1])
    assert min(others) > thresh + 0.02, f"no score threshold leaves a blank image empty: {levels}, {others}"
    cfg.model.score_thresh = model.head.score_thresh = round(thresh, 6)
    return _write_checkpoint(path, "detect", cfg, model, meta)


MAKERS = {"classify": _classifier, "segment": _segmenter, "detect_raw": _detector, "detect": _calibrated_detector,
          # the box head of a long run (model.reg_activation=auto from 2,500 steps)
          "detect_raw_softplus": partial(_detector, reg_activation="softplus")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (checkpoint, main()'s result); each exported (and checked) once. ``detect``: the
    detections in the graph; ``detect_raw``: ``--raw``, the network only."""
    root = tmp_path_factory.mktemp("export")
    cache = {}

    def get(name):
        if name not in cache:
            ckpt = MAKERS[name](root / f"{name}.pt")
            cache[name] = ckpt, export.main(["--weights", str(ckpt)] + (["--raw"] if name.startswith("detect_raw") else []))
        return cache[name]
    return get


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# the detector's exports take 15-25 s each on 2 cores (torch.export of the FPN and head): the
# network-only one (--raw) is in the slow tier, the deployed one (detections in the graph) is not
SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", ["classify", "segment", "detect",
                                  pytest.param("detect_raw", marks=SLOW)])
def test_export_writes_checked_onnx_with_metadata(exported, name, capsys):
    ckpt, result = exported(name)
    task = name.removesuffix("_raw")
    path = ckpt.with_suffix(".onnx")  # the default: beside the checkpoint
    assert result["output"] == str(path) and path.is_file()
    assert not list(path.parent.glob(".*tmp*")), "temp file left behind"
    diffs = dict(result["max_abs_diff"])
    if name == "detect":  # the check compared detections with tasks.load().predict's
        assert diffs.pop("detections") > 0 and diffs.pop("boxes_px") < 1e-3 and diffs.pop("scores") < 1e-3, result
        assert result["inputs"] == ["images", "orig_sizes"] and result["outputs"] == list(export.DETECTIONS)
    # bbox_reg is exp(s * x): distances of many strides, where export's own check (1e-3 + 1e-3 *
    # |pytorch|) bounds the relative error; every other output is O(1)
    assert diffs or name == "detect"
    assert all(d < (1e-2 if k == "bbox_reg" else 1e-3) for k, d in diffs.items()), result
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1 if task == "classify" else 3, "height", "width"]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["task"] == task
    assert json.loads(props["class_names"])[-len(NAMES):] == NAMES
    assert json.loads(props["mean"]) == ([0.286] if task == "classify" else RGB["mean"])
    assert json.loads(props["std"]) == ([0.353] if task == "classify" else RGB["std"])
    # these checkpoints predate meta["preprocess"] (but "detect"): the task's own policy fills it in
    pre = json.loads(props["preprocess"])
    assert pre["resize"] == ("crop" if task == "classify" else "longest") and pre["size"] == (28 if task == "classify" else 64)
    if task == "detect":
        post = json.loads(props["postprocess"])
        assert post["topk_candidates"] == 40 and post["in_graph"] == (name == "detect")
        assert post["score_thresh"] == torch.load(ckpt, weights_only=True)["config"]["model"]["score_thresh"]
        assert json.loads(props["category_ids"]) == [1, 5, 9]
        assert "sqrt(sigmoid(cls_logits)" in model.doc_string and "orig_sizes" in model.doc_string
        assert ("orig_sizes" in props["input"]) == (name == "detect")


@pytest.mark.parametrize("name, shape", [("classify", (3, 1, 44, 36)), ("segment", (3, 3, 96, 160)),
                                         pytest.param("detect_raw", (3, 3, 128, 96), marks=SLOW),
                                         ("segment", (1, 3, 97, 131)),
                                         pytest.param("detect_raw", (1, 3, 97, 131), marks=SLOW)])
def test_onnxruntime_matches_pytorch_at_a_new_shape(exported, name, shape):
    """Neither the traced example's shape nor --check's: batch, height and width are free (odd
    sizes too: every resize inside is to a size)."""
    ckpt, result = exported(name)
    task = name.removesuffix("_raw")
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


@pytest.mark.parametrize("name", [pytest.param("detect_raw", marks=SLOW), "detect_raw_softplus"])
def test_detector_postprocessed_onnx_outputs_equal_pytorch_boxes(exported, name):
    """--raw: the network's tensors, post-processed outside the graph as documented (both box
    heads a run can train: exp, softplus)."""
    ckpt, result = exported(name)
    _, model, _ = export.load_model(ckpt)
    assert model.head.reg_activation == ("softplus" if name.endswith("softplus") else "exp")
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


def _deployed_inputs(originals, props):
    """The ONNX inputs a deployment makes from the metadata alone (numpy and OpenCV, no
    PyTorch): each image's longer side resized to ``size`` (area interpolation shrinking,
    bilinear enlarging), the batch padded bottom / right to ``size_divisible``, normalised."""
    pre = json.loads(props["preprocess"])
    mean, std = (np.array(json.loads(props[k]), np.float32) for k in ("mean", "std"))
    resized = []
    for image in originals:
        h, w = image.shape[:2]
        scale = pre["size"] / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        shrink = nh * nw < h * w
        resized.append(cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR))
    d = pre["size_divisible"]
    height, width = (-(-max(r.shape[i] for r in resized) // d) * d for i in (0, 1))
    batch = np.zeros((len(resized), height, width, 3), np.uint8)
    for i, r in enumerate(resized):
        batch[i, :r.shape[0], :r.shape[1]] = r
    images = ((batch.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2)
    return {"images": np.ascontiguousarray(images), "orig_sizes": np.array([i.shape[:2] for i in originals], np.int64)}


def test_onnxruntime_alone_gives_the_predictors_detections_in_original_pixels(exported):
    """Non-square originals, shrunk and enlarged: onnxruntime on the metadata's preprocessing
    gives tasks.load(ckpt).predict's detections (the same number and labels, boxes within 0.01
    original pixels); images in a batch with an image that has none."""
    ckpt, result = exported("detect")
    props = {p.key: p.value for p in onnx.load(result["output"]).metadata_props}
    session = _session(result["output"])
    predictor = tasks.load(ckpt, device="cpu")
    counts, worst = [], 0.0
    for originals in _originals():
        boxes, scores, labels, num = session.run(list(export.DETECTIONS), _deployed_inputs(originals, props))
        d = json.loads(props["postprocess"])["detections_per_img"]
        assert boxes.shape == (len(originals), d, 4) and labels.dtype == np.int64 and num.dtype == np.int64
        for i, (image, want) in enumerate(zip(originals, predictor.predict(originals))):
            n = int(num[i])
            counts.append(n)
            assert n == len(want["labels"]) and np.array_equal(labels[i, :n], want["labels"].numpy())
            np.testing.assert_allclose(boxes[i, :n], want["boxes"].numpy(), rtol=0, atol=1e-2)
            np.testing.assert_allclose(scores[i, :n], want["scores"].numpy(), rtol=1e-3, atol=1e-4)
            worst = max(worst, float(np.abs(boxes[i, :n] - want["boxes"].numpy()).max()) if n else 0.0)
            h, w = image.shape[:2]
            assert (boxes[i, :n, 0::2] <= w).all() and (boxes[i, :n, 1::2] <= h).all()  # original pixels
            assert (labels[i, n:] == -1).all() and not boxes[i, n:].any() and not scores[i, n:].any()  # padding
    # the calibrated threshold: the blank image (third) has no detections, batched with images that have some
    assert counts[2] == 0 and min(counts[:2] + counts[3:]) > 0, counts
    print(f"max box difference {worst:.2e} px over {sum(counts)} detections")


def test_an_image_without_detections_in_a_batch_and_the_check_compares_detections(exported):
    """Zero detections next to detections in one batch; and check_detections names an image
    whose detections differ from PyTorch's (a file failing it is not written)."""
    ckpt, result = exported("detect")
    _, model, meta = export.load_model(ckpt)
    batches = _originals()
    same = export.check_detections(result["output"], model, "detect", meta, batches)
    assert same["detections"] > 0 and same["boxes_px"] < 1e-3
    props = {p.key: p.value for p in onnx.load(result["output"]).metadata_props}
    nums = [_session(result["output"]).run(["num_detections"], _deployed_inputs(b, props))[0] for b in batches]
    assert any(0 in n and n.max() > 0 for n in nums), nums
    model.head.nms_thresh = 0.99  # PyTorch now keeps more boxes than the graph
    with pytest.raises(ValueError, match=r"image \d of input .*: \d+ detections from onnxruntime, \d+ from PyTorch"):
        export.check_detections(result["output"], model, "detect", meta, batches)


def test_graph_detections_in_pytorch_equal_the_predictors(exported):
    """ExportModule runs in PyTorch too (class_nms's eager form): the same detections."""
    ckpt, _ = exported("detect")
    _, model, meta = export.load_model(ckpt)
    module = export.ExportModule(model, "detect", Predictor(TASKS["detect"], model, meta, "cpu").preprocess)
    props = {"preprocess": json.dumps(meta["preprocess"]), "mean": json.dumps(meta["mean"]),
             "std": json.dumps(meta["std"])}
    originals = _originals()[0]
    feed = {k: torch.from_numpy(v) for k, v in _deployed_inputs(originals, props).items()}
    with torch.no_grad():
        boxes, scores, labels, num = module(feed["images"], feed["orig_sizes"])
    for i, want in enumerate(tasks.load(ckpt, device="cpu").predict(originals)):
        n = int(num[i])
        assert n == len(want["labels"]) and torch.equal(labels[i, :n], want["labels"])
        torch.testing.assert_close(boxes[i, :n], want["boxes"], rtol=0, atol=1e-4)


@pytest.mark.slow  # a fourth export (~30 s on 2 cores)
def test_multitask_exports_every_head(tmp_path):
    cfg = multitask.MultiTaskConfig()
    cfg.model.fpn_channels, cfg.model.num_convs = 32, 1
    cfg.data.image_size = 64
    ckpt = _write_checkpoint(tmp_path / "mt.pt", "multitask", cfg, multitask.build_model(cfg, {"class_names": NAMES}),
                             {"class_names": NAMES, **RGB, "image_size": 64})
    result = export.main(["--weights", str(ckpt)])
    assert result["inputs"] == ["images", "orig_sizes"]
    assert result["outputs"] == ["classify_probs", *(f"detect_{k}" for k in export.DETECTIONS), "segment_logits"]
    diffs = dict(result["max_abs_diff"])
    assert diffs.pop("detections") > 0 and diffs.pop("boxes_px") < 1e-3, result  # against tasks.load().predict
    assert set(diffs) == {"classify_probs", "segment_logits", "scores"} and all(d < 1e-3 for d in diffs.values())


def test_check_fails_beyond_tolerance(exported):
    ckpt, result = exported("classify")
    _, model, _ = export.load_model(ckpt)
    with pytest.raises(ValueError, match=r"output logits differs from PyTorch by up to .* at input \[1, 1, 28, 28\]"):
        export.check_onnx(result["output"], model, "classify", [(1, 1, 28, 28)], atol=0.0, rtol=0.0)


def _run_error(main, argv, capsys) -> str:
    """``main(argv)`` as the command line runs it: exit 2, one ``error:`` line, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def _cli_error(argv, capsys) -> str:
    return _run_error(export.main, argv, capsys)


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


# ---------------------------------------------------------------- predict-only checkpoints

TINY_DETECT = ["--device", "cpu", "--quiet", "--batch-size", "4", "--config", "configs/detect/scenes_quick.yaml",
               "--set", "model.fpn_channels=32", "--set", "model.num_convs=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch detection run on tiny FashionScenes: (best.pt, its run's data flags)."""
    root = tmp_path_factory.mktemp("trained")
    data = TINY_DETECT + tiny_scenes_args(root / "data")
    detect.main(data + ["--epochs", "1", "--output", str(root / "run")])
    return root / "run" / "best.pt", data


def test_predict_only_checkpoint_is_small_and_predicts_like_the_training_one(trained, tmp_path):
    best, _ = trained
    result = export.main(["--weights", str(best), "--format", "predict", "--output", str(tmp_path / "share.pt")])
    small = tmp_path / "share.pt"
    assert result["output"] == str(small) and small.stat().st_size < 0.35 * best.stat().st_size, result
    ckpt = torch.load(small, weights_only=True)
    assert ckpt["predict_only"] and ckpt["ema"] is None
    assert not {"optimizer", "scheduler", "grad_scaler", "rng", "ema_steps"} & set(ckpt), sorted(ckpt)
    for key, t in ckpt["model"].items():  # float16 but the BatchNorm statistics; counters stay int64
        want = torch.float32 if key.endswith(("running_mean", "running_var")) else \
            torch.float16 if t.is_floating_point() or "num_batches" not in key else torch.int64
        assert t.dtype == want, (key, t.dtype)
    full, half = tasks.load(best, device="cpu"), tasks.load(small, device="cpu")
    assert {p.dtype for p in half.model.parameters()} == {torch.float32}  # computes in float32
    assert half.meta == full.meta
    originals = _originals()
    images = originals[0][:2] + originals[1]  # not the blank one
    for want, got in zip(full.predict(images), half.predict(images)):
        assert len(got["labels"]) > 0 and len(want["labels"]) > 0
        # the best detection: its weights rounded to float16 move it by a hundredth of a pixel
        assert got["labels"][0] == want["labels"][0]
        torch.testing.assert_close(got["boxes"][0], want["boxes"][0], rtol=0, atol=0.1)
        torch.testing.assert_close(got["scores"][0], want["scores"][0], rtol=0, atol=1e-2)
    assert all(d < 1e-2 for d in result["max_abs_diff"].values()), result  # the check: outputs within 1e-2


def test_predict_only_checkpoint_serves_predict_and_refuses_resume(trained, tmp_path, capsys):
    best, data = trained
    small = tmp_path / "best.predict.pt"
    export.main(["--weights", str(best), "--format", "predict", "--output", str(small)])
    image = tmp_path / "scene.png"
    cv2.imwrite(str(image), _originals()[0][0])
    detect.main(["--device", "cpu", "--quiet", "--predict", str(image), "--weights", str(small),
                 "--output", str(tmp_path / "pred")])
    entry = json.loads(next((tmp_path / "pred").rglob("scene.json")).read_text())  # the image's result file
    assert entry["width"] == 100
    assert len(entry["detections"]) == len(tasks.load(small, device="cpu").predict(str(image))[0]["labels"])
    line = _run_error(detect.main, data + ["--resume", str(small), "--epochs", "2", "--output", str(tmp_path / "r")],
                      capsys)
    assert f"--resume {small}: predict-only checkpoint: no optimizer state" in line, line
    assert not (tmp_path / "r" / "last.pt").exists()


def test_predict_only_output_never_replaces_a_checkpoint(tmp_path, capsys):
    ckpt = write_task_checkpoint(tmp_path / "best.pt", "classify")
    last = write_task_checkpoint(tmp_path / "last.pt", "classify", seed=1)
    before, other = ckpt.read_bytes(), last.read_bytes()
    line = _run_error(export.main, ["--weights", str(ckpt), "--format", "predict", "--output", str(ckpt)], capsys)
    assert "is the input checkpoint" in line and ckpt.read_bytes() == before
    line = _run_error(export.main, ["--weights", str(ckpt), "--format", "predict", "--output", str(last)], capsys)
    assert f"--output {last} exists and is not a predict-only checkpoint" in line and last.read_bytes() == other
    first = export.main(["--weights", str(ckpt), "--format", "predict", "--no-check"])
    assert first["output"] == str(tmp_path / "best.predict.pt")
    again = export.main(["--weights", str(ckpt), "--format", "predict"])  # its own earlier file: replaced
    assert again["output"] == first["output"] and not list(tmp_path.glob(".*tmp*"))
    line = _run_error(export.main, ["--weights", str(ckpt), "--format", "predict", "--raw"], capsys)
    assert "--raw goes with --format onnx" in line
