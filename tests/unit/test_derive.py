"""Settings made for the user's data: the rules of tasks.engine.derive, and the describers that
read the facts off folders, COCO files, VOC trees and mask folders without decoding them."""
import json

import numpy as np
import pytest

from tasks.engine.derive import DataFacts, Orientation, data_name, derivation_lines, derive, orientation_check
from tasks.engine.describe import describe_coco, describe_folders, describe_masks, describe_voc
from tests.fakes import write_image_folders, write_voc_tree


def _facts(**kw):
    base = dict(kind="folders", name="pets", where="pets/train", train=412, val=100, class_names=list("abcd"),
                classes_from="the class folders", median_size=(640, 480), channels=3)
    return DataFacts(**{**base, **kw})


def _values(derived):
    return {d.key: d.value for d in derived}


def test_classification_settings_follow_the_data_and_the_device():
    gpu, cpu = (_values(derive("classify", _facts(), device=dev, given={}, cpus=2)) for dev in ("cuda", "cpu"))
    assert gpu["model.num_classes"] == cpu["model.num_classes"] == 4 and gpu["model.in_chans"] == 3
    assert gpu["data.image_size"] == 224 and cpu["data.image_size"] == 128  # median shorter side 480, capped
    assert cpu["train.batch_size"] <= 412 // 8 and cpu["data.num_workers"] == 1  # one CPU left for training
    assert gpu["optim.name"] == "adamw" and gpu["optim.lr"] == pytest.approx(1e-3 * (gpu["train.batch_size"] / 64) ** 0.5,
                                                                            rel=1e-2)
    small = _values(derive("classify", _facts(median_size=(28, 28), channels=1, train=180), device="cpu", given={}))
    assert small["data.image_size"] == 32 and small["model.in_chans"] == 1 and small["train.batch_size"] == 16
    steps = 180 // 16
    assert 5 <= small["train.epochs"] and small["train.epochs"] * steps >= 600  # about 600 steps on the CPU


def test_the_users_settings_are_kept_and_used_by_the_rules_after_them():
    derived = derive("detect", _facts(kind="coco", median_size=(416, 320), train=3000), device="cuda",
                     given={"train.batch_size": 8, "train.epochs": 4})
    values, yours = _values(derived), {d.key for d in derived if d.yours}
    assert yours == {"train.batch_size", "train.epochs"} and values["train.batch_size"] == 8
    assert values["optim.lr"] == pytest.approx(2e-3 * (8 / 64) ** 0.5, rel=1e-2)  # from the user's batch
    assert values["data.image_size"] == 416 and "model.in_chans" not in values  # dense tasks read RGB
    lines = derivation_lines(_facts(), derived, values)
    assert lines[0].startswith("data: 412 train / 100 val images in 4 classes, RGB, median 640x480")
    assert any("train.epochs" in line and "(yours)" in line for line in lines)


def test_the_batch_follows_the_users_image_size():
    def cpu(task, given):
        return _values(derive(task, _facts(kind="masks", median_size=(416, 320), train=3000), device="cpu",
                              given=given, cpus=2))

    assert cpu("segment", {})["data.image_size"] == 224 and cpu("segment", {})["train.batch_size"] == 8  # 8 a batch
    assert cpu("segment", {"data.image_size": 320})["train.batch_size"] == 4
    assert cpu("classify", {})["train.batch_size"] == 64  # 128 px derived
    assert cpu("classify", {"data.image_size": 256})["train.batch_size"] == 16


def test_the_warm_up_is_a_short_part_of_any_run():
    def warm_steps(train, given):
        values = _values(derive("classify", _facts(train=train), device="cpu", given=given, cpus=2))
        steps = train // values["train.batch_size"]
        return round(values["optim.warmup_epochs"] * steps), values["train.epochs"] * steps

    for train in (412, 20_000):  # the derived runs: 5% of their steps, at least 50
        warm, total = warm_steps(train, {})
        assert total >= 600 and warm == max(50, round(0.05 * total))
    warm, total = warm_steps(91, {"train.epochs": 3})  # the user's short run decays too: not all warm-up
    assert total == 33 and warm == 6
    lines = derivation_lines(_facts(train=91), derive("classify", _facts(train=91), device="cpu",
                                                      given={"train.epochs": 3}, cpus=2), {})
    assert any("6 warm-up steps: a fifth of the run's 33" in line for line in lines)


