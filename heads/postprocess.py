"""FCOS post-processing: scores, per-level top-k, decoding, score threshold, class-wise NMS and
the detections per image, for ``heads.detection.FCOSHead``.

Three paths give the same detections (tests/unit/test_postprocess.py compares them):
``postprocess_reference`` (``torchvision.ops.batched_nms`` image by image: the CPU path);
``postprocess_padded`` (fixed shapes, no host sync: the device part that ``GraphedInference``
replays in a CUDA graph, through ``postprocess_device``), finished by ``postprocess_host``;
and ``postprocess`` on a GPU, the two with a few syncs. NMS itself: ``heads/nms.py``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import torch
from torch.utils._pytree import tree_map
from torchvision.ops import batched_nms, clip_boxes_to_image

from .geometry import Points, decode_boxes, level_sizes
from .nms import batched_greedy_nms

__all__ = ["FCOSPostprocess"]


def _unpad(padded: Mapping[str, torch.Tensor], counts: Sequence[int]) -> list[dict[str, torch.Tensor]]:
    """Per-image views of ``postprocess_padded``'s rows: the first ``counts[i]`` of image ``i``."""
    return [{key: padded[key][i, :c] for key in ("boxes", "scores", "labels")} for i, c in enumerate(counts)]


class FCOSPostprocess:
    """The post-processing methods of ``FCOSHead`` (a mixin: the head keeps the protocol's
    ``postprocess`` and the ``postprocess_device`` / ``postprocess_host`` split).

    They read the head's settings (``num_classes``, ``score_thresh``, ``nms_thresh``,
    ``topk_candidates``, ``detections_per_img``, ``nms_candidates``, ``nms_iterations``,
    ``nms_compile``; see ``FCOSHead``) and ``flat_outputs(raw)`` (the outputs flattened over
    the levels, and their ``Points``), and change nothing of the head.
    """

    num_classes: int
    score_thresh: float
    nms_thresh: float
    topk_candidates: int
    detections_per_img: int
    nms_candidates: int
    nms_iterations: int
    nms_compile: bool

    def flat_outputs(self, raw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Points]:
        raise NotImplementedError  # the head's: cls_logits [N, P, K], bbox_reg [N, P, 4], centerness [N, P], Points

    def _per_level_candidates(self, sizes: Sequence[tuple[int, int]]) -> list[int]:
        """How many (point, class) candidates each level contributes: its top ``topk_candidates``."""
        return [min(self.topk_candidates, h * w * self.num_classes) for h, w in sizes]

    def _candidates(self, raw: dict[str, Any], image_size: tuple[int, int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image the per-level top-k (point, class) candidates: ``boxes [N, C, 4]`` (decoded,
        clipped), ``scores [N, C]``, ``labels [N, C]`` and ``valid [N, C]`` (above ``score_thresh``,
        not clipped to nothing). Fixed shapes for the whole batch."""
        cls_logits, bbox_reg, centerness, grid = self.flat_outputs(raw)
        cls_logits = cls_logits.float()  # [N, P, K]
        n, _, k = cls_logits.shape
        # torchvision FCOS score: geometric mean of class probability and centerness
        scores = torch.sqrt(torch.sigmoid(cls_logits) * torch.sigmoid(centerness.float())[..., None])  # [N, P, K]

        # Per-level top-k for the whole batch at once. Top-k then threshold selects the same set
        # as torchvision's threshold then top-k, without a data-dependent shape.
        top_scores, top_points, top_labels = [], [], []
        start = 0
        for (h, w), per_level in zip(grid.level_sizes, self._per_level_candidates(grid.level_sizes)):
            level = scores[:, start:start + h * w].reshape(n, h * w * k)  # [N, HW*K]
            s, idx = level.topk(per_level, dim=1)  # [N, k_l]
            top_scores.append(s)
            top_points.append(idx // k + start)
            top_labels.append(idx % k)
            start += h * w
        scores = torch.cat(top_scores, dim=1)  # [N, C]
        point_idx = torch.cat(top_points, dim=1)  # [N, C]
        labels = torch.cat(top_labels, dim=1)  # [N, C]

        reg = bbox_reg.float().gather(1, point_idx[..., None].expand(-1, -1, 4))  # [N, C, 4]
        boxes = decode_boxes(grid.points[point_idx], grid.strides[point_idx], reg)  # [N, C, 4]
        boxes = clip_boxes_to_image(boxes, tuple(image_size))
        # a box clipped to nothing (point outside an odd-sized image, zero regression) can match
        # nothing and would only break consumers that reject x2 <= x1
        valid = (scores > self.score_thresh) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        return boxes, scores, labels, valid

    @torch.no_grad()
    def postprocess_padded(self, raw: dict[str, Any], image_size: tuple[int, int], *,
                           sync: bool = False, all_candidates: bool = False) -> dict[str, torch.Tensor]:
        """The detections of the batch in fixed shapes, computed on the device without a host sync
        (so it compiles, and replays in a CUDA graph with the network):

        ``boxes [N, D, 4]``, ``scores [N, D]``, ``labels [N, D]`` (-1 on padding), best first;
        ``num [N]``, how many of the D rows of each image are detections; and ``exact [N]``: the
        rows equal ``batched_nms``'s answer (up to exact score ties). An image is not exact when
        its NMS had not converged within ``nms_iterations`` steps, or when more than
        ``nms_candidates`` candidates passed ``score_thresh`` and fewer than ``detections_per_img``
        of the best ``nms_candidates`` survived NMS (a later candidate might have made the cut).

        ``sync=True`` (eager callers) spends host syncs to do less work: one to look at no more
        candidates than the most any image of the batch has (rounded up to 64), one per round of
        ``nms_iterations`` steps to iterate until converged. Shapes then depend on the data.
        ``all_candidates=True`` (with ``sync``) lifts the ``nms_candidates`` cap: every image
        is then exact (``postprocess_host`` redoes the inexact images of a batch so).
        """
        boxes, scores, labels, valid = self._candidates(raw, image_size)
        m = scores.shape[1] if all_candidates else min(self.nms_candidates, scores.shape[1])
        count = valid.sum(dim=1)  # candidates above score_thresh, per image
        if sync:
            m = min(m, max(64, -(-int(count.max()) // 64) * 64))
        # the best m valid candidates, best first (invalid ones sort last)
        order = torch.where(valid, scores, -1.0).topk(m, dim=1).indices  # [N, m]
        boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
        scores, labels, top_valid = scores.gather(1, order), labels.gather(1, order), valid.gather(1, order)
        keep, converged = batched_greedy_nms(boxes, labels, top_valid, self.nms_thresh, self.nms_iterations,
                                             until_converged=sync, top=self.detections_per_img,
                                             compiled=self.nms_compile)

        d = min(self.detections_per_img, m)
        # the first d kept candidates in score order: rank kept ones by position, the rest after
        position = torch.arange(m, device=scores.device).expand_as(keep)
        first = torch.where(keep, position, m).topk(d, dim=1, largest=False).indices  # [N, d], ascending
        taken = keep.gather(1, first)
        kept = keep.sum(dim=1)
        exact = converged & ((count <= m) | (kept >= self.detections_per_img))
        return {"boxes": torch.where(taken[..., None], boxes.gather(1, first[..., None].expand(-1, -1, 4)), 0.0),
                "scores": torch.where(taken, scores.gather(1, first), 0.0),
                "labels": torch.where(taken, labels.gather(1, first), -1),
                "num": kept.clamp(max=d), "exact": exact}

    @torch.no_grad()
    def postprocess(self, raw: dict[str, Any], image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        """Per image ``dict(boxes=[D, 4] xyxy pixels clipped to image_size, scores=[D], labels=[D])``,
        sorted by score, ``D <= detections_per_img``.

        On a GPU ``postprocess_padded(sync=True)`` for the whole batch (3 host syncs per batch,
        one more per extra round of NMS steps, where ``batched_nms`` costs one per image); the
        images it could not do exactly within ``nms_candidates`` (rare: see there) are redone
        together with all their candidates (``postprocess_host``). ``GraphedInference`` replays
        ``postprocess_device`` (fixed shapes, no sync) instead. On the CPU, where a
        sync costs nothing, ``batched_nms`` directly: the ``[N, M, M]`` IoU matrix costs more there
        (2 cores, FCOS R18 at 256 px, batch 16, a head after one CPU epoch whose every candidate
        passes ``score_thresh``: 24 against 277 img/s)."""
        if raw["cls_logits"][0].device.type == "cpu":
            return self.postprocess_reference(raw, image_size)
        padded = self.postprocess_padded(raw, image_size, sync=True)
        return self.postprocess_host({"padded": padded, "raw": raw}, image_size)

    def postprocess_device(self, raw: dict[str, Any], image_size: tuple[int, int]) -> dict[str, Any]:
        """The part of ``postprocess`` a CUDA graph can hold: the padded detections, and the raw
        outputs for the rare image that ``postprocess_host`` must redo."""
        return {"padded": self.postprocess_padded(raw, image_size), "raw": raw}

    # images redone per call of the exact pass: bounds its [n, M, M] pairwise matrices (M up to
    # levels x topk_candidates) to about 2**27 pairs
    _REDO_PAIRS = 1 << 27

    @torch.no_grad()
    def postprocess_host(self, outputs: dict[str, Any], image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        """Per-image results from ``postprocess_device``'s outputs: one host sync for the counts;
        the images not ``exact`` are redone together by ``postprocess_padded(sync=True,
        all_candidates=True)``, a few syncs per batch, where a ``batched_nms`` call per image
        cost a sync and a dozen launches each. On the trained FashionScenes model 4-5 of 512 val
        images need it with 12 NMS steps (22-25 of 512 with 8); alone, this method went
        from 19.0k to 27.4k img/s on an H200 with the change and the 12 steps together."""
        out, raw = outputs["padded"], outputs["raw"]
        counts, exact = torch.stack([out["num"], out["exact"].long()]).tolist()  # the one sync
        results = _unpad(out, counts)
        redo = [i for i, ok in enumerate(exact) if not ok]
        if redo:
            m = sum(self._per_level_candidates(level_sizes(raw["cls_logits"])))
            chunk = max(1, self._REDO_PAIRS // (m * m))
            for start in range(0, len(redo), chunk):
                ids = redo[start:start + chunk]
                index = torch.tensor(ids, device=raw["cls_logits"][0].device)
                sub = tree_map(lambda t: t.index_select(0, index), raw)  # raw holds network outputs only
                again = self.postprocess_padded(sub, image_size, sync=True, all_candidates=True)
                for i, result in zip(ids, _unpad(again, again["num"].tolist())):
                    results[i] = result
        return results

    @torch.no_grad()
    def postprocess_reference(self, raw: dict[str, Any], image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        """``postprocess`` through ``torchvision.ops.batched_nms``, image by image (a host sync per
        image): the reference that ``postprocess_padded`` is tested against, and the CPU path."""
        boxes, scores, labels, keep = self._candidates(raw, image_size)
        n = boxes.shape[0]
        # one selection for the whole batch (two host syncs), then split into per-image views;
        # indexing image by image would cost a sync per image and tensor
        idx = keep.nonzero()  # [T, 2] (image, candidate), image-major
        counts = torch.bincount(idx[:, 0], minlength=n).tolist()
        chosen = (boxes[idx[:, 0], idx[:, 1]], scores[idx[:, 0], idx[:, 1]], labels[idx[:, 0], idx[:, 1]])
        results = []
        for b, s, lab in zip(*(c.split(counts) for c in chosen)):  # NMS sizes differ per image
            kept = batched_nms(b, s, lab, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": b[kept], "scores": s[kept], "labels": lab[kept]})
        return results
