"""The Python API (``tasks.load(...).predict``), the task registry and ``Preprocess``: inputs of
every kind, outputs in original coordinates, EXIF, bad input, checkpoints of every task."""
import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch import nn

import tasks
from tasks import TASKS, load
from tasks.data.gpu_augment import IMAGENET_MEAN, IMAGENET_STD
from tasks.data.images import apply_orientation, image_from_input, read_image
from tasks.data.preprocess import Preprocess
from tasks.engine.predict import Predictor
from tests.fakes import CLASS_NAMES, write_task_checkpoint


# ----------------------------------------------------------------------------- registry

def test_registry_lists_the_four_tasks_and_each_spec_is_complete():
    assert list(TASKS) == ["classify", "detect", "segment", "multitask"]
    for name, spec in TASKS.items():
        assert spec.name == name and spec.recipes[0] != spec.recipes[1]
        cfg = spec.config()
        assert type(cfg.model) is spec.model_config
    with pytest.raises(ValueError, match="unknown task 'nope'.*classify"):
        tasks.engine.registry.get_task("nope")


@pytest.mark.parametrize("task", ["classify", "detect", "segment", "multitask"])
def test_every_task_loads_its_checkpoint_and_predicts(ckpts, task):
    model = load(ckpts[task], device="cpu", task=task)
    assert model.task == task and model.class_names[-3:] == CLASS_NAMES
    gray = task == "classify"
    image = np.random.default_rng(0).integers(0, 255, (40, 52) if gray else (40, 52, 3), dtype=np.uint8)
    (result,) = model.predict(image)
    if task == "classify":
        assert [c for c, _ in result["top"]] and len(result["top"]) == 3
        assert result["probs"].shape == (3,) and abs(float(result["probs"].sum()) - 1) < 1e-5
    if task in ("detect", "multitask"):
        det = result["detect"] if task == "multitask" else result
        assert det["boxes"].shape[1] == 4 and len(det["names"]) == len(det["scores"]) == len(det["labels"])
        assert (det["boxes"][:, 0::2] <= 52).all() and (det["boxes"][:, 1::2] <= 40).all()
    if task in ("segment", "multitask"):
        seg = result["segment"] if task == "multitask" else result
        assert seg["mask"].shape == (40, 52) and seg["mask"].dtype == torch.int64
        assert abs(sum(seg["class_fractions"].values()) - 1) < 1e-6


@pytest.mark.parametrize("task, other", [("detect", "segment"), ("classify", "multitask"), ("segment", "detect")])
def test_another_tasks_checkpoint_is_refused_naming_both(ckpts, task, other):
    with pytest.raises(ValueError, match=f"is a '{other}' checkpoint, not a '{task}' one"):
        load(ckpts[other], device="cpu", task=task)
    module = __import__(f"tasks.{task}", fromlist=["main"])
    with pytest.raises(ValueError, match=f"is a '{other}' checkpoint, not a '{task}' one"):
        module.main(["--predict", "x.png", "--weights", str(ckpts[other]), "--device", "cpu"])


def test_old_checkpoint_meta_still_loads(tmp_path):
    """Checkpoints written before the common schema said "classes" and had no in_chans / preprocess."""
    path = write_task_checkpoint(tmp_path / "old.pt", "classify",
                                 meta={"classes": CLASS_NAMES, "mean": [0.3], "std": [0.35], "image_size": 28})
    model = load(path, device="cpu")
    assert model.class_names == CLASS_NAMES
    assert model.preprocess == Preprocess(1, (0.3,), (0.35,), "crop", 28)


def test_missing_checkpoint_and_bad_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt: no such checkpoint"):
        load(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="it is a folder"):
        load(tmp_path)
    with pytest.raises(ValueError, match="takes a checkpoint path"):
        load(42)


# ----------------------------------------------------------------------------- inputs

def test_inputs_of_every_kind_give_the_same_result(ckpts, tmp_path):
    model = load(ckpts["detect"], device="cpu")
    rgb = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), rgb[:, :, ::-1])
    inputs = [str(tmp_path / "a.png"), tmp_path / "a.png", Image.fromarray(rgb), rgb,
              torch.from_numpy(rgb).permute(2, 0, 1), np.dstack([rgb, np.full((48, 64), 255, np.uint8)])]
    results = model.predict(inputs, batch_size=4)
    assert len(results) == len(inputs)
    for r in results[1:]:
        torch.testing.assert_close(r["boxes"], results[0]["boxes"])
        assert r["names"] == results[0]["names"]
    # a batch tensor is N images; one image alone gives the same result as within a list
    batch = model.predict(torch.from_numpy(np.stack([rgb, rgb])).permute(0, 3, 1, 2))
    assert len(batch) == 2
    torch.testing.assert_close(model.predict(rgb)[0]["scores"], results[0]["scores"])


