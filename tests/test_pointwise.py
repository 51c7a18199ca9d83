"""fastconv.pointwise_conv2d: the fused 1x1 conv against eager PyTorch in float64."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv.activations import apply_activation
from fastconv.ops import pointwise as pointwise_ops
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

BACKENDS = backends_under_test(pointwise_ops.FORWARD)


def make(shape, out_channels, dtype=torch.float32, layout="channels_last", *, bias=True, epilogue=False,
         residual=False, prologue=False, requires_grad=True):  # fmt: skip
    n, c, h, w = shape
    parameter_dtype = wide(dtype)
    t = {"x": random_tensor(shape, dtype, layout)}
    t["weight"] = (torch.randn(out_channels, c, 1, 1, device=DEVICE) / max(c, 1) ** 0.5).to(dtype)
    if bias:
        t["bias"] = torch.randn(out_channels, device=DEVICE).to(dtype)
    if epilogue:
        t["scale"] = (torch.randn(out_channels, device=DEVICE) * 0.5 + 1).to(parameter_dtype)
        t["shift"] = torch.randn(out_channels, device=DEVICE).to(parameter_dtype)
    if residual:
        t["residual"] = random_tensor((n, out_channels, h, w), dtype, layout)
    if prologue:
        t["in_scale"] = (torch.randn(c, device=DEVICE) * 0.5 + 1).to(parameter_dtype)
        t["in_shift"] = torch.randn(c, device=DEVICE).to(parameter_dtype)
    for tensor in t.values():
        tensor.requires_grad_(requires_grad)
    return t


def call(t, activation=None, after=False, in_activation=None, out=None):
    return fastconv.pointwise_conv2d(
        t["x"], t["weight"], t.get("bias"), scale=t.get("scale"), shift=t.get("shift"), activation=activation,
        residual=t.get("residual"), activation_after_residual=after, in_scale=t.get("in_scale"),
        in_shift=t.get("in_shift"), in_activation=in_activation, out=out,
    )  # fmt: skip


def plain_pytorch(t, activation=None, after=False, in_activation=None):
    """Eager PyTorch in the tensors' own dtype: BN -> act -> conv -> BN -> act (+ residual)."""
    x = t["x"]
    view = (1, -1, 1, 1)
    if "in_scale" in t:
        x = x * t["in_scale"].to(x.dtype).view(view) + t["in_shift"].to(x.dtype).view(view)
    if in_activation:
        x = apply_activation(x, in_activation)
    y = F.conv2d(x, t["weight"], t.get("bias"))
    if "scale" in t:
        y = y * t["scale"].to(y.dtype).view(view) + t["shift"].to(y.dtype).view(view)
    if "residual" in t and after:
        return apply_activation(y + t["residual"], activation)
    y = apply_activation(y, activation)
    return y + t["residual"] if "residual" in t else y


def check(t, y, grads, grad_y, lowp, **options):
    wide = {name: tensor.detach().double().requires_grad_(True) for name, tensor in t.items()}
    y64 = plain_pytorch(wide, **options)
    grads64 = torch.autograd.grad(y64, list(wide.values()), grad_y.double())
    yardstick = plain_pytorch(t, **options) if lowp else None
    grads_lowp = torch.autograd.grad(yardstick, list(t.values()), grad_y) if lowp else [None] * len(t)
    n, c_in, h, w = t["x"].shape
    c_out = t["weight"].shape[0]
    # How many terms each element sums: a pixel's channels (y, grad_x), or all pixels.
    terms = {"x": c_out, "residual": 1}
    assert_matches_reference("y", y, y64, yardstick, terms=c_in)
    for name, got, want, lowp_grad in zip(t, grads, grads64, grads_lowp):
        assert_matches_reference(f"grad_{name}", got, want, lowp_grad, terms=terms.get(name, n * h * w))


def run(backend, t, lowp=False, **options):
    with poisoned_allocations():
        y = run_backend(backend, call, t, **options)
        grad_y = torch.randn_like(y)
        grads = run_backend(backend, torch.autograd.grad, y, list(t.values()), grad_y)
    check(t, y, grads, grad_y, lowp, **options)
    return y