def test_a_classifier_on_few_images_starts_from_imagenet_weights_where_they_can_be_had():
    def never():
        raise AssertionError("asked whether ImageNet weights can be had where no rule needs them")

    for where, why in (("cache", "found in the cache"), ("download", "downloaded once")):
        made = derive("classify", _facts(train=200), device="cpu", given={}, imagenet_source=lambda: where)
        with_weights = _values(made)
        assert with_weights["model.weights"] == "imagenet" and with_weights["data.image_size"] == 224
        assert with_weights["optim.trunk_lr_mult"] == 0.1
        assert why in next(d.why for d in made if d.key == "model.weights")
    few, many, yours, dense = (_facts(train=n) for n in (200, 5000, 200, 200))
    derive("classify", few, device="cpu", given={}, imagenet_source=lambda: None)
    for facts, task, given in ((many, "classify", {}), (yours, "classify", {"model.weights": None}),
                               (dense, "detect", {})):
        assert "model.weights" not in _values(derive(task, facts, device="cpu", given=given, imagenet_source=never))
    assert len(few.notes) == 1 and "200 training images" in few.notes[0] and "model.weights=imagenet" in few.notes[0]
    assert many.notes == yours.notes == dense.notes == []
    lines = derivation_lines(few, derive("classify", _facts(train=200), device="cpu", given={}), {})
    assert lines[-1].startswith("  note: 200 training images")


def test_a_named_recipe_gets_only_the_facts():
    keys = {d.key for d in derive("classify", _facts(), device="cuda", given={}, named_recipe=True)}
    assert keys == {"data.dataset", "model.in_chans", "model.num_classes"}


@pytest.mark.parametrize("path,name", [("data/pets/train", "pets"), ("shapes/train.json", "shapes"),
                                       ("x/VOCdevkit/VOC2012", "VOC2012"), ("coco/annotations/instances_train.json",
                                                                             "coco"), ("my set/images/train", "my_set"),
                                       ("birds/img", "birds"), ("birds/ann.json", "birds")])
def test_the_run_folder_is_named_after_the_data(tmp_path, path, name):
    target = tmp_path / path
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix:
        target.write_text("{}")
    else:
        target.mkdir()
    assert data_name(target) == name


def test_folders_are_described_from_listings_and_headers(tmp_path):
    root = write_image_folders(tmp_path / "pets", n_per_class=4, size=40)
    facts = describe_folders(str(root / "train"), str(root / "val"), limit_train=6)
    assert (facts.name, facts.train, facts.val, facts.class_names) == ("pets", 6, 12, ["cat", "dog", "owl"])
    assert facts.median_size == (40, 40) and facts.channels == 3
    import cv2
    gray = tmp_path / "gray"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (gray / split / c).mkdir(parents=True)
            cv2.imwrite(str(gray / split / c / "0.png"), np.zeros((28, 30), np.uint8))
    assert describe_folders(str(gray / "train"), str(gray / "val")).channels == 1


