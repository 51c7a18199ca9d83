"""NaN and Inf propagate through the conv ops as through F.conv2d and torch's activations.

x carries a NaN at one pixel and channel, and +Inf and -Inf at two others. Each op's output
must have NaN, +Inf and -Inf exactly where eager PyTorch's float64 chain has them (relu6 of
+Inf is 6 and of NaN is NaN; Inf times weights of both signs, summed, is NaN), and the finite
values must match. bn_act's own kinks and NaN are in test_bn_act.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv.activations import apply_activation
from fastconv.ops import conv_bn_act as conv_ops
from harness import DEVICE, backends_under_test, random_tensor, run_backend, with_fused_block_kernels

BACKENDS = backends_under_test(conv_ops.FORWARD)
# fastconv.ops.inverted_residual is also the name of the function the package exports.
BLOCK_BACKENDS = with_fused_block_kernels(backends_under_test(importlib.import_module("fastconv.ops.inverted_residual").FORWARD))


def special_input(shape, layout="channels_last"):
    x = random_tensor(shape, torch.float32, layout)
    with torch.no_grad():
        x[0, 1, 2, 3] = float("nan")
        x[0, 0, 4, 1] = float("inf")
        x[-1, shape[1] - 1, 0, 0] = float("-inf")
    return x


def assert_same_special_values(got, want):
    want = want.to(got.dtype)
    for name, mask in (("NaN", torch.isnan), ("+Inf", lambda t: torch.isposinf(t)), ("-Inf", torch.isneginf)):
        assert torch.equal(mask(got), mask(want)), f"{name} at {mask(got).sum()} places, PyTorch's at {mask(want).sum()}"
    finite = torch.isfinite(want)
    assert finite.any()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)


CONVS = {
    # name: (C_out, kernel, groups, padding)
    "depthwise 3x3": (6, 3, 6, 1),
    "pointwise 1x1": (5, 1, 1, 0),
    "implicit GEMM 3x3": (5, 3, 1, 1),
}


@pytest.mark.parametrize("activation", ["relu6", None])
@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_ops_propagate_nan_and_inf(backend, conv, activation):
    out_channels, k, groups, padding = CONVS[conv]
    x = special_input((2, 6, 7, 6))
    weight = torch.randn(out_channels, 6 // groups, k, k, device=DEVICE)
    shift = torch.randn(out_channels, device=DEVICE)
    y = run_backend(backend, fastconv.conv2d_bn_act, x, weight, None, 1, padding, 1, groups, shift=shift,
                    activation=activation)  # fmt: skip
    want = F.conv2d(x.double(), weight.double(), None, 1, padding, 1, groups) + shift.double().view(1, -1, 1, 1)
    assert_same_special_values(y, apply_activation(want, activation))


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_fused_block_propagates_nan_and_inf(backend):
    """The inverted residual's expansion turns the Inf pixel into relu6's 6 or 0 (finite from
    there on), while the NaN stays NaN through the depthwise window and the projection."""
    x = special_input((2, 6, 7, 6))
    expand = torch.randn(12, 6, 1, 1, device=DEVICE) / 3
    dw = torch.randn(12, 1, 3, 3, device=DEVICE) / 3
    project = torch.randn(6, 12, 1, 1, device=DEVICE) / 4
    shifts = [torch.randn(c, device=DEVICE) for c in (12, 12, 6)]
    with torch.no_grad():
        y = run_backend(backend, fastconv.inverted_residual, x, expand, dw, project, stride=1, expand_scale=None,
                        expand_shift=shifts[0], dw_scale=None, dw_shift=shifts[1], project_scale=None,
                        project_shift=shifts[2], use_residual=False)  # fmt: skip
    x64 = x.double()
    e = F.relu6(F.conv2d(x64, expand.double()) + shifts[0].double().view(1, -1, 1, 1))
    d = F.relu6(F.conv2d(e, dw.double(), padding=1, groups=12) + shifts[1].double().view(1, -1, 1, 1))
    assert_same_special_values(y, F.conv2d(d, project.double()) + shifts[2].double().view(1, -1, 1, 1))
