"""fuse_conv_bn: folding eval BatchNorm into convs keeps every feature map, and refuses what it cannot fold."""
import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from backbones import build_backbone, fuse_conv_bn
from backbones.resnet import BasicBlock, Bottleneck
from heads import ClassificationHead, Classifier

NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)


def _n_norms(model: nn.Module) -> int:
    return sum(isinstance(m, NORM_TYPES) for m in model.modules())


def calibrated(name: str, **kwargs) -> nn.Module:
    """A trunk in eval mode whose BatchNorms hold non-trivial running statistics (accumulated
    from random batches) and random affine parameters; the last norm of each residual branch
    gets a small scale, as in trained ResNets, so the residual stream stays O(1) to O(10)."""
    m = build_backbone(name, **kwargs)
    size = 16 if kwargs.get("stem") == "cifar" else 64
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None  # cumulative average over the calibration batches
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(4, 3, size, size) * 2 + 0.5)
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.2)
        for block in m.modules():
            if isinstance(block, (BasicBlock, Bottleneck)):
                last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
                last.weight.uniform_(0.1, 0.3)
    return m.eval()


def assert_same_features(a: nn.Module, b: nn.Module, size: int) -> None:
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert list(ya) == list(yb) == ["c2", "c3", "c4", "c5"]
    for k in ya:
        assert ya[k].abs().max() > 0.1  # a real signal, not a dead trunk
        torch.testing.assert_close(yb[k], ya[k], atol=1e-4, rtol=1e-4, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("stem", ["imagenet", "cifar", "deep"])
def test_fused_features_match(name, stem):
    m = calibrated(name, stem=stem)
    n_norms = _n_norms(m)
    fused = fuse_conv_bn(m)
    assert fused is not m and _n_norms(m) == n_norms  # a copy: the original keeps its norms
    assert _n_norms(fused) == 0
    assert sum(isinstance(x, nn.Identity) for x in fused.modules()) >= n_norms
    assert all(c.bias is not None for c in fused.modules() if isinstance(c, nn.Conv2d))
    assert fused.feature_info == m.feature_info
    assert_same_features(m, fused, 16 if stem == "cifar" else 64)


def test_fused_dilated_trunk_matches():
    m = calibrated("resnet50", output_stride=8)
    assert_same_features(m, fuse_conv_bn(m), 64)


def test_frozen_bn_folds():
    src = calibrated("resnet18")
    m = build_backbone("resnet18", norm="frozen_bn", weights=src.state_dict()).eval()
    assert any(isinstance(x, FrozenBatchNorm2d) for x in m.modules())
    fused = fuse_conv_bn(m)
    assert _n_norms(fused) == 0
    assert_same_features(src, fused, 64)


def test_fuses_trunk_inside_a_task_model_inplace():
    trunk = calibrated("resnet18")
    model = Classifier(trunk, ClassificationHead(trunk.spec("c5"), 10)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = fuse_conv_bn(model, inplace=True)
        assert out is model and _n_norms(model) == 0
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


def test_training_mode_raises():
    m = build_backbone("resnet18")
    with pytest.raises(ValueError, match="eval"):
        fuse_conv_bn(m)
    m.eval()
    m.layer2[0].bn1.train()  # one norm still using batch statistics
    with pytest.raises(ValueError, match="layer2.0.bn1"):
        fuse_conv_bn(m)
    assert _n_norms(m) == _n_norms(build_backbone("resnet18"))  # nothing folded on failure


def test_group_norm_raises():
    with pytest.raises(ValueError, match="GroupNorm"):
        fuse_conv_bn(build_backbone("resnet18", norm="gn").eval())
