"""The training-mode BatchNorm kernels (triton_kernels/batch_norm.py) and their references.

The oracle is float64 autograd of F.batch_norm(training=True) followed by the activation: it
checks the backward formula independently of fastconv's own reference, which is checked
against it too. Under the interpreter every kernel program costs milliseconds, so the shapes
are small and the grids a few dozen programs.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from fastconv import reference
from fastconv.activations import ACTIVATION_CODES, apply_activation
from fastconv.backends import available
from harness import assert_matches_reference, DEVICE, LAYOUTS, poisoned_allocations, random_tensor, wide

_why_not = available()["triton"].reason
pytestmark = pytest.mark.skipif(bool(_why_not), reason=f"backend triton: {_why_not}")

ACTIVATIONS = list(ACTIVATION_CODES)
EPS = 1e-5


def kernels():
    return importlib.import_module("fastconv.triton_kernels.batch_norm")


def accumulate(dtype):
    return wide(dtype)


def make_case(shape, dtype, layout, affine=True, parameter_dtype=None, grad_layout=None, offset=0.0):
    """c, grad_y, weight, bias; weight around 1 and bias around 0 put z on both sides of every
    activation's kinks."""
    c = random_tensor(shape, dtype, layout, scale=2.0)
    if offset:
        c.add_(offset)
    grad_y = random_tensor(shape, dtype, grad_layout or layout)
    weight = bias = None
    if affine:
        parameter_dtype = parameter_dtype or dtype
        weight = (torch.randn(shape[1], device=DEVICE) * 0.5 + 1).to(parameter_dtype)
        bias = torch.randn(shape[1], device=DEVICE).to(parameter_dtype)
    return c, grad_y, weight, bias


def statistics(c):
    """mean and invstd as the unit passes them: float64 statistics, in the accumulate dtype."""
    var, mean = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
    dtype = accumulate(c.dtype)
    return mean.to(dtype), (var + EPS).rsqrt().to(dtype)


def autograd_oracle(grad_y, c, weight, bias, activation):
    """(y, grad_c, grad_weight, grad_bias) by float64 autograd of F.batch_norm(training=True)."""
    channels = c.shape[1]
    c64 = c.detach().double().requires_grad_(True)
    w64 = (weight.double() if weight is not None else torch.ones(channels, dtype=torch.float64)).requires_grad_(True)
    b64 = (bias.double() if bias is not None else torch.zeros(channels, dtype=torch.float64)).requires_grad_(True)
    y = apply_activation(F.batch_norm(c64, None, None, w64, b64, training=True, eps=EPS), activation)
    return (y, *torch.autograd.grad(y, (c64, w64, b64), grad_y.double()))


def run_backward(grad_y, c, weight, bias, activation, mean=None, invstd=None):
    if mean is None:
        mean, invstd = statistics(c)
    with poisoned_allocations():
        return kernels().batch_norm_act_backward(grad_y, c, mean, invstd, weight, bias, ACTIVATION_CODES[activation])


def check_backward(got, want, pixels, lowp_yardstick=None):
    grad_c, grad_weight, grad_bias = got
    assert grad_weight.dtype == grad_bias.dtype == accumulate(grad_c.dtype)
    assert_matches_reference("grad_c", grad_c, want[0], lowp_yardstick)
    assert_matches_reference("grad_weight", grad_weight, want[1], terms=pixels)
    assert_matches_reference("grad_bias", grad_bias, want[2], terms=pixels)


