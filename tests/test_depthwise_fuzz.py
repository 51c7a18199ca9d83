"""depthwise_conv2d on random geometry, drawn by hypothesis: kernel, stride, dilation, any
four paddings, depth multiplier, layout and batch, including the awkward corners."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fastconv
from fastconv._geometry import output_size
from harness import (
    DEVICE,
    FUZZ_LAYOUTS,
    assert_matches_reference,
    backends_under_test,
    poisoned_allocations,
    random_tensor,
    run_backend,
    seeded,
)

FUZZ_BACKENDS = [p for p in backends_under_test() if p.values[0] != "cuda" or torch.cuda.is_available()]


@st.composite
def convolutions(draw):
    shape = (draw(st.integers(0, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = tuple(draw(st.integers(0, 3)) for _ in range(4))
    assume(min(output_size(shape[2:], kernel, stride, padding, dilation)) >= 1)
    return shape, kernel, stride, padding, dilation, draw(st.integers(1, 3)), draw(st.sampled_from(FUZZ_LAYOUTS))


@pytest.mark.parametrize("backend", FUZZ_BACKENDS)
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    convolution=convolutions(),
    activation=st.sampled_from([None, "relu6", "silu"]),
    epilogue=st.booleans(),
)
def test_random_geometry_matches_float64(backend, seed, convolution, activation, epilogue):
    seeded(seed)
    shape, kernel, stride, padding, dilation, multiplier, layout = convolution
    out_channels = shape[1] * multiplier
    x = random_tensor(shape, torch.float32, layout).requires_grad_(True)
    weight = torch.randn(out_channels, 1, *kernel, device=DEVICE, requires_grad=True)
    bias = torch.randn(out_channels, device=DEVICE, requires_grad=True)
    scale = (torch.randn(out_channels, device=DEVICE) + 1).requires_grad_(True) if epilogue else None
    shift = torch.randn(out_channels, device=DEVICE, requires_grad=True) if epilogue else None
    tensors = [t for t in (x, weight, bias, scale, shift) if t is not None]
    geometry = (stride, padding, dilation)
    with poisoned_allocations():
        y = run_backend(backend, torch.ops.fastconv.depthwise_conv2d, x, weight, bias, *geometry, scale, shift, activation)
        grad_y = torch.randn_like(y)
        grads = run_backend(backend, torch.autograd.grad, y, tensors, grad_y)
    wide = [t.detach().double().requires_grad_(True) for t in tensors]
    wide_scale, wide_shift = (wide[3], wide[4]) if epilogue else (None, None)
    y64 = fastconv.reference.depthwise_conv2d(wide[0], wide[1], wide[2], *geometry, wide_scale, wide_shift, activation)
    assert_matches_reference("y", y, y64)
    # The parameter gradients are sums over pixels whose terms may cancel: bound the terms'
    # size by |grad_y| * act' (<= 1.5) * |scale| * the largest |conv output| or |x| they multiply.
    largest = lambda t: t.detach().abs().max().item() if t is not None and t.numel() else 0.0  # noqa: E731
    conv_bound = kernel[0] * kernel[1] * largest(weight) * largest(x) + largest(bias) + largest(x)
    per_channel = grad_y.abs().sum((0, 2, 3)).max().item() if y.numel() else 0.0
    reduction = per_channel * 1.5 * max(1.0, largest(scale)) * max(1.0, conv_bound)
    for i, (got, want) in enumerate(zip(grads, torch.autograd.grad(y64, wide, grad_y.double()))):
        assert_matches_reference(f"grad {i}", got, want, magnitude=None if i == 0 else reduction)
