"""FusedSequential: an nn.Sequential whose Conv2d -> BatchNorm2d[ -> activation] runs of
children (or Conv2d -> timm BatchNormAct2d, its activation included) each run as one fused
unit, with the children (and so the state_dict keys) unchanged.

VGG's ``features`` (Conv2d, BatchNorm2d, ReLU, Conv2d, BatchNorm2d, ReLU, MaxPool2d, ...) is
the case: one ConvBNAct2d per run would renumber the keys (``features.0.weight`` would become
``features.0.0.weight``), so the Sequential itself takes over. Each run runs as ConvBNAct2d
does (fastconv/nn/inverted_residual.py's shared helper): eval folds the BatchNorm into the conv
(cached) with the activation in the epilogue; training keeps BatchNorm2d's exact semantics.
"""

from __future__ import annotations

import collections
from typing import Optional

import torch
from torch import nn

from fastconv.nn import _fx
from fastconv.nn.attribute_fusion import batch_norm_activation
from fastconv.nn._fold_cache import DerivedTensorCache
from fastconv.nn.conv_bn_act import _ACTIVATION_NAMES
from fastconv.nn.depthwise import DepthwiseConv2d
from fastconv.nn import _conv_bn
from fastconv.nn.pointwise import PointwiseConv2d

_CONVS = (nn.Conv2d, DepthwiseConv2d, PointwiseConv2d)  # the same conv, whichever kernel it had


def _run_at(children: list, i: int) -> Optional[tuple]:
    """(conv, bn, activation name, length) of a fusable run starting at children[i], or None."""
    conv = children[i]
    if type(conv) not in _CONVS or conv.padding_mode != "zeros" or i + 1 >= len(children):
        return None
    bn = children[i + 1]
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
    return {id(run[1]) for run in _runs(module)} if isinstance(module, FusedSequential) else set()


class FusedSequential(nn.Sequential):
    """nn.Sequential with its Conv2d -> BatchNorm2d[ -> act] runs fused; the same children and keys.
    Made by `FusedSequential.from_sequential(seq)`, which shares seq's modules."""

    __prepare_scriptable__ = _fx.refuse_torchscript

    def __init__(self, *args) -> None:
        super().__init__(*args)  # also what nn.Sequential's slicing calls: fused[:3] is fused too
        self._caches: dict = {}

    @classmethod
    def from_sequential(cls, sequential: nn.Sequential) -> "FusedSequential":
        if type(sequential) is not nn.Sequential:
            raise ValueError(f"fastconv: sequential must be a plain nn.Sequential; got {type(sequential).__name__}")
        fused = cls(collections.OrderedDict(sequential._modules))
        fused.train(sequential.training)
        return fused

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
            cache = self._caches.setdefault(i, DerivedTensorCache())
            x = _conv_bn.conv_bn_act(x, conv, bn, activation, cache)
            i += length
        return x


__all__ = ["FusedSequential", "fusable_runs", "run_batchnorms"]
