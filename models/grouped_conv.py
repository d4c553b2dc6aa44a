"""The ResNeXt grouped 3x3x3 convolution, with a way around cuDNN's slow bf16 kernel for thin groups.

Why: under bf16 autocast cuDNN has no fast forward kernel for 3D convolutions with fewer than 8
channels per group, and ResNeXt-101's first stage has 4 (128 channels in 32 groups). On an H200
(torch 2.11, cudnn.benchmark) its forward at batch 32, 128x8x28x28 takes 3.7 ms in bf16 against
0.5 ms in TF32, and those three convolutions were a fifth of a whole bf16 training step. The
backward pass has no such gap (bf16 0.7 ms, TF32 1.8 ms). So, for thin groups under CUDA bf16
autocast only, the forward runs in fp32 maths on TF32 tensor cores and the backward in bf16:
more precise than the plain bf16 forward (10 mantissa bits, not 7) and 4x faster for that layer.
Everywhere else (CPU, fp32, TF32, wide groups) this is nn.Conv3d, with the same parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# cuDNN's bf16 forward is fast from 8 channels per group (H200: 0.18 ms at 256x8x28x28, 8/group)
THIN_GROUP = 8


class _FloatForwardConv3d(torch.autograd.Function):
    """conv3d whose forward is computed in fp32 and whose backward is in the input's dtype."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv3d(x.float(), weight.float(), None, stride, padding, dilation, groups)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad.to(x.dtype), x, weight.to(x.dtype), None, stride, padding, dilation, False,
            [0, 0, 0], groups, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        return gx, None if gw is None else gw.to(weight.dtype), None, None, None, None


def float_forward_conv3d(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                         groups: int) -> torch.Tensor:
    """The split-precision convolution itself (bias-free), for any device: tests run it on CPU."""
    return _FloatForwardConv3d.apply(x, weight, tuple(stride), tuple(padding), tuple(dilation),
                                     groups)


class GroupedConv3d(nn.Conv3d):
    """nn.Conv3d (bias-free) that takes the split-precision path where cuDNN's bf16 one is slow."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, stride=1,
                 padding=0, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         groups=groups, bias=False)
        self.thin = in_channels // groups < THIN_GROUP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.thin and x.is_cuda and torch.is_autocast_enabled("cuda")
                and torch.get_autocast_dtype("cuda") == torch.bfloat16):
            return float_forward_conv3d(x.to(torch.bfloat16), self.weight, self.stride,
                                        self.padding, self.dilation, self.groups)
        return super().forward(x)
