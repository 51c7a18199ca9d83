"""Paths of the Triton bn_act kernels that ordinary shapes do not reach."""

from __future__ import annotations

import importlib

import pytest
import torch

import fastconv
from harness import LAYOUTS, assert_matches_reference, backends_under_test, on_backend, random_tensor

TRITON = [p for p in backends_under_test() if p.values[0] == "triton"]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_64_bit_index_path(backend, layout, monkeypatch):
    """Tensors past 2**31 elements take the int64 index path; run it on a small tensor by
    forcing the flag (the GPU tests run a real 2**31-element tensor)."""
    kernels = importlib.import_module("fastconv.triton_kernels.bn_act")
    monkeypatch.setattr(kernels, "needs_64bit_index", lambda tensors, headroom: True)
    x = random_tensor((2, 5, 6, 7), torch.float32, layout, scale=3.0).requires_grad_(True)
    scale = torch.randn(5, device=x.device, requires_grad=True)
    shift = torch.randn(5, device=x.device, requires_grad=True)
    with on_backend(backend):
        y = fastconv.bn_act(x, scale, shift, "silu")
        grads = torch.autograd.grad(y.sum(), (x, scale, shift))
    x64, s64, b64 = (t.detach().double().requires_grad_(True) for t in (x, scale, shift))
    y64 = fastconv.reference.bn_act(x64, s64, b64, "silu")
    assert_matches_reference("y", y, y64)
    for name, got, want in zip(("grad_x", "grad_scale", "grad_shift"), grads, torch.autograd.grad(y64.sum(), (x64, s64, b64))):
        assert_matches_reference(name, got, want)


def test_merged_stride():
    from fastconv.triton_kernels._indexing import merged_stride

    assert merged_stride((2, 3, 4), (12, 4, 1)) == 1  # contiguous
    assert merged_stride((2, 3, 4), (96, 32, 8)) == 8  # channels_last pixels, 8 channels
    assert merged_stride((2, 1, 4), (32, 5, 8)) == 8  # a size-1 dim takes any stride
    assert merged_stride((2, 3, 4), (12, 5, 1)) is None  # a crop: rows do not follow on
    assert merged_stride((1, 1, 1), (7, 7, 7)) == 1
