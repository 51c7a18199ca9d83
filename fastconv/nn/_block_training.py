"""The fused training path of the MobileNet blocks (InvertedResidual, TimmInvertedResidual,
DepthwiseSeparableConv2d): one fastconv::inverted_residual_train call, which keeps for backward
only the block's input, its pre-BatchNorm projection and the statistics (see
fastconv/ops/inverted_residual_train.py), then each BatchNorm2d's exact running update.

Taken when every BatchNorm is a plain nn.BatchNorm2d using batch statistics, they share one eps,
and every conv is a plain bias-free zero-padded Conv2d; otherwise (and with
``fused_training = False`` on the module) the block runs its unfused training path on fastconv's
per-conv ops, which is also exact.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastconv._validation import fail
from fastconv.nn._conv_bn import update_running_stats, uses_batch_stats
from fastconv.ops._common import autocast_inputs
from fastconv.ops.inverted_residual_train import inverted_residual_train


def _plain(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.bias is None and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and type(bn) is nn.BatchNorm2d and uses_batch_stats(bn))  # fmt: skip


def fused_training_applies(x: torch.Tensor, units: list) -> bool:
    """Whether the fused training op takes these (conv, bn) units (expansion None or absent)."""
    present = [unit for unit in units if unit is not None]
    return (isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[0] > 0 and all(_plain(*unit) for unit in present)
            and len({bn.eps for _, bn in present}) == 1)  # fmt: skip


def fused_block_train(x: torch.Tensor, expand: Optional[tuple], dw: tuple, project: tuple, activations: tuple,
                      use_residual: bool) -> torch.Tensor:  # fmt: skip
    """y of the block in training, and every BatchNorm's running statistics updated as
    nn.BatchNorm2d updates them; expand/dw/project are (conv, bn) pairs, expand None for none."""
    convs = [unit[0] if unit is not None else None for unit in (expand, dw, project)]
    norms = [unit[1] if unit is not None else None for unit in (expand, dw, project)]
    x, *weights = autocast_inputs(x, *(c.weight if c is not None else None for c in convs))
    dw_conv = convs[1]
    out = inverted_residual_train(
        x, weights[0], weights[1], weights[2],
        [t for bn in norms for t in ((bn.weight, bn.bias) if bn is not None else (None, None))],
        stride=dw_conv.stride, padding=dw_conv.padding, dilation=dw_conv.dilation, eps=norms[1].eps,
        activations=activations, use_residual=use_residual,
    )  # fmt: skip
    y, _, *stats = out
    counts = (x.shape[0] * x.shape[2] * x.shape[3],) + (y.shape[0] * y.shape[2] * y.shape[3],) * 2
    if any(bn is not None and bn.training and count == 1 for bn, count in zip(norms, counts)):
        fail(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    for bn, (mean, var), count in zip(norms, (stats[0:2], stats[2:4], stats[4:6]), counts):
        if bn is not None and bn.training and bn.track_running_stats:
            update_running_stats(bn, mean, var, count)
    return y


__all__ = ["fused_block_train", "fused_training_applies"]
