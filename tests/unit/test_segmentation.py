"""Segmentation: FCN head and Segmenter, loss and mIoU with ignore, mask-folder and COCO
semantic data, joint transforms, batching, and a few training steps."""
import json
import warnings

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from backbones import FeatureSpec, build_backbone
from heads import FCNHead, Segmenter
from tasks.data.segmentation import (CocoSemanticDataset, MaskFolderDataset, collate_segmentation,
                                     scenes_segmentation)
from tasks.data.preprocess import Preprocess
from tasks.data.transforms import segmentation_train_transforms
from tasks.engine.metrics import ConfusionMatrix

from tests.fakes import write_fake_fashion_mnist

# pycocotools' decode trips numpy 2's __array__ copy-keyword deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

K = 5


def _segmenter(output_stride=32, aux=False, num_classes=K):
    backbone = build_backbone("resnet18", output_stride=output_stride)
    return Segmenter(backbone, FCNHead(backbone.feature_info, num_classes, aux=aux))


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_logits_at_input_size_for_any_stride_and_odd_sizes(output_stride):
    model = _segmenter(output_stride, aux=True).eval()
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        feats = model.backbone(x)
        logits = model.head.postprocess(model.head(feats, (97, 131)), (97, 131))
    assert logits.shape == (2, K, 97, 131) and torch.isfinite(logits).all()
    assert "aux" not in model.head(feats, (97, 131))  # only the loss uses it
    model.train()
    raw = model.head(feats, (97, 131))
    assert raw["out"].shape == raw["aux"].shape == (2, K, 97, 131)
    losses = model.head.loss(raw, torch.randint(0, K, (2, 97, 131)))
    assert set(losses) == {"seg", "aux"} and all(torch.isfinite(v) for v in losses.values())


def test_segmenter_modes_without_aux():
    model = _segmenter(16, aux=False).train()
    assert model.head.aux is None
    losses = model(torch.randn(2, 3, 64, 64), torch.randint(0, K, (2, 64, 64)))
    assert set(losses) == {"seg"}
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 33, 70)).shape == (2, K, 33, 70)
    with pytest.raises(ValueError, match="only returns"):
        Segmenter(build_backbone("resnet18", out_features=("c4", "c5")), model.head)


def test_head_reads_channels_from_specs_and_checks_order():
    # Not a ResNet: channel counts nobody would hard-code.
    specs = [FeatureSpec("c3", 24, 8), FeatureSpec("c4", 40, 16), FeatureSpec("c5", 72, 32)]
    head = FCNHead(specs, 3, aux=True).train()
    assert head.score[0].in_channels == 72 and head.score[0].out_channels == 72 // 4
    assert [c.in_channels for c in head.skip_scores] == [40, 24]  # fused coarse to fine
    feats = {"c3": torch.randn(2, 24, 7, 9), "c4": torch.randn(2, 40, 4, 5), "c5": torch.randn(2, 72, 2, 3)}
    raw = head(feats, (50, 66))
    assert raw["out"].shape == raw["aux"].shape == (2, 3, 50, 66)
    # final score biases start at zero
    assert all(float(b.detach().abs().max()) == 0 for b in (head.score[-1].bias, head.aux[-1].bias,
                                                    *(c.bias for c in head.skip_scores)))
    with pytest.raises(ValueError, match="fine to coarse"):
        FCNHead(specs, 3, in_features=("c5", "c4"))
    with pytest.raises(ValueError, match="c6"):
        FCNHead(specs, 3, in_features=("c4", "c6"))


def test_skips_reach_the_output():
    """FCN-8s, not FCN-32s: a change in C3 alone changes the logits."""
    specs = [FeatureSpec("c3", 8, 8), FeatureSpec("c4", 8, 16), FeatureSpec("c5", 8, 32)]
    head = FCNHead(specs, 2).eval()
    feats = {"c3": torch.randn(1, 8, 8, 8), "c4": torch.randn(1, 8, 4, 4), "c5": torch.randn(1, 8, 2, 2)}
    out = head(feats, (64, 64))["out"]
    feats["c3"] = feats["c3"] + 1
    assert not torch.allclose(out, head(feats, (64, 64))["out"])