# --------------------------------------------------------------------------------------------
# channel_stats


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16, torch.float64), ids=str)
def test_channel_stats_match_float64(dtype, layout):
    c = random_tensor((2, 5, 7, 9), dtype, layout, scale=2.0).add_(0.5)
    with poisoned_allocations():
        mean, var = kernels().channel_stats(c)
    assert mean.dtype == var.dtype == accumulate(dtype) and mean.shape == var.shape == (5,)
    var64, mean64 = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
    # bfloat16 input is read exactly and the results are float32: no interpreter truncation here.
    assert_matches_reference("mean", mean, mean64)
    assert_matches_reference("var", var, var64)
    ref_mean, ref_var = reference.batch_norm_stats(c)
    assert ref_mean.dtype == accumulate(dtype)
    assert_matches_reference("reference mean", ref_mean, mean64)
    assert_matches_reference("reference var", ref_var, var64)


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((3, 4, 24, 24), "nchw"),  # planes: 3 blocks a plane, merged on the device
        ((1, 2, 30, 30), "nchw"),  # planes: 2 programs share each plane, merged on the host
        ((3, 4, 24, 24), "channels_last"),  # rows: 4 programs x 7 blocks each
        ((2, 3, 17, 19), "channel_slice"),
        ((2, 3, 17, 19), "spatial_slice"),
        ((2, 1, 20, 20), "channels_last"),  # one channel takes the planes kernel
    ],
    ids=str,
)
def test_channel_stats_stable_when_mean_dwarfs_std(shape, layout):
    """c = 1000 + N(0, 1) in float32: sum(c**2)/R - mean**2 loses the variance to cancellation
    (about 0.1 off, seen); the kernels' variance is within float32 rounding of float64's."""
    c = random_tensor(shape, torch.float32, layout).add_(1000.0)
    mean, var = kernels().channel_stats(c)
    var64, mean64 = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
    tolerance = 2e-6
    naive = (c * c).mean(dim=(0, 2, 3)) - c.mean(dim=(0, 2, 3)) ** 2
    assert (naive.double() - var64).abs().max() > 100 * tolerance, "the case no longer tells stable from naive"
    assert (var.double() - var64).abs().max() < tolerance, (var, var64)
    assert (mean.double() - mean64).abs().max() < 1e-4  # half a float32 ulp at 1000 is 3e-5


def test_channel_stats_empty_batch_is_nan():
    for layout in ("nchw", "channels_last"):
        c = random_tensor((0, 4, 3, 3), torch.float32, layout)
        mean, var = kernels().channel_stats(c)
        assert mean.shape == var.shape == (4,) and mean.isnan().all() and var.isnan().all()
        ref_mean, ref_var = reference.batch_norm_stats(c)
        assert ref_mean.isnan().all() and ref_var.isnan().all()


# --------------------------------------------------------------------------------------------
# batch_norm_act_backward


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_matches_autograd_float32(activation, layout):
    shape = (2, 5, 7, 9)
    c, grad_y, weight, bias = make_case(shape, torch.float32, layout)
    got = run_backward(grad_y, c, weight, bias, activation)
    assert got[0].stride() == torch.empty_like(c).stride()
    want = autograd_oracle(grad_y, c, weight, bias, activation)[1:]
    check_backward(got, want, shape[0] * shape[2] * shape[3])


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_formula_float64(activation, layout):
    """In float64 the kernels and autograd agree to ~1e-12: the formula itself, not rounding."""
    c, grad_y, weight, bias = make_case((2, 3, 5, 6), torch.float64, layout)
    got = run_backward(grad_y, c, weight, bias, activation)
    want = autograd_oracle(grad_y, c, weight, bias, activation)[1:]
    for name, a, b in zip(("grad_c", "grad_weight", "grad_bias"), got, want):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("layout", ("nchw", "channel_slice"))
@pytest.mark.parametrize("activation", ("relu", "hardswish"))
def test_backward_without_weight_and_bias(activation, layout):
    shape = (2, 4, 5, 7)
    c, grad_y, _, _ = make_case(shape, torch.float32, layout, affine=False)
    got = run_backward(grad_y, c, None, None, activation)
    want = autograd_oracle(grad_y, c, None, None, activation)[1:]
    check_backward(got, want, shape[0] * shape[2] * shape[3])


