"""FashionScenes generator: determinism, COCO/mask validity, splits, caching, argument checks.

Runs on a tiny fake Fashion-MNIST (IDX files written by tests/fakes.py), never the real one."""
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tasks.data import scenes
from tests.fakes import BLOB_TEST_LABELS as TEST_LABELS
from tests.fakes import BLOB_TRAIN_LABELS as TRAIN_LABELS
from tests.fakes import write_blob_fashion_mnist

SMALL = dict(train=6, val=4, size=64)
# pycocotools' decode trips numpy 2's __array__ copy-keyword deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory):
    # train items carry labels 0..4 and test items 5..9: a scene's category ids tell its split
    return write_blob_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="module")
def dataset(fake_fmnist, tmp_path_factory):
    # 96 px with up to 8 items: heavy occlusion, and 112 px items must be clamped to the scene.
    out = tmp_path_factory.mktemp("scenes") / "ds"
    return scenes.generate_scenes(out, train=8, val=6, size=96, seed=3, min_items=4, max_items=8,
                                  data_dir=fake_fmnist, workers=1, progress=False)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root, split):
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_same_arguments_same_bytes_whatever_the_workers(fake_fmnist, tmp_path):
    a = scenes.generate_scenes(tmp_path / "a", **SMALL, data_dir=fake_fmnist, workers=1, progress=False)
    b = scenes.generate_scenes(tmp_path / "b", **SMALL, data_dir=fake_fmnist, workers=2, progress=False)
    files_a, files_b = _files(a), _files(b)
    assert len(files_a) == 2 * (6 + 4) + 2 + 1  # images + masks, two JSON files, DONE.json
    assert files_a == files_b
    c = scenes.generate_scenes(tmp_path / "c", **SMALL, seed=1, data_dir=fake_fmnist, workers=1, progress=False)
    files_c = _files(c)
    assert files_c.keys() == files_a.keys()
    differing = [k for k in files_a if k.startswith("images/") and files_a[k] != files_c[k]]
    assert len(differing) == 6 + 4


def test_files_and_coco_structure(dataset):
    for split, count in (("train", 8), ("val", 6)):
        coco = _load(dataset, split)
        assert coco["info"]["args"] == dict(train=8, val=6, size=96, seed=3, min_items=4, max_items=8)
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        assert {c["supercategory"] for c in coco["categories"]} == {"fashion"}
        assert len(coco["images"]) == count
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
        for im in coco["images"]:
            assert (im["width"], im["height"]) == (96, 96)
            with Image.open(dataset / "images" / split / im["file_name"]) as img:
                assert (img.mode, img.size) == ("RGB", (96, 96))
            with Image.open(dataset / "masks" / split / im["file_name"]) as mask:
                assert (mask.mode, mask.size) == ("L", (96, 96))


@pytest.mark.parametrize("split", ["train", "val"])
def test_annotations_match_visible_masks(dataset, split):
    coco = _load(dataset, split)
    assert coco["annotations"], "no annotations at all: the generator drops everything"
    for im in coco["images"]:
        semantic = np.array(Image.open(dataset / "masks" / split / im["file_name"]))
        assert set(np.unique(semantic)) <= set(range(11)) | {scenes.IGNORE_INDEX}
        covered = np.zeros_like(semantic, dtype=np.int32)
        for ann in (a for a in coco["annotations"] if a["image_id"] == im["id"]):
            assert 1 <= ann["category_id"] <= scenes.NUM_CLASSES and ann["iscrowd"] == 0
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
            m = mask_utils.decode(ann["segmentation"])
            assert m.shape == (96, 96) and int(m.sum()) == ann["area"]
            ys, xs = np.nonzero(m)
            tight = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert [float(v) for v in tight] == ann["bbox"]
            assert (semantic[m > 0] == ann["category_id"]).all()
            covered += m
        # Instances do not overlap, and every labelled pixel belongs to one of them: a dropped
        # item's pixels must be ignore, not an unannotated object.
        assert covered.max() <= 1
        labelled = (semantic > 0) & (semantic != scenes.IGNORE_INDEX)
        assert (labelled == (covered > 0)).all()


def test_train_scenes_use_train_split_and_val_the_test_split(dataset):
    for split, labels in (("train", TRAIN_LABELS), ("val", TEST_LABELS)):
        allowed = {c + 1 for c in labels}
        cats = {a["category_id"] for a in _load(dataset, split)["annotations"]}
        assert cats and cats <= allowed, (split, cats)
        for p in (dataset / "masks" / split).glob("*.png"):
            values = set(np.unique(np.array(Image.open(p)))) - {0, scenes.IGNORE_INDEX}
            assert values <= allowed, (p.name, values)


