"""One trunk for three tasks: joint training, merged inference, trunk transfer."""
import copy
import json

import cv2
import numpy as np
import pytest
import torch

from backbones import build_backbone, resnet18
from heads import ClassificationHead, Detector, FCNHead, FCOSHead, MultiLabelHead, MultiTaskModel, Segmenter
from tasks import detect, multitask, segment
from tasks.engine.checkpoint import load_checkpoint
from tasks.engine.metrics import multilabel_metrics
from tests.fakes import tiny_scenes_args

CPU = ["--device", "cpu", "--quiet", "--batch-size", "4"]


@pytest.fixture(scope="module")
def data_args(tmp_path_factory):
    return tiny_scenes_args(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def joint_run(data_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("mt") / "run"
    metrics = multitask.main(CPU + data_args + ["--config", "configs/multitask/scenes_quick.yaml", "--epochs", "2",
                                                "--set", "model.fpn_channels=32", "--set", "model.num_convs=1",
                                                "--output", str(out)])
    return out, metrics


def test_joint_training_learns_all_three_tasks(joint_run):
    out, metrics = joint_run
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "curves.png", "multitask.png"):
        assert (out / name).is_file(), name
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["train_loss"] < records[0]["train_loss"]
    keys = {"train_loss_classify_bce", "train_loss_detect_classification", "train_loss_detect_bbox_regression",
            "train_loss_segment_seg", "val_cls_mAP", "val_cls_F1", "val_AP", "val_miou", "val_mean"}
    assert keys <= set(records[-1])
    assert metrics["mean"] == pytest.approx((metrics["cls_mAP"] + metrics["AP"] + metrics["miou"]) / 3)
    # per class, as the single-task runs report them: detection AP / AP50, segmentation IoU
    names = load_checkpoint(out / "best.pt")["meta"]["class_names"]
    assert list(metrics["per_class_AP"]) == list(metrics["per_class_AP50"]) == names
    assert list(metrics["per_class_iou"]) == ["background", *names]
    assert records[-1]["val_per_class_AP"] == metrics["per_class_AP"]
    lines = multitask.report(metrics, {"class_names": names})
    assert lines[2].startswith("  AP (AP50) per class: ") and lines[3].startswith("  IoU per class: background ")


def test_checkpoint_round_trip(joint_run, data_args, tmp_path):
    out, _ = joint_run
    best = load_checkpoint(out / "best.pt")
    assert set(k.split(".")[1] for k in best["model"] if k.startswith("heads.")) == {"classify", "detect", "segment"}
    metrics = multitask.main(["--device", "cpu", "--eval-only", "--weights", str(out / "best.pt"), "--output",
                              str(tmp_path)] + data_args)
    assert metrics["mean"] == pytest.approx(best["metrics"]["val_mean"], abs=1e-9)
    assert json.loads((tmp_path / "metrics.json").read_text())["mean"] == metrics["mean"]
    image = tmp_path / "scene.png"
    cv2.imwrite(str(image), np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    result = multitask.main(["--device", "cpu", "--predict", str(image), "--weights", str(out / "best.pt"),
                             "--output", str(tmp_path)])
    entry = result["predictions"][0]
    assert {"classes", "detections", "mask"} <= set(entry)
    assert (tmp_path / "predictions" / "scene.png").is_file() and (tmp_path / "predictions" / "scene_mask.png").is_file()


def test_multitask_outputs_equal_single_task_models():
    torch.manual_seed(0)
    trunk = build_backbone("resnet18")
    det = Detector(trunk, FCOSHead(trunk.feature_info, 10, fpn_channels=32, num_convs=1, score_thresh=0.0)).eval()
    seg = Segmenter(copy.deepcopy(trunk), FCNHead(trunk.feature_info, 11)).eval()
    merged = MultiTaskModel.from_task_models({"detect": det, "segment": seg}).eval()
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        out = merged(x)
        ref_det, ref_seg = det(x), seg(x)
    torch.testing.assert_close(out["segment"], ref_seg, rtol=0, atol=0)
    for a, b in zip(out["detect"], ref_det):
        for k in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_merging_refuses_different_trunks():
    a = Segmenter(resnet18(), FCNHead(resnet18().feature_info, 3))
    b = Segmenter(resnet18(), FCNHead(resnet18().feature_info, 3))
    with pytest.raises(ValueError, match="trunks differ at conv1.weight"):
        MultiTaskModel.from_task_models({"segment": a, "other": b})


def test_multitask_model_runs_trunk_once_and_weights_losses():
    trunk = resnet18()
    calls = {"n": 0}
    trunk.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    model = MultiTaskModel(trunk, {"cls": ClassificationHead(trunk.feature_info[-1], 4),
                                   "tags": MultiLabelHead(trunk.feature_info[-1], 4)}, {"tags": 0.5})
    x = torch.randn(2, 3, 64, 64)
    losses = model.train()(x, {"cls": torch.tensor([0, 3]), "tags": torch.tensor([[1., 0, 0, 1], [0, 0, 1, 0]])})
    assert set(losses) == {"cls_cls", "tags_bce"} and calls["n"] == 1
    model.eval()
    out = model(x)
    assert out["cls"].shape == (2, 4) and (0 <= out["tags"]).all() and (out["tags"] <= 1).all()
    with pytest.raises(ValueError, match="lack tasks"):
        model.train()(x, {"cls": torch.tensor([0, 3])})


def test_multilabel_metrics_hand_made():
    scores = torch.tensor([[0.9, 0.2], [0.8, 0.7], [0.1, 0.6]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 1]])
    m = multilabel_metrics(scores, targets)
    # class 0 ranking: pos, neg, pos -> AP = (1/1 + 2/3) / 2; class 1: pos, pos, neg -> 1.0
    assert m["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1.0) / 2)
    # at 0.5: predicted {00, 10, 11, 21}: tp = 3 (00, 11, 21), fp = 1 (10), fn = 1 (20)
    assert m["F1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))


def test_frozen_shared_trunk_merges_and_predicts(data_args, tmp_path, capsys):
    gray = resnet18(in_chans=1, stem="cifar")
    path = tmp_path / "cls.pt"
    torch.save({"format": "onetrunk-ckpt-1", "task": "classify", "config": {"model": {"depth": 18, "stem": "cifar",
               "in_chans": 1}}, "model": {f"backbone.{k}": v for k, v in gray.state_dict().items()}}, path)
    common = CPU + data_args + ["--epochs", "1", "--trunk", str(path), "--set", "model.freeze_at=5"]
    detect.main(common + ["--config", "configs/detect/scenes_quick.yaml", "--set", "model.fpn_channels=32",
                          "--output", str(tmp_path / "det")])
    printed = capsys.readouterr().out
    assert "'cifar' stem" in printed and "1->3 input channels" in printed and "frozen: stem..C5" in printed
    assert "conv1.weight not loaded but frozen" in printed  # the frozen random stem is called out
    segment.main(common + ["--config", "configs/segment/scenes_quick.yaml", "--output", str(tmp_path / "seg")])
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.full((40, 60, 3), 90, np.uint8))
    result = multitask.main(["--device", "cpu", "--predict", str(image), "--from-checkpoints",
                             str(tmp_path / "det" / "last.pt"), str(tmp_path / "seg" / "last.pt"),
                             "--output", str(tmp_path / "merged")])
    entry = result["predictions"][0]
    assert "detections" in entry and "mask" in entry and "classes" not in entry
    det = load_checkpoint(tmp_path / "det" / "last.pt")["model"]
    torch.testing.assert_close(det["backbone.layer2.0.conv1.weight"], gray.state_dict()["layer2.0.conv1.weight"])
    # the Python API merges the same way: one trunk pass, the separate models' results
    from tasks import load
    paths = [tmp_path / "det" / "last.pt", tmp_path / "seg" / "last.pt"]
    (merged,) = load(paths, device="cpu").predict(str(image))
    (alone_det,), (alone_seg,) = (load(p, device="cpu").predict(str(image)) for p in paths)
    torch.testing.assert_close(merged["detect"]["boxes"], alone_det["boxes"], rtol=0, atol=0)
    assert torch.equal(merged["segment"]["mask"], alone_seg["mask"])


def test_api_equals_the_evaluation_path_for_every_head(joint_run, data_args):
    from pathlib import Path

    from tasks import TASKS, load
    from tasks.engine.config import config_from_dict

    out, _ = joint_run
    cfg = config_from_dict(multitask.MultiTaskConfig, load_checkpoint(out / "best.pt")["config"])
    data = TASKS["multitask"].build_data(cfg, torch.device("cpu"), train=False)
    model = load(out / "best.pt", device="cpu")
    probs, dets, masks = [], [], []
    with torch.no_grad():
        for images, _ in data.val:  # the evaluation path
            o = model.model(images)
            probs += list(o["classify"])
            dets += o["detect"]
            masks += list(o["segment"].argmax(1))
    root = Path(next(a.split("=", 1)[1] for a in data_args if a.startswith("data.scenes_root=")))
    files = sorted(json.loads((root / "annotations" / "instances_val.json").read_text())["images"],
                   key=lambda im: im["id"])
    results = model.predict([root / "images" / "val" / im["file_name"] for im in files], batch_size=4)
    assert len(results) == len(probs) and set(results[0]) == {"classify", "detect", "segment"}
    for r, p, d, m in zip(results, probs, dets, masks):
        torch.testing.assert_close(r["classify"]["probs"], p)
        torch.testing.assert_close(r["detect"]["boxes"], d["boxes"])  # 64 px scenes: file pixels = input pixels
        assert torch.equal(r["detect"]["labels"], d["labels"]) and torch.equal(r["segment"]["mask"], m)
