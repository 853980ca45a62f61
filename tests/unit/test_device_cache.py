"""The device-side dense augmentation against the albumentations pipelines it replaces, on fixed
parameters; the decode-once cache; the loader that serves it."""
import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from tasks.data.device_cache import DenseAugment, dense_augment
from tasks.data.preprocess import detection_bbox_params

SIZE = 48  # crop side
CANVAS = 64  # the cache's padded side


def _sample(seed, h=40, w=56):
    rng = np.random.default_rng(seed)
    # smooth content (a blurred random image): bilinear rounding then differs by at most a level
    image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)
    mask = rng.integers(0, 6, (h, w), dtype=np.uint8)
    xy = rng.uniform(0, [w - 8, h - 8], (5, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 20, (5, 2))], 1).clip(0, [w, h, w, h]).astype(np.float32)
    return image, mask, boxes, np.arange(5, dtype=np.int64)


def _albumentations(image, mask, boxes, labels, scale, flip, crop_yx, *, flip_first, min_visibility):
    pad = A.PadIfNeeded(min_height=SIZE, min_width=SIZE, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                        fill=0, fill_mask=255)
    crop = A.Crop(x_min=crop_yx[1], y_min=crop_yx[0], x_max=crop_yx[1] + SIZE, y_max=crop_yx[0] + SIZE)
    ops = [A.RandomScale(scale_limit=(scale - 1.0, scale - 1.0), interpolation=cv2.INTER_LINEAR,
                         mask_interpolation=cv2.INTER_NEAREST, p=1.0)]
    flip_op = A.HorizontalFlip(p=1.0 if flip else 0.0)
    ops += [flip_op, pad, crop] if flip_first else [pad, crop, flip_op]
    out = A.Compose(ops, bbox_params=detection_bbox_params(min_visibility), seed=0)(
        image=image, mask=mask, bboxes=boxes, labels=labels)
    return out["image"], out["mask"], np.asarray(out["bboxes"], np.float32).reshape(-1, 4), np.asarray(out["labels"])


@pytest.mark.parametrize("flip_first", [True, False])
def test_dense_augment_matches_albumentations(flip_first):
    cases = [(0.6, False), (1.0, True), (1.37, True), (1.9, False), (0.85, True)]
    for k, (scale, flip) in enumerate(cases):
        image, mask, boxes, labels = _sample(k)
        h, w = image.shape[:2]
        s = 1.0 + (scale - 1.0)  # the factor albumentations computes from its scale_limit
        hs, ws = int(h * s), int(w * s)
        rng = np.random.default_rng(100 + k)
        crop_yx = (int((max(hs, SIZE) - SIZE + 1) * rng.random()), int((max(ws, SIZE) - SIZE + 1) * rng.random()))
        ref_img, ref_mask, ref_boxes, ref_labels = _albumentations(image, mask, boxes, labels, s, flip, crop_yx,
                                                                   flip_first=flip_first, min_visibility=0.3)
        img_t = torch.zeros(1, 3, CANVAS, CANVAS, dtype=torch.uint8)
        img_t[0, :, :h, :w] = torch.from_numpy(image).permute(2, 0, 1)
        mask_t = torch.full((1, CANVAS, CANVAS), 255, dtype=torch.uint8)
        mask_t[0, :h, :w] = torch.from_numpy(mask)
        box_t = torch.zeros(1, 8, 4)
        box_t[0, :5] = torch.from_numpy(boxes)
        lab_t = torch.full((1, 8), -1, dtype=torch.int64)
        lab_t[0, :5] = torch.from_numpy(labels)
        out = dense_augment(img_t, torch.tensor([[h, w]]), torch.tensor([s], dtype=torch.float64),
                            torch.tensor([flip]), torch.tensor([crop_yx]), SIZE, flip_first=flip_first,
                            boxes=box_t, labels=lab_t, masks=mask_t, min_visibility=0.3)
        got = out["images"][0].permute(1, 2, 0).numpy()
        diff = np.abs(got - ref_img.astype(np.float32))
        assert diff.max() <= 1 and diff.mean() < 0.25, (scale, flip, diff.max(), diff.mean())  # cv2 rounds in fixed point
        assert np.array_equal(out["masks"][0].numpy(), ref_mask.astype(np.int64)), (scale, flip)
        kept = out["labels"][0] >= 0
        # albumentations keeps boxes squeezed to zero width; CocoDetection drops them after it
        real = (ref_boxes[:, 2] > ref_boxes[:, 0]) & (ref_boxes[:, 3] > ref_boxes[:, 1])
        assert out["labels"][0][kept].tolist() == ref_labels[real].tolist(), (scale, flip)
        np.testing.assert_allclose(out["boxes"][0][kept].numpy(), ref_boxes[real], atol=1e-3)
        assert (out["boxes"][0][~kept] == 0).all()


