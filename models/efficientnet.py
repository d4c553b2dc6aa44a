"""EfficientNet-B0 (Tan & Le 2019, Table 1): the per-frame backbone of seed 004 3.1 / Table 1.

Stem 3x3/2 conv -> 7 stages of MBConv (inverted bottleneck: 1x1 expansion, depthwise kxk,
squeeze-excitation, linear 1x1 projection) -> 1x1 conv to 1280 -> average pool -> dropout -> FC.
Swish (SiLU) throughout; the SE squeeze width is a quarter of the block's *input* channels.
Residual blocks use stochastic depth whose rate grows linearly with the block index,
rate * i / n for block i of n, as in the reference TF code and torchvision. With 1000 classes and
RGB input B0 has 5,288,548 parameters, torchvision's count.

Seed 004's Table 1 prints Tan & Le's rows with the "Size" column shifted by one stage (it lists
each stage's input resolution as its output); the operators, kernels, strides, widths and layer
counts below are the same rows. `in_channels` is 3 for RGB or 2L for L stacked (x, y) flow frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MBConvRow:
    """One stage of the stage table: expand ratio, kernel, stride, in/out channels, layers."""

    expand_ratio: int
    kernel: int
    stride: int
    in_channels: int
    out_channels: int
    num_layers: int


# Tan & Le Table 1, stages 2-8: (expand, kernel, stride, in, out, layers), as torchvision's rows.
B0_STAGES = (
    MBConvRow(1, 3, 1, 32, 16, 1),
    MBConvRow(6, 3, 2, 16, 24, 2),
    MBConvRow(6, 5, 2, 24, 40, 2),
    MBConvRow(6, 3, 2, 40, 80, 3),
    MBConvRow(6, 5, 1, 80, 112, 3),
    MBConvRow(6, 5, 2, 112, 192, 4),
    MBConvRow(6, 3, 1, 192, 320, 1),
)
B0_HEAD_WIDTH = 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled width to a multiple of `divisor`, never dropping more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole residual branch per sample, rescale the survivors."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class ConvBNAct(nn.Module):
    """Conv2d (no bias, 'same' padding for odd k) -> BatchNorm -> optional SiLU."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act: nn.Module = nn.SiLU(inplace=True) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SqueezeExcitation2d(nn.Module):
    """MBConv's SE: GAP -> 1x1 conv reduce -> SiLU -> 1x1 conv expand -> sigmoid -> rescale."""

    def __init__(self, *, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = nn.SiLU(inplace=True)
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        scale = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(self.act(self.reduce(scale))))


class MBConv(nn.Module):
    """Mobile inverted bottleneck with SE; residual (with stochastic depth) when shapes agree.

    Args:
        in_channels, out_channels: block input and output widths.
        expand_ratio: expansion of the inner width (1 means no expansion conv).
        kernel: depthwise kernel size; stride: its stride.
        drop_path_rate: stochastic-depth rate of this block.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        expand_ratio: int,
        kernel: int,
        stride: int,
        drop_path_rate: float,
    ) -> None:
        super().__init__()
        mid = make_divisible(in_channels * expand_ratio)
        self.expand: nn.Module | None = None
        if mid != in_channels:
            self.expand = ConvBNAct(in_channels=in_channels, out_channels=mid, kernel_size=1)
        self.depthwise = ConvBNAct(
            in_channels=mid, out_channels=mid, kernel_size=kernel, stride=stride, groups=mid
        )
        self.se = SqueezeExcitation2d(channels=mid, squeeze_channels=max(1, in_channels // 4))
        self.project = ConvBNAct(
            in_channels=mid, out_channels=out_channels, kernel_size=1, activation=False
        )
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.se(self.depthwise(out)))
        if self.use_residual:
            out = drop_path(out, self.drop_path_rate, self.training) + x
        return out


class EfficientNet(nn.Module):
    """EfficientNet from a stage table, scaled by width and depth multipliers.

    Args:
        stages: rows of MBConvRow (the B0 table by default).
        width_mult, depth_mult: compound-scaling multipliers for channels and layers.
        in_channels: 3 for RGB, 2L for L stacked flow frames.
        num_classes: logits of the head; 0 leaves no classifier (forward_head is the identity).
        dropout: dropout before the classifier (0.2 for B0).
        drop_path_rate: stochastic-depth rate the last residual block approaches (0.2).
    Input (B, C, H, W); forward_features -> (B, num_features); forward -> (B, num_classes).
    """

    def __init__(
        self,
        *,
        stages: Sequence[MBConvRow] = B0_STAGES,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        head_width: int = B0_HEAD_WIDTH,
        in_channels: int = 3,
        num_classes: int = 1000,
        dropout: float = 0.2,
        drop_path_rate: float = 0.2,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}")
        rows = [
            MBConvRow(
                row.expand_ratio,
                row.kernel,
                row.stride,
                make_divisible(row.in_channels * width_mult),
                make_divisible(row.out_channels * width_mult),
                int(math.ceil(row.num_layers * depth_mult)),
            )
            for row in stages
        ]
        self.stem = ConvBNAct(
            in_channels=in_channels, out_channels=rows[0].in_channels, kernel_size=3, stride=2
        )
        total = sum(row.num_layers for row in rows)
        index = 0
        stage_modules = []
        for row in rows:
            blocks = []
            for layer in range(row.num_layers):
                blocks.append(
                    MBConv(
                        in_channels=row.in_channels if layer == 0 else row.out_channels,
                        out_channels=row.out_channels,
                        expand_ratio=row.expand_ratio,
                        kernel=row.kernel,
                        stride=row.stride if layer == 0 else 1,
                        drop_path_rate=drop_path_rate * index / total,
                    )
                )
                index += 1
            stage_modules.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stage_modules)
        self.num_features = make_divisible(head_width * width_mult)
        self.head = ConvBNAct(
            in_channels=rows[-1].out_channels, out_channels=self.num_features, kernel_size=1
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier: nn.Module = (
            nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image or flow stack -> (B, num_features) pooled feature."""
        x = self.head(self.stages(self.stem(x)))
        return torch.flatten(self.pool(x), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, num_features) -> (B, num_classes) logits (dropout, then FC)."""
        return self.classifier(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def efficientnet_b0(
    *,
    in_channels: int = 3,
    num_classes: int = 1000,
    dropout: float = 0.2,
    drop_path_rate: float = 0.2,
) -> EfficientNet:
    """EfficientNet-B0: 5,288,548 parameters at in_channels=3, num_classes=1000."""
    return EfficientNet(
        in_channels=in_channels,
        num_classes=num_classes,
        dropout=dropout,
        drop_path_rate=drop_path_rate,
    )


def efficientnet_tiny(
    *,
    in_channels: int = 3,
    num_classes: int = 1000,
    dropout: float = 0.2,
    drop_path_rate: float = 0.2,
) -> EfficientNet:
    """B0's table at width 0.25 and depth 0.25 (one block per stage, 320-d feature): for tests."""
    return EfficientNet(
        width_mult=0.25,
        depth_mult=0.25,
        in_channels=in_channels,
        num_classes=num_classes,
        dropout=dropout,
        drop_path_rate=drop_path_rate,
    )
