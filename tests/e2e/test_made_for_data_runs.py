"""A run on the user's own data, given only the data paths: the settings are made for that data
(classes, channels, size, batch, ...), printed with their reasons, recorded in config.yaml, and
the run folder is named after the data; VOC layouts and mask folders of any classes."""
import re

import cv2
import numpy as np
import pytest
import yaml

from tasks import classify, detect, load, segment
from tests.fakes import write_image_folders, write_torchvision_resnet18, write_voc_tree

FAST = ["--device", "cpu", "--epochs", "1"]  # the rest is derived; epochs is "yours"


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ONETRUNK_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def test_folders_given_only_their_paths(tmp_path, runs, capsys):
    root = write_image_folders(tmp_path / "pets", n_per_class=6, size=40)
    classify.main(FAST + ["--train-images", str(root / "train"), "--val-images", str(root / "val"),
                          "--set", "data.num_workers=0"])
    out = capsys.readouterr().out
    assert "data: 18 train / 18 val images in 3 classes, RGB, median 40x40" in out
    assert re.search(r"model\.num_classes +3  \(the class folders: cat, dog, owl\)", out) and "train.epochs" in out
    assert re.search(r"data\.rot90 +True  \(no class has an up", out)  # noise images: no up
    folder = runs / "classify" / "pets"  # named after the data, not the built-in recipe
    text = (folder / "config.yaml").read_text()
    assert text.startswith("# data: 18 train")  # the derivation, kept with what ran
    cfg = yaml.safe_load(text)
    assert (cfg["data"]["dataset"], cfg["model"]["in_chans"], cfg["model"]["num_classes"]) == ("folders", 3, 3)
    assert cfg["data"]["image_size"] == 32 and cfg["train"]["batch_size"] == 8 and cfg["optim"]["name"] == "adamw"
    assert cfg["data"]["num_workers"] == 0 and cfg["train"]["epochs"] == 1  # the user's own, kept
    assert cfg["optim"]["weight_decay"] == cfg["optim"]["norm_weight_decay"] == 2.0 and cfg["data"]["rot90"]
    assert load(folder / "best.pt", device="cpu").class_names == ["cat", "dog", "owl"]
    # a resumed run keeps the derivation atop config.yaml (the checkpoint's config is not re-derived)
    header = [line for line in text.splitlines() if line.startswith("# ")]
    classify.main(["--resume", str(folder), "--epochs", "2", "--quiet", "--device", "cpu"])
    again = (folder / "config.yaml").read_text()
    assert [line for line in again.splitlines() if line.startswith("# ")] == header
    assert yaml.safe_load(again)["train"]["epochs"] == 2


def test_a_small_set_starts_from_imagenet_weights_where_they_can_be_had(tmp_path, runs, capsys, torch_home,
                                                                        monkeypatch):
    import torch

    from backbones import pretrained

    root = write_image_folders(tmp_path / "pets", n_per_class=4, size=24)
    args = FAST + ["--train-images", str(root / "train"), "--val-images", str(root / "val"),
                   "--set", "data.num_workers=0", "--set", "data.image_size=32", "--batch-size", "4"]
    classify.main(args)  # offline, empty cache: from scratch, and a note says why it may not learn
    out = capsys.readouterr().out
    assert "  model.weights " not in out and "note: 12 training images and a trunk from scratch" in out
    assert yaml.safe_load((runs / "classify" / "pets" / "config.yaml").read_text())["model"]["weights"] is None
    # online, a host that answers: downloaded (here: written by a stand-in for torch.hub's download)
    monkeypatch.delenv("ONETRUNK_OFFLINE")
    monkeypatch.setattr(pretrained, "_reachable", lambda url: True)
    state = write_torchvision_resnet18(tmp_path / "server").state_dict()
    downloads = []
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, *a, **k: downloads.append(url) or torch.save(state, dst))
    classify.main(args + ["--output", str(tmp_path / "downloaded")])
    out = capsys.readouterr().out
    assert "model.weights         imagenet  (12 images are few to train a ResNet from scratch" in out
    assert "downloaded once into torch.hub's cache" in out and len(downloads) == 1
    classify.main(args + ["--output", str(tmp_path / "pretrained")])  # in the cache now: taken, and said so
    out = capsys.readouterr().out
    assert "found in the cache" in out and len(downloads) == 1
    assert "optim.trunk_lr_mult   0.1" in out and "note:" not in out
    cfg = yaml.safe_load((tmp_path / "pretrained" / "config.yaml").read_text())
    assert cfg["model"]["weights"] == "imagenet" and cfg["optim"]["trunk_lr_mult"] == 0.1