def test_gray_16bit_rgba_and_palette_inputs(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    deep = gray.astype(np.uint16) * 257  # the full 16-bit range
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([rgb[:, :, ::-1], np.zeros((20, 30), np.uint8)]))
    assert np.array_equal(image_from_input(tmp_path / "deep.png", 1, "x")[:, :, 0], gray)
    assert np.array_equal(image_from_input(tmp_path / "gray.png", 3, "x"), np.dstack([gray] * 3))
    assert np.array_equal(image_from_input(tmp_path / "rgba.png", 3, "x"), rgb)  # alpha dropped
    assert np.array_equal(image_from_input(Image.fromarray(deep), 1, "x")[:, :, 0], gray)  # PIL "I;16"
    assert np.array_equal(image_from_input(Image.fromarray(rgb).convert("P"), 3, "x"),
                          np.asarray(Image.fromarray(rgb).convert("P").convert("RGB")))
    assert image_from_input(Image.fromarray(rgb), 1, "x").shape == (20, 30, 1)  # PIL RGB -> gray model
    assert image_from_input(gray, 1, "x").shape == (20, 30, 1)  # H x W array for a gray model


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(orientation):
    array = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    image.getexif()[0x0112] = orientation
    assert np.array_equal(apply_orientation(array, orientation), np.asarray(ImageOps.exif_transpose(image)))


def _upright_scene() -> np.ndarray:
    """A black 60 x 90 RGB image with one white box at x 50..80, y 10..30."""
    img = np.zeros((60, 90, 3), np.uint8)
    img[10:30, 50:80] = 255
    return img


