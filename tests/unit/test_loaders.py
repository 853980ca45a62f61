"""tasks.engine.loaders: the batch iterators the engine trains from (no processes, tiny tensors)."""
import collections

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tasks.data.gpu_augment import BatchAugment
from tasks.engine.loaders import (DeviceLoader, ShardSampler, TensorLoader, epoch_seed, make_loader, move_to,
                                  normalize_images, shard_range)

# ----------------------------------------------------------------------------- sharding over ranks

class Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _tensor_loader(n: int, train: bool, rank: int, batch: int = 16) -> TensorLoader:
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    return TensorLoader(images, torch.arange(n), batch_size=batch, augment=BatchAugment((0.0,), (1.0,)),
                        train=train, seed=3, rank=rank, world_size=2)


def _seen(loader, epoch: int) -> list[list[int]]:
    loader.set_epoch(epoch)
    return [b[1].tolist() if isinstance(b, (tuple, list)) else b.tolist() for b in loader]


@pytest.mark.parametrize("n", [96, 101])
def test_tensor_loader_shards_are_disjoint_and_cover_the_epoch(n):
    for epoch in (0, 1):
        r0, r1 = (_seen(_tensor_loader(n, True, r), epoch) for r in (0, 1))
        assert len(r0) == len(r1) == (n // 2) // 16  # equal steps, same per-rank batch
        assert all(len(b) == 16 for b in r0 + r1)
        a, b = sum(r0, []), sum(r1, [])
        assert not set(a) & set(b)
        if n == 96:  # divisible: the two ranks together see the whole epoch
            assert sorted(a + b) == list(range(n))
    assert _seen(_tensor_loader(n, True, 0), 0) != _seen(_tensor_loader(n, True, 0), 1)  # reshuffled
    # evaluation: contiguous, unpadded, every sample exactly once
    v0, v1 = (sum(_seen(_tensor_loader(n, False, r), 0), []) for r in (0, 1))
    assert v0 + v1 == list(range(n))


def test_one_process_tensor_loader_is_unchanged():
    # world size 1: the same batches as a plain permutation of the whole set
    loader = TensorLoader(torch.zeros(50, 1, 4, 4, dtype=torch.uint8), torch.arange(50), batch_size=16,
                          augment=BatchAugment((0.0,), (1.0,)), train=True, seed=3)
    from tasks.engine.loaders import epoch_seed
    gen = torch.Generator().manual_seed(epoch_seed(3, 0))
    order = torch.randperm(50, generator=gen)
    assert _seen(loader, 0) == [order[i * 16:(i + 1) * 16].tolist() for i in range(3)]


@pytest.mark.parametrize("n", [64, 71])
def test_dataloader_shards_are_disjoint_and_cover_the_epoch(n):
    def loader(rank, shuffle):
        dl = make_loader(Indices(n), batch_size=8, shuffle=shuffle, num_workers=0, collate_fn=torch.tensor, seed=5,
                         device=torch.device("cpu"), rank=rank, world_size=2)
        return DeviceLoader(dl, torch.device("cpu"), seed=5)
    for epoch in (0, 1):
        r0, r1 = (_seen(loader(r, True), epoch) for r in (0, 1))
        assert len(r0) == len(r1) == (n // 2) // 8 and all(len(b) == 8 for b in r0 + r1)
        a, b = sum(r0, []), sum(r1, [])
        assert not set(a) & set(b)
        if n == 64:
            assert sorted(a + b) == list(range(n))
    assert _seen(loader(0, True), 0) != _seen(loader(0, True), 1)
    v0, v1 = (sum(_seen(loader(r, False), 0), []) for r in (0, 1))
    assert v0 + v1 == list(range(n))  # no padding by repetition (DistributedSampler would pad 71 to 72)




# ----------------------------------------------------------------------------- one process

def _labels_loader(n=40, batch=8, train=True, seed=3, **kw):
    return TensorLoader(torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.arange(n), batch_size=batch,
                        augment=BatchAugment((0.0,), (1.0,)), train=train, seed=seed, **kw)


def test_batches_are_a_function_of_seed_and_epoch_alone():
    """What makes a resume exact: epoch 2's batches do not depend on the epochs iterated before."""
    fresh = _labels_loader()
    resumed = _labels_loader()
    _seen(fresh, 0), _seen(fresh, 1)
    assert _seen(fresh, 2) == _seen(resumed, 2)
    assert _seen(_labels_loader(seed=4), 2) != _seen(resumed, 2)
    # every training epoch is a permutation (40 / 8: nothing dropped)
    assert sorted(sum(_seen(resumed, 5), [])) == list(range(40))


def test_training_drops_the_ragged_batch_evaluation_keeps_it_and_a_tiny_set_still_gives_one_batch():
    train, val = _labels_loader(n=21, batch=8), _labels_loader(n=21, batch=8, train=False)
    assert len(train) == 2 and all(len(b) == 8 for b in _seen(train, 0))
    assert len(val) == 3 and sum(_seen(val, 0), []) == list(range(21))  # in order, every sample once
    tiny = _labels_loader(n=5, batch=8)
    assert len(tiny) == 1 and sorted(_seen(tiny, 0)[0]) == list(range(5))


def test_tensor_loader_refuses_mismatched_or_empty_data():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        TensorLoader(torch.zeros(3, 1, 4, 4), torch.arange(2), batch_size=2, augment=None, train=True)
    with pytest.raises(ValueError, match="empty dataset"):
        TensorLoader(torch.zeros(0, 1, 4, 4), torch.arange(0), batch_size=2, augment=None, train=True)
    with pytest.raises(ValueError, match="cannot be shared by 4 processes"):
        _labels_loader(n=3, batch=2, rank=0, world_size=4)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, 2\)"):
        _labels_loader(rank=2, world_size=2)


def test_mixing_applies_to_training_batches_only_with_an_epoch_seeded_rng():
    draws = []

    def mix(x, y, rng, epoch):
        draws.append(float(rng.random()))
        return x, y.float() + 0.5

    val = _labels_loader(train=False, mix=mix)
    assert all(y.dtype == torch.int64 for _, y in val) and not draws  # evaluation is never mixed
    train = _labels_loader(mix=mix)

    def epoch(e):
        draws.clear()
        train.set_epoch(e)
        labels = [y.tolist() for _, y in train]
        return labels, list(draws)
    first, again, other = epoch(1), epoch(1), epoch(2)
    assert all(v % 1 == 0.5 for batch in first[0] for v in batch) and len(first[1]) == len(train)
    assert first == again and first[1] != other[1]  # the same draws for the same epoch, others for the next


class _Pairs(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return None if i in (2, 3) else (torch.full((1, 2, 2), i, dtype=torch.uint8), i)


def test_device_loader_moves_finishes_and_skips_empty_batches():
    def collate(items):  # a batch whose samples were all left out is None (evaluation with skip_bad)
        items = [x for x in items if x is not None]
        return None if not items else (torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]))

    finished = []
    dl = DataLoader(_Pairs(), batch_size=2, collate_fn=collate)
    loader = DeviceLoader(dl, torch.device("cpu"), on_device=normalize_images(lambda x: x.float() / 255, False))
    batches = list(loader)
    assert len(loader) == 3 and len(batches) == 2  # the all-None batch is skipped
    for images, labels in batches:
        assert images.dtype == torch.float32 and float(images.max()) <= 1
        finished.append(labels.tolist())
    assert finished == [[0, 1], [4, 5]]
    assert loader.epoch_stats() == {}


