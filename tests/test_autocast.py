"""Under torch.autocast the convolution ops cast as F.conv2d does, also when called as raw
torch.ops.fastconv.* (fastconv/ops/_autocast.py): x, weight, bias and residual go to the
region's dtype, the epilogue's float32 BatchNorm parameters stay float32, float64 stays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastconv
from harness import random_tensor

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def _inputs():
    x = random_tensor((2, 4, 9, 9), torch.float32, "channels_last", device="cpu")
    scale, shift = torch.rand(8) + 0.5, torch.randn(8)
    return x, scale, shift


def _raw_calls():
    """name -> (raw op call, the eager PyTorch it equals under the same autocast region)."""
    dw, pw, dense, bias = torch.randn(8, 1, 3, 3), torch.randn(8, 4, 1, 1), torch.randn(8, 2, 3, 3), torch.randn(8)
    ops = torch.ops.fastconv
    return {
        "depthwise_conv2d": (
            lambda x, s, b: ops.depthwise_conv2d(x, dw, bias, (1, 1), (1, 1, 1, 1), (1, 1), s, b, "relu6"),
            lambda x, s, b: F.relu6(F.conv2d(x, dw, bias, 1, 1, groups=4).float() * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)),
        ),
        "pointwise_conv2d": (
            lambda x, s, b: ops.pointwise_conv2d(x, pw, bias, s, b, "silu"),
            lambda x, s, b: F.silu((F.conv2d(x, pw, bias)).float() * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)),
        ),
        "conv2d_bn_act": (
            lambda x, s, b: ops.conv2d_bn_act(x, dense, None, (2, 2), (1, 1, 1, 1), (1, 1), 2, s, b, "relu"),
            lambda x, s, b: F.relu(F.conv2d(x, dense, None, 2, 1, groups=2).float() * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)),
        ),
        "conv2d_batch_stats": (
            lambda x, s, b: ops.conv2d_batch_stats(x, dense, bias, (1, 1), (1, 1, 1, 1), (1, 1), 2)[0],
            lambda x, s, b: F.conv2d(x, dense, bias, 1, 1, groups=2),
        ),
    }


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(_raw_calls()))
def test_raw_ops_cast_as_conv2d_does(name, dtype):
    fastconv_call, eager_call = _raw_calls()[name]
    x, scale, shift = _inputs()
    with torch.autocast("cpu", dtype=dtype):
        got = fastconv_call(x, scale, shift)
        want = eager_call(x, scale, shift)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=0.05)


def test_fused_inverted_residual_casts_its_weights():
    x = random_tensor((1, 8, 7, 7), torch.float32, "channels_last", device="cpu")
    expand, dw, project = torch.randn(16, 8, 1, 1), torch.randn(16, 1, 3, 3), torch.randn(8, 16, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.fastconv.inverted_residual(
            x, expand, dw, project, (1, 1), (1, 1, 1, 1), (1, 1), None, None, "relu6", None, None, "relu6", None, None,
            None, x,
        )  # fmt: skip
    assert y.dtype == torch.bfloat16


def test_raw_op_gradients_reach_the_float32_leaves():
    x, scale, shift = _inputs()
    x.requires_grad_()
    weight = torch.randn(8, 1, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.fastconv.depthwise_conv2d(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), scale, shift, "relu")
    y.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == torch.float32


def test_float64_is_left_alone():
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    weight = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.ops.fastconv.pointwise_conv2d(x, weight).dtype == torch.float64


def test_modules_under_autocast():
    """PointwiseConv2d raised 'weight must have x's dtype torch.bfloat16; got torch.float32'."""
    x = torch.randn(2, 4, 5, 5)
    for module in (fastconv.nn.PointwiseConv2d(4, 6), fastconv.nn.DepthwiseConv2d(4, 8, 3, padding=1, groups=4)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert module(x).dtype == torch.bfloat16
