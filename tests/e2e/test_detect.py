"""python -m tasks.detect end to end on a tiny FashionScenes set, on CPU."""
import json

import pytest
import torch

from backbones import resnet18
from tasks import detect
from tasks.engine.checkpoint import load_checkpoint
from tests.fakes import tiny_scenes_args

TINY = ["--device", "cpu", "--quiet", "--batch-size", "4", "--config", "configs/detect/scenes_quick.yaml",
        "--set", "model.fpn_channels=32", "--set", "model.num_convs=1"]


@pytest.fixture(scope="module")
def scenes_args(tmp_path_factory):
    return TINY + tiny_scenes_args(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run(scenes_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("detect") / "run"
    metrics = detect.main(scenes_args + ["--epochs", "2", "--output", str(out)])
    return out, metrics


def test_run_writes_artifacts_and_coco_metrics(run):
    out, metrics = run
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "curves.png", "predictions.json",
                 "detections.png"):
        assert (out / name).is_file(), name
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        for k in ("train_loss_classification", "train_loss_bbox_regression", "train_loss_bbox_ctrness"):
            assert 0 < r[k] < 100, (k, r[k])
        assert 0.0 <= r["val_AP"] <= 1.0 and "val_AP50" in r and "val_APl" in r
    assert records[1]["train_loss"] < records[0]["train_loss"]
    preds = json.loads((out / "predictions.json").read_text())
    assert preds and {"image_id", "category_id", "bbox", "score"} <= set(preds[0])
    assert all(1 <= p["category_id"] <= 10 for p in preds)
    assert metrics["AP"] == pytest.approx(records[-1]["val_AP"])


def test_eval_only_reproduces_recorded_ap(run, scenes_args, tmp_path):
    out, _ = run
    best = load_checkpoint(out / "best.pt")
    args = [a for a in scenes_args if a != "--quiet"]
    metrics = detect.main(args + ["--eval-only", "--weights", str(out / "best.pt"), "--output", str(tmp_path)])
    assert metrics["AP"] == pytest.approx(best["metrics"]["val_AP"], abs=1e-6)
    assert (tmp_path / "predictions.json").is_file() and (tmp_path / "detections.png").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["AP"] == metrics["AP"]


def test_predict_writes_json_and_picture(run, tmp_path, capsys):
    import cv2
    import numpy as np
    out, _ = run
    img = np.zeros((48, 80, 3), np.uint8)
    img[10:30, 20:50] = 200
    path = tmp_path / "scene.png"
    cv2.imwrite(str(path), img)
    result = detect.main(["--predict", str(path), "--weights", str(out / "best.pt"), "--device", "cpu",
                          "--output", str(tmp_path)])
    entry = result["predictions"][0]
    assert entry["width"] == 80 and entry["height"] == 48
    saved = json.loads((tmp_path / "predictions" / "scene.json").read_text())
    assert saved["detections"] == entry["detections"]
    for d in entry["detections"]:
        x1, y1, x2, y2 = d["box_xyxy"]
        assert 0 <= x1 <= x2 <= 80 and 0 <= y1 <= y2 <= 48  # mapped back to the file's pixels
    assert (tmp_path / "predictions" / "scene.png").is_file()
    assert "scene.png" in capsys.readouterr().out


def test_trunk_from_a_grayscale_classifier(scenes_args, tmp_path, capsys):
    gray = resnet18(in_chans=1)
    ckpt = {"format": "onetrunk-ckpt-1", "task": "classify", "config": {},
            "model": {f"backbone.{k}": v for k, v in gray.state_dict().items()}}
    path = tmp_path / "cls.pt"
    torch.save(ckpt, path)
    out = tmp_path / "run"
    detect.main(scenes_args + ["--epochs", "1", "--output", str(out), "--trunk", str(path), "--set", "optim.lr=0"])
    printed = capsys.readouterr().out
    assert "onetrunk classify checkpoint" in printed and "1->3 input channels" in printed
    state = load_checkpoint(out / "last.pt")["model"]
    torch.testing.assert_close(state["backbone.layer3.0.conv1.weight"], gray.state_dict()["layer3.0.conv1.weight"])


def test_coco_flags_need_each_other(tmp_path):
    with pytest.raises(ValueError, match="--val-ann"):
        detect.main(["--device", "cpu", "--train-ann", "a.json", "--train-images", "x", "--output", str(tmp_path)])


def _scenes_root(scenes_args):
    return next(a.split("=", 1)[1] for a in scenes_args if a.startswith("data.scenes_root="))


def test_api_boxes_equal_the_evaluation_path(run, scenes_args, tmp_path):
    """tasks.load(...).predict on the validation files gives evaluation's detections (file pixels)."""
    from pathlib import Path

    from tasks import load

    out, _ = run
    detect.main(scenes_args + ["--eval-only", "--weights", str(out / "best.pt"), "--output", str(tmp_path)])
    evaluated = json.loads((tmp_path / "predictions.json").read_text())  # COCO results of the evaluation
    root = Path(_scenes_root(scenes_args))
    images = json.loads((root / "annotations" / "instances_val.json").read_text())["images"]
    model = load(out / "best.pt", device="cpu")
    results = model.predict([root / "images" / "val" / im["file_name"] for im in images], batch_size=4)
    cats = model.meta["category_ids"]
    assert sum(len(r["boxes"]) for r in results) == len(evaluated) > 0
    for im, r in zip(images, results):
        want = sorted((p for p in evaluated if p["image_id"] == im["id"]), key=lambda p: -p["score"])
        assert [cats[int(c)] for c in r["labels"]] == [p["category_id"] for p in want]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (p["bbox"] for p in want)]
        torch.testing.assert_close(r["boxes"], torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4),
                                   atol=1e-3, rtol=0)
        torch.testing.assert_close(r["scores"], torch.tensor([p["score"] for p in want]), atol=1e-5, rtol=0)


