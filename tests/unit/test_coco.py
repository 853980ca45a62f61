"""COCO detection data: loading, bad input, transforms, seeding, batching and mAP round trip."""
import json
import warnings

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tasks.data.coco import CocoDetection, coco_evaluate, collate_detection, detections_to_coco
from tasks.data.images import ImageReadError, read_image
from tasks.data.preprocess import Preprocess
from tasks.data.transforms import detection_train_transforms, reseed_dataset, seed_worker
from tasks.detect import collate_detection_padded

W, H = 64, 48
CATEGORIES = [{"id": 42, "name": "hat"}, {"id": 3, "name": "shoe"}, {"id": 7, "name": "bag"}]
# Every non-crowd box is painted white on a dark background (clipped to the image), so a
# transformed box can be checked against the transformed pixels.
IMAGES = {  # id: (file, kind, [(ann id, category, xywh, iscrowd)])
    10: ("color.png", "bgr", [(1, 3, [5, 5, 20, 15], 0),
                              (2, 42, [50, 30, 30, 30], 0),    # partly outside: clipped
                              (3, 7, [30, 5, 10, 10], 1),      # crowd: not a target
                              (4, 7, [10, 30, 0, 10], 0),      # w = 0: degenerate
                              (5, 7, [70, 10, 10, 10], 0)]),   # fully outside: degenerate
    2: ("gray.png", "gray", [(6, 7, [20, 10, 16, 20], 0)]),
    5: ("rgba.png", "bgra", [(7, 42, [30, 20, 25, 20], 0)]),
    7: ("empty.png", "bgr", []),                                # negative image
}
BACKGROUND = {"bgr": (60, 30, 10), "gray": 40, "bgra": (10, 20, 30, 0)}


def _write_image(path, kind, anns):
    channels = {"bgr": 3, "gray": 1, "bgra": 4}[kind]
    img = np.zeros((H, W, channels), np.uint8)
    img[:] = BACKGROUND[kind]
    for _, _, (x, y, w, h), crowd in anns:
        if not crowd and w > 0:
            img[max(y, 0):y + h, max(x, 0):x + w] = 255
    assert cv2.imwrite(str(path), img[:, :, 0] if kind == "gray" else img)


def _coco_json(images=IMAGES):
    return {
        "images": [{"id": i, "file_name": f, "width": W, "height": H} for i, (f, _, _) in images.items()],
        "annotations": [{"id": a, "image_id": i, "category_id": c, "bbox": b, "iscrowd": crowd,
                         "area": b[2] * b[3]}
                        for i, (_, _, anns) in images.items() for a, c, b, crowd in anns],
        "categories": CATEGORIES,
    }


@pytest.fixture
def coco_dir(tmp_path):
    for img_id, (name, kind, anns) in IMAGES.items():
        _write_image(tmp_path / name, kind, anns)
    (tmp_path / "ann.json").write_text(json.dumps(_coco_json()))
    return tmp_path


def _dataset(root, transforms=None, **kw):
    with warnings.catch_warnings():  # the fixture's clipped / degenerate boxes warn on purpose
        warnings.simplefilter("ignore")
        return CocoDetection(root / "ann.json", root, transforms, **kw)


def _by_id(ds):
    return {t["image_id"]: (img, t) for img, t in (ds[i] for i in range(len(ds)))}


def test_non_contiguous_categories_map_to_labels_and_back(coco_dir):
    ds = _dataset(coco_dir)
    assert ds.cat_ids == [3, 7, 42] and ds.class_names == ["shoe", "bag", "hat"] and ds.num_classes == 3
    np.testing.assert_array_equal(ds.label_to_category([2, 0, 1]), [42, 3, 7])
    np.testing.assert_array_equal(ds.label_to_category(np.array([1])), [7])
    assert ds.label_to_category(torch.tensor([0, 2])).tolist() == [3, 42]
    samples = _by_id(ds)
    assert samples[2][1]["labels"].tolist() == [1]        # category 7
    assert samples[5][1]["labels"].tolist() == [2]        # category 42
    assert samples[10][1]["labels"].tolist() == [0, 2]    # categories 3, 42
    with pytest.raises(ValueError, match="labels must be in"):
        ds.label_to_category([3])


