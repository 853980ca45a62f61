"""ImageFolder trees for a user's own classification data: ``<root>/<class>/*.png``.

Images are decoded with OpenCV in DataLoader workers and transformed with albumentations;
they leave the worker as uint8 ``[C, H, W]`` tensors and are normalised on the device.
An unreadable image is an error naming the file, or, with ``skip_bad``, is skipped and counted.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, ImageReadError, read_image

__all__ = ["ImageFolderDataset", "collate_skip_bad"]


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>``; ``classes`` fixes the label order (the train set's for val)."""

    def __init__(self, root: str | os.PathLike, *, transforms: A.Compose | None = None, channels: int = 3,
                 classes: Sequence[str] | None = None, skip_bad: bool = False, limit: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not found:
            raise ValueError(f"{self.root}: expected one sub-folder per class (e.g. {self.root}/cat/1.png), found none")
        if classes is None:
            classes = found
        else:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise ValueError(f"{self.root}: classes {unknown} are not in the training classes {list(classes)}")
        self.classes = list(classes)
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            if folder.is_dir():
                files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
                self.samples += [(str(f), label) for f in files]
        if not self.samples:
            raise ValueError(f"{self.root}: no images with extensions {IMAGE_EXTENSIONS}")
        if limit is not None:
            self.samples = self.samples[:limit]
        self.transforms = transforms
        self.channels = channels
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[i]
        try:
            img = read_image(path, self.channels)
        except (ImageReadError, FileNotFoundError):
            if self.skip_bad:
                return None  # dropped (and counted) by collate_skip_bad
            raise
        if self.transforms is not None:
            img = self.transforms(image=img)["image"]
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), label  # [C, H, W] uint8


def collate_skip_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack a batch, dropping samples that came back ``None``; returns how many were dropped."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        warnings.warn(f"a whole batch of {len(batch)} images was unreadable and skipped")
        return torch.zeros(0, 1, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), skipped
    images = torch.stack([b[0] for b in good])
    labels = torch.tensor([b[1] for b in good], dtype=torch.int64)
    return images, labels, skipped
