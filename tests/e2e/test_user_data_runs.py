"""A user's own work run end to end on CPU: named weights, odd-sized photos (aspect mode), Pascal VOC."""
import json

import cv2
import pytest
import torch
from PIL import Image

from backbones import pretrained as pretrained_module
from tasks import detect, load, segment
from tasks.engine.checkpoint import load_checkpoint
from tests.fakes import boxed_image, tiny_scenes_args, write_odd_coco, write_torchvision_resnet18, write_voc_tree


# ----------------------------------------------------------------------------- weights by name

def test_a_run_from_named_weights_keeps_their_normalisation(torch_home, tmp_path, monkeypatch):
    write_torchvision_resnet18(torch_home)
    real = pretrained_module.weights_info

    def other_stats(spec, arch):  # weights trained on other statistics than ImageNet's
        return pretrained_module.NamedWeights(**{**real(spec, arch).__dict__, "mean": (0.1, 0.2, 0.3),
                                                 "std": (0.3, 0.2, 0.1)})

    monkeypatch.setattr(pretrained_module, "weights_info", other_stats)
    out = tmp_path / "run"
    detect.main(["--device", "cpu", "--quiet", "--batch-size", "4", "--config", "configs/detect/scenes_quick.yaml",
                 "--set", "model.fpn_channels=16", "--set", "model.num_convs=1", "--epochs", "1",
                 "--set", "model.weights=torchvision:IMAGENET1K_V1", "--set", "model.norm=frozen_bn",
                 "--set", "model.freeze_at=2", "--output", str(out), *tiny_scenes_args(tmp_path)])
    meta = load_checkpoint(out / "best.pt")["meta"]
    assert meta["mean"] == [0.1, 0.2, 0.3] and meta["std"] == [0.3, 0.2, 0.1]
    monkeypatch.undo()  # prediction needs neither the weights file nor the name: the checkpoint says it all
    model = load(out / "best.pt", device="cpu")
    assert model.preprocess.mean == (0.1, 0.2, 0.3)
    x = model.preprocess.normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([3.0, 4.0, 7.0]))  # (1 - mean) / std


# ----------------------------------------------------------------------------- aspect mode

ASPECT = ["--set", "data.resize=aspect", "--set", "data.min_size=[64,96]", "--set", "data.max_size=160",
          "--set", "data.num_workers=0", "--device", "cpu", "--quiet", "--batch-size", "2", "--epochs", "1"]


def test_odd_sizes_train_and_evaluate_in_the_aspect_mode(tmp_path):
    flags = write_odd_coco(tmp_path / "d", [(97, 131), (375, 500), (131, 97), (500, 375), (120, 160), (160, 120)])
    out = tmp_path / "det"
    detect.main(ASPECT + flags + ["--config", "configs/detect/scenes_quick.yaml", "--set", "model.fpn_channels=16",
                                  "--set", "model.num_convs=1", "--output", str(out)])
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= record["train_pad_fraction"] < 1 and "val_AP" in record
    meta = load_checkpoint(out / "best.pt")["meta"]
    assert meta["preprocess"]["resize"] == "shorter" and meta["preprocess"]["max_size"] == 160
    preds = json.loads((out / "predictions.json").read_text())
    val = json.loads((tmp_path / "d" / "val.json").read_text())["images"]
    bounds = {im["id"]: (im["width"], im["height"]) for im in val}
    for p in preds:  # in the files' own pixels
        x, y, w, h = p["bbox"]
        assert x >= 0 and y >= 0 and x + w <= bounds[p["image_id"]][0] + 1e-3 and y + h <= bounds[p["image_id"]][1] + 1e-3


def test_segmentation_in_the_aspect_mode(tmp_path):
    flags = []
    for split, shapes in (("train", [(97, 131), (131, 97), (120, 160), (160, 120)]), ("val", [(97, 131), (375, 500)])):
        for folder in ("images", "masks"):
            (tmp_path / split / folder).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            img, mask, _ = boxed_image(h, w)
            cv2.imwrite(str(tmp_path / split / "images" / f"{i}.png"), img)
            Image.fromarray(mask, mode="L").save(tmp_path / split / "masks" / f"{i}.png")
        flags += [f"--{split}-images", str(tmp_path / split / "images"), f"--{split}-masks", str(tmp_path / split / "masks")]
    out = tmp_path / "seg"
    segment.main(ASPECT + flags + ["--config", "configs/segment/scenes_quick.yaml", "--set", "model.num_classes=2",
                                   "--output", str(out)])
    assert "train_pad_fraction" in json.loads((out / "metrics.jsonl").read_text())
    (result,) = load(out / "best.pt", device="cpu").predict(str(tmp_path / "val" / "images" / "1.png"))
    assert result["mask"].shape == (375, 500)


# ----------------------------------------------------------------------------- Pascal VOC

def test_voc_trains_a_step_for_detection_and_segmentation(tmp_path):
    root = write_voc_tree(tmp_path)
    common = ["--voc-root", str(root), "--device", "cpu", "--quiet", "--epochs", "1", "--batch-size", "2",
              "--set", "data.num_workers=0", "--set", "data.image_size=64"]
    detect.main(common + ["--config", "configs/detect/scenes_quick.yaml", "--set", "model.fpn_channels=16",
                          "--set", "model.num_convs=1", "--output", str(tmp_path / "det")])
    assert "val_AP" in json.loads((tmp_path / "det" / "metrics.jsonl").read_text())
    segment.main(common + ["--config", "configs/segment/scenes_quick.yaml", "--output", str(tmp_path / "seg")])
    record = json.loads((tmp_path / "seg" / "metrics.jsonl").read_text())
    assert len(record["val_iou"]) == 21  # background + the 20 VOC classes


@pytest.mark.slow  # ResNet-50 recipes (7-9 s each)
@pytest.mark.parametrize("task, recipe", [(detect, "configs/detect/coco_fcos_resnet50.yaml"),
                                          (segment, "configs/segment/voc_fcn_resnet50.yaml")])
def test_the_user_data_recipes_run_end_to_end(task, recipe, tmp_path, torch_home):
    """The shipped recipes as they are (ImageNet ResNet-50 by name, aspect mode, fine-tuning
    settings) on a tiny VOC tree, with small sizes: the named weights come from the cache."""
    import torchvision
    torch_home.mkdir(parents=True)
    torch.save(torchvision.models.resnet50().state_dict(), torch_home / "resnet50-11ad3fa6.pth")  # the DEFAULT's file
    out = tmp_path / "run"
    metrics = task.main(["--config", recipe, "--voc-root", str(write_voc_tree(tmp_path)), "--device", "cpu", "--quiet",
                         "--epochs", "1", "--batch-size", "2", "--set", "data.min_size=[64,96]",
                         "--set", "data.max_size=128", "--set", "data.num_workers=0", "--output", str(out)])
    assert ("AP" if task is detect else "miou") in metrics
    model = load(out / "best.pt", device="cpu")
    assert model.preprocess.resize == "shorter" and model.preprocess.size == 96
    (result,) = model.predict(str(next((tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))))
    assert result