def test_negative_image_kept_and_order_and_limit(coco_dir):
    ds = _dataset(coco_dir)
    assert len(ds) == 4 and ds.stats["images"] == 4
    assert [ds[i][1]["image_id"] for i in range(4)] == [2, 5, 7, 10]  # sorted by id
    _, t = ds[2]
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
    # --limit: a seeded random subset (not the first N ids), the same for the same seed
    picks = {seed: sorted(_dataset(coco_dir, limit=2, seed=seed).coco.getImgIds()) for seed in range(6)}
    assert all(len(ids) == 2 and set(ids) <= {2, 5, 7, 10} for ids in picks.values())
    assert len({tuple(ids) for ids in picks.values()}) > 1
    assert sorted(_dataset(coco_dir, limit=2, seed=3).coco.getImgIds()) == picks[3]


def test_crowd_clipping_and_degenerate_boxes(coco_dir):
    with pytest.warns(UserWarning, match="1 clipped, 2 degenerate"):
        ds = CocoDetection(coco_dir / "ann.json", coco_dir)
    _, t = _by_id(ds)[10]
    # Crowd (30, 5, 40, 15) and the two degenerate boxes are gone; box 2 is clipped to the image.
    torch.testing.assert_close(t["boxes"], torch.tensor([[5., 5., 25., 20.], [50., 30., 64., 48.]]))
    assert {k: ds.stats[k] for k in ("annotations", "crowd", "clipped", "degenerate")} == \
        {"annotations": 4, "crowd": 1, "clipped": 1, "degenerate": 2}
    # The crowd region stays in the ground truth for COCOeval; degenerate boxes do not.
    gt = {a["id"]: a for a in ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[10]))}
    assert sorted(gt) == [1, 2, 3] and gt[3]["iscrowd"] == 1
    assert gt[2]["bbox"] == [50, 30, 14, 18]


def test_grayscale_and_rgba_become_rgb(coco_dir):
    samples = _by_id(_dataset(coco_dir))
    for img_id in (2, 5, 10):
        img = samples[img_id][0]
        assert img.dtype == torch.uint8 and img.shape == (3, H, W)
    assert samples[2][0][:, 0, 0].tolist() == [40, 40, 40]    # gray replicated
    assert samples[5][0][:, 0, 0].tolist() == [30, 20, 10]    # BGRA -> RGB, alpha dropped
    assert samples[10][0][:, 0, 0].tolist() == [10, 30, 60]   # BGR -> RGB


def test_16bit_image_becomes_8bit(tmp_path):
    img16 = np.array([[0, 65535, 257 * 100]], np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), img16)
    img = read_image(tmp_path / "deep.png")
    assert img.dtype == np.uint8 and img.shape == (1, 3, 3)
    assert img[0, :, 0].tolist() == [0, 255, 100] and (img[..., 0] == img[..., 2]).all()


def test_missing_image_raises_or_is_skipped(coco_dir):
    (coco_dir / "rgba.png").unlink()
    with pytest.raises(FileNotFoundError, match="rgba.png"):
        _dataset(coco_dir)
    with pytest.warns(UserWarning, match="1 skipped images"):
        ds = CocoDetection(coco_dir / "ann.json", coco_dir, skip_bad=True)
    assert len(ds) == 3 and ds.stats["skipped_images"] == 1
    assert 5 not in ds.coco.getImgIds()


