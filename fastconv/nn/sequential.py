"""FusedSequential: an nn.Sequential whose Conv2d -> BatchNorm2d[ -> activation] runs of
children (or Conv2d -> timm BatchNormAct2d, its activation included), and Conv2d -> activation
runs without a BatchNorm (AlexNet's and VGG-16's features), each run as one fused unit, with the
children (and so the state_dict keys) unchanged.

VGG's ``features`` (Conv2d, BatchNorm2d, ReLU, Conv2d, BatchNorm2d, ReLU, MaxPool2d, ...) is
the case: one ConvBNAct2d per run would renumber the keys (``features.0.weight`` would become
``features.0.0.weight``), so the Sequential itself takes over. Each run runs as ConvBNAct2d
does (fastconv/nn/inverted_residual.py's shared helper): eval folds the BatchNorm into the conv
(cached) with the activation in the epilogue; training keeps BatchNorm2d's exact semantics.
A Conv2d -> activation run is one conv with its bias and the activation in the epilogue
(fastconv::conv2d_bn_act without scale or shift), in training and eval alike.
"""

from __future__ import annotations

import collections
from typing import Optional

import torch
from torch import nn

from fastconv._geometry import normalise_geometry
from fastconv._validation import fail
from fastconv.nn._modes import train_like
from fastconv.nn import _fx
from fastconv.nn.attribute_fusion import batch_norm_activation
from fastconv.nn._fold_cache import DerivedTensorCache
from fastconv.nn.conv_bn_act import _ACTIVATION_NAMES
from fastconv.nn.depthwise import DepthwiseConv2d
from fastconv.nn import _conv_bn
from fastconv.nn.pointwise import PointwiseConv2d
from fastconv.ops._common import autocast_inputs
from fastconv.ops.conv_bn_act import routed_conv2d_bn_act

_CONVS = (nn.Conv2d, DepthwiseConv2d, PointwiseConv2d)  # the same conv, whichever kernel it had


def _run_at(children: list, i: int) -> Optional[tuple]:
    """(conv, bn or None, activation name, length) of a fusable run starting at children[i], or None."""
    conv = children[i]
    if type(conv) not in _CONVS or conv.padding_mode != "zeros" or i + 1 >= len(children):
        return None
    bn = children[i + 1]
    if type(bn) in _ACTIVATION_NAMES:
        return conv, None, _ACTIVATION_NAMES[type(bn)], 2  # Conv2d -> activation: bias + act epilogue
    if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != conv.out_channels:
        return None
    if type(bn) is not nn.BatchNorm2d:
        # timm's BatchNormAct2d (DenseNet's stem: conv0, norm0, pool0): its own activation, fused.
        usable, activation, _ = batch_norm_activation(bn)
        return (conv, bn, activation, 2) if usable and type(bn).__name__ == "BatchNormAct2d" and \
            type(bn).__module__.startswith("timm.") else None  # fmt: skip
    if i + 2 < len(children) and (type(children[i + 2]) in _ACTIVATION_NAMES or type(children[i + 2]) is nn.Identity):
        return conv, bn, _ACTIVATION_NAMES.get(type(children[i + 2])), 3
    return conv, bn, None, 2


def _runs(module: nn.Module) -> list:
    children, i, runs = list(module), 0, []
    while i < len(children):
        run = _run_at(children, i)
        if run is not None:
            runs.append(run)
        i += run[3] if run else 1
    return runs


def fusable_runs(module: nn.Module) -> int:
    """How many runs a plain nn.Sequential holds (0 for anything else)."""
    return len(_runs(module)) if type(module) is nn.Sequential else 0


def run_batchnorms(module: nn.Module) -> set:
    """ids of the BatchNorms a FusedSequential runs fused."""
    return {id(run[1]) for run in _runs(module) if run[1] is not None} if isinstance(module, FusedSequential) else set()


class FusedSequential(nn.Sequential):
    """nn.Sequential with its Conv2d -> BatchNorm2d[ -> act] and Conv2d -> act runs fused; the
    same children and keys.
    Made by `FusedSequential.from_sequential(seq)`, which shares seq's modules."""

    __prepare_scriptable__ = _fx.refuse_torchscript

    def __init__(self, *args) -> None:
        super().__init__(*args)  # also what nn.Sequential's slicing calls: fused[:3] is fused too
        self._caches: dict = {}

    @classmethod
    def from_sequential(cls, sequential: nn.Sequential) -> "FusedSequential":
        if type(sequential) is not nn.Sequential:
            raise ValueError(f"fastconv: sequential must be a plain nn.Sequential; got {type(sequential).__name__}")
        return train_like(cls(collections.OrderedDict(sequential._modules)), sequential.training, sequential)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx.symbolically_traced():
            return _fx.opaque_call(self, x)
        children, i = list(self), 0
        while i < len(children):
            run = _run_at(children, i)
            if run is None:
                x = children[i](x)
                i += 1
                continue
            conv, bn, activation, length = run
            start, i = i, i + length
            if bn is None:
                x = _conv_act(x, conv, activation)
                continue
            cache = self._caches.setdefault(start, DerivedTensorCache())
            x = _conv_bn.conv_bn_act(x, conv, bn, activation, cache)
        return x


def _conv_act(x: torch.Tensor, conv: nn.Conv2d, activation: str) -> torch.Tensor:
    """act(conv(x) + bias) as one conv with its epilogue, on the route's kernel."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        fail(f"x must be a 4-D tensor (N, C, H, W); got {getattr(x, 'shape', type(x).__name__)}")
    kernel = tuple(conv.weight.shape[2:])
    stride, padding, dilation = normalise_geometry(kernel, conv.stride, conv.padding, conv.dilation)
    x, weight, bias = autocast_inputs(x, conv.weight, conv.bias)
    return routed_conv2d_bn_act(x, weight, bias, stride, padding, dilation, conv.groups, None, None, activation)


__all__ = ["FusedSequential", "fusable_runs", "run_batchnorms"]
