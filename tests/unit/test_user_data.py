"""A user's own work: pretrained trunks by name (offline, from the libraries' caches), photos at
their own resolution (the aspect mode), Pascal VOC in its own layout. (The runs on such data:
tests/e2e/test_user_data_runs.py.)"""
import math
import time

import numpy as np
import pytest
import torch

from backbones import build_backbone
from backbones import pretrained as pretrained_module
from tests.fakes import TV_FILE, boxed_image, write_odd_coco, write_torchvision_resnet18, write_voc_tree


def _features(model, x):
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------- weights by name

@pytest.mark.parametrize("name", ["torchvision:IMAGENET1K_V1", "torchvision:DEFAULT", "imagenet"])
def test_torchvision_name_loads_the_cached_file(torch_home, name):
    from torchvision.models._utils import IntermediateLayerGetter
    tv = write_torchvision_resnet18(torch_home)
    ours = build_backbone("resnet18", weights=name).eval()
    ref = IntermediateLayerGetter(tv, {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"})
    x = torch.randn(2, 3, 64, 96)
    a, b = _features(ours, x), _features(ref, x)
    for k in ("c2", "c3", "c4", "c5"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_weights_source_says_cache_download_or_neither(torch_home, monkeypatch):
    answers = [False]
    probes = []
    monkeypatch.setattr(pretrained_module, "_reachable", lambda url: probes.append(url) or answers[-1])
    monkeypatch.delenv("ONETRUNK_OFFLINE")
    assert pretrained_module.source("imagenet", "resnet18") is None  # the host does not answer
    answers.append(True)
    assert pretrained_module.source("imagenet", "resnet18") == "download"
    assert pretrained_module.source("imagenet", "resnet18", network=False) is None
    assert len(probes) == 2  # network=False asks no host: every torchrun rank gets the same answer
    monkeypatch.setenv("ONETRUNK_OFFLINE", "1")
    assert pretrained_module.source("imagenet", "resnet18") is None and len(probes) == 2
    write_torchvision_resnet18(torch_home)
    assert pretrained_module.source("imagenet", "resnet18") == "cache"


def test_the_host_probe_waits_a_few_seconds_at_most(monkeypatch):
    import time

    monkeypatch.setattr(pretrained_module, "_PROBE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(pretrained_module.socket, "create_connection", lambda *a, **k: time.sleep(3))  # a stuck lookup
    start = time.perf_counter()
    assert not pretrained_module._reachable("https://download.pytorch.org/models/x.pth")
    assert time.perf_counter() - start < 1.5


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


@pytest.mark.parametrize("h, w", [(97, 131), (375, 500), (131, 97)])
def test_aspect_transforms_keep_boxes_and_masks_on_the_content(h, w):
    from tasks.data.transforms import SizedTransforms
    img, mask, box = boxed_image(h, w)
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


def test_aspect_evaluation_maps_back_to_the_file(tmp_path):
    from tasks.data.coco import CocoDetection, coco_evaluate, collate_detection, detections_to_coco
    from tasks.data.preprocess import Preprocess
    flags = write_odd_coco(tmp_path / "d", [(97, 131), (375, 500), (131, 97)])
    pre = Preprocess(3, (0.5,) * 3, (0.2,) * 3, "shorter", 96, max_size=160)
    ds = CocoDetection(flags[1], flags[3], pre.albumentations(boxes=True))
    images, targets = collate_detection([ds[i] for i in range(len(ds))])
    assert images.shape[-1] % 32 == 0 and images.shape[-2] % 32 == 0
    outputs = [{"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"]} for t in targets]
    assert coco_evaluate(ds.coco, detections_to_coco(outputs, targets, ds.cat_ids))["AP"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- Pascal VOC

def test_voc_boxes_difficult_as_crowd_and_coco_corners(tmp_path):
    from tasks.data.voc import VOC_CLASSES, voc_detection
    ds = voc_detection(write_voc_tree(tmp_path), "train")
    assert ds.class_names == list(VOC_CLASSES) and len(ds) == 3
    _, target = ds[0]
    assert target["labels"].tolist() == [0]  # the difficult bicycle is no training target ...
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 10.0, 40.0, 40.0]]))  # 1-based -> 0-based
    crowd = [a for a in ds.coco.dataset["annotations"] if a["iscrowd"]]
    assert [a["category_id"] for a in crowd] == [2] * 3  # ... but an ignore region for COCOeval


def test_voc_missing_image_is_named(tmp_path):
    from tasks.data.voc import voc_detection, voc_segmentation
    root = write_voc_tree(tmp_path, missing="2012_000001")
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/2012_000001.jpg: image file not found"):
        voc_detection(root, "train")
    with pytest.raises(FileNotFoundError, match=r"JPEGImages/2012_000001.jpg: image file not found"):
        voc_segmentation(root, "train")
