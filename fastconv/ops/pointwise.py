"""fastconv::pointwise_conv2d: a 1x1 convolution as one GEMM with its neighbours fused in.

    a = in_act(x * in_scale + in_shift)            prologue, per input channel, on load
    z = (conv1x1(a, weight) + bias) * scale + shift epilogue, per output channel
    y = act(z) + residual, or act(z + residual)     ResNet adds before its ReLU

The prologue is DenseNet's BN -> ReLU before a bottleneck conv: the normalised features never
exist in memory. `x` may be a channel slice of a wider channels_last buffer (DenseNet's growing
concatenation) and is read in place; `out=` writes into such a slice.

Backward: the pre-epilogue conv is recomputed (one GEMM) rather than kept from the forward, the
epilogue's and prologue's derivatives go through bn_act's backward, grad_input is the same
GEMM with the transposed weight, and grad_weight is a deterministic reduction over pixels.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastconv import reference
from fastconv._geometry import accumulate_dtype, empty_output
from fastconv._validation import check_channel_vector, check_rank, check_shape, fail
from fastconv.activations import activation_code
from fastconv.backends import OpImplementations, get_backend, use_backend
from fastconv.ops._autocast import register_autocast
from fastconv.ops._common import (
    NCHW,
    allow_tf32,
    autocast_inputs,
    call_key,
    check_activation_input,
    input_grads_wanted,
    may_overlap,
    check_bias,
    check_epilogue,
    check_like,
    check_writable,
    contiguous_vectors,
    refuse_float64_and_fp32_without_tf32,
    tensors_only,
)
from fastconv.ops._conv_common import filled_scale_shift

# The epilogue and prologue arguments, in the schema's order after (x, weight).
_EPILOGUE = (
    "bias", "scale", "shift", "activation", "residual", "activation_after_residual", "in_scale", "in_shift",
    "in_activation",
)  # fmt: skip


def _check(x, weight, bias, scale, shift, activation, residual, in_scale, in_shift, in_activation) -> tuple:
    """Checks every argument; returns the output shape."""
    check_activation_input(x)
    check_like("weight", weight, x)
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
        fail(f"weight must have shape (C_out, C_in, 1, 1) for a 1x1 conv; got {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        fail(f"weight.shape[1] must equal x's {x.shape[1]} input channels; got {weight.shape[1]}")
    out_channels = weight.shape[0]
    check_bias(bias, out_channels, x)
    check_epilogue(scale, shift, activation, out_channels, x)
    for name, vector in (("in_scale", in_scale), ("in_shift", in_shift)):
        check_channel_vector(vector, name, x.shape[1], x, per="input channel")
    activation_code(in_activation, "in_activation")
    shape = (x.shape[0], out_channels, x.shape[2], x.shape[3])
    if residual is not None:
        check_like("residual", residual, x)
        check_shape(residual, "residual", shape)
    return shape


def _check_out(out: torch.Tensor, shape, x, weight, residual, real_tensors: bool = True) -> None:
    check_like("out", out, x)
    check_shape(out, "out", shape)
    check_writable("out", out)
    if not real_tensors:
        return  # fake tensors have no addresses to compare
    for name, other in (("x", x), ("weight", weight), ("residual", residual)):
        if other is not None and may_overlap(out, other):
            fail(f"out must not overlap {name}: the kernel would read what it has already written")


# Backend implementations: each writes into `out` -------------------------------------------------


def _forward_torch(*, out, x, weight, **epilogue):
    return out.copy_(reference.pointwise_conv2d(x, weight, **epilogue))


def _forward_triton(
    *, out, x, weight, bias, scale, shift, activation, residual, activation_after_residual, in_scale, in_shift,
    in_activation,
):  # fmt: skip
    from fastconv.triton_kernels import pointwise

    bias, scale, shift, in_scale, in_shift = contiguous_vectors(bias, scale, shift, in_scale, in_shift)
    return pointwise.pointwise_gemm(
        x, weight[:, :, 0, 0], out, bias, scale, shift, activation_code(activation), residual,
        activation_after_residual, in_scale, in_shift, activation_code(in_activation), allow_tf32(),
    )  # fmt: skip


def _forward_cuda(
    *, out, x, weight, bias, scale, shift, activation, residual, activation_after_residual, in_scale, in_shift,
    in_activation,
):  # fmt: skip
    torch.ops.fastconv_cuda.pointwise_forward(
        x, weight[:, :, 0, 0], bias, scale, shift, activation_code(activation), residual, activation_after_residual,
        in_scale, in_shift, activation_code(in_activation), allow_tf32(), out,
    )  # fmt: skip
    return out


def _weight_grad_torch(*, grad_c, x, in_scale, in_shift, in_activation):
    a = reference.pointwise_prologue(x, in_scale, in_shift, in_activation)
    wide = accumulate_dtype(x.dtype)
    return torch.einsum("njhw,nkhw->jk", grad_c.to(wide), a.to(wide))


def _pixel_matrix(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as an (N*H*W, C) matrix: a view for channels_last tensors, else a copy."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _weight_grad_cuda(*, grad_c, x, in_scale, in_shift, in_activation):
    """cuBLAS: grad_w = grad_c^T a as one GEMM over the pixels, a being the prologue's output,
    which is materialised here (one write and one read of x's size when there is a prologue).

    Not yet a kernel of fastconv's own: the forward kernel's operand loaders reduce over
    channels, this GEMM reduces over pixels. cuBLAS is deterministic for a fixed shape."""
    a = reference.pointwise_prologue(x, in_scale, in_shift, in_activation)
    g, a = _pixel_matrix(grad_c).t(), _pixel_matrix(a)
    if x.dtype in (torch.float16, torch.bfloat16):
        if "dtype" in torch.ops.aten.mm.overloads() and g.is_cuda:
            return torch.mm(g, a, out_dtype=torch.float32)  # fp32 accumulate and result
        # A torch without mm's out_dtype (before 2.8), or CPU tensors (tests/cuda_emulation's),
        # which it does not take.
        return torch.mm(g.float(), a.float())
    return torch.mm(g, a).to(accumulate_dtype(x.dtype))


def _weight_grad_triton(*, grad_c, x, in_scale, in_shift, in_activation):
    from fastconv.triton_kernels import pointwise_backward

    in_scale, in_shift = contiguous_vectors(in_scale, in_shift)
    return pointwise_backward.pointwise_weight_grad(
        grad_c, x, in_scale, in_shift, activation_code(in_activation), allow_tf32()
    )


def _with_stats_cuda(*, x, weight, bias):
    # The CUDA pointwise GEMM has no statistics epilogue yet: one batch_norm_stats pass over c.
    c = empty_output((x.shape[0], weight.shape[0], *x.shape[2:]), x)
    epilogue = {**dict.fromkeys(_EPILOGUE), "bias": bias, "activation_after_residual": False}
    _forward_cuda(out=c, x=x, weight=weight, **epilogue)
    with use_backend("cuda"):
        mean, var = torch.ops.fastconv.batch_norm_stats(c)
    return c, mean, var


def _with_stats_triton(*, x, weight, bias):
    from fastconv.triton_kernels import pointwise

    c = empty_output((x.shape[0], weight.shape[0], *x.shape[2:]), x)
    (bias,) = contiguous_vectors(bias)
    return pointwise.pointwise_gemm_with_stats(x, weight[:, :, 0, 0], c, bias, allow_tf32())


def _with_stats_torch(*, x, weight, bias):
    c = empty_output((x.shape[0], weight.shape[0], *x.shape[2:]), x)
    _forward_torch(out=c, x=x, weight=weight, bias=bias)
    mean, var = reference.batch_norm_stats(c)
    return c, mean, var


FORWARD = OpImplementations("pointwise_conv2d")
FORWARD.register("cuda", _forward_cuda, refuse_float64_and_fp32_without_tf32("x"))
FORWARD.register("triton", _forward_triton)
FORWARD.register("torch", _forward_torch)

WEIGHT_GRAD = OpImplementations("pointwise_conv2d_backward_weight")
WEIGHT_GRAD.register("cuda", _weight_grad_cuda)
WEIGHT_GRAD.register("triton", _weight_grad_triton)
WEIGHT_GRAD.register("torch", _weight_grad_torch)

WITH_STATS = OpImplementations("pointwise_conv2d with batch statistics")
WITH_STATS.register("cuda", _with_stats_cuda, refuse_float64_and_fp32_without_tf32("x"))
WITH_STATS.register("triton", _with_stats_triton)
WITH_STATS.register("torch", _with_stats_torch)


def forward_with_stats(backend: str, *, x, weight, bias):
    """(c, mean, var): the plain 1x1 conv on `backend` and its per-channel batch mean and biased
    variance, fused into the GEMM's epilogue where the backend can; conv2d_batch_stats's
    pointwise route. Arguments are checked by the caller's op."""
    return WITH_STATS.run(backend, x.device, x=x, weight=weight, bias=bias)


def _run_forward(out, x, weight, epilogue: dict):
    key = call_key(out, x, weight, *epilogue.values())
    return FORWARD(x.device, key, out=out, x=x, weight=weight, **epilogue)


# Registered ops --------------------------------------------------------------------------------


@torch.library.custom_op("fastconv::pointwise_conv2d", mutates_args=())
def pointwise_conv2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    # Defaults in the schema let other families call the op by keyword with only what they use.
    bias: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    activation_after_residual: bool = False,
    in_scale: Optional[torch.Tensor] = None,
    in_shift: Optional[torch.Tensor] = None,
    in_activation: Optional[str] = None,
) -> torch.Tensor:
    epilogue = dict(zip(_EPILOGUE, (
        bias, scale, shift, activation, residual, activation_after_residual, in_scale, in_shift, in_activation,
    )))  # fmt: skip
    out = empty_output(_check(x, weight, bias, scale, shift, activation, residual, in_scale, in_shift, in_activation), x)
    if out.numel() == 0:
        return out
    return _run_forward(out, x, weight, epilogue)