# Half precision: SiLU only. At relu's, relu6's and hardswish's kinks the float32 z and the
# float64 oracle's z may fall on different sides for a few elements; SiLU has no kink.
@pytest.mark.parametrize("parameter_dtype", ("same", torch.float32), ids=("half-params", "float32-params"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_backward_half_precision(dtype, layout, parameter_dtype):
    """grad_c in the half dtype; its slack (harness) covers one unit of rounding, and for
    bfloat16 also the Triton 3.8 interpreter's truncating float32 -> bfloat16 conversion."""
    shape = (2, 5, 6, 7)
    parameter_dtype = dtype if parameter_dtype == "same" else parameter_dtype
    c, grad_y, weight, bias = make_case(shape, dtype, layout, parameter_dtype=parameter_dtype)
    got = run_backward(grad_y, c, weight, bias, "silu")
    assert got[0].dtype == dtype and got[0].stride() == torch.empty_like(c).stride()
    want = autograd_oracle(grad_y, c, weight, bias, "silu")[1:]
    check_backward(got, want, shape[0] * shape[2] * shape[3])


@pytest.mark.parametrize(
    "c_layout, grad_layout",
    [("channels_last", "nchw"), ("nchw", "channels_last"), ("spatial_slice", "channel_slice"), ("channels_last", "broadcast")],
)
def test_backward_with_gradient_strides_unlike_c(c_layout, grad_layout):
    shape = (2, 6, 5, 7)
    c, _, weight, bias = make_case(shape, torch.float32, c_layout)
    if grad_layout == "broadcast":  # what y.sum() sends back: stride 0 everywhere
        grad_y = torch.ones((), device=DEVICE).expand(shape)
    else:
        grad_y = random_tensor(shape, torch.float32, grad_layout)
    got = run_backward(grad_y, c, weight, bias, "relu6")
    want = autograd_oracle(grad_y, c, weight, bias, "relu6")[1:]
    check_backward(got, want, shape[0] * shape[2] * shape[3])


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((1, 1, 1, 3), "nchw"),
        ((1, 1, 1, 3), "channels_last"),  # one channel: the planes kernels, whatever the layout
        ((3, 17, 13, 13), "channels_last"),  # tails of pixel and channel blocks
        ((3, 3, 13, 13), "nchw"),
        ((1, 3, 1, 17), "nchw"),
        ((1, 3, 1, 17), "channels_last"),
        ((2, 33, 5, 1), "channels_last"),  # two channel blocks
        ((1, 70, 3, 3), "channels_last"),  # three channel blocks, two programs per pixel share
    ],
    ids=str,
)
def test_odd_shapes(shape, layout):
    pixels = shape[0] * shape[2] * shape[3]
    c, grad_y, weight, bias = make_case(shape, torch.float32, layout)
    mean, var = kernels().channel_stats(c)
    var64, mean64 = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
    assert_matches_reference("mean", mean, mean64)
    assert_matches_reference("var", var, var64, terms=pixels)
    got = run_backward(grad_y, c, weight, bias, "hardswish")
    want = autograd_oracle(grad_y, c, weight, bias, "hardswish")[1:]
    check_backward(got, want, pixels)


def test_empty_batch():
    for layout in ("nchw", "channels_last"):
        c, grad_y, weight, bias = make_case((0, 4, 3, 3), torch.float32, layout)
        mean = torch.full((4,), float("nan"))
        grad_c, grad_weight, grad_bias = run_backward(grad_y, c, weight, bias, "relu", mean, mean.clone())
        assert grad_c.shape == c.shape
        assert torch.equal(grad_weight, torch.zeros(4)) and torch.equal(grad_bias, torch.zeros(4))
        ref = reference.batch_norm_act_backward(grad_y, c, mean, mean.clone(), weight, bias, "relu")
        assert ref[0].shape == c.shape and torch.equal(ref[1], torch.zeros(4)) and torch.equal(ref[2], torch.zeros(4))


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_deterministic(layout):
    """Several programs share each channel's reduction (rows: 4 pixel shares; planes: one per
    image); the host sums their partials in a fixed order, so repeated calls agree bitwise."""
    c, grad_y, weight, bias = make_case((2, 6, 16, 16), torch.float32, layout, offset=3.0)
    first = kernels().channel_stats(c)
    second = kernels().channel_stats(c)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    mean, invstd = first[0], (first[1] + EPS).rsqrt()
    first = run_backward(grad_y, c, weight, bias, "silu", mean, invstd)
    second = run_backward(grad_y, c, weight, bias, "silu", mean, invstd)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("layout", ("channels_last", "spatial_slice"))