def test_dense_augment_batch_is_per_sample_and_fixed_shape():
    images = torch.randint(0, 255, (3, 3, CANVAS, CANVAS), dtype=torch.uint8)
    hw = torch.tensor([[64, 64], [40, 56], [30, 30]])
    aug = DenseAugment(SIZE, (0.5, 2.0), 0.5, flip_first=False, normalize=lambda x: x / 255)
    gen = torch.Generator().manual_seed(0)
    out = aug(images, hw, gen, masks=torch.zeros(3, CANVAS, CANVAS, dtype=torch.uint8))
    assert out["images"].shape == (3, 3, SIZE, SIZE) and out["masks"].shape == (3, SIZE, SIZE)
    scale, flip, offset = aug.params(hw, torch.Generator().manual_seed(0))
    assert ((scale >= 0.5) & (scale <= 2.0)).all()
    # crop corners stay within the padded scaled image
    room = torch.floor(hw.double() * scale[:, None]).clamp(min=SIZE) - SIZE
    assert ((offset >= 0) & (offset <= room)).all()
    # a 30 px image scaled by < 1.6 leaves padding: masks 255 there, never class 0
    small = torch.floor(30 * scale[2])
    assert small < SIZE  # seed 0 draws 1.19
    assert (out["masks"][2][int(small) - int(offset[2, 0]):] == 255).all()


# ----------------------------------------------------------------------------- the cache's loaders

@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from tests.fakes import tiny_scenes_args
    return tiny_scenes_args(tmp_path_factory.mktemp("data"))


def _loader(task, scenes, cache, tmp_path):
    from tasks import TASKS
    from tasks.engine.config import load_config
    spec = TASKS[task]
    overrides = [a for a in scenes if "=" in a and not a.startswith("--")]
    cfg = load_config(spec.config, f"configs/{task}/scenes_quick.yaml", overrides + [f"data.cache={cache}"])
    cfg.data.data_dir = scenes[scenes.index("--data-dir") + 1]
    cfg.train.batch_size = 4
    return spec.build_data(cfg, torch.device("cpu"), quiet=True)


def test_cache_detection_batches_match_the_dataloader_layout(scenes, tmp_path):
    from tasks.engine.loaders import DenseTensorLoader
    cached, workers = _loader("detect", scenes, "host", tmp_path), _loader("detect", scenes, "none", tmp_path)
    assert isinstance(cached.train, DenseTensorLoader) and not isinstance(workers.train, DenseTensorLoader)
    assert len(cached.train) == len(workers.train) == 6  # 24 scenes, batches of 4
    (xa, ta), (xb, tb) = next(iter(cached.train)), next(iter(workers.train))
    assert xa.shape == xb.shape and xa.dtype == xb.dtype
    assert set(ta) == set(tb) == {"boxes", "labels"} and ta["labels"].dtype == tb["labels"].dtype
    # normalised alike: the same range of values
    assert abs(float(xa.mean()) - float(xb.mean())) < 0.5 and float(xa.min()) >= float(xb.min()) - 1e-3
    real = ta["labels"] >= 0
    assert real.any() and (ta["boxes"][real][:, 2:] > ta["boxes"][real][:, :2]).all()
    assert (ta["boxes"][real] >= 0).all() and (ta["boxes"][real] <= 64).all()
    # reproducible per (seed, epoch), different across epochs
    again = next(iter(cached.train))
    assert torch.equal(again[0], xa)
    cached.train.set_epoch(1)
    assert not torch.equal(next(iter(cached.train))[0], xa)


def test_cache_segmentation_masks_and_bad_mode(scenes, tmp_path):
    data = _loader("segment", scenes, "device", tmp_path)
    x, masks = next(iter(data.train))
    assert x.shape == (4, 3, 64, 64) and masks.shape == (4, 64, 64) and masks.dtype == torch.int64
    values = set(masks.unique().tolist())
    assert values <= set(range(11)) | {255} and len(values - {255}) > 1
    with pytest.raises(ValueError, match="data.cache='gpu'"):
        _loader("segment", scenes, "gpu", tmp_path)
