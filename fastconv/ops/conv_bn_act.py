"""fastconv::conv2d_bn_act: any 2-D convolution with a fused BatchNorm + activation epilogue.

    y = act((F.conv2d(x, weight, bias, stride, padding, dilation, groups) * scale + shift))
    optionally + residual after the activation, or before it (ResNet's BasicBlock: the last
    3x3 conv writes relu(bn(conv) + identity), so the sum never reaches memory unactivated)

`conv2d_bn_act` routes each call to the kernel built for its shape:

* depthwise (groups == C_in > 1)  -> fastconv::depthwise_conv2d, a direct-loop kernel;
* 1x1, stride 1, no padding       -> fastconv::pointwise_conv2d, one GEMM over pixels;
* anything else                   -> fastconv::conv2d_bn_act, an implicit GEMM
  (M = N*Ho*Wo pixels, K = C_in/groups*kh*kw, N = C_out/groups per group).

For training, fastconv::conv2d_batch_stats is the convolution without the epilogue whose kernels
(each route's: depthwise, pointwise or implicit GEMM) also return the per-channel batch mean and
biased variance of what they wrote, so that BatchNorm's statistics cost no extra read of the
activation. (On the cuda backend only the implicit GEMM has that epilogue: its depthwise and
pointwise routes add one statistics pass over c.)

Backward: the epilogue's through bn_act's backward (recomputing the pre-epilogue conv rather
than keeping it alive), then grad_input and grad_weight on the route's own backward: fastconv's
depthwise or pointwise kernels, and for the implicit GEMM ATen's convolution_backward, which is
cuDNN's implicit GEMMs on a GPU. Whether an own implicit-GEMM backward would beat cuDNN's is
unmeasured: no GPU has run this code yet (benchmarks/NOTES.md).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastconv import reference
from fastconv._geometry import accumulate_dtype, empty_output, normalise_geometry, output_size
from fastconv._validation import fail
from fastconv.activations import activation_code
from fastconv.backends import OpImplementations, get_backend, use_backend
from fastconv.ops import depthwise as depthwise_ops
from fastconv.ops import pointwise as pointwise_ops
from fastconv.ops._autocast import register_autocast
from fastconv.ops._common import (
    allow_tf32,
    autocast_inputs,
    call_key,
    check_activation_input,
    check_bias,
    check_epilogue,
    check_like,
    check_writable,
    contiguous_vectors,
    conv_output_size,
    input_grads_wanted,
    may_overlap,
    refuse_float64_and_fp32_without_tf32,
    tensors_only,
)
from fastconv.ops._conv_common import (
    convolution_backward,
    epilogue_backward,
    filled_scale_shift,
    has_epilogue,
    in_layout,
)

# Checks ---------------------------------------------------------------------------------------


def _check_conv(x, weight, bias, stride, padding, dilation, groups) -> tuple[int, int]:
    """Checks x, weight, bias and the geometry; returns the output size (Ho, Wo)."""
    check_activation_input(x)
    check_like("weight", weight, x)
    if weight.dim() != 4:
        fail(f"weight must have shape (C_out, C_in / groups, kh, kw); got {tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        fail(f"groups must be an int >= 1; got {groups!r}")
    in_channels, out_channels = x.shape[1], weight.shape[0]
    if in_channels % groups != 0:
        fail(f"x's channels must be divisible by groups; got in_channels={in_channels} and groups={groups}")
    if out_channels == 0 or out_channels % groups != 0:
        fail(f"weight.shape[0] (out_channels) must be a positive multiple of groups={groups}; got {out_channels}")
    if weight.shape[1] != in_channels // groups:
        fail(
            f"weight.shape[1] must be in_channels / groups = {in_channels} / {groups} = {in_channels // groups}; "
            f"got {weight.shape[1]}"
        )
    size = conv_output_size(x, weight, stride, padding, dilation)
    check_bias(bias, out_channels, x)
    return size


def _check_forward(x, weight, bias, stride, padding, dilation, groups, scale, shift, activation,
                   residual=None) -> tuple[int, int]:  # fmt: skip
    size = _check_conv(x, weight, bias, stride, padding, dilation, groups)
    check_epilogue(scale, shift, activation, weight.shape[0], x)
    if residual is not None:
        check_like("residual", residual, x)
        shape = (x.shape[0], weight.shape[0], *size)
        if tuple(residual.shape) != shape:
            fail(f"residual must have the output's shape {shape}; got {tuple(residual.shape)}")
    return size


def _new_output(x, weight, size) -> torch.Tensor:
    return empty_output((x.shape[0], weight.shape[0], *size), x)


def _stats_like(x, weight) -> torch.Tensor:
    return torch.empty(weight.shape[0], dtype=accumulate_dtype(x.dtype), device=x.device)


# Backend implementations ------------------------------------------------------------------------

_CONV = ("x", "weight", "bias", "stride", "padding", "dilation", "groups")
_EPILOGUE = ("scale", "shift", "activation", "residual", "activation_after_residual")


def _forward_cuda(*, x, weight, bias, stride, padding, dilation, groups, scale, shift, activation, residual,
                  activation_after_residual):  # fmt: skip
    if residual is None:
        out, _, _ = torch.ops.fastconv_cuda.conv_bn_act_forward(
            x, weight, bias, stride, padding, dilation, groups, scale, shift, activation_code(activation), False,
            allow_tf32(),
        )  # fmt: skip
        return out
    out = _new_output(x, weight, output_size(tuple(x.shape[2:]), tuple(weight.shape[2:]), stride, padding, dilation))
    torch.ops.fastconv_cuda.conv_bn_act_out(
        x, weight, bias, stride, padding, dilation, groups, scale, shift, activation_code(activation), False,
        allow_tf32(), residual, activation_after_residual, out,
    )  # fmt: skip
    return out


def _forward_triton(*, x, weight, bias, stride, padding, dilation, groups, scale, shift, activation, residual,
                    activation_after_residual):  # fmt: skip
    from fastconv.triton_kernels.conv_bn_act import conv_bn_act_forward

    out = _new_output(x, weight, output_size(tuple(x.shape[2:]), tuple(weight.shape[2:]), stride, padding, dilation))
    bias, scale, shift = contiguous_vectors(bias, scale, shift)
    out, _, _ = conv_bn_act_forward(
        x, weight, out, bias, stride, padding, dilation, groups, scale, shift, activation_code(activation), False,
        allow_tf32(), residual, activation_after_residual,
    )  # fmt: skip
    return out


def _forward_torch(*, x, weight, bias, stride, padding, dilation, groups, scale, shift, activation, residual=None,
                   activation_after_residual=False):  # fmt: skip
    return in_layout(reference.conv2d(x, weight, bias, stride, padding, dilation, groups, scale, shift, activation,
                                      residual, activation_after_residual), x)  # fmt: skip


def _gemm_stats_cuda(*, x, weight, bias, stride, padding, dilation, groups):
    return tuple(torch.ops.fastconv_cuda.conv_bn_act_forward(
        x, weight, bias, stride, padding, dilation, groups, None, None, 0, True, allow_tf32()
    ))  # fmt: skip


def _gemm_stats_triton(*, x, weight, bias, stride, padding, dilation, groups):
    from fastconv.triton_kernels.conv_bn_act import conv_bn_act_forward

    out = _new_output(x, weight, output_size(tuple(x.shape[2:]), tuple(weight.shape[2:]), stride, padding, dilation))
    (bias,) = contiguous_vectors(bias)
    return conv_bn_act_forward(x, weight, out, bias, stride, padding, dilation, groups, None, None, 0, True, allow_tf32())


def _gemm_stats_torch(*, x, weight, bias, stride, padding, dilation, groups):
    c = _forward_torch(
        x=x, weight=weight, bias=bias, stride=stride, padding=padding, dilation=dilation, groups=groups, scale=None,
        shift=None, activation=None,
    )  # fmt: skip
    mean, var = reference.batch_norm_stats(c)
    return c, mean, var


def _routed_stats(backend: str, gemm_stats):
    """conv2d_batch_stats on `backend`: each route's own kernel with its statistics, through
    the depthwise and pointwise families' op-level helpers."""

    def run(*, x, weight, bias, stride, padding, dilation, groups):
        kind = route(x.shape[1], weight.shape, stride, padding, groups)
        if kind == "depthwise":
            return depthwise_ops.forward_with_stats(
                backend, x=x, weight=weight, bias=bias, stride=stride, padding=padding, dilation=dilation
            )
        if kind == "pointwise":
            return pointwise_ops.forward_with_stats(backend, x=x, weight=weight, bias=bias)
        return gemm_stats(x=x, weight=weight, bias=bias, stride=stride, padding=padding, dilation=dilation, groups=groups)

    return run


