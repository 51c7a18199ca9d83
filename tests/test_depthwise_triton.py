"""Batch statistics fused into the Triton depthwise forward kernels.

depthwise_forward_with_stats writes the same output as depthwise_forward (the same kernels,
STATS on), plus the per-channel mean
and biased variance of that output as stored, which must match torch.var_mean of it in float64.
Under the interpreter the grids are kept to a few programs each.
"""

from __future__ import annotations

import pytest
import torch

from fastconv.triton_kernels import depthwise
from harness import DEVICE, assert_batch_stats, random_tensor, seeded, wide

DTYPES = (torch.float32, torch.float16, torch.float64)
LAYOUTS = ("channels_last", "nchw", "channel_slice", "spatial_slice")


@pytest.fixture(autouse=True)
def _seed():
    seeded(0)


# --------------------------------------------------------------------------------------------
# Depthwise.


def depthwise_inputs(shape, kernel, multiplier, dtype, layout, bias_offset=0.0, bias=True):
    x = random_tensor(shape, dtype, layout)
    channels = shape[1] * multiplier
    weight = (torch.randn(channels, 1, kernel, kernel, device=DEVICE) / kernel).to(dtype)
    b = (torch.randn(channels, device=DEVICE) + bias_offset).to(dtype) if bias else None
    return x, weight, b


def depthwise_both(x, weight, bias, stride, padding):
    geometry = ((stride, stride), (padding,) * 4, (1, 1))
    y, mean, var = depthwise.depthwise_forward_with_stats(x, weight, bias, *geometry)
    plain = depthwise.depthwise_forward(x, weight, bias, *geometry, None, None, 0)
    return y, mean, var, plain


# (shape, kernel, stride, padding, multiplier): odd sizes, stride 2, depth multiplier 2. The
# channels_last tiles hold 128 pixels, so the first shape spans 3 tiles, the last one partial.
DEPTHWISE_CASES = [
    ((3, 5, 9, 11), 3, 1, 1, 1),
    ((2, 6, 13, 9), 3, 2, 1, 1),
    ((2, 3, 7, 10), 5, 1, 2, 2),
]


@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-k{c[1]}s{c[2]}m{c[4]}")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_depthwise_stats(dtype, layout, case):
    shape, kernel, stride, padding, multiplier = case
    x, weight, bias = depthwise_inputs(shape, kernel, multiplier, dtype, layout, bias=layout != "nchw")
    y, mean, var, plain = depthwise_both(x, weight, bias, stride, padding)
    assert torch.equal(y, plain) and y.stride() == plain.stride()
    assert_batch_stats(y, mean, var)


def test_depthwise_planes_merge_within_program(monkeypatch):
    """NCHW planes longer than the grid's axis 1: each program walks several blocks of its
    planes and merges them (Chan) before storing; capping axis 1 at 2 makes that happen here.
    15x75 = 1125 pixels per plane are 5 blocks of 256, the last partial: slot 0 takes 3, slot 1 takes 2."""
    monkeypatch.setattr(depthwise, "MAX_GRID_Y", 2)
    x, weight, bias = depthwise_inputs((2, 3, 15, 75), 3, 1, torch.float32, "nchw", bias_offset=50.0)
    y, mean, var, plain = depthwise_both(x, weight, bias, 1, 1)
    assert torch.equal(y, plain)
    assert_batch_stats(y, mean, var)


@pytest.mark.parametrize("layout", ("channels_last", "nchw"))
def test_depthwise_stats_stable_when_mean_dominates(layout):
    """float32 outputs around 1000 with unit spread: no raw sum of squares anywhere, and tile
    means refined below a float32 ulp (1e-5 to 6e-5 relative error in var without; ~3e-7 with)."""
    x, weight, bias = depthwise_inputs((3, 5, 9, 11), 3, 1, torch.float32, layout, bias_offset=1000.0)
    y, mean, var, _ = depthwise_both(x, weight, bias, 1, 1)
    assert (y.double().mean(dim=(0, 2, 3)).abs() > 900).all()
    assert_batch_stats(y, mean, var)


@pytest.mark.parametrize("layout", ("channels_last", "nchw"))
def test_depthwise_stats_deterministic(layout):
    x, weight, bias = depthwise_inputs((3, 5, 9, 11), 3, 2, torch.float16, layout)
    first = depthwise_both(x, weight, bias, 1, 1)[:3]
    second = depthwise_both(x, weight, bias, 1, 1)[:3]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ("channels_last", "nchw"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_depthwise_stats_empty_batch(dtype, layout):
    x, weight, bias = depthwise_inputs((0, 4, 5, 5), 3, 2, dtype, layout)
    y, mean, var = depthwise.depthwise_forward_with_stats(x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1))
    assert y.shape == (0, 8, 5, 5)
    assert mean.shape == var.shape == (8,) and mean.dtype == var.dtype == wide(dtype)
    assert mean.isnan().all() and var.isnan().all()
