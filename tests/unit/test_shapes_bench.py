"""benchmarks.shapes: a COCO detection set that is not FashionScenes, its mask-folder and class-folder
layouts; benchmarks.small_sets, the classify command on such class-folder sets."""
import json

import pytest

from benchmarks.shapes import CLASSES, ensure_shapes, recipe_flags, segment_flags
from tasks.data.coco import CocoDetection
from tasks.data.segmentation import MaskFolderDataset


def test_shapes_writes_a_coco_set_the_detection_reader_loads(tmp_path):
    root = ensure_shapes(tmp_path / "shapes", train=4, val=2, seed=3)
    ds = CocoDetection(root / "train.json", root / "train")
    assert len(ds) == 4 and ds.num_classes == len(CLASSES)
    sizes = {tuple(s) for s in ds.image_sizes()}
    assert any(w != h for w, h in sizes)  # non-square images
    image, target = ds[0]
    assert image.shape[0] == 3 and target["boxes"].shape[-1] == 4
    flags = recipe_flags(root)
    assert "data.dataset=coco" in flags and any(f.endswith("val.json") for f in flags)


def test_shapes_reuses_its_own_set_and_never_touches_a_foreign_folder(tmp_path):
    root = ensure_shapes(tmp_path / "s", train=2, val=1)
    first = (root / "train.json").read_text()
    assert ensure_shapes(tmp_path / "s", train=2, val=1) == root and (root / "train.json").read_text() == first
    with pytest.raises(FileExistsError, match="not this generator's set"):
        ensure_shapes(tmp_path / "s", train=3, val=1)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "photo.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        ensure_shapes(user, train=2, val=1)
    assert (user / "photo.jpg").read_bytes() == b"x"
    assert json.loads((root / "shapes.json").read_text())["train"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_shapes_masks_layout_is_a_mask_folder_set_the_segmentation_reader_loads(tmp_path):
    root = ensure_shapes(tmp_path / "m", train=3, val=2, seed=7, masks=True)
    assert (root / "classes.txt").read_text().split() == ["background", *CLASSES]
    ds = MaskFolderDataset(root / "train" / "images", root / "train" / "masks", num_classes=len(CLASSES) + 1)
    assert len(ds) == 3
    image, mask = ds[0]
    assert image.shape[0] == 3 and mask.max() <= len(CLASSES) and (mask > 0).any()  # shapes painted with ids 1..4
    flags = segment_flags(root)
    assert flags[flags.index("--classes") + 1] == str((root / "classes.txt").resolve())
    assert json.loads((root / "shapes.json").read_text())["layout"] == "masks"
    with pytest.raises(FileExistsError):  # the COCO set is another set
        ensure_shapes(root, train=3, val=2, seed=7)


def test_shapes_folders_layout_is_a_balanced_class_folder_set_the_folder_reader_loads(tmp_path):
    from benchmarks.shapes import folder_flags
    from tasks.data.folders import ImageFolderDataset

    root = ensure_shapes(tmp_path / "f", train=8, val=4, seed=1, folders=True)
    ds = ImageFolderDataset(root / "train", channels=3)
    assert ds.classes == sorted(CLASSES) and len(ds) == 8
    assert all(len(list((root / "val" / c).iterdir())) == 1 for c in CLASSES)  # balanced classes
    image, label = ds[0][:2]
    assert image.shape[0] == 3 and 64 <= min(image.shape[1:]) and max(image.shape[1:]) <= 128
    assert folder_flags(root) == ["--train-images", str((root / "train").resolve()),
                                  "--val-images", str((root / "val").resolve())]
    with pytest.raises(ValueError, match="one layout"):
        ensure_shapes(tmp_path / "g", train=2, val=1, masks=True, folders=True)


def test_small_sets_runs_the_command_on_each_set_and_writes_the_accuracies(tmp_path):
    """benchmarks.small_sets: the classify command with each variant's --set values on a set it
    generates, the accuracies from the run's metrics.jsonl, the result file in the schema."""
    from benchmarks import small_sets

    out = tmp_path / "r.json"
    result = small_sets.main(["--out", str(tmp_path / "w"), "--sets", "shapes1", "--images", "8", "--device", "cpu",
                              "--variants", "short=train.epochs=1;data.image_size=32", "--workers", "0",
                              "--result", str(out)])
    (run,) = result["runs"]
    assert run["rc"] == 0 and run["epochs"] == 1 and 0.0 <= run["final"] <= 1.0 and len(run["curve"]) == 1
    assert any("data.rot90" in line for line in run["derivation"])  # the settings made for the set, printed
    saved = json.loads(out.read_text())
    assert saved["schema"] == "onetrunk-bench-1" and saved["numbers"]["short/shapes"]["n"] == 1
    assert (tmp_path / "w" / "sets" / "shapes1-8" / "train" / "circle").is_dir()
    with pytest.raises(ValueError, match="shapesN"):
        small_sets.main(["--out", str(tmp_path / "w"), "--sets", "cifar"])
