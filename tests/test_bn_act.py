"""fastconv.bn_act on every backend that can run here: values, gradients, registration, errors."""

from __future__ import annotations

import pytest
import torch

import fastconv
from fastconv.activations import ACTIVATION_CODES, apply_activation
from harness import (
    DEVICE,
    DTYPES,
    LAYOUTS,
    assert_matches_reference,
    backends_under_test,
    on_backend,
    poisoned_allocations,
    random_tensor,
    run_backend,
)

ACTIVATIONS = list(ACTIVATION_CODES)
BACKENDS = backends_under_test()


def make_inputs(shape, dtype, layout, parameter_dtype=None, requires_grad=False):
    channels = shape[1]
    parameter_dtype = parameter_dtype or dtype
    # Scales around 1 and shifts around 0 put z on both sides of every activation's kinks.
    x = random_tensor(shape, dtype, layout, scale=3.0)
    scale = (torch.randn(channels, device=DEVICE) * 0.5 + 1).to(parameter_dtype)
    shift = torch.randn(channels, device=DEVICE).to(parameter_dtype)
    for tensor in (x, scale, shift):
        tensor.requires_grad_(requires_grad)
    return x, scale, shift


def plain_pytorch(x, scale, shift, activation):
    """What a user writes in eager PyTorch, in the input's own dtype: the oracle's yardstick."""
    view = (1, -1, 1, 1)
    return apply_activation(x * scale.to(x.dtype).view(view) + shift.to(x.dtype).view(view), activation)


