"""FCOS post-processing (heads/postprocess.py) and its NMS (heads/nms.py): score threshold, NMS
per class, detections per image, and the device path (fixed shapes, no sync) against
torchvision's ``batched_nms``."""
import math

import pytest
import torch

from backbones import FeatureSpec
from heads import FCOSHead
from heads.geometry import level_sizes, split_levels

K = 5  # classes in the tiny heads
# Synthetic features with known strides: post-processing needs no trunk, only the point grid.
SPECS = [FeatureSpec("c3", 8, 8), FeatureSpec("c4", 8, 16), FeatureSpec("c5", 8, 32)]


def _raw_for(head: FCOSHead, image_size=(64, 64), n=2):
    h, w = image_size
    feats = {s.name: torch.randn(n, s.channels, math.ceil(h / s.stride), math.ceil(w / s.stride)) for s in SPECS}
    return head(feats, image_size)


def _flat(head: FCOSHead, raw) -> dict:
    """The raw outputs flattened over the levels: ``[N, P, ...]``."""
    return dict(zip(("cls_logits", "bbox_reg", "centerness"), head.flat_outputs(raw)[:3]))


def _raw_from(head: FCOSHead, image_size=(64, 64), **flat):
    """Raw outputs at ``image_size`` made of flattened ``[N, P, ...]`` tensors (split into levels)."""
    raw = _raw_for(head, image_size, n=next(iter(flat.values())).shape[0])
    sizes = level_sizes(raw["cls_logits"])
    return {**raw, **{k: split_levels(v, sizes) for k, v in flat.items()}}


def _background(head: FCOSHead, n: int):
    """Flattened outputs of a 64 px batch where nothing scores: ``cls_logits, bbox_reg, centerness``
    (centerness 20, so a point's score is sqrt(sigmoid(its class logit)))."""
    flat = _flat(head, _raw_for(head, (64, 64), n))
    return (torch.full_like(flat["cls_logits"], -20.0), flat["bbox_reg"].clone(),
            torch.full_like(flat["centerness"], 20.0))


def _device_path(head, raw, sync=False, image_size=(64, 64)):
    """What ``postprocess`` (sync) and ``GraphedInference`` run on a GPU (on the CPU postprocess
    takes batched_nms directly)."""
    padded = head.postprocess_padded(raw, image_size, sync=sync)
    return head.postprocess_host({"padded": padded, "raw": raw}, image_size)


def _paths(head, raw, image_size=(64, 64)):
    """The other ways to the same detections: batched_nms, the device path with and without syncs,
    postprocess_device then postprocess_host (GraphedInference's split)."""
    return (head.postprocess_reference(raw, image_size), _device_path(head, raw, False, image_size),
            _device_path(head, raw, True, image_size),
            head.postprocess_host(head.postprocess_device(raw, image_size), image_size))


def _assert_same_detections(out, ref):
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        assert a["labels"].tolist() == b["labels"].tolist()
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=0)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=0)


def test_postprocess_decodes_thresholds_and_suppresses():
    head = FCOSHead(SPECS, K, fpn_channels=8, score_thresh=0.3, nms_thresh=0.5)
    cls_logits, bbox_reg, centerness = _background(head, n=2)
    centerness[0, 64] = 0.0  # score = sqrt(sigmoid(cls) * 0.5)
    # image 0: p3 points 9 and 10 (centres (12, 12) and (20, 12)) predict the same box of
    # class 3; the weaker one must be suppressed. Point 0 of p4 (index 64) holds class 1.
    cls_logits[0, 9, 3], cls_logits[0, 10, 3], cls_logits[0, 64, 1] = 4.0, 2.0, 1.0
    bbox_reg[0, 9] = torch.tensor([1.0, 1.0, 2.0, 2.0])  # box (4, 4, 28, 28)
    bbox_reg[0, 10] = torch.tensor([2.0, 1.0, 1.0, 2.0])  # box (4, 4, 28, 28)
    bbox_reg[0, 64] = torch.tensor([0.25, 0.25, 10.0, 1.0])  # (4, 4, 168, 24): clipped to 64
    raw = _raw_from(head, cls_logits=cls_logits, bbox_reg=bbox_reg, centerness=centerness)
    out = head.postprocess(raw, (64, 64))
    assert out[0]["labels"].tolist() == [3, 1]
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[4.0, 4, 28, 28], [4, 4, 64, 24]]))
    torch.testing.assert_close(out[0]["scores"], (torch.sigmoid(torch.tensor([4.0, 1.0])) * torch.tensor([1.0, 0.5])).sqrt(), rtol=1e-4, atol=1e-5)
    assert len(out[1]["boxes"]) == 0 and out[1]["boxes"].shape == (0, 4) and out[1]["labels"].dtype == torch.int64
    for other in _paths(head, raw):
        _assert_same_detections(other, out)


