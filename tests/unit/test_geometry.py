"""The FCOS point grid (heads/geometry.py): points at the cell centres of each level, per-level
strides and size ranges, one cached object per level sizes (and device, dtype), never in the
state dict."""
import math

import pytest
import torch

from backbones import FeatureSpec, build_backbone
from heads import Detector, FCOSHead
from heads.geometry import PointGrid, default_size_ranges, flatten_levels, level_sizes, split_levels

SPECS = [FeatureSpec("c3", 8, 8), FeatureSpec("c4", 8, 16), FeatureSpec("c5", 8, 32)]


def test_points_are_the_cell_centres_of_each_level():
    grid = PointGrid([8, 16])
    g = grid([(2, 3), (1, 2)], "cpu")
    assert g.level_sizes == ((2, 3), (1, 2))
    assert g.points.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12],  # level 0, row-major
                                 [8, 8], [24, 8]]
    assert g.strides.tolist() == [8] * 6 + [16] * 2
    assert g.size_ranges.tolist() == [[0, 64]] * 6 + [[64, math.inf]] * 2
    # the stride-sized box round each point (the background's harmless GIoU target)
    assert g.cells[0].tolist() == [0, 0, 8, 8] and g.cells[-1].tolist() == [16, 0, 32, 16]
    assert g.points.dtype == g.strides.dtype == g.size_ranges.dtype == torch.float32


def test_size_ranges_per_level():
    assert default_size_ranges([8, 16, 32]) == [(0, 64), (64, 128), (128, math.inf)]
    grid = PointGrid([8, 16], [(0, 50), (40, 1000)])
    assert grid.size_ranges == [(0, 50), (40, 1000)]
    assert grid([(1, 1), (1, 1)], "cpu").size_ranges.tolist() == [[0, 50], [40, 1000]]
    with pytest.raises(ValueError, match=r"size_ranges .* per FPN level \['p3', 'p4'\]"):
        PointGrid([8, 16], [(0, 64)], names=["p3", "p4"])
    with pytest.raises(ValueError, match="lo < hi"):
        PointGrid([8, 16], [(0, 64), (64, 64)])
    with pytest.raises(ValueError, match="3 level sizes for 2 FPN levels"):
        PointGrid([8, 16])([(1, 1)] * 3, "cpu")


def test_one_cached_object_per_level_sizes_device_and_dtype():
    grid = PointGrid([8, 16, 32])
    a = grid([(8, 8), (4, 4), (2, 2)], torch.device("cpu"))
    assert grid([(8, 8), (4, 4), (2, 2)], "cpu") is a  # the same size: a dict lookup, nothing built
    b = grid([(12, 16), (6, 8), (3, 4)], "cpu")  # a new size: a new grid, the first one kept
    assert b is not a and b.points.shape == (12 * 16 + 6 * 8 + 3 * 4, 2)
    assert grid([(8, 8), (4, 4), (2, 2)], "cpu") is a
    c = grid([(8, 8), (4, 4), (2, 2)], "cpu", torch.float64)
    assert c is not a and c.points.dtype == torch.float64 and torch.equal(c.points.float(), a.points)


def test_cache_is_bounded():
    grid = PointGrid([8])
    first = grid([(1, 1)], "cpu")
    for i in range(2, 40):
        grid([(i, 1)], "cpu")
    assert len(grid._cache) <= 32 and grid([(1, 1)], "cpu") is not first


def test_head_grid_follows_the_image_size_and_stays_out_of_the_state_dict():
    trunk = build_backbone("resnet18")
    model = Detector(trunk, FCOSHead(trunk.feature_info, 3, fpn_channels=16, num_convs=1)).eval()
    keys = set(model.state_dict())
    with torch.no_grad():
        raw = model.head(model.backbone(torch.randn(1, 3, 64, 96)), (64, 96))
        again = model.head(model.backbone(torch.randn(2, 3, 64, 96)), (64, 96))
        other = model.head(model.backbone(torch.randn(1, 3, 97, 131)), (97, 131))
    assert model.head.points(raw) is model.head.points(again)  # batch size does not matter
    assert model.head.points(raw).level_sizes == ((8, 12), (4, 6), (2, 3), (1, 2), (1, 1))
    assert model.head.points(other).level_sizes == ((13, 17), (7, 9), (4, 5), (2, 3), (1, 2))
    assert set(model.state_dict()) == keys  # the cache is no buffer
    assert not any("grid" in k or "points" in k for k in keys)
    # a state dict saved before the grid existed loads strictly into a new head
    fresh = FCOSHead(trunk.feature_info, 3, fpn_channels=16, num_convs=1)
    fresh.load_state_dict(model.head.state_dict(), strict=True)


def test_flatten_and_split_levels_round_trip():
    levels = [torch.randn(2, 3, 5, 4), torch.randn(2, 2, 3, 4), torch.randn(2, 1, 1, 4)]
    flat = flatten_levels(levels)
    assert flat.shape == (2, 15 + 6 + 1, 4)
    assert torch.equal(flat[:, 15 + 1 * 3 + 2], levels[1][:, 1, 2])  # level 1, row 1, col 2
    back = split_levels(flat, level_sizes(levels))
    assert all(torch.equal(a, b) for a, b in zip(back, levels, strict=True))
    ctr = [x[..., 0] for x in levels]  # [N, H, W]: no channel dim
    assert flatten_levels(ctr).shape == (2, 22)
    # channels_last NHWC views flatten to the same values as contiguous ones
    conv = torch.randn(2, 4, 3, 5)
    nhwc = conv.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    assert torch.equal(flatten_levels([nhwc]), flatten_levels([conv.permute(0, 2, 3, 1)]))


def test_grid_under_torch_compile_traces_without_graph_breaks():
    head = FCOSHead(SPECS, 3, fpn_channels=8)
    feats = {s.name: torch.randn(1, 8, 64 // s.stride, 64 // s.stride) for s in SPECS}
    raw = head(feats, (64, 64))

    def points(raw):
        g = head.points(raw)
        return g.points, g.strides, g.size_ranges

    explanation = torch._dynamo.explain(points)(raw)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    got = torch.compile(points, backend="eager")(raw)
    assert all(torch.equal(a, b) for a, b in zip(got, points(raw)))