def test_regenerating_smaller_removes_stale_scenes(fake_fmnist, tmp_path):
    scenes.generate_scenes(tmp_path, train=5, val=3, size=64, data_dir=fake_fmnist, workers=1, progress=False)
    scenes.generate_scenes(tmp_path, train=2, val=1, size=64, data_dir=fake_fmnist, workers=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "images" / "train").iterdir()) == ["000000.png", "000001.png"]
    assert sorted(p.name for p in (tmp_path / "masks" / "val").iterdir()) == ["000000.png"]


def test_ensure_scenes_reuses_and_regenerates(fake_fmnist, tmp_path, monkeypatch):
    calls = []
    generate = scenes.generate_scenes

    def counting(*args, **kwargs):
        calls.append(kwargs["seed"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(scenes, "generate_scenes", counting)
    monkeypatch.setenv("ONETRUNK_DATA", str(tmp_path))
    kw = dict(train=3, val=2, size=64, data_dir=fake_fmnist, progress=False)
    root = scenes.ensure_scenes(**kw)
    assert root == tmp_path / "scenes-64-3-2-s0" and (root / "DONE.json").is_file() and calls == [0]
    assert len(list((root / "images" / "train").iterdir())) == 3
    assert scenes.ensure_scenes(**kw) == root and calls == [0]  # complete: reused
    (root / "DONE.json").unlink()
    assert scenes.ensure_scenes(**kw) == root and calls == [0, 0]  # incomplete: regenerated
    assert scenes.ensure_scenes(root, **kw, seed=5) == root and calls == [0, 0, 5]  # other args
    assert json.loads((root / "DONE.json").read_text())["args"]["seed"] == 5
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left


def test_interrupted_ensure_scenes_leaves_nothing_that_looks_complete(fake_fmnist, tmp_path, monkeypatch):
    generate = scenes.generate_scenes

    def crashing(out_dir, **kwargs):
        generate(out_dir, **kwargs)
        (out_dir / "DONE.json").unlink()  # as if killed just before the marker was written
        raise KeyboardInterrupt

    monkeypatch.setattr(scenes, "generate_scenes", crashing)
    with pytest.raises(KeyboardInterrupt):
        scenes.ensure_scenes(tmp_path / "ds", train=2, val=1, size=64, data_dir=fake_fmnist, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_ensure_scenes_refuses_to_delete_a_foreign_folder(fake_fmnist, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a FashionScenes dataset"):
        scenes.ensure_scenes(tmp_path, train=2, val=1, size=64, data_dir=fake_fmnist, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kwargs, name", [
    (dict(size=32), "size"),
    (dict(train=-1), "train"),
    (dict(val=-2), "val"),
    (dict(seed=-1), "seed"),
    (dict(min_items=0), "min_items"),
    (dict(min_items=5, max_items=3), "min_items"),
    (dict(workers=0), "workers"),
    (dict(size=64.5), "size"),
])
def test_bad_arguments_name_the_argument(fake_fmnist, tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}="):
        scenes.generate_scenes(tmp_path, **{**SMALL, **kwargs}, data_dir=fake_fmnist, progress=False)
    assert not (tmp_path / "DONE.json").exists()
    if "workers" not in kwargs and "min_items" not in kwargs:
        with pytest.raises(ValueError, match=rf"\b{name}="):
            scenes.ensure_scenes(tmp_path / "e", **{**SMALL, **kwargs}, data_dir=fake_fmnist, progress=False)


def test_scenes_cropped_to_other_aspect_ratios(tmp_path):
    """--aspect: non-square scenes whose boxes, RLE masks and label maps fit their own size."""
    import json

    from pycocotools import mask as mask_utils
    from PIL import Image

    from tasks.data import scenes
    from tests.fakes import write_fake_fashion_mnist
    fm = write_fake_fashion_mnist(tmp_path / "fm", n_train=64, n_test=32)
    root = scenes.generate_scenes(tmp_path / "s", train=12, val=4, size=64, data_dir=fm, workers=1,
                                  progress=False, aspect=(0.5, 2.0))
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    shapes = {(im["height"], im["width"]) for im in coco["images"]}
    assert len(shapes) > 2 and all(max(s) == 64 and 0.5 * 64 - 1 <= min(s) for s in shapes)
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    for im in coco["images"]:
        assert Image.open(root / "images" / "train" / im["file_name"]).size == (im["width"], im["height"])
        assert Image.open(root / "masks" / "train" / im["file_name"]).size == (im["width"], im["height"])
    for ann in coco["annotations"]:
        h, w = sizes[ann["image_id"]]
        x, y, bw, bh = ann["bbox"]
        assert ann["segmentation"]["size"] == [h, w] and x + bw <= w and y + bh <= h
        assert mask_utils.area(ann["segmentation"]) == ann["area"]
    square = scenes.generate_scenes(tmp_path / "q", train=12, val=4, size=64, data_dir=fm, workers=1, progress=False)
    first = json.loads((square / "annotations" / "instances_train.json").read_text())["images"][0]
    assert (first["height"], first["width"]) == (64, 64)  # no aspect: the square scenes as before
    scenes.render_preview(root, tmp_path / "preview.png")