def test_normalize_images_keeps_targets_and_sets_the_memory_format():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    out, targets = normalize_images(lambda t: t.float(), True)((x, {"boxes": 1}))
    assert out.is_contiguous(memory_format=torch.channels_last) and targets == {"boxes": 1}


def test_move_to_handles_nested_containers_and_leaves_other_values():
    batch = {"a": [torch.ones(1), (torch.zeros(1), "name")], "n": 3}
    moved = move_to(batch, torch.device("cpu"))
    assert isinstance(moved["a"][1], tuple) and moved["a"][1][1] == "name" and moved["n"] == 3
    assert torch.equal(moved["a"][0], torch.ones(1))
    pair = collections.namedtuple("Pair", "x name")(torch.ones(1), "a")
    assert move_to([pair], torch.device("cpu")) == [pair]


def test_make_loader_reseeds_worker_randomness_per_epoch():
    """Augmentations drawn in the dataset follow (seed, epoch): the same epoch gives the same draws."""
    class Draws(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return float(np.random.random())

    def epoch_draws(epoch):
        dl = make_loader(Draws(), batch_size=4, shuffle=False, num_workers=1, collate_fn=list, seed=9,
                         device=torch.device("cpu"), rank=0, world_size=1)
        loader = DeviceLoader(dl, torch.device("cpu"), seed=9)
        loader.set_epoch(epoch)
        return [b for batch in loader for b in batch]
    assert epoch_draws(1) == epoch_draws(1) != epoch_draws(2)


def test_workers_forked_after_cv2_ran_threaded_in_the_parent_do_not_hang():
    """OpenCV's thread pool, up in the parent (a threaded resize: evaluation, albumentations),
    makes a forked worker hang for good in ``seed_worker``'s ``cv2.setNumThreads``; every fork
    happens with cv2 single-threaded (the fork hook of ``tasks.data``), ours and a plain
    DataLoader's alike (the DataLoader's timeout turns a hang into a failure)."""
    import cv2
    from tasks.data.transforms import seed_worker

    class Resized(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return cv2.resize(np.full((600, 600, 3), i, np.uint8), (300, 300)).mean()

    threads = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (1000, 1000))  # the pool is up
        dl = DataLoader(Resized(), batch_size=2, num_workers=1, worker_init_fn=seed_worker, timeout=30)
        for _ in range(3):  # a fork per epoch: the parent's threads are back in between
            assert [b.tolist() for b in DeviceLoader(dl, torch.device("cpu"))] == [[0.0, 1.0]]
            assert cv2.getNumThreads() == 2
            cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (1000, 1000))
            assert [b.tolist() for b in dl] == [[0.0, 1.0]]  # a user's own loop over the DataLoader
            cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (1000, 1000))
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(threads)


def test_shard_range_and_sampler_cover_every_sample_once():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3):
            parts = [list(shard_range(n, r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            assert [list(ShardSampler(n, r, world)) for r in range(world)] == parts
    assert epoch_seed(1, 2) != epoch_seed(2, 1) and epoch_seed(1, 2, salt=1) != epoch_seed(1, 2)
