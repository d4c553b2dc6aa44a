"""MAT-EffNet stream (seed 004 sections 3.2-3.3) and late average fusion (section 3.3)."""

import math

import pytest
import torch
from torch import nn

from models.mat import MATStream, mat_effnet_b0, mat_effnet_tiny
from models.two_stream import TwoStreamModel, late_fusion


def test_b0_stream_layers_follow_fig5() -> None:
    torch.manual_seed(0)
    stream = mat_effnet_b0(in_channels=3, num_classes=101).eval()
    assert stream.backbone.num_features == 1280
    assert (stream.embed.in_features, stream.embed.out_features) == (1280, 512)
    assert stream.attention.num_heads == 2 and stream.attention.embed_dim == 512
    assert (stream.fc.in_features, stream.fc.out_features) == (512, 101)
    assert stream.dropout.p == 0.2
    # The backbone is headless: its 1000-class classifier would be dead weight.
    assert isinstance(stream.backbone.classifier, nn.Identity)
    x = torch.randn(1, 2, 3, 112, 112)  # (B, L, C, H, W)
    with torch.no_grad():
        features = stream.forward_features(x)
        logits = stream.forward_head(features)
    assert features.shape == (1, 512) == (1, stream.num_features)
    assert logits.shape == (1, 101)


def test_flow_stream_takes_stacked_flow_segments() -> None:
    torch.manual_seed(0)
    stream = mat_effnet_tiny(in_channels=20, num_classes=5).eval()
    assert stream.backbone.stem.conv.in_channels == 20
    with torch.no_grad():
        logits = stream(torch.randn(2, 3, 20, 64, 64))  # L = 3 stacks of 10 (x, y) flow pairs
    assert logits.shape == (2, 5)


class _Flat(nn.Module):
    """A stand-in backbone whose features are the pixels themselves (B*L, C*H*W)."""

    num_features = 12

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_attention_mixes_segments_and_pooling_ignores_their_order() -> None:
    torch.manual_seed(0)
    # A fresh EfficientNet in eval mode has near-zero features (BN running stats at their
    # initial values), so the attention is exercised on informative stand-in features.
    stream = MATStream(backbone=_Flat(), num_classes=4, embed_dim=16, num_heads=2).eval()
    x = torch.randn(1, 4, 3, 2, 2)  # (B, L, C, H, W)
    with torch.no_grad():
        attended = stream.segment_features(x)
        changed = x.clone()
        changed[:, 3] = torch.randn(3, 2, 2)
        attended_changed = stream.segment_features(changed)
        shuffled = stream.forward_features(x[:, [2, 0, 3, 1]])
        pooled = stream.forward_features(x)
    assert attended.shape == (1, 4, 16)
    # Segment 0's output depends on segment 3's input: attention runs across segments.
    assert (attended[:, 0] - attended_changed[:, 0]).abs().max() > 1e-3
    # No positional encoding in the paper: self-attention + mean is order-invariant.
    torch.testing.assert_close(shuffled, pooled)
    torch.testing.assert_close(pooled, attended.mean(dim=1))


def test_stream_refuses_unsegmented_input() -> None:
    stream = mat_effnet_tiny(num_classes=4)
    with pytest.raises(ValueError, match="B, L, C, H, W"):
        stream(torch.randn(2, 3, 64, 64))


def test_stream_accepts_any_backbone_with_forward_features() -> None:
    stream = MATStream(backbone=_Flat(), num_classes=3, embed_dim=8, num_heads=2)
    assert stream(torch.randn(2, 5, 3, 2, 2)).shape == (2, 3)


def test_late_fusion_averages_softmax_scores() -> None:
    a = torch.tensor([[0.0, math.log(3.0)]])  # softmax -> [0.25, 0.75]
    b = torch.tensor([[math.log(9.0), 0.0]])  # softmax -> [0.9, 0.1]
    torch.testing.assert_close(late_fusion(a, b), torch.tensor([[0.575, 0.425]]))
    torch.testing.assert_close(late_fusion(a), torch.tensor([[0.25, 0.75]]))
    with pytest.raises(ValueError):
        late_fusion()


def test_two_stream_model_fuses_rgb_and_flow_streams() -> None:
    torch.manual_seed(0)
    spatial = mat_effnet_tiny(in_channels=3, num_classes=6).eval()
    temporal = mat_effnet_tiny(in_channels=4, num_classes=6).eval()
    model = TwoStreamModel(spatial=spatial, temporal=temporal).eval()
    rgb = torch.randn(2, 2, 3, 64, 64)
    flow = torch.randn(2, 2, 4, 64, 64)
    with torch.no_grad():
        probs = model(rgb, flow)
        expected = late_fusion(spatial(rgb), temporal(flow))
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
