"""fastconv.triton_kernels.conv_bn_act, called directly: the implicit-GEMM kxk conv and its fused
epilogue and batch statistics, against F.conv2d in float64.

On the CPU these run in Triton's interpreter, which costs about 20 ms per program: the shapes are
small (an output of at most a few hundred pixels, 1 to 3 tiles of 128) but odd-sized, and chosen
so that both ways of walking K are taken: taps x channel blocks (C_in/groups >= 16; 40 channels
per group make two blocks of 32 per tap, the second with a masked tail) and the flattened
(ky, kx, c) walk of the small-channel path (the 3-channel stem; 5 channels x 5x5 = 4 K blocks).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from fastconv.activations import ACTIVATION_CODES
from fastconv.reference import conv_epilogue
from fastconv.triton_kernels.conv_bn_act import conv_bn_act_forward
from harness import assert_matches_reference, DEVICE, INTERPRETED_BF16_DOT, LAYOUTS, ON_GPU, random_tensor, wide

# (name, input shape, C_out, kernel, stride, padding (top, left, bottom, right), dilation, groups)
CASES = [
    ("3x3", (2, 20, 9, 11), 24, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ("3x3_s2_two_channel_blocks", (2, 40, 9, 11), 16, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    ("1x7", (1, 18, 8, 10), 12, (1, 7), (1, 1), (0, 3, 0, 3), (1, 1), 1),
    ("7x1", (1, 18, 10, 8), 12, (7, 1), (1, 1), (3, 0, 3, 0), (1, 1), 1),
    ("5x5_dilation_2", (2, 16, 11, 9), 20, (5, 5), (1, 1), (4, 4, 4, 4), (2, 2), 1),
    ("groups_2", (2, 40, 8, 9), 24, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),
    ("groups_4_small_c", (2, 24, 8, 7), 16, (3, 3), (1, 2), (1, 1, 1, 1), (1, 1), 4),
    ("stem", (2, 3, 15, 17), 32, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    ("small_c_5x5_four_k_blocks", (1, 5, 9, 10), 8, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 1),
    ("asymmetric_padding", (1, 17, 9, 8), 12, (2, 4), (1, 1), (0, 1, 1, 2), (1, 1), 1),
    ("mixed_stride_dilation", (1, 16, 12, 11), 10, (3, 3), (2, 1), (2, 0, 1, 3), (1, 2), 1),
]


def make(shape, c_out, kernel, groups, dtype, layout="channels_last", bias=True, scale=False, shift=False,
         vector_dtype=None):  # fmt: skip
    """x in `layout`, weight scaled so outputs stay O(1), and the per-channel vectors."""
    c = shape[1]
    t = {"x": random_tensor(shape, dtype, layout)}
    fan_in = (c // groups) * kernel[0] * kernel[1]
    t["weight"] = (torch.randn(c_out, c // groups, *kernel, device=DEVICE) / fan_in**0.5).to(dtype)
    vector_dtype = vector_dtype or dtype
    t["bias"] = torch.randn(c_out, device=DEVICE).to(dtype) if bias else None
    t["scale"] = (torch.randn(c_out, device=DEVICE) * 0.5 + 1).to(vector_dtype) if scale else None
    t["shift"] = torch.randn(c_out, device=DEVICE).to(vector_dtype) if shift else None
    return t


def reference(t, stride, padding, dilation, groups, activation=None, dtype=torch.float64):
    """F.conv2d (asymmetric padding through F.pad) then the epilogue, all in `dtype`."""
    top, left, bottom, right = padding
    cast = {name: (v.to(dtype) if v is not None else None) for name, v in t.items()}
    x = F.pad(cast["x"], (left, right, top, bottom))
    y = F.conv2d(x, cast["weight"], cast["bias"], stride, 0, dilation, groups)
    return conv_epilogue(y, cast["scale"], cast["shift"], activation)


def empty_out(shape, dtype, layout="channels_last"):
    out = torch.empty(shape, dtype=dtype, device=DEVICE)
    return out.contiguous(memory_format=torch.channels_last) if layout != "nchw" else out


def run(t, out, stride, padding, dilation, groups, activation=None, stats=False):
    return conv_bn_act_forward(
        t["x"], t["weight"], out, t["bias"], stride, padding, dilation, groups, t["scale"], t["shift"],
        ACTIVATION_CODES[activation], compute_stats=stats,
    )  # fmt: skip


def check(name, t, out, stride, padding, dilation, groups, activation=None):
    want = reference(t, stride, padding, dilation, groups, activation)
    lowp = None
    if out.dtype in (torch.float16, torch.bfloat16):
        lowp = reference(t, stride, padding, dilation, groups, activation, dtype=out.dtype)
    assert_matches_reference(name, out, want, lowp)


def check_stats(out, mean, var):
    assert mean.dtype == var.dtype == wide(out.dtype)
    want_var, want_mean = torch.var_mean(out.double(), dim=(0, 2, 3), unbiased=False)
    terms = out.shape[0] * out.shape[2] * out.shape[3]
    assert_matches_reference("mean", mean, want_mean, terms=terms)
    assert_matches_reference("var", var, want_var, terms=terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_shapes(case, dtype):
    name, shape, c_out, kernel, stride, padding, dilation, groups = case
    if dtype == torch.float64 and shape[1] // groups * kernel[0] * kernel[1] > 200:
        pytest.skip("float64 takes one rank-1 update per (tap, channel): the long-K cases cost seconds")
    t = make(shape, c_out, kernel, groups, dtype)
    if dtype == torch.float32:
        # The layout a GPU run repacks every weight to (there, with all channels innermost, the
        # kernel also takes its alignment-hinted loads); the other dtypes keep (C_out, C_in, kh, kw).
        t["weight"] = t["weight"].contiguous(memory_format=torch.channels_last)
    top, left, bottom, right = padding
    ho = (shape[2] + top + bottom - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (shape[3] + left + right - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    out = empty_out((shape[0], c_out, ho, wo), dtype)
    result, mean, var = run(t, out, stride, padding, dilation, groups)
    assert result is out and mean is None and var is None
    check(name, t, out, stride, padding, dilation, groups)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels", [20, 3], ids=["taps", "small_c"])
def test_layouts(layout, channels):
    """x in each layout, out in the matching one, weight channels_last (any strides work)."""
    t = make((2, channels, 9, 8), 12, (3, 3), 1, torch.float32, layout)
    t["weight"] = t["weight"].contiguous(memory_format=torch.channels_last)
    out = empty_out((2, 12, 5, 4), torch.float32, "nchw" if layout in ("nchw", "spatial_slice") else "channels_last")
    run(t, out, (2, 2), (1, 1, 1, 1), (1, 1), 1)
    check(layout, t, out, (2, 2), (1, 1, 1, 1), (1, 1), 1)


@pytest.mark.parametrize("out_layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("channels", [20, 3], ids=["taps", "small_c"])
def test_out_channel_slice_writes_only_its_channels(out_layout, channels):
    """out is channels 3..3+C_out of a wider NaN-filled buffer (a concat): the rest stays NaN."""
    t = make((2, channels, 7, 9), 10, (3, 3), 1, torch.float32, "channel_slice", scale=True, shift=True)
    wide = empty_out((2, 16, 7, 9), torch.float32, out_layout).fill_(float("nan"))
    out = wide[:, 3:13]
    _, mean, var = run(t, out, (1, 1), (1, 1, 1, 1), (1, 1), 1, "relu", stats=True)
    check("out", t, out, (1, 1), (1, 1, 1, 1), (1, 1), 1, "relu")
    check_stats(out, mean, var)
    assert wide[:, :3].isnan().all() and wide[:, 13:].isnan().all()


@pytest.mark.parametrize("activation", list(ACTIVATION_CODES))
@pytest.mark.parametrize("vectors", ["none", "bias", "scale_shift", "all"])
def test_epilogue(activation, vectors):
    """Each activation with each combination of bias, scale, shift; float16 with float32
    scale and shift (as BatchNorm's folded parameters arrive under autocast)."""
    bias, affine = vectors in ("bias", "all"), vectors in ("scale_shift", "all")
    for channels in (18, 4):  # one case per path
        t = make((1, channels, 7, 6), 12, (3, 3), 1, torch.float16, bias=bias, scale=affine, shift=affine,
                 vector_dtype=torch.float32)  # fmt: skip
        out = empty_out((1, 12, 7, 6), torch.float16)
        run(t, out, (1, 1), (1, 1, 1, 1), (1, 1), 1, activation)
        check(f"{activation}/{vectors}/{channels}", t, out, (1, 1), (1, 1, 1, 1), (1, 1), 1, activation)


def test_scale_without_shift_and_shift_without_scale():
    for scale, shift in ((True, False), (False, True)):
        t = make((1, 20, 6, 6), 8, (3, 3), 1, torch.float32, scale=scale, shift=shift)
        out = empty_out((1, 8, 6, 6), torch.float32)
        run(t, out, (1, 1), (1, 1, 1, 1), (1, 1), 1, "silu")
        check("out", t, out, (1, 1), (1, 1, 1, 1), (1, 1), 1, "silu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("channels, groups", [(20, 1), (3, 1), (12, 3)], ids=["taps", "small_c", "groups"])
def test_statistics(dtype, channels, groups):
    """Mean and biased variance of the stored out over 3 pixel tiles, the last one partial."""
    t = make((3, channels, 10, 10), 18, (3, 3), groups, dtype, scale=True, shift=True)
    out = empty_out((3, 18, 10, 10), dtype)
    _, mean, var = run(t, out, (1, 1), (1, 1, 1, 1), (1, 1), groups, "hardswish", stats=True)
    check("out", t, out, (1, 1), (1, 1, 1, 1), (1, 1), groups, "hardswish")
    check_stats(out, mean, var)


def test_statistics_stay_accurate_when_the_mean_dwarfs_the_spread():
    """Outputs of about 1000 +- 1: a one-pass E[x^2] - E[x]^2 in float32 loses the variance
    (float32 resolves 1e6 to about 0.06); per-tile M2 merged with Chan's formula keeps it."""
    t = make((3, 20, 10, 10), 8, (3, 3), 1, torch.float32, bias=False, shift=True)
    t["shift"] = torch.full((8,), 1000.0, device=DEVICE)
    out = empty_out((3, 8, 10, 10), torch.float32)
    _, mean, var = run(t, out, (1, 1), (1, 1, 1, 1), (1, 1), 1, stats=True)
    want_var, want_mean = torch.var_mean(out.double(), dim=(0, 2, 3), unbiased=False)
    assert 0.3 < want_var.min() and want_var.max() < 3
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-4, atol=0)
    naive = out.square().mean(dim=(0, 2, 3)) - out.mean(dim=(0, 2, 3)).square()
    assert (naive.double() - want_var).abs().max() > 10 * (var.double() - want_var).abs().max()


def test_statistics_describe_the_rounded_values():
    """float16 out: the statistics are of what was stored, not of the float32 values before."""
    t = make((2, 20, 9, 9), 8, (3, 3), 1, torch.float16, shift=True)
    t["shift"] = torch.full((8,), 300.0, device=DEVICE).half()  # float16 steps of 0.25 here
    out = empty_out((2, 8, 9, 9), torch.float16)
    _, mean, var = run(t, out, (1, 1), (1, 1, 1, 1), (1, 1), 1, stats=True)
    want_var, want_mean = torch.var_mean(out.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=0)


@pytest.mark.parametrize("stats", [False, True])
def test_empty_batch(stats):
    t = make((0, 20, 6, 6), 8, (3, 3), 1, torch.float32)
    out = empty_out((0, 8, 6, 6), torch.float32)
    result, mean, var = run(t, out, (1, 1), (1, 1, 1, 1), (1, 1), 1, stats=stats)
    assert result is out
    if stats:
        assert mean.shape == var.shape == (8,) and mean.isnan().all() and var.isnan().all()
    else:
        assert mean is None and var is None


@pytest.mark.parametrize("channels", [20, 3], ids=["taps", "small_c"])
def test_64_bit_index_path(channels, monkeypatch):
    """Tensors past 2**31 elements take the int64 path; force it on a small one (float64 too,
    for its own loop)."""
    kernels = importlib.import_module("fastconv.triton_kernels.conv_bn_act")
    monkeypatch.setattr(kernels, "needs_64bit_index", lambda tensors, headroom: True)
    for dtype in (torch.float32, torch.float64):
        t = make((2, channels, 7, 6), 8, (3, 3), 1, dtype, "nchw", scale=True, shift=True)
        out = empty_out((2, 8, 4, 3), dtype)
        _, mean, var = run(t, out, (2, 2), (1, 1, 1, 1), (1, 1), 1, "relu6", stats=True)
        check("out", t, out, (2, 2), (1, 1, 1, 1), (1, 1), 1, "relu6")
        check_stats(out, mean, var)


@pytest.mark.skipif(not ON_GPU, reason="the interpreter's tf32 is float32; on a GPU tf32 keeps 10 mantissa bits")
def test_tf32_is_close():
    t = make((2, 64, 9, 9), 64, (3, 3), 1, torch.float32)
    out = empty_out((2, 64, 9, 9), torch.float32)
    conv_bn_act_forward(t["x"], t["weight"], out, t["bias"], (1, 1), (1, 1, 1, 1), allow_tf32=True)
    want = reference(t, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-2)


@pytest.mark.skipif(not ON_GPU, reason=INTERPRETED_BF16_DOT)
@pytest.mark.parametrize("channels", [20, 3], ids=["taps", "small_c"])
def test_bfloat16(channels):
    t = make((2, channels, 9, 11), 24, (3, 3), 1, torch.bfloat16, scale=True, shift=True, vector_dtype=torch.float32)
    out = empty_out((2, 24, 5, 6), torch.bfloat16)
    _, mean, var = run(t, out, (2, 2), (1, 1, 1, 1), (1, 1), 1, "silu", stats=True)
    check("out", t, out, (2, 2), (1, 1, 1, 1), (1, 1), 1, "silu")
    check_stats(out, mean, var)


def test_inconsistent_shapes_raise():
    t = make((1, 8, 5, 5), 4, (3, 3), 1, torch.float32)
    with pytest.raises(ValueError, match="out has shape"):
        conv_bn_act_forward(t["x"], t["weight"], empty_out((1, 4, 5, 5), torch.float32))
    with pytest.raises(ValueError, match="groups"):
        conv_bn_act_forward(t["x"], t["weight"], empty_out((1, 4, 3, 3), torch.float32), groups=3)
    with pytest.raises(ValueError, match="bias"):
        conv_bn_act_forward(t["x"], t["weight"], empty_out((1, 4, 3, 3), torch.float32), bias=torch.zeros(5))
