"""The stem's fast formulations compute the same function as the plain layers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backbones import resnet18
from backbones.stem import SpaceToDepthConv2d, StemMaxPool, max_pool_3x3_s2, space_to_depth_conv2d


@pytest.mark.parametrize("hw", [(32, 32), (31, 40), (9, 8)])
@pytest.mark.parametrize("k,p", [(7, 3), (3, 1), (4, 1), (7, 0)])
def test_space_to_depth_conv_equals_stride2_conv(hw, k, p):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    w, b = torch.randn(5, 3, k, k, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    ref = F.conv2d(x, w, b, stride=2, padding=p)
    for multiple in (1, 8):
        out = space_to_depth_conv2d(x, w, b, p, multiple)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_space_to_depth_conv_weight_gradient_matches():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 15, 14, dtype=torch.float64)
    w1 = torch.randn(4, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_(True)
    g = torch.randn(2, 4, 8, 7, dtype=torch.float64)
    F.conv2d(x, w1, stride=2, padding=3).backward(g)
    space_to_depth_conv2d(x, w2, padding=3).backward(g)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=0, atol=1e-10)


def test_space_to_depth_conv_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="4 channels, weight expects 3"):
        space_to_depth_conv2d(torch.zeros(1, 4, 8, 8), torch.zeros(2, 3, 7, 7), padding=3)


def test_stem_conv_is_a_plain_conv_on_cpu_and_keeps_its_state_dict():
    conv = SpaceToDepthConv2d(3, 8, 7, padding=3)
    assert isinstance(conv, nn.Conv2d) and conv.stride == (2, 2) and conv.bias is None
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, stride=2, padding=3))
    assert conv.space_to_depth and not SpaceToDepthConv2d(8, 4, 7, padding=3).space_to_depth  # images only
    keys = set(resnet18().state_dict())
    assert "conv1.weight" in keys and not any("maxpool" in k for k in keys)


@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (1, 2), (3, 3)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_routes_gradients_like_max_pool2d(hw, ties):
    torch.manual_seed(0)
    # integer values in 0..2 make most windows hold ties: the first maximum takes the gradient
    x = torch.randint(0, 3, (2, 3, *hw)).double() if ties else torch.randn(2, 3, *hw, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = F.max_pool2d(x1, 3, 2, 1), max_pool_3x3_s2(x2)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-12)


def test_stem_max_pool_is_max_pool2d_outside_compile():
    pool = StemMaxPool()
    x = torch.randn(1, 2, 9, 9, requires_grad=True)
    y = pool(x)
    assert torch.equal(y, F.max_pool2d(x, 3, 2, 1))
    assert "MaxPool2DWithIndices" in type(y.grad_fn).__name__  # PyTorch's own kernel, not the custom one


def test_with_plain_stem_swaps_in_stock_layers_with_the_same_weights():
    from backbones.stem import with_plain_stem
    model = resnet18().eval()
    plain = with_plain_stem(model)
    assert type(plain.conv1) is nn.Conv2d and type(plain.maxpool) is nn.MaxPool2d
    assert type(model.conv1) is SpaceToDepthConv2d  # the original is untouched
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(plain(x)["c5"], model(x)["c5"])
    assert plain.conv1.weight is not model.conv1.weight
