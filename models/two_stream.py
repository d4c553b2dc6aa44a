"""Late average fusion of two-stream softmax scores (seed 004 section 3.3, Fig. 1).

The final prediction averages the softmax scores of the spatial (RGB) and temporal (flow)
streams; fusion happens at the score level only, so the streams never share activations.
"""

from __future__ import annotations

import torch
from torch import nn


def late_fusion(*logits: torch.Tensor) -> torch.Tensor:
    """Mean of the softmax of each stream's (B, K) logits -> (B, K) class probabilities."""
    if not logits:
        raise ValueError("late_fusion needs the logits of at least one stream")
    return torch.stack([torch.softmax(score, dim=-1) for score in logits]).mean(dim=0)


class TwoStreamModel(nn.Module):
    """Spatial and temporal streams fused by late averaging of their softmax scores.

    Args:
        spatial: stream fed with RGB input, returning (B, K) logits.
        temporal: stream fed with optical-flow input, returning (B, K) logits.
    forward(rgb, flow) -> (B, K) fused probabilities (rows sum to 1).
    """

    def __init__(self, *, spatial: nn.Module, temporal: nn.Module) -> None:
        super().__init__()
        self.spatial = spatial
        self.temporal = temporal

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return late_fusion(self.spatial(rgb), self.temporal(flow))