SHAPES = [
    ((2, 3, 7, 7), 16),
    ((1, 17, 13, 13), 3),
    ((2, 16, 1, 1), 17),
    ((1, 96, 7, 7), 160),
    ((1, 1, 13, 7), 1),
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice", "spatial_slice"])
@pytest.mark.parametrize("shape, out_channels", SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_conv_matches_float64(backend, shape, out_channels, layout):
    y = run(backend, make(shape, out_channels, layout=layout))
    expected_format = torch.channels_last if shape[1] > 1 and layout in ("channels_last", "channel_slice") else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected_format)


@pytest.mark.parametrize(
    "options",
    [
        dict(epilogue=True, activation="relu6"),
        dict(epilogue=True, residual=True, activation=None),
        dict(epilogue=True, residual=True, activation="relu", after=True),
        dict(residual=True, activation="silu"),
        dict(prologue=True, in_activation="relu"),
        dict(prologue=True, in_activation="relu", epilogue=True, activation="hardswish"),
        dict(prologue=True, epilogue=True, residual=True, activation="relu6", in_activation="silu", after=True),
    ],
    ids=["bn-relu6", "bn-residual", "bn-add-relu", "residual-silu", "prologue", "prologue-epilogue", "everything"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_prologue_and_epilogue_match_float64(backend, options):
    flags = {k: options.pop(k) for k in ("epilogue", "residual", "prologue") if k in options}
    run(backend, make((2, 17, 7, 9), 24, **flags), **options)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_within_twice_pytorch_error(backend, dtype):
    skip_interpreted_bf16_dot(backend, dtype)
    # A smooth activation: see test_depthwise.py on kinks in half precision. 96 and 64
    # channels keep the per-channel gradients' maxima stable statistics.
    run(backend, make((2, 96, 7, 7), 64, dtype, epilogue=True, prologue=True), lowp=True, activation="silu", in_activation="silu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_zero(backend):
    t = make((0, 4, 5, 5), 6, epilogue=True)
    y = run_backend(backend, call, t, activation="relu")
    assert y.shape == (0, 6, 5, 5)
    grads = run_backend(backend, torch.autograd.grad, y.sum(), list(t.values()))
    assert all(g.shape == v.shape and (g.numel() == 0 or not g.any()) for g, v in zip(grads, t.values()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_writes_a_channel_slice_and_nothing_else(backend):
    """DenseNet: the conv output lands in its slice of the concatenation buffer, in place."""
    buffer = torch.randn(2, 40, 7, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
    before = buffer.clone()
    t = make((2, 24, 7, 7), 8, requires_grad=False, prologue=True)
    x = buffer[:, :24]
    x.copy_(t["x"])
    before[:, :24] = t["x"]
    t["x"] = x
    out = buffer[:, 30:38]
    result = run_backend(backend, call, t, in_activation="relu", out=out)
    assert result is out
    expected = plain_pytorch({k: v.double() for k, v in t.items()}, in_activation="relu")
    assert_matches_reference("out", buffer[:, 30:38], expected)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[30:38] = False
    assert torch.equal(buffer[:, untouched], before[:, untouched]), "out= wrote outside its slice"


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "cuda"])
def test_gradcheck_float64(backend):
    t = make((1, 3, 3, 4), 4, torch.float64, epilogue=True, residual=True, prologue=True)
    names = list(t)

    def function(*values):
        return call(dict(zip(names, values)), activation="hardswish", after=True, in_activation="silu")

    with on_backend(backend):
        assert torch.autograd.gradcheck(function, tuple(t.values()), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "cuda"])
def test_float64_shift_without_scale_keeps_float64_gradients(backend):
    """A folded BatchNorm passes its shift alone; its backward once made that shift float32,
    and float64 gradients came out 1e-7 off (relative)."""
    t = make((1, 4, 3, 5), 6, torch.float64, epilogue=True)
    x, weight, shift = t["x"].requires_grad_(), t["weight"].requires_grad_(), t["shift"].requires_grad_()
    with on_backend(backend):
        y = fastconv.pointwise_conv2d(x, weight, shift=shift, activation="silu")
    grads = torch.autograd.grad(y.square().sum(), (x, weight, shift))
    expected = torch.nn.functional.silu(torch.nn.functional.conv2d(x, weight) + shift.view(1, -1, 1, 1))
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (x, weight, shift))):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    t = make((2, 5, 3, 4), 6, epilogue=True, residual=True, prologue=True)
    args = (t["x"], t["weight"], t["bias"], t["scale"], t["shift"], "relu", t["residual"], True, t["in_scale"], t["in_shift"], "relu6")
    # The cuda GEMM runs float32 on TF32 tensor cores only: allow it for this registration check.
    tf32 = torch.backends.cudnn.flags(enabled=True, allow_tf32=True) if backend == "cuda" else contextlib.nullcontext()
    with on_backend(backend), tf32:
        torch.library.opcheck(torch.ops.fastconv.pointwise_conv2d.default, args)
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        out = torch.empty(2, 6, 3, 4, device=DEVICE)
        torch.library.opcheck(torch.ops.fastconv.pointwise_conv2d_out.default, detached + (out,))
        grad_c = torch.randn(2, 6, 3, 4, device=DEVICE)
        torch.library.opcheck(
            torch.ops.fastconv.pointwise_conv2d_backward_weight.default, (grad_c, detached[0], detached[8], detached[9], "relu6")
        )


def test_compile_fullgraph_matches_eager():
    t = make((2, 8, 5, 5), 12, epilogue=True, residual=True)

    def block(t):
        return call(t, activation="relu", after=True) * 2

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(t)
    grads = torch.autograd.grad(y.sum(), list(t.values()))
    y_eager = block(t)
    torch.testing.assert_close(y, y_eager)
    for got, want in zip(grads, torch.autograd.grad(y_eager.sum(), list(t.values()))):
        torch.testing.assert_close(got, want)


# Bad input: each error names the argument, the expected and the actual value.


def bad(**changes):
    t = {"x": torch.randn(2, 4, 5, 5), "weight": torch.randn(6, 4, 1, 1)}
    t.update(changes)
    x, weight = t.pop("x"), t.pop("weight")
    return lambda: fastconv.pointwise_conv2d(x, weight, **t)


@pytest.mark.parametrize(
    "function, pattern",
    [
        (bad(weight=torch.randn(6, 4, 3, 3)), r"weight must have shape \(C_out, C_in, 1, 1\) for a 1x1 conv; got \(6, 4, 3, 3\)"),
        (bad(weight=torch.randn(6, 5, 1, 1)), r"weight.shape\[1\] must equal x's 4 input channels; got 5"),
        (bad(weight=torch.randn(6, 4, 1, 1).half()), r"weight must have x's dtype torch.float32; got torch.float16"),
        (bad(bias=torch.randn(4)), r"bias must have shape \(6,\); got \(4,\)"),
        (bad(scale=torch.randn(4)), r"scale must have shape \(6,\), one value per output channel; got \(4,\)"),
        (bad(in_scale=torch.randn(6)), r"in_scale must have shape \(4,\), one value per input channel; got \(6,\)"),
        (bad(residual=torch.randn(2, 4, 5, 5)), r"residual must have shape \(2, 6, 5, 5\); got \(2, 4, 5, 5\)"),
        (bad(residual=torch.randn(2, 6, 5, 5, device="meta")), r"residual must be on x's device cpu; got meta"),
        (bad(out=torch.empty(2, 6, 5, 4)), r"out must have shape \(2, 6, 5, 5\); got \(2, 6, 5, 4\)"),
        (bad(out=torch.empty(2, 6, 5, 5, dtype=torch.float64)), r"out must have x's dtype torch.float32; got torch.float64"),
        (bad(in_activation="tanh"), r"in_activation must be one of .*; got 'tanh'"),
        (bad(x=torch.randn(4, 5, 5)), r"x must be a 4-D tensor \(N, C, H, W\); got 3-D"),
    ],
    ids=["not-1x1", "channels", "dtype", "bias", "scale", "in_scale", "residual", "residual-device", "out-shape", "out-dtype", "in-activation", "x-rank"],
)
def test_bad_input_is_named(function, pattern):
    with pytest.raises(ValueError, match=pattern):
        function()


def test_out_overlapping_the_input_is_refused():
    buffer = torch.randn(2, 10, 5, 5).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, 6, 1, 1)
    with pytest.raises(ValueError, match="out must not overlap x"):
        fastconv.pointwise_conv2d(buffer[:, :6], weight, out=buffer[:, 4:8])
    fastconv.pointwise_conv2d(buffer[:, :6], weight, out=buffer[:, 6:10])  # adjacent slices are fine
    with pytest.raises(ValueError, match="out= is not differentiable"):
        fastconv.pointwise_conv2d(buffer[:, :6], weight.requires_grad_(), out=buffer[:, 6:10])
    expanded = torch.zeros(2, 4, 1, 1).expand(2, 4, 5, 5)  # 25 pixels share each address
    with pytest.raises(ValueError, match=r"out must not be an expanded view .* strides \(4, 1, 0, 0\)"):
        fastconv.pointwise_conv2d(buffer[:, :6], weight.detach(), out=expanded)
