"""Loading trunk weights: torchvision, timm and onetrunk files, adaptation, safety."""
import os
import pickle

import pytest
import timm
import torch
import torchvision
from torch import nn

from backbones import UnsafeCheckpointError, WeightsMismatchError, build_backbone, resnet18, resnet50


def _randomize_norm_stats(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine params: a load that drops them shows up."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _reference_features(src: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    act = getattr(src, "relu", None) or getattr(src, "act1")
    x = src.maxpool(act(src.bn1(src.conv1(x))))
    feats = []
    for layer in (src.layer1, src.layer2, src.layer3, src.layer4):
        x = layer(x)
        feats.append(x)
    return feats


def _saved(tmp_path, state, name="w.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("source, depth, stem", [
    ("torchvision", "resnet18", "imagenet"),
    ("torchvision", "resnet50", "imagenet"),
    ("timm", "resnet18", "imagenet"),
    ("timm", "resnet50c", "deep"),  # timm's deep-stem (ResNet-C) layout
])
def test_loaded_features_equal_source(tmp_path, source, depth, stem):
    if source == "torchvision":
        src = getattr(torchvision.models, depth)()
    else:
        src = timm.create_model(depth, pretrained=False)
    _randomize_norm_stats(src)
    src.eval()
    path = _saved(tmp_path, src.state_dict())
    ours = build_backbone(depth.rstrip("c"), stem=stem, weights=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = _reference_features(src, x)
        got = ours(x)
    for r, (name, g) in zip(ref, got.items()):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=f"{name} differs")


@pytest.mark.parametrize("stem", ["imagenet", "deep"])
def test_gray_adaptation_matches_replicated_rgb(tmp_path, stem):
    rgb = build_backbone("resnet18", stem=stem)
    _randomize_norm_stats(rgb)
    rgb.eval()
    path = _saved(tmp_path, rgb.state_dict())
    gray = build_backbone("resnet18", stem=stem, in_chans=1, weights=path).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        a, b = rgb(x.expand(-1, 3, -1, -1)), gray(x)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4)
    # and back: a gray checkpoint into an RGB model answers a replicated gray image alike
    back = build_backbone("resnet18", stem=stem, weights=gray.state_dict()).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x.expand(-1, 3, -1, -1))["c5"], b["c5"], atol=1e-4, rtol=1e-4)


def test_load_report_lists_adapted_and_unused(tmp_path, capsys):
    src = torchvision.models.resnet18()
    m = resnet18(in_chans=4)
    report = m.load_weights(_saved(tmp_path, src.state_dict()))
    assert report.ok and "fc.weight" in report.unexpected
    assert report.adapted and "3->4" in report.adapted[0]
    printed = capsys.readouterr().out
    assert "loaded" in printed and "fc.weight" in printed


def test_resnet18_checkpoint_into_resnet50_names_the_mismatch(tmp_path):
    path = _saved(tmp_path, torchvision.models.resnet18().state_dict())
    with pytest.raises(WeightsMismatchError) as err:
        resnet50(weights=path)
    msg = str(err.value)
    assert "layer1.0.conv1.weight" in msg and "[64, 64, 3, 3]" in msg and "[64, 64, 1, 1]" in msg
    assert "missing" in msg and "conv3" in msg


def test_onetrunk_checkpoint_and_wrapper_prefixes(tmp_path):
    trunk = resnet18(stem="cifar", in_chans=1)
    ckpt = {"format": "onetrunk-ckpt-1", "task": "classify", "config": {},
            "model": {**{f"backbone.{k}": v for k, v in trunk.state_dict().items()},
                      "head.fc.weight": torch.zeros(10, 512)}}
    loaded = resnet18(stem="cifar", in_chans=1, weights=_saved(tmp_path, ckpt))
    torch.testing.assert_close(loaded.state_dict()["layer3.1.conv2.weight"], trunk.state_dict()["layer3.1.conv2.weight"])
    ddp = {f"module._orig_mod.{k}": v for k, v in trunk.state_dict().items()}
    report = resnet18(stem="cifar", in_chans=1).load_weights(ddp, verbose=False)
    assert report.ok and not report.unexpected


def test_stem_mismatch_is_reported_or_raised(tmp_path):
    cifar = resnet18(stem="cifar").state_dict()
    with pytest.raises(WeightsMismatchError, match="conv1.weight"):
        resnet18(weights=cifar)
    report = resnet18().load_weights(cifar, strict=False, verbose=False)
    assert [k for k, *_ in report.mismatched] == ["conv1.weight"] and len(report.loaded) > 50


class _Exploit:
    """Unpickling this would call os.system: a weights file must never do that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Exploit(marker)}, f)
    torch.save({"conv1.weight": torch.zeros(1), "evil": _Exploit(marker)}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(UnsafeCheckpointError, match="refusing"):
            resnet18(weights=str(p))
    assert not marker.exists()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        resnet18(weights=str(tmp_path / "nope.pt"))