def float64(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_match_float64(backend, dtype, layout, activation):
    x, scale, shift = make_inputs((2, 5, 7, 9), dtype, layout, requires_grad=True)
    with poisoned_allocations():
        y = run_backend(backend, fastconv.bn_act, x, scale, shift, activation)
        grad_y = torch.randn_like(y)
        grads = run_backend(backend, torch.autograd.grad, y, (x, scale, shift), grad_y)

    assert y.dtype == dtype and y.stride() == torch.empty_like(x).stride()
    x64, scale64, shift64 = float64(x, scale, shift)
    y64 = plain_pytorch(x64, scale64, shift64, activation)
    grads64 = torch.autograd.grad(y64, (x64, scale64, shift64), grad_y.double())
    y_lowp = plain_pytorch(x, scale, shift, activation)
    grads_lowp = torch.autograd.grad(y_lowp, (x, scale, shift), grad_y)
    lowp = dtype != torch.float32
    assert_matches_reference("y", y, y64, y_lowp if lowp else None)
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    for name, got, want, yardstick in zip(("grad_x", "grad_scale", "grad_shift"), grads, grads64, grads_lowp):
        assert_matches_reference(name, got, want, yardstick if lowp else None, terms=1 if name == "grad_x" else pixels)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 17, 13, 13), (1, 3, 1, 17), (2, 33, 5, 1)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes(backend, shape):
    for layout in ("nchw", "channels_last"):
        x, scale, shift = make_inputs(shape, torch.float32, layout, requires_grad=True)
        with poisoned_allocations():
            y = run_backend(backend, fastconv.bn_act, x, scale, shift, "relu6")
            grads = run_backend(backend, torch.autograd.grad, y.sum(), (x, scale, shift))
        x64, scale64, shift64 = float64(x, scale, shift)
        y64 = plain_pytorch(x64, scale64, shift64, "relu6")
        assert_matches_reference("y", y, y64)
        # y.sum() sends a broadcast gradient (stride 0 everywhere) into the backward kernels.
        pixels = shape[0] * shape[2] * shape[3]
        for name, got, want in zip(("grad_x", "grad_scale", "grad_shift"), grads, torch.autograd.grad(y64.sum(), (x64, scale64, shift64))):
            assert_matches_reference(name, got, want, terms=1 if name == "grad_x" else pixels)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_parameters_with_half_input(backend, dtype):
    """BatchNorm under autocast keeps float32 parameters beside half activations."""
    x, scale, shift = make_inputs((2, 6, 5, 5), dtype, "channels_last", parameter_dtype=torch.float32, requires_grad=True)
    y = run_backend(backend, fastconv.bn_act, x, scale, shift, "silu")
    grad_x, grad_scale, grad_shift = run_backend(backend, torch.autograd.grad, y.float().sum(), (x, scale, shift))
    assert y.dtype == dtype and grad_x.dtype == dtype
    assert grad_scale.dtype == torch.float32 and grad_shift.dtype == torch.float32
    x64, scale64, shift64 = float64(x, scale, shift)
    y64 = plain_pytorch(x64, scale64, shift64, "silu")
    assert_matches_reference("y", y, y64, plain_pytorch(x, scale, shift, "silu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_zero(backend):
    x, scale, shift = make_inputs((0, 4, 3, 3), torch.float32, "channels_last", requires_grad=True)
    y = run_backend(backend, fastconv.bn_act, x, scale, shift, "relu")
    assert y.shape == (0, 4, 3, 3)
    grad_x, grad_scale, grad_shift = run_backend(backend, torch.autograd.grad, y.sum(), (x, scale, shift), allow_unused=True)
    assert grad_x.shape == x.shape
    assert torch.equal(grad_scale, torch.zeros_like(scale)) and torch.equal(grad_shift, torch.zeros_like(shift))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kinks_and_nan_follow_pytorch(backend):
    """At relu's 0, relu6's 0 and 6 and hardswish's -3 and 3, values and gradients are exactly
    PyTorch's (its backward kernels pick a side at each kink); a NaN input gives a NaN output.

    NaN *gradients* are left out: PyTorch's own differ between its scalar and vector kernels
    (relu6's is 1 on a 1-D tensor and 0 on a 4-D one, in torch 2.14 on the CPU)."""
    kinks = torch.tensor([-3.0, 0.0, 3.0, 6.0, -1.0, 7.0], device=DEVICE)
    x = kinks.view(1, 1, 2, 3).repeat(2, 3, 1, 1).requires_grad_(True)
    scale = torch.ones(3, device=DEVICE, requires_grad=True)
    shift = torch.zeros(3, device=DEVICE, requires_grad=True)
    for activation in ACTIVATIONS:
        y = run_backend(backend, fastconv.bn_act, x, scale, shift, activation)
        expected = plain_pytorch(x, scale, shift, activation)
        torch.testing.assert_close(y, expected)
        grads = run_backend(backend, torch.autograd.grad, y.sum(), (x, scale, shift))
        for got, want in zip(grads, torch.autograd.grad(expected.sum(), (x, scale, shift))):
            torch.testing.assert_close(got, want)
        with torch.no_grad():
            y_nan = run_backend(backend, fastconv.bn_act, x.detach() * float("nan"), scale, shift, activation)
        assert y_nan.isnan().all(), f"{activation}: a NaN input must give a NaN output"


# Gradients and registration, in float64 where the backend takes it (torch, and triton).
GRADCHECK_BACKENDS = [p for p in BACKENDS if p.values[0] != "cuda"]


@pytest.mark.parametrize("layout", ("nchw", "channel_slice"))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_gradcheck_float64(backend, activation, layout):
    x, scale, shift = make_inputs((2, 3, 3, 4), torch.float64, layout, requires_grad=True)
    with on_backend(backend):
        # fast_mode checks random projections of the Jacobian: far fewer kernel launches,
        # which matters at 20 ms per program in the Triton interpreter.
        assert torch.autograd.gradcheck(
            lambda x, s, b: fastconv.bn_act(x, s, b, activation), (x, scale, shift), fast_mode=backend == "triton"
        )


def opcheck_samples():
    samples = []
    for layout, activation, dtype in (
        ("nchw", None, torch.float32),
        ("channels_last", "relu6", torch.float32),
        ("channel_slice", "silu", torch.float16),
        ("spatial_slice", "hardswish", torch.float32),
    ):
        for requires_grad in (False, True):
            x, scale, shift = make_inputs((2, 4, 3, 5), dtype, layout, requires_grad=requires_grad)
            samples.append(pytest.param((x, scale, shift, activation), id=f"{layout}-{activation}-{requires_grad}"))
    return samples


@pytest.mark.parametrize("sample", opcheck_samples())
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, sample):
    with on_backend(backend):
        torch.library.opcheck(torch.ops.fastconv.bn_act.default, sample)
        x, scale, shift, activation = sample
        grad_y = torch.randn_like(x).detach()
        backward_args = (grad_y, x.detach(), scale.detach(), shift.detach(), activation)
        torch.library.opcheck(torch.ops.fastconv.bn_act_backward.default, backward_args)


def test_compile_fullgraph_matches_eager():
    """The op traces without graph breaks, forward and backward, and gives eager's values."""

    def block(x, scale, shift):
        return fastconv.bn_act(x, scale, shift, "relu6") * 2

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x, scale, shift = make_inputs((2, 4, 5, 5), torch.float32, "channels_last", requires_grad=True)
    y = compiled(x, scale, shift)
    grads = torch.autograd.grad(y.sum(), (x, scale, shift))
    y_eager = block(x, scale, shift)
    grads_eager = torch.autograd.grad(y_eager.sum(), (x, scale, shift))
    torch.testing.assert_close(y, y_eager)
    for got, want in zip(grads, grads_eager):
        torch.testing.assert_close(got, want)


def test_compile_with_inductor():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, s, b: fastconv.bn_act(x, s, b, "hardswish") + 1, fullgraph=True)
    x, scale, shift = make_inputs((1, 3, 4, 4), torch.float32, "nchw")
    torch.testing.assert_close(compiled(x, scale, shift), fastconv.bn_act(x, scale, shift, "hardswish") + 1)


