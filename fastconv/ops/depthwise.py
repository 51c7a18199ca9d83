"""fastconv::depthwise_conv2d: depthwise convolution with a fused BatchNorm + activation epilogue.

    y = act((F.conv2d(x, weight, bias, stride, padding, dilation, groups=C) * scale + shift))

Three registered ops carry it: the forward, and the two halves of the plain convolution's
backward (grad_input, and grad_weight with grad_bias). The epilogue's backward is bn_act's:
the backward recomputes the pre-epilogue convolution, which costs one read of x and one write,
instead of keeping it alive from the forward (the memory a training step can least spare).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastconv import reference
from fastconv._conv_args import (
    check_kernel_arguments,
    output_memory_format,
    output_size,
    padding_4,
    positive_pair,
)
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
from fastconv.ops._conv_common import call_key, convolution_backward, epilogue_backward, has_epilogue, in_layout

_LAYOUT = "(N, C, H, W)"


def _check_conv(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> tuple[int, int]:
    """Checks x, weight and the geometry; returns the output size (Ho, Wo)."""
    check_rank(x, "x", 4, _LAYOUT)
    check_float_dtype(x, "x")
    check_same_device("weight", weight, "x", x)
    check_same_dtype("weight", weight, "x", x)
    channels = x.shape[1]
    if weight.dim() != 4 or weight.shape[1] != 1:
        fail(f"weight must have shape (C * m, 1, kh, kw) for a depthwise conv; got {tuple(weight.shape)}")
    if channels == 0 or weight.shape[0] == 0 or weight.shape[0] % channels != 0:
        fail(
            f"weight.shape[0] must be a positive multiple of x's {channels} channels (C * depth multiplier); "
            f"got {weight.shape[0]}"
        )
    if min(weight.shape[2:]) < 1:
        fail(f"weight's kernel size must be >= 1; got {tuple(weight.shape[2:])}")
    check_kernel_arguments(stride, padding, dilation)
    height, width = output_size(tuple(x.shape[2:]), tuple(weight.shape[2:]), stride, padding, dilation)
    if height < 1 or width < 1:
        fail(
            f"the output size must be >= 1; got ({height}, {width}) for input {tuple(x.shape[2:])}, kernel "
            f"{tuple(weight.shape[2:])}, stride {tuple(stride)}, padding {tuple(padding)}, dilation {tuple(dilation)}"
        )
    return height, width


def _check_forward(x, weight, bias, stride, padding, dilation, scale, shift, activation) -> tuple[int, int]:
    size = _check_conv(x, weight, stride, padding, dilation)
    out_channels = weight.shape[0]
    if bias is not None:
        check_same_device("bias", bias, "x", x)
        check_same_dtype("bias", bias, "x", x)
        check_shape(bias, "bias", (out_channels,))
    for name, vector in (("scale", scale), ("shift", shift)):
        check_channel_vector(vector, name, out_channels, x, per="output channel")
    if scale is not None and shift is not None:
        check_same_dtype("shift", shift, "scale", scale)
    activation_code(activation)
    return size


def _output_shape(x, weight, size):
    return (x.shape[0], weight.shape[0], *size)


def _check_grad(grad_c: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, size) -> None:
    check_same_device("grad_c", grad_c, "x", x)
    check_same_dtype("grad_c", grad_c, "x", x)
    check_shape(grad_c, "grad_c", _output_shape(x, weight, size))


def _new_output(shape, x: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


# Backend implementations ------------------------------------------------------------------


def _no_float64(*args) -> Optional[str]:
    if args[0].dtype == torch.float64:
        return "its kernels take float32, float16 and bfloat16; got float64"
    return None


def _triton():
    from fastconv.triton_kernels import depthwise

    return depthwise


def _forward_cuda(x, weight, bias, stride, padding, dilation, scale, shift, activation):
    return torch.ops.fastconv_cuda.depthwise_forward(
        x, weight, bias, stride, padding, dilation, scale, shift, activation_code(activation)
    )


def _forward_triton(x, weight, bias, stride, padding, dilation, scale, shift, activation):
    return _triton().depthwise_forward(x, weight, bias, stride, padding, dilation, scale, shift, activation_code(activation))


def _forward_torch(x, weight, bias, stride, padding, dilation, scale, shift, activation):
    return in_layout(reference.depthwise_conv2d(x, weight, bias, stride, padding, dilation, scale, shift, activation), x)


def _grad_input_torch(grad_c, x, weight, stride, padding, dilation):
    grad_x, _ = convolution_backward(grad_c, x, weight, stride, padding, dilation, x.shape[1], [True, False, False])
    return in_layout(grad_x, x)


def _grad_weight_torch(grad_c, x, weight, stride, padding, dilation):
    _, grad_weight = convolution_backward(grad_c, x, weight, stride, padding, dilation, x.shape[1], [False, True, False])
    return grad_weight.contiguous(), grad_c.sum(dim=(0, 2, 3))


FORWARD = OpImplementations("depthwise_conv2d")
FORWARD.register("cuda", _forward_cuda, _no_float64)
FORWARD.register("triton", _forward_triton)
FORWARD.register("torch", _forward_torch)

GRAD_INPUT = OpImplementations("depthwise_conv2d_backward_input")
GRAD_INPUT.register(
    "cuda", lambda *a: torch.ops.fastconv_cuda.depthwise_backward_input(*a), lambda g, *rest: _no_float64(g)
)
GRAD_INPUT.register("triton", lambda *a: _triton().depthwise_backward_input(*a))
GRAD_INPUT.register("torch", _grad_input_torch)

GRAD_WEIGHT = OpImplementations("depthwise_conv2d_backward_weight")
GRAD_WEIGHT.register(
    "cuda", lambda *a: tuple(torch.ops.fastconv_cuda.depthwise_backward_weight(*a)), lambda g, *rest: _no_float64(g)
)
GRAD_WEIGHT.register("triton", lambda *a: _triton().depthwise_backward_weight(*a))
GRAD_WEIGHT.register("torch", _grad_weight_torch)


# Registered ops ---------------------------------------------------------------------------


@torch.library.custom_op("fastconv::depthwise_conv2d", mutates_args=())
def depthwise_conv2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    activation: Optional[str],
) -> torch.Tensor:
    args = (x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), scale, shift, activation)
    _check_forward(*args)
    return FORWARD(x.device, call_key(*args), *args)


@depthwise_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, scale, shift, activation):
    size = _check_forward(x, weight, bias, stride, padding, dilation, scale, shift, activation)
    return _new_output(_output_shape(x, weight, size), x)


@torch.library.custom_op("fastconv::depthwise_conv2d_backward_input", mutates_args=())
def depthwise_conv2d_backward_input_op(
    grad_c: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """grad_x of the plain convolution (no epilogue); x gives the shape and layout only."""
    args = (grad_c, x, weight, tuple(stride), tuple(padding), tuple(dilation))
    _check_grad(grad_c, x, weight, _check_conv(x, weight, *args[3:]))
    return GRAD_INPUT(x.device, call_key(x, weight, *args[3:]), *args)


@depthwise_conv2d_backward_input_op.register_fake
def _(grad_c, x, weight, stride, padding, dilation):
    _check_grad(grad_c, x, weight, _check_conv(x, weight, stride, padding, dilation))
    return _new_output(x.shape, x)


@torch.library.custom_op("fastconv::depthwise_conv2d_backward_weight", mutates_args=())
def depthwise_conv2d_backward_weight_op(
    grad_c: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight, grad_bias) of the plain convolution; deterministic reductions."""
    args = (grad_c, x, weight, tuple(stride), tuple(padding), tuple(dilation))
    _check_grad(grad_c, x, weight, _check_conv(x, weight, *args[3:]))
    return GRAD_WEIGHT(x.device, call_key(x, weight, *args[3:]), *args)


