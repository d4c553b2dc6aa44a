"""EfficientNet-B0 against Tan & Le's Table 1 (seed 004 Table 1) and torchvision's count."""

import pytest
import torch
from torch import nn

from models.efficientnet import (
    MBConv,
    drop_path,
    efficientnet_b0,
    efficientnet_tiny,
    make_divisible,
)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def b0() -> nn.Module:
    torch.manual_seed(0)
    return efficientnet_b0().eval()


def test_b0_has_torchvisions_parameter_count(b0) -> None:
    assert _count(b0) == 5_288_548


def test_flow_stem_changes_only_the_first_conv() -> None:
    with torch.device("meta"):
        flow = efficientnet_b0(in_channels=20)
    assert flow.stem.conv.weight.shape == (32, 20, 3, 3)
    assert _count(flow) - 5_288_548 == 32 * 17 * 3 * 3


def test_b0_stage_table(b0) -> None:
    # (expand, kernel, stride, out, layers) of Tan & Le's Table 1, stages 2-8.
    table = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
             (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
    assert b0.stem.conv.out_channels == 32 and b0.stem.conv.stride == (2, 2)
    for stage, (expand, kernel, stride, out, layers) in zip(b0.stages, table, strict=True):
        assert len(stage) == layers
        first: MBConv = stage[0]
        assert (first.expand is None) == (expand == 1)
        assert first.depthwise.conv.kernel_size == (kernel, kernel)
        assert first.depthwise.conv.stride == (stride, stride)
        assert first.depthwise.conv.groups == first.depthwise.conv.in_channels
        in_channels = first.project.conv.in_channels // expand
        assert first.se.reduce.out_channels == max(1, in_channels // 4)
        assert all(block.project.conv.out_channels == out for block in stage)
        assert all(isinstance(block.depthwise.act, nn.SiLU) for block in stage)
    assert b0.head.conv.out_channels == b0.num_features == 1280
    assert b0.dropout.p == 0.2


def test_b0_resolutions_at_224(b0) -> None:
    shapes = []
    for stage in b0.stages:
        stage.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
    with torch.no_grad():
        features = b0.forward_features(torch.randn(1, 3, 224, 224))
        logits = b0.forward_head(features)
    assert shapes == [(16, 112, 112), (24, 56, 56), (40, 28, 28), (80, 14, 14),
                      (112, 14, 14), (192, 7, 7), (320, 7, 7)]
    assert features.shape == (1, 1280)
    assert logits.shape == (1, 1000)


def test_stochastic_depth_rates_increase_linearly_to_0_2(b0) -> None:
    rates = [block.drop_path_rate for stage in b0.stages for block in stage]
    assert len(rates) == 16
    assert rates == pytest.approx([0.2 * i / 16 for i in range(16)])


def test_drop_path_is_identity_in_eval_and_per_sample_in_training() -> None:
    x = torch.ones(4000, 3)
    assert torch.equal(drop_path(x, 0.5, training=False), x)
    torch.manual_seed(0)
    out = drop_path(x, 0.5, training=True)
    rows = out[:, 0]
    assert set(rows.unique().tolist()) == {0.0, 2.0}  # whole samples dropped, survivors x 2
    assert torch.equal(out, rows[:, None].expand(-1, 3))
    assert rows.mean().item() == pytest.approx(1.0, abs=0.1)


def test_make_divisible_rounds_to_eight_without_losing_ten_percent() -> None:
    assert make_divisible(32 * 0.25) == 8
    assert make_divisible(40 * 0.25) == 16  # 8 would lose more than 10 % of 10
    assert make_divisible(1280 * 0.25) == 320


def test_tiny_variant_shapes_and_composition() -> None:
    torch.manual_seed(0)
    model = efficientnet_tiny(in_channels=20, num_classes=7).eval()
    assert [len(stage) for stage in model.stages] == [1] * 7
    x = torch.randn(2, 20, 112, 112)  # (B, 2L, H, W) stacked flow, L = 10
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert features.shape == (2, model.num_features) == (2, 320)
    torch.testing.assert_close(logits, model.forward_head(features))
    assert logits.shape == (2, 7)


def test_headless_backbone_has_no_classifier() -> None:
    model = efficientnet_tiny(num_classes=0).eval()
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x))


def test_drop_path_rate_of_one_is_refused() -> None:
    with pytest.raises(ValueError, match="drop_path_rate"):
        efficientnet_tiny(drop_path_rate=1.0)
