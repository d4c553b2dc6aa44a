"""Channel attention for 3D feature maps: the CE module of seed 000 section 3.2 and its SE ablation.

CE (eqs. 1-5): squeeze a (B, C, T, H, W) map to y in R^C by global average pooling over T*H*W,
then eta = sigmoid(C1D_k(y)), one 1-D convolution across the channel axis whose k weights are
shared by every channel (eq. 4), so the module has exactly k parameters; the map is rescaled by
eta. No dimensionality reduction, unlike SE.

SE (Hu et al. 2018), the ablation of Table 3: the same squeeze, then FC(C -> C/r) - ReLU -
FC(C/r -> C) - sigmoid. Placed, like CE, once after each of Res2-Res5, it adds 0.70 M parameters
to 3D-ResNeXt-101 with r = 16, which is Table 3's 48.34 M -> 49.04 M; inside every block it
would add 4.7 M, so the paper's count pins the placement to once per stage.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelExcitation(nn.Module):
    """CE module: sigmoid(Conv1d_k(GAP(x))) * x, with k shared weights and no bias.

    Args:
        kernel_size: k, the number of neighbouring channels each excitation looks at (odd;
            the paper's default is 3). The padding keeps all C channels.
    Shapes: (B, C, T, H, W) -> (B, C, T, H, W).
    """

    def __init__(self, *, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        y = x.mean(dim=(2, 3, 4))  # (B, C)
        # The C channels are the length of a 1-channel 1-D signal: (B, 1, C).
        eta = torch.sigmoid(self.conv(y.unsqueeze(1))).squeeze(1)  # (B, C)
        return x * eta[:, :, None, None, None]


class SqueezeExcitation3d(nn.Module):
    """SE block for 3D maps: sigmoid(FC(ReLU(FC(GAP(x))))) * x, with biased FC layers.

    Args:
        channels: C, the channels of the map it rescales.
        reduction: r; the bottleneck has C // r units (16, as in Hu et al. and Table 3).
    Shapes: (B, C, T, H, W) -> (B, C, T, H, W).
    """

    def __init__(self, *, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        y = x.mean(dim=(2, 3, 4))  # (B, C)
        eta = torch.sigmoid(self.fc2(self.relu(self.fc1(y))))
        return x * eta[:, :, None, None, None]
