"""fastconv::dense_block_train and fastconv::dense_block_eval: a whole DenseNet dense block on
one feature buffer, with no concatenation ever copied and memory linear in depth.

torchvision's block concatenates afresh for every layer (`torch.cat(inputs, 1)`), and autograd
keeps each layer's concatenation, its BatchNorm output and its ReLU output: per layer three
tensors as wide as everything before it, so activation memory grows quadratically with depth.
Here each block allocates one channels_last buffer of C0 + L*k channels, writes the block input
into its first C0 channels once, and every layer j

    reads   prefix = buffer[:, :C0 + j*k] in place, BatchNorm + ReLU applied on load as the
            1x1 conv's prologue (neither the concatenation nor its normalisation exists),
    runs    the 1x1 conv to B = bn_size*k channels, then BatchNorm + ReLU,
    writes  the 3x3 conv's k channels into buffer[:, C0 + j*k : C0 + (j+1)*k].

Why channels_last: a channel prefix of every pixel is then one contiguous run, which the GEMMs'
vector loads need (the CUDA pointwise kernel's vector path wants channel stride 1).

Shared statistics (training). A channel never changes once written, so its batch mean and
variance are the same for every later layer's BatchNorm that reads it; only the affine
parameters differ. They are computed once, when the channel is produced (the 3x3 conv's
statistics epilogue, conv2d_batch_stats), and returned, so that each layer's BatchNorm2d can
still update its own running statistics exactly.

Backward. One gradient buffer of the features' shape; layers are visited last to first, and
layer j adds its gradient into the prefix slice grad[:, :C0 + j*k], so no per-layer cat or
split is copied, and no float atomics are used (deterministic). In training the add is the
BatchNorm backward's own store (batch_norm_act_backward_accumulate, in the Triton and the CUDA
grad-input kernels). Each layer's BatchNorm is
differentiated on its own, through its batch statistics: shared statistics are a way of
computing the same function as torchvision's, not a different function. The prologue is
recomputed inside the weight-gradient kernel (pointwise_conv2d_backward_weight applies it on
load) and never stored.

What is kept for backward: the buffer and each layer's B-channel bottleneck (the 1x1 conv's
output before its BatchNorm), both linear in depth. The bottleneck's BatchNorm + ReLU output
is recomputed (one elementwise pass), as is, in eval mode, the bottleneck itself (one GEMM).

The ops compose fastconv's pointwise, batch-norm and implicit-GEMM ops, so every backend
(cuda, triton, torch) runs the block on its own kernels. The 3x3 conv stores straight into the
buffer's slice (conv2d_out: the implicit GEMM's store follows the slice's strides, in Triton
and CUDA alike) and the prologue gradient is added into the gradient buffer by the BatchNorm
backward's own store (batch_norm_act_backward_accumulate); only the torch reference copies.
The CUDA versions are compiled and Meta-checked here, unrun: no GPU has run them yet.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastconv._affine import batch_norm_scale_shift
from fastconv._geometry import accumulate_dtype
from fastconv._validation import check_channel_vector, check_same_device, fail
from fastconv.backends import get_backend, use_backend
from fastconv.ops._autocast import register_autocast
from fastconv.ops._common import check_activation_input, check_like, input_grads_wanted
from fastconv.ops._conv_common import convolution_backward

# The 3x3 conv's geometry, normalised (padding as top, left, bottom, right).
_STRIDE, _PADDING, _DILATION = (1, 1), (1, 1, 1, 1), (1, 1)


# Checks -----------------------------------------------------------------------------------------


def _check(x, conv1_weight, conv2_weight, norm1: dict, norm2: dict) -> tuple[int, int, int]:
    """Checks every argument; returns (num_layers, growth_rate, bottleneck channels).

    norm1 and norm2 map argument names to their per-layer lists of vectors: layer j's norm1
    vectors have C0 + j*k values (the prefix it reads), its norm2 vectors B."""
    check_activation_input(x)
    layers = len(conv1_weight)
    if len(conv2_weight) != layers:
        fail(f"conv2_weight must have one weight per layer ({layers}, as conv1_weight); got {len(conv2_weight)}")
    for name, vectors in (*norm1.items(), *norm2.items()):
        if len(vectors) != layers:
            fail(f"{name} must have one vector per layer ({layers}, as conv1_weight); got {len(vectors)}")
    if layers == 0:
        return 0, 0, 0
    growth, bottleneck = conv2_weight[0].shape[0], conv1_weight[0].shape[0]
    if growth < 1:
        fail(f"conv2_weight[0].shape[0] (growth_rate) must be >= 1; got {growth}")
    for j in range(layers):
        prefix = x.shape[1] + j * growth
        for name, weight, shape in (
            ("conv1_weight", conv1_weight[j], (bottleneck, prefix, 1, 1)),
            ("conv2_weight", conv2_weight[j], (growth, bottleneck, 3, 3)),
        ):
            check_like(f"{name}[{j}]", weight, x)
            if tuple(weight.shape) != shape:
                fail(f"{name}[{j}] must have shape {shape} (layer {j} reads {prefix} channels); got {tuple(weight.shape)}")
        for norm, channels, per in ((norm1, prefix, "channel of its prefix"), (norm2, bottleneck, "bottleneck channel")):
            for name, vectors in norm.items():
                if vectors[j] is None:
                    fail(f"{name}[{j}] must be a tensor; got None")
                check_channel_vector(vectors[j], f"{name}[{j}]", channels, x, per=per)
    return layers, growth, bottleneck


def _check_masks(dropout_mask, drop_rate: float, x, layers: int, growth: int) -> None:
    if not 0.0 <= drop_rate < 1.0:
        fail(f"drop_rate must be in [0, 1); got {drop_rate}")
    if not dropout_mask:
        return
    if drop_rate == 0.0 or len(dropout_mask) != layers:
        fail(
            f"dropout_mask must be empty or one mask per layer ({layers}) with drop_rate > 0; got "
            f"{len(dropout_mask)} masks and drop_rate {drop_rate}"
        )
    shape = (x.shape[0], growth, *x.shape[2:])
    for j, mask in enumerate(dropout_mask):
        check_same_device(f"dropout_mask[{j}]", mask, "x", x)
        if mask.dtype != torch.bool or tuple(mask.shape) != shape:
            fail(f"dropout_mask[{j}] must be a bool tensor of shape {shape}; got {mask.dtype} {tuple(mask.shape)}")


# Buffers ----------------------------------------------------------------------------------------


def _features_like(x: torch.Tensor, channels: int) -> torch.Tensor:
    return torch.empty((x.shape[0], channels, *x.shape[2:]), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)  # fmt: skip


def _bottlenecks_like(x: torch.Tensor, layers: int, channels: int) -> torch.Tensor:
    """(L, N, B, H, W) whose every [j] is channels_last: one allocation for all layers."""
    n, _, h, w = x.shape
    return torch.empty((layers, n, h, w, channels), dtype=x.dtype, device=x.device).permute(0, 1, 4, 2, 3)


def _masked(new: torch.Tensor, mask: torch.Tensor, drop_rate: float) -> torch.Tensor:
    """Dropout with a given mask, as F.dropout computes it: new * (mask / (1 - p))."""
    return new * mask.to(new.dtype).div_(1.0 - drop_rate)


def _invstd(var: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(var + eps)


def _prologue(mean, var, eps, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a training BatchNorm over the prefix, from the shared statistics."""
    return batch_norm_scale_shift(mean, _invstd(var, eps), weight, bias)


