"""fastconv.depthwise_conv2d on every backend that can run here, against F.conv2d in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv.activations import ACTIVATION_CODES, apply_activation
from fastconv.backends import interpreting
from harness import (
    DEVICE,
    LAYOUTS,
    assert_matches_reference,
    backends_under_test,
    on_backend,
    poisoned_allocations,
    random_tensor,
    run_backend,
    wide,
)

BACKENDS = backends_under_test()
GRADCHECK_BACKENDS = [p for p in BACKENDS if p.values[0] != "cuda"]


class Case:
    """One convolution: input shape, kernel, stride, padding (as F.conv2d takes it), dilation, m."""

    def __init__(self, shape, kernel, stride=1, padding=0, dilation=1, multiplier=1):
        self.shape, self.stride, self.padding, self.dilation, self.multiplier = shape, stride, padding, dilation, multiplier
        self.kernel = (kernel, kernel) if isinstance(kernel, int) else kernel

    def __repr__(self):
        n, c, h, w = self.shape
        return f"{n}x{c}x{h}x{w}-k{self.kernel[0]}x{self.kernel[1]}-s{self.stride}-p{self.padding}-d{self.dilation}-m{self.multiplier}"

    def inputs(self, dtype=torch.float32, layout="nchw", bias=True, epilogue=False, requires_grad=True):
        out_channels = self.shape[1] * self.multiplier
        x = random_tensor(self.shape, dtype, layout)
        weight = (torch.randn(out_channels, 1, *self.kernel, device=DEVICE) / self.kernel[0]).to(dtype)
        tensors = {"x": x, "weight": weight}
        if bias:
            tensors["bias"] = torch.randn(out_channels, device=DEVICE).to(dtype)
        if epilogue:
            # BatchNorm's parameters stay float32 beside half activations (autocast's rule).
            parameter_dtype = wide(dtype)
            tensors["scale"] = (torch.randn(out_channels, device=DEVICE) * 0.5 + 1).to(parameter_dtype)
            tensors["shift"] = torch.randn(out_channels, device=DEVICE).to(parameter_dtype)
        for tensor in tensors.values():
            tensor.requires_grad_(requires_grad)
        return tensors

    def call(self, tensors, activation=None):
        return fastconv.depthwise_conv2d(
            tensors["x"], tensors["weight"], tensors.get("bias"), self.stride, self.padding, self.dilation,
            scale=tensors.get("scale"), shift=tensors.get("shift"), activation=activation,
        )  # fmt: skip

    def plain_pytorch(self, tensors, activation=None):
        """Eager PyTorch in the tensors' own dtype: F.conv2d, then BatchNorm's affine, then act."""
        x = tensors["x"]
        y = F.conv2d(x, tensors["weight"], tensors.get("bias"), self.stride, self.padding, self.dilation, groups=x.shape[1])
        if "scale" in tensors:
            y = y * tensors["scale"].to(y.dtype).view(1, -1, 1, 1) + tensors["shift"].to(y.dtype).view(1, -1, 1, 1)
        return apply_activation(y, activation) if activation else y


CASES = [
    Case((2, 3, 7, 7), 3, padding=1),
    Case((2, 17, 13, 13), 3, stride=2, padding=1),  # stride 2 on an odd size
    Case((1, 1, 1, 1), 1),
    Case((2, 5, 13, 17), 5, padding="same"),  # non-square
    Case((1, 4, 17, 13), 7, stride=2, padding=3),
    Case((2, 3, 13, 13), (3, 5), padding="same"),
    Case((2, 3, 9, 9), (2, 2), padding="same"),  # even kernel: asymmetric padding
    Case((2, 6, 13, 13), 3, padding=2, dilation=2),
    Case((2, 3, 7, 7), 3, padding="valid", multiplier=2),
    Case((1, 96, 7, 7), 3, padding=1),
    Case((1, 960, 7, 7), 3, stride=2, padding=1),
    Case((1, 3, 56, 56), 3, stride=2, padding=1),
    Case((2, 4, 1, 7), 3, padding=1),  # H = 1
    Case((2, 5, 7, 7), (1, 3), stride=(1, 2), padding=(0, 1)),
]


def check_against_float64(case, tensors, activation, y, grads, grad_y, lowp, gradients=True):
    names = list(tensors)
    wide = {name: t.detach().double().requires_grad_(True) for name, t in tensors.items()}
    y64 = case.plain_pytorch(wide, activation)
    grads64 = torch.autograd.grad(y64, list(wide.values()), grad_y.double())
    yardstick = grads_lowp = None
    if lowp:
        yardstick = case.plain_pytorch(tensors, activation)
        grads_lowp = torch.autograd.grad(yardstick, list(tensors.values()), grad_y)
    taps = case.kernel[0] * case.kernel[1]
    pixels = y.shape[0] * y.shape[2] * y.shape[3]
    assert_matches_reference("y", y, y64, yardstick, terms=taps)
    for i, name in enumerate(names if gradients else []):
        # grad_x sums a window's taps (times the multiplier); the parameters sum every pixel.
        terms = taps * case.multiplier if name == "x" else pixels
        assert_matches_reference(f"grad_{name}", grads[i], grads64[i], grads_lowp[i] if lowp else None, terms=terms)


def run_case(backend, case, dtype, layout, activation=None, bias=True, epilogue=False, gradients=True):
    tensors = case.inputs(dtype, layout, bias=bias, epilogue=epilogue)
    with poisoned_allocations():
        y = run_backend(backend, case.call, tensors, activation)
        grad_y = torch.randn_like(y)
        grads = run_backend(backend, torch.autograd.grad, y, list(tensors.values()), grad_y)
    expected_format = torch.channels_last if tensors["x"].stride(1) == 1 and case.shape[1] > 1 else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected_format), f"output strides {y.stride()}"
    assert grads[0].shape == tensors["x"].shape and grads[0].is_contiguous(memory_format=expected_format)
    check_against_float64(case, tensors, activation, y, grads, grad_y, lowp=dtype != torch.float32, gradients=gradients)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("backend", BACKENDS)
def test_geometry_matches_float64(backend, case, layout):
    run_case(backend, case, torch.float32, layout)


# At least 64 output channels: the per-channel gradients (weight, bias, scale, shift) are then
# vectors long enough for their maximum error to be a stable statistic. With 3 channels, ours
# and PyTorch's errors are two draws of the same rounding noise, and "at most 2x" failed in
# about one run in four (seen on grad_scale, on both the torch and triton backends).
HALF_CASES = [
    Case((2, 64, 13, 13), 3, stride=2, padding=1),
    Case((2, 64, 9, 9), (2, 2), padding="same"),
    Case((2, 32, 7, 7), 3, padding="valid", multiplier=2),
    CASES[10],
]


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", HALF_CASES, ids=repr)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_within_twice_pytorch_error(backend, case, dtype):
    """SiLU, not ReLU6: a kinked activation's gradient jumps where z crosses the kink, and in
    half precision the rounded conv output puts a few z on the other side of it than float64
    does, in PyTorch's eager run and in ours, but not in the same elements. One such element
    decides the maximum error, so the 2x comparison would be a coin toss (seen: 1 run in 3).
    ReLU6's half-precision values are checked below, and its gradients in float32 and float64."""
    # Triton's CPU interpreter truncates float32 to bfloat16 instead of rounding to nearest: the
    # bias adds up in every reduction (grad_scale ran 3x PyTorch's error, seen 1 run in 3), so
    # there bfloat16 gradients wait for the GPU run and only the values are held to the oracle.
    gradients = not (backend == "triton" and dtype == torch.bfloat16 and interpreting())
    run_case(backend, case, dtype, "channels_last", activation="silu", epilogue=True, gradients=gradients)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_relu6_values(backend, dtype):
    case = CASES[1]
    tensors = case.inputs(dtype, "channels_last", epilogue=True, requires_grad=False)
    y = run_backend(backend, case.call, tensors, "relu6")
    wide = {name: t.double() for name, t in tensors.items()}
    assert_matches_reference("y", y, case.plain_pytorch(wide, "relu6"), case.plain_pytorch(tensors, "relu6"))


