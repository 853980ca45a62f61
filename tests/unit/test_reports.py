"""The reports users expect: per-class AP (checked by hand and against pycocotools' own
per-category COCOeval), per-class IoU, precision and recall, and the pictures with legends."""
import contextlib
import io
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tasks import classify, detect, multitask, segment
from tasks.data.coco import CocoDetection, collate_detection, run_cocoeval
from tasks.data.preprocess import Preprocess
from tasks.engine.metrics import ConfusionMatrix, coco_gt_present, coco_per_class
from tasks.engine.registry import TaskData
from tasks.engine.viz import class_colors, draw_detection_grid, draw_segmentation_grid, object_colors

# Five classes with non-contiguous ids, two 100 x 100 images. COCO's AP is the mean of the
# interpolated precision at 101 recall points (0, 0.01, ..., 1) and 10 IoU thresholds (.50:.95).
CATS = {1: "A", 3: "B", 7: "C", 8: "D", 20: "E"}
GT = [  # (image, category, xywh)
    (0, 1, [10, 10, 20, 20]), (1, 1, [10, 10, 20, 20]),  # A: two boxes
    (0, 3, [50, 50, 30, 30]),  # B
    (1, 7, [50, 50, 30, 30]),  # C
    (0, 8, [10, 60, 20, 20]),  # D: never detected
]                              # E: no ground truth
DETS = [  # (image, category, xywh, score)
    (0, 1, [10, 10, 20, 20], 0.9),  # A: a hit, then a miss: precision 1 up to recall 0.5, then nothing
    (1, 1, [60, 10, 20, 20], 0.8),
    (0, 3, [57, 50, 30, 30], 0.7),  # B: shifted by 7 px, IoU 23/37 = 0.62: a hit at IoU .50, .55, .60 only
    (1, 7, [50, 50, 30, 30], 0.6),  # C: perfect
    (1, 20, [10, 60, 20, 20], 0.5),  # E: a detection of a class with no ground truth
]
HAND_AP = {"A": 51 / 101, "B": 3 / 10, "C": 1.0, "D": 0.0, "E": -1.0}
HAND_AP50 = {"A": 51 / 101, "B": 1.0, "C": 1.0, "D": 0.0, "E": -1.0}


def _coco_dict() -> dict:
    return {"images": [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in range(2)],
            "annotations": [{"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
                             "iscrowd": 0} for n, (i, c, b) in enumerate(GT)],
            "categories": [{"id": c, "name": n} for c, n in CATS.items()]}


def _coco() -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = _coco_dict()
        coco.createIndex()
    return coco


def _results() -> list[dict]:
    return [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in DETS]


def _pycocotools_one_category(coco: COCO, results: list[dict], cat: int) -> tuple[float, float]:
    """AP and AP50 as pycocotools reports them for the category alone."""
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes([dict(r) for r in results]), iouType="bbox")
        ev.params.catIds = [cat]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


# ----------------------------------------------------------------------------- detection

def test_per_class_ap_equals_hand_values_and_pycocotools_per_category():
    coco, results = _coco(), _results()
    ev = run_cocoeval(coco, results)
    order = [7, 1, 20, 3, 8]  # not COCOeval's (sorted) order: the mapping is by id
    per_class = coco_per_class(ev, order)
    names = [CATS[c] for c in order]
    assert per_class["AP"] == pytest.approx([HAND_AP[n] for n in names], abs=1e-12)
    assert per_class["AP50"] == pytest.approx([HAND_AP50[n] for n in names], abs=1e-12)
    for c, ap, ap50 in zip(order, per_class["AP"], per_class["AP50"]):
        assert (ap, ap50) == pytest.approx(_pycocotools_one_category(coco, results, c), abs=1e-12), CATS[c]
    # the overall numbers are the means over the classes with ground truth
    with_gt = [n for n in HAND_AP if HAND_AP[n] >= 0]
    assert ev.stats[0] == pytest.approx(np.mean([HAND_AP[n] for n in with_gt]))
    assert ev.stats[1] == pytest.approx(np.mean([HAND_AP50[n] for n in with_gt]))
    # the PR curves at IoU 0.5: A is 1 up to recall 0.5 and 0 after; E (no ground truth) NaN
    curves = per_class["precision50"]
    assert curves.shape == (5, 101) and np.isnan(curves[2]).all()
    a = curves[1]
    assert a[:51] == pytest.approx(np.ones(51)) and (a[51:] == 0).all()


