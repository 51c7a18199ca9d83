"""ResNetBlock: torchvision's ResNet ``BasicBlock`` and ``Bottleneck`` with each conv fused with
its BatchNorm and ReLU, and the residual add and final ReLU in the last conv's epilogue.

It keeps torchvision's attributes and state_dict keys (``conv1.weight``, ``bn1.*``, ...,
``downsample.0.weight``, ``downsample.1.*``), so pretrained weights load unchanged:

* **eval** (every BatchNorm in eval mode with running statistics): each conv runs with its
  BatchNorm folded into the weight and a shift (cached until a source tensor changes, as
  ConvBNAct2d's fold) and its ReLU in the epilogue. The Bottleneck's last conv is 1x1, so it is
  one `pointwise_conv2d` with the shortcut added before the ReLU (`activation_after_residual`,
  ResNet's order): the sum never exists unactivated in memory. The BasicBlock's last conv is
  3x3, which has no residual epilogue yet: conv + BN in one kernel, then the add and ReLU.
* **train**: exact BatchNorm2d semantics through fastconv's unfused ops (`conv2d_batch_stats`,
  `batch_norm_act`), InvertedResidual's shared helper; then the add and ReLU.
* A child swapped for another kind (a SyncBatchNorm under DDP, say): the children run as they
  are, in torchvision's order, so nothing is silently dropped.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastconv.nn import _fx
from fastconv.nn._fold_cache import DerivedTensorCache
from fastconv.nn.conv_bn_act import ConvBNAct2d, is_conv_bn_act, plain_conv2d
from fastconv.nn.inverted_residual import _conv_bn_act, _folded, _uses_batch_stats
from fastconv.nn.pointwise import is_pointwise
from fastconv.ops._common import autocast_inputs
from fastconv.ops.pointwise import pointwise_conv2d

_KINDS = {"BasicBlock": 2, "Bottleneck": 3}


class ResNetBlock(nn.Module):
    """A fused torchvision ResNet block; made by `ResNetBlock.from_torchvision(block)`, which
    shares (does not copy) the block's modules. ``kind`` is "BasicBlock" or "Bottleneck"."""

    __prepare_scriptable__ = _fx.refuse_torchscript

    @classmethod
    def from_torchvision(cls, block: nn.Module) -> "ResNetBlock":
        kind = type(block).__name__
        if kind not in _KINDS or not type(block).__module__.startswith("torchvision.models"):
            raise ValueError(f"fastconv: block must be a torchvision BasicBlock or Bottleneck; got {type(block).__name__}")
        depth = _KINDS[kind]
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.kind, fused.depth = kind, depth
        for i in range(1, depth + 1):
            conv, bn = getattr(block, f"conv{i}"), getattr(block, f"bn{i}")
            if plain_conv2d(conv) is None or type(bn) is not nn.BatchNorm2d:
                raise ValueError(
                    f"fastconv: block.conv{i} and block.bn{i} must be a Conv2d and a BatchNorm2d; "
                    f"got {type(conv).__name__}, {type(bn).__name__}"
                )
            setattr(fused, f"conv{i}", plain_conv2d(conv))
            setattr(fused, f"bn{i}", bn)
        if type(block.relu) is not nn.ReLU:
            raise ValueError(f"fastconv: block.relu must be an nn.ReLU; got {type(block.relu).__name__}")
        fused.relu = block.relu
        downsample = block.downsample
        if downsample is not None and is_conv_bn_act(downsample):
            downsample = ConvBNAct2d.from_modules(*downsample)
        fused.downsample = downsample
        fused.stride = block.stride
        fused._caches = [DerivedTensorCache() for _ in range(depth)]
        fused.train(block.training)
        return fused

    def _units(self) -> list:
        return [(getattr(self, f"conv{i}"), getattr(self, f"bn{i}")) for i in range(1, self.depth + 1)]

    def _fusable(self) -> bool:
        return all(type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and type(bn) is nn.BatchNorm2d
                   for conv, bn in self._units()) and type(self.relu) is nn.ReLU  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx.symbolically_traced():
            return _fx.opaque_call(self, x)
        identity = x if self.downsample is None else self.downsample(x)
        units = self._units()
        if not self._fusable():
            out = x
            for i, (conv, bn) in enumerate(units):
                out = bn(conv(out))
                if i < len(units) - 1:
                    out = self.relu(out)
            return self.relu(out + identity)
        out = x
        for (conv, bn), cache in zip(units[:-1], self._caches):
            out = _conv_bn_act(out, conv, bn, "relu", cache)
        (conv, bn), cache = units[-1], self._caches[-1]
        if not _uses_batch_stats(bn) and is_pointwise(conv):
            # Bottleneck in eval: relu(conv3(out) * scale + shift + identity) in one GEMM.
            weight, shift = _folded(cache, conv, bn)
            out, weight, identity = autocast_inputs(out, weight, identity)
            return pointwise_conv2d(out, weight, None, shift=shift, activation="relu", residual=identity,
                                    activation_after_residual=True)  # fmt: skip
        out = _conv_bn_act(out, conv, bn, None, cache)
        return torch.relu(out + identity)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def is_torchvision_resnet_block(module: nn.Module) -> bool:
    """Exactly torchvision's BasicBlock or Bottleneck (a subclass may have its own forward)."""
    return type(module).__name__ in _KINDS and type(module).__module__ == "torchvision.models.resnet"


__all__ = ["ResNetBlock", "is_torchvision_resnet_block"]
