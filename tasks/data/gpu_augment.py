"""Batch augmentation on the device for in-memory datasets (Fashion-MNIST and the like).

Each op takes a float batch ``[N, C, H, W]`` and a ``torch.Generator`` on the batch's device,
draws all its random numbers in one call per kind, and never syncs with the host, so the
input pipeline costs a few kernel launches per batch instead of a CPU worker pool.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "random_crop", "random_hflip", "random_erasing", "BatchAugment",
           "CutMix"]

# Per-channel statistics of images in [0, 1] for data that brings none (ImageNet's).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` then crop back to ``H x W`` at a random offset per sample
    (torchvision's ``RandomCrop(size, padding)``, for the whole batch at once)."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))  # [N, C, H+2p, W+2p]
    offsets = torch.randint(0, 2 * padding + 1, (2, n), device=x.device, generator=generator)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # [N, H]
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # [N, W]
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices around the channel slice put their broadcast dims first:
    out = xp[batch, :, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2)  # [N, C, H, W], channels_last in memory


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each sample left-right with probability ``p``."""
    if p <= 0:
        return x
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_erasing(x: torch.Tensor, p: float = 0.5, scale: tuple[float, float] = (0.02, 0.33),
                   ratio: tuple[float, float] = (0.3, 3.3), value: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Blank one random rectangle per sample with probability ``p`` (Zhong et al. 2017).

    As torchvision's ``RandomErasing`` (area fraction in ``scale``, aspect ratio log-uniform in
    ``ratio``); where torchvision retries a box that does not fit, this clamps it to the image.
    """
    if p <= 0:
        return x
    n, _, h, w = x.shape
    u = torch.rand(6, n, device=x.device, generator=generator)
    area = (scale[0] + (scale[1] - scale[0]) * u[0]) * (h * w)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
    aspect = torch.exp(log_r)
    eh = torch.sqrt(area * aspect).round().clamp(1, h)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)
    y0 = (u[2] * (h - eh + 1)).floor()
    x0 = (u[3] * (w - ew + 1)).floor()
    ys = torch.arange(h, device=x.device)[None, :]  # [1, H]
    xs = torch.arange(w, device=x.device)[None, :]  # [1, W]
    in_rows = (ys >= y0[:, None]) & (ys < (y0 + eh)[:, None])  # [N, H]
    in_cols = (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])  # [N, W]
    erase = in_rows[:, :, None] & in_cols[:, None, :] & (u[4] < p)[:, None, None]  # [N, H, W]
    return x.masked_fill(erase[:, None], value)


@dataclass
class BatchAugment:
    """uint8 batch -> normalised float batch, with the configured augmentations.

    Order: scale to [0, 1], crop (zero padding = black, as torchvision pads before
    normalising), flip, normalise, erase (value 0 = the mean, as RandomErasing after Normalize).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0
    hflip: float = 0.0
    erasing: float = 0.0

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # cached per device: a fresh host-to-device copy per batch would be a needless transfer
        cache = self.__dict__.setdefault("_cache", {})
        if device not in cache:
            cache[device] = (torch.tensor(self.mean, device=device).view(1, -1, 1, 1),
                             torch.tensor(self.std, device=device).view(1, -1, 1, 1))
        return cache[device]

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation: float ``[N, C, H, W]`` -> uint8 (for pictures)."""
        mean, std = self._stats(x.device)
        return ((x.float() * std + mean) * 255).round_().clamp_(0, 255).to(torch.uint8)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 train: bool = True) -> torch.Tensor:
        if images.dim() == 3:
            images = images[:, None]  # [N, 1, H, W]
        x = images.float().div_(255)
        if train:
            x = random_crop(x, self.crop_padding, generator)
            x = random_hflip(x, self.hflip, generator)
        mean, std = self._stats(x.device)
        x = (x - mean) / std
        if train:
            x = random_erasing(x, self.erasing, generator=generator)
        return x


@dataclass
class CutMix:
    """CutMix (Yun et al. 2019) of a normalised batch, as timm's ``Mixup`` in its "batch" mode
    with CutMix alone: one box per batch, of area ``1 - lam`` with ``lam ~ Beta(alpha, alpha)``,
    pasted from the batch reversed (sample i takes it from sample N-1-i); the targets are soft,
    ``[N, K]``, weighted by the box's area after clipping. Applied to a batch with probability
    ``prob``; an unmixed batch still gets soft (one-hot) targets, since a CUDA-graphed step needs
    one target dtype and shape.

    The random numbers come from ``rng`` (numpy, one per epoch from the loader): the box is drawn
    on the host, so mixing costs no device sync and the graph sees only the mixed tensors.
    """

    num_classes: int
    alpha: float = 1.0
    prob: float = 1.0

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"CutMix alpha={self.alpha}: expected > 0")
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"CutMix prob={self.prob}: a probability in [0, 1]")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rng, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``epoch``: the loader's (every epoch mixes alike)."""
        one_hot = F.one_hot(y, self.num_classes).float()
        if rng.random() >= self.prob:
            return x, one_hot
        lam = float(rng.beta(self.alpha, self.alpha))
        h, w = x.shape[-2:]
        ratio = math.sqrt(1.0 - lam)
        ch, cw = int(h * ratio), int(w * ratio)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y1:y2, x1:x2] = x.flip(0)[..., y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)  # the area actually pasted
        return x, one_hot * lam + one_hot.flip(0) * (1.0 - lam)
