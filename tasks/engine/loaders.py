"""Batch iterators the engine trains from: both yield ``(images, targets)`` on the device.

``TensorLoader`` serves a dataset that lives on the device as one uint8 tensor (shuffling
and augmentation on the device too); ``DeviceLoader`` wraps a ``DataLoader`` (decoding in
worker processes) and moves each batch to the device. Both reseed from ``(seed, epoch)``
in ``set_epoch``, so a resumed run sees exactly the batches an uninterrupted one would.

Under ``torchrun`` (several ranks) both shard the data by rank: in training every rank
takes a disjoint ``1/world`` share of the epoch's permutation (the same permutation on every
rank, from the shared seed), with the same per-GPU batch size and the same number of steps
(the remainder is dropped); in evaluation every rank takes a contiguous range of the samples,
unpadded, so every sample is evaluated exactly once. The data order is a function of
``(seed, epoch, world size)``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from tasks.data.device_cache import DenseAugment, DenseCache
from tasks.data.gpu_augment import BatchAugment

from . import distributed

__all__ = ["TensorLoader", "DenseTensorLoader", "DeviceLoader", "ShardSampler", "AspectBatchSampler", "epoch_seed", "move_to", "make_loader",
           "normalize_images", "shard_range"]


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7919 + salt) % (2 ** 63 - 1)


def shard_range(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of ``n`` samples; the shares of all ranks are disjoint,
    unpadded and cover ``range(n)`` (their sizes differ by at most one)."""
    return range(n * rank // world, n * (rank + 1) // world)


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    rank = distributed.rank() if rank is None else rank
    world = distributed.world_size() if world_size is None else world_size
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    return rank, world


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank ``rank`` takes ``shard_range(len(dataset), rank, world)`` in
    order. Unlike ``DistributedSampler`` it never pads by repeating samples, so metrics summed
    over the ranks count every sample exactly once."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = shard_range(n, rank, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class AspectBatchSampler(Sampler[list]):
    """Batches of images of similar aspect ratio, each at one scale: the dense tasks' aspect
    mode (torchvision references' ``GroupedBatchSampler``, with the scale picked per batch).

    ``sizes``: every sample's ``(h, w)``. Images are binned by ``w / h`` into ``2 * groups``
    bins (torchvision's ``create_aspect_ratio_groups``, k = ``groups``). Training (``train``):
    every epoch a new permutation (from ``seed`` and the epoch, the same on every rank), a
    batch as soon as a bin holds ``batch_size`` images, its scale drawn from ``scales``;
    leftovers are dropped (fixed batch sizes), and rank r takes batches r, r + world, ...
    (the same count on every rank). Evaluation: every image once, bin by bin in index order,
    at ``scales[-1]``. Yields lists of ``(index, scale)``, which the datasets read as "this
    sample at this shorter side" (``SizedTransforms.at``).

    ``epoch_stats()`` gives the fraction of the padded batches' pixels that were padding over
    the last pass (the resize is ``resized_shape``'s, the padding ``pad_batch``'s)."""

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, *, scales: Sequence[int],
                 max_size: int | None, train: bool, seed: int = 0, groups: int = 3, size_divisible: int = 32,
                 rank: int | None = None, world_size: int | None = None) -> None:
        if not sizes:
            raise ValueError("empty dataset")
        self.sizes, self.batch_size, self.train = list(sizes), batch_size, train
        self.scales, self.max_size, self.seed = tuple(scales), max_size, seed
        self.divisible = size_divisible
        self.rank, self.world = _rank_world(rank, world_size)
        bins = torch.tensor([2.0 ** (i / groups) for i in range(-groups, groups + 1)])
        aspect = torch.tensor([w / h for h, w in self.sizes])
        self.group = torch.bucketize(aspect, bins).tolist()
        self.epoch = 0
        self._padded = self._content = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[tuple[int, int]]]:
        if not self.train:
            order = sorted(range(len(self.sizes)), key=lambda i: (self.group[i], i))
            batches, current = [], []
            for i in order:
                if current and self.group[current[-1]] != self.group[i]:
                    batches.append(current)
                    current = []
                current.append(i)
                if len(current) == self.batch_size:
                    batches.append(current)
                    current = []
            if current:
                batches.append(current)
            return [[(i, self.scales[-1]) for i in b] for b in batches][self.rank::self.world]
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.sizes), generator=gen).tolist()
        picks = torch.randint(len(self.scales), (len(self.sizes),), generator=gen).tolist()
        buckets: dict[int, list[int]] = {}
        batches = []
        for i in order:
            bucket = buckets.setdefault(self.group[i], [])
            bucket.append(i)
            if len(bucket) == self.batch_size:
                scale = self.scales[picks[len(batches)]]
                batches.append([(j, scale) for j in bucket])
                buckets[self.group[i]] = []
        per_rank = len(batches) // self.world
        return batches[self.rank::self.world][:per_rank]

    def __len__(self) -> int:
        if not self.train:
            return len(self._batches())
        counts: dict[int, int] = {}
        for g in self.group:
            counts[g] = counts.get(g, 0) + 1
        return sum(c // self.batch_size for c in counts.values()) // self.world

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        from tasks.data.preprocess import resized_shape

        self._padded = self._content = 0
        d = self.divisible
        for batch in self._batches():
            shapes = [resized_shape(*self.sizes[i], shorter=s, max_size=self.max_size) for i, s in batch]
            self._content += sum(h * w for h, w in shapes)
            self._padded += len(shapes) * (-(-max(h for h, _ in shapes) // d) * d) * (-(-max(w for _, w in shapes) // d) * d)
            yield batch

    def epoch_stats(self) -> dict[str, float]:
        return {"pad_fraction": 1 - self._content / self._padded} if self._padded else {}


def move_to(obj: Any, device: torch.device) -> Any:
    """Tensors in nested lists / tuples / dicts to ``device`` (non-blocking from pinned memory)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple takes its fields one by one
        return type(obj)(*(move_to(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


class TensorLoader:
    """Batches of ``(augment(images[idx]), labels[idx])`` from device-resident tensors.

    With several ranks (``rank`` / ``world_size``, default: the process group's) each rank
    serves its shard: training, a disjoint ``len // world`` slice of the epoch's permutation;
    evaluation, a contiguous range. ``batch_size`` is per rank.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, augment: BatchAugment,
                 train: bool, seed: int = 0, channels_last: bool = False, drop_last: bool | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 mix: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise ValueError("empty dataset")
        self.images, self.labels = images, labels
        self.rank, self.world = _rank_world(rank, world_size)
        n = len(images)
        if train:  # equal shares (remainder dropped): every rank takes the same number of steps
            per = n // self.world
            self.shard = range(self.rank * per, (self.rank + 1) * per)
        else:  # unpadded contiguous ranges: every sample evaluated once
            self.shard = shard_range(n, self.rank, self.world)
        if train and len(self.shard) == 0:
            raise ValueError(f"{n} training samples cannot be shared by {self.world} processes")
        self.batch_size = batch_size
        self.augment = augment
        self.mix = mix  # training only: (images, labels, rng, epoch) -> (images, soft targets), e.g. CutMix
        self.train = train
        self.seed = seed
        self.channels_last = channels_last
        # Training drops the ragged last batch: fixed shapes keep compiled graphs and cuDNN plans.
        self.drop_last = train if drop_last is None else drop_last
        if self.drop_last and len(self.shard) < batch_size:
            self.batch_size = len(self.shard)  # a tiny dataset still gives one batch
        self.epoch = 0

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        n = len(self.shard)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(epoch_seed(self.seed, self.epoch))
        start, stop = self.shard.start, self.shard.stop
        order = None
        if self.train and self.world == 1:
            order = torch.randperm(len(self.images), device=self.device, generator=gen)
        elif self.train:
            # one permutation of the whole set, the same on every rank (drawn on the CPU, so
            # no device kernel has a say in it); each rank takes its slice
            cpu = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(len(self.images), generator=cpu)[start:stop].to(self.device)
            gen.manual_seed(epoch_seed(self.seed, self.epoch, salt=1 + self.rank))  # augmentation: per rank
        mixing = self.train and self.mix is not None
        rng = np.random.default_rng(epoch_seed(self.seed, self.epoch, salt=7919 + self.rank)) if mixing else None
        for i in range(len(self)):
            lo, hi = i * self.batch_size, min(stop - start, (i + 1) * self.batch_size)
            idx = order[lo:hi] if order is not None else slice(start + lo, start + hi)
            x = self.augment(self.images[idx], gen, train=self.train)
            y = self.labels[idx]
            if mixing:
                x, y = self.mix(x, y, rng, self.epoch)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y


class DenseTensorLoader:
    """Training batches of a dense task from a ``DenseCache`` (decoded once), augmented on
    ``device`` by ``DenseAugment``: ``(images, {"boxes", "labels"})`` (padded targets, fixed shapes)
    with ``targets="boxes"``, ``(images, masks [B, S, S] int64)`` with ``targets="masks"``. A cache
    on the host is gathered there, pinned and copied per batch; on the device it is only indexed. Drops the ragged last
    batch; several ranks take disjoint shares of one permutation, as ``TensorLoader``."""

    def __init__(self, cache: DenseCache, augment: DenseAugment, *, batch_size: int, device: torch.device,
                 targets: str, seed: int = 0, channels_last: bool = False, rank: int | None = None,
                 world_size: int | None = None) -> None:
        if targets not in ("boxes", "masks"):
            raise ValueError(f"targets={targets!r}: boxes or masks")
        if len(cache) == 0:
            raise ValueError("empty dataset")
        self.cache, self.augment, self.device, self.targets = cache, augment, device, targets
        self.rank, self.world = _rank_world(rank, world_size)
        per = len(cache) // self.world
        if per == 0:
            raise ValueError(f"{len(cache)} training samples cannot be shared by {self.world} processes")
        self.shard = range(self.rank * per, (self.rank + 1) * per)
        self.batch_size = min(batch_size, per)
        self.seed, self.channels_last = seed, channels_last
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.shard) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _take(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.cache
        names = {"images": c.images, "hw": c.hw}
        if self.targets == "boxes":
            names.update(boxes=c.boxes, labels=c.labels)
        else:
            names["masks"] = c.masks
        on_device = c.images.device.type == self.device.type  # torch.device("cuda") != the tensor's cuda:0
        return {k: (v[idx] if on_device else v[idx].pin_memory().to(self.device, non_blocking=True))
                for k, v in names.items()}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(epoch_seed(self.seed, self.epoch, salt=1 + self.rank))
        # one permutation of the whole set, the same on every rank (drawn on the CPU); each its slice
        cpu = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.cache), generator=cpu)[self.shard.start:self.shard.stop]
        order = order.to(self.cache.images.device)
        for i in range(len(self)):
            batch = self._take(order[i * self.batch_size:(i + 1) * self.batch_size])
            images, hw = batch.pop("images"), batch.pop("hw")
            out = self.augment(images, hw, gen, **batch)
            x = out["images"]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, (out["masks"] if self.targets == "masks" else {"boxes": out["boxes"], "labels": out["labels"]})


class DeviceLoader:
    """A ``DataLoader`` (or a host-side ``TensorLoader``) whose batches arrive on ``device``,
    finished by ``on_device(batch)`` (e.g. uint8 -> normalised float), reseeded per epoch."""

    def __init__(self, loader: DataLoader, device: torch.device, on_device: Callable[[Any], Any] | None = None,
                 seed: int = 0) -> None:
        self.loader, self.device, self.on_device, self.seed = loader, device, on_device, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.loader, "set_epoch"):  # a TensorLoader kept on the host
            self.loader.set_epoch(epoch)
        gen = getattr(self.loader, "generator", None)
        if gen is not None:  # worker seeds (albumentations draws): one stream per rank
            gen.manual_seed(epoch_seed(self.seed, epoch, salt=distributed.rank()))
        for sampler in (getattr(self.loader, "sampler", None), getattr(self.loader, "batch_sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)

    def epoch_stats(self) -> dict[str, float]:
        """The batch sampler's numbers of the last pass (padding), if it keeps any."""
        stats = getattr(getattr(self.loader, "batch_sampler", None), "epoch_stats", None)
        return stats() if stats is not None else {}

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:  # workers fork with cv2 at one thread (tasks/data/__init__.py says why)
            if batch is None:  # every sample of it left out (an evaluation set with skip_bad)
                continue
            batch = move_to(batch, self.device)
            if self.on_device is not None:
                batch = self.on_device(batch)
                if batch is None:  # it says every sample was left out
                    continue
            yield batch



def make_loader(dataset, *, batch_size: int, shuffle: bool, num_workers: int, collate_fn: Callable,
                seed: int, device: torch.device, rank: int | None = None,
                world_size: int | None = None, batch_sampler: Sampler | None = None) -> DataLoader:
    """A DataLoader for file-based data: workers reseed numpy / random / albumentations from a
    generator that ``DeviceLoader.set_epoch`` reseeds per epoch; training drops a ragged last
    batch (fixed shapes for cuDNN plans and CUDA graphs).

    With several ranks (default: the process group's), training shuffles through a
    ``DistributedSampler`` (seeded by ``seed``, reshuffled by ``set_epoch``, tail dropped so
    the ranks' shares are disjoint and equal) and evaluation reads a ``ShardSampler`` range;
    ``batch_size`` is per rank."""
    from tasks.data.transforms import seed_worker

    rank, world = _rank_world(rank, world_size)
    gen = torch.Generator()
    gen.manual_seed(seed)
    if batch_sampler is not None:  # it shards and shuffles by itself (AspectBatchSampler)
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn,
                          worker_init_fn=seed_worker, generator=gen, pin_memory=device.type == "cuda",
                          persistent_workers=False)
    sampler = None
    n_local = len(dataset)
    if world > 1:
        sampler = (DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
                   if shuffle else ShardSampler(len(dataset), rank, world))
        n_local = len(sampler)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
                      drop_last=shuffle and n_local >= batch_size, num_workers=num_workers,
                      collate_fn=collate_fn, worker_init_fn=seed_worker, generator=gen,
                      pin_memory=device.type == "cuda", persistent_workers=False)


def normalize_images(normalize: Callable[[torch.Tensor], torch.Tensor], channels_last: bool) -> Callable[[Any], Any]:
    """``DeviceLoader`` hook: ``(uint8 images, targets) -> (normalize(images), targets)``, e.g.
    with ``Preprocess.normalize``."""
    def on_device(batch):
        images, targets = batch[0], batch[1]
        x = normalize(images)
        return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), targets
    return on_device
