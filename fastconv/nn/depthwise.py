"""DepthwiseConv2d: a drop-in for nn.Conv2d(C, C * m, k, groups=C) on fastconv's kernels."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastconv._validation import fail
from fastconv.nn import _fx
from fastconv.ops.depthwise import depthwise_conv2d


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` with ``groups == in_channels``, run by `fastconv.depthwise_conv2d`.

    It *is* an nn.Conv2d: the same constructor arguments, parameters, initialisation and
    state_dict keys, so pretrained weights load unchanged. ``groups`` defaults to
    ``in_channels`` and must equal it.
    """

    __prepare_scriptable__ = _fx.refuse_torchscript

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: Optional[int] = None,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        groups = in_channels if groups is None else groups
        if groups != in_channels:
            fail(f"groups must equal in_channels ({in_channels}) for a depthwise conv; got {groups}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )  # fmt: skip

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """The same layer, sharing conv's parameters."""
        depthwise = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
        )  # fmt: skip
        depthwise.weight, depthwise.bias = conv.weight, conv.bias
        depthwise.train(conv.training)
        return depthwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx.symbolically_traced():
            return _fx.opaque_call(self, x)
        padding = self.padding
        if self.padding_mode != "zeros":
            # nn.Conv2d's own handling of reflect/replicate/circular: pad first, then a valid conv.
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return depthwise_conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation)


def is_depthwise(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d and module.groups == module.in_channels and module.in_channels > 1


def convert_depthwise(model: nn.Module) -> nn.Module:
    """Replace, in place, every depthwise nn.Conv2d of `model` by a DepthwiseConv2d sharing its
    parameters; returns the model (a new one only when `model` itself is such a conv). The
    state_dict is unchanged.

    A part of `fastconv.optimize`'s pipeline (fastconv/nn/_pipeline.py): convs inside fastconv's
    fused modules (ConvBNAct2d, InvertedResidual, ...) are left to the fused unit's kernel, and
    the fusing converters take a conv swapped here, so any order of the converters keeps every
    fusion."""
    from fastconv.nn import _pipeline  # the pipeline imports this module

    return _pipeline.convert(model, ("depthwise",))
