"""MAT-EffNet stream of seed 004 sections 3.2-3.3 (Fig. 5, Table 1 rows 9-11).

Each of the L segments of a video (an RGB frame, or a stack of flow frames) goes through
EfficientNet to its pooled 1280-d feature; an FC layer maps it to 512-d; multi-head
self-attention (h = 2, 512-d, eqs. 3-5) runs across the L segment features (the rows of the
paper's L x N matrix Y); the attended features are averaged over the segments into the stream's
512-d vector (the paper gives a single 512-d output per stream but not the pooling; the mean is
the segment consensus of TSN, which the paper builds on); dropout 0.2 and an FC give the logits.
The paper places no residual connection or normalisation around the attention, so there is none.
"""

from __future__ import annotations

import torch
from torch import nn

from models.efficientnet import efficientnet_b0, efficientnet_tiny


class MATStream(nn.Module):
    """One MAT-EffNet stream: per-segment backbone -> FC -> multi-head self-attention -> mean -> FC.

    Args:
        backbone: a module with `forward_features` ((N, C, H, W) -> (N, F)) and `num_features`
            (F); its own classifier, if any, is not used.
        num_classes: logits of the final FC.
        embed_dim: width of the FC after the backbone and of the attention (512).
        num_heads: attention heads h (2).
        dropout: dropout before the final FC (0.2).
    Input (B, L, C, H, W); forward_features -> (B, embed_dim); forward -> (B, num_classes).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        num_classes: int,
        embed_dim: int = 512,
        num_heads: int = 2,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.embed = nn.Linear(backbone.num_features, embed_dim)
        self.attention = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(embed_dim, num_classes)
        self.num_features = embed_dim

    def segment_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C, H, W) -> (B, L, embed_dim): attended per-segment features."""
        if x.dim() != 5:
            raise ValueError(f"expected (B, L, C, H, W) segments, got shape {tuple(x.shape)}")
        batch, segments = x.shape[:2]
        pooled = self.backbone.forward_features(x.flatten(0, 1))  # (B*L, F)
        y = self.embed(pooled.view(batch, segments, -1))  # (B, L, E)
        attended, _ = self.attention(y, y, y, need_weights=False)
        return attended

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C, H, W) -> (B, embed_dim), the mean of the attended segment features."""
        return self.segment_features(x).mean(dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) -> (B, num_classes) logits."""
        return self.fc(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def mat_effnet_b0(*, in_channels: int = 3, num_classes: int, dropout: float = 0.2) -> MATStream:
    """MAT-EffNet stream on a headless EfficientNet-B0 (in_channels 3 for RGB, 2L for flow)."""
    backbone = efficientnet_b0(in_channels=in_channels, num_classes=0)
    return MATStream(backbone=backbone, num_classes=num_classes, dropout=dropout)


def mat_effnet_tiny(*, in_channels: int = 3, num_classes: int, dropout: float = 0.2) -> MATStream:
    """The same stream on the tiny EfficientNet with a 64-d attention: for tests and the demo."""
    backbone = efficientnet_tiny(in_channels=in_channels, num_classes=0)
    return MATStream(backbone=backbone, num_classes=num_classes, embed_dim=64, dropout=dropout)