def test_score_threshold_keeps_only_scores_above_it():
    head = FCOSHead(SPECS, K, fpn_channels=8, score_thresh=0.8)
    cls_logits, bbox_reg, centerness = _background(head, n=1)
    # centerness 20 -> sigmoid 1.0: score = sqrt(sigmoid(cls)), 0.94 / 0.79 / 0.80 (just above)
    cls_logits[0, 0, 0], cls_logits[0, 20, 1], cls_logits[0, 40, 2] = 2.0, 0.5, math.log(0.64 / 0.36) + 1e-3
    raw = _raw_from(head, cls_logits=cls_logits, bbox_reg=bbox_reg, centerness=centerness)
    for out in (head.postprocess(raw, (64, 64)), *_paths(head, raw)):
        assert out[0]["labels"].tolist() == [0, 2] and (out[0]["scores"] > 0.8).all()
    head.score_thresh = 0.0  # the other settings unchanged: every candidate of the top-k is kept
    assert len(head.postprocess(raw, (64, 64))[0]["scores"]) == head.detections_per_img


def test_nms_is_per_class():
    head = FCOSHead(SPECS, K, fpn_channels=8, nms_thresh=0.5)
    cls_logits, bbox_reg, centerness = _background(head, n=1)
    # p3 points 9, 10, 11 predict the same box (4, 4, 28, 28): 9 class 3, 10 class 1, 11 class 3
    cls_logits[0, 9, 3], cls_logits[0, 10, 1], cls_logits[0, 11, 3] = 4.0, 3.0, 2.0
    bbox_reg[0, 9], bbox_reg[0, 10], bbox_reg[0, 11] = (torch.tensor(v) for v in (
        [1.0, 1.0, 2.0, 2.0], [2.0, 1.0, 1.0, 2.0], [3.0, 1.0, 0.0, 2.0]))
    raw = _raw_from(head, cls_logits=cls_logits, bbox_reg=bbox_reg, centerness=centerness)
    for out in (head.postprocess(raw, (64, 64)), *_paths(head, raw)):
        # the class-1 box overlaps the class-3 one fully and stays; the second class-3 box goes
        assert out[0]["labels"].tolist() == [3, 1]
        torch.testing.assert_close(out[0]["boxes"], torch.tensor([[4.0, 4, 28, 28], [4, 4, 28, 28]]))


def test_detections_per_img_keeps_the_best():
    head = FCOSHead(SPECS, K, fpn_channels=8, detections_per_img=3)
    cls_logits, bbox_reg, centerness = _background(head, n=2)
    bbox_reg[:] = 0.25  # a 4x4 box round every point: no two overlap
    logits = torch.linspace(-1.0, 3.0, 10)
    cls_logits[:, torch.arange(10) * 6, torch.arange(10) % K] = logits  # 10 separate candidates per image
    raw = _raw_from(head, cls_logits=cls_logits, bbox_reg=bbox_reg, centerness=centerness)
    for out in (head.postprocess(raw, (64, 64)), *_paths(head, raw)):
        for det in out:
            assert det["labels"].tolist() == [(9 - i) % K for i in range(3)]
            torch.testing.assert_close(det["scores"], torch.sigmoid(logits.flip(0)[:3]).sqrt())


# ----------------------------------------------------------------------------- NMS on the device

def _grid_boxes(gen, n, m, size=64.0):
    """Boxes on a 1-px grid: batched_nms's class offset (labels * (max + 1)) is then exact in
    float32, so its IoUs are bit-identical to ours and the comparison can be strict."""
    xy = torch.randint(0, int(size) - 8, (n, m, 2), generator=gen).float()
    wh = torch.randint(4, 24, (n, m, 2), generator=gen).float()
    return torch.cat([xy, xy + wh], dim=-1)


@pytest.mark.parametrize("classes", [1, 3])
def test_batched_greedy_nms_equals_torchvision(classes):
    from torchvision.ops import batched_nms

    from heads.detection import batched_greedy_nms  # re-exported from heads.nms
    gen = torch.Generator().manual_seed(classes)
    n, m = 6, 60  # 60 boxes in a 64 px square: many overlaps and suppression chains
    boxes = _grid_boxes(gen, n, m)
    scores = torch.rand(n, m, generator=gen).sort(dim=1, descending=True).values
    labels = torch.randint(0, classes, (n, m), generator=gen)
    valid = torch.rand(n, m, generator=gen) > 0.2
    keep, converged = batched_greedy_nms(boxes, labels, valid, 0.3, iterations=m)
    assert converged.all()
    for i in range(n):
        idx = valid[i].nonzero().flatten()
        expected = idx[batched_nms(boxes[i, idx], scores[i, idx], labels[i, idx], 0.3)].sort().values
        assert keep[i].nonzero().flatten().tolist() == expected.tolist()
    # Fast NMS (one step) suppresses too much on this data: the iteration is what makes it exact
    one, _ = batched_greedy_nms(boxes, labels, valid, 0.3, iterations=1)
    assert (one.sum(1) < keep.sum(1)).any()