@pointwise_conv2d_op.register_fake
def _(x, weight, bias=None, scale=None, shift=None, activation=None, residual=None, activation_after_residual=False,
      in_scale=None, in_shift=None, in_activation=None):  # fmt: skip  (the schema's defaults)
    return empty_output(_check(x, weight, bias, scale, shift, activation, residual, in_scale, in_shift, in_activation), x)


@torch.library.custom_op("fastconv::pointwise_conv2d_out", mutates_args=("out",))
def pointwise_conv2d_out_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    activation: Optional[str],
    residual: Optional[torch.Tensor],
    activation_after_residual: bool,
    in_scale: Optional[torch.Tensor],
    in_shift: Optional[torch.Tensor],
    in_activation: Optional[str],
    out: torch.Tensor,
) -> None:
    """pointwise_conv2d written into `out`, e.g. a channel slice of a concatenation buffer."""
    epilogue = dict(zip(_EPILOGUE, (
        bias, scale, shift, activation, residual, activation_after_residual, in_scale, in_shift, in_activation,
    )))  # fmt: skip
    shape = _check(x, weight, bias, scale, shift, activation, residual, in_scale, in_shift, in_activation)
    _check_out(out, shape, x, weight, residual)
    if out.numel():
        _run_forward(out, x, weight, epilogue)


