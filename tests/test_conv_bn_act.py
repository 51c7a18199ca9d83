"""fastconv.conv2d_bn_act and its ops against eager PyTorch in float64.

The functional routes to the depthwise, pointwise or implicit-GEMM kernel; every route is
checked here through the public function, and the implicit GEMM's own ops (with and without
the batch-statistics epilogue) directly.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastconv
from fastconv import reference
from fastconv._geometry import normalise_geometry
from fastconv.ops import batch_norm as batch_norm_ops
from fastconv.ops import conv_bn_act as conv_ops
from fastconv.ops.conv_bn_act import route
from harness import (
    DEVICE,
    assert_matches_reference,
    backends_under_test,
    on_backend,
    poisoned_allocations,
    random_tensor,
    run_backend,
    skip_interpreted_bf16_dot,
    wide,
)

BACKENDS = backends_under_test(conv_ops.FORWARD)

# (x shape, C_out, kernel, stride, padding, dilation, groups): the odd geometries of real CNNs.
CASES = {
    "stem-3x3-s2-odd": ((2, 3, 11, 9), 8, (3, 3), 2, 1, 1, 1),
    "inception-1x7": ((1, 8, 7, 9), 6, (1, 7), 1, (0, 3), 1, 1),
    "inception-7x1": ((1, 8, 9, 7), 6, (7, 1), 1, (3, 0), 1, 1),
    "5x5-dilated-groups2": ((1, 4, 11, 10), 6, (5, 5), 1, 4, 2, 2),
    "even-same-groups4": ((2, 8, 6, 5), 12, (2, 2), 1, "same", 1, 4),
    "7x7-s2-stem": ((1, 3, 13, 13), 4, (7, 7), 2, 3, 1, 1),
    "valid-3x3": ((2, 5, 5, 6), 3, (3, 3), 1, "valid", 1, 1),
    "depthwise-route": ((1, 6, 7, 7), 6, (3, 3), 2, 1, 1, 6),
    "pointwise-route": ((2, 5, 4, 3), 7, (1, 1), 1, 0, 1, 1),
}


def make(case, dtype=torch.float32, layout="channels_last", *, bias=True, epilogue=True, requires_grad=True):
    """Inputs for a case: a name in CASES or a tuple laid out as CASES' values."""
    shape, out_channels, kernel, stride, padding, dilation, groups = CASES[case] if isinstance(case, str) else case
    parameter_dtype = wide(dtype)
    fan_in = shape[1] // groups * kernel[0] * kernel[1]
    t = {"x": random_tensor(shape, dtype, layout)}
    t["weight"] = (torch.randn(out_channels, shape[1] // groups, *kernel, device=DEVICE) / fan_in**0.5).to(dtype)
    if bias:
        t["bias"] = torch.randn(out_channels, device=DEVICE).to(dtype)
    if epilogue:
        t["scale"] = (torch.randn(out_channels, device=DEVICE) * 0.5 + 1).to(parameter_dtype)
        t["shift"] = torch.randn(out_channels, device=DEVICE).to(parameter_dtype)
    for tensor in t.values():
        tensor.requires_grad_(requires_grad)
    return t, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def call(t, geometry, activation=None, after=False):
    return fastconv.conv2d_bn_act(
        t["x"], t["weight"], t.get("bias"), **geometry, scale=t.get("scale"), shift=t.get("shift"), activation=activation,
        residual=t.get("residual"), activation_after_residual=after,
    )  # fmt: skip


def eager(t, geometry, activation=None, after=False):
    """F.conv2d then the epilogue (and the residual, before the activation when `after`), in the
    tensors' own dtype: the oracle in float64, and the yardstick of what plain PyTorch gets in
    half precision."""
    y = torch.nn.functional.conv2d(t["x"], t["weight"], t.get("bias"), geometry["stride"], geometry["padding"],
                                   geometry["dilation"], geometry["groups"])  # fmt: skip
    view = (1, -1, 1, 1)
    if "scale" in t:
        y = y * t["scale"].to(y.dtype).view(view) + t["shift"].to(y.dtype).view(view)
    if "residual" in t and after:
        return fastconv.activations.apply_activation(y + t["residual"], activation)
    y = fastconv.activations.apply_activation(y, activation)
    return y + t["residual"] if "residual" in t else y


def check(t, geometry, y, grads, grad_y, lowp, activation, after=False):
    wide = {name: tensor.detach().double().requires_grad_(True) for name, tensor in t.items()}
    y64 = eager(wide, geometry, activation, after)
    grads64 = torch.autograd.grad(y64, list(wide.values()), grad_y.double())
    yardstick = eager(t, geometry, activation, after) if lowp else None
    grads_lowp = torch.autograd.grad(yardstick, list(t.values()), grad_y) if lowp else [None] * len(t)
    weight = t["weight"]
    taps = weight.shape[1] * weight.shape[2] * weight.shape[3]
    pixels = y.shape[0] * y.shape[2] * y.shape[3]
    terms = {"x": weight.shape[0] * weight.shape[2] * weight.shape[3]}
    assert_matches_reference("y", y, y64, yardstick, terms=taps)
    for name, got, want, lowp_grad in zip(t, grads, grads64, grads_lowp):
        assert_matches_reference(f"grad_{name}", got, want, lowp_grad, terms=terms.get(name, pixels))


def run(backend, t, geometry, lowp=False, activation="relu6", after=False):
    with poisoned_allocations():
        y = run_backend(backend, call, t, geometry, activation, after)
        grad_y = torch.randn_like(y)
        grads = run_backend(backend, torch.autograd.grad, y, list(t.values()), grad_y)
    check(t, geometry, y, grads, grad_y, lowp, activation, after)
    return y


def with_residual(t, geometry, layout="channel_slice", requires_grad=True):
    """t with a random residual of the output's shape (by default a channel slice: its own strides)."""
    with torch.no_grad():
        shape = eager(t, geometry).shape
    t["residual"] = random_tensor(shape, t["x"].dtype, layout).requires_grad_(requires_grad)
    return t


def test_routes():
    assert route(6, (6, 1, 3, 3), (2, 2), (1, 1, 1, 1), 6) == "depthwise"
    assert route(6, (12, 1, 3, 3), (1, 1), (1, 1, 1, 1), 6) == "depthwise"  # depth multiplier 2
    assert route(5, (7, 5, 1, 1), (1, 1), (0, 0, 0, 0), 1) == "pointwise"
    assert route(5, (7, 5, 1, 1), (2, 2), (0, 0, 0, 0), 1) == "gemm"  # strided 1x1: a gather
    assert route(1, (4, 1, 3, 3), (1, 1), (1, 1, 1, 1), 1) == "gemm"  # one channel: a dense conv
    assert route(8, (8, 4, 3, 3), (1, 1), (1, 1, 1, 1), 2) == "gemm"


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64(backend, case, layout):
    t, geometry = make(case, layout=layout)
    y = run(backend, t, geometry)
    expected_format = torch.channels_last if layout != "nchw" else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected_format)


@pytest.mark.parametrize("activation", [None, "relu", "silu", "hardswish"])
@pytest.mark.parametrize("bias, epilogue", [(False, False), (True, False), (False, True)], ids=["plain", "bias", "bn"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_epilogue(backend, bias, epilogue, activation):
    t, geometry = make("stem-3x3-s2-odd", bias=bias, epilogue=epilogue)
    run(backend, t, geometry, activation=activation)


@pytest.mark.parametrize("layout", ["nchw", "channel_slice"])
@pytest.mark.parametrize("activation", ["relu", "silu", None])
@pytest.mark.parametrize("after", [True, False], ids=["act-after-residual", "residual-after-act"])
@pytest.mark.parametrize("case", ["stem-3x3-s2-odd", "7x7-s2-stem", "depthwise-route", "pointwise-route"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_epilogue(backend, case, after, activation, layout):
    """ResNet's BasicBlock ends relu(bn(conv3x3) + identity): the residual added before the
    activation (or after it, MobileNet's order), its gradient too, on every route; the
    residual in its own layout (a channel slice, or NCHW under channels_last x)."""
    t, geometry = make(case)
    run(backend, with_residual(t, geometry, layout), geometry, activation=activation, after=after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_backward_keeps_the_output_not_the_residual(backend):
    """relu(z + r): the backward takes relu's derivative from y, so it keeps y and not r (nor
    the sum, which is never formed)."""
    t, geometry = make("stem-3x3-s2-odd")
    t = with_residual(t, geometry)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: kept.append(v) or v, lambda v: v):
        y = run_backend(backend, call, t, geometry, "relu", True)
    assert any(v is y or v.data_ptr() == y.data_ptr() for v in kept)
    assert not any(v.data_ptr() == t["residual"].data_ptr() for v in kept)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_within_twice_pytorch_error(backend, dtype):
    skip_interpreted_bf16_dot(backend, dtype)
    # SiLU, not a kinked activation: half-precision rounding flips a kink's derivative at random
    # elements (see test_depthwise.py). 48 input channels keep the statistics of the maxima stable.
    # grad_scale (a bf16 sum of 50 cancelling terms a channel) is the noisy one: the emulated cuda
    # path's largest error against eager bf16's was 0.5x at the median and 1.42x / 1.52x at worst
    # over 60 draws each with 32 / 64 output channels, yet one draw (CI's, 32 channels) reached
    # 2.05x; 64 channels give the yardstick's maximum more samples.
    t, geometry = make(((2, 48, 9, 9), 64, (3, 3), 2, 1, 1, 2), dtype)
    run(backend, t, geometry, lowp=True, activation="silu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_zero(backend):
    t, geometry = make("stem-3x3-s2-odd")
    t["x"] = t["x"].detach()[:0].requires_grad_(True)
    y = run_backend(backend, call, t, geometry, "relu")
    assert y.shape == (0, 8, 6, 5)
    grads = run_backend(backend, torch.autograd.grad, y.sum(), list(t.values()))
    assert all(g.shape == v.shape and (g.numel() == 0 or not g.any()) for g, v in zip(grads, t.values()))


@pytest.mark.parametrize("case", ["5x5-dilated-groups2", "depthwise-route", "pointwise-route"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_statistics_of_the_stored_output(backend, case):
    """conv2d_batch_stats: c, and the mean and biased variance of c as stored, per channel, from
    each route's kernel."""
    t, geometry = make(case, torch.float16, bias=True, epilogue=False, requires_grad=False)
    # A large bias: the statistics must not lose the spread to cancellation (|mean| >> std).
    t["bias"] = (t["bias"] * 0 + 100).to(torch.float16)
    stride, padding, dilation = normalise_geometry(tuple(t["weight"].shape[2:]), geometry["stride"], geometry["padding"], geometry["dilation"])
    with poisoned_allocations():
        c, mean, var = run_backend(
            backend, torch.ops.fastconv.conv2d_batch_stats, t["x"], t["weight"], t["bias"], stride, padding, dilation,
            geometry["groups"],
        )  # fmt: skip
    channels = t["weight"].shape[0]
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (channels,)
    expected_var, expected_mean = torch.var_mean(c.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-4, atol=1e-6)
    expected_c = eager({k: v.double() for k, v in t.items()}, geometry)
    assert_matches_reference("c", c, expected_c, eager(t, geometry), terms=t["weight"][0].numel())


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "cuda"])
def test_gradcheck_float64(backend):
    t, geometry = make(((1, 4, 5, 4), 4, (3, 2), 2, (1, 0), 1, 2), torch.float64)
    names = list(t)

    def function(*values):
        return call(dict(zip(names, values)), geometry, "silu")

    with on_backend(backend):
        assert torch.autograd.gradcheck(function, tuple(t.values()), fast_mode=backend == "triton")


@pytest.mark.parametrize("after", [True, False], ids=["act-after-residual", "residual-after-act"])
@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "cuda"])
def test_gradcheck_float64_with_residual(backend, after):
    t, geometry = make(((1, 4, 5, 4), 4, (3, 2), 2, (1, 0), 1, 2), torch.float64)
    t = with_residual(t, geometry, "nchw")
    names = list(t)

    def function(*values):
        return call(dict(zip(names, values)), geometry, "silu", after)

    with on_backend(backend):
        assert torch.autograd.gradcheck(function, tuple(t.values()), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    t, _ = make("even-same-groups4")
    geometry = ((1, 1), (0, 0, 1, 1), (1, 1), 4)
    args = (t["x"], t["weight"], t["bias"], *geometry, t["scale"], t["shift"], "hardswish")
    # The cuda GEMM runs float32 on TF32 tensor cores only: allow it for this registration check.
    tf32 = torch.backends.cudnn.flags(enabled=True, allow_tf32=True) if backend == "cuda" else contextlib.nullcontext()
    with on_backend(backend), tf32:
        torch.library.opcheck(torch.ops.fastconv.conv2d_bn_act.default, args)
        torch.library.opcheck(torch.ops.fastconv.conv2d_batch_stats.default, args[:7])
        residual = random_tensor((2, 12, 6, 5), torch.float32, "channel_slice").requires_grad_(True)
        torch.library.opcheck(torch.ops.fastconv.conv2d_bn_act.default, args[:9] + ("relu", residual, True))


def test_compile_fullgraph_matches_eager():
    t, geometry = make("stem-3x3-s2-odd")

    def block(t):
        return call(t, geometry, "relu6") * 2

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(t)
    grads = torch.autograd.grad(y.sum(), list(t.values()))
    y_eager = block(t)
    torch.testing.assert_close(y, y_eager)
    for got, want in zip(grads, torch.autograd.grad(y_eager.sum(), list(t.values()))):
        torch.testing.assert_close(got, want)


def test_autocast_runs_in_the_autocast_dtype():
    t, geometry = make("stem-3x3-s2-odd", requires_grad=False)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = call(t, geometry, "relu")
    assert y.dtype == torch.bfloat16


def test_reference_is_f_conv2d():
    t, geometry = make("even-same-groups4", torch.float64, requires_grad=False)
    stride, padding, dilation = normalise_geometry(tuple(t["weight"].shape[2:]), 1, "same", 1)
    got = reference.conv2d(t["x"], t["weight"], t["bias"], stride, padding, dilation, 4, t["scale"], t["shift"], "relu")
    torch.testing.assert_close(got, eager(t, geometry, "relu"))


# Bad input: each error names the argument, the expected and the actual value.


def bad(**changes):
    t = {"x": torch.randn(2, 4, 6, 6), "weight": torch.randn(6, 2, 3, 3), "groups": 2}
    t.update(changes)
    x, weight = t.pop("x"), t.pop("weight")
    return lambda: fastconv.conv2d_bn_act(x, weight, **t)


@pytest.mark.parametrize(
    "function, pattern",
    [
        (bad(groups=3), r"x's channels must be divisible by groups; got in_channels=4 and groups=3"),
        (bad(weight=torch.randn(5, 2, 3, 3)), r"weight.shape\[0\] \(out_channels\) must be a positive multiple of groups=2; got 5"),
        (bad(weight=torch.randn(6, 4, 3, 3)), r"weight.shape\[1\] must be in_channels / groups = 4 / 2 = 2; got 4"),
        (bad(weight=torch.randn(6, 2, 3)), r"weight must have shape \(C_out, C_in / groups, kh, kw\); got \(6, 2, 3\)"),
        (bad(groups=0), r"groups must be an int >= 1; got 0"),
        (bad(weight=torch.randn(6, 2, 7, 7)), r"the output size must be >= 1; got \(0, 0\)"),
        (bad(weight=torch.randn(6, 2, 3, 3).half()), r"weight must have x's dtype torch.float32; got torch.float16"),
        (bad(bias=torch.randn(4)), r"bias must have shape \(6,\); got \(4,\)"),
        (bad(scale=torch.randn(4)), r"scale must have shape \(6,\), one value per output channel; got \(4,\)"),
        (bad(shift=torch.randn(6, dtype=torch.float64)), r"shift must have dtype .*; got torch.float64"),
        (bad(stride=0), r"stride must be >= 1 in each dimension; got 0"),
        (bad(padding=-1), r"padding must be >= 0 in each dimension; got -1"),
        (bad(padding="same", stride=2), r"padding='same' needs stride 1"),
        (bad(activation="gelu"), r"activation must be one of .*; got 'gelu'"),
        (bad(x=torch.randn(4, 6, 6)), r"x must be a 4-D tensor \(N, C, H, W\); got 3-D"),
        (bad(bias=torch.randn(6, device="meta")), r"bias must be on x's device cpu; got meta"),
        (bad(residual=torch.randn(2, 6, 6, 6)), r"residual must have the output's shape \(2, 6, 4, 4\); got \(2, 6, 6, 6\)"),
        (bad(residual=torch.randn(2, 6, 4, 4).half()), r"residual must have x's dtype torch.float32; got torch.float16"),
        (bad(groups=6, x=torch.randn(2, 6, 6, 6), weight=torch.randn(6, 1, 3, 3), residual=torch.randn(2, 6, 6, 4)),
         r"residual must have the output's shape \(2, 6, 4, 4\); got \(2, 6, 6, 4\)"),
    ],
    ids=["groups-channels", "groups-out", "weight-in", "weight-rank", "groups-zero", "too-small", "dtype", "bias",
         "scale", "shift-dtype", "stride", "padding", "same-stride", "activation", "x-rank", "device", "residual-shape",
         "residual-dtype", "depthwise-residual-shape"],  # fmt: skip
)
def test_bad_input_is_named(function, pattern):
    with pytest.raises(ValueError, match=pattern):
        function()


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv2d_out_refuses_an_expanded_out(backend):
    """An expanded out (stride 0) would take several pixels' results at one address, in a race:
    refused by name, as PyTorch's out= ops do (the Triton kernel once stored into it silently)."""
    x, weight = random_tensor((2, 4, 6, 6)), torch.randn(6, 4, 3, 3, device=DEVICE)
    out = torch.zeros(2, 6, 1, 1, device=DEVICE).expand(2, 6, 6, 6)
    with pytest.raises(ValueError, match=r"out must not be an expanded view .* strides \(6, 1, 0, 0\)"):
        run_backend(backend, torch.ops.fastconv.conv2d_out, x, weight, (1, 1), (1, 1, 1, 1), (1, 1), 1, False, out)


@pytest.mark.parametrize("backend", backends_under_test(batch_norm_ops.BACKWARD))
def test_training_batch_norm_ops_opcheck(backend):
    c = random_tensor((2, 6, 5, 4), torch.float32, "channels_last")
    mean, var = torch.ops.fastconv.batch_norm_stats(c)
    invstd = torch.rsqrt(var + 1e-5)
    weight, bias = torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)
    with on_backend(backend):
        torch.library.opcheck(torch.ops.fastconv.batch_norm_stats.default, (c,))
        torch.library.opcheck(
            torch.ops.fastconv.batch_norm_act.default,
            (c.requires_grad_(), mean, invstd, weight.requires_grad_(), bias.requires_grad_(), "relu6"),
        )
        torch.library.opcheck(
            torch.ops.fastconv.batch_norm_act_backward.default,
            (torch.randn_like(c), c.detach(), mean, invstd, weight.detach(), None, "silu"),
        )


@pytest.mark.parametrize(
    "args, pattern",
    [
        ((torch.randn(2, 3, 4, 4), torch.zeros(3, dtype=torch.float64), torch.ones(3), None, None, None),
         r"mean must have dtype torch.float32 \(the statistics' precision\); got torch.float64"),
        ((torch.randn(2, 3, 4, 4), torch.zeros(4), torch.ones(3), None, None, None), r"mean must have shape \(3,\); got \(4,\)"),
        ((torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3), torch.ones(2), None, None),
         r"weight must have shape \(3,\), one value per channel of c; got \(2,\)"),
    ],
    ids=["mean-dtype", "mean-shape", "weight-shape"],
)
def test_training_batch_norm_bad_input_is_named(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        torch.ops.fastconv.batch_norm_act(*args)
