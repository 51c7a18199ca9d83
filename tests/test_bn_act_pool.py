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
from fastconv.ops import bn_act_pool as pool_ops
from harness import (
    DEVICE,
    LAYOUTS,
    assert_matches_reference,
    backends_under_test,
    on_backend,
    poisoned_allocations,
    random_tensor,
)

BACKENDS = backends_under_test(pool_ops.FORWARD)
FLOAT64_BACKENDS = [p for p in BACKENDS if p.values[0] != "cuda"]  # the CUDA kernels take no float64


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


# Training: fastconv::batch_norm_act_avg_pool, the same pass with batch statistics ---------------


def training_reference(c, weight, bias, activation):
    """avg_pool2d(act(batch_norm(c))) in training mode, the statistics inside autograd's graph."""
    y = F.batch_norm(c, None, None, weight, bias, training=True, eps=1e-5)
    return F.avg_pool2d(fastconv.activations.apply_activation(y, activation), 2)


def train_inputs(shape, dtype, layout, affine=True):
    c = random_tensor(shape, dtype, layout, scale=2.0)
    channels = shape[1]
    weight = (torch.rand(channels, device=DEVICE) + 0.5).to(dtype) if affine else None
    bias = torch.randn(channels, device=DEVICE).to(dtype) if affine else None
    return c, weight, bias


def run_training(backend, c, weight, bias, activation):
    """(y, grads of c, weight, bias) from the op, the statistics from fastconv::batch_norm_stats."""
    leaves = [t.requires_grad_(True) for t in (c, weight, bias) if t is not None]
    with poisoned_allocations(), on_backend(backend):
        mean, var = torch.ops.fastconv.batch_norm_stats(c.detach())
        y = torch.ops.fastconv.batch_norm_act_avg_pool(c, mean, torch.rsqrt(var + 1e-5), weight, bias, activation)
        grad_y = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, grad_y)
    return y, grads, grad_y, leaves


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("activation", ["relu", None])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_matches_float64_batch_norm(backend, layout, activation, affine):
    """Odd sizes (the pool floors: the last row and column get no gradient but the statistics'),
    every layout, with and without the affine parameters."""
    c, weight, bias = train_inputs((3, 10, 9, 7), torch.float32, layout, affine)
    y, grads, grad_y, leaves = run_training(backend, c, weight, bias, activation)
    wide = [t.detach().double().requires_grad_(True) for t in leaves]
    y64 = training_reference(wide[0], *(wide[1:] if affine else (None, None)), activation)
    assert y.shape == (3, 10, 4, 3)
    assert_matches_reference("y", y, y64, terms=4)
    for name, got, want in zip(("c", "weight", "bias"), grads, torch.autograd.grad(y64, wide, grad_y.double())):
        assert_matches_reference(f"grad_{name}", got, want, terms=3 * 9 * 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_half_precision_within_twice_pytorch_s_error(backend):
    # SiLU: no kink whose derivative half-precision rounding could flip at random elements.
    c, weight, bias = train_inputs((4, 16, 8, 10), torch.float16, "channels_last")
    y, grads, grad_y, leaves = run_training(backend, c, weight, bias, "silu")
    wide = [t.detach().double().requires_grad_(True) for t in leaves]
    y64 = training_reference(*wide, "silu")
    # PyTorch's own half-precision training BatchNorm (float32 inside, as on a GPU).
    half = [t.detach().requires_grad_(True) for t in leaves]
    yardstick = training_reference(half[0].float(), half[1].float(), half[2].float(), "silu").half()
    assert_matches_reference("y", y, y64, yardstick, terms=4)
    want = torch.autograd.grad(y64, wide, grad_y.double())
    lowp = torch.autograd.grad(yardstick, half, grad_y)
    for name, got, w, p in zip(("c", "weight", "bias"), grads, want, lowp):
        assert_matches_reference(f"grad_{name}", got, w, p, terms=4 * 8 * 10)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_training_gradcheck_float64(backend):
    c, weight, bias = train_inputs((2, 3, 5, 4), torch.float64, "channels_last")

    def function(c, weight, bias):
        # The statistics inside the function: gradcheck perturbs c, and they must follow it.
        mean, var = torch.ops.fastconv.batch_norm_stats(c.detach())
        return torch.ops.fastconv.batch_norm_act_avg_pool(c, mean, torch.rsqrt(var + 1e-5), weight, bias, "silu")

    inputs = tuple(t.requires_grad_(True) for t in (c, weight, bias))
    with on_backend(backend):
        assert torch.autograd.gradcheck(function, inputs, fast_mode=backend == "triton")


def test_training_opcheck_and_bad_input():
    c, weight, bias = train_inputs((2, 6, 5, 7), torch.float32, "channels_last")
    mean, var = torch.ops.fastconv.batch_norm_stats(c)
    invstd = torch.rsqrt(var + 1e-5)
    with fastconv.use_backend("torch"):
        torch.library.opcheck(torch.ops.fastconv.batch_norm_act_avg_pool.default,
                              (c.requires_grad_(), mean, invstd, weight.requires_grad_(), bias, "relu"))  # fmt: skip
    op = torch.ops.fastconv.batch_norm_act_avg_pool
    with pytest.raises(ValueError, match=r"c must be at least 2x2 for a 2x2 pool; got \(1, 7\)"):
        op(c.detach()[:, :, :1], mean, invstd, weight, bias, "relu")
    with pytest.raises(ValueError, match=r"mean must have dtype torch.float32 .*; got torch.float64"):
        op(c.detach(), mean.double(), invstd, weight, bias, "relu")
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        op(c.detach(), mean, invstd, weight[:5], bias, "relu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_transition_in_training_pools_in_the_batch_norm_pass(backend):
    """torchvision's _Transition in training against fastconv's: one pass for BN, ReLU and pool
    (no aten avg_pool2d, no full-resolution activation written), the same output, gradients and
    running statistics; odd sizes."""
    torch.manual_seed(0)
    transition = _Transition(12, 6).to(DEVICE).train()
    fused = fastconv.nn.Transition.from_torchvision(copy.deepcopy(transition)).train()
    counted = copy.deepcopy(fused)
    x = random_tensor((3, 12, 9, 7), torch.float32, "channels_last").requires_grad_(True)
    with on_backend(backend):
        y = fused(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *fused.parameters()])
        ops = bytes_by_op(count_bytes(lambda: counted(x.detach())))
    assert "fastconv::batch_norm_act_avg_pool" in ops and "aten::avg_pool2d" not in ops
    want = transition(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, torch.autograd.grad(want.square().sum(), [x, *transition.parameters()])):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    fused_buffers = dict(fused.named_buffers())
    for name, buffer in transition.named_buffers():
        torch.testing.assert_close(fused_buffers[name], buffer, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