@pointwise_conv2d_out_op.register_fake
def _(x, weight, bias, scale, shift, activation, residual, activation_after_residual, in_scale, in_shift, in_activation, out):
    shape = _check(x, weight, bias, scale, shift, activation, residual, in_scale, in_shift, in_activation)
    _check_out(out, shape, x, weight, residual, real_tensors=False)


@torch.library.custom_op("fastconv::pointwise_conv2d_backward_weight", mutates_args=())
def pointwise_conv2d_backward_weight_op(
    grad_c: torch.Tensor,
    x: torch.Tensor,
    in_scale: Optional[torch.Tensor],
    in_shift: Optional[torch.Tensor],
    in_activation: Optional[str],
) -> torch.Tensor:
    """sum over pixels of grad_c[j] * in_act(x * in_scale + in_shift)[k], as (C_out, C_in) in
    float32 (float64 for float64 inputs); deterministic."""
    _check_weight_grad(grad_c, x, in_scale, in_shift, in_activation)
    if grad_c.numel() == 0 or x.numel() == 0:
        return _weight_grad_like(grad_c, x).zero_()
    return WEIGHT_GRAD(
        x.device, call_key(grad_c, x, in_scale, in_shift, in_activation),
        grad_c=grad_c, x=x, in_scale=in_scale, in_shift=in_shift, in_activation=in_activation,
    )  # fmt: skip


