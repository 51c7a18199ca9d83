"""Training-mode BatchNorm + activation, as the second half of a fused conv -> BN -> act unit.

    mean, var = fastconv::batch_norm_stats(c)        (or the conv epilogue's statistics)
    y = fastconv::batch_norm_act(c, mean, invstd, weight, bias, activation)
      = act((c - mean) * invstd * weight + bias)

The forward is bn_act's kernel with scale = weight * invstd and shift = bias - mean * scale:
one read of c and one write of y. Its backward, fastconv::batch_norm_act_backward, is the
whole training-mode gradient, through the activation, the affine and the batch statistics:

    g = grad_y * act'(z);  Sg = sum g;  Sgx = sum g * (c - mean)          (one reduction pass)
    grad_c = weight * invstd * (g - Sg / R - (c - mean) * invstd^2 * Sgx / R)   (one elementwise pass)

so it reads grad_y and c twice and writes grad_c once, where eager PyTorch's activation backward
then BatchNorm backward read and write the activation-sized tensors about eight times.

`mean` and `invstd` must be the batch statistics of `c` itself: the backward differentiates
through them, so they take no gradient of their own.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastconv import reference
from fastconv._affine import batch_norm_scale_shift
from fastconv._geometry import accumulate_dtype
from fastconv._validation import check_channel_vector, check_same_device, check_shape, fail
from fastconv.activations import activation_code
from fastconv.backends import OpImplementations, get_backend, use_backend
from fastconv.ops._common import call_key, check_activation_input, check_writable, contiguous_vectors, refuse_float64


def _wide(c: torch.Tensor) -> torch.dtype:
    return accumulate_dtype(c.dtype)


def check_batch_norm_arguments(c, mean, invstd, weight, bias, activation) -> None:
    """c, its batch statistics and the affine parameters, as the training BatchNorm's ops take
    them; shared with batch_norm_act_avg_pool (DenseNet's transition, bn_act_pool.py)."""
    check_activation_input(c, "c")
    channels = c.shape[1]
    for name, stats in (("mean", mean), ("invstd", invstd)):
        check_same_device(name, stats, "c", c)
        check_shape(stats, name, (channels,))
        if stats.dtype != _wide(c):
            fail(f"{name} must have dtype {_wide(c)} (the statistics' precision); got {stats.dtype}")
    check_channel_vector(weight, "weight", channels, c, per="channel of c")
    check_channel_vector(bias, "bias", channels, c, per="channel of c")
    activation_code(activation)


# Backend implementations --------------------------------------------------------------------


def _stats_torch(*, c):
    mean, var = reference.batch_norm_stats(c)
    return mean.to(_wide(c)), var.to(_wide(c))


def _stats_triton(*, c):
    from fastconv.triton_kernels.batch_norm import channel_stats

    return channel_stats(c)


def _stats_cuda(*, c):
    return tuple(torch.ops.fastconv_cuda.batch_norm_stats(c))


def _backward_torch(*, grad_y, c, mean, invstd, weight, bias, activation):
    grad_c, grad_weight, grad_bias = reference.batch_norm_act_backward(grad_y, c, mean, invstd, weight, bias, activation)
    like_c = torch.empty_like(c)
    grad_c = grad_c if grad_c.stride() == like_c.stride() else like_c.copy_(grad_c)
    return grad_c, grad_weight.to(_wide(c)), grad_bias.to(_wide(c))


def _backward_triton(*, grad_y, c, mean, invstd, weight, bias, activation):
    from fastconv.triton_kernels.batch_norm import batch_norm_act_backward

    weight, bias, mean, invstd = contiguous_vectors(weight, bias, mean, invstd)
    return batch_norm_act_backward(grad_y, c, mean, invstd, weight, bias, activation_code(activation))


def _backward_cuda(*, grad_y, c, mean, invstd, weight, bias, activation):
    code = activation_code(activation)
    return tuple(torch.ops.fastconv_cuda.batch_norm_act_backward(grad_y, c, mean, invstd, weight, bias, code))


def _accumulate_torch(*, grad_y, c, mean, invstd, weight, bias, activation, grad_c):
    grad, grad_weight, grad_bias = reference.batch_norm_act_backward(grad_y, c, mean, invstd, weight, bias, activation)
    grad_c.add_(grad.to(grad_c.dtype))
    return grad_weight.to(_wide(c)), grad_bias.to(_wide(c))


def _accumulate_triton(*, grad_y, c, mean, invstd, weight, bias, activation, grad_c):
    from fastconv.triton_kernels.batch_norm import batch_norm_act_backward

    weight, bias, mean, invstd = contiguous_vectors(weight, bias, mean, invstd)
    _, grad_weight, grad_bias = batch_norm_act_backward(
        grad_y, c, mean, invstd, weight, bias, activation_code(activation), accumulate_into=grad_c
    )
    return grad_weight, grad_bias


def _accumulate_cuda(*, grad_y, c, mean, invstd, weight, bias, activation, grad_c):
    # The grad-input pass adds into grad_c in its own store, as Triton's ACCUMULATE variant.
    code = activation_code(activation)
    return tuple(torch.ops.fastconv_cuda.batch_norm_act_backward_accumulate(
        grad_y, c, mean, invstd, weight, bias, code, grad_c))  # fmt: skip


STATS = OpImplementations("batch_norm_stats")
STATS.register("cuda", _stats_cuda, refuse_float64("c"))
STATS.register("triton", _stats_triton)
STATS.register("torch", _stats_torch)

BACKWARD = OpImplementations("batch_norm_act_backward")
BACKWARD.register("cuda", _backward_cuda, refuse_float64("c"))
BACKWARD.register("triton", _backward_triton)
BACKWARD.register("torch", _backward_torch)

ACCUMULATE = OpImplementations("batch_norm_act_backward_accumulate", accumulates=("grad_c",))
ACCUMULATE.register("cuda", _accumulate_cuda, refuse_float64("c"))
ACCUMULATE.register("triton", _accumulate_triton)
ACCUMULATE.register("torch", _accumulate_torch)


# Registered ops -------------------------------------------------------------------------------


@torch.library.custom_op("fastconv::batch_norm_stats", mutates_args=())
def batch_norm_stats_op(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of c over (N, H, W), in float32 (float64 for
    float64 c); deterministic, and stable when |mean| >> std. NaN for an empty batch."""
    check_activation_input(c, "c")
    if c.shape[0] * c.shape[2] * c.shape[3] == 0:
        nan = torch.full((c.shape[1],), float("nan"), dtype=_wide(c), device=c.device)
        return nan, nan.clone()
    return STATS(c.device, call_key(c), c=c)


@batch_norm_stats_op.register_fake
def _(c):
    check_activation_input(c, "c")
    return c.new_empty(c.shape[1], dtype=_wide(c)), c.new_empty(c.shape[1], dtype=_wide(c))


@torch.library.custom_op("fastconv::batch_norm_act", mutates_args=())
def batch_norm_act_op(
    c: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    activation: Optional[str],
) -> torch.Tensor:
    check_batch_norm_arguments(c, mean, invstd, weight, bias, activation)
    scale, shift = batch_norm_scale_shift(mean, invstd, weight, bias)
    if c.dtype != torch.float64:
        scale, shift = scale.float(), shift.float()
    return torch.ops.fastconv.bn_act(c, scale, shift, activation)


@batch_norm_act_op.register_fake
def _(c, mean, invstd, weight, bias, activation):
    check_batch_norm_arguments(c, mean, invstd, weight, bias, activation)
    return torch.empty_like(c)


@torch.library.custom_op("fastconv::batch_norm_act_backward", mutates_args=())
def batch_norm_act_backward_op(
    grad_y: torch.Tensor,
    c: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    activation: Optional[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_c, grad_weight, grad_bias); the parameter grads in the statistics' precision."""
    check_batch_norm_arguments(c, mean, invstd, weight, bias, activation)
    check_same_device("grad_y", grad_y, "c", c)
    check_shape(grad_y, "grad_y", c.shape)
    if grad_y.dtype != c.dtype:
        fail(f"grad_y must have c's dtype {c.dtype}; got {grad_y.dtype}")
    if c.numel() == 0:
        zeros = torch.zeros(c.shape[1], dtype=_wide(c), device=c.device)
        return torch.empty_like(c), zeros, zeros.clone()
    return BACKWARD(
        c.device, call_key(grad_y, c, weight, bias, activation),
        grad_y=grad_y, c=c, mean=mean, invstd=invstd, weight=weight, bias=bias, activation=activation,
    )  # fmt: skip


@batch_norm_act_backward_op.register_fake
def _(grad_y, c, mean, invstd, weight, bias, activation):
    check_batch_norm_arguments(c, mean, invstd, weight, bias, activation)
    wide = _wide(c)
    return torch.empty_like(c), c.new_empty(c.shape[1], dtype=wide), c.new_empty(c.shape[1], dtype=wide)


@torch.library.custom_op("fastconv::batch_norm_act_backward_accumulate", mutates_args=("grad_c",))
def batch_norm_act_backward_accumulate_op(
    grad_y: torch.Tensor,
    c: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    activation: Optional[str],
    grad_c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_norm_act_backward whose grad_c is added into the given `grad_c` (c's shape and
    dtype, any strides: a channel slice of a dense block's gradient buffer) in the same pass;
    returns (grad_weight, grad_bias). Deterministic: no atomics, each element written once."""
    _check_accumulate(grad_y, c, mean, invstd, weight, bias, activation, grad_c)
    if c.numel() == 0:
        zeros = torch.zeros(c.shape[1], dtype=_wide(c), device=c.device)
        return zeros, zeros.clone()
    return ACCUMULATE(
        c.device, call_key(grad_y, c, weight, bias, activation, grad_c),
        grad_y=grad_y, c=c, mean=mean, invstd=invstd, weight=weight, bias=bias, activation=activation, grad_c=grad_c,
    )  # fmt: skip


def _check_accumulate(grad_y, c, mean, invstd, weight, bias, activation, grad_c) -> None:
    check_batch_norm_arguments(c, mean, invstd, weight, bias, activation)
    for name, t in (("grad_y", grad_y), ("grad_c", grad_c)):
        check_same_device(name, t, "c", c)
        check_shape(t, name, c.shape)
        if t.dtype != c.dtype:
            fail(f"{name} must have c's dtype {c.dtype}; got {t.dtype}")
    check_writable("grad_c", grad_c)


@batch_norm_act_backward_accumulate_op.register_fake
def _(grad_y, c, mean, invstd, weight, bias, activation, grad_c):
    _check_accumulate(grad_y, c, mean, invstd, weight, bias, activation, grad_c)
    wide = _wide(c)
    return c.new_empty(c.shape[1], dtype=wide), c.new_empty(c.shape[1], dtype=wide)


def _setup_context(ctx, inputs, output) -> None:
    c, mean, invstd, weight, bias, activation = inputs
    ctx.save_for_backward(c, mean, invstd, weight, bias)
    ctx.activation = activation
    ctx.backend = get_backend()  # autograd's CUDA worker thread does not see use_backend()


def _backward(ctx, grad_y):
    c, mean, invstd, weight, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    with use_backend(ctx.backend):
        grad_c, grad_weight, grad_bias = torch.ops.fastconv.batch_norm_act_backward(
            grad_y, c, mean, invstd, weight, bias, ctx.activation
        )
    return (
        grad_c if needs[0] else None,
        None,  # mean and invstd: their effect is already in grad_c
        None,
        grad_weight.to(weight.dtype) if needs[3] else None,
        grad_bias.to(bias.dtype) if needs[4] else None,
        None,
    )


batch_norm_act_op.register_autograd(_backward, setup_context=_setup_context)
