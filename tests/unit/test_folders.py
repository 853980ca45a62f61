"""Image-folder classification data: a user's own tree, bad files named or skipped."""
import cv2
import numpy as np
import pytest

from tasks import classify
from tasks.data.folders import ImageFolderDataset, collate_skip_bad
from tasks.data.images import ImageReadError
from tasks.data.transforms import classification_train_transforms


def _tree(root, n_per_class=6, size=20):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, name in enumerate(["cat", "dog", "owl"]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n_per_class):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                img[:, :, k] += 150  # one colour channel per class: learnable
                cv2.imwrite(str(folder / f"{i}.png"), img)
    return root


def test_dataset_reads_classes_and_images(tmp_path):
    root = _tree(tmp_path)
    ds = ImageFolderDataset(root / "train", transforms=classification_train_transforms(16, seed=0))
    assert ds.classes == ["cat", "dog", "owl"] and len(ds) == 18
    img, label = ds[7]
    assert img.shape == (3, 16, 16) and img.dtype.is_floating_point is False and label == 1
    gray = ImageFolderDataset(root / "val", channels=1, classes=ds.classes)
    assert gray[0][0].shape == (1, 20, 20)


def test_unreadable_image_is_named_or_skipped(tmp_path):
    root = _tree(tmp_path)
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not a png at all")
    ds = ImageFolderDataset(root / "train")
    idx = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(ImageReadError, match="broken.png"):
        ds[idx]
    skipping = ImageFolderDataset(root / "train", skip_bad=True)
    images, labels, skipped = collate_skip_bad([skipping[idx], skipping[0]])
    assert skipped == 1 and images.shape[0] == 1 and labels.tolist() == [0]


def test_val_classes_must_be_known(tmp_path):
    root = _tree(tmp_path)
    (root / "val" / "emu").mkdir()
    with pytest.raises(ValueError, match="emu"):
        ImageFolderDataset(root / "val", classes=["cat", "dog", "owl"])


def test_classify_on_folders_with_skip_bad(tmp_path):
    root = _tree(tmp_path)
    (root / "train" / "owl" / "broken.png").write_bytes(b"\x89PNG garbage")
    base = ["--device", "cpu", "--quiet", "--train-images", str(root / "train"), "--val-images", str(root / "val"),
            "--epochs", "1", "--batch-size", "6", "--set", "data.image_size=16", "--set", "data.num_workers=0",
            "--set", "optim.lr=0.01"]
    metrics = classify.main(base + ["--output", str(tmp_path / "run"), "--set", "model.num_classes=3",
                                    "--set", "data.skip_bad=true"])
    assert 0.0 <= metrics["acc"] <= 1.0 and (tmp_path / "run" / "confusion.png").is_file()
    with pytest.raises(ImageReadError, match="broken.png"):  # without skip_bad: stops, naming the file
        classify.main(base + ["--output", str(tmp_path / "run2"), "--set", "model.num_classes=3"])
    with pytest.raises(ValueError, match="num_classes=10"):
        classify.main(base + ["--output", str(tmp_path / "run3")])