FORWARD = OpImplementations("conv2d_bn_act")
FORWARD.register("cuda", _forward_cuda, refuse_float64_and_fp32_without_tf32("x"))
FORWARD.register("triton", _forward_triton)
FORWARD.register("torch", _forward_torch)

WITH_STATS = OpImplementations("conv2d_batch_stats")
WITH_STATS.register("cuda", _routed_stats("cuda", _gemm_stats_cuda), refuse_float64_and_fp32_without_tf32("x"))
WITH_STATS.register("triton", _routed_stats("triton", _gemm_stats_triton))
WITH_STATS.register("torch", _routed_stats("torch", _gemm_stats_torch))


# Registered ops --------------------------------------------------------------------------------


@torch.library.custom_op("fastconv::conv2d_bn_act", mutates_args=())
def conv2d_bn_act_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    activation: Optional[str],
    residual: Optional[torch.Tensor] = None,
    activation_after_residual: bool = False,
) -> torch.Tensor:
    """The implicit-GEMM convolution with its epilogue; padding is (top, left, bottom, right).
    A residual (the output's shape) is added after the activation, or before it when
    activation_after_residual."""
    args = (x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups, scale, shift, activation)
    size = _check_forward(*args, residual)
    if x.shape[0] == 0:
        return _new_output(x, weight, size)
    after = bool(activation_after_residual) and residual is not None
    return FORWARD(x.device, call_key(*args, residual, after), **dict(zip(_CONV + _EPILOGUE, args + (residual, after))))