@depthwise_conv2d_backward_weight_op.register_fake
def _(grad_c, x, weight, stride, padding, dilation):
    _check_grad(grad_c, x, weight, _check_conv(x, weight, stride, padding, dilation))
    return torch.empty_like(weight, memory_format=torch.contiguous_format), x.new_empty(weight.shape[0])


# Autograd ---------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, dilation, scale, shift, activation = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift)
    ctx.geometry = (tuple(stride), tuple(padding), tuple(dilation))
    ctx.activation = activation
    # Autograd runs CUDA backward passes on its own thread, which does not see use_backend().
    ctx.backend = get_backend()


def _backward(ctx, grad_y):
    x, weight, bias, scale, shift = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x = grad_weight = grad_bias = grad_scale = grad_shift = None
    with use_backend(ctx.backend):
        grad_c = grad_y
        if has_epilogue(scale, shift, ctx.activation):
            # Recompute the pre-epilogue conv rather than keep it alive from the forward.
            c = torch.ops.fastconv.depthwise_conv2d(x, weight, bias, *ctx.geometry, None, None, None)
            grad_c, grad_scale, grad_shift = epilogue_backward(grad_y, c, scale, shift, ctx.activation)
        if needs[0]:
            grad_x = torch.ops.fastconv.depthwise_conv2d_backward_input(grad_c, x, weight, *ctx.geometry)
        if needs[1] or needs[2]:
            grad_weight, grad_bias = torch.ops.fastconv.depthwise_conv2d_backward_weight(grad_c, x, weight, *ctx.geometry)
    return (
        grad_x,
        grad_weight if needs[1] else None,
        grad_bias if needs[2] else None,
        None,
        None,
        None,
        grad_scale if needs[6] else None,
        grad_shift if needs[7] else None,
        None,
    )


depthwise_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


# Public function --------------------------------------------------------------------------


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    *,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """Depthwise convolution with an optional fused BatchNorm + activation epilogue.

    Exactly ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)``, then per output
    channel ``act(y * scale + shift)`` when any of scale, shift, activation is given.

    Args:
        x: (N, C, H, W), NCHW, channels_last or any strided view; read in place.
        weight: (C * m, 1, kh, kw) for depth multiplier m, in x's dtype.
        bias: (C * m,) or None, in x's dtype.
        stride, dilation: an int or a pair, >= 1.
        padding: an int, a pair, "same" or "valid", as F.conv2d takes it.
        scale, shift: (C * m,) or None (1 and 0), in x's dtype or float32: a folded BatchNorm.
        activation: None, "relu", "relu6", "silu" or "hardswish".

    Returns:
        (N, C * m, Ho, Wo) in x's dtype; channels_last when x's channels are innermost.
        Under autocast, x, weight and bias run in the autocast dtype, as F.conv2d does.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        fail(f"x and weight must be tensors; got {type(x).__name__} and {type(weight).__name__}")
    if weight.dim() != 4:
        fail(f"weight must have shape (C * m, 1, kh, kw) for a depthwise conv; got {tuple(weight.shape)}")
    stride_ = positive_pair(stride, "stride")
    dilation_ = positive_pair(dilation, "dilation")
    padding_ = padding_4(padding, tuple(weight.shape[2:]), stride_, dilation_)
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        # Conv ops run in the low-precision autocast dtype; the epilogue's parameters stay as
        # given (float32 is allowed beside half activations).
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return torch.ops.fastconv.depthwise_conv2d(x, weight, bias, stride_, padding_, dilation_, scale, shift, activation)
