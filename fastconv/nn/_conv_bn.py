"""A Conv2d -> BatchNorm2d [-> activation] of given modules, run on fastconv's ops in the
BatchNorm's own mode: the one implementation behind ConvBNAct2d and every fused block's units
(InvertedResidual's projection, ResNetBlock, FusedSequential, DepthwiseSeparableConv2d).

* Eval (running statistics): the BatchNorm folded into the conv weight and a float32 shift,
  cached until any source tensor changes (DerivedTensorCache), then one conv with its epilogue.
* Training, or no running statistics: the conv with its batch statistics fused in
  (conv2d_batch_stats), the one-pass training BatchNorm + activation, and BatchNorm2d's exact
  running-statistics update.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastconv._geometry import accumulate_dtype, normalise_geometry
from fastconv._validation import fail
from fastconv.activations import apply_activation
from fastconv.nn._fold_cache import DerivedTensorCache
from fastconv.ops._common import autocast_inputs
from fastconv.ops.conv_bn_act import routed_conv2d_bn_act


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """BatchNorm2d's rule: batch statistics in training, and whenever there are no running ones."""
    return bn.training or bn.running_mean is None or bn.running_var is None


def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, shift) with conv(x, weight) + shift == bn(conv(x)) under the running statistics.

    The shift stays in float32 (float64 for float64 weights): the epilogue takes it so, and it
    holds the large running-mean offsets that half precision would round. The weight keeps
    conv.weight's dtype and memory format (a channels_last model's is the layout the implicit
    GEMM reads; forcing it on an NCHW model would make cuDNN return channels_last outputs to
    copy back)."""
    wide = accumulate_dtype(conv.weight.dtype)
    scale = torch.rsqrt(bn.running_var.to(wide) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(wide)
    shift = -bn.running_mean.to(wide)
    if conv.bias is not None:
        shift = shift + conv.bias.to(wide)
    shift = shift * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(wide)
    return (conv.weight.to(wide) * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype), shift


def folded(cache: DerivedTensorCache, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """fold(conv, bn), cached in `cache` until any tensor it comes from changes."""
    sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return cache.get(sources, (bn.eps,), lambda: fold(conv, bn))


@torch.no_grad()
def update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """BatchNorm2d's update: unbiased variance, momentum or the cumulative average."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if count == 0:
        return  # BatchNorm2d leaves the running statistics alone for an empty batch
    factor = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.to(mean.dtype)
    unbiased = var * (count / (count - 1))
    bn.running_mean.mul_(1 - factor).add_((mean * factor).to(bn.running_mean.dtype))
    bn.running_var.mul_(1 - factor).add_((unbiased * factor).to(bn.running_var.dtype))


def conv_batch_stats(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, ...]:
    """(c, mean, invstd): conv(x) before its training BatchNorm, with c's batch statistics from
    the conv's epilogue, and bn's running statistics updated as nn.BatchNorm2d updates them.
    The first half of conv_bn_act in training; fastconv::batch_norm_act (or batch_norm_act_cat,
    into a concatenation) is the second."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        fail(f"x must be a 4-D tensor (N, C, H, W); got {getattr(x, 'shape', type(x).__name__)}")
    stride, padding, dilation = normalise_geometry(tuple(conv.weight.shape[2:]), conv.stride, conv.padding, conv.dilation)
    x, weight, bias = autocast_inputs(x, conv.weight, conv.bias)
    c, mean, var = torch.ops.fastconv.conv2d_batch_stats(x, weight, bias, stride, padding, dilation, conv.groups)
    count = c.shape[0] * c.shape[2] * c.shape[3]
    if bn.training and count == 1:
        fail(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    if bn.training and bn.track_running_stats:
        update_running_stats(bn, mean, var, count)
    return c, mean, torch.rsqrt(var + bn.eps)


def conv_bn_act(x, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: Optional[str], cache: DerivedTensorCache,
                residual: Optional[torch.Tensor] = None, activation_after_residual: bool = False):  # fmt: skip
    """act(bn(conv(x))) on fastconv's ops, in the BatchNorm's own mode (see the module docstring);
    with a residual, act(bn(conv(x))) + residual, or act(bn(conv(x)) + residual) when
    activation_after_residual (ResNet's order). In eval the residual is the conv's epilogue; in
    training the add follows the one-pass BatchNorm as eager ops."""
    stride, padding, dilation = normalise_geometry(tuple(conv.weight.shape[2:]), conv.stride, conv.padding, conv.dilation)
    after = activation_after_residual and residual is not None
    if not uses_batch_stats(bn):
        weight, shift = folded(cache, conv, bn)
        x, weight, residual = autocast_inputs(x, weight, residual)
        return routed_conv2d_bn_act(x, weight, None, stride, padding, dilation, conv.groups, None, shift, activation,
                                    residual, after)  # fmt: skip
    c, mean, invstd = conv_batch_stats(x, conv, bn)
    y = torch.ops.fastconv.batch_norm_act(c, mean, invstd, bn.weight, bn.bias, None if after else activation)
    if residual is None:
        return y
    if residual.shape != y.shape:
        fail(f"residual must have the output's shape {tuple(y.shape)}; got {tuple(residual.shape)}")
    y = y + residual.to(y.dtype)
    return apply_activation(y, activation) if after else y
