"""python -m tasks.segment end to end on a tiny FashionScenes set, on CPU."""
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from tasks import segment
from tasks.engine.checkpoint import load_checkpoint
from tests.fakes import tiny_scenes_args

TINY = ["--device", "cpu", "--quiet", "--batch-size", "4", "--config", "configs/segment/scenes_quick.yaml"]


@pytest.fixture(scope="module")
def scenes_args(tmp_path_factory):
    return TINY + tiny_scenes_args(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run(scenes_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("segment") / "run"
    metrics = segment.main(scenes_args + ["--epochs", "2", "--output", str(out)])
    return out, metrics


def test_run_writes_artifacts_and_miou(run):
    out, metrics = run
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "curves.png", "segmentation.png"):
        assert (out / name).is_file(), name
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert 0.0 <= metrics["miou"] <= 1.0 and len(metrics["iou"]) == 11
    assert 0.0 < metrics["pixel_acc"] <= 1.0 and metrics["iou"][0] > 0  # background is found


def test_eval_only_reproduces_recorded_miou(run, scenes_args, tmp_path):
    out, _ = run
    best = load_checkpoint(out / "best.pt")
    metrics = segment.main(scenes_args + ["--eval-only", "--weights", str(out / "best.pt"), "--output", str(tmp_path)])
    assert metrics["miou"] == pytest.approx(best["metrics"]["val_miou"], abs=1e-9)
    assert (tmp_path / "segmentation.png").is_file()


def test_predict_writes_palette_mask_at_file_size(run, tmp_path):
    out, _ = run
    path = tmp_path / "odd.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (45, 71, 3), dtype=np.uint8))
    result = segment.main(["--predict", str(path), "--weights", str(out / "best.pt"), "--device", "cpu",
                           "--output", str(tmp_path)])
    mask = Image.open(result["predictions"][0]["mask"])
    assert mask.mode == "P" and mask.size == (71, 45)
    assert np.asarray(mask).max() < 11
    assert (tmp_path / "predictions" / "odd_overlay.png").is_file()


def test_mask_folders_need_num_classes(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        segment.main(["--device", "cpu", "--train-images", "a", "--train-masks", "b", "--val-images", "c",
                      "--val-masks", "d", "--output", str(tmp_path)])
