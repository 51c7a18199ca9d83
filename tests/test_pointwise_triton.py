"""Batch statistics fused into the Triton pointwise GEMM.

pointwise_gemm_with_stats writes the same output as pointwise_gemm (the same kernel, STATS
on), plus the per-channel mean
and biased variance of that output as stored, which must match torch.var_mean of it in float64.
Under the interpreter the grids are kept to a few programs each.
"""

from __future__ import annotations

import pytest
import torch

from fastconv.triton_kernels import pointwise
from harness import DEVICE, assert_batch_stats, random_tensor, seeded, wide

DTYPES = (torch.float32, torch.float16, torch.float64)
LAYOUTS = ("channels_last", "nchw", "channel_slice", "spatial_slice")


@pytest.fixture(autouse=True)
def _seed():
    seeded(0)


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
    assert_batch_stats(out, mean, var)


def test_pointwise_stats_into_channel_slice():
    """out a channel slice of a wider buffer: only its own elements written, stats of them only."""
    x, weight, bias = pointwise_inputs((3, 20, 9, 11), 12, torch.float32, "channels_last")
    out, mean, var, plain = pointwise_both(x, weight, bias, "channel_slice")
    assert torch.equal(out, plain)
    buffer = out.as_strided((3, 19, 9, 11), out.stride(), out.storage_offset() - 3 * out.stride(1))
    assert (buffer[:, :3] == 7).all() and (buffer[:, 15:] == 7).all()
    assert_batch_stats(out, mean, var)


@pytest.mark.parametrize("layout", ("channels_last", "nchw"))
def test_pointwise_stats_stable_when_mean_dominates(layout):
    x, weight, bias = pointwise_inputs((3, 20, 9, 11), 12, torch.float32, layout, bias_offset=1000.0)
    out, mean, var, _ = pointwise_both(x, weight, bias, layout)
    assert (out.double().mean(dim=(0, 2, 3)).abs() > 900).all()
    assert_batch_stats(out, mean, var)


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
    assert mean.shape == var.shape == (6,) and mean.dtype == var.dtype == wide(dtype)
    assert mean.isnan().all() and var.isnan().all()