def test_coco_classes_are_its_categories_and_sizes_come_from_the_file(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        (tmp_path / split).mkdir()
        json.dump({"images": [{"id": i, "file_name": f"{i}.jpg", "width": 300 + 100 * i, "height": 200}
                              for i in range(n)], "annotations": [],
                   "categories": [{"id": 7, "name": "cup"}, {"id": 2, "name": "fork"}]},
                  open(tmp_path / f"{split}.json", "w"))
    paths = {"train_ann": str(tmp_path / "train.json"), "val_ann": str(tmp_path / "val.json"),
             "train_images": str(tmp_path / "train"), "val_images": str(tmp_path / "val")}
    facts = describe_coco(paths, background=False)
    assert facts.class_names == ["fork", "cup"] and (facts.train, facts.val) == (3, 2) and facts.median_size == (400, 200)
    assert describe_coco(paths, background=True).class_names == ["background", "fork", "cup"]
    with pytest.raises(ValueError, match="COCO data names its classes"):
        describe_coco(paths, background=False, classes=["a", "b"])


def test_voc_layout_with_other_classes_reads_them_from_the_xml_or_classes_txt(tmp_path):
    root = write_voc_tree(tmp_path)
    facts = describe_voc(str(root), "train", "val", segmentation=False)
    assert len(facts.class_names) == 20 and facts.record_classes  # every name is a VOC class: VOC's 20
    voc = root / "VOC2012"
    for xml in (voc / "Annotations").glob("*.xml"):
        xml.write_text(xml.read_text().replace("aeroplane", "kite").replace("bicycle", "drone"))
    assert describe_voc(str(root), "train", "val", segmentation=False).class_names == ["drone", "kite"]
    (voc / "classes.txt").write_text("# mine\nkite\ndrone\nballoon\n")
    assert describe_voc(str(root), "train", "val", segmentation=False).class_names == ["kite", "drone", "balloon"]
    seg = describe_voc(str(root), "train", "val", segmentation=True, classes=["background", "kite"])
    assert seg.class_names == ["background", "kite"] and seg.classes_from == "--classes"


def test_voc_segmentation_of_other_classes_numbers_the_mask_ids_instead_of_naming_voc_classes(tmp_path):
    root = write_voc_tree(tmp_path)
    voc = root / "VOC2012"
    facts = describe_voc(str(root), "train", "val", segmentation=True)
    assert len(facts.class_names) == 21 and not facts.notes and not facts.numbered  # VOC names, mask ids <= 20
    for xml in (voc / "Annotations").glob("*.xml"):
        xml.write_text(xml.read_text().replace("aeroplane", "kite").replace("bicycle", "drone"))
    facts = describe_voc(str(root), "train", "val", segmentation=True)
    # the XML names kite and drone, but not which mask id is which: numbered up to the largest id (1)
    assert facts.class_names == ["background", "class_1"] and facts.numbered
    assert "drone, kite" in facts.notes[0] and "classes.txt" in facts.notes[0]
    (voc / "classes.txt").write_text("background\nkite\n")
    facts = describe_voc(str(root), "train", "val", segmentation=True)
    assert facts.class_names == ["background", "kite"] and not facts.numbered
    (voc / "classes.txt").unlink()
    for xml in (voc / "Annotations").glob("*.xml"):  # masks only, ids VOC's could have: VOC's 21
        xml.unlink()
    facts = describe_voc(str(root), "train", "val", segmentation=True)
    assert len(facts.class_names) == 21 and not facts.numbered and facts.classes_from.startswith("Pascal VOC's 21")


def test_mask_folders_count_classes_from_the_masks_or_read_classes_txt(tmp_path):
    import cv2
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "masks" / split).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(tmp_path / "images" / split / f"{i}.png"), np.zeros((20, 30, 3), np.uint8))
            mask = np.zeros((20, 30), np.uint8)
            mask[:5, :5] = i + 1 if split == "train" else 1
            mask[10, :] = 255  # ignored
            cv2.imwrite(str(tmp_path / "masks" / split / f"{i}.png"), mask)
    paths = {k: str(tmp_path / kind / split) for k, kind, split in (
        ("train_images", "images", "train"), ("val_images", "images", "val"), ("train_masks", "masks", "train"),
        ("val_masks", "masks", "val"))}
    (tmp_path / "masks" / "train" / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # a macOS leftover: no mask
    facts = describe_masks(paths)
    assert facts.class_names == ["background", "class_1", "class_2", "class_3"] and facts.notes
    (tmp_path / "masks" / "classes.txt").write_text("background\nsky\nroad\ncar\n")
    facts = describe_masks(paths)
    assert facts.class_names == ["background", "sky", "road", "car"] and not facts.notes
    assert facts.median_size == (30, 20) and facts.record_classes


def test_few_images_from_scratch_get_strong_decay_and_a_long_run():
    def made(train, device, source=None):
        values = _values(derive("classify", _facts(train=train, median_size=(96, 96)), device=device, given={},
                                cpus=2, imagenet_source=lambda: source))
        steps = train // values["train.batch_size"]  # training drops the last partial batch
        return values, values["train.epochs"] * steps

    for device, target in (("cpu", 3000), ("cuda", 6000)):
        values, total = made(200, device)
        assert values["optim.weight_decay"] == values["optim.norm_weight_decay"] == 2.0
        assert target <= total < target + 20  # the steps, not a number of epochs
    for values, total in (made(200, "cpu", source="cache"), made(5000, "cpu")):  # pretrained, or enough images
        assert values["optim.weight_decay"] == 0.05 and "optim.norm_weight_decay" not in values
        assert total < 1000
    values, _ = made(200, "cpu")
    derived = derive("detect", _facts(kind="coco", train=200), device="cpu", given={}, cpus=2)
    assert _values(derived)["optim.weight_decay"] == 0.05  # the dense tasks keep their rule


def _turned_shapes(rng, n, turn):
    """``n`` 32x32 images of an L shape at a random place, each turned by ``turn(rng)`` quarters."""
    images = []
    for _ in range(n):
        img = rng.integers(0, 40, (32, 32), dtype=np.uint8)
        y, x = rng.integers(2, 14, 2)
        img[y:y + 16, x:x + 4] = 220
        img[y + 12:y + 16, x:x + 12] = 220
        images.append(np.ascontiguousarray(np.rot90(img, turn(rng))))
    return images


def test_quarter_turns_only_for_data_without_an_up():
    rng = np.random.default_rng(0)
    any_turn = {c: _turned_shapes(rng, 40, lambda r: int(r.integers(4))) for c in ("a", "b")}
    assert orientation_check(any_turn).free
    upright = {"a": any_turn["a"], "b": _turned_shapes(rng, 40, lambda r: 0)}  # one class always upright
    check = orientation_check(upright)
    assert not check.free and "'b'" in check.why
    stripes = []  # no mean image to see, but every edge horizontal
    for _ in range(40):
        img = np.zeros((32, 32), np.uint8)
        img[int(rng.integers(4)):: 4] = 200
        stripes.append(img)
    check = orientation_check({"a": any_turn["a"], "s": stripes})
    assert not check.free and "edges" in check.why

    free = _facts(orientation=lambda: Orientation(True, "no up"))
    assert _values(derive("classify", free, device="cpu", given={}, cpus=2))["data.rot90"] is True
    assert _values(derive("classify", _facts(orientation=lambda: Orientation(False, "an up")), device="cpu", given={},
                          cpus=2))["data.rot90"] is False
    assert "data.rot90" not in _values(derive("classify", _facts(), device="cpu", given={}, cpus=2))  # not looked at
    assert _values(derive("classify", free, device="cpu", given={"data.rot90": False}, cpus=2))["data.rot90"] is False

    def never():
        raise AssertionError("decoded images for a rule a named recipe does not use")

    derive("classify", _facts(orientation=never), device="cpu", given={}, named_recipe=True)


def test_folders_are_described_with_their_orientation(tmp_path):
    write_image_folders(tmp_path, n_per_class=8)
    facts = describe_folders(str(tmp_path / "train"), str(tmp_path / "val"))
    assert facts.orientation is not None and facts.orientation().free  # noise images: no up


def test_the_small_data_batch_is_the_measured_one():
    def batch(train):
        return _values(derive("classify", _facts(train=train, median_size=(96, 96)), device="cpu", given={},
                              cpus=2))["train.batch_size"]

    assert batch(200) == 16 and batch(900) == 16 and batch(96) == 8  # not 64 at 900 images: hours on the CPU
    assert batch(2000) == 64  # enough images: the device's batch
