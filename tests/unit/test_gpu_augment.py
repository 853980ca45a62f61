"""On-device batch augmentation, exercised on CPU tensors."""
import pytest
import torch

from tasks.data.gpu_augment import BatchAugment, random_crop, random_erasing, random_hflip
from tasks.engine.loaders import TensorLoader


def _gen(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_random_crop_is_a_shift_of_the_padded_image():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6) + 1
    out = random_crop(x, 2, _gen())
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(padded[i, :, dy:dy + 5, dx:dx + 6], out[i])]
        assert len(found) == 1
    crops = torch.stack([random_crop(x, 2, _gen(s)) for s in range(20)])
    assert not all(torch.equal(c, crops[0]) for c in crops)  # offsets vary
    assert torch.equal(random_crop(x, 2, _gen(3)), random_crop(x, 2, _gen(3)))  # seeded


def test_hflip_flips_some_samples():
    x = torch.randn(64, 1, 4, 4)
    out = random_hflip(x, 0.5, _gen())
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_random_erasing_blanks_one_rectangle():
    x = torch.ones(200, 1, 28, 28)
    out = random_erasing(x, p=0.5, value=0.0, generator=_gen())
    erased = out[:, 0] == 0
    frac = erased.float().mean((1, 2))
    assert 0.3 < (frac > 0).float().mean() < 0.7  # about half the images
    assert frac.max() <= 0.34 and frac[frac > 0].min() >= 0.01
    for m in erased[frac > 0][:20]:  # the erased pixels form one axis-aligned rectangle
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert m[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert int(m.sum()) == len(rows) * len(cols)


def test_batch_augment_ranges_and_loader_batches():
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    labels = torch.arange(50) % 10
    aug = BatchAugment((0.5,), (0.25,), crop_padding=2, hflip=0.5, erasing=0.5)
    x = aug(images[:8], _gen(), train=True)
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6  # (0 - .5)/.25 .. (1 - .5)/.25
    val = aug(images[:8], train=False)
    torch.testing.assert_close(val, (images[:8, None].float() / 255 - 0.5) / 0.25)
    loader = TensorLoader(images, labels, batch_size=16, augment=aug, train=True, seed=1, channels_last=True)
    assert len(loader) == 3  # drop_last in training
    batches = list(loader)
    assert all(b[0].shape == (16, 1, 28, 28) for b in batches)
    seen = torch.cat([b[1] for b in batches])
    assert len(seen) == 48
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([b[1] for b in loader]), seen)  # reshuffled per epoch
    loader.set_epoch(0)
    assert torch.equal(torch.cat([b[1] for b in loader]), seen)  # and reproducibly
    val_loader = TensorLoader(images, labels, batch_size=16, augment=aug, train=False)
    assert len(val_loader) == 4 and sum(len(b[1]) for b in val_loader) == 50


def test_device_loader_reseeds_a_host_tensor_loader():
    from tasks.engine.loaders import DeviceLoader
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    inner = TensorLoader(images, torch.arange(40), batch_size=8, augment=BatchAugment((0.5,), (0.25,)), train=True)
    loader = DeviceLoader(inner, torch.device("cpu"))
    order = lambda: torch.cat([y for _, y in loader])  # noqa: E731
    loader.set_epoch(0)
    first = order()
    loader.set_epoch(1)
    assert not torch.equal(order(), first)  # the epoch reaches the inner loader
    loader.set_epoch(0)
    assert torch.equal(order(), first)


# ----------------------------------------------------------------------------- CutMix

def test_cutmix_targets_are_the_pasted_area():
    import numpy as np

    from tasks.data.gpu_augment import CutMix
    x = torch.arange(4.0)[:, None, None, None].expand(4, 1, 8, 8).contiguous()  # image i is all i
    y = torch.tensor([0, 1, 2, 3])
    # one box from the batch reversed; the target's share of the partner is exactly the pasted area
    xc, t = CutMix(4, 1.0)(x, y, np.random.default_rng(1))
    pasted = float((xc[0] == 3).float().mean())
    assert 0 < pasted < 1 and abs(float(t[0, 3]) - pasted) < 1e-6 and abs(float(t[0, 0]) - (1 - pasted)) < 1e-6
    assert torch.allclose(t.sum(1), torch.ones(4)) and torch.equal(x[:, :, 0, 0], torch.arange(4.0)[:, None])
    # prob 0: one-hot targets (the same dtype and shape), images untouched; bad settings refused
    xo, t = CutMix(4, 1.0, prob=0.0)(x, y, np.random.default_rng(0))
    assert torch.equal(xo, x) and torch.equal(t, torch.eye(4))
    for bad in (dict(alpha=0.0), dict(alpha=-1.0), dict(prob=1.5)):
        with pytest.raises(ValueError, match="CutMix"):
            CutMix(4, **{"alpha": 1.0, **bad})


def test_cutmix_keeps_the_measured_random_stream():
    """The long recipe's numbers were measured with timm-style batch mixing, CutMix alone: per
    batch one uniform draw (the batch probability), Beta(1, 1), then the box centre. The same
    generator must give the same boxes, or the measured run is not what the recipe repeats."""
    import numpy as np

    from tasks.data.gpu_augment import CutMix
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6) % 10
    rng, ref = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(5):
        xc, t = CutMix(10, 1.0)(x, y, rng)
        assert ref.random() < 1.0
        lam = float(ref.beta(1.0, 1.0))
        ch = cw = int(28 * (1 - lam) ** 0.5)
        cy, cx = int(ref.integers(28)), int(ref.integers(28))
        y1, y2, x1, x2 = max(cy - ch // 2, 0), min(cy + ch // 2, 28), max(cx - cw // 2, 0), min(cx + cw // 2, 28)
        expect = x.clone()
        expect[..., y1:y2, x1:x2] = x.flip(0)[..., y1:y2, x1:x2]
        assert torch.equal(xc, expect)
        torch.testing.assert_close(float(t[0, y[0]]), 1 - (y2 - y1) * (x2 - x1) / 28 ** 2)


def test_tensor_loader_mixes_training_batches_only():
    from tasks.data.gpu_augment import CutMix
    images, labels = torch.randint(0, 255, (16, 28, 28), dtype=torch.uint8), torch.arange(16) % 10
    aug = BatchAugment((0.5,), (0.25,))
    mix = CutMix(10, 1.0)
    train = TensorLoader(images, labels, batch_size=8, augment=aug, train=True, mix=mix)
    x, y = next(iter(train))
    assert y.shape == (8, 10) and y.dtype == torch.float32 and torch.allclose(y.sum(1), torch.ones(8))
    assert float(y.max()) < 1  # mixed
    assert torch.equal(next(iter(train))[1], y)  # reseeded per (seed, epoch)
    train.set_epoch(1)
    assert not torch.equal(next(iter(train))[1], y)  # another epoch, other boxes
    val = TensorLoader(images, labels, batch_size=8, augment=aug, train=False, mix=mix)
    assert next(iter(val))[1].dtype == torch.int64
