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
from fastconv._validation import check_channel_vector, check_same_dtype, check_shape, fail
from fastconv.activations import activation_code
from fastconv.backends import OpImplementations, get_backend, use_backend
from fastconv.ops._common import call_key, check_activation_input, check_like, refuse_float64


def _check_inputs(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: Optional[str]) -> None:
    check_activation_input(x)
    channels = x.shape[1]
    for name, vector in (("scale", scale), ("shift", shift)):
        if not isinstance(vector, torch.Tensor):
            fail(f"{name} must be a ({channels},) tensor; got {type(vector).__name__}")
        check_channel_vector(vector, name, channels, x)
    check_same_dtype("shift", shift, "scale", scale)
    activation_code(activation)


def _check_grad(grad_y: torch.Tensor, x: torch.Tensor) -> None:
    check_like("grad_y", grad_y, x)
    check_shape(grad_y, "grad_y", x.shape)


def _like_x(result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The reference's result in the kernels' output layout (torch.empty_like's rule), so that
    the backends agree on strides."""
    like_x = torch.empty_like(x)
    return result if result.stride() == like_x.stride() else like_x.copy_(result)


def _cuda_forward(*, x, scale, shift, activation):
    return torch.ops.fastconv_cuda.bn_act_forward(x, scale, shift, activation_code(activation))


def _cuda_backward(*, grad_y, x, scale, shift, activation):
    return tuple(torch.ops.fastconv_cuda.bn_act_backward(grad_y, x, scale, shift, activation_code(activation)))


def _triton_forward(*, x, scale, shift, activation):
    from fastconv.triton_kernels import bn_act as kernels

    return kernels.bn_act_forward(x, scale, shift, activation_code(activation))


def _triton_backward(*, grad_y, x, scale, shift, activation):
    from fastconv.triton_kernels import bn_act as kernels

    return kernels.bn_act_backward(grad_y, x, scale, shift, activation_code(activation))


def _torch_forward(*, x, scale, shift, activation):
    return _like_x(reference.bn_act(x, scale, shift, activation), x)


def _torch_backward(*, grad_y, x, scale, shift, activation):
    grad_x, grad_scale, grad_shift = reference.bn_act_backward(grad_y, x, scale, shift, activation)
    return _like_x(grad_x, x), grad_scale, grad_shift


FORWARD = OpImplementations("bn_act")
FORWARD.register("cuda", _cuda_forward, refuse_float64("x"))
FORWARD.register("triton", _triton_forward)
FORWARD.register("torch", _torch_forward)

BACKWARD = OpImplementations("bn_act_backward")
BACKWARD.register("cuda", _cuda_backward, refuse_float64("x"))
BACKWARD.register("triton", _triton_backward)
BACKWARD.register("torch", _torch_backward)


@torch.library.custom_op("fastconv::bn_act", mutates_args=())
def bn_act_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    _check_inputs(x, scale, shift, activation)
    key = call_key(x, scale, shift, activation)
    return FORWARD(x.device, key, x=x, scale=scale, shift=shift, activation=activation)


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
    key = call_key(grad_y, x, scale, shift, activation)
    return BACKWARD(x.device, key, grad_y=grad_y, x=x, scale=scale, shift=shift, activation=activation)


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
