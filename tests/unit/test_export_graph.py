"""The pieces of the detection graph of tasks.export: the resize factors and the class-wise NMS op."""
import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from tasks import export
from tasks.data.preprocess import Preprocess

RGB = dict(in_chans=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.mark.parametrize("pre", [Preprocess(resize="longest", size=64, **RGB),
                                 Preprocess(resize="shorter", size=512, max_size=853, **RGB),
                                 Preprocess(resize="shorter", size=640, **RGB)])
def test_resize_factors_are_the_preprocess_scales_bit_for_bit(pre, tmp_path):
    """The graph's float64 arithmetic and round-half-to-even give the scale Preprocess gives
    every size, in PyTorch and in onnxruntime: random sizes, and sizes whose resized side is
    exactly k + 0.5 (64 * 5 / 128; 936 * 853 / 1872)."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")

    class Factors(torch.nn.Module):
        def forward(self, orig_sizes):
            return export._resize_factors(pre, orig_sizes)

    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(2000)]
    sizes += [(5, 128), (128, 5), (15, 384), (936, 1872), (1, 1), (1, 4000), (37, 21), (45, 100)]
    want = [[rh / h, rw / w] for (h, w), (rh, rw) in zip(sizes, (pre._resized_shape(h, w) for h, w in sizes))]
    assert Factors()(torch.tensor(sizes)).tolist() == want
    torch.onnx.export(Factors().eval(), (torch.tensor(sizes[:2]),), str(tmp_path / "f.onnx"), dynamo=True,
                      input_names=["orig_sizes"], dynamic_shapes={"orig_sizes": {0: "batch"}})
    session = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"orig_sizes": np.array(sizes, np.int64)})[0].tolist() == want


def test_class_nms_in_onnxruntime_keeps_what_torchvision_keeps(tmp_path):
    """``class_nms`` exported (ONNX NonMaxSuppression + ScatterND) and eager agree with
    ``batched_nms`` per image, at shapes other than the traced one; a box outside every class
    (scores <= 0) is never kept."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")

    class Module(torch.nn.Module):
        def forward(self, boxes, scores):
            return torch.ops.onetrunk.class_nms(boxes, scores, 0.5)

    def sample(b, k, c, seed):
        g = torch.Generator().manual_seed(seed)
        xy = torch.rand(b, c, 2, generator=g) * 30  # dense: many pairs overlap past IoU 0.5
        boxes = torch.cat([xy, xy + torch.rand(b, c, 2, generator=g) * 20 + 10], dim=-1)  # [B, C, 4]
        labels = torch.randint(0, k, (b, c), generator=g)
        scores = torch.rand(b, c, generator=g)
        scores[:, ::7] = -1.0  # not candidates
        member = labels[:, None, :] == torch.arange(k)[None, :, None]
        return boxes, torch.where(member, scores[:, None, :], -1.0), labels, scores

    boxes, class_scores, _, _ = sample(2, 3, 40, 0)
    program = torch.onnx.export(Module().eval(), (boxes, class_scores), dynamo=True, input_names=["boxes", "scores"],
                                dynamic_shapes={"boxes": {0: "b", 1: "c"}, "scores": {0: "b", 1: "k", 2: "c"}},
                                custom_translation_table={torch.ops.onetrunk.class_nms.default: export._class_nms_onnx})
    program.save(str(tmp_path / "nms.onnx"))
    session = ort.InferenceSession(str(tmp_path / "nms.onnx"), providers=["CPUExecutionProvider"])
    kept = candidates = 0
    for b, k, c, seed in [(3, 4, 300, 1), (1, 1, 9, 2), (2, 80, 120, 3)]:
        boxes, class_scores, labels, scores = sample(b, k, c, seed)
        got = session.run(None, {"boxes": boxes.numpy(), "scores": class_scores.numpy()})[0]
        eager = Module()(boxes, class_scores).numpy()
        for i in range(b):
            valid = (scores[i] > 0).nonzero()[:, 0]
            want = np.zeros(c, bool)
            want[valid[batched_nms(boxes[i, valid], scores[i, valid], labels[i, valid], 0.5)].numpy()] = True
            assert np.array_equal(got[i], want) and np.array_equal(eager[i], want), (b, k, c, i)
            kept, candidates = kept + want.sum(), candidates + len(valid)
    assert 0 < kept < 0.9 * candidates  # NMS had work to do
