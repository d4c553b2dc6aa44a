"""3D-ResNeXt against seed 000: Table 1's sizes, Table 3's parameter counts, Hara's block design."""

import pytest
import torch
from torch import nn

from models.resnext3d import (
    ResNeXt3D,
    ResNeXtBottleneck3d,
    resnext3d_101,
    resnext3d_50,
    resnext3d_tiny,
)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _on_meta(builder, **kwargs) -> nn.Module:
    # Counting parameters needs no storage: build without allocating 48 M floats.
    with torch.device("meta"):
        return builder(**kwargs)


@pytest.mark.parametrize(
    ("excitation", "printed"), [(None, 48.34), ("ce", 48.34), ("se", 49.04)]
)
def test_resnext101_parameter_counts_match_table3(excitation, printed) -> None:
    model = _on_meta(resnext3d_101, num_classes=400, excitation=excitation)
    assert round(_count(model) / 1e6, 2) == printed


def test_ce_adds_exactly_twelve_parameters() -> None:
    plain = _count(_on_meta(resnext3d_101))
    with_ce = _count(_on_meta(resnext3d_101, excitation="ce"))
    assert with_ce - plain == 4 * 3  # one k=3 module after each of Res2-Res5


def test_se_sits_once_per_stage() -> None:
    model = _on_meta(resnext3d_101, excitation="se")
    se_params = sum(_count(m) for m in model.excitations)
    # 2 C^2/16 weights + C/16 + C biases for C = 256, 512, 1024, 2048.
    assert se_params == sum(2 * c * c // 16 + c // 16 + c for c in (256, 512, 1024, 2048))
    assert _count(model) - se_params == _count(_on_meta(resnext3d_101))


def test_flow_input_changes_only_conv1() -> None:
    rgb = _count(_on_meta(resnext3d_101, in_channels=3))
    flow = _on_meta(resnext3d_101, in_channels=2)
    assert flow.conv1.weight.shape == (64, 2, 7, 7, 7)
    assert rgb - _count(flow) == 64 * 7 * 7 * 7


def test_hara_block_design() -> None:
    model = _on_meta(resnext3d_101)
    assert [len(s) for s in model.stages] == [3, 4, 23, 3]
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == (
        (7, 7, 7),
        (1, 2, 2),
        (3, 3, 3),
    )
    for index, (stage, width) in enumerate(zip(model.stages, (256, 512, 1024, 2048))):
        for number, block in enumerate(stage):
            assert isinstance(block, ResNeXtBottleneck3d)
            assert block.conv2.groups == 32
            assert block.conv2.out_channels == width // 2  # 128/256/512/1024
            assert block.conv3.out_channels == width
            stride = 2 if (index > 0 and number == 0) else 1
            assert block.conv1.stride == (1, 1, 1)
            assert block.conv2.stride == (stride,) * 3  # stride in the 3x3x3 conv
            # Type-B: a conv+BN projection exactly where the shape changes.
            assert (block.downsample is not None) == (number == 0)
            if block.downsample is not None:
                conv, bn = block.downsample
                assert conv.kernel_size == (1, 1, 1) and conv.stride == (stride,) * 3
                assert isinstance(bn, nn.BatchNorm3d)


def test_resnext50_depth() -> None:
    model = _on_meta(resnext3d_50)
    assert [len(s) for s in model.stages] == [3, 4, 6, 3]
    assert model.num_features == 2048


def test_full_resnext101_sizes_match_table1() -> None:
    torch.manual_seed(0)
    model = resnext3d_101(excitation="ce").eval()
    sizes: dict[str, tuple[int, ...]] = {}
    named = {
        "conv1": model.bn1,
        "maxpool": model.maxpool,
        "res2": model.layer1,
        "ce2": model.excitations[0],
        "res3": model.layer2,
        "ce3": model.excitations[1],
        "res4": model.layer3,
        "ce4": model.excitations[2],
        "res5": model.layer4,
        "ce5": model.excitations[3],
        "avgpool": model.avgpool,
    }
    for name, module in named.items():
        module.register_forward_hook(
            lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[1:]))
        )
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 16, 112, 112))
    assert sizes == {
        "conv1": (64, 16, 56, 56),
        "maxpool": (64, 8, 28, 28),
        "res2": (256, 8, 28, 28),
        "ce2": (256, 8, 28, 28),
        "res3": (512, 4, 14, 14),
        "ce3": (512, 4, 14, 14),
        "res4": (1024, 2, 7, 7),
        "ce4": (1024, 2, 7, 7),
        "res5": (2048, 1, 4, 4),
        "ce5": (2048, 1, 4, 4),
        "avgpool": (2048, 1, 1, 1),
    }
    assert logits.shape == (1, 400)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("excitation", [None, "ce", "se"])
def test_tiny_forward_features_head_composition(excitation) -> None:
    torch.manual_seed(0)
    model = resnext3d_tiny(in_channels=2, num_classes=5, excitation=excitation).eval()
    x = torch.randn(2, 2, 16, 112, 112)  # (B, C, T, H, W) flow clip
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert features.shape == (2, model.num_features) == (2, 128)
    torch.testing.assert_close(logits, model.forward_head(features))
    assert logits.shape == (2, 5)


def test_tiny_trains_one_step() -> None:
    torch.manual_seed(0)
    model = resnext3d_tiny(num_classes=3, excitation="ce")
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 8, 32, 32)), torch.tensor([0, 2]))
    loss.backward()
    for excite in model.excitations:
        assert excite.conv.weight.grad is not None and excite.conv.weight.grad.abs().sum() > 0


def test_headless_model_returns_features() -> None:
    model = ResNeXt3D(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), cardinality=2, stem_width=8,
                      num_classes=0).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x))


def test_unknown_excitation_is_refused() -> None:
    with pytest.raises(ValueError, match="excitation"):
        resnext3d_tiny(excitation="eca")