def _check_weight_grad(grad_c, x, in_scale, in_shift, in_activation) -> None:
    check_rank(x, "x", 4, NCHW)
    check_rank(grad_c, "grad_c", 4, NCHW)
    check_like("grad_c", grad_c, x)
    if grad_c.shape[0] != x.shape[0] or grad_c.shape[2:] != x.shape[2:]:
        fail(f"grad_c must have x's batch and spatial sizes {(x.shape[0], *x.shape[2:])}; got {tuple(grad_c.shape)}")
    for name, vector in (("in_scale", in_scale), ("in_shift", in_shift)):
        check_channel_vector(vector, name, x.shape[1], x, per="input channel")
    activation_code(in_activation, "in_activation")


def _weight_grad_like(grad_c, x):
    return torch.empty(grad_c.shape[1], x.shape[1], dtype=accumulate_dtype(x.dtype), device=x.device)


@pointwise_conv2d_backward_weight_op.register_fake
def _(grad_c, x, in_scale, in_shift, in_activation):
    _check_weight_grad(grad_c, x, in_scale, in_shift, in_activation)
    return _weight_grad_like(grad_c, x)


# Autograd ------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, scale, shift, activation, residual, after, in_scale, in_shift, in_activation = inputs
    # The residual is needed only when the activation follows it (its derivative is taken there).
    kept_residual = residual if after else None
    ctx.save_for_backward(x, weight, bias, scale, shift, in_scale, in_shift, kept_residual)
    ctx.options = (activation, residual is not None, after, in_activation)
    ctx.backend = get_backend()  # autograd's CUDA worker thread does not see use_backend()


def _epilogue_backward(grad_y, x, weight, bias, scale, shift, residual, options, in_scale, in_shift):
    """(grad_c, grad_scale, grad_shift, grad_residual), c being the conv output with bias."""
    activation, has_residual, after, in_activation = options
    if scale is None and shift is None and activation is None:
        # y = c (+ residual): nothing to recompute, nothing to differentiate.
        return grad_y, None, None, grad_y if has_residual else None
    ops = torch.ops.fastconv
    c = ops.pointwise_conv2d(x, weight, bias, in_scale=in_scale, in_shift=in_shift, in_activation=in_activation)
    scale_, shift_ = filled_scale_shift(scale, shift, weight.shape[0], x.device)
    if not (after and has_residual):
        grad_c, grad_scale, grad_shift = ops.bn_act_backward(grad_y, c, scale_, shift_, activation)
        return grad_c, grad_scale, grad_shift, grad_y if has_residual else None
    # y = act(z + residual): differentiate the activation at u = z + residual first.
    u = ops.bn_act(c, scale_, shift_, None) + residual
    grad_u, _, _ = ops.bn_act_backward(grad_y, u, torch.ones_like(scale_), torch.zeros_like(scale_), activation)
    grad_c, grad_scale, grad_shift = ops.bn_act_backward(grad_u, c, scale_, shift_, None)
    return grad_c, grad_scale, grad_shift, grad_u


