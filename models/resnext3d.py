"""3D-ResNeXt of seed 000 section 3.1 / Table 1 (after Hara et al. 2018), with optional CE or SE.

For a (B, 3 or 2, 16, 112, 112) clip the sizes are Table 1's: Conv1 7x7x7 stride (1, 2, 2)
padding 3 -> 64 x 16x56x56; max pool 3x3x3 stride 2 -> 8x28x28; Res2-Res5 of (3, 4, 23, 3)
blocks -> 256 x 8x28x28, 512 x 4x14x14, 1024 x 2x7x7, 2048 x 1x4x4; average pool -> 2048; FC.

The block is Hara's ResNeXt bottleneck: 1x1x1 conv to an inner width of half the output width
(cardinality 32 x 4 x 2^stage = 128/256/512/1024), a grouped 3x3x3 conv with cardinality groups
that carries the stage's stride (2 in time and space at the first block of Res3-Res5), a 1x1x1
conv expanding by 2, each followed by BN; type-B shortcuts (1x1x1 conv + BN) where the shape
changes. The CE/SE module sits once after each residual stage (section 3.2, Table 2: Res2-5).

Module names follow Hara's code (conv1, bn1, layer1-4, downsample.0/1, fc) so that his Kinetics
checkpoints load by name; the excitation modules live apart, in `excitations`. The grouped conv
is models/grouped_conv.py's nn.Conv3d, which avoids cuDNN's slow bf16 kernel for thin groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from models.excitation import ChannelExcitation, SqueezeExcitation3d
from models.grouped_conv import GroupedConv3d

Excitation = Literal["ce", "se"] | None

RESNEXT101_LAYERS = (3, 4, 23, 3)
RESNEXT50_LAYERS = (3, 4, 6, 3)
STAGE_WIDTHS = (256, 512, 1024, 2048)  # Table 1, column F
EXPANSION = 2  # Hara's ResNeXt bottleneck: output width = 2 x inner width


class ResNeXtBottleneck3d(nn.Module):
    """1x1x1 -> grouped 3x3x3 (strided) -> 1x1x1 bottleneck with a residual add.

    Args:
        in_channels: channels entering the block.
        width: inner (grouped) width.
        out_channels: channels leaving the block.
        cardinality: groups of the 3x3x3 conv.
        stride: temporal and spatial stride of the 3x3x3 conv.
    Shapes: (B, in_channels, T, H, W) -> (B, out_channels, T/stride, H/stride, W/stride).
    """

    def __init__(
        self, *, in_channels: int, width: int, out_channels: int, cardinality: int, stride: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = GroupedConv3d(width, width, 3, stride=stride, padding=1, groups=cardinality)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:  # type-B shortcut: projection only here
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm3d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def _make_excitation(kind: Excitation, channels: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "ce":
        return ChannelExcitation(kernel_size=3)
    if kind == "se":
        return SqueezeExcitation3d(channels=channels, reduction=16)
    raise ValueError(f"excitation must be None, 'ce' or 'se', got {kind!r}")


class ResNeXt3D(nn.Module):
    """3D-ResNeXt backbone + linear classifier.

    Args:
        layers: blocks per stage Res2-Res5, e.g. (3, 4, 23, 3) for ResNeXt-101.
        widths: output channels of each stage (Table 1's F: 256/512/1024/2048).
        cardinality: groups of every 3x3x3 conv (32).
        stem_width: Conv1's output channels (64).
        in_channels: 3 for RGB clips, 2 for (x, y) optical flow clips.
        num_classes: logits of the FC head; 0 leaves no head (forward_head is the identity).
        excitation: None, "ce" (CE module) or "se" (SE block), once after each stage.
    Input (B, C, T, H, W); forward_features -> (B, widths[-1]); forward -> (B, num_classes).
    """

    def __init__(
        self,
        *,
        layers: Sequence[int],
        widths: Sequence[int] = STAGE_WIDTHS,
        cardinality: int = 32,
        stem_width: int = 64,
        in_channels: int = 3,
        num_classes: int = 400,
        excitation: Excitation = None,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError("layers and widths need one entry per stage Res2-Res5")
        self.conv1 = nn.Conv3d(
            in_channels, stem_width, 7, stride=(1, 2, 2), padding=3, bias=False
        )
        self.bn1 = nn.BatchNorm3d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        channels = stem_width
        for index, (blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if index == 0 else 2
            stage = []
            for block in range(blocks):
                stage.append(
                    ResNeXtBottleneck3d(
                        in_channels=channels,
                        width=width // EXPANSION,
                        out_channels=width,
                        cardinality=cardinality,
                        stride=stride if block == 0 else 1,
                    )
                )
                channels = width
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.excitations = nn.ModuleList(_make_excitation(excitation, w) for w in widths)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.num_features = channels
        self.fc: nn.Module = nn.Linear(channels, num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def stages(self) -> tuple[nn.Sequential, ...]:
        """Res2-Res5, in order."""
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) clip -> (B, num_features) pooled feature (eq. 8's fc_RGB / fc_Flow)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage, excite in zip(self.stages, self.excitations):
            x = excite(stage(x))
        return torch.flatten(self.avgpool(x), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, num_features) -> (B, num_classes) logits."""
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resnext3d_101(
    *, in_channels: int = 3, num_classes: int = 400, excitation: Excitation = None
) -> ResNeXt3D:
    """3D-ResNeXt-101, cardinality 32 (Table 1): 48.34 M parameters with 400 classes."""
    return ResNeXt3D(
        layers=RESNEXT101_LAYERS,
        in_channels=in_channels,
        num_classes=num_classes,
        excitation=excitation,
    )


def resnext3d_50(
    *, in_channels: int = 3, num_classes: int = 400, excitation: Excitation = None
) -> ResNeXt3D:
    """3D-ResNeXt-50, cardinality 32: the (3, 4, 6, 3) depth of the same design."""
    return ResNeXt3D(
        layers=RESNEXT50_LAYERS,
        in_channels=in_channels,
        num_classes=num_classes,
        excitation=excitation,
    )


def resnext3d_tiny(
    *, in_channels: int = 3, num_classes: int = 400, excitation: Excitation = None
) -> ResNeXt3D:
    """One block per stage, cardinality 4, widths 16-128: same code path, fast on a CPU."""
    return ResNeXt3D(
        layers=(1, 1, 1, 1),
        widths=(16, 32, 64, 128),
        cardinality=4,
        stem_width=8,
        in_channels=in_channels,
        num_classes=num_classes,
        excitation=excitation,
    )