def test_no_detections_scores_zero_for_classes_with_ground_truth():
    coco = _coco()
    ids = sorted(CATS)
    has_gt = coco_gt_present(coco, ids, [0, 1])
    assert has_gt == [True, True, True, True, False]
    assert coco_gt_present(coco, ids, [1]) == [True, False, True, False, False]
    per_class = coco_per_class(None, ids, has_gt=has_gt)
    assert per_class["AP"] == [0.0, 0.0, 0.0, 0.0, -1.0] and per_class["AP50"] == per_class["AP"]


class _Fixed(torch.nn.Module):
    """A model whose outputs are given (one batch)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, images):
        return self.outputs


def _detect_data(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(2):
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), np.full((100, 100, 3), 60 + 80 * i, np.uint8))
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(_coco_dict()))
    pre = Preprocess(3, (0.5,) * 3, (0.2,) * 3, "longest", 100)  # 100 px images stay as they are
    ds = CocoDetection(path, tmp_path / "img", pre.albumentations(boxes=True), evaluation=True)
    images, targets = collate_detection([ds[0], ds[1]])
    images = pre.normalize(images)  # as the loader does on the device
    meta = {"class_names": ds.class_names, "category_ids": ds.cat_ids, **pre.to_meta()}
    return TaskData(None, [(images, targets)], meta, val_set=ds)


def _outputs(dets, cat_ids):
    out = []
    for image in range(2):
        mine = [d for d in dets if d[0] == image]
        boxes = torch.tensor([[x, y, x + w, y + h] for _, _, (x, y, w, h), _ in mine], dtype=torch.float32)
        out.append({"boxes": boxes.reshape(-1, 4), "scores": torch.tensor([d[3] for d in mine]),
                    "labels": torch.tensor([cat_ids.index(d[1]) for d in mine], dtype=torch.int64)})
    return out


def test_detect_evaluate_reports_per_class_ap_and_writes_pr_curve(tmp_path):
    data = _detect_data(tmp_path)
    model = _Fixed(_outputs(DETS, data.val_set.cat_ids))
    out = tmp_path / "run"
    out.mkdir()
    metrics = detect.evaluate(model, data, torch.device("cpu"), amp=False, output=out)
    assert metrics["per_class_AP"] == pytest.approx(HAND_AP, abs=1e-6)
    assert metrics["per_class_AP50"] == pytest.approx(HAND_AP50, abs=1e-6)
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics)
    json.dumps(metrics, allow_nan=False)  # metrics.jsonl / metrics.json can hold it as it is
    lines = detect.report(metrics, data.meta)
    assert lines[0].startswith("COCO box AP")
    assert "A 0.505 (0.505)" in lines[1] and "B 0.300 (1.000)" in lines[1] and "E -" in lines[1]
    for name in ("pr_curve.png", "detections.png", "predictions.json"):
        assert (out / name).is_file(), name
    with Image.open(out / "pr_curve.png") as im:
        assert im.width > 300 and im.height > 200


def test_detect_evaluate_without_detections(tmp_path):
    data = _detect_data(tmp_path)
    model = _Fixed(_outputs([], data.val_set.cat_ids))
    out = tmp_path / "run"
    out.mkdir()
    metrics = detect.evaluate(model, data, torch.device("cpu"), amp=False, output=out)
    assert metrics["AP"] == 0.0
    assert metrics["per_class_AP"] == {"A": 0.0, "B": 0.0, "C": 0.0, "D": 0.0, "E": -1.0}
    assert (out / "pr_curve.png").is_file() and (out / "detections.png").is_file()


def _legend_colours(path, grid_height):
    """The set of RGB colours in the band under the picture's first ``grid_height`` rows."""
    with Image.open(path) as im:
        band = np.asarray(im.convert("RGB"))[grid_height:]
    return {tuple(int(v) for v in px) for px in band.reshape(-1, 3)}


