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

Inference only: the op has no backward (a Transition wanting gradients takes its prologue path).
Backends: triton (triton_kernels/bn_act_pool.py) and torch (the reference); no cuda kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastconv import reference
from fastconv._geometry import empty_output
from fastconv._validation import check_channel_vector, check_same_dtype, fail
from fastconv.activations import activation_code
from fastconv.backends import OpImplementations
from fastconv.ops._autocast import register_autocast
from fastconv.ops._common import call_key, check_activation_input, contiguous_vectors


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


def _forward_triton(*, x, scale, shift, activation, out):
    from fastconv.triton_kernels.bn_act_pool import bn_act_avg_pool

    scale, shift = contiguous_vectors(scale, shift)
    return bn_act_avg_pool(x, scale, shift, activation_code(activation), out)


def _forward_torch(*, x, scale, shift, activation, out):
    return out.copy_(F.avg_pool2d(reference.bn_act(x, scale, shift, activation), 2))


FORWARD = OpImplementations("bn_act_avg_pool")
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


__all__ = ["bn_act_avg_pool"]