# Forward ----------------------------------------------------------------------------------------


def _conv3x3(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.fastconv.conv2d_bn_act(a, weight, None, _STRIDE, _PADDING, _DILATION, 1, None, None, None)


def _train_forward(x, norm1_weight, norm1_bias, conv1_weight, norm2_weight, norm2_bias, conv2_weight, dropout_mask,
                   drop_rate, eps, layers, growth, bottleneck):  # fmt: skip
    ops = torch.ops.fastconv
    n, c0, h, w = x.shape
    total = c0 + layers * growth
    features = _features_like(x, total)
    features[:, :c0].copy_(x)
    wide = accumulate_dtype(x.dtype)
    mean, var = x.new_empty(total, dtype=wide), x.new_empty(total, dtype=wide)
    mean[:c0], var[:c0] = ops.batch_norm_stats(x)
    bottlenecks = _bottlenecks_like(x, layers, bottleneck)
    bottleneck_mean = x.new_empty((layers, bottleneck), dtype=wide)
    bottleneck_var = torch.empty_like(bottleneck_mean)
    for j in range(layers):
        prefix, end = c0 + j * growth, c0 + (j + 1) * growth
        scale, shift = _prologue(mean[:prefix], var[:prefix], eps, norm1_weight[j], norm1_bias[j])
        c1 = bottlenecks[j]
        ops.pointwise_conv2d_out(features[:, :prefix], conv1_weight[j], None, None, None, None, None, False, scale,
                                 shift, "relu", c1)  # fmt: skip
        bottleneck_mean[j], bottleneck_var[j] = ops.batch_norm_stats(c1)
        a2 = ops.batch_norm_act(c1, bottleneck_mean[j], _invstd(bottleneck_var[j], eps), norm2_weight[j],
                                norm2_bias[j], "relu")  # fmt: skip
        if dropout_mask:
            features[:, prefix:end] = _masked(_conv3x3(a2, conv2_weight[j]), dropout_mask[j], drop_rate)
            mean[prefix:end], var[prefix:end] = ops.batch_norm_stats(features[:, prefix:end])
        else:
            # Stored straight into the buffer's slice, with its statistics from the epilogue.
            mean[prefix:end], var[prefix:end] = ops.conv2d_out(
                a2, conv2_weight[j], _STRIDE, _PADDING, _DILATION, 1, True, features[:, prefix:end]
            )
    return features, mean, var, bottlenecks, bottleneck_mean, bottleneck_var


def _eval_forward(x, in_scale, in_shift, conv1_weight, scale, shift, conv2_weight, layers, growth):
    c0 = x.shape[1]
    features = _features_like(x, c0 + layers * growth)
    features[:, :c0].copy_(x)
    for j in range(layers):
        prefix = c0 + j * growth
        # Both BatchNorms fused into the 1x1 conv: on load (prologue) and on store (epilogue).
        a2 = torch.ops.fastconv.pointwise_conv2d(
            features[:, :prefix], conv1_weight[j], scale=scale[j], shift=shift[j], activation="relu",
            in_scale=in_scale[j], in_shift=in_shift[j], in_activation="relu",
        )  # fmt: skip
        torch.ops.fastconv.conv2d_out(a2, conv2_weight[j], _STRIDE, _PADDING, _DILATION, 1, False,
                                      features[:, prefix : prefix + growth])  # fmt: skip
    return features


# Registered ops ---------------------------------------------------------------------------------


@torch.library.custom_op("fastconv::dense_block_train", mutates_args=())
def dense_block_train_op(
    x: torch.Tensor,
    norm1_weight: list[torch.Tensor],
    norm1_bias: list[torch.Tensor],
    conv1_weight: list[torch.Tensor],
    norm2_weight: list[torch.Tensor],
    norm2_bias: list[torch.Tensor],
    conv2_weight: list[torch.Tensor],
    dropout_mask: list[torch.Tensor],
    drop_rate: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dense block with batch statistics: (features, mean, var, bottlenecks, bottleneck_mean,
    bottleneck_var).

    features is (N, C0 + L*k, H, W), channels_last. mean and var (biased) are the batch
    statistics of each of its channels, which every layer's norm1 shares; bottlenecks is
    (L, N, B, H, W), each layer's 1x1 conv output before norm2, whose statistics are
    bottleneck_mean and bottleneck_var (L, B). Statistics are float32 (float64 for float64 x).
    dropout_mask: empty, or one bool (N, k, H, W) mask per layer, applied with drop_rate as
    F.dropout does to the layer's new features."""
    norm1 = {"norm1_weight": norm1_weight, "norm1_bias": norm1_bias}
    norm2 = {"norm2_weight": norm2_weight, "norm2_bias": norm2_bias}
    layers, growth, bottleneck = _check(x, conv1_weight, conv2_weight, norm1, norm2)
    _check_masks(dropout_mask, drop_rate, x, layers, growth)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    if count == 1:
        fail(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    if count == 0:
        return _train_fake(x, layers, growth, bottleneck, nan=True)
    return _train_forward(x, norm1_weight, norm1_bias, conv1_weight, norm2_weight, norm2_bias, conv2_weight,
                          dropout_mask, drop_rate, eps, layers, growth, bottleneck)  # fmt: skip


def _train_fake(x, layers, growth, bottleneck, nan: bool = False):
    wide = accumulate_dtype(x.dtype)
    total = x.shape[1] + layers * growth
    stats = [x.new_empty(shape, dtype=wide) for shape in ((total,), (total,), (layers, bottleneck), (layers, bottleneck))]
    if nan:  # torch.var_mean's answer for no values
        for s in stats:
            s.fill_(float("nan"))
    features = _features_like(x, total)
    return features, stats[0], stats[1], _bottlenecks_like(x, layers, bottleneck), stats[2], stats[3]


@dense_block_train_op.register_fake
def _(x, norm1_weight, norm1_bias, conv1_weight, norm2_weight, norm2_bias, conv2_weight, dropout_mask, drop_rate, eps):
    norm1 = {"norm1_weight": norm1_weight, "norm1_bias": norm1_bias}
    norm2 = {"norm2_weight": norm2_weight, "norm2_bias": norm2_bias}
    layers, growth, bottleneck = _check(x, conv1_weight, conv2_weight, norm1, norm2)
    _check_masks(dropout_mask, drop_rate, x, layers, growth)
    return _train_fake(x, layers, growth, bottleneck)


@torch.library.custom_op("fastconv::dense_block_eval", mutates_args=())
def dense_block_eval_op(
    x: torch.Tensor,
    in_scale: list[torch.Tensor],
    in_shift: list[torch.Tensor],
    conv1_weight: list[torch.Tensor],
    scale: list[torch.Tensor],
    shift: list[torch.Tensor],
    conv2_weight: list[torch.Tensor],
) -> torch.Tensor:
    """A dense block with fixed BatchNorms: each layer's norm1 as (in_scale, in_shift) and its
    norm2 as (scale, shift), folded from the running statistics. Returns the (N, C0 + L*k, H, W)
    channels_last features."""
    norm1, norm2 = {"in_scale": in_scale, "in_shift": in_shift}, {"scale": scale, "shift": shift}
    layers, growth, _ = _check(x, conv1_weight, conv2_weight, norm1, norm2)
    if x.shape[0] * x.shape[2] * x.shape[3] == 0:
        return _features_like(x, x.shape[1] + layers * growth)
    return _eval_forward(x, in_scale, in_shift, conv1_weight, scale, shift, conv2_weight, layers, growth)


@dense_block_eval_op.register_fake
def _(x, in_scale, in_shift, conv1_weight, scale, shift, conv2_weight):
    norm1, norm2 = {"in_scale": in_scale, "in_shift": in_shift}, {"scale": scale, "shift": shift}
    layers, growth, _ = _check(x, conv1_weight, conv2_weight, norm1, norm2)
    return _features_like(x, x.shape[1] + layers * growth)


# Autograd ---------------------------------------------------------------------------------------


def _layer_convs_backward(grad_new, a2, conv2_weight, want_weight: bool):
    """(grad_a2, grad_conv2_weight) of the 3x3 conv."""
    return convolution_backward(grad_new, a2, conv2_weight, _STRIDE, _PADDING, _DILATION, 1, [True, want_weight, False])


def _bottleneck_backward(grad_c1, prefix, conv1_weight, in_scale, in_shift, want_weight: bool):
    """(grad of the prologue's output a1, grad_conv1_weight) of c1 = conv1x1(relu(prefix*s+t))."""
    ops = torch.ops.fastconv
    grad_weight = None
    if want_weight:
        grad_weight = ops.pointwise_conv2d_backward_weight(grad_c1, prefix, in_scale, in_shift, "relu")
        grad_weight = grad_weight.to(conv1_weight.dtype).view(conv1_weight.shape)
    return ops.pointwise_conv2d(grad_c1, conv1_weight.transpose(0, 1)), grad_weight


def _wanted(needs) -> bool:
    """needs_input_grad of one argument: a bool, or a list's per-element bools."""
    return any(needs) if isinstance(needs, (list, tuple)) else bool(needs)


def _to(grad: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    return None if grad is None else grad.to(like.dtype)


def _setup_train(ctx, inputs, output) -> None:
    x, norm1_weight, norm1_bias, conv1_weight, norm2_weight, norm2_bias, conv2_weight, masks, drop_rate, eps = inputs
    features, mean, var, bottlenecks, bottleneck_mean, bottleneck_var = output
    ctx.layers = len(conv1_weight)
    ctx.save_for_backward(
        features, mean, var, bottlenecks, bottleneck_mean, bottleneck_var,
        *norm1_weight, *norm1_bias, *conv1_weight, *norm2_weight, *norm2_bias, *conv2_weight, *masks,
    )  # fmt: skip
    ctx.x_shape = tuple(x.shape)
    ctx.x_channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    ctx.masks = len(masks)
    ctx.options = (len(masks) > 0, drop_rate, eps)
    ctx.backend = get_backend()  # autograd's CUDA worker thread does not see use_backend()


def _split(saved: Sequence[torch.Tensor], layers: int, lists: int) -> list[list[torch.Tensor]]:
    return [list(saved[i * layers : (i + 1) * layers]) for i in range(lists)]


def _grad_buffer(features: torch.Tensor, grad_features: Optional[torch.Tensor]) -> torch.Tensor:
    grad = torch.empty_like(features)
    return grad.zero_() if grad_features is None else grad.copy_(grad_features)


def _grad_x(ctx, grad: torch.Tensor) -> torch.Tensor:
    grad_x = grad[:, : ctx.x_shape[1]]
    fmt = torch.channels_last if ctx.x_channels_last else torch.contiguous_format
    return grad_x.contiguous(memory_format=fmt)


def _train_backward(ctx, grad_features, _mean, _var, _bottlenecks, _bottleneck_mean, _bottleneck_var):
    features, mean, var, bottlenecks, bottleneck_mean, bottleneck_var, *rest = ctx.saved_tensors
    layers, (has_masks, drop_rate, eps) = ctx.layers, ctx.options
    n1w, n1b, w1, n2w, n2b, w2 = _split(rest, layers, 6)
    masks = rest[6 * layers :] if has_masks else None
    needs = [_wanted(n) for n in input_grads_wanted(ctx, 10)]
    ops = torch.ops.fastconv
    grads = {name: [None] * layers for name in ("n1w", "n1b", "w1", "n2w", "n2b", "w2")}
    c0 = ctx.x_shape[1]
    growth = (features.shape[1] - c0) // layers if layers else 0
    with use_backend(ctx.backend):
        grad = _grad_buffer(features, grad_features)
        invstd = _invstd(var, eps)
        for j in reversed(range(layers)):
            start = c0 + j * growth
            grad_new = grad[:, start : start + growth]  # complete: every later layer has added to it
            if masks is not None:
                grad_new = _masked(grad_new, masks[j], drop_rate)
            c1, invstd2 = bottlenecks[j], _invstd(bottleneck_var[j], eps)
            a2 = ops.batch_norm_act(c1, bottleneck_mean[j], invstd2, n2w[j], n2b[j], "relu")
            grad_a2, grads["w2"][j] = _layer_convs_backward(grad_new, a2, w2[j], needs[6])
            del a2
            grad_c1, gw, gb = ops.batch_norm_act_backward(grad_a2, c1, bottleneck_mean[j], invstd2, n2w[j], n2b[j], "relu")
            grads["n2w"][j], grads["n2b"][j] = _to(gw, n2w[j]), _to(gb, n2b[j])
            prefix = features[:, :start]
            scale, shift = _prologue(mean[:start], var[:start], eps, n1w[j], n1b[j])
            grad_a1, grads["w1"][j] = _bottleneck_backward(grad_c1, prefix, w1[j], scale, shift, needs[3])
            # Added into the prefix's slice of the gradient buffer in the kernel's own pass.
            gw, gb = ops.batch_norm_act_backward_accumulate(
                grad_a1, prefix, mean[:start], invstd[:start], n1w[j], n1b[j], "relu", grad[:, :start]
            )
            grads["n1w"][j], grads["n1b"][j] = _to(gw, n1w[j]), _to(gb, n1b[j])
    order = ("n1w", "n1b", "w1", "n2w", "n2b", "w2")
    # A list argument's gradient is a list of its length (torch.library checks the structure).
    lists = [grads[name] if needs[i + 1] else [None] * layers for i, name in enumerate(order)]
    return (_grad_x(ctx, grad) if needs[0] else None, *lists, [None] * ctx.masks, None, None)


def _setup_eval(ctx, inputs, output) -> None:
    x, in_scale, in_shift, conv1_weight, scale, shift, conv2_weight = inputs
    ctx.layers = len(conv1_weight)
    ctx.save_for_backward(output, *in_scale, *in_shift, *conv1_weight, *scale, *shift, *conv2_weight)
    ctx.x_shape = tuple(x.shape)
    ctx.x_channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    ctx.backend = get_backend()


def _eval_backward(ctx, grad_features):
    features, *rest = ctx.saved_tensors
    layers = ctx.layers
    s1, t1, w1, s2, t2, w2 = _split(rest, layers, 6)
    needs = [_wanted(n) for n in input_grads_wanted(ctx, 7)]
    ops = torch.ops.fastconv
    grads = {name: [None] * layers for name in ("s1", "t1", "w1", "s2", "t2", "w2")}
    c0 = ctx.x_shape[1]
    growth = (features.shape[1] - c0) // layers if layers else 0
    with use_backend(ctx.backend):
        grad = _grad_buffer(features, grad_features)
        for j in reversed(range(layers)):
            start = c0 + j * growth
            prefix = features[:, :start]
            # The bottleneck is recomputed (one GEMM): eval mode keeps only the buffer.
            c1 = ops.pointwise_conv2d(prefix, w1[j], in_scale=s1[j], in_shift=t1[j], in_activation="relu")
            a2 = ops.bn_act(c1, s2[j], t2[j], "relu")
            grad_a2, grads["w2"][j] = _layer_convs_backward(grad[:, start : start + growth], a2, w2[j], needs[6])
            del a2
            grad_c1, gs, gt = ops.bn_act_backward(grad_a2, c1, s2[j], t2[j], "relu")
            grads["s2"][j], grads["t2"][j] = _to(gs, s2[j]), _to(gt, t2[j])
            grad_a1, grads["w1"][j] = _bottleneck_backward(grad_c1, prefix, w1[j], s1[j], t1[j], needs[3])
            grad_prefix, gs, gt = ops.bn_act_backward(grad_a1, prefix, s1[j], t1[j], "relu")
            grads["s1"][j], grads["t1"][j] = _to(gs, s1[j]), _to(gt, t1[j])
            grad[:, :start].add_(grad_prefix)
    order = ("s1", "t1", "w1", "s2", "t2", "w2")
    lists = [grads[name] if needs[i + 1] else [None] * layers for i, name in enumerate(order)]
    return (_grad_x(ctx, grad) if needs[0] else None, *lists)


dense_block_train_op.register_autograd(_train_backward, setup_context=_setup_train)
dense_block_eval_op.register_autograd(_eval_backward, setup_context=_setup_eval)
register_autocast(dense_block_train_op, cast=("x", "conv1_weight", "conv2_weight"))
register_autocast(dense_block_eval_op, cast=("x", "conv1_weight", "conv2_weight"))