def test_corrupt_image_raises_or_is_skipped(coco_dir):
    (coco_dir / "gray.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageReadError, match="gray.png"):
        _dataset(coco_dir)[0]
    ds = _dataset(coco_dir, skip_bad=True)
    with pytest.warns(UserWarning, match="gray.png"):
        _, t = ds[0]
    assert t["image_id"] == 5 and ds.stats["unreadable"] == 1   # the next sample instead
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once flagged, passed over without a read or a warning
        assert ds[0][1]["image_id"] == 5 and ds.stats["unreadable"] == 1
    assert list(ds.unusable) == [str(coco_dir / "gray.png")]
    with pytest.raises(ImageReadError, match=r"gray.png: .*; --set data.skip_bad=true skips"):
        _dataset(coco_dir)[0]


def test_unusable_images_found_by_workers_are_flagged_for_the_run(coco_dir):
    """Workers start afresh each epoch: the flag a worker sets reaches the main process and the
    next epoch's workers, which do not read the file again (here it became readable meanwhile)."""
    good = (coco_dir / "gray.png").read_bytes()
    (coco_dir / "gray.png").write_bytes(b"not a png at all")
    ds = _dataset(coco_dir, skip_bad=True)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_detection, timeout=60)

    def ids():
        return sorted(t["image_id"] for _, targets in loader for t in targets)

    assert ids() == [5, 5, 7, 10]  # gray.png (id 2) replaced by the next sample
    assert list(ds.unusable) == [str(coco_dir / "gray.png")]
    (coco_dir / "gray.png").write_bytes(good)
    assert ids() == [5, 5, 7, 10]
    assert [t["image_id"] for _, t in (_dataset(coco_dir, skip_bad=True)[i] for i in range(4))] == [2, 5, 7, 10]


@pytest.mark.parametrize("edit, message", [
    (lambda d: "{not json", "not valid JSON"),
    (lambda d: {k: v for k, v in d.items() if k != "categories"}, "no 'categories'"),
    (lambda d: {**d, "annotations": d["annotations"] + [
        {"id": 123, "image_id": 2, "category_id": 99, "bbox": [1, 1, 5, 5]}]}, "id 123: category_id 99"),
    (lambda d: {**d, "annotations": d["annotations"] + [
        {"id": 124, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5]}]}, "id 124: bbox"),
])
def test_malformed_annotation_file_names_file(coco_dir, edit, message):
    data = edit(_coco_json())
    (coco_dir / "bad.json").write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(ValueError, match=message) as err:
        CocoDetection(coco_dir / "bad.json", coco_dir)
    assert "bad.json" in str(err.value)


def test_missing_annotation_file_and_skip_bad_annotations(coco_dir):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(coco_dir / "nope.json", coco_dir)
    data = _coco_json()
    data["annotations"].append({"id": 123, "image_id": 2, "category_id": 99, "bbox": [1, 1, 5, 5]})
    (coco_dir / "bad.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="1 malformed"):
        ds = CocoDetection(coco_dir / "bad.json", coco_dir, skip_bad=True)
    assert ds.stats["malformed"] == 1 and ds.stats["annotations"] == 4


def _check_boxes_match_white(img, boxes):
    """Each box covers white pixels, and every white pixel lies in some box (+ blur margin)."""
    img = img.numpy().min(0)  # [H, W]: white in all channels
    size = img.shape
    limits = torch.tensor([size[1], size[0], size[1], size[0]])
    assert ((boxes >= 0) & (boxes <= limits)).all(), boxes  # inside the image
    assert ((boxes[:, 2:] > boxes[:, :2])).all(), boxes       # not degenerate
    covered = np.zeros(size, bool)
    for x1, y1, x2, y2 in boxes.tolist():
        inner = img[int(np.ceil(y1)) + 1:int(y2) - 1, int(np.ceil(x1)) + 1:int(x2) - 1]
        if inner.size:
            assert inner.mean() > 200, (x1, y1, x2, y2)
        covered[max(int(y1) - 2, 0):int(np.ceil(y2)) + 2, max(int(x1) - 2, 0):int(np.ceil(x2)) + 2] = True
    assert (img[~covered] < 150).all(), "white pixels outside every box"


@pytest.mark.parametrize("hflip", [0.5, 1.0])
def test_train_transforms_keep_boxes_on_content(coco_dir, hflip):
    # min_visibility=0: a box cropped to a sliver stays a target, so every white pixel left in
    # the image must belong to some box.
    ds = _dataset(coco_dir, detection_train_transforms(64, scale=(0.6, 1.6), hflip=hflip,
                                                       min_visibility=0.0, seed=1))
    seen = set()
    for _ in range(6):
        for i in range(len(ds)):
            img, t = ds[i]
            assert img.shape == (3, 64, 64) and t["size"] == (64, 64)
            _check_boxes_match_white(img, t["boxes"])
            seen.add(tuple(t["boxes"].flatten().round().tolist()))
    assert len(seen) > 12  # the augmentation actually varies


def test_train_transforms_draws_are_independent():
    # Compose(seed=...) alone gives RandomScale and HorizontalFlip identical streams, so the
    # flip would happen exactly when the scale is small; reseed_transforms must break that.
    t = detection_train_transforms(32, seed=0)
    t.save_applied_params = True
    image = np.zeros((24, 32, 3), np.uint8)
    draws = []
    for _ in range(60):
        applied = dict(t(image=image, bboxes=np.zeros((0, 4)), labels=[])["applied_transforms"])
        draws.append((applied["RandomScale"]["scale"] < 1.0, "HorizontalFlip" in applied))
    assert len(set(draws)) == 4, set(draws)


def test_seed_worker_reproducible_and_new_each_epoch(coco_dir):
    ds = _dataset(coco_dir, detection_train_transforms(64, seed=0))

    def run():
        loader = DataLoader(ds, batch_size=2, num_workers=2, worker_init_fn=seed_worker,
                            collate_fn=collate_detection, generator=torch.Generator().manual_seed(7), timeout=60)
        return [torch.cat([imgs.flatten() for imgs, _ in loader]) for _epoch in range(2)]

    first, second = run(), run()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], first[1])  # workers reseeded per epoch, not replayed
    # In-process reseeding (num_workers=0): same seed, same samples.
    assert reseed_dataset(torch.utils.data.Subset(ds, [0, 1]), 3) == 1
    a = ds[3][1]["boxes"]
    reseed_dataset(ds, 3)
    torch.testing.assert_close(ds[3][1]["boxes"], a)


