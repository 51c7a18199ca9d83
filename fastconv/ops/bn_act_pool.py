"""fastconv::bn_act_avg_pool: y = avg_pool2d(act(x * scale[c] + shift[c]), 2), the eval-mode
BatchNorm -> activation -> 2x2 average pool of DenseNet's transition, in one pass.

The transition's 1x1 conv then runs on the pooled quarter of the pixels: pooling before a 1x1
conv is exact (both are linear, and the pool is per channel), while pooling before the ReLU is
not, hence this op. Per image pixel and input channel C, in elements moved:

    prologue-fused conv, then pool:  read x (C), write conv (C/2), pool reads it, writes C/8  -> 2.125 C
    this op, then the conv:          read x (C), write C/4; conv reads C/4, writes C/8        -> 1.625 C

and the conv's FLOPs fall 4x. DenseNet-121's three transitions (256 channels at 56², 512 at 28²,
1024 at 14²; C elements are 0.72 GB at batch 256 in fp16): 1.17 GB and 0.04 TFLOP against 1.53 GB
and 0.16 TFLOP, by this count. Unmeasured on a GPU.

The op itself has no backward (an eval Transition wanting gradients takes its prologue path).

Training: fastconv::batch_norm_act_avg_pool is the same pass with a training BatchNorm's batch
statistics, avg_pool2d(act((c - mean) * invstd * weight + bias), 2), differentiable. Its forward
is this op (scale and shift from the statistics, as batch_norm_act's); its backward spreads the
pooled gradient back over each 2x2 window (ATen's avg_pool2d_backward) and runs the training
BatchNorm's one-pass backward, which differentiates through the statistics. It keeps only c
(the dense block's buffer, kept anyway) and the statistics, where the unfused BN -> ReLU -> pool
writes the full-resolution activation and the pool reads it back: 2 C elements a pixel fewer.
Counted (benchmarks/traffic.py, batch 256, fp16): DenseNet-121's training step 78.96 -> 77.52 GB,
the 1.44 GB being 2 C at its three transitions; DenseNet-201's 111.19 -> 109.60 GB.

Backends: cuda (csrc/bn_act_pool.cu), triton (triton_kernels/bn_act_pool.py) and torch (the
reference).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastconv import reference
from fastconv._affine import batch_norm_scale_shift
from fastconv._geometry import empty_output
from fastconv._validation import check_channel_vector, check_same_dtype, fail
from fastconv.activations import activation_code
from fastconv.backends import OpImplementations
from fastconv.ops._autocast import register_autocast
from fastconv.ops._common import call_key, check_activation_input, contiguous_vectors, refuse_float64
from fastconv.ops.batch_norm import check_batch_norm_arguments


def _check(x, scale, shift, activation) -> tuple:
    check_activation_input(x)
    for name, vector in (("scale", scale), ("shift", shift)):
        if not isinstance(vector, torch.Tensor):
            fail(f"{name} must be a ({x.shape[1]},) tensor; got {type(vector).__name__}")
        check_channel_vector(vector, name, x.shape[1], x)
    check_same_dtype("shift", shift, "scale", scale)
    activation_code(activation)
    if x.shape[2] < 2 or x.shape[3] < 2:
        fail(f"x must be at least 2x2 for a 2x2 pool; got {tuple(x.shape[2:])}")
    return (x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2)


def _forward_cuda(*, x, scale, shift, activation, out):
    torch.ops.fastconv_cuda.bn_act_avg_pool(x, scale, shift, activation_code(activation), out)
    return out


def _forward_triton(*, x, scale, shift, activation, out):
    from fastconv.triton_kernels.bn_act_pool import bn_act_avg_pool

    scale, shift = contiguous_vectors(scale, shift)
    return bn_act_avg_pool(x, scale, shift, activation_code(activation), out)


def _forward_torch(*, x, scale, shift, activation, out):
    return out.copy_(F.avg_pool2d(reference.bn_act(x, scale, shift, activation), 2))


FORWARD = OpImplementations("bn_act_avg_pool")
FORWARD.register("cuda", _forward_cuda, refuse_float64("x"))
FORWARD.register("triton", _forward_triton)
FORWARD.register("torch", _forward_torch)


@torch.library.custom_op("fastconv::bn_act_avg_pool", mutates_args=())
def bn_act_avg_pool_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    out = empty_output(_check(x, scale, shift, activation), x)
    if out.numel() == 0:
        return out
    return FORWARD(x.device, call_key(x, scale, shift, activation), x=x, scale=scale, shift=shift, activation=activation,
                   out=out)  # fmt: skip


@bn_act_avg_pool_op.register_fake
def _(x, scale, shift, activation):
    return empty_output(_check(x, scale, shift, activation), x)


def _backward(ctx, grad_y):
    raise RuntimeError("fastconv: torch.ops.fastconv.bn_act_avg_pool is inference-only (no backward); "
                       "fastconv.nn.Transition takes its differentiable path when gradients are wanted")  # fmt: skip


bn_act_avg_pool_op.register_autograd(_backward, setup_context=lambda ctx, inputs, output: None)
register_autocast(bn_act_avg_pool_op, cast=("x",))


def bn_act_avg_pool(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: Optional[str] = "relu"):
    """avg_pool2d(act(x * scale + shift), 2): see the module docstring."""
    return torch.ops.fastconv.bn_act_avg_pool(x, scale, shift, activation)


# Training: the same pass with batch statistics, differentiable -----------------------------------


def _check_training(c, mean, invstd, weight, bias, activation) -> None:
    check_batch_norm_arguments(c, mean, invstd, weight, bias, activation)
    if c.shape[2] < 2 or c.shape[3] < 2:
        fail(f"c must be at least 2x2 for a 2x2 pool; got {tuple(c.shape[2:])}")


@torch.library.custom_op("fastconv::batch_norm_act_avg_pool", mutates_args=())
def batch_norm_act_avg_pool_op(
    c: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    activation: Optional[str],
) -> torch.Tensor:
    """avg_pool2d(act((c - mean) * invstd * weight + bias), 2), mean and invstd c's own batch
    statistics (as fastconv::batch_norm_act takes them; their effect is in c's gradient)."""
    _check_training(c, mean, invstd, weight, bias, activation)
    scale, shift = batch_norm_scale_shift(mean, invstd, weight, bias)
    if c.dtype != torch.float64:
        scale, shift = scale.float(), shift.float()
    return torch.ops.fastconv.bn_act_avg_pool(c, scale, shift.to(scale.dtype), activation)


@batch_norm_act_avg_pool_op.register_fake
def _(c, mean, invstd, weight, bias, activation):
    _check_training(c, mean, invstd, weight, bias, activation)
    return empty_output((c.shape[0], c.shape[1], c.shape[2] // 2, c.shape[3] // 2), c)


def _setup_training(ctx, inputs, output) -> None:
    c, mean, invstd, weight, bias, activation = inputs
    ctx.save_for_backward(c, mean, invstd, weight, bias)
    ctx.activation = activation


def _backward_training(ctx, grad_y):
    c, mean, invstd, weight, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # Each pooled gradient spread over its 2x2 window, / 4; a floored odd last row or column
    # gets none (it never reached the pool).
    grad_a = torch.ops.aten.avg_pool2d_backward(grad_y, c, [2, 2], [2, 2], [0, 0], False, True, None)
    grad_c, grad_weight, grad_bias = torch.ops.fastconv.batch_norm_act_backward(
        grad_a, c, mean, invstd, weight, bias, ctx.activation
    )
    return (
        grad_c if needs[0] else None, None, None,
        grad_weight.to(weight.dtype) if needs[3] else None, grad_bias.to(bias.dtype) if needs[4] else None, None,
    )  # fmt: skip


batch_norm_act_avg_pool_op.register_autograd(_backward_training, setup_context=_setup_training)


__all__ = ["bn_act_avg_pool"]