def test_batched_greedy_nms_reports_unconverged_chains():
    from heads.detection import batched_greedy_nms  # re-exported from heads.nms
    # a chain: each box overlaps the next (IoU 0.82) but not the one after (0.67 < 0.7)
    x = torch.arange(12.0)[None, :, None]
    boxes = torch.cat([x, torch.zeros_like(x), x + 10, torch.full_like(x, 10)], dim=-1)
    labels, valid = torch.zeros(1, 12, dtype=torch.long), torch.ones(1, 12, dtype=torch.bool)
    keep, converged = batched_greedy_nms(boxes, labels, valid, 0.7, iterations=3)
    assert not converged.item()
    keep, converged = batched_greedy_nms(boxes, labels, valid, 0.7, iterations=12)
    assert converged.item() and keep[0].nonzero().flatten().tolist() == [0, 2, 4, 6, 8, 10]
    # a caller keeping the first 2 detections needs only the prefix up to the 2nd kept box
    prefix, converged = batched_greedy_nms(boxes, labels, valid, 0.7, iterations=3, top=2)
    assert converged.item() and prefix[0, :3].tolist() == [True, False, True]
    _, converged = batched_greedy_nms(boxes, labels, valid, 0.7, iterations=3, top=4)
    assert not converged.item()
    # eager rounds of 3 steps until it converges: the same answer
    again, converged = batched_greedy_nms(boxes, labels, valid, 0.7, iterations=3, until_converged=True)
    assert converged.item() and torch.equal(again, keep)


def _grid_raw(head, n, gen, classes_hot=K):
    """Raw outputs whose decoded boxes lie on the pixel grid (see _grid_boxes)."""
    flat = _flat(head, _raw_for(head, (64, 64), n=n))
    cls_logits = torch.randn(flat["cls_logits"].shape, generator=gen) * 3 - 2
    cls_logits[..., classes_hot:] = -30.0
    centerness = torch.randn(flat["centerness"].shape, generator=gen)
    # ltrb in stride units on a 1/8 grid: strides 8, 16, 32 -> whole pixels
    bbox_reg = torch.randint(1, 24, flat["bbox_reg"].shape, generator=gen).float() / 8
    return _raw_from(head, cls_logits=cls_logits, bbox_reg=bbox_reg, centerness=centerness)


@pytest.mark.parametrize("kwargs", [{}, {"detections_per_img": 7}, {"nms_candidates": 20},
                                    {"nms_iterations": 1}, {"score_thresh": 0.99}])
def test_postprocess_on_device_equals_batched_nms(kwargs):
    head = FCOSHead(SPECS, K, fpn_channels=8, nms_thresh=0.5, **kwargs)
    gen = torch.Generator().manual_seed(len(kwargs))
    for classes_hot in (1, K):
        raw = _grid_raw(head, 4, gen, classes_hot)
        for level in raw["cls_logits"]:
            level[1] = -30.0  # an empty image
        ref = head.postprocess_reference(raw, (64, 64))
        assert len(ref[1]["boxes"]) == 0
        _assert_same_detections(_device_path(head, raw), ref)
        _assert_same_detections(_device_path(head, raw, sync=True), ref)
        padded = head.postprocess_padded(raw, (64, 64))
        # where it says exact it is exact by itself, without the fallback
        for i in padded["exact"].nonzero().flatten().tolist():
            c = int(padded["num"][i])
            assert padded["labels"][i, :c].tolist() == ref[i]["labels"].tolist()
            assert (padded["labels"][i, c:] == -1).all() and (padded["scores"][i, c:] == 0).all()


def test_postprocess_fallback_paths_are_taken():
    gen = torch.Generator().manual_seed(0)
    # detections_per_img reached: more detections than 7 survive -> exact without the fallback
    head = FCOSHead(SPECS, K, fpn_channels=8, nms_thresh=0.5, detections_per_img=7)
    padded = head.postprocess_padded(_grid_raw(head, 2, gen), (64, 64))
    assert padded["exact"].all() and (padded["num"] == 7).all()
    # few candidates looked at, most of them suppressed, more passing the threshold: not exact
    head = FCOSHead(SPECS, K, fpn_channels=8, nms_thresh=0.01, nms_candidates=12)
    raw = _grid_raw(head, 2, gen)
    padded = head.postprocess_padded(raw, (64, 64))
    assert not padded["exact"].any()
    _assert_same_detections(_device_path(head, raw), head.postprocess_reference(raw, (64, 64)))


def test_postprocess_padded_has_no_host_sync_and_fixed_shapes():
    head = FCOSHead(SPECS, K, fpn_channels=8)
    gen = torch.Generator().manual_seed(3)
    raw = _grid_raw(head, 3, gen)
    shapes = {k: tuple(v.shape) for k, v in head.postprocess_padded(raw, (64, 64)).items()}
    for level in raw["cls_logits"]:
        level.fill_(-30.0)  # nothing detected: the same shapes
    assert {k: tuple(v.shape) for k, v in head.postprocess_padded(raw, (64, 64)).items()} == shapes
    assert shapes["boxes"] == (3, 100, 4) and shapes["num"] == (3,)
    # it traces into one graph: no data-dependent control flow or shapes
    explanation = torch._dynamo.explain(head.postprocess_padded)(raw, (64, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons
