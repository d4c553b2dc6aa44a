"""The split-precision grouped conv (fp32 forward, bf16 backward) computes the same convolution."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.grouped_conv import GroupedConv3d, float_forward_conv3d
from models.resnext3d import resnext3d_101


def test_float_forward_matches_the_fp32_convolution_and_bf16_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 4, 9, 9)
    w = torch.randn(16, 4, 3, 3, 3) * 0.2
    conf = dict(stride=(2, 1, 1), padding=(1, 1, 1), dilation=(1, 1, 1), groups=4)
    xb = x.to(torch.bfloat16).requires_grad_()
    wf = w.clone().requires_grad_()
    y = float_forward_conv3d(xb, wf, **conf)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 16, 2, 9, 9)
    # forward: the fp32 convolution of the bf16 input, rounded once to bf16
    ref = F.conv3d(xb.detach().float(), w, None, **conf)
    torch.testing.assert_close(y.float(), ref.to(torch.bfloat16).float(), rtol=0, atol=0)
    # backward: what autograd gives for the same convolution in bf16, in the weight's dtype
    g = torch.randn_like(ref).to(torch.bfloat16)
    y.backward(g)
    xr = xb.detach().clone().requires_grad_()
    wr = w.to(torch.bfloat16).requires_grad_()
    F.conv3d(xr, wr, None, **conf).backward(g)
    assert wf.grad.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xb.grad, xr.grad)
    torch.testing.assert_close(wf.grad, wr.grad.float())
    # and within bf16 rounding of the exact fp32 gradient
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.conv3d(xe, we, None, **conf).backward(g.float())
    torch.testing.assert_close(wf.grad, we.grad, rtol=0.02, atol=0.05)


def test_grouped_conv_is_a_plain_conv3d_off_cuda_and_only_thin_groups_take_the_path():
    conv = GroupedConv3d(8, 8, 3, padding=1, groups=2)
    assert isinstance(conv, torch.nn.Conv3d) and conv.bias is None and conv.thin
    x = torch.randn(1, 8, 3, 5, 5)
    assert torch.equal(conv(x), F.conv3d(x, conv.weight, None, 1, 1, 1, 2))
    assert not GroupedConv3d(64, 64, 3, groups=8).thin
    net = resnext3d_101(num_classes=5)
    thin = [m.thin for layer in (net.layer1, net.layer2) for b in layer for m in [b.conv2]]
    assert thin == [True] * 3 + [False] * 4               # Res2's 4 channels per group only
    assert "layer1.0.conv2.weight" in net.state_dict()        # Hara's names still load


@pytest.mark.gpu
def test_on_cuda_bf16_the_thin_group_path_agrees_with_cudnn_bf16():
    torch.manual_seed(0)
    conv = GroupedConv3d(128, 128, 3, padding=1, groups=32).cuda()
    x = torch.randn(4, 128, 8, 28, 28, device="cuda", requires_grad=True)
    grads = []
    for split in (True, False):
        conv.thin = split
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = conv(x)
        assert y.dtype == torch.bfloat16
        x.grad = conv.weight.grad = None
        y.float().square().sum().backward()
        grads.append((y.float(), x.grad.clone(), conv.weight.grad.clone()))
    for a, b in zip(*grads):                              # both within bf16's rounding
        assert ((a - b).norm() / b.norm()).item() < 0.01
