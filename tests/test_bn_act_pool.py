"""fastconv::bn_act_avg_pool, avg_pool2d(act(x * scale + shift), 2) in one pass (DenseNet's
transition in eval): against float64 on every layout, odd sizes (the pool floors), half
precision within twice PyTorch's error, batch 0, poisoned outputs, bad input, opcheck, and its
use by fastconv.nn.Transition in eval."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.densenet import _Transition

import fastconv
from fastconv import reference
from fastconv.benchmarks.traffic import bytes_by_op, count_bytes
from harness import DEVICE, LAYOUTS, assert_matches_reference, on_backend, poisoned_allocations, random_tensor

BACKENDS = ["torch", "triton"]


def _reference(x, scale, shift, activation):
    return F.avg_pool2d(reference.bn_act(x.double(), scale.double(), shift.double(), activation), 2)


@pytest.mark.parametrize("activation", ["relu", "relu6", None])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64(backend, layout, activation):
    x = random_tensor((2, 13, 9, 7), torch.float32, layout)
    scale, shift = torch.rand(13, device=DEVICE) + 0.5, torch.randn(13, device=DEVICE)
    with poisoned_allocations(), on_backend(backend):
        y = fastconv.bn_act_avg_pool(x, scale, shift, activation)
    assert y.shape == (2, 13, 4, 3)
    assert y.is_contiguous(memory_format=torch.channels_last) == (x.stride(1) == 1)
    assert_matches_reference("y", y, _reference(x, scale, shift, activation), terms=4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_within_twice_pytorch_s_error(backend, dtype):
    x = random_tensor((2, 24, 8, 8), dtype, "channels_last")
    scale, shift = torch.rand(24, device=DEVICE) + 0.5, torch.randn(24, device=DEVICE)
    with on_backend(backend):
        y = fastconv.bn_act_avg_pool(x, scale, shift, "relu")
    yard = F.avg_pool2d(F.relu(x * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1)), 2)
    assert y.dtype == dtype
    assert_matches_reference("y", y, _reference(x, scale, shift, "relu"), yard, terms=4)


def test_batch_zero_and_bad_input():
    scale, shift = torch.ones(4), torch.zeros(4)
    assert fastconv.bn_act_avg_pool(torch.randn(0, 4, 6, 6), scale, shift).shape == (0, 4, 3, 3)
    with pytest.raises(ValueError, match=r"x must be at least 2x2 for a 2x2 pool; got \(1, 6\)"):
        fastconv.bn_act_avg_pool(torch.randn(1, 4, 1, 6), scale, shift)
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\)"):
        fastconv.bn_act_avg_pool(torch.randn(1, 4, 6, 6), torch.ones(5), shift)
    with pytest.raises(ValueError, match=r"activation"):
        fastconv.bn_act_avg_pool(torch.randn(1, 4, 6, 6), scale, shift, "gelu")
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"inference-only"):
        fastconv.bn_act_avg_pool(x, scale, shift).sum().backward()


def test_opcheck():
    x = random_tensor((2, 6, 5, 7), torch.float32, "channels_last")
    with fastconv.use_backend("torch"):
        torch.library.opcheck(torch.ops.fastconv.bn_act_avg_pool.default, (x, torch.rand(6) + 0.5, torch.randn(6), "relu"),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_transition_in_eval_pools_before_its_conv(backend):
    """torchvision's _Transition in eval against fastconv's: without gradients the one-pass BN,
    ReLU and pool then the conv on a quarter of the pixels; with gradients (eval fine-tuning) the
    prologue path, differentiable."""
    transition = _Transition(12, 6)
    with torch.no_grad():
        bn = transition.norm
        bn.running_mean.normal_(0, 0.3), bn.running_var.uniform_(0.5, 1.5), bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.3)
    transition.to(DEVICE).eval()
    fused = fastconv.nn.Transition.from_torchvision(copy.deepcopy(transition)).eval()
    x = random_tensor((2, 12, 9, 7), torch.float32, "channels_last")
    with torch.no_grad(), on_backend(backend):
        y = fused(x)
        ops = bytes_by_op(count_bytes(lambda: fused(x)))
    assert "fastconv::bn_act_avg_pool" in ops and "aten::avg_pool2d" not in ops
    torch.testing.assert_close(y, transition(x), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    with on_backend(backend):
        y = fused(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(transition(x).sum(), x)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)