def test_meta_tensors_give_shapes_and_layout():
    x = torch.empty(2, 8, 5, 5, device="meta").contiguous(memory_format=torch.channels_last)
    y = fastconv.bn_act(x, torch.empty(8, device="meta"), torch.empty(8, device="meta"), "relu")
    assert y.shape == x.shape and y.device.type == "meta" and y.is_contiguous(memory_format=torch.channels_last)


# Bad input: each error names the argument, the expected and the actual value.


def good_inputs():
    return make_inputs((2, 4, 3, 3), torch.float32, "nchw")


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda x, s, b: (x[0], s, b, None), r"x must be a 4-D tensor \(N, C, H, W\); got 3-D"),
        (lambda x, s, b: (x.to(torch.int32), s, b, None), r"x must have a floating dtype .*; got torch.int32"),
        (lambda x, s, b: (x, s[:3], b, None), r"scale must have shape \(4,\), one value per channel of x; got \(3,\)"),
        (lambda x, s, b: (x, s, b.view(2, 2), None), r"shift must have shape \(4,\).*got \(2, 2\)"),
        (lambda x, s, b: (x, s.half(), b.half(), None), r"scale must have dtype torch.float32.*got torch.float16"),
        (lambda x, s, b: (x, s, b.double(), None), r"shift must have dtype torch.float32.*got torch.float64"),
        (lambda x, s, b: (x.half(), s.half(), b, None), r"shift must have scale's dtype torch.float16; got torch.float32"),
        (lambda x, s, b: (x, s.to("meta"), b, None), r"scale must be on x's device .*; got meta"),
        (lambda x, s, b: (x, s, b, "gelu"), r"activation must be one of None, 'relu', 'relu6', 'silu', 'hardswish'; got 'gelu'"),
        (lambda x, s, b: ("x", s, b, None), r"x must be a torch.Tensor; got str"),
    ],
    ids=["rank", "int-dtype", "scale-length", "shift-rank", "half-params", "double-shift", "mixed-params", "device", "activation", "not-tensor"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_named(backend, mutate, pattern):
    with on_backend(backend), pytest.raises(ValueError, match=pattern):
        fastconv.bn_act(*mutate(*good_inputs()))


def test_bad_gradient_is_named():
    x, scale, shift = good_inputs()
    with pytest.raises(ValueError, match=r"grad_y must have shape \(2, 4, 3, 3\); got \(2, 4, 3, 2\)"):
        torch.ops.fastconv.bn_act_backward(x[..., :2], x, scale, shift, None)
    with pytest.raises(ValueError, match=r"grad_y must have x's dtype torch.float32; got torch.float64"):
        torch.ops.fastconv.bn_act_backward(x.double(), x, scale, shift, None)
