"""Image-folder classification data: a user's own tree, bad files named or skipped."""
import pytest

from tasks.data.folders import ImageFolderDataset, collate_skip_bad
from tasks.data.images import ImageReadError
from tasks.data.transforms import classification_train_transforms
from tests.fakes import write_image_folders


def test_dataset_reads_classes_and_images(tmp_path):
    root = write_image_folders(tmp_path)
    ds = ImageFolderDataset(root / "train", transforms=classification_train_transforms(16, seed=0))
    assert ds.classes == ["cat", "dog", "owl"] and len(ds) == 18
    img, label = ds[7]
    assert img.shape == (3, 16, 16) and img.dtype.is_floating_point is False and label == 1
    gray = ImageFolderDataset(root / "val", channels=1, classes=ds.classes)
    assert gray[0][0].shape == (1, 20, 20)


def test_unreadable_image_is_named_or_skipped(tmp_path):
    root = write_image_folders(tmp_path)
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not a png at all")
    ds = ImageFolderDataset(root / "train")
    idx = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(ImageReadError, match="broken.png"):
        ds[idx]
    skipping = ImageFolderDataset(root / "train", skip_bad=True)
    images, labels, skipped = collate_skip_bad([skipping[idx], skipping[0]])
    assert [b.path for b in skipped] == [str(bad)] and images.shape[0] == 1 and labels.tolist() == [0]
    assert collate_skip_bad([skipping[idx]])[:2] == (None, None)  # nothing left of the batch


def test_val_classes_must_be_known(tmp_path):
    root = write_image_folders(tmp_path)
    (root / "val" / "emu").mkdir()
    with pytest.raises(ValueError, match="emu"):
        ImageFolderDataset(root / "val", classes=["cat", "dog", "owl"])


def test_a_training_class_folder_without_images_is_refused_a_validation_one_is_not(tmp_path):
    root = write_image_folders(tmp_path)
    (root / "train" / "emu").mkdir()
    (root / "train" / "emu" / "notes.txt").write_text("no image here")
    with pytest.warns(UserWarning, match="notes.txt"), \
            pytest.raises(ValueError, match=r"train: class folder emu holds no .*images: add images or remove it"):
        ImageFolderDataset(root / "train")
    for f in (root / "val" / "owl").iterdir():
        f.unlink()
    val = ImageFolderDataset(root / "val", classes=["cat", "dog", "owl"])  # no owl to score: allowed
    assert val.classes == ["cat", "dog", "owl"] and {label for _, label in val.samples} == {0, 1}


@pytest.mark.parametrize("rot90", [False, True])
def test_quarter_turns_turn_the_training_crops(rot90):
    import numpy as np

    ramp = np.add.outer(np.arange(32) * 2, np.arange(32)).astype(np.uint8)  # brightest at the bottom right
    image = np.repeat(ramp[..., None], 3, axis=2)
    transform = classification_train_transforms(16, hflip=False, rot90=rot90, seed=0)
    corners = set()
    for _ in range(40):
        out = transform(image=image)["image"][..., 0].astype(int)
        values = [out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]]
        corners.add(int(np.argmax(values)))
    assert corners == ({0, 1, 2, 3} if rot90 else {3})  # a crop keeps the up; the turns move it
