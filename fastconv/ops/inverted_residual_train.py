"""fastconv::inverted_residual_train: the inverted residual (and the depthwise-separable block)
in training, with exact batch-statistics BatchNorms, keeping for backward only the block's
input, its pre-BatchNorm projection (the output's size) and the statistics.

    e = conv1x1(x, We);            a1 = act_e(bn_e(e))        (absent: a1 = x)
    d = dwconv(a1, Wd);            a2 = act_d(bn_d(d))
    p = conv1x1(a2, Wp);           y  = act_p(bn_p(p)) (+ x)

each bn_* normalising with its batch's mean and biased variance over (N, H, W), as
nn.BatchNorm2d in training; the op returns them so that the modules update the running
statistics.

Forward on the `triton` backend, without writing e, a1, d or a2 (t times x's size each):
1. bn_e's statistics analytically: e is linear in x, so mean_e = We mean_x and
   var_e = diag(We cov_x We^T), from x's C_in x C_in covariance: x read twice (its mean, then
   a centred float32 copy, written and read once by a small GEMM: 2 N H W C_in^2 FLOPs, 1/t of
   the expansion's). Centring first keeps the variance's precision when |mean| >> std.
2. bn_d's statistics: one pass of the fused kernel that stops after the depthwise conv and
   reduces d per channel (triton_kernels/inverted_residual.hidden_statistics): x read, the
   expansion and depthwise recomputed, nothing stored but [programs, C_hid] partials.
3. the fused block (`fused_block`) with bn_e and bn_d folded from those statistics, writing p;
   then bn_p's statistics over p and the one-pass BatchNorm + activation (+ x).
So the forward reads x four times (two without an expansion) plus a float32 copy of it, and
computes the expansion and depthwise twice: the price of never storing the expanded tensor
(benchmarks/traffic.py counts these passes).

Backward (both backends): e and d are recomputed for this one block from x with fastconv's
unfused ops (transiently: one block's hidden tensors, freed before the next block's backward),
a2 never exists (the projection's weight gradient reads d through a BatchNorm-ReLU prologue),
and the chain's gradients run on fastconv's backward ops. Activation memory kept between
forward and backward is therefore x + p per block instead of the unfused chain's four hidden
tensors: about 1/t (tests/test_inverted_residual_train.py counts it).

The `torch` backend's forward is the unfused chain of fastconv's ops (the reference, the CPU
default and the float64 path).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastconv._affine import batch_norm_scale_shift
from fastconv._geometry import accumulate_dtype, empty_output, normalise_geometry
from fastconv._validation import check_channel_vector, fail
from fastconv.activations import activation_code
from fastconv.backends import OpImplementations, get_backend, use_backend
from fastconv.ops._autocast import register_autocast
from fastconv.ops._common import allow_tf32, call_key, contiguous_vectors, input_grads_wanted
from fastconv.ops.inverted_residual import _check, _fold, _triton_supports


_NORM_NAMES = ("expand_norm_weight", "expand_norm_bias", "dw_norm_weight", "dw_norm_bias", "project_norm_weight",
               "project_norm_bias")


def _check_train(x, expand_weight, dw_weight, project_weight, stride, padding, dilation, norms, eps, activations,
                 use_residual) -> tuple:  # fmt: skip
    """Checks every argument (the convs' as fastconv::inverted_residual does); returns the output shape."""
    shape = _check(x, expand_weight, dw_weight, project_weight, tuple(stride), tuple(padding), tuple(dilation),
                   None, None, activations[0], None, None, activations[1], None, None, activations[2], None)  # fmt: skip
    hidden, c_out = dw_weight.shape[0], project_weight.shape[0]
    for name, vector, length, per in zip(_NORM_NAMES, norms, (hidden, hidden, hidden, hidden, c_out, c_out),
                                         ("hidden channel",) * 4 + ("output channel",) * 2):  # fmt: skip
        if expand_weight is None and name.startswith("expand") and vector is not None:
            fail(f"{name} must be None when expand_weight is None (no expansion); got a tensor")
        check_channel_vector(vector, name, length, x, per=per)
    if not isinstance(eps, float) or not eps > 0:
        fail(f"eps must be a float > 0; got {eps!r}")
    if use_residual and (tuple(shape) != tuple(x.shape)):
        fail(f"use_residual needs the output's shape {tuple(shape)} to equal x's {tuple(x.shape)} (stride 1, C_out == C_in)")
    return shape


def _expansion_statistics(x: torch.Tensor, expand_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) over (N, H, W) of conv1x1(x, expand_weight), from x's mean and
    covariance (see step 1 of the module docstring); float32 (float64 for float64 x)."""
    wide = accumulate_dtype(x.dtype)
    c_in = x.shape[1]
    rows = x.permute(0, 2, 3, 1).reshape(-1, c_in)  # a view for channels_last x
    mean = rows.mean(0, dtype=wide)  # no float32 copy of x: the sum accumulates in wide
    centered = rows - mean  # the one float32 copy, centred as it is made
    covariance = centered.T @ centered / rows.shape[0]
    weight = expand_weight.reshape(expand_weight.shape[0], c_in).to(wide)
    return weight @ mean, ((weight @ covariance) * weight).sum(1).clamp_(min=0)


def _bn(mean: torch.Tensor, var: torch.Tensor, eps: float, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a training BatchNorm with these statistics."""
    return batch_norm_scale_shift(mean, torch.rsqrt(var + eps), weight, bias)


def _finish(p, norm_weight, norm_bias, eps, activation, x, use_residual):
    """bn_p's statistics over p, then act_p(bn_p(p)) (+ x)."""
    ops = torch.ops.fastconv
    mean, var = ops.batch_norm_stats(p)
    y = ops.batch_norm_act(p, mean, torch.rsqrt(var + eps), norm_weight, norm_bias, activation)
    return (y.add_(x) if use_residual else y), mean, var


def _empty_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    empty = x.new_empty(0, dtype=accumulate_dtype(x.dtype))
    return empty, empty.clone()


def _forward_torch(*, x, expand_weight, dw_weight, project_weight, stride, padding, dilation, norms, eps, activations,
                   use_residual):  # fmt: skip
    """The unfused chain on fastconv's ops, every intermediate written (the reference)."""
    ops = torch.ops.fastconv
    expand_w, expand_b, dw_w, dw_b, project_w, project_b = norms
    h, expand_stats = x, _empty_stats(x)
    if expand_weight is not None:
        e = ops.pointwise_conv2d(x, expand_weight)
        expand_stats = ops.batch_norm_stats(e)
        h = ops.batch_norm_act(e, expand_stats[0], torch.rsqrt(expand_stats[1] + eps), expand_w, expand_b, activations[0])
    d = ops.depthwise_conv2d(h, dw_weight, None, stride, padding, dilation, None, None, None)
    dw_mean, dw_var = ops.batch_norm_stats(d)
    a2 = ops.batch_norm_act(d, dw_mean, torch.rsqrt(dw_var + eps), dw_w, dw_b, activations[1])
    p = ops.pointwise_conv2d(a2, project_weight)
    y, mean, var = _finish(p, project_w, project_b, eps, activations[2], x, use_residual)
    return y, p, *expand_stats, dw_mean, dw_var, mean, var


def _forward_triton(*, x, expand_weight, dw_weight, project_weight, stride, padding, dilation, norms, eps, activations,
                    use_residual):  # fmt: skip
    """The three passes of the module docstring; e, a1, d and a2 are never stored."""
    from fastconv.triton_kernels import inverted_residual

    expand_w, expand_b, dw_w, dw_b, project_w, project_b = norms
    codes = [activation_code(a) for a in activations]
    kernel_size = tuple(dw_weight.shape[2:])
    expand, expand_shift, expand_stats = None, None, _empty_stats(x)
    if expand_weight is not None:
        expand_stats = _expansion_statistics(x, expand_weight)
        scale, expand_shift = _bn(*expand_stats, eps, expand_w, expand_b)
        expand = _fold(expand_weight, scale)
    (expand_shift,) = contiguous_vectors(expand_shift)
    p = empty_output(_check_train(x, expand_weight, dw_weight, project_weight, stride, padding, dilation, norms, eps,
                                  activations, False), x)  # fmt: skip
    dw = dw_weight.reshape(dw_weight.shape[0], -1)
    dw_mean, dw_var = inverted_residual.hidden_statistics(
        x, expand, expand_shift, dw, kernel_size, stride[0], (padding[0], padding[1]), tuple(p.shape[2:]), dilation[0],
        codes[0], allow_tf32(),
    )  # fmt: skip
    scale, dw_shift = _bn(dw_mean, dw_var, eps, dw_w, dw_b)
    (dw_shift,) = contiguous_vectors(dw_shift)
    inverted_residual.fused_block(
        x, expand, expand_shift, _fold(dw_weight, scale), dw_shift, _fold(project_weight, None), None, p, kernel_size,
        stride[0], (padding[0], padding[1]), dilation[0], codes[0], codes[1], 0, None, allow_tf32(),
    )  # fmt: skip
    y, mean, var = _finish(p, project_w, project_b, eps, activations[2], x, use_residual)
    return y, p, *expand_stats, dw_mean, dw_var, mean, var


FORWARD = OpImplementations("inverted_residual_train")
FORWARD.register("triton", _forward_triton, _triton_supports)
FORWARD.register("torch", _forward_torch)


@torch.library.custom_op("fastconv::inverted_residual_train", mutates_args=())
def inverted_residual_train_op(
    x: torch.Tensor,
    expand_weight: Optional[torch.Tensor],
    dw_weight: torch.Tensor,
    project_weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    expand_norm_weight: Optional[torch.Tensor],
    expand_norm_bias: Optional[torch.Tensor],
    dw_norm_weight: Optional[torch.Tensor],
    dw_norm_bias: Optional[torch.Tensor],
    project_norm_weight: Optional[torch.Tensor],
    project_norm_bias: Optional[torch.Tensor],
    eps: float,
    expand_activation: Optional[str],
    dw_activation: Optional[str],
    project_activation: Optional[str],
    use_residual: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, p, expand_mean, expand_var, dw_mean, dw_var, project_mean, project_var): the block's
    output, its projection before bn_p (kept for backward), and each BatchNorm's batch mean and
    biased variance (float32; float64 for float64 x; expand_* empty without an expansion).
    Only y is differentiable: the others are what the modules read, never a loss's input."""
    norms = (expand_norm_weight, expand_norm_bias, dw_norm_weight, dw_norm_bias, project_norm_weight, project_norm_bias)
    activations = (expand_activation, dw_activation, project_activation)
    geometry = (tuple(stride), tuple(padding), tuple(dilation))
    shape = _check_train(x, expand_weight, dw_weight, project_weight, *geometry, norms, eps, activations, use_residual)
    if x.shape[0] * shape[2] * shape[3] == 0:
        fail(f"x must have at least one output pixel per channel to take batch statistics from; got output shape {shape}")
    key = call_key(x, expand_weight, dw_weight, project_weight, *geometry, *norms, eps, *activations, use_residual)
    return FORWARD(
        x.device, key, x=x, expand_weight=expand_weight, dw_weight=dw_weight, project_weight=project_weight,
        stride=geometry[0], padding=geometry[1], dilation=geometry[2], norms=norms, eps=eps, activations=activations,
        use_residual=use_residual,
    )  # fmt: skip


@inverted_residual_train_op.register_fake
def _(x, expand_weight, dw_weight, project_weight, stride, padding, dilation, ew, eb, dw, db, pw, pb, eps, ea, da, pa,
      use_residual):  # fmt: skip
    shape = _check_train(x, expand_weight, dw_weight, project_weight, stride, padding, dilation, (ew, eb, dw, db, pw, pb),
                         eps, (ea, da, pa), use_residual)  # fmt: skip
    wide = accumulate_dtype(x.dtype)
    hidden, c_out = dw_weight.shape[0], project_weight.shape[0]
    stats = lambda n: (x.new_empty(n, dtype=wide), x.new_empty(n, dtype=wide))  # noqa: E731
    expand = hidden if expand_weight is not None else 0
    return (empty_output(shape, x), empty_output(shape, x), *stats(expand), *stats(hidden), *stats(c_out))


def _setup_context(ctx, inputs, output) -> None:
    (x, expand_weight, dw_weight, project_weight, stride, padding, dilation, *norms, eps, ea, da, pa,
     use_residual) = inputs  # fmt: skip
    _, p, *stats = output
    ctx.geometry = (tuple(stride), tuple(padding), tuple(dilation))
    ctx.options = (eps, (ea, da, pa), use_residual, expand_weight is not None)
    ctx.norm_present = [n is not None for n in norms]
    ctx.save_for_backward(x, expand_weight, dw_weight, project_weight, p, *stats, *norms)
    ctx.backend = get_backend()
    ctx.mark_non_differentiable(p, *stats)


def _to(grad: torch.Tensor, like: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if like is None else grad.to(like.dtype)


def _backward(ctx, grad_y, *_non_differentiable):
    x, expand_weight, dw_weight, project_weight, p, em, ev, dm, dv, pm, pv, *norms = ctx.saved_tensors
    expand_w, expand_b, dw_w, dw_b, project_w, project_b = norms
    (eps, (act_e, act_d, act_p), use_residual, has_expand) = ctx.options
    stride, padding, dilation = ctx.geometry
    needs = input_grads_wanted(ctx, 18)
    ops = torch.ops.fastconv
    grads = [None] * 18
    with use_backend(ctx.backend):
        # In p's layout (an expanded or sliced gradient, as sum().backward() gives, made dense).
        channels_last = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        grad_y = grad_y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        # Recompute this block's hidden tensors (see the module docstring): e and a1, then d.
        a1 = x
        if has_expand:
            e = ops.pointwise_conv2d(x, expand_weight)
            a1 = ops.batch_norm_act(e, em, torch.rsqrt(ev + eps), expand_w, expand_b, act_e)
        d = ops.depthwise_conv2d(a1, dw_weight, None, stride, padding, dilation, None, None, None)
        grad_p, gw, gb = ops.batch_norm_act_backward(grad_y, p, pm, torch.rsqrt(pv + eps), project_w, project_b, act_p)
        grads[11], grads[12] = _to(gw, project_w), _to(gb, project_b)
        scale, shift = _bn(dm, dv, eps, dw_w, dw_b)
        if needs[3]:  # the projection reads a2 = act_d(bn_d(d)) through its prologue: a2 is never stored
            grads[3] = ops.pointwise_conv2d_backward_weight(
                grad_p, d, in_scale=scale, in_shift=shift, in_activation=act_d
            ).to(project_weight.dtype).view(project_weight.shape)  # fmt: skip
        grad_a2 = ops.pointwise_conv2d(grad_p, project_weight.transpose(0, 1))
        del grad_p
        grad_d, gw, gb = ops.batch_norm_act_backward(grad_a2, d, dm, torch.rsqrt(dv + eps), dw_w, dw_b, act_d)
        grads[9], grads[10] = _to(gw, dw_w), _to(gb, dw_b)
        del grad_a2, d
        if needs[2]:
            grads[2] = ops.depthwise_conv2d_backward_weight(grad_d, a1, dw_weight, stride, padding, dilation)[0]
            grads[2] = grads[2].to(dw_weight.dtype)
        grad_x = ops.depthwise_conv2d_backward_input(grad_d, a1, dw_weight, stride, padding, dilation)
        del grad_d
        if has_expand:
            grad_e, gw, gb = ops.batch_norm_act_backward(grad_x, e, em, torch.rsqrt(ev + eps), expand_w, expand_b, act_e)
            grads[7], grads[8] = _to(gw, expand_w), _to(gb, expand_b)
            del a1, e
            if needs[1]:
                grads[1] = ops.pointwise_conv2d_backward_weight(grad_e, x, in_scale=None, in_shift=None, in_activation=None)
                grads[1] = grads[1].to(expand_weight.dtype).view(expand_weight.shape)
            grad_x = ops.pointwise_conv2d(grad_e, expand_weight.transpose(0, 1))
        if use_residual:
            grad_x = grad_x + grad_y
    grads[0] = grad_x if needs[0] else None
    return tuple(g if needs[i] else None for i, g in enumerate(grads))


inverted_residual_train_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast(inverted_residual_train_op, cast=("x", "expand_weight", "dw_weight", "project_weight"))


def inverted_residual_train(
    x: torch.Tensor,
    expand_weight: Optional[torch.Tensor],
    dw_weight: torch.Tensor,
    project_weight: torch.Tensor,
    norms: Sequence[Optional[torch.Tensor]],
    *,
    stride=1,
    padding=None,
    dilation=1,
    eps: float = 1e-5,
    activations: Sequence[Optional[str]] = ("relu6", "relu6", None),
    use_residual: bool = False,
):
    """torch.ops.fastconv.inverted_residual_train with int-or-pair geometry (padding
    (k - 1) // 2 * dilation by default); norms = (expand weight, expand bias, dw weight, dw
    bias, project weight, project bias), None entries for affine=False or no expansion."""
    if not isinstance(dw_weight, torch.Tensor) or dw_weight.dim() != 4:
        fail(f"dw_weight must be a 4-D tensor (C_hid, 1, kh, kw); got {getattr(dw_weight, 'shape', type(dw_weight).__name__)}")
    kernel = tuple(dw_weight.shape[2:])
    if padding is None:
        dilation_ = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
        padding = tuple((k - 1) // 2 * d for k, d in zip(kernel, dilation_))
    stride, padding, dilation = normalise_geometry(kernel, stride, padding, dilation)
    if len(norms) != 6:
        fail(f"norms must hold 6 entries (weight and bias of each BatchNorm); got {len(norms)}")
    return torch.ops.fastconv.inverted_residual_train(
        x, expand_weight, dw_weight, project_weight, stride, padding, dilation, *norms, float(eps), *activations,
        bool(use_residual),
    )  # fmt: skip


__all__ = ["inverted_residual_train"]