@conv2d_bn_act_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, scale, shift, activation, residual=None,
      activation_after_residual=False):  # fmt: skip  (the schema's defaults)
    size = _check_forward(x, weight, bias, stride, padding, dilation, groups, scale, shift, activation, residual)
    return _new_output(x, weight, size)


@torch.library.custom_op("fastconv::conv2d_batch_stats", mutates_args=())
def conv2d_batch_stats_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c, mean, var): the convolution, and its per-output-channel batch mean and biased variance
    over (N, Ho, Wo), in float32 (float64 for float64 inputs), of c's stored values."""
    args = (x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    size = _check_conv(*args)
    if x.shape[0] == 0:
        nan = _stats_like(x, weight).fill_(float("nan"))  # torch.var_mean's answer for no values
        return _new_output(x, weight, size), nan, nan.clone()
    return WITH_STATS(x.device, call_key(*args), **dict(zip(_CONV, args)))


@conv2d_batch_stats_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    size = _check_conv(x, weight, bias, stride, padding, dilation, groups)
    return _new_output(x, weight, size), _stats_like(x, weight), _stats_like(x, weight)


# Autograd ----------------------------------------------------------------------------------------


# Activations whose derivative the output itself gives: relu'(c) == relu'(relu(c)), relu6'(c) ==
# relu6'(relu6(c)) (0 at and beyond the kinks, as torch's). With no scale or shift (AlexNet's and
# VGG's conv + bias + ReLU) the backward reads y instead of recomputing the conv: eager's in-place
# ReLU keeps y too, and the recompute had cost a training step one more conv forward (counted:
# VGG-16's fp16 step at batch 256 moved 85.4 GB against eager's 80.7 GB).
_FROM_OUTPUT = ("relu", "relu6")


def _setup_forward(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, dilation, groups, scale, shift, activation, residual, after = inputs
    after = bool(after) and residual is not None
    # The activation's derivative comes from y when y is the activation's own output: with no
    # residual, or with the residual added before it (relu'(z + r) == relu'(y)); with the residual
    # after it, y is shifted by r and the activation's input is recomputed. The backward keeps y
    # for that even with a scale and shift (an eval BatchNorm's, ResNet's BasicBlock): the add's
    # input u = z + r is then never recomputed, only c when a scale or shift needs it.
    ctx.from_output = activation in _FROM_OUTPUT and (residual is None and scale is None and shift is None or after)
    kept_output = output if ctx.from_output else None
    kept_residual = residual if after and not ctx.from_output and activation is not None else None
    ctx.save_for_backward(x, weight, bias, scale, shift, kept_output, kept_residual)
    ctx.geometry = (tuple(stride), tuple(padding), tuple(dilation), groups)
    ctx.activation = activation
    ctx.residual = (residual is not None, after)
    ctx.backend = get_backend()  # autograd's CUDA worker thread does not see use_backend()


def _conv_grads(ctx, grad_c, x, weight, bias, needs) -> tuple:
    """(grad_x, grad_weight, grad_bias) of the plain convolution, on the route's own backward:
    fastconv's depthwise kernels (cuDNN's depthwise backward is the known slow one, benchmarks/FLOORS.md),
    the pointwise GEMMs, or ATen's convolution_backward (cuDNN) for the implicit GEMM."""
    stride, padding, dilation, groups = ctx.geometry
    ops = torch.ops.fastconv
    grad_x = grad_weight = grad_bias = None
    kind = route(x.shape[1], weight.shape, stride, padding, groups)
    if kind == "depthwise":
        if needs[0]:
            grad_x = ops.depthwise_conv2d_backward_input(grad_c, x, weight, stride, padding, dilation)
        if needs[1] or needs[2]:
            grad_weight, grad_bias = ops.depthwise_conv2d_backward_weight(grad_c, x, weight, stride, padding, dilation)
    elif kind == "pointwise":
        if needs[0]:
            grad_x = ops.pointwise_conv2d(grad_c, weight.transpose(0, 1))
        if needs[1]:
            grad_weight = ops.pointwise_conv2d_backward_weight(grad_c, x, in_scale=None, in_shift=None, in_activation=None)
            grad_weight = grad_weight.to(weight.dtype).view(weight.shape)
    else:
        grad_x, grad_weight = convolution_backward(
            grad_c, x, weight, stride, padding, dilation, groups, [needs[0], needs[1], False]
        )
        grad_x = in_layout(grad_x, x) if grad_x is not None else None
    if bias is not None and needs[2] and grad_bias is None:
        grad_bias = grad_c.sum(dim=(0, 2, 3))
    return grad_x, grad_weight, (grad_bias if bias is not None and needs[2] else None)


def _epilogue_grads(ctx, grad_y, x, weight, bias, scale, shift, y, residual) -> tuple:
    """(grad_c, grad_scale, grad_shift, grad_residual) of the epilogue, c being the conv with
    bias, recomputed only where the epilogue's derivative needs it."""
    has_residual, after = ctx.residual
    activation = ctx.activation

    def conv():
        return torch.ops.fastconv.conv2d_bn_act(x, weight, bias, *ctx.geometry, None, None, None)

    if not after:
        # act(z) (+ r): the residual's gradient is grad_y itself.
        grad_residual = grad_y if has_residual else None
        if ctx.from_output:
            return epilogue_backward(grad_y, y, None, None, activation)[0], None, None, grad_residual
        if not has_epilogue(scale, shift, activation):
            return grad_y, None, None, grad_residual
        return (*epilogue_backward(grad_y, conv(), scale, shift, activation), grad_residual)
    # act(z + r): the activation's derivative at u = z + r first; u's gradient is r's.
    c = None
    if activation is None:
        grad_u = grad_y
    elif ctx.from_output:
        grad_u = epilogue_backward(grad_y, y, None, None, activation)[0]
    else:
        c = conv()
        u = torch.ops.fastconv.bn_act(c, *filled_scale_shift(scale, shift, c.shape[1], c.device), None) + residual
        grad_u = epilogue_backward(grad_y, u, None, None, activation)[0]
    if scale is None and shift is None:
        return grad_u, None, None, grad_u
    return (*epilogue_backward(grad_u, c if c is not None else conv(), scale, shift, None), grad_u)


def _backward_forward(ctx, grad_y):
    x, weight, bias, scale, shift, y, residual = ctx.saved_tensors
    needs = input_grads_wanted(ctx, 12)
    with use_backend(ctx.backend):
        grad_c, grad_scale, grad_shift, grad_residual = _epilogue_grads(
            ctx, grad_y, x, weight, bias, scale, shift, y, residual
        )
        grad_x, grad_weight, grad_bias = _conv_grads(ctx, grad_c, x, weight, bias, needs)
    return (
        grad_x, grad_weight, grad_bias, None, None, None, None,
        grad_scale if needs[7] else None, grad_shift if needs[8] else None, None,
        grad_residual if needs[10] else None, None,
    )  # fmt: skip


conv2d_bn_act_op.register_autograd(_backward_forward, setup_context=_setup_forward)
register_autocast(conv2d_bn_act_op, cast=("x", "weight", "bias", "residual"))


def _setup_stats(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.geometry = (tuple(stride), tuple(padding), tuple(dilation), groups)
    ctx.backend = get_backend()
    # The statistics carry no gradient of their own: the training BatchNorm's backward
    # (fastconv::batch_norm_act_backward) differentiates through them into grad_c.
    ctx.mark_non_differentiable(output[1], output[2])


def _backward_stats(ctx, grad_c, _grad_mean, _grad_var):
    x, weight, bias = ctx.saved_tensors
    with use_backend(ctx.backend):
        grad_x, grad_weight, grad_bias = _conv_grads(ctx, grad_c, x, weight, bias, ctx.needs_input_grad)
    return grad_x, grad_weight, grad_bias, None, None, None, None


conv2d_batch_stats_op.register_autograd(_backward_stats, setup_context=_setup_stats)
register_autocast(conv2d_batch_stats_op, cast=("x", "weight", "bias"))


# Into a given output ------------------------------------------------------------------------------


def _into_triton(*, x, weight, stride, padding, dilation, groups, compute_stats, out, bias, scale, shift, activation):
    from fastconv.triton_kernels.conv_bn_act import conv_bn_act_forward

    bias, scale, shift = contiguous_vectors(bias, scale, shift)
    _, mean, var = conv_bn_act_forward(x, weight, out, bias, stride, padding, dilation, groups, scale, shift,
                                       activation_code(activation), compute_stats, allow_tf32())  # fmt: skip
    return mean, var


def _into_cuda(*, x, weight, stride, padding, dilation, groups, compute_stats, out, bias, scale, shift, activation):
    """The CUDA implicit GEMM's own store into `out` (its epilogue writes through out's strides)."""
    mean, var = torch.ops.fastconv_cuda.conv_bn_act_out(
        x, weight, bias, stride, padding, dilation, groups, scale, shift, activation_code(activation), compute_stats,
        allow_tf32(), None, False, out,
    )  # fmt: skip
    return (mean, var) if compute_stats else (None, None)


def _into_copying(backend: str):
    """The route's own op, then a copy into `out`: the torch reference."""

    def run(*, x, weight, stride, padding, dilation, groups, compute_stats, out, bias, scale, shift, activation):
        with use_backend(backend):
            if compute_stats:
                c, mean, var = torch.ops.fastconv.conv2d_batch_stats(x, weight, None, stride, padding, dilation, groups)
            else:
                c = torch.ops.fastconv.conv2d_bn_act(x, weight, bias, stride, padding, dilation, groups, scale, shift,
                                                     activation)  # fmt: skip
                mean = var = None
        out.copy_(c)
        return mean, var

    return run


INTO = OpImplementations("conv2d_out")
INTO.register("cuda", _into_cuda, refuse_float64_and_fp32_without_tf32("x"))
INTO.register("triton", _into_triton)
INTO.register("torch", _into_copying("torch"))


@torch.library.custom_op("fastconv::conv2d_out", mutates_args=("out",))
def conv2d_out_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    compute_stats: bool,
    out: torch.Tensor,
    # Defaults in the schema: the dense block calls it without an epilogue.
    bias: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit-GEMM convolution written into `out`, e.g. a channel slice of a dense block's
    feature buffer or of an Inception block's concatenation, with, when compute_stats, the
    per-channel batch mean and biased variance of what was written (else two empty tensors).
    Optionally with conv2d_bn_act's epilogue, act((conv + bias) * scale + shift), which statistics
    exclude (they are a training BatchNorm's input). The Triton and CUDA kernels store straight
    into `out`; the torch reference copies its output there."""
    args = (x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    _check_into_arguments(*args, scale, shift, activation, compute_stats, out)
    if x.shape[0] == 0:
        fill = float("nan") if compute_stats else 0.0
        stats = _stats_like(x, weight).fill_(fill)[: weight.shape[0] if compute_stats else 0]
        return stats, stats.clone()
    mean, var = INTO(x.device, call_key(*args, compute_stats, out, scale, shift, activation), x=x, weight=weight,
                     stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), groups=groups,
                     compute_stats=compute_stats, out=out, bias=bias, scale=scale, shift=shift,
                     activation=activation)  # fmt: skip
    if not compute_stats:
        empty = x.new_empty(0, dtype=accumulate_dtype(x.dtype))
        return empty, empty.clone()
    return mean, var


def _check_into_arguments(x, weight, bias, stride, padding, dilation, groups, scale, shift, activation, compute_stats,
                          out, real_tensors: bool = True) -> tuple[int, int]:  # fmt: skip
    size = _check_forward(x, weight, bias, stride, padding, dilation, groups, scale, shift, activation)
    _check_into(x, weight, size, out, real_tensors)
    if route(x.shape[1], weight.shape, stride, padding, groups) != "gemm":
        fail("conv2d_out serves the implicit GEMM only (not a depthwise or an unpadded stride-1 1x1 conv)")
    if compute_stats and has_epilogue(scale, shift, activation) or compute_stats and bias is not None:
        fail(f"compute_stats takes no bias or epilogue (its statistics are of the plain conv); got bias "
             f"{'given' if bias is not None else None}, scale {'given' if scale is not None else None}, shift "
             f"{'given' if shift is not None else None}, activation={activation!r}")  # fmt: skip
    return size


def _check_into(x, weight, size, out, real_tensors: bool = True) -> None:
    check_like("out", out, x)
    shape = (x.shape[0], weight.shape[0], *size)
    if tuple(out.shape) != shape:
        fail(f"out must have shape {shape}; got {tuple(out.shape)}")
    check_writable("out", out)
    if real_tensors and out.device.type != "meta" and may_overlap(out, x):
        fail("out must not overlap x: the kernel would read what it has already written")


@conv2d_out_op.register_fake
def _(x, weight, stride, padding, dilation, groups, compute_stats, out, bias=None, scale=None, shift=None,
      activation=None):  # fmt: skip  (the schema's defaults)
    real = not isinstance(out, torch._subclasses.FakeTensor)
    _check_into_arguments(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups, scale, shift,
                          activation, compute_stats, out, real)  # fmt: skip
    channels = weight.shape[0] if compute_stats else 0
    return _stats_like(x, weight)[:channels].clone(), _stats_like(x, weight)[:channels].clone()


# Routing and the public function ---------------------------------------------------------------


def route(in_channels: int, weight_shape: Sequence[int], stride, padding, groups: int) -> str:
    """Which kernel serves a convolution: "depthwise", "pointwise" or "gemm"."""
    if groups == in_channels > 1:
        return "depthwise"
    if groups == 1 and tuple(weight_shape[2:]) == (1, 1) and tuple(stride) == (1, 1) and not any(padding):
        return "pointwise"
    return "gemm"


def routed_conv2d_bn_act(x, weight, bias, stride, padding, dilation, groups, scale, shift, activation,
                         residual=None, activation_after_residual=False) -> torch.Tensor:  # fmt: skip
    """conv2d_bn_act with normalised arguments (padding as four numbers), on its kernel."""
    ops = torch.ops.fastconv
    kind = route(x.shape[1], weight.shape, stride, padding, groups) if x.dim() == 4 and weight.dim() == 4 else "gemm"
    after = bool(activation_after_residual) and residual is not None
    if kind == "depthwise":
        # The depthwise kernel has no residual epilogue (no model here asks for one): its
        # BatchNorm fused, then the add and the activation as eager ops.
        c = ops.depthwise_conv2d(x, weight, bias, stride, padding, dilation, scale, shift, None if after else activation)
        if residual is None:
            return c
        check_like("residual", residual, x)
        if residual.shape != c.shape:
            fail(f"residual must have the output's shape {tuple(c.shape)}; got {tuple(residual.shape)}")
        return reference.residual_epilogue(c, None, None, activation if after else None, residual, after)
    if kind == "pointwise":
        return ops.pointwise_conv2d(x, weight, bias, scale=scale, shift=shift, activation=activation, residual=residual,
                                    activation_after_residual=after)  # fmt: skip
    return ops.conv2d_bn_act(x, weight, bias, stride, padding, dilation, groups, scale, shift, activation, residual,
                             after)  # fmt: skip


def conv2d_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    activation_after_residual: bool = False,
) -> torch.Tensor:
    """A convolution with an optional fused BatchNorm (as scale/shift), activation and residual.

    Exactly ``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``, then per output
    channel ``act(y * scale + shift)`` when any of scale, shift, activation is given, then
    ``+ residual``; or ``act(y * scale + shift + residual)`` when activation_after_residual
    (ResNet's order).

    Args:
        x: (N, C_in, H, W), NCHW, channels_last or any strided view; read in place.
        weight: (C_out, C_in / groups, kh, kw) in x's dtype. bias: (C_out,) or None.
        stride, dilation: an int or a pair, >= 1.
        padding: an int, a pair, "same" or "valid", as F.conv2d takes it.
        groups: >= 1, dividing C_in and C_out.
        scale, shift: (C_out,) or None (1 and 0), in x's dtype or float32: an inference-mode
            BatchNorm, scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale.
        activation: None, "relu", "relu6", "silu" or "hardswish".
        residual: None or a tensor of the output's shape in x's dtype, any strides. The implicit
            GEMM and the 1x1 GEMM add it in their epilogue; a depthwise conv adds it after.

    Returns:
        (N, C_out, Ho, Wo) in x's dtype; channels_last when x's channels are innermost. Under
        autocast, x, weight and bias run in the autocast dtype, as F.conv2d does.
    """
    tensors_only(x, weight)
    kernel = tuple(weight.shape[2:]) if weight.dim() == 4 else (1, 1)
    stride_, padding_, dilation_ = normalise_geometry(kernel, stride, padding, dilation)
    x, weight, bias, residual = autocast_inputs(x, weight, bias, residual)
    return routed_conv2d_bn_act(x, weight, bias, stride_, padding_, dilation_, groups, scale, shift, activation,
                                residual, activation_after_residual)  # fmt: skip