def test_predict_keeps_outputs_of_same_named_files_apart(run, tmp_path):
    import cv2
    import numpy as np
    out, _ = run
    paths = []
    for folder, value in (("a", 60), ("b", 200)):
        (tmp_path / folder).mkdir()
        paths.append(str(tmp_path / folder / "img0.png"))
        cv2.imwrite(paths[-1], np.full((40, 40, 3), value, np.uint8))
    result = detect.main(["--predict", *paths, "--weights", str(out / "best.pt"), "--device", "cpu",
                          "--output", str(tmp_path / "o")])
    folder = tmp_path / "o" / "predictions"
    assert {p.name for p in folder.iterdir()} == {"img0.json", "img0.png", "img0-2.json", "img0-2.png", "summary.json",
                                                  "coco_images.json", "coco_results.json"}
    assert [json.loads((folder / f).read_text())["image"] for f in ("img0.json", "img0-2.json")] == paths
    assert json.loads((folder / "summary.json").read_text()) == result["predictions"]


def test_a_checkpoint_from_before_the_exp_box_head_loads_as_relu(tmp_path):
    """Checkpoints written before ``model.reg_activation`` existed were trained with a ReLU box
    head: they must load as one (today's default, exp, adds a parameter they lack and changes
    every box)."""
    import torch

    from tasks import TASKS, load
    from tasks.engine.checkpoint import atomic_save, load_checkpoint
    from tasks.engine.config import config_from_dict
    from tests.fakes import TINY_MODELS, write_task_checkpoint

    ckpt = load_checkpoint(write_task_checkpoint(tmp_path / "new.pt", "detect"))
    # a model built outside a training run: auto is the exp head (a reg_scales parameter)
    assert ckpt["config"]["model"]["reg_activation"] == "auto"
    assert any(k.endswith("reg_scales") for k in ckpt["model"])
    # the checkpoint as the ReLU head wrote it: no such key in its config, no reg_scales
    cfg = config_from_dict(TASKS["detect"].config, TINY_MODELS["detect"])
    cfg.model.reg_activation = "relu"
    del ckpt["config"]["model"]["reg_activation"]
    ckpt["model"] = TASKS["detect"].build_model(cfg, {"class_names": ckpt["meta"]["class_names"]}).state_dict()
    assert not any(k.endswith("reg_scales") for k in ckpt["model"])
    atomic_save(ckpt, tmp_path / "old.pt")
    predictor = load(tmp_path / "old.pt", device="cpu")
    heads = [m for m in predictor.model.modules() if hasattr(m, "reg_activation")]
    assert heads and all(m.reg_activation == "relu" for m in heads)
    assert len(predictor.predict(torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8))) == 1


def test_the_auto_box_head_is_fixed_by_the_run_length_and_recorded(run, scenes_args, tmp_path, monkeypatch, capsys):
    """model.reg_activation=auto: a short run trains exp, a run of LONG_RUN_STEPS or more
    softplus; config.yaml and the checkpoint hold the head that ran (not auto), the run says
    which, and the checkpoint loads as that head."""
    from tasks import load

    out, _ = run
    assert load_checkpoint(out / "last.pt")["config"]["model"]["reg_activation"] == "exp"
    assert "reg_activation: exp" in (out / "config.yaml").read_text()

    monkeypatch.setattr(detect, "LONG_RUN_STEPS", 2)  # this tiny run's 1 epoch is >= 2 steps
    long_run = tmp_path / "long"
    detect.main([a for a in scenes_args if a != "--quiet"] + ["--epochs", "1", "--output", str(long_run)])
    assert "model.reg_activation: softplus (auto: a run of" in capsys.readouterr().out
    ckpt = load_checkpoint(long_run / "last.pt")
    assert ckpt["config"]["model"]["reg_activation"] == "softplus"
    assert not any(k.endswith("reg_scales") for k in ckpt["model"])
    heads = [m for m in load(long_run / "last.pt", device="cpu").model.modules() if hasattr(m, "reg_activation")]
    assert heads and all(m.reg_activation == "softplus" for m in heads)
