"""ImageFolder trees for a user's own classification data: ``<root>/<class>/*.png``.

Images are decoded with OpenCV in DataLoader workers and transformed with albumentations;
they leave the worker as uint8 ``[C, H, W]`` tensors and are normalised on the device.
An unreadable image (corrupt, truncated, over the pixel limit) is an error naming the file, or,
with ``skip_bad``, is left out of its batch, which carries its name and the reason instead.
Hidden entries (names starting with '.': ``.ipynb_checkpoints``, macOS ``._x.png`` resource
forks, ``.DS_Store``) are no classes and no images; other files without an image extension (a
GIF, a text file) are skipped with one warning that names them.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, ImageReadError, display_path, read_image
from .subset import subset_indices

__all__ = ["ImageFolderDataset", "Unreadable", "collate_skip_bad", "list_images", "warn_skipped_files"]


class Unreadable(NamedTuple):
    """What ``ImageFolderDataset`` returns for an image it could not use under ``skip_bad``."""
    path: str
    reason: str


def _hidden(name: str) -> bool:
    return name.startswith(".")


def list_images(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS, *,
                recursive: bool = True) -> tuple[list[Path], list[Path]]:
    """``(images, skipped)`` under ``folder``, both sorted: files with one of ``extensions``,
    and the other files. Hidden files and folders (names starting with '.') are in neither:
    they are tools' leftovers, never data. Symbolic links to folders are not descended into
    (as ``Path.rglob`` did)."""
    images, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not _hidden(d)] if recursive else []
        for name in filenames:
            if _hidden(name):
                continue
            path = Path(dirpath) / name
            (images if path.suffix.lower() in extensions else skipped).append(path)
    return sorted(images), sorted(skipped)


def warn_skipped_files(root: Path, skipped: Sequence[Path], extensions: Sequence[str], stacklevel: int = 3) -> None:
    """One warning naming the files that are not used for their format (a GIF: OpenCV before
    4.11 cannot read it, and an animation is not one image), so none is left out silently."""
    if not skipped:
        return
    shown = ", ".join(display_path(p.relative_to(root)) for p in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    n = len(skipped)
    warnings.warn(f"{display_path(root)}: skipping {n} file{'s' if n > 1 else ''} that {'are' if n > 1 else 'is'} not "
                  f"{'/'.join(extensions)} image{'s' if n > 1 else ''}: {shown}{more} (convert them, e.g. GIF to PNG, "
                  f"to use them)", stacklevel=stacklevel)


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>``; ``classes`` fixes the label order (the train set's for val);
    ``limit``: a class-balanced random subset of that many images, drawn with ``seed``."""

    def __init__(self, root: str | os.PathLike, *, transforms: A.Compose | None = None, channels: int = 3,
                 classes: Sequence[str] | None = None, skip_bad: bool = False, limit: int | None = None,
                 seed: int = 0) -> None:
        self.root = Path(root)
        name = display_path(self.root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {name}")
        # class name -> folder name: a folder name that is not UTF-8 becomes a printable class
        # name ("caf\\xe9"), which checkpoints, plots and summaries can store and show
        folders = {display_path(d.name): d.name for d in self.root.iterdir() if d.is_dir() and not _hidden(d.name)}
        found = sorted(folders)
        if not found:
            raise ValueError(f"{name}: expected one sub-folder per class (e.g. {name}/cat/1.png), found none")
        defines_classes = classes is None
        if defines_classes:
            classes = found
        else:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise ValueError(f"{name}: classes {unknown} are not in the training classes {list(classes)}")
        self.classes = list(classes)
        self.samples: list[tuple[str, int]] = []
        skipped: list[Path] = []
        empty: list[str] = []
        for label, class_name in enumerate(self.classes):
            folder = self.root / folders.get(class_name, class_name)
            if folder.is_dir():
                files, other = list_images(folder)
                self.samples += [(str(f), label) for f in files]
                skipped += other
                if not files:
                    empty.append(class_name)
        warn_skipped_files(self.root, skipped, IMAGE_EXTENSIONS)
        if not self.samples:
            raise ValueError(f"{name}: no images with extensions {IMAGE_EXTENSIONS}")
        if defines_classes and empty:  # a class the model would have to predict without one example of it
            raise ValueError(f"{name}: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} "
                             f"{'hold' if len(empty) > 1 else 'holds'} no {'/'.join(IMAGE_EXTENSIONS)} images: "
                             f"add images or remove {'them' if len(empty) > 1 else 'it'}")
        if limit is not None:
            keep = subset_indices(len(self.samples), limit, seed, [label for _, label in self.samples])
            self.samples = [self.samples[i] for i in keep]
        self.transforms = transforms
        self.channels = channels
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | Unreadable:
        path, label = self.samples[i]
        try:
            img = read_image(path, self.channels)
        except (ImageReadError, FileNotFoundError) as e:
            if self.skip_bad:
                return Unreadable(display_path(path), str(e))  # left out of the batch by collate_skip_bad
            raise type(e)(f"{e}; --set data.skip_bad=true skips unreadable images") from None
        if self.transforms is not None:
            img = self.transforms(image=img)["image"]
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), label  # [C, H, W] uint8


def collate_skip_bad(batch: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[Unreadable]]:
    """Stack a batch, leaving out the ``Unreadable`` samples; returns them third (images and
    labels None when no sample is left)."""
    bad = [b for b in batch if isinstance(b, Unreadable)]
    good = [b for b in batch if not isinstance(b, Unreadable)]
    if not good:
        return None, None, bad
    images = torch.stack([b[0] for b in good])
    labels = torch.tensor([b[1] for b in good], dtype=torch.int64)
    return images, labels, bad
