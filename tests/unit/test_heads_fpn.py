"""FPN, BackboneWithFPN in torchvision detectors, and the classification head."""
import pytest
import torch
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from backbones import FeatureSpec, build_backbone
from heads import FPN, BackboneWithFPN, ClassificationHead, Classifier


@pytest.mark.parametrize("extra, names", [("p6p7", ["p3", "p4", "p5", "p6", "p7"]),
                                          ("maxpool", ["p3", "p4", "p5", "p6"]),
                                          (None, ["p3", "p4", "p5"])])
def test_fpn_levels_on_odd_input(extra, names):
    m = BackboneWithFPN(build_backbone("resnet18"), out_channels=32, extra=extra).eval()
    out = m(torch.randn(2, 3, 97, 131))
    assert list(out) == names == [s.name for s in m.feature_info]
    h, w = 97, 131
    for spec, t in zip(m.feature_info, out.values()):
        assert t.shape == (2, 32, -(-h // spec.stride), -(-w // spec.stride))
        assert spec.stride == 2 ** int(spec.name[1:])
    assert m.out_channels == 32


def test_fpn_takes_channels_from_specs_and_ignores_extra_keys():
    specs = [FeatureSpec("a", 8, 4), FeatureSpec("b", 16, 8)]
    fpn = FPN(specs, out_channels=4, extra=None)
    feats = {"a": torch.randn(1, 8, 9, 9), "b": torch.randn(1, 16, 5, 5), "other": torch.randn(1)}
    out = fpn(feats)
    assert list(out) == ["p2", "p3"] and out["p2"].shape == (1, 4, 9, 9)
    with pytest.raises(KeyError, match="missing"):
        fpn({"a": feats["a"]})


def test_fpn_rejects_strides_that_do_not_double():
    trunk = build_backbone("resnet18", output_stride=16)  # C4 and C5 both at stride 16
    with pytest.raises(ValueError, match="double"):
        BackboneWithFPN(trunk)
    BackboneWithFPN(trunk, in_features=("c2", "c3", "c4"))  # fine: 4, 8, 16


def _targets():
    return [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]


def _one_step(model):
    model.train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    losses = model(images, _targets())
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    params = [p for p in model.parameters() if p.requires_grad]
    before = params[0].detach().clone()
    opt = torch.optim.SGD(params, lr=0.01)
    loss.backward()
    opt.step()
    assert not torch.equal(before, params[0])
    model.eval()
    with torch.no_grad():
        det = model([torch.rand(3, 64, 64)])
    assert set(det[0]) >= {"boxes", "scores", "labels"}


def test_torchvision_faster_rcnn_trains_one_step():
    body = BackboneWithFPN(build_backbone("resnet18"), out_channels=64, extra="maxpool")
    names = [s.name for s in body.feature_info]
    anchors = AnchorGenerator(sizes=tuple((8 * 2 ** i,) for i in range(len(names))),
                              aspect_ratios=((0.5, 1.0, 2.0),) * len(names))
    pooler = MultiScaleRoIAlign(featmap_names=names[:-1], output_size=7, sampling_ratio=2)
    model = FasterRCNN(body, num_classes=3, rpn_anchor_generator=anchors, box_roi_pool=pooler,
                       min_size=64, max_size=64)
    _one_step(model)


def test_torchvision_retinanet_trains_one_step():
    body = BackboneWithFPN(build_backbone("resnet18"), out_channels=64, extra="p6p7")
    anchors = AnchorGenerator(sizes=tuple((8 * 2 ** i,) for i in range(5)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    model = RetinaNet(body, num_classes=3, anchor_generator=anchors, min_size=64, max_size=64)
    _one_step(model)


def test_torchvision_fcos_trains_one_step():
    body = BackboneWithFPN(build_backbone("resnet18"), out_channels=64, extra="p6p7")
    anchors = AnchorGenerator(sizes=tuple((8 * 2 ** i,) for i in range(5)), aspect_ratios=((1.0,),) * 5)
    model = FCOS(body, num_classes=3, anchor_generator=anchors, min_size=64, max_size=64)
    _one_step(model)


def test_classifier_train_and_eval():
    trunk = build_backbone("resnet18", stem="cifar", in_chans=1)
    model = Classifier(trunk, ClassificationHead(trunk.feature_info[-1], 10, dropout=0.1, label_smoothing=0.1))
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 7])
    losses = model.train()(x, y)
    assert set(losses) == {"cls"} and losses["cls"].ndim == 0 and losses["cls"] > 0
    assert model.eval()(x).shape == (2, 10)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        model(torch.randn(1, 28, 28))
