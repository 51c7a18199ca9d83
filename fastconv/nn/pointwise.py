"""PointwiseConv2d: a drop-in for nn.Conv2d(C_in, C_out, 1) on fastconv's fused 1x1 GEMM."""

from __future__ import annotations

import torch
from torch import nn

from fastconv._validation import fail
from fastconv.nn import _fx
from fastconv.ops.pointwise import pointwise_conv2d


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)``, run by `fastconv.pointwise_conv2d`.

    It *is* an nn.Conv2d with kernel_size 1, stride 1, no padding and groups 1: the same
    parameters, initialisation and state_dict keys, so pretrained weights load unchanged.
    """

    __prepare_scriptable__ = _fx.refuse_torchscript

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, bias: bool = True, device=None, dtype=None):
        if kernel_size not in (1, (1, 1)):
            fail(f"kernel_size must be 1 for a pointwise conv; got {kernel_size!r}")
        super().__init__(in_channels, out_channels, 1, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "PointwiseConv2d":
        """The same layer, sharing conv's parameters; conv must be a plain 1x1 conv."""
        if not is_pointwise(conv):
            fail(f"conv must be a 1x1, stride-1, unpadded, ungrouped nn.Conv2d; got {conv}")
        pointwise = cls(conv.in_channels, conv.out_channels, bias=conv.bias is not None, device="meta")
        pointwise.weight, pointwise.bias = conv.weight, conv.bias
        pointwise.train(conv.training)
        return pointwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx.symbolically_traced():
            return _fx.opaque_call(self, x)
        return pointwise_conv2d(x, self.weight, self.bias)


def is_pointwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
    )


def convert_pointwise(model: nn.Module) -> nn.Module:
    """Replace, in place, every plain 1x1 nn.Conv2d of `model` by a PointwiseConv2d sharing its
    parameters; returns the model (a new one only when `model` itself is such a conv). The
    state_dict is unchanged.

    A part of `fastconv.optimize`'s pipeline (fastconv/nn/_pipeline.py): convs inside fastconv's
    fused modules (ConvBNAct2d, InvertedResidual, ...) are left to the fused unit's kernel, and
    the fusing converters take a conv swapped here, so any order of the converters keeps every
    fusion."""
    from fastconv.nn import _pipeline  # the pipeline imports this module

    return _pipeline.convert(model, ("pointwise",))