def test_loss_ignores_ignore_index():
    specs = [FeatureSpec("c4", 8, 16), FeatureSpec("c5", 8, 32)]
    head = FCNHead(specs, K, in_features=("c5",), aux=True, aux_weight=0.4)
    logits = torch.randn(2, K, 6, 7)
    aux = torch.randn(2, K, 6, 7)
    target = torch.full((2, 6, 7), 255, dtype=torch.int64)
    target[1, 3, 4] = 2
    losses = head.loss({"out": logits, "aux": aux}, target)
    torch.testing.assert_close(losses["seg"], F.cross_entropy(logits[1:2, :, 3, 4], torch.tensor([2])))
    torch.testing.assert_close(losses["aux"], 0.4 * F.cross_entropy(aux[1:2, :, 3, 4], torch.tensor([2])))
    # all ignored: zero, not NaN (a legal batch must not stop training)
    losses = head.loss({"out": logits.requires_grad_()}, torch.full((2, 6, 7), 255))
    assert set(losses) == {"seg"} and float(losses["seg"].detach()) == 0.0
    losses["seg"].backward()
    assert float(logits.grad.abs().max()) == 0.0
    # low-precision logits: the loss is float32
    assert head.loss({"out": logits.detach().bfloat16()}, target)["seg"].dtype == torch.float32


def test_loss_rejects_mismatched_masks():
    head = FCNHead([FeatureSpec("c5", 8, 32)], K, in_features=("c5",))
    with pytest.raises(ValueError, match=r"\(2, 6, 8\).*\(2, 5, 6, 7\)"):
        head.loss({"out": torch.randn(2, K, 6, 7)}, torch.zeros(2, 6, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        head.loss({"out": torch.randn(2, K, 6, 7)}, torch.zeros(2, 6, 7))


def test_confusion_matrix_ignores_ignore_index_and_miou_by_hand():
    cm = ConfusionMatrix(2, ignore_index=255)
    target = torch.tensor([[0, 0, 1, 1, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 1]])
    cm.update(pred, target)
    assert int(cm.mat.sum()) == 4  # ignored pixels count nowhere
    m = cm.compute()
    # class 0: TP 1, FN 1, FP 0 -> 1/2; class 1: TP 2, FN 0, FP 1 -> 2/3
    assert m["iou"] == pytest.approx([1 / 2, 2 / 3])
    assert m["miou"] == pytest.approx(7 / 12)
    assert m["acc"] == pytest.approx(3 / 4)

    perfect = ConfusionMatrix(3, ignore_index=255)
    t = torch.tensor([0, 1, 2, 2, 255])
    perfect.update(torch.tensor([0, 1, 2, 2, 1]), t)
    assert perfect.compute()["miou"] == 1.0


def test_sgd_steps_reduce_loss():
    model = _segmenter(32, aux=True, num_classes=3).train()
    x = torch.randn(2, 3, 64, 64)
    y = torch.zeros(2, 64, 64, dtype=torch.int64)
    y[:, :, 32:] = 1
    y[:, 40:, :] = 2
    y[:, :4] = 255
    x[:, 0] += 2.0 * (y == 1)  # the classes are visible in the input
    x[:, 1] += 2.0 * (y == 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = sum(model(x, y).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- COCO -> semantic

H, W = 20, 24
CATEGORIES = [{"id": 42, "name": "hat"}, {"id": 3, "name": "shoe"}, {"id": 7, "name": "bag"}]
LABEL = {3: 1, 7: 2, 42: 3}  # sorted category ids, after background 0


def _rect(y0, y1, x0, x1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _uncompressed_rle(m):
    # column-major run lengths starting with a run of zeros (the COCO convention)
    flat = m.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]]))
    counts = runs.tolist() if flat[0] == 0 else [0] + runs.tolist()
    return {"size": [H, W], "counts": counts}


def _compressed_rle(m):
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


POLYGON = [[8, 6, 20, 6, 20, 16, 8, 16]]  # x, y pairs


def _coco_json():
    anns = [
        # crowd first in the file: it must still win over the instances painted after it
        {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 1, "bbox": [10, 0, 14, 5],
         "segmentation": _uncompressed_rle(_rect(0, 5, 10, 24))},
        {"id": 2, "image_id": 1, "category_id": 42, "iscrowd": 0, "bbox": [2, 2, 12, 10],
         "segmentation": _uncompressed_rle(_rect(2, 12, 2, 14))},
        {"id": 3, "image_id": 1, "category_id": 3, "iscrowd": 0, "bbox": [8, 6, 12, 10],
         "segmentation": POLYGON},  # on top of annotation 2
        {"id": 4, "image_id": 1, "category_id": 7, "iscrowd": 0, "bbox": [0, 14, 6, 5],
         "segmentation": _compressed_rle(_rect(14, 19, 0, 6))},
    ]
    return {"images": [{"id": 1, "file_name": "a.png", "width": W, "height": H},
                       {"id": 2, "file_name": "b.jpg", "width": W, "height": H}],
            "annotations": anns, "categories": CATEGORIES}


@pytest.fixture
def coco_dir(tmp_path):
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / "a.png"), rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "b.jpg"), rng.integers(0, 255, (H, W), dtype=np.uint8))  # gray
    (tmp_path / "ann.json").write_text(json.dumps(_coco_json()))
    return tmp_path