class _CvThreads(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        import cv2
        return cv2.getNumThreads()


def test_seed_worker_gives_each_worker_one_opencv_thread():
    # OpenCV's default pool (one thread per core) in each of N workers oversubscribes the CPU
    loader = DataLoader(_CvThreads(), batch_size=1, num_workers=1, worker_init_fn=seed_worker, timeout=60)
    assert [int(b) for b in loader] == [1, 1]


def test_val_transforms_round_trip_gives_perfect_ap(coco_dir):
    pre = Preprocess(3, (0.5,) * 3, (0.2,) * 3, "longest", 50)  # evaluation's resize: aspect kept, no padding
    ds = _dataset(coco_dir, pre.albumentations(boxes=True))
    samples = [ds[i] for i in range(len(ds))]
    targets = [t for _, t in samples]
    for img, t in samples:
        assert img.shape == (3, 38, 50) and t["orig_size"] == (H, W)
        assert t["scale"][1] == pytest.approx(50 / W) and t["scale"][0] == pytest.approx(38 / H)
    outputs = [{"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"]}
               for t in targets]
    preds = detections_to_coco(outputs, targets, ds.label_to_category)
    assert len(preds) == 4
    for p in preds:  # back in file pixels, on the (clipped) ground truth box
        gt = [a["bbox"] for a in ds.coco.imgToAnns[p["image_id"]]
              if a["category_id"] == p["category_id"] and not a["iscrowd"]]
        assert np.allclose(p["bbox"], gt[0], atol=1e-3), (p, gt)
    metrics = coco_evaluate(ds.coco, preds)
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert abs(metrics["AP"] - 1.0) < 1e-6 and abs(metrics["AP75"] - 1.0) < 1e-6
    # Same through a plain cat_ids list; a 10% shift is no longer perfect at high IoU.
    shifted = detections_to_coco(
        [{**o, "boxes": o["boxes"] * 1.1} for o in outputs], targets, ds.cat_ids)
    assert coco_evaluate(ds.coco, shifted)["AP"] < 0.9


def test_evaluate_empty_predictions_is_zero(coco_dir):
    ds = _dataset(coco_dir)
    assert coco_evaluate(ds.coco, []) == dict.fromkeys(["AP", "AP50", "AP75", "APs", "APm", "APl"], 0.0)