@pytest.mark.parametrize("bias, epilogue", [(False, False), (True, True), (False, True)], ids=["plain", "bias+bn", "bn"])
@pytest.mark.parametrize("activation", list(ACTIVATION_CODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_epilogue_matches_conv_bn_act(backend, activation, bias, epilogue):
    run_case(backend, CASES[1], torch.float32, "channels_last", activation, bias=bias, epilogue=epilogue)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_or_shift_alone(backend):
    case = CASES[0]
    for missing in ("scale", "shift"):
        tensors = case.inputs(epilogue=True)
        del tensors[missing]
        y = run_backend(backend, case.call, tensors, "silu")
        full = dict(tensors)
        full[missing] = torch.ones(3, device=DEVICE) if missing == "scale" else torch.zeros(3, device=DEVICE)
        wide = {name: t.detach().double() for name, t in full.items()}
        assert_matches_reference("y", y, case.plain_pytorch(wide, "silu"))
        grads = run_backend(backend, torch.autograd.grad, y.sum(), list(tensors.values()))
        assert all(g is not None and g.shape == t.shape for g, t in zip(grads, tensors.values()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_zero(backend):
    case = Case((0, 3, 7, 7), 3, padding=1)
    tensors = case.inputs(epilogue=True)
    y = run_backend(backend, case.call, tensors, "relu")
    assert y.shape == (0, 3, 7, 7)
    grads = run_backend(backend, torch.autograd.grad, y.sum(), list(tensors.values()))
    for grad, tensor in zip(grads, tensors.values()):
        assert grad.shape == tensor.shape and not grad.isnan().any()
        assert grad.numel() == 0 or torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[8]], ids=repr)
@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_gradcheck_float64(backend, case):
    small = Case((1, 2, 5, 6) if case.multiplier == 1 else (1, 2, 4, 5), case.kernel, case.stride, case.padding, case.dilation, case.multiplier)
    tensors = small.inputs(torch.float64, "channels_last", epilogue=True)
    names = list(tensors)

    def function(*values):
        return small.call(dict(zip(names, values)), "hardswish")

    with on_backend(backend):
        assert torch.autograd.gradcheck(function, tuple(tensors.values()), fast_mode=backend == "triton")


def opcheck_samples():
    samples = []
    for case, layout, requires_grad in ((CASES[0], "channels_last", True), (CASES[6], "nchw", False), (CASES[8], "channel_slice", True)):
        tensors = case.inputs(torch.float32, layout, epilogue=True, requires_grad=requires_grad)
        stride = fastconv._geometry.positive_pair(case.stride, "stride")
        dilation = fastconv._geometry.positive_pair(case.dilation, "dilation")
        padding = fastconv._geometry.padding_4(case.padding, case.kernel, stride, dilation)
        geometry = (stride, padding, dilation)
        samples.append(pytest.param((tensors, geometry), id=f"{case!r}-{layout}-{requires_grad}"))
    return samples


@pytest.mark.parametrize("sample", opcheck_samples())
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, sample):
    tensors, (stride, padding, dilation) = sample
    x, weight, bias, scale, shift = (tensors[k] for k in ("x", "weight", "bias", "scale", "shift"))
    with on_backend(backend):
        torch.library.opcheck(
            torch.ops.fastconv.depthwise_conv2d.default, (x, weight, bias, stride, padding, dilation, scale, shift, "relu6")
        )
        y = torch.ops.fastconv.depthwise_conv2d(x.detach(), weight.detach(), None, stride, padding, dilation, None, None, None)
        backward_args = (torch.randn_like(y), x.detach(), weight.detach(), stride, padding, dilation)
        torch.library.opcheck(torch.ops.fastconv.depthwise_conv2d_backward_input.default, backward_args)
        torch.library.opcheck(torch.ops.fastconv.depthwise_conv2d_backward_weight.default, backward_args)


def test_compile_fullgraph_matches_eager():
    case = CASES[1]
    tensors = case.inputs(torch.float32, "channels_last", epilogue=True)

    def block(t):
        return case.call(t, "relu6") + 1

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(tensors)
    grads = torch.autograd.grad(y.sum(), list(tensors.values()))
    y_eager = block(tensors)
    grads_eager = torch.autograd.grad(y_eager.sum(), list(tensors.values()))
    torch.testing.assert_close(y, y_eager)
    for got, want in zip(grads, grads_eager):
        torch.testing.assert_close(got, want)


def test_compile_with_inductor():
    torch._dynamo.reset()
    case = CASES[0]
    tensors = case.inputs(requires_grad=False)
    compiled = torch.compile(lambda t: case.call(t, "silu") * 2, fullgraph=True)
    torch.testing.assert_close(compiled(tensors), case.call(tensors, "silu") * 2)


# Bad input: each error names the argument, the expected and the actual value.


def bad_call(**changes):
    x = torch.randn(2, 4, 7, 7)
    arguments = dict(x=x, weight=torch.randn(4, 1, 3, 3), bias=None, stride=1, padding=1, dilation=1)
    arguments.update(changes)
    x, weight = arguments.pop("x"), arguments.pop("weight")
    return lambda: fastconv.depthwise_conv2d(x, weight, **arguments)


@pytest.mark.parametrize(
    "call, pattern",
    [
        (bad_call(weight=torch.randn(6, 1, 3, 3)), r"weight.shape\[0\] must be a positive multiple of x's 4 channels .*; got 6"),
        (bad_call(weight=torch.randn(4, 2, 3, 3)), r"weight must have shape \(C \* m, 1, kh, kw\) for a depthwise conv; got \(4, 2, 3, 3\)"),
        (bad_call(weight=torch.randn(4, 3, 3)), r"weight must have shape .*; got \(4, 3, 3\)"),
        (bad_call(x=torch.randn(4, 7, 7)), r"x must be a 4-D tensor \(N, C, H, W\); got 3-D"),
        (bad_call(stride=0), r"stride must be >= 1 in each dimension; got 0"),
        (bad_call(dilation=(1, 0)), r"dilation must be >= 1 in each dimension; got \(1, 0\)"),
        (bad_call(padding=-1), r"padding must be >= 0 in each dimension; got -1"),
        (bad_call(padding="full"), r"padding must be an int, a pair of ints, 'same' or 'valid'; got 'full'"),
        (bad_call(padding="same", stride=2), r"padding='same' needs stride 1, as in F.conv2d; got stride \(2, 2\)"),
        (bad_call(weight=torch.randn(4, 1, 3, 3, dtype=torch.float64)), r"weight must have x's dtype torch.float32; got torch.float64"),
        (bad_call(weight=torch.randn(4, 1, 3, 3, device="meta")), r"weight must be on x's device cpu; got meta"),
        (bad_call(bias=torch.randn(3)), r"bias must have shape \(4,\); got \(3,\)"),
        (bad_call(x=torch.randint(0, 5, (2, 4, 7, 7))), r"x must have a floating dtype .*; got torch.int64"),
        (bad_call(weight=torch.randn(4, 1, 9, 9), padding=0), r"the output size must be >= 1; got \(-1, -1\)"),
        (bad_call(stride="2"), r"stride must be an int or a pair of ints; got '2'"),
    ],
    ids=[
        "weight-channels", "weight-in-per-group", "weight-rank", "x-rank", "stride", "dilation", "padding",
        "padding-name", "same-stride", "weight-dtype", "weight-device", "bias-shape", "int-dtype", "output-size",
        "stride-type",
    ],
)
def test_bad_input_is_named(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_bad_epilogue_is_named():
    x, weight = torch.randn(1, 2, 5, 5), torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\), one value per output channel; got \(2,\)"):
        fastconv.depthwise_conv2d(x, weight, scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"shift must have dtype torch.float32 .*; got torch.float16"):
        fastconv.depthwise_conv2d(x, weight, shift=torch.ones(4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"activation must be one of .*; got 'gelu'"):
        fastconv.depthwise_conv2d(x, weight, activation="gelu")
