"""A user's own work: pretrained trunks by name (offline, from the libraries' caches), photos at
their own resolution (the aspect mode), Pascal VOC in its own layout."""
import json
import math
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from backbones import build_backbone
from backbones import pretrained as pretrained_module
from tasks import detect, load, segment
from tasks.engine.checkpoint import load_checkpoint
from tests.fakes import tiny_scenes_args

TV_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1 file name


def _features(model, x):
    with torch.no_grad():
        return model(x)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("ONETRUNK_OFFLINE", "1")
    return tmp_path / "torch" / "hub" / "checkpoints"


def _tv_file(folder: Path):
    import torchvision
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    tv = torchvision.models.resnet18().eval()
    torch.save(tv.state_dict(), folder / TV_FILE)
    return tv


# ----------------------------------------------------------------------------- weights by name

@pytest.mark.parametrize("name", ["torchvision:IMAGENET1K_V1", "torchvision:DEFAULT", "imagenet"])
def test_torchvision_name_loads_the_cached_file(torch_home, name):
    from torchvision.models._utils import IntermediateLayerGetter
    tv = _tv_file(torch_home)
    ours = build_backbone("resnet18", weights=name).eval()
    ref = IntermediateLayerGetter(tv, {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"})
    x = torch.randn(2, 3, 64, 96)
    a, b = _features(ours, x), _features(ref, x)
    for k in ("c2", "c3", "c4", "c5"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_missing_weights_name_the_file_the_folder_and_the_url(torch_home, monkeypatch):
    with pytest.raises(FileNotFoundError, match=rf"{TV_FILE} is not in the cache {torch_home} .*from "
                                                r"https://download.pytorch.org/models/" + TV_FILE):
        build_backbone("resnet18", weights="torchvision:IMAGENET1K_V1")
    # online but the server does not answer: the attempt fails fast, it does not hang
    monkeypatch.delenv("ONETRUNK_OFFLINE")
    real = pretrained_module.weights_info

    def unreachable(spec, arch):
        info = real(spec, arch)
        return pretrained_module.NamedWeights(**{**info.__dict__, "url": "http://127.0.0.1:9/" + TV_FILE})

    monkeypatch.setattr(pretrained_module, "weights_info", unreachable)
    t = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="cannot be downloaded here"):
        build_backbone("resnet18", weights="torchvision:IMAGENET1K_V1")
    assert time.perf_counter() - t < 10


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="no 'IMAGENET1K_V2' weights for resnet18; choose one of torchvision:IMAGENET1K_V1"):
        build_backbone("resnet18", weights="torchvision:IMAGENET1K_V2")
    with pytest.raises(ValueError, match="are for a timm resnet50, this trunk is a resnet18"):
        build_backbone("resnet18", weights="timm:resnet50.a1_in1k")


def test_timm_name_loads_from_the_hub_cache(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=rf"timm/resnet18.a1_in1k .* is not in the cache {tmp_path / 'hf' / 'hub'}"):
        build_backbone("resnet18", weights="timm:resnet18.a1_in1k")
    repo = tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k"  # the hub cache's layout
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    torch.manual_seed(4)
    ref = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    full = timm.create_model("resnet18")
    full.load_state_dict({**full.state_dict(), **ref.state_dict()})
    save_file(full.state_dict(), repo / "snapshots" / "c0ffee" / "model.safetensors")
    ours = build_backbone("resnet18", weights="timm:resnet18.a1_in1k").eval()
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(_features(ours, x).values(), _features(ref, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_run_from_named_weights_keeps_their_normalisation(torch_home, tmp_path, monkeypatch):
    _tv_file(torch_home)
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


def test_trunk_learning_rate_multiplier():
    from tasks.engine.config import OptimConfig
    from tasks.engine.optim import build_optimizer
    trunk = build_backbone("resnet18")
    model = torch.nn.ModuleDict({"backbone": trunk, "head": torch.nn.Linear(512, 3)})
    opt = build_optimizer(model, OptimConfig(lr=0.1, trunk_lr_mult=0.1), torch.device("cpu"))
    by_lr = {}
    for g in opt.param_groups:
        by_lr.setdefault(round(g["lr"], 6), set()).update(id(p) for p in g["params"])
    assert by_lr[0.01] == {id(p) for p in trunk.parameters()}
    assert by_lr[0.1] == {id(p) for p in model["head"].parameters()}


# ----------------------------------------------------------------------------- aspect mode

def test_aspect_batches_share_a_scale_and_an_aspect_group():
    from tasks.data.preprocess import resized_shape
    from tasks.engine.loaders import AspectBatchSampler
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(60, 600, (103, 2))]
    train = AspectBatchSampler(sizes, 4, scales=(64, 96, 128), max_size=200, train=True, seed=1)
    seen, batches = [], []
    for batch in train:
        assert len(batch) == 4 and len({s for _, s in batch}) == 1
        assert len({train.group[i] for i, _ in batch}) == 1
        seen += [i for i, _ in batch]
        batches.append(batch)
    assert len(seen) == len(set(seen)) == 4 * len(train)
    # the padding count is the epoch's own batches, each padded to multiples of 32
    content = padded = 0
    for b in batches:
        shapes = [resized_shape(*sizes[i], shorter=s, max_size=200) for i, s in b]
        assert all(max(h, w) <= 200 for h, w in shapes)
        content += sum(h * w for h, w in shapes)
        padded += len(b) * (math.ceil(max(h for h, _ in shapes) / 32) * 32) * (math.ceil(max(w for _, w in shapes) / 32) * 32)
    stats = train.epoch_stats()
    assert stats["pad_fraction"] == pytest.approx(1 - content / padded) and 0 < stats["pad_fraction"] < 0.5
    first = [b for b in train]
    train.set_epoch(1)
    assert [b for b in train] != first  # a new order every epoch
    evaluation = [b for b in AspectBatchSampler(sizes, 4, scales=(64, 96, 128), max_size=200, train=False)]
    assert sorted(i for b in evaluation for i, _ in b) == list(range(103))  # every image once
    assert {s for b in evaluation for _, s in b} == {128}
    ranks = [[i for b in AspectBatchSampler(sizes, 4, scales=(64,), max_size=200, train=True, seed=1, rank=r,
                                            world_size=2) for i, _ in b] for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) == len(ranks[1])


def _boxed_image(h, w):
    img = np.full((h, w, 3), 20, np.uint8)
    x, y, bw, bh = w // 5, h // 4, w // 3, h // 2
    img[y:y + bh, x:x + bw] = 240
    mask = np.zeros((h, w), np.uint8)
    mask[y:y + bh, x:x + bw] = 1
    return img, mask, [x, y, x + bw, y + bh]


@pytest.mark.parametrize("h, w", [(97, 131), (375, 500), (131, 97)])
def test_aspect_transforms_keep_boxes_and_masks_on_the_content(h, w):
    from tasks.data.transforms import SizedTransforms
    img, mask, box = _boxed_image(h, w)
    t = SizedTransforms((64, 96), 160, hflip=0.5, boxes=True, seed=0)
    for size in (64, 96):
        for _ in range(4):  # flipped and not
            out = t.at(size)(image=img, mask=mask, bboxes=np.array([box], np.float32), labels=np.array([1]))
            oh, ow = out["image"].shape[:2]
            assert min(oh, ow) == size or max(oh, ow) == 160
            x1, y1, x2, y2 = np.asarray(out["bboxes"][0]).round().astype(int)
            inside = out["image"][y1 + 1:y2 - 1, x1 + 1:x2 - 1].mean(-1)
            assert (inside > 200).mean() > 0.95 and (out["mask"][y1 + 1:y2 - 1, x1 + 1:x2 - 1] == 1).mean() > 0.95
            assert out["mask"].sum() == pytest.approx((x2 - x1) * (y2 - y1), rel=0.15)


def _odd_coco(root: Path, sizes) -> list[str]:
    flags = []
    for split, shapes in (("train", sizes), ("val", sizes[:3])):
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i, (h, w) in enumerate(shapes):
            img, _, (x1, y1, x2, y2) = _boxed_image(h, w)
            cv2.imwrite(str(root / split / f"{i}.png"), img)
            images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
            anns.append({"id": i + 1, "image_id": i, "category_id": 5, "bbox": [x1, y1, x2 - x1, y2 - y1]})
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                        "categories": [{"id": 5, "name": "box"}]}))
        flags += [f"--{split}-ann", str(root / f"{split}.json"), f"--{split}-images", str(root / split)]
    return flags


