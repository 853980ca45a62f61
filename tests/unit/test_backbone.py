"""ResNet trunk: feature contract, options, freezing and bad input."""
import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from backbones import FeatureSpec, ResNet, build_backbone, list_backbones

DEPTHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
BASIC = {"resnet18", "resnet34"}


def test_registry_lists_every_depth():
    assert list_backbones() == sorted(DEPTHS)
    with pytest.raises(ValueError, match="resnet50"):
        build_backbone("resnet49")


@pytest.mark.parametrize("name", DEPTHS)
@pytest.mark.parametrize("stem", ["imagenet", "cifar", "deep"])
@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_features_match_feature_info(name, stem, output_stride):
    m = build_backbone(name, stem=stem, output_stride=output_stride).eval()
    size = 32 if stem == "cifar" else 64
    with torch.no_grad():
        out = m(torch.randn(1, 3, size, size))
    assert list(out) == [s.name for s in m.feature_info] == ["c2", "c3", "c4", "c5"]
    expansion = 1 if name in BASIC else 4
    stem_stride = 1 if stem == "cifar" else 4
    dilated = {32: 0, 16: 1, 8: 2}[output_stride]
    for i, spec in enumerate(m.feature_info):
        assert spec.channels == 64 * 2 ** i * expansion
        n_strided = min(i, 3 - dilated)  # stages after the first halve the size unless dilated
        assert spec.stride == stem_stride * 2 ** n_strided
        t = out[spec.name]
        assert t.shape[1] == spec.channels
        assert t.shape[-1] == -(-size // spec.stride)  # ceil: every conv pads


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_odd_input_size(name):
    m = build_backbone(name).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 97, 131))
    assert [tuple(t.shape[-2:]) for t in out.values()] == [(25, 33), (13, 17), (7, 9), (4, 5)]


def test_out_features_subset_builds_only_needed_stages():
    m = build_backbone("resnet18", out_features=("c3", "c2"))
    assert [s.name for s in m.feature_info] == ["c2", "c3"]
    assert not hasattr(m, "layer3") and not hasattr(m, "layer4")
    out = m(torch.randn(1, 3, 64, 64))
    assert list(out) == ["c2", "c3"]
    with pytest.raises(ValueError, match="out_features"):
        build_backbone("resnet18", out_features=("c6",))


@pytest.mark.parametrize("kwargs, match", [
    (dict(stem="vgg"), "stem"),
    (dict(output_stride=4), "output_stride"),
    (dict(norm="ln"), "norm"),
    (dict(freeze_at=6), "freeze_at"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
    (dict(in_chans=0), "in_chans"),
    (dict(width=0), "width"),
    (dict(width=48, norm="gn"), "width=48 with norm='gn'"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_backbone("resnet18", **kwargs)


def test_bad_input_says_what_was_expected():
    m = build_backbone("resnet18", in_chans=1)
    with pytest.raises(ValueError, match=r"in_chans=1.*3 channels"):
        m(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(1, 32, 32))


@pytest.mark.parametrize("norm, cls", [("bn", nn.BatchNorm2d), ("syncbn", nn.SyncBatchNorm),
                                       ("frozen_bn", FrozenBatchNorm2d), ("gn", nn.GroupNorm)])
def test_norm_layers(norm, cls):
    m = build_backbone("resnet18", norm=norm, stem="deep")
    assert isinstance(m.bn1, cls) and isinstance(m.layer4[1].bn2, cls)
    # syncbn falls back to plain BN outside a process group, so all four run on CPU
    out = m.train()(torch.randn(2, 3, 64, 64))
    out["c5"].sum().backward()
    assert m.layer4[1].conv2.weight.grad is not None
    if norm == "frozen_bn":
        assert not any(p.requires_grad for p in m.bn1.parameters())


@pytest.mark.parametrize("freeze_at", [1, 2, 3])
def test_freeze_at_keeps_weights_and_statistics(freeze_at):
    m = build_backbone("resnet18", freeze_at=freeze_at)
    frozen_names = ["conv1", "bn1"] + [f"layer{i}" for i in range(1, freeze_at)]
    is_frozen = lambda k: k.split(".")[0] in frozen_names  # noqa: E731
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m.train()
    m.eval().train()  # frozen BN must stay in eval mode through mode switches
    for _ in range(2):
        loss = sum(t.square().mean() for t in m(torch.randn(2, 3, 64, 64) * 3 + 1).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = m.state_dict()
    for k in before:
        if is_frozen(k):
            assert torch.equal(before[k], after[k]), f"{k} changed although frozen"
    changed = [k for k in before if not is_frozen(k) and not torch.equal(before[k], after[k])]
    assert any("running_mean" in k for k in changed) and any(k.endswith("conv1.weight") for k in changed)
    assert all(not p.requires_grad for n, p in m.named_parameters() if is_frozen(n))
    assert not m.bn1.training and m.layer4.training


def test_grad_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    a = build_backbone("resnet18")
    b = build_backbone("resnet18", grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for m in (a, b):
        y = m.train()(x)
        y["c5"].sum().backward()
        outs.append((y["c5"].detach(), m.layer1[0].conv1.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_drop_path_is_random_in_training_only():
    m = build_backbone("resnet18", drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    m.train()
    assert not torch.allclose(m(x)["c5"], m(x)["c5"])
    m.eval()
    torch.testing.assert_close(m(x)["c5"], m(x)["c5"])
    # rate rises linearly: first block 0, last block the full rate
    assert isinstance(m.layer1[0].drop_path, nn.Identity)
    assert m.layer4[1].drop_path.p == pytest.approx(0.5)


@pytest.mark.parametrize("name, last_bn", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual(name, last_bn):
    m = build_backbone(name, zero_init_residual=True)
    blocks = [b for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for b in layer]
    assert all(getattr(b, last_bn).weight.abs().sum() == 0 for b in blocks)
    assert build_backbone(name).layer1[0].bn1.weight.abs().sum() > 0


def test_contradictory_settings_warn():
    with pytest.warns(UserWarning, match="drop_path_rate"):
        build_backbone("resnet18", freeze_at=5, drop_path_rate=0.1)
    with pytest.warns(UserWarning, match="zero_init_residual"):
        build_backbone("resnet18", zero_init_residual=True, weights=build_backbone("resnet18").state_dict())


def test_channels_last_and_feature_spec_frozen():
    m = build_backbone("resnet18").to(memory_format=torch.channels_last).eval()
    x = torch.randn(1, 3, 64, 64).to(memory_format=torch.channels_last)
    assert m(x)["c5"].shape == (1, 512, 2, 2)
    spec = m.feature_info[0]
    assert isinstance(spec, FeatureSpec) and isinstance(m, ResNet)
    with pytest.raises(AttributeError):
        spec.channels = 1


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_width_scales_every_stage(name):
    narrow = build_backbone(name, stem="cifar", in_chans=1, width=16)
    standard = build_backbone(name, stem="cifar", in_chans=1)
    assert [s.channels * 4 for s in narrow.feature_info] == [s.channels for s in standard.feature_info]
    out = narrow(torch.randn(2, 1, 28, 28))
    assert [out[s.name].shape[1] for s in narrow.feature_info] == [s.channels for s in narrow.feature_info]
    # the default is the standard ResNet: torchvision's parameter shapes, key for key
    import torchvision
    ref = torchvision.models.__dict__[name]().state_dict()
    ours = build_backbone(name).state_dict()
    assert set(ours) <= set(ref)  # every key of ours is torchvision's (its fc aside)
    assert all(tuple(v.shape) == tuple(ref[k].shape) for k, v in ours.items())
