"""fastconv::bn_act: per-channel affine then activation, y = act(x * scale[c] + shift[c]).

This is an inference-mode BatchNorm (scale = weight / sqrt(var + eps), shift = bias - mean *
scale) fused with its activation, and the building block that the conv kernels reuse as their
epilogue. Forward and backward are each a registered op with a fake implementation, so the
op works under torch.compile(fullgraph=True), on meta tensors and through autograd.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastconv import reference
from fastconv._validation import (
    check_channel_vector,
    check_float_dtype,
    check_rank,
    check_same_device,
    check_same_dtype,
    check_shape,
    fail,
)
from fastconv.activations import activation_code
from fastconv.backends import OpImplementations, get_backend, use_backend

_LAYOUT = "(N, C, H, W)"


def _check_inputs(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: Optional[str]) -> None:
    check_rank(x, "x", 4, _LAYOUT)
    check_float_dtype(x, "x")
    channels = x.shape[1]
    check_channel_vector(scale, "scale", channels, x)
    check_channel_vector(shift, "shift", channels, x)
    check_same_dtype("shift", shift, "scale", scale)
    activation_code(activation)


def _check_grad(grad_y: torch.Tensor, x: torch.Tensor) -> None:
    check_same_device("grad_y", grad_y, "x", x)
    check_shape(grad_y, "grad_y", x.shape)
    check_same_dtype("grad_y", grad_y, "x", x)


def _call_key(x: torch.Tensor, scale: torch.Tensor, activation: Optional[str]) -> tuple:
    """What `auto` caches its choice by: shape, layout, dtypes, activation and device."""
    return (tuple(x.shape), x.stride(), x.dtype, scale.dtype, activation, x.device)


def _cuda_supports(*args) -> Optional[str]:
    x = args[1] if len(args) == 5 else args[0]  # backward calls lead with grad_y
    if x.dtype == torch.float64:
        return "its kernels take float32, float16 and bfloat16; got float64"
    return None


def _cuda_forward(x, scale, shift, activation):
    return torch.ops.fastconv_cuda.bn_act_forward(x, scale, shift, activation_code(activation))


def _cuda_backward(grad_y, x, scale, shift, activation):
    return tuple(torch.ops.fastconv_cuda.bn_act_backward(grad_y, x, scale, shift, activation_code(activation)))


def _triton_forward(x, scale, shift, activation):
    from fastconv.triton_kernels import bn_act as kernels

    return kernels.bn_act_forward(x, scale, shift, activation_code(activation))


def _triton_backward(grad_y, x, scale, shift, activation):
    from fastconv.triton_kernels import bn_act as kernels

    return kernels.bn_act_backward(grad_y, x, scale, shift, activation_code(activation))


def _torch_forward(x, scale, shift, activation):
    y = reference.bn_act(x, scale, shift, activation)
    # Keep the kernels' output layout (torch.empty_like's rule), so that the backends agree.
    like_x = torch.empty_like(x)
    return y if y.stride() == like_x.stride() else like_x.copy_(y)


def _torch_backward(grad_y, x, scale, shift, activation):
    grad_x, grad_scale, grad_shift = reference.bn_act_backward(grad_y, x, scale, shift, activation)
    like_x = torch.empty_like(x)
    grad_x = grad_x if grad_x.stride() == like_x.stride() else like_x.copy_(grad_x)
    return grad_x, grad_scale, grad_shift


FORWARD = OpImplementations("bn_act")
FORWARD.register("cuda", _cuda_forward, _cuda_supports)
FORWARD.register("triton", _triton_forward)
FORWARD.register("torch", _torch_forward)

BACKWARD = OpImplementations("bn_act_backward")
BACKWARD.register("cuda", _cuda_backward, _cuda_supports)
BACKWARD.register("triton", _triton_backward)
BACKWARD.register("torch", _torch_backward)


@torch.library.custom_op("fastconv::bn_act", mutates_args=())
def bn_act_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    _check_inputs(x, scale, shift, activation)
    return FORWARD(x.device, _call_key(x, scale, activation), x, scale, shift, activation)


@bn_act_op.register_fake
def _(x, scale, shift, activation):
    _check_inputs(x, scale, shift, activation)
    return torch.empty_like(x)


@torch.library.custom_op("fastconv::bn_act_backward", mutates_args=())
def bn_act_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: Optional[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_inputs(x, scale, shift, activation)
    _check_grad(grad_y, x)
    return BACKWARD(x.device, _call_key(x, scale, activation), grad_y, x, scale, shift, activation)


@bn_act_backward_op.register_fake
def _(grad_y, x, scale, shift, activation):
    _check_inputs(x, scale, shift, activation)
    _check_grad(grad_y, x)
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(shift)


def _setup_context(ctx, inputs, output) -> None:
    x, scale, shift, activation = inputs
    ctx.save_for_backward(x, scale, shift)
    ctx.activation = activation
    # Autograd runs CUDA backward passes on its own worker thread, which does not see the
    # caller's use_backend(): carry the forward's choice over explicitly.
    ctx.backend = get_backend()


def _backward(ctx, grad_y):
    x, scale, shift = ctx.saved_tensors
    with use_backend(ctx.backend):
        grad_x, grad_scale, grad_shift = torch.ops.fastconv.bn_act_backward(grad_y, x, scale, shift, ctx.activation)
    wanted = ctx.needs_input_grad
    return (
        grad_x if wanted[0] else None,
        grad_scale if wanted[1] else None,
        grad_shift if wanted[2] else None,
        None,
    )


bn_act_op.register_autograd(_backward, setup_context=_setup_context)


def bn_act(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: Optional[str] = None
) -> torch.Tensor:
    """Per-channel affine then activation: ``act(x * scale[c] + shift[c])``.

    Args:
        x: (N, C, H, W), float32, float16 or bfloat16 (float64 on the torch and triton
            backends), NCHW, channels_last or any strided view; read in place, never copied.
        scale, shift: (C,), in x's dtype or float32 (as BatchNorm keeps them under autocast).
        activation: None, "relu", "relu6", "silu" or "hardswish".

    Returns:
        (N, C, H, W) in x's dtype and memory format, computed in float32. Differentiable in x,
        scale and shift.
    """
    if not isinstance(x, torch.Tensor):
        fail(f"x must be a torch.Tensor; got {type(x).__name__}")
    return torch.ops.fastconv.bn_act(x, scale, shift, activation)
