"""CE module (seed 000 eqs. 1-5) and the SE ablation block: parameter counts and values."""

import pytest
import torch

from models.excitation import ChannelExcitation, SqueezeExcitation3d


def test_ce_has_exactly_k_parameters() -> None:
    for k in (1, 3, 5):
        module = ChannelExcitation(kernel_size=k)
        assert sum(p.numel() for p in module.parameters()) == k


def test_ce_rejects_even_kernel() -> None:
    with pytest.raises(ValueError, match="odd"):
        ChannelExcitation(kernel_size=4)


def test_ce_matches_hand_computed_excitation() -> None:
    module = ChannelExcitation(kernel_size=3)
    w = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        module.conv.weight.copy_(w.view(1, 1, 3))
    # Four channels with constant maps, so the pooled y is the constants themselves.
    y = torch.tensor([1.0, 2.0, -1.0, 0.5])
    x = y.view(1, 4, 1, 1, 1).expand(1, 4, 2, 3, 3).clone()
    # eq. 4 with zero padding at both ends: eta_i = sigmoid(w1 y_{i-1} + w2 y_i + w3 y_{i+1}).
    padded = torch.cat([torch.zeros(1), y, torch.zeros(1)])
    eta = torch.sigmoid(torch.stack([w @ padded[i : i + 3] for i in range(4)]))
    out = module(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x * eta.view(1, 4, 1, 1, 1))


def test_ce_pools_over_time_and_space() -> None:
    module = ChannelExcitation(kernel_size=1)
    with torch.no_grad():
        module.conv.weight.fill_(1.0)
    x = torch.zeros(1, 1, 2, 2, 2)
    x[0, 0, 1, 1, 1] = 8.0  # mean over T*H*W = 1
    out = module(x)
    assert out[0, 0, 1, 1, 1].item() == pytest.approx(8.0 * torch.sigmoid(torch.tensor(1.0)).item())


def test_se_parameter_count_with_reduction_16() -> None:
    module = SqueezeExcitation3d(channels=256, reduction=16)
    # FC 256->16 and 16->256, both with bias.
    assert sum(p.numel() for p in module.parameters()) == 256 * 16 + 16 + 16 * 256 + 256


def test_se_with_zero_weights_halves_the_input() -> None:
    module = SqueezeExcitation3d(channels=32, reduction=16)
    for p in module.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(2, 32, 2, 3, 3)
    torch.testing.assert_close(module(x), x * 0.5)
