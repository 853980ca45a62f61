"""Batch iterators the engine trains from: both yield ``(images, targets)`` on the device.

``TensorLoader`` serves a dataset that lives on the device as one uint8 tensor (shuffling
and augmentation on the device too); ``DeviceLoader`` wraps a ``DataLoader`` (decoding in
worker processes) and moves each batch to the device. Both reseed from ``(seed, epoch)``
in ``set_epoch``, so a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader

from .gpu_augment import BatchAugment

__all__ = ["TensorLoader", "DeviceLoader", "epoch_seed", "move_to", "make_loader", "normalize_images"]


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7919 + salt) % (2 ** 63 - 1)


def move_to(obj: Any, device: torch.device) -> Any:
    """Tensors in nested lists / tuples / dicts to ``device`` (non-blocking from pinned memory)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


class TensorLoader:
    """Batches of ``(augment(images[idx]), labels[idx])`` from device-resident tensors."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, augment: BatchAugment,
                 train: bool, seed: int = 0, channels_last: bool = False, drop_last: bool | None = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise ValueError("empty dataset")
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.augment = augment
        self.train = train
        self.seed = seed
        self.channels_last = channels_last
        # Training drops the ragged last batch: fixed shapes keep compiled graphs and cuDNN plans.
        self.drop_last = train if drop_last is None else drop_last
        if self.drop_last and len(images) < batch_size:
            self.batch_size = len(images)  # a tiny dataset still gives one batch
        self.epoch = 0

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(epoch_seed(self.seed, self.epoch))
        n = len(self.images)
        order = torch.randperm(n, device=self.device, generator=gen) if self.train else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            idx = order[sl] if order is not None else sl
            x = self.augment(self.images[idx], gen, train=self.train)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


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
        if gen is not None:
            gen.manual_seed(epoch_seed(self.seed, epoch))
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            batch = move_to(batch, self.device)
            yield self.on_device(batch) if self.on_device is not None else batch



def make_loader(dataset, *, batch_size: int, shuffle: bool, num_workers: int, collate_fn: Callable,
                seed: int, device: torch.device) -> DataLoader:
    """A DataLoader for file-based data: workers reseed numpy / random / albumentations from a
    generator that ``DeviceLoader.set_epoch`` reseeds per epoch; training drops a ragged last
    batch (fixed shapes for cuDNN plans and CUDA graphs)."""
    from .transforms import seed_worker

    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      drop_last=shuffle and len(dataset) >= batch_size, num_workers=num_workers,
                      collate_fn=collate_fn, worker_init_fn=seed_worker, generator=gen,
                      pin_memory=device.type == "cuda", persistent_workers=False)


def normalize_images(augment: BatchAugment, channels_last: bool, train: bool = False) -> Callable[[Any], Any]:
    """``DeviceLoader`` hook: ``(uint8 images, targets) -> (normalised float images, targets)``."""
    def on_device(batch):
        images, targets = batch[0], batch[1]
        x = augment(images, train=train)
        return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), targets
    return on_device