def test_a_named_recipe_keeps_its_settings_but_takes_the_datas_facts(tmp_path, runs):
    root = write_image_folders(tmp_path / "pets", n_per_class=4, size=24)
    classify.main(FAST + ["--train-images", str(root / "train"), "--val-images", str(root / "val"), "--quiet",
                          "--config", "configs/classify/fashion_mnist_quick.yaml", "--set", "data.image_size=32",
                          "--set", "data.num_workers=0", "--batch-size", "6"])
    cfg = yaml.safe_load((runs / "classify" / "pets" / "config.yaml").read_text())
    # the recipe's in_chans 1 (Fashion-MNIST) gives way to the data's RGB; its schedule stays
    assert cfg["model"]["in_chans"] == 3 and cfg["model"]["num_classes"] == 3 and cfg["optim"]["schedule"] == "onecycle"


def _voc_with_other_classes(tmp_path):
    root = write_voc_tree(tmp_path)
    voc = root / "VOC2012"
    for xml in (voc / "Annotations").glob("*.xml"):
        xml.write_text(xml.read_text().replace("aeroplane", "kite").replace("bicycle", "drone"))
    return root


def test_detection_on_a_voc_layout_of_its_own_classes(tmp_path, runs, capsys):
    root = _voc_with_other_classes(tmp_path)
    detect.main(FAST + ["--voc-root", str(root), "--set", "model.fpn_channels=16", "--set", "model.num_convs=1",
                        "--set", "data.image_size=64", "--set", "data.num_workers=0"])
    assert "the object names of the XML files" in capsys.readouterr().out
    folder = runs / "detect" / "VOC2012"
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    assert cfg["data"]["classes"] == ["drone", "kite"] and cfg["data"]["dataset"] == "voc"
    model = load(folder / "best.pt", device="cpu")
    assert model.class_names == ["drone", "kite"]
    with pytest.raises(ValueError, match="'kite' is not one of the classes"):  # --classes must name them all
        detect.main(FAST + ["--voc-root", str(root), "--classes", "drone,balloon", "--quiet",
                            "--output", str(tmp_path / "bad")])


def test_segmentation_on_mask_folders_with_class_names(tmp_path, runs):
    data = tmp_path / "streets"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (data / "images" / split).mkdir(parents=True)
        (data / "masks" / split).mkdir(parents=True)
        for i in range(4):
            img = rng.integers(0, 50, (48, 64, 3), dtype=np.uint8)
            mask = np.zeros((48, 64), np.uint8)
            mask[8:24, 8:40], img[8:24, 8:40] = 1, 200
            mask[30:44, 20:60], img[30:44, 20:60, 1] = 2, 250
            cv2.imwrite(str(data / "images" / split / f"{i}.png"), img)
            cv2.imwrite(str(data / "masks" / split / f"{i}.png"), mask)
    (data / "masks" / "classes.txt").write_text("background\nroad\ncar\n")
    flags = [f"--{k}-{kind}" for k in ("train", "val") for kind in ("images", "masks")]
    paths = [str(data / kind / split) for split in ("train", "val") for kind in ("images", "masks")]
    segment.main(FAST + [x for pair in zip(flags, paths) for x in pair] + ["--quiet", "--set", "data.num_workers=0"])
    folder = runs / "segment" / "streets"
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    assert cfg["model"]["num_classes"] == 3 and cfg["data"]["classes"] == ["background", "road", "car"]
    assert load(folder / "best.pt", device="cpu").class_names == ["background", "road", "car"]