def test_collate_pads_to_multiple_of_32(coco_dir):
    a = torch.full((3, 33, 40), 7, dtype=torch.uint8)
    b = torch.full((3, 20, 65), 9, dtype=torch.uint8)
    images, targets = collate_detection([(a, {"i": 0}), (b, {"i": 1})])
    assert images.shape == (2, 3, 64, 96) and images.dtype == torch.uint8
    assert targets == [{"i": 0}, {"i": 1}]
    assert (images[0, :, :33, :40] == 7).all() and images[0, :, 33:].sum() == 0 and images[0, :, :, 40:].sum() == 0
    assert (images[1, :, :20, :65] == 9).all() and images[1, :, 20:].sum() == 0
    images, _ = collate_detection([_dataset(coco_dir)[i] for i in range(2)])
    assert images.shape == (2, 3, 64, 64)


def test_padded_collate_pads_boxes_to_a_fixed_multiple(coco_dir):
    ds = _dataset(coco_dir)
    images, targets = collate_detection_padded([ds[i] for i in range(2)], box_multiple=8)
    _, per_image = collate_detection([ds[i] for i in range(2)])
    assert images.dtype == torch.uint8 and targets["boxes"].shape[:2] == targets["labels"].shape == (2, 8)
    for i, t in enumerate(per_image):
        m = len(t["labels"])
        torch.testing.assert_close(targets["boxes"][i, :m], t["boxes"].float())
        assert targets["labels"][i, :m].tolist() == t["labels"].tolist()
        assert targets["labels"][i, m:].eq(-1).all() and targets["boxes"][i, m:].eq(0).all()


def test_importing_the_data_modules_does_not_reach_the_network():
    """albumentations' import-time PyPI version check stays off (no network at run time)."""
    import subprocess
    import sys
    code = ("import os, urllib.request as u\n"
            "os.environ.pop('NO_ALBUMENTATIONS_UPDATE', None)\n"
            "calls = []\n"
            "def record(self, url, *a, **k):\n"
            "    calls.append(getattr(url, 'full_url', url)); raise OSError('offline')\n"
            "u.OpenerDirector.open = record\n"
            "import tasks.data.transforms, tasks.data.coco, tasks.data.folders\n"
            "print('calls', calls)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "calls []" in out.stdout, out.stdout


def _count_parses(monkeypatch) -> list:
    from tasks.data import coco

    parsed, real = [], coco.json.load
    monkeypatch.setattr(coco.json, "load", lambda f, **kw: parsed.append(f.name) or real(f, **kw))
    monkeypatch.setattr(coco, "_HANDOFF", {})
    return parsed


def test_describing_then_building_the_datasets_parses_each_file_once(coco_dir, monkeypatch):
    from tasks.engine.describe import describe_coco

    parsed = _count_parses(monkeypatch)
    (coco_dir / "val.json").write_text(json.dumps(_coco_json()))
    paths = {"train_ann": str(coco_dir / "ann.json"), "val_ann": str(coco_dir / "val.json"),
             "train_images": str(coco_dir)}
    facts = describe_coco(paths, background=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, val = _dataset(coco_dir), CocoDetection(coco_dir / "val.json", coco_dir)
    assert facts.class_names == train.class_names == val.class_names and len(train) == facts.train
    assert sorted(parsed) == sorted([paths["train_ann"], paths["val_ann"]])
    _dataset(coco_dir)  # the kept parse was taken: a later reader parses the file again
    assert len(parsed) == 3


def test_a_kept_parse_is_not_used_for_a_changed_file_and_at_most_two_are_kept(coco_dir, monkeypatch):
    from tasks.data import coco

    parsed = _count_parses(monkeypatch)
    path = coco_dir / "ann.json"
    coco.load_coco_json(path, keep=True)
    changed = _coco_json()
    changed["categories"] = changed["categories"][:2] + [{"id": 8, "name": "belt"}]
    path.write_text(json.dumps(changed) + " ")  # another size: another file
    assert [c["name"] for c in coco.load_coco_json(path)["categories"]][-1] == "belt" and len(parsed) == 2
    for name in ("a.json", "b.json", "c.json"):
        (coco_dir / name).write_text(json.dumps(_coco_json()))
        coco.load_coco_json(coco_dir / name, keep=True)
    assert len(coco._HANDOFF) == 2 and not any(k[0].endswith("a.json") for k in coco._HANDOFF)