def test_detection_picture_labels_boxes_and_has_a_legend(tmp_path):
    names = ["shirt", "boot", "bag"]
    colors = class_colors(4)[1:]  # label c: segmentation index c + 1's colour (the same class, the same colour)
    assert object_colors(3) == colors
    image = torch.full((3, 64, 64), 90, dtype=torch.uint8)
    pred = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0], [30.0, 30.0, 60.0, 60.0]]),
            "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 2])}
    truth = [{"boxes": torch.tensor([[4.0, 4, 20, 20]])}]
    draw_detection_grid([image], [pred], names, tmp_path / "d.png", targets=truth)
    with Image.open(tmp_path / "d.png") as im:
        rgb = np.asarray(im.convert("RGB"))
    tile = rgb[:384 + 4]  # one 64 px image upscaled to 384, 4 px of padding
    assert rgb.shape[0] > 384 + 8  # the legend band below the grid
    seen = _legend_colours(tmp_path / "d.png", 384 + 8)
    assert colors[1] in seen and colors[2] not in seen  # the class drawn (score >= 0.4), not the other
    tile_colours = {tuple(int(v) for v in px) for px in tile.reshape(-1, 3)}
    assert colors[1] in tile_colours and (255, 255, 255) in tile_colours  # box / label tag; ground truth


def test_segmentation_picture_has_a_legend_of_the_classes_painted(tmp_path):
    names = ["background", "shirt", "boot", "bag"]
    colors = class_colors(4)
    image = torch.full((3, 16, 16), 100, dtype=torch.uint8)
    truth = torch.zeros(16, 16, dtype=torch.int64)
    truth[2:8, 2:8] = 1
    pred = torch.zeros(16, 16, dtype=torch.int64)
    pred[8:14, 8:14] = 3
    draw_segmentation_grid([image], [pred], names, tmp_path / "s.png", targets=[truth])
    seen = _legend_colours(tmp_path / "s.png", 16 + 8)
    assert colors[1] in seen and colors[3] in seen and colors[2] not in seen and colors[0] not in seen


# ----------------------------------------------------------------------------- multitask picture

def test_multitask_picture_shows_truth_even_without_predictions(tmp_path):
    """What an early run gives: no box above the threshold and an all-background predicted
    mask. The picture still shows every image, with the true masks and boxes beside it."""
    names = ["shirt", "boot"]
    images = [torch.full((3, 64, 64), 40 + 60 * i, dtype=torch.uint8) for i in range(2)]
    nothing = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    low = {"boxes": torch.tensor([[5.0, 5, 30, 30]]), "scores": torch.tensor([0.1]), "labels": torch.tensor([0])}
    truth = []
    for i in range(2):
        mask = torch.zeros(64, 64, dtype=torch.int64)
        mask[10:30, 10:30] = i + 1  # mask value = label + 1
        truth.append({"boxes": torch.tensor([[10.0, 10, 30, 30]]), "labels": torch.tensor([i]), "mask": mask})
    background = [torch.zeros(64, 64, dtype=torch.int64)] * 2
    multitask._draw(images, [nothing, low], background, names, tmp_path / "multitask.png", truth=truth)
    with Image.open(tmp_path / "multitask.png") as im:
        rgb = np.asarray(im.convert("RGB")).astype(np.int64)
    side, pad = 384, 4
    at = [pad + i * (side + pad) for i in range(2)]  # tile corners: 4 px of padding around each
    tiles = [rgb[y:y + side, x:x + side] for y in at for x in at]  # per image: truth, prediction
    assert all(t.shape == (side, side, 3) for t in tiles)
    for truth_tile, pred_tile in (tiles[:2], tiles[2:]):
        assert truth_tile.std() > 0  # not blank: the true mask and box are drawn
        assert (truth_tile != pred_tile).any(axis=-1).mean() > 0.05
        assert pred_tile.std() == 0  # an untrained prediction: nothing drawn over a flat image
    box_colors = class_colors(3)[1:]
    seen = _legend_colours(tmp_path / "multitask.png", 2 * (side + pad) + pad)
    assert box_colors[0] in seen and box_colors[1] in seen


# ----------------------------------------------------------------------------- segmentation, classification

def _segment_data():
    names = ["background", "shirt", "boot"]
    pre = Preprocess(3, (0.5,) * 3, (0.2,) * 3, "longest", 8)
    target = torch.tensor([[0, 0, 1, 1, 2, 2, 255, 0]]).repeat(8, 1)[None]  # [1, 8, 8]
    return TaskData(None, [(torch.zeros(1, 3, 8, 8), target)], {"class_names": names, **pre.to_meta()})


