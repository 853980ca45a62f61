"""--limit-train / --limit-val: a seeded random subset, class-balanced where items have one class."""
import collections

import pytest

from tasks.data.folders import ImageFolderDataset
from tasks.data.subset import subset_indices
from tests.fakes import write_image_folders


def test_classes_take_turns_and_a_small_class_leaves_its_turns_to_the_others():
    labels = [0] * 50 + [1] * 50 + [2] * 3 + [3] * 50
    for seed in range(5):
        idx = subset_indices(len(labels), 8, seed, labels)
        assert idx == sorted(set(idx)) and collections.Counter(labels[i] for i in idx) == {0: 2, 1: 2, 2: 2, 3: 2}
    counts = collections.Counter(labels[i] for i in subset_indices(len(labels), 20, 1, labels))
    assert counts[2] == 3 and sum(counts.values()) == 20 and max(counts.values()) - min(counts[c] for c in (0, 1, 3)) <= 1


def test_the_subset_depends_on_the_seed_only():
    assert subset_indices(100, 10, 4) == subset_indices(100, 10, 4)
    assert subset_indices(100, 10, 4) != subset_indices(100, 10, 5)
    assert subset_indices(5, None, 0) == subset_indices(5, 9, 0) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="limit=-1"):
        subset_indices(5, -1, 0)


def test_limit_of_an_image_folder_set_covers_every_class(tmp_path):
    root = write_image_folders(tmp_path, n_per_class=6)
    first = ImageFolderDataset(root / "train", limit=3, seed=0)
    assert sorted(label for _, label in first.samples) == [0, 1, 2]  # the first 3 files would all be "cat"
    other = ImageFolderDataset(root / "train", limit=3, seed=1)
    assert {p for p, _ in first.samples} != {p for p, _ in other.samples}
