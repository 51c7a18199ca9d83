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
from fastconv._geometry import empty_output, normalise_geometry
from fastconv._validation import check_same_dtype, check_shape, fail
from fastconv.activations import activation_code
from fastconv.backends import OpImplementations, get_backend, use_backend
from fastconv.ops._autocast import register_autocast
from fastconv.ops._common import (
    autocast_inputs,
    call_key,
    check_activation_input,
    check_bias,
    check_epilogue,
    check_like,
    conv_output_size,
    refuse_float64,
    tensors_only,
)
from fastconv.ops._conv_common import convolution_backward, epilogue_backward, has_epilogue, in_layout


def _check_conv(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> tuple[int, int]:
    """Checks x, weight and the geometry; returns the output size (Ho, Wo)."""
    check_activation_input(x)
    check_like("weight", weight, x)
    channels = x.shape[1]
    if weight.dim() != 4 or weight.shape[1] != 1:
        fail(f"weight must have shape (C * m, 1, kh, kw) for a depthwise conv; got {tuple(weight.shape)}")
    if channels == 0 or weight.shape[0] == 0 or weight.shape[0] % channels != 0:
        fail(
            f"weight.shape[0] must be a positive multiple of x's {channels} channels (C * depth multiplier); "
            f"got {weight.shape[0]}"
        )
    return conv_output_size(x, weight, stride, padding, dilation)


def _check_forward(x, weight, bias, stride, padding, dilation, scale, shift, activation) -> tuple[int, int]:
    size = _check_conv(x, weight, stride, padding, dilation)
    check_bias(bias, weight.shape[0], x)
    check_epilogue(scale, shift, activation, weight.shape[0], x)
    if scale is not None and shift is not None:
        check_same_dtype("shift", shift, "scale", scale)
    return size


def _output_shape(x, weight, size):
    return (x.shape[0], weight.shape[0], *size)


def _check_grad(grad_c: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, size) -> None:
    check_like("grad_c", grad_c, x)
    check_shape(grad_c, "grad_c", _output_shape(x, weight, size))


# Backend implementations ------------------------------------------------------------------


def _triton():
    from fastconv.triton_kernels import depthwise

    return depthwise


def _triton_backward():
    from fastconv.triton_kernels import depthwise_backward

    return depthwise_backward


def _forward_cuda(*, x, weight, bias, stride, padding, dilation, scale, shift, activation):
    return torch.ops.fastconv_cuda.depthwise_forward(
        x, weight, bias, stride, padding, dilation, scale, shift, activation_code(activation)
    )


def _forward_triton(*, x, weight, bias, stride, padding, dilation, scale, shift, activation):
    return _triton().depthwise_forward(x, weight, bias, stride, padding, dilation, scale, shift, activation_code(activation))


def _forward_torch(*, x, weight, bias, stride, padding, dilation, scale, shift, activation):
    return in_layout(reference.depthwise_conv2d(x, weight, bias, stride, padding, dilation, scale, shift, activation), x)


def _grad_input_cuda(*, grad_c, x, weight, stride, padding, dilation):
    return torch.ops.fastconv_cuda.depthwise_backward_input(grad_c, x, weight, stride, padding, dilation)


def _grad_input_triton(*, grad_c, x, weight, stride, padding, dilation):
    return _triton_backward().depthwise_backward_input(grad_c, x, weight, stride, padding, dilation)


def _grad_input_torch(*, grad_c, x, weight, stride, padding, dilation):
    grad_x, _ = convolution_backward(grad_c, x, weight, stride, padding, dilation, x.shape[1], [True, False, False])
    return in_layout(grad_x, x)


def _grad_weight_cuda(*, grad_c, x, weight, stride, padding, dilation):
    return tuple(torch.ops.fastconv_cuda.depthwise_backward_weight(grad_c, x, weight, stride, padding, dilation))


def _grad_weight_triton(*, grad_c, x, weight, stride, padding, dilation):
    return _triton_backward().depthwise_backward_weight(grad_c, x, weight, stride, padding, dilation)


def _grad_weight_torch(*, grad_c, x, weight, stride, padding, dilation):
    _, grad_weight = convolution_backward(grad_c, x, weight, stride, padding, dilation, x.shape[1], [False, True, False])
    return grad_weight.contiguous(), grad_c.sum(dim=(0, 2, 3))


def _with_stats_cuda(*, x, weight, bias, stride, padding, dilation):
    # The CUDA depthwise kernels have no statistics epilogue yet: one batch_norm_stats pass
    # over c (+1 read of c) on the same backend.
    c = _forward_cuda(
        x=x, weight=weight, bias=bias, stride=stride, padding=padding, dilation=dilation, scale=None, shift=None,
        activation=None,
    )  # fmt: skip
    with use_backend("cuda"):
        mean, var = torch.ops.fastconv.batch_norm_stats(c)
    return c, mean, var


def _with_stats_triton(*, x, weight, bias, stride, padding, dilation):
    bias = bias.contiguous() if bias is not None else None
    return _triton().depthwise_forward_with_stats(x, weight, bias, stride, padding, dilation)


def _with_stats_torch(*, x, weight, bias, stride, padding, dilation):
    c = _forward_torch(
        x=x, weight=weight, bias=bias, stride=stride, padding=padding, dilation=dilation, scale=None, shift=None,
        activation=None,
    )  # fmt: skip
    mean, var = reference.batch_norm_stats(c)
    return c, mean, var


FORWARD = OpImplementations("depthwise_conv2d")
FORWARD.register("cuda", _forward_cuda, refuse_float64("x"))
FORWARD.register("triton", _forward_triton)
FORWARD.register("torch", _forward_torch)

GRAD_INPUT = OpImplementations("depthwise_conv2d_backward_input")
GRAD_INPUT.register("cuda", _grad_input_cuda, refuse_float64("grad_c"))
GRAD_INPUT.register("triton", _grad_input_triton)
GRAD_INPUT.register("torch", _grad_input_torch)

GRAD_WEIGHT = OpImplementations("depthwise_conv2d_backward_weight")
GRAD_WEIGHT.register("cuda", _grad_weight_cuda, refuse_float64("grad_c"))
GRAD_WEIGHT.register("triton", _grad_weight_triton)
GRAD_WEIGHT.register("torch", _grad_weight_torch)

WITH_STATS = OpImplementations("depthwise_conv2d with batch statistics")
WITH_STATS.register("cuda", _with_stats_cuda, refuse_float64("x"))
WITH_STATS.register("triton", _with_stats_triton)
WITH_STATS.register("torch", _with_stats_torch)


def forward_with_stats(backend: str, *, x, weight, bias, stride, padding, dilation):
    """(c, mean, var): the plain depthwise conv on `backend` and its per-channel batch mean and
    biased variance, fused into the kernel where the backend can; conv2d_batch_stats's
    depthwise route. Arguments are checked by the caller's op."""
    return WITH_STATS.run(backend, x.device, x=x, weight=weight, bias=bias, stride=stride, padding=padding, dilation=dilation)


# Registered ops ---------------------------------------------------------------------------


def _run_backward(implementations: OpImplementations, grad_c, x, weight, stride, padding, dilation):
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    _check_grad(grad_c, x, weight, _check_conv(x, weight, stride, padding, dilation))
    return implementations(
        x.device, call_key(grad_c, x, weight, stride, padding, dilation),
        grad_c=grad_c, x=x, weight=weight, stride=stride, padding=padding, dilation=dilation,
    )  # fmt: skip


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
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    _check_forward(x, weight, bias, stride, padding, dilation, scale, shift, activation)
    return FORWARD(
        x.device, call_key(x, weight, bias, stride, padding, dilation, scale, shift, activation),
        x=x, weight=weight, bias=bias, stride=stride, padding=padding, dilation=dilation, scale=scale, shift=shift,
        activation=activation,
    )  # fmt: skip


@depthwise_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, scale, shift, activation):
    size = _check_forward(x, weight, bias, stride, padding, dilation, scale, shift, activation)
    return empty_output(_output_shape(x, weight, size), x)


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
    return _run_backward(GRAD_INPUT, grad_c, x, weight, stride, padding, dilation)


@depthwise_conv2d_backward_input_op.register_fake
def _(grad_c, x, weight, stride, padding, dilation):
    _check_grad(grad_c, x, weight, _check_conv(x, weight, stride, padding, dilation))
    return empty_output(x.shape, x)


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
    return _run_backward(GRAD_WEIGHT, grad_c, x, weight, stride, padding, dilation)


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
register_autocast(depthwise_conv2d_op, cast=("x", "weight", "bias"))


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
    tensors_only(x, weight)
    if weight.dim() != 4:
        fail(f"weight must have shape (C * m, 1, kh, kw) for a depthwise conv; got {tuple(weight.shape)}")
    stride_, padding_, dilation_ = normalise_geometry(tuple(weight.shape[2:]), stride, padding, dilation)
    x, weight, bias = autocast_inputs(x, weight, bias)
    return torch.ops.fastconv.depthwise_conv2d(x, weight, bias, stride_, padding_, dilation_, scale, shift, activation)