def test_coco_instances_painted_into_semantic_map(coco_dir):
    ds = CocoSemanticDataset(coco_dir / "ann.json", coco_dir)
    assert ds.num_classes == 4 and ds.ignore_index == 255
    assert ds.class_names == ["background", "shoe", "bag", "hat"] and ds.cat_ids == [3, 7, 42]
    assert ds.label_to_category([1, 3]).tolist() == [3, 42]
    assert len(ds) == 2 and ds.stats["annotations"] == 3 and ds.stats["crowd"] == 1

    polygon = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(POLYGON, H, W)))
    assert polygon[7:15, 9:19].all() and polygon.sum() < 14 * 14  # the test's own premise
    expected = np.zeros((H, W), np.int64)
    expected[_rect(2, 12, 2, 14) > 0] = LABEL[42]
    expected[polygon > 0] = LABEL[3]          # later instance on top
    expected[_rect(14, 19, 0, 6) > 0] = LABEL[7]
    expected[_rect(0, 5, 10, 24) > 0] = 255   # crowd last: ignore wins
    image, mask = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.uint8
    assert mask.dtype == torch.int64
    np.testing.assert_array_equal(mask.numpy(), expected)
    assert mask[8, 10] == LABEL[3] and mask[3, 11] == 255 and mask[3, 3] == LABEL[42]

    image, mask = ds[1]  # no annotations: all background; gray image -> RGB
    assert image.shape == (3, H, W) and int(mask.abs().sum()) == 0