def test_training_unit_end_to_end(layout):
    """channel_stats -> bn_act forward (batch_norm_scale_shift) -> batch_norm_act_backward, as the fused
    unit runs them, against F.batch_norm(training=True) + activation in float64."""
    from fastconv.triton_kernels.bn_act import bn_act_forward

    shape = (2, 6, 5, 7)
    c, grad_y, weight, bias = make_case(shape, torch.float32, layout, offset=-2.0)
    with poisoned_allocations():
        mean, var = kernels().channel_stats(c)
        invstd = (var + EPS).rsqrt()
        scale, shift = reference.batch_norm_scale_shift(mean, invstd, weight, bias)
        y = bn_act_forward(c, scale, shift, ACTIVATION_CODES["silu"])
    got = run_backward(grad_y, c, weight, bias, "silu", mean, invstd)
    y64, *want = autograd_oracle(grad_y, c, weight, bias, "silu")
    assert_matches_reference("y", y, y64)
    check_backward(got, want, shape[0] * shape[2] * shape[3])


@pytest.mark.parametrize("layout", ("nchw", "channels_last", "spatial_slice"))
def test_64_bit_index_path(layout, monkeypatch):
    """Force the int64 index path (the GPU tests would need a 2**31-element tensor)."""
    monkeypatch.setattr(kernels(), "needs_64bit_index", lambda tensors, headroom: True)
    monkeypatch.setattr(importlib.import_module("fastconv.triton_kernels.bn_act"), "needs_64bit_index", lambda tensors, headroom: True)
    shape = (2, 3, 5, 6)
    c, grad_y, weight, bias = make_case(shape, torch.float32, layout, offset=100.0)
    mean, var = kernels().channel_stats(c)
    var64, mean64 = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
    assert_matches_reference("mean", mean, mean64)
    assert (var.double() - var64).abs().max() < 2e-6
    got = run_backward(grad_y, c, weight, bias, "relu", *statistics(c))
    check_backward(got, autograd_oracle(grad_y, c, weight, bias, "relu")[1:], shape[0] * shape[2] * shape[3])


# --------------------------------------------------------------------------------------------
# fastconv.reference's versions (pure torch: no interpreter)


@pytest.mark.parametrize("affine", (True, False))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_backward_matches_autograd(activation, affine):
    c, grad_y, weight, bias = make_case((3, 4, 6, 5), torch.float64, "channels_last", affine=affine)
    mean, invstd = statistics(c)
    got = reference.batch_norm_act_backward(grad_y, c, mean, invstd, weight, bias, activation)
    want = autograd_oracle(grad_y, c, weight, bias, activation)[1:]
    for name, a, b in zip(("grad_c", "grad_weight", "grad_bias"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_reference_half_precision_dtypes():
    c, grad_y, weight, bias = make_case((2, 3, 4, 4), torch.float16, "nchw")
    mean, var = reference.batch_norm_stats(c)
    assert mean.dtype == var.dtype == torch.float32
    grad_c, grad_weight, grad_bias = reference.batch_norm_act_backward(grad_y, c, mean, (var + EPS).rsqrt(), weight, bias, "silu")
    assert grad_c.dtype == torch.float16 and grad_weight.dtype == grad_bias.dtype == torch.float32
