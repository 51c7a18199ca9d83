"""Batch statistics fused into the Triton depthwise and pointwise forward kernels.

depthwise_forward_with_stats and pointwise_gemm_with_stats write the same output as
depthwise_forward and pointwise_gemm (the same kernels, STATS on), plus the per-channel mean
and biased variance of that output as stored, which must match torch.var_mean of it in float64.
Under the interpreter the grids are kept to a few programs each.
"""

from __future__ import annotations

import pytest
import torch

from fastconv.triton_kernels import depthwise, pointwise
from harness import DEVICE, random_tensor, seeded

DTYPES = (torch.float32, torch.float16, torch.float64)
LAYOUTS = ("channels_last", "nchw", "channel_slice", "spatial_slice")


@pytest.fixture(autouse=True)
def _seed():
    seeded(0)


def reference_stats(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(out.double(), dim=(0, 2, 3), unbiased=False)
    return mean, var


def assert_stats(out: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, relative: float = 2e-6) -> None:
    """mean and var against float64 statistics of out: float32 (float64) as the contract says,
    mean within `relative` of the channel's spread and magnitude, var within `relative` of itself."""
    want = torch.float64 if out.dtype == torch.float64 else torch.float32
    assert mean.dtype == want and var.dtype == want
    assert mean.shape == var.shape == (out.shape[1],)
    ref_mean, ref_var = reference_stats(out)
    if out.dtype == torch.float64:
        relative = 1e-12
    spread = ref_var.sqrt() + ref_mean.abs()
    mean_error = (mean.double() - ref_mean).abs()
    var_error = (var.double() - ref_var).abs()
    assert (mean_error <= relative * spread + 1e-30).all(), f"mean off by {(mean_error / spread).max():.3g} (relative)"
    assert (var_error <= relative * ref_var + 1e-30).all(), f"var off by {(var_error / ref_var).max():.3g} (relative)"


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
    assert_stats(y, mean, var)


def test_depthwise_planes_merge_within_program(monkeypatch):
    """NCHW planes longer than the grid's axis 1: each program walks several blocks of its
    planes and merges them (Chan) before storing; capping axis 1 at 2 makes that happen here.
    15x75 = 1125 pixels per plane are 5 blocks of 256, the last partial: slot 0 takes 3, slot 1 takes 2."""
    monkeypatch.setattr(depthwise, "MAX_GRID_Y", 2)
    x, weight, bias = depthwise_inputs((2, 3, 15, 75), 3, 1, torch.float32, "nchw", bias_offset=50.0)
    y, mean, var, plain = depthwise_both(x, weight, bias, 1, 1)
    assert torch.equal(y, plain)
    assert_stats(y, mean, var)


@pytest.mark.parametrize("layout", ("channels_last", "nchw"))
def test_depthwise_stats_stable_when_mean_dominates(layout):
    """float32 outputs around 1000 with unit spread: no raw sum of squares anywhere, and tile
    means refined below a float32 ulp (1e-5 to 6e-5 relative error in var without; ~3e-7 with)."""
    x, weight, bias = depthwise_inputs((3, 5, 9, 11), 3, 1, torch.float32, layout, bias_offset=1000.0)
    y, mean, var, _ = depthwise_both(x, weight, bias, 1, 1)
    assert (reference_stats(y)[0].abs() > 900).all()
    assert_stats(y, mean, var)


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
    assert mean.shape == var.shape == (8,) and mean.dtype == var.dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32)
    assert mean.isnan().all() and var.isnan().all()


# --------------------------------------------------------------------------------------------
# Pointwise.


def pointwise_inputs(shape, out_channels, dtype, layout, bias_offset=0.0, bias=True):
    x = random_tensor(shape, dtype, layout)
    weight = (torch.randn(out_channels, shape[1], device=DEVICE) / shape[1] ** 0.5).to(dtype)
    b = (torch.randn(out_channels, device=DEVICE) + bias_offset).to(dtype) if bias else None
    return x, weight, b


def new_out(x, out_channels, out_layout):
    n, _, h, w = x.shape
    if out_layout == "channel_slice":  # DenseNet's concatenation: a slice of a wider buffer
        wide = torch.full((n, out_channels + 7, h, w), 7.0, dtype=x.dtype, device=x.device)
        return wide.contiguous(memory_format=torch.channels_last)[:, 3: out_channels + 3]
    memory_format = torch.channels_last if out_layout == "channels_last" else torch.contiguous_format
    return torch.empty(n, out_channels, h, w, dtype=x.dtype, device=x.device, memory_format=memory_format)


def pointwise_both(x, weight, bias, out_layout):
    out = new_out(x, weight.shape[0], out_layout)
    got, mean, var = pointwise.pointwise_gemm_with_stats(x, weight, out, bias)
    assert got is out
    plain = pointwise.pointwise_gemm(x, weight, new_out(x, weight.shape[0], out_layout), bias)
    return out, mean, var, plain


# (shape, C_out): 128-pixel tiles, so 297 pixels are 3 tiles, the last partial; 70 output
# channels are two 64-channel column blocks, the second mostly masked; 40 input channels two K steps.
POINTWISE_CASES = [((3, 20, 9, 11), 12), ((1, 40, 7, 13), 70)]


@pytest.mark.parametrize("case", POINTWISE_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-o{c[1]}")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pointwise_stats(dtype, layout, case):
    shape, out_channels = case
    x, weight, bias = pointwise_inputs(shape, out_channels, dtype, layout, bias=layout != "nchw")
    out_layout = "channels_last" if layout in ("channels_last", "channel_slice") else "nchw"
    out, mean, var, plain = pointwise_both(x, weight, bias, out_layout)
    assert torch.equal(out, plain)
    assert_stats(out, mean, var)


def test_pointwise_stats_into_channel_slice():
    """out a channel slice of a wider buffer: only its own elements written, stats of them only."""
    x, weight, bias = pointwise_inputs((3, 20, 9, 11), 12, torch.float32, "channels_last")
    out, mean, var, plain = pointwise_both(x, weight, bias, "channel_slice")
    assert torch.equal(out, plain)
    buffer = out.as_strided((3, 19, 9, 11), out.stride(), out.storage_offset() - 3 * out.stride(1))
    assert (buffer[:, :3] == 7).all() and (buffer[:, 15:] == 7).all()
    assert_stats(out, mean, var)


@pytest.mark.parametrize("layout", ("channels_last", "nchw"))
def test_pointwise_stats_stable_when_mean_dominates(layout):
    x, weight, bias = pointwise_inputs((3, 20, 9, 11), 12, torch.float32, layout, bias_offset=1000.0)
    out, mean, var, _ = pointwise_both(x, weight, bias, layout)
    assert (reference_stats(out)[0].abs() > 900).all()
    assert_stats(out, mean, var)


def test_pointwise_stats_deterministic():
    x, weight, bias = pointwise_inputs((1, 40, 7, 13), 70, torch.float16, "nchw")
    first = pointwise_both(x, weight, bias, "nchw")[:3]
    second = pointwise_both(x, weight, bias, "nchw")[:3]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_pointwise_stats_empty_batch(dtype):
    x, weight, bias = pointwise_inputs((0, 8, 5, 5), 6, dtype, "channels_last")
    out = torch.empty(0, 6, 5, 5, dtype=dtype, device=DEVICE)
    got, mean, var = pointwise.pointwise_gemm_with_stats(x, weight, out, bias)
    assert got is out
    assert mean.shape == var.shape == (6,) and mean.dtype == var.dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32)
    assert mean.isnan().all() and var.isnan().all()