def test_segment_evaluate_stores_and_reports_iou_by_class_name(tmp_path):
    data = _segment_data()
    pred = torch.tensor([0, 1, 1, 1, 2, 0, 0, 0])  # per column; column 6 is ignored
    logits = torch.nn.functional.one_hot(pred, 3).T.float()[:, None, :].repeat(1, 8, 1)[None]  # [1, 3, 8, 8]
    metrics = segment.evaluate(_Fixed(logits), data, torch.device("cpu"), amp=False, output=tmp_path)
    # by hand over the 7 scored columns: background: true {0, 1, 7}, predicted {0, 5, 7}: TP 2,
    # union 4; shirt: true {2, 3}, predicted {1, 2, 3}: TP 2, union 3; boot: true {4, 5},
    # predicted {4}: TP 1, union 2
    assert metrics["per_class_iou"] == pytest.approx({"background": 2 / 4, "shirt": 2 / 3, "boot": 1 / 2})
    assert metrics["iou"] == pytest.approx([2 / 4, 2 / 3, 1 / 2])
    line = segment.report(metrics, data.meta)[1]
    assert "background 0.500" in line and "shirt 0.667" in line and "boot 0.500" in line
    assert (tmp_path / "segmentation.png").is_file()


def test_confusion_matrix_precision_and_recall_by_hand():
    cm = ConfusionMatrix(3)
    # rows = true class: class 0: 3 right, 1 called 1; class 1: 2 right, 2 called 2; class 2: never seen
    true = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    cm.update(pred, true)
    m = cm.compute()
    assert m["precision"] == pytest.approx([3 / 3, 2 / 3, 0 / 2])
    assert m["recall"] == pytest.approx([3 / 4, 2 / 4, 0.0]) and m["recall"] == m["per_class_acc"]


def test_classify_evaluate_reports_precision_recall_and_names_the_confusion_axes(tmp_path, monkeypatch):
    from tasks.engine import viz

    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    logits = torch.nn.functional.one_hot(pred, 3).float()
    pre = Preprocess(1, (0.5,), (0.2,), "crop", 8)
    data = TaskData(None, [(torch.zeros(8, 1, 8, 8), labels)], {"class_names": ["shirt", "boot", "bag"],
                                                                **pre.to_meta()})
    ticks = {}
    save = viz.save_figure

    def keep_ticks(fig, path):
        ax = fig.axes[0]
        ticks["x"] = [t.get_text() for t in ax.get_xticklabels()]
        ticks["y"] = [t.get_text() for t in ax.get_yticklabels()]
        save(fig, path)

    monkeypatch.setattr(viz, "save_figure", keep_ticks)
    metrics = classify.evaluate(_Fixed(logits), data, torch.device("cpu"), amp=False, output=tmp_path)
    assert metrics["per_class_precision"] == pytest.approx({"shirt": 1.0, "boot": 2 / 3, "bag": 0.0})
    assert metrics["per_class_recall"] == pytest.approx({"shirt": 0.75, "boot": 0.5, "bag": 0.0})
    assert metrics["per_class_acc"] == pytest.approx([0.75, 0.5, 0.0])
    lines = classify.report(metrics, data.meta)
    assert lines[0] == "accuracy 0.6250"
    assert "shirt 1.000/0.750" in lines[1] and "boot 0.667/0.500" in lines[1] and "precision/recall" in lines[1]
    assert ticks == {"x": ["shirt", "boot", "bag"], "y": ["shirt", "boot", "bag"]}
    assert (tmp_path / "confusion.png").is_file()


def test_curves_leave_out_coco_minus_one_metrics(tmp_path, monkeypatch):
    """APl is -1 on every epoch of a set without large objects (COCO's "none"): no line for it,
    its -1 would stretch the validation axis under the real metrics."""
    from tasks.engine import viz
    figures = []
    monkeypatch.setattr(viz, "save_figure", lambda fig, path, tight=True: figures.append(fig))
    records = [{"epoch": e, "train_loss": 1.0 / e, "val_AP": 0.1 * e, "val_APl": -1.0, "val_APs": -1.0 if e == 1 else 0.2}
               for e in (1, 2, 3)]
    viz.plot_curves(records, tmp_path / "curves.png", main_metric="AP")
    labels = [line.get_label() for line in figures[0].axes[1].get_lines()]
    assert labels == ["AP", "APs"]


def test_detect_report_shows_cocos_minus_one_as_a_dash():
    metrics = {"AP": 0.5, "AP50": 0.75, "AP75": 0.5, "APs": 0.25, "APm": 0.5, "APl": -1.0}
    line = detect.report(metrics, {"class_names": ["a"]})[0]
    assert line == "COCO box AP 0.5000  AP50 0.7500  AP75 0.5000  APs 0.2500  APm 0.5000  APl -"