ASPECT = ["--set", "data.resize=aspect", "--set", "data.min_size=[64,96]", "--set", "data.max_size=160",
          "--set", "data.num_workers=0", "--device", "cpu", "--quiet", "--batch-size", "2", "--epochs", "1"]


def test_odd_sizes_train_and_evaluate_in_the_aspect_mode(tmp_path):
    flags = _odd_coco(tmp_path / "d", [(97, 131), (375, 500), (131, 97), (500, 375), (120, 160), (160, 120)])
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


def test_aspect_evaluation_maps_back_to_the_file(tmp_path):
    from tasks.data.coco import CocoDetection, coco_evaluate, collate_detection, detections_to_coco
    from tasks.data.preprocess import Preprocess
    flags = _odd_coco(tmp_path / "d", [(97, 131), (375, 500), (131, 97)])
    pre = Preprocess(3, (0.5,) * 3, (0.2,) * 3, "shorter", 96, max_size=160)
    ds = CocoDetection(flags[1], flags[3], pre.albumentations(boxes=True))
    images, targets = collate_detection([ds[i] for i in range(len(ds))])
    assert images.shape[-1] % 32 == 0 and images.shape[-2] % 32 == 0
    outputs = [{"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"]} for t in targets]
    assert coco_evaluate(ds.coco, detections_to_coco(outputs, targets, ds.cat_ids))["AP"] == pytest.approx(1.0)


