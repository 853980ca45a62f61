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
    assert json.loads((tmp_path / "metrics.json").read_text())["miou"] == metrics["miou"]


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


def test_mask_folders_that_do_not_exist_are_named(tmp_path):
    # (their classes come from the data: tests/e2e/test_made_for_data_runs.py)
    with pytest.raises(FileNotFoundError, match="--train-images a: folder not found"):
        segment.main(["--device", "cpu", "--train-images", "a", "--train-masks", "b", "--val-images", "c",
                      "--val-masks", "d", "--output", str(tmp_path)])


def _val_images(scenes_args):
    from pathlib import Path
    root = Path(next(a.split("=", 1)[1] for a in scenes_args if a.startswith("data.scenes_root=")))
    return sorted((root / "images" / "val").glob("*.png"))


@pytest.fixture(scope="module")
def loaded(run):
    from tasks import load
    return load(run[0] / "best.pt", device="cpu")


def test_api_masks_equal_the_evaluation_path(run, loaded, scenes_args):
    import torch

    from tasks import TASKS
    from tasks.engine.config import config_from_dict
    cfg = config_from_dict(segment.SegmentConfig, load_checkpoint(run[0] / "best.pt")["config"])
    data = TASKS["segment"].build_data(cfg, torch.device("cpu"), train=False)
    with torch.no_grad():
        evaluated = torch.cat([loaded.model(x).argmax(1) for x, _ in data.val])  # the evaluation path
    results = loaded.predict(_val_images(scenes_args), batch_size=4)
    assert len(results) == len(evaluated)
    for r, e in zip(results, evaluated):
        assert torch.equal(r["mask"], e)


def test_upscaled_image_gives_the_upscaled_mask(loaded, scenes_args):
    image = cv2.imread(str(_val_images(scenes_args)[0]))[:, :, ::-1]
    small = loaded.predict(image)[0]["mask"].numpy()
    big = loaded.predict(cv2.resize(image, (256, 256), interpolation=cv2.INTER_NEAREST))[0]["mask"].numpy()
    assert big.shape == (256, 256)
    reference = np.kron(small, np.ones((4, 4), small.dtype))  # the small prediction, scaled up
    kernel = np.ones((9, 9), np.uint8)  # 4 px either side of a class border
    border = cv2.dilate(reference.astype(np.uint8), kernel) != cv2.erode(reference.astype(np.uint8), kernel)
    differ = big != reference
    assert not (differ & ~border).any()  # the logits are upsampled, not the classes: borders move a little
    assert differ.mean() < 0.05


def test_tiles_average_the_logits_where_they_overlap(loaded, scenes_args):
    import torch
    image = cv2.imread(str(_val_images(scenes_args)[0]))[:, :, ::-1]
    wide = np.ascontiguousarray(np.concatenate([image, image[:, :32]], axis=1))  # 64 x 96: tiles at x = 0, 32
    (tiled,) = loaded.predict(wide, tile=True)
    logits = loaded.forward(loaded.preprocess.batch([wide[:, :64], wide[:, 32:]])).float()
    total = torch.zeros(logits.shape[1], 64, 96)
    count = torch.zeros(1, 64, 96)
    for lg, x in zip(logits, (0, 32)):
        total[:, :, x:x + 64] += lg
        count[:, :, x:x + 64] += 1
    assert torch.equal(tiled["mask"], (total / count).argmax(0))
    (one,) = loaded.predict(image, tile=True)  # one tile: the whole-image prediction
    assert torch.equal(one["mask"], loaded.predict(image)[0]["mask"])
