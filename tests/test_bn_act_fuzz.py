"""bn_act on arbitrary strided views, drawn by hypothesis: any memory order, offsets, steps,
expanded (stride-0) dimensions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastconv
from fastconv.activations import ACTIVATION_CODES
from fuzzing import strided_views
from harness import DEVICE, assert_matches_reference, backends_under_test, poisoned_allocations, run_backend, seeded


FUZZ_BACKENDS = [p for p in backends_under_test() if p.values[0] != "cuda" or torch.cuda.is_available()]


@pytest.mark.parametrize("backend", FUZZ_BACKENDS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), view=strided_views(), activation=st.sampled_from(list(ACTIVATION_CODES)))
def test_any_strided_view_matches_float64(backend, seed, view, activation):
    seeded(seed)
    x = view()
    channels = x.shape[1]
    x = x.requires_grad_(True)
    scale = (torch.randn(channels, device=DEVICE) + 1).requires_grad_(True)
    shift = torch.randn(channels, device=DEVICE).requires_grad_(True)
    with poisoned_allocations():
        y = run_backend(backend, fastconv.bn_act, x, scale, shift, activation)
        # The gradient arrives in a layout of its own: transposed storage, as after a permute.
        grad_y = torch.randn(tuple(reversed(y.shape)), device=DEVICE).permute(3, 2, 1, 0)
        grads = run_backend(backend, torch.autograd.grad, y, (x, scale, shift), grad_y)
    x64, scale64, shift64 = (t.detach().double().requires_grad_(True) for t in (x, scale, shift))
    y64 = fastconv.reference.bn_act(x64, scale64, shift64, activation)
    assert_matches_reference("y", y, y64)
    grads64 = torch.autograd.grad(y64, (x64, scale64, shift64), grad_y.double())
    # The parameter gradients sum grad_y * act'(z) (* x) over pixels; act' is at most 1.5.
    terms = 1.5 * grad_y.abs().double() * torch.stack([x64.detach().abs(), torch.ones_like(x64)])
    sums = [None, terms[0].sum((0, 2, 3)).max().item(), terms[1].sum((0, 2, 3)).max().item()] if x.numel() else [None] * 3
    for name, got, want, magnitude in zip(("grad_x", "grad_scale", "grad_shift"), grads, grads64, sums):
        assert_matches_reference(name, got, want, magnitude=magnitude)