def _backward(ctx, grad_y):
    x, weight, bias, scale, shift, in_scale, in_shift, residual = ctx.saved_tensors
    in_activation = ctx.options[3]
    needs = input_grads_wanted(ctx, 11)
    ops = torch.ops.fastconv
    grads = dict.fromkeys(("x", "weight", "bias", "scale", "shift", "residual", "in_scale", "in_shift"))
    with use_backend(ctx.backend):
        grad_c, grads["scale"], grads["shift"], grads["residual"] = _epilogue_backward(
            grad_y, x, weight, bias, scale, shift, residual, ctx.options, in_scale, in_shift
        )
        if needs[2]:
            grads["bias"] = grad_c.sum(dim=(0, 2, 3))
        if needs[1]:
            grad_weight = ops.pointwise_conv2d_backward_weight(grad_c, x, in_scale, in_shift, in_activation)
            grads["weight"] = grad_weight.to(weight.dtype).view(weight.shape)
        if needs[0] or needs[8] or needs[9]:
            grad_a = ops.pointwise_conv2d(grad_c, weight.transpose(0, 1))
            if in_scale is None and in_shift is None and in_activation is None:
                grads["x"] = grad_a
            else:
                in_scale_, in_shift_ = filled_scale_shift(in_scale, in_shift, x.shape[1], x.device)
                grads["x"], grads["in_scale"], grads["in_shift"] = ops.bn_act_backward(
                    grad_a, x, in_scale_, in_shift_, in_activation
                )
    order = ("x", "weight", "bias", "scale", "shift", None, "residual", None, "in_scale", "in_shift", None)
    return tuple(grads[name] if name is not None and needs[i] else None for i, name in enumerate(order))


pointwise_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(pointwise_conv2d_op, cast=("x", "weight", "bias", "residual"))


# Public function -----------------------------------------------------------------------------


def pointwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    activation_after_residual: bool = False,
    in_scale: Optional[torch.Tensor] = None,
    in_shift: Optional[torch.Tensor] = None,
    in_activation: Optional[str] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A 1x1 convolution with a fused BatchNorm/activation/residual epilogue and prologue.

    Args:
        x: (N, C_in, H, W), any layout; a channel slice of a channels_last buffer is read in place.
        weight: (C_out, C_in, 1, 1) in x's dtype. bias: (C_out,) or None.
        scale, shift: (C_out,) or None: the epilogue's folded BatchNorm (x's dtype or float32).
        activation: None, "relu", "relu6", "silu" or "hardswish", after the epilogue's affine.
        residual: (N, C_out, H, W) or None, added after the activation, or before it when
            activation_after_residual (ResNet's bottleneck).
        in_scale, in_shift, in_activation: the prologue, per input channel, applied as x is read.
        out: a (N, C_out, H, W) tensor to write into, e.g. a channel slice of a concatenation
            buffer. It must not overlap x, weight or residual. Not differentiable.

    Returns:
        (N, C_out, H, W) in x's dtype (channels_last when x's channels are innermost), or `out`.
    """
    tensors_only(x, weight)
    x, weight, bias, residual = autocast_inputs(x, weight, bias, residual)
    args = (x, weight, bias, scale, shift, activation, residual, activation_after_residual, in_scale, in_shift, in_activation)
    if out is None:
        return torch.ops.fastconv.pointwise_conv2d(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, scale, shift, residual, in_scale, in_shift)):
        fail("out= is not differentiable: call pointwise_conv2d without out= where gradients are needed")
    torch.ops.fastconv.pointwise_conv2d_out(*args, out)
    return out