def test_segmentation_in_the_aspect_mode(tmp_path):
    flags = []
    for split, shapes in (("train", [(97, 131), (131, 97), (120, 160), (160, 120)]), ("val", [(97, 131), (375, 500)])):
        for folder in ("images", "masks"):
            (tmp_path / split / folder).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            img, mask, _ = _boxed_image(h, w)
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

VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192]  # index 255: the border


def _voc_tree(root: Path, missing: str | None = None) -> Path:
    """VOCdevkit/VOC2012 with 4 images: boxes (one ``difficult``) and palette masks."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("Annotations", "JPEGImages", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    ids = [f"2012_00000{i}" for i in range(4)]
    for k, stem in enumerate(ids):
        h, w = (60, 80) if k % 2 else (80, 60)
        img = np.full((h, w, 3), 30, np.uint8)
        img[10:40, 10:40] = (0, 0, 230)  # an aeroplane, say (BGR red)
        img[45:55, 15:25] = (0, 230, 0)
        cv2.imwrite(str(voc / "JPEGImages" / f"{stem}.jpg"), img)
        mask = np.zeros((h, w), np.uint8)
        mask[10:40, 10:40] = 1
        mask[9, 9:41] = 255  # VOC's object border: ignored
        m = Image.fromarray(mask, mode="P")
        m.putpalette(VOC_PALETTE)
        m.save(voc / "SegmentationClass" / f"{stem}.png")
        ann = ET.Element("annotation")
        ET.SubElement(ann, "filename").text = f"{stem}.jpg"
        size = ET.SubElement(ann, "size")
        for key, value in (("width", w), ("height", h), ("depth", 3)):
            ET.SubElement(size, key).text = str(value)
        for name, (x1, y1, x2, y2), difficult in (("aeroplane", (11, 11, 40, 40), 0), ("bicycle", (16, 46, 25, 55), 1)):
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = name
            ET.SubElement(obj, "difficult").text = str(difficult)
            box = ET.SubElement(obj, "bndbox")
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
                ET.SubElement(box, key).text = str(value)
        ET.ElementTree(ann).write(voc / "Annotations" / f"{stem}.xml")
    for kind in ("Main", "Segmentation"):
        (voc / "ImageSets" / kind / "train.txt").write_text("\n".join(ids[:3]) + "\n")
        (voc / "ImageSets" / kind / "val.txt").write_text(ids[3] + "\n")
    if missing:
        (voc / "JPEGImages" / f"{missing}.jpg").unlink()
    return root / "VOCdevkit"


def test_voc_boxes_difficult_as_crowd_and_coco_corners(tmp_path):
    from tasks.data.voc import VOC_CLASSES, voc_detection
    ds = voc_detection(_voc_tree(tmp_path), "train")
    assert ds.class_names == list(VOC_CLASSES) and len(ds) == 3
    _, target = ds[0]
    assert target["labels"].tolist() == [0]  # the difficult bicycle is no training target ...
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 10.0, 40.0, 40.0]]))  # 1-based -> 0-based
    crowd = [a for a in ds.coco.dataset["annotations"] if a["iscrowd"]]
    assert [a["category_id"] for a in crowd] == [2] * 3  # ... but an ignore region for COCOeval


def test_voc_trains_a_step_for_detection_and_segmentation(tmp_path):
    root = _voc_tree(tmp_path)
    common = ["--voc-root", str(root), "--device", "cpu", "--quiet", "--epochs", "1", "--batch-size", "2",
              "--set", "data.num_workers=0", "--set", "data.image_size=64"]
    detect.main(common + ["--config", "configs/detect/scenes_quick.yaml", "--set", "model.fpn_channels=16",
                          "--set", "model.num_convs=1", "--output", str(tmp_path / "det")])
    assert "val_AP" in json.loads((tmp_path / "det" / "metrics.jsonl").read_text())
    segment.main(common + ["--config", "configs/segment/scenes_quick.yaml", "--output", str(tmp_path / "seg")])
    record = json.loads((tmp_path / "seg" / "metrics.jsonl").read_text())
    assert len(record["val_iou"]) == 21  # background + the 20 VOC classes


def test_voc_missing_image_is_named(tmp_path):
    from tasks.data.voc import voc_detection, voc_segmentation
    root = _voc_tree(tmp_path, missing="2012_000001")
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/2012_000001.jpg: image file not found"):
        voc_detection(root, "train")
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/2012_000001.jpg: image file not found"):
        voc_segmentation(root, "train")


@pytest.mark.parametrize("task, recipe", [(detect, "configs/detect/coco_fcos_resnet50.yaml"),
                                          (segment, "configs/segment/voc_fcn_resnet50.yaml")])
def test_the_user_data_recipes_run_end_to_end(task, recipe, tmp_path, torch_home):
    """The shipped recipes as they are (ImageNet ResNet-50 by name, aspect mode, fine-tuning
    settings) on a tiny VOC tree, with small sizes: the named weights come from the cache."""
    import torchvision
    torch_home.mkdir(parents=True)
    torch.save(torchvision.models.resnet50().state_dict(), torch_home / "resnet50-11ad3fa6.pth")  # the DEFAULT's file
    out = tmp_path / "run"
    metrics = task.main(["--config", recipe, "--voc-root", str(_voc_tree(tmp_path)), "--device", "cpu", "--quiet",
                         "--epochs", "1", "--batch-size", "2", "--set", "data.min_size=[64,96]",
                         "--set", "data.max_size=128", "--set", "data.num_workers=0", "--output", str(out)])
    assert ("AP" if task is detect else "miou") in metrics
    model = load(out / "best.pt", device="cpu")
    assert model.preprocess.resize == "shorter" and model.preprocess.size == 96
    (result,) = model.predict(str(next((tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))))
    assert result