def _save_rotated_jpeg(path, upright: np.ndarray) -> None:
    """Stored sideways (as a phone held upright writes it) with EXIF orientation 6."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show"
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(path, quality=98, exif=exif)


def test_exif_rotated_jpeg_is_read_upright_by_predict_not_by_datasets(tmp_path):
    upright = _upright_scene()
    path = tmp_path / "phone.jpg"
    _save_rotated_jpeg(path, upright)
    stored = read_image(path)  # datasets: the stored pixel grid (annotations refer to it)
    assert stored.shape == (90, 60, 3)
    shown = image_from_input(path, 3, "input 0")
    assert shown.shape == upright.shape and np.abs(shown.astype(int) - upright).mean() < 3


@pytest.mark.parametrize("bad, error, match", [
    ("missing.png", FileNotFoundError, r"input 1 \(.*missing.png\): no such file"),
    ("notes.png", ValueError, r"input 1: .*notes.png: cannot decode image"),
    (np.zeros((8, 8, 3), np.float32), ValueError, r"input 1: numpy array of dtype float32, expected uint8"),
    (np.zeros((8, 8), np.uint8), ValueError, r"input 1: numpy array of shape \[8, 8\].*2-D array is one gray channel"),
    (np.zeros((8, 8, 2), np.uint8), ValueError, r"input 1: numpy array with 2 channel\(s\), this model takes 3"),
    (torch.zeros(8, 8, 3, dtype=torch.uint8), ValueError, r"input 1: tensor with 8 channel\(s\)"),
    (torch.zeros(3, 8, 8), ValueError, r"input 1: tensor of dtype float32"),
    (np.zeros((0, 8, 3), np.uint8), ValueError, "has no pixels"),
    ({"image": 1}, ValueError, r"input 1: a dict; expected a file path"),
])
def test_bad_input_is_named_before_any_work(ckpts, tmp_path, monkeypatch, bad, error, match):
    (tmp_path / "notes.png").write_text("not an image")
    if isinstance(bad, str):
        bad = str(tmp_path / bad)
    model = load(ckpts["detect"], device="cpu")
    monkeypatch.setattr(model, "forward", lambda *a: pytest.fail("the model ran before the inputs were checked"))
    with pytest.raises(error, match=match):
        model.predict([np.zeros((8, 8, 3), np.uint8), bad])


def test_empty_list_batch_size_and_unknown_options(ckpts):
    model = load(ckpts["classify"], device="cpu")
    with pytest.raises(ValueError, match="empty list"):
        model.predict([])
    with pytest.raises(ValueError, match="batch_size=0"):
        model.predict(np.zeros((8, 8), np.uint8), batch_size=0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) tile for a classify model \(options: topk\)"):
        model.predict(np.zeros((8, 8), np.uint8), tile=True)
    assert len(model.predict(np.zeros((8, 8), np.uint8), topk=1)[0]["top"]) == 1


# ----------------------------------------------------------------------------- geometry

DENSE = Preprocess(3, IMAGENET_MEAN, IMAGENET_STD, "longest", 128)


class BrightBox(nn.Module):
    """A "detector" that boxes the pixels brighter than mid-gray: its boxes are known exactly."""

    def forward(self, x):
        out = []
        for fg in x.mean(1) > 0:  # normalised: mid-gray is about 0
            ys, xs = fg.nonzero(as_tuple=True)
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None]
            out.append({"boxes": box, "scores": torch.ones(1), "labels": torch.zeros(1, dtype=torch.int64)})
        return out


class BrightMask(nn.Module):
    """A pointwise "segmenter": class 1 where a pixel is brighter than mid-gray."""

    def forward(self, x):
        fg = x.mean(1, keepdim=True)
        return torch.cat([-fg, fg], 1)


def _predictor(task, model, pre=DENSE, names=("thing",)):
    meta = {"class_names": list(names) if task == "detect" else ["background", *names], **pre.to_meta()}
    return Predictor(TASKS[task], model, meta, "cpu")


def test_boxes_come_back_at_the_offset_and_scale_of_a_pasted_scene():
    scene = _upright_scene()  # box x 50..80, y 10..30
    canvas = np.zeros((200, 300, 3), np.uint8)
    oy, ox, s = 37, 110, 2
    canvas[oy:oy + 60 * s, ox:ox + 90 * s] = cv2.resize(scene, (90 * s, 60 * s), interpolation=cv2.INTER_NEAREST)
    model = _predictor("detect", BrightBox())
    (alone,), (pasted,) = model.predict(scene), model.predict(canvas)
    torch.testing.assert_close(alone["boxes"], torch.tensor([[50.0, 10, 80, 30]]), atol=1.5, rtol=0)
    expected = torch.tensor([[ox + 50 * s, oy + 10 * s, ox + 80 * s, oy + 30 * s]], dtype=torch.float32)
    # the network sees the canvas at 128 / 300 of its size: a network pixel is 2.3 canvas pixels
    torch.testing.assert_close(pasted["boxes"], expected, atol=300 / 128 + 0.5, rtol=0)


def test_exif_rotated_photo_gets_upright_boxes(tmp_path):
    path = tmp_path / "phone.jpg"
    _save_rotated_jpeg(path, _upright_scene())
    (result,) = _predictor("detect", BrightBox()).predict(path)
    torch.testing.assert_close(result["boxes"], torch.tensor([[50.0, 10, 80, 30]]), atol=1.5, rtol=0)


def test_masks_come_back_at_the_original_size_and_place():
    canvas = np.zeros((200, 300, 3), np.uint8)
    canvas[40:120, 100:250] = 255
    (result,) = _predictor("segment", BrightMask()).predict(canvas)
    mask = result["mask"].numpy()
    truth = canvas[:, :, 0] > 0
    assert mask.shape == (200, 300)
    wrong = (mask == 1) != truth
    assert wrong.mean() < 0.01  # only at the box's edges, where a network pixel straddles it
    ys, xs = np.nonzero(wrong)
    edge = np.minimum.reduce([np.abs(ys - 40), np.abs(ys - 120), np.abs(xs - 100), np.abs(xs - 250)])
    assert (edge <= 3).all()
    assert result["class_fractions"]["thing"] == pytest.approx(truth.mean(), abs=0.01)


def test_sliding_window_covers_a_large_image_at_full_resolution():
    image = np.random.default_rng(3).integers(0, 255, (150, 220, 3), dtype=np.uint8)
    pre = Preprocess(3, IMAGENET_MEAN, IMAGENET_STD, "longest", 64)
    model = _predictor("segment", BrightMask(), pre)
    (tiled,) = model.predict(image, tile=True)  # pointwise model: every pixel decided at full resolution
    truth = (model.preprocess.normalize(torch.from_numpy(image).permute(2, 0, 1)[None])[0].mean(0) > 0)
    assert torch.equal(tiled["mask"] == 1, truth)
    (whole,) = model.predict(image)  # at the training scale (64 px), upsampled: not the same
    assert not torch.equal(whole["mask"], tiled["mask"])
    small = image[:64, :50]  # no larger than one tile: tiling changes nothing
    assert torch.equal(model.predict(small, tile=True)[0]["mask"], model.predict(small)[0]["mask"])
    with pytest.raises(ValueError, match="overlap=1"):
        model.predict(image, tile=True, overlap=1)


def test_preprocess_crop_geometry_and_albumentations_agree():
    pre = Preprocess(3, IMAGENET_MEAN, IMAGENET_STD, "crop", 32, crop_pct=0.8)
    image = np.random.default_rng(4).integers(0, 255, (50, 80, 3), dtype=np.uint8)
    pixels, geom = pre.transform(image)
    assert pixels.shape == (32, 32, 3) and geom.resized == (40, 64) and geom.offset == (4.0, 16.0)
    assert np.array_equal(pixels, pre.albumentations()(image=image)["image"])
    boxes = geom.boxes_to_original(torch.tensor([[0.0, 0, 32, 32]]))  # the crop, in the original
    torch.testing.assert_close(boxes, torch.tensor([[20.0, 5, 60, 45]]))
    with pytest.raises(ValueError, match="resize='square'"):
        Preprocess(3, IMAGENET_MEAN, IMAGENET_STD, "square", 32)
    with pytest.raises(ValueError, match="expected 3 value"):
        Preprocess(3, (0.5,), (0.5,), "crop", 32)