def test_coco_bad_segmentation_named(coco_dir):
    data = _coco_json()
    data["annotations"][3]["segmentation"] = {"size": [H + 1, W], "counts": "abc"}
    data["annotations"][2]["segmentation"] = [[1, 2, 3, 4]]  # pycocotools would read a box
    (coco_dir / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad\.json: malformed annotation id 3: .*polygon"):
        CocoSemanticDataset(coco_dir / "bad.json", coco_dir)
    with pytest.warns(UserWarning, match="2 malformed"):
        ds = CocoSemanticDataset(coco_dir / "bad.json", coco_dir, skip_bad=True)
    assert ds.stats["malformed"] == 2 and set(np.unique(ds[0][1].numpy())) == {0, 3, 255}


def test_fashion_scenes_masks_and_coco_agree(tmp_path):
    """Both loaders read the generated dataset, and they agree on every labelled pixel."""
    from tasks.data import scenes

    fm = write_fake_fashion_mnist(tmp_path / "fm", 40, 20)
    root = scenes.generate_scenes(tmp_path / "scenes", train=0, val=2, size=64, seed=1,
                                  data_dir=fm, workers=1, progress=False)
    folder = scenes_segmentation(root, "val")
    coco = CocoSemanticDataset(root / "annotations" / "instances_val.json", root / "images" / "val")
    assert folder.num_classes == coco.num_classes == 11 and folder.class_names == coco.class_names
    assert len(folder) == len(coco) == 2
    for i in range(2):
        (img_a, m_a), (img_b, m_b) = folder[i], coco[i]
        assert torch.equal(img_a, img_b)
        labelled = m_a != 255  # 255 in the PNG: soft borders (most of the noisy fake items), dropped items
        assert (m_a[labelled] > 0).sum() > 100
        assert torch.equal(m_a[labelled], m_b[labelled])


# ----------------------------------------------------------------------------- mask folders

VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [0] * (3 * 250) + [224, 224, 192]


def _label_map(h=12, w=16, k=K):
    m = (np.arange(h * w).reshape(h, w) % k).astype(np.uint8)
    m[0, :3] = 255
    return m


def _write_pair(folder, stem, mask, mode="P", suffix=".png", image_size=None):
    (folder / "images").mkdir(exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    h, w = image_size or mask.shape
    cv2.imwrite(str(folder / "images" / f"{stem}{suffix}"), np.full((h, w, 3), 90, np.uint8))
    if mode == "P":
        im = Image.fromarray(mask, mode="P")
        im.putpalette(VOC_PALETTE)
    else:
        im = Image.fromarray(mask).convert(mode) if mode != "L" else Image.fromarray(mask, mode="L")
    im.save(folder / "masks" / f"{stem}.png")


def _folder(root, **kw):
    return MaskFolderDataset(root / "images", root / "masks", num_classes=kw.pop("num_classes", K), **kw)


def test_palette_and_gray_masks(tmp_path):
    m = _label_map()
    _write_pair(tmp_path, "a", m, "P")
    _write_pair(tmp_path, "b", m[::-1].copy(), "L", suffix=".jpg")
    assert Image.open(tmp_path / "masks" / "a.png").mode == "P"
    # the colours are not the classes: a colour conversion would read wrong ids
    assert not np.array_equal(np.array(Image.open(tmp_path / "masks" / "a.png").convert("L")), m)
    ds = _folder(tmp_path, class_names=list("abcde"))
    assert ds.num_classes == K and ds.class_names == list("abcde") and ds.ignore_index == 255
    (img_a, mask_a), (img_b, mask_b) = ds[0], ds[1]
    assert img_a.shape == img_b.shape == (3, 12, 16) and img_a.dtype == torch.uint8
    assert mask_a.dtype == torch.int64
    np.testing.assert_array_equal(mask_a.numpy(), m)
    np.testing.assert_array_equal(mask_b.numpy(), m[::-1])


def test_bad_masks_named(tmp_path):
    _write_pair(tmp_path, "good", _label_map())
    _write_pair(tmp_path, "small", _label_map(), image_size=(12, 17))
    high = _label_map()
    high[5, 5] = K  # one id past the last class
    _write_pair(tmp_path, "high", high)
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(tmp_path / "masks" / "rgb.png")
    cv2.imwrite(str(tmp_path / "images" / "rgb.png"), np.zeros((12, 16, 3), np.uint8))
    ds = _folder(tmp_path)
    names = [p[0].name for p in ds._pairs]
    assert names == ["good.png", "high.png", "rgb.png", "small.png"]
    ds[0]
    with pytest.raises(ValueError, match=r"high\.png: class ids \[5\]"):
        ds[1]
    with pytest.raises(ValueError, match=r"rgb\.png: mask mode 'RGB'"):
        ds[2]
    with pytest.raises(ValueError, match=r"masks/small\.png: mask is 16x12 .*small\.png is 17x12"):
        ds[3]
    skipping = _folder(tmp_path, skip_bad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, mask = skipping[1]  # high, rgb and small are skipped: the next usable one is good
    assert [str(w.message).split(": ")[1].rsplit("/", 1)[-1] for w in caught] == ["high.png", "rgb.png", "small.png"]
    np.testing.assert_array_equal(mask.numpy(), _label_map())
    assert skipping.stats["unreadable"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # flagged: passed over, not read nor warned about again
        np.testing.assert_array_equal(skipping[2][1].numpy(), _label_map())
    assert [p.rsplit("/", 1)[-1] for p in skipping.unusable] == ["high.png", "rgb.png", "small.png"]
    assert skipping.stats["unreadable"] == 3
    # missing mask: at init, naming the image and the mask looked for
    cv2.imwrite(str(tmp_path / "images" / "lonely.jpg"), np.zeros((12, 16, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"lonely\.jpg: no mask .*lonely\.png"):
        _folder(tmp_path)
    with pytest.warns(UserWarning, match="1 images without a mask"):
        assert len(_folder(tmp_path, skip_bad=True)) == 4
    assert len(_folder(tmp_path, skip_bad=True, limit=2)) == 2
    with pytest.raises(ValueError, match="num_classes"):
        _folder(tmp_path, num_classes=256)


# ----------------------------------------------------------------------------- transforms, batching

def _square_sample():
    image = np.full((40, 50, 3), 100, np.uint8)
    mask = np.zeros((40, 50), np.uint8)
    image[8:20, 30:44] = 255  # off centre, so a flip moves it
    mask[8:20, 30:44] = 3
    return image, mask


def _grow(m):
    return cv2.dilate(m.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0


def test_train_transforms_keep_image_and_mask_aligned():
    image, mask = _square_sample()
    t = segmentation_train_transforms(48, scale=(0.5, 2.0), hflip=0.5, seed=0)
    seen_square = seen_pad = 0
    centres = set()
    for _ in range(25):
        out = t(image=image, mask=mask)
        img, m = out["image"], out["mask"]
        assert img.shape == (48, 48, 3) and m.shape == (48, 48) and img.dtype == np.uint8
        assert set(np.unique(m)) <= {0, 3, 255}  # nearest: no blended class ids
        pad = img.max(axis=2) == 0
        np.testing.assert_array_equal(pad, m == 255)  # padding: image 0, mask ignore
        seen_pad += bool(pad.any())
        white, square = img.min(axis=2) > 177, m == 3
        if square.sum() > 20:
            seen_square += 1
            # bilinear image vs nearest mask may differ by one pixel at the edges, no more
            assert not (white & ~_grow(square)).any() and not (square & ~_grow(white)).any()
            centres.add(tuple(np.round(np.argwhere(square).mean(0)).astype(int)))
    assert seen_square >= 5 and seen_pad >= 2 and len(centres) >= 3
    # no scale change and a certain flip: the square is mirrored in both, padding below
    out = segmentation_train_transforms(50, scale=(1.0, 1.0), hflip=1.0)(image=image, mask=mask)
    assert (out["mask"][8:20, 6:20] == 3).all() and int((out["mask"] == 3).sum()) == 12 * 14
    assert (out["image"][8:20, 6:20] == 255).all() and (out["mask"][40:] == 255).all()
    # one seed, one stream
    a = segmentation_train_transforms(48, seed=5)(image=image, mask=mask)
    b = segmentation_train_transforms(48, seed=5)(image=image, mask=mask)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])


def _dense(size):
    return Preprocess(3, (0.5,) * 3, (0.2,) * 3, "longest", size)


def test_val_transforms():
    """Evaluation's resize (Preprocess): longer side to the size, aspect kept, masks nearest;
    no padding (the collate pads the batch)."""
    image, mask = _square_sample()
    out = _dense(50).albumentations()(image=image, mask=mask)
    assert np.array_equal(out["image"], image) and np.array_equal(out["mask"], mask)
    out = _dense(64).albumentations()(image=image, mask=mask)
    img, m = out["image"], out["mask"]
    assert img.shape == (51, 64, 3) and m.shape == (51, 64)  # 40x50 -> 51x64
    assert set(np.unique(m)) == {0, 3}
    assert (img[m == 3].min(axis=1) > 177).mean() > 0.9
    out = _dense(25).albumentations()(image=image, mask=mask)  # shrinking: area interpolation, masks nearest
    assert out["image"].shape == (20, 25, 3) and set(np.unique(out["mask"])) == {0, 3}


def test_dataset_with_transforms_and_collate(tmp_path):
    _write_pair(tmp_path, "a", _label_map(30, 20))
    _write_pair(tmp_path, "b", _label_map(12, 16))
    ds = _folder(tmp_path, transforms=_dense(24).albumentations())
    image, mask = ds[0]
    assert image.shape == (3, 24, 16) and mask.shape == (24, 16) and mask.dtype == torch.int64
    images, masks = collate_segmentation([ds[0], _folder(tmp_path)[0], _folder(tmp_path)[1]], size_divisible=16)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert masks.shape == (3, 32, 32) and masks.dtype == torch.int64
    assert (masks[1, 30:] == 255).all() and (masks[1, :, 20:] == 255).all() and (images[1, :, 30:] == 0).all()
    np.testing.assert_array_equal(masks[2, :12, :16].numpy(), _label_map(12, 16))
    assert (masks[2, 12:] == 255).all() and (masks[2, :, 16:] == 255).all()
