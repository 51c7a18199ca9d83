"""ResNetBlock: torchvision's ResNet ``BasicBlock`` and ``Bottleneck`` with each conv fused with
its BatchNorm and ReLU, and the residual add and final ReLU in the last conv's epilogue.

It keeps torchvision's attributes and state_dict keys (``conv1.weight``, ``bn1.*``, ...,
``downsample.0.weight``, ``downsample.1.*``), so pretrained weights load unchanged:

* **eval** (every BatchNorm in eval mode with running statistics): each conv runs with its
  BatchNorm folded into the weight and a shift (cached until a source tensor changes, as
  ConvBNAct2d's fold) and its ReLU in the epilogue. The last conv adds the shortcut before its
  ReLU in its own epilogue (`activation_after_residual`, ResNet's order): the Bottleneck's 1x1
  in the pointwise GEMM, the BasicBlock's 3x3 in the implicit GEMM. The sum never exists
  unactivated in memory.
* **train**: exact BatchNorm2d semantics through fastconv's unfused ops (`conv2d_batch_stats`,
  `batch_norm_act`), InvertedResidual's shared helper; then the add and ReLU.
* A child swapped for another kind (a SyncBatchNorm under DDP, say): the children run as they
  are, in torchvision's order, so nothing is silently dropped.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastconv.nn._modes import train_like
from fastconv.nn import _fx
from fastconv.nn._fold_cache import DerivedTensorCache
from fastconv.nn.conv_bn_act import ConvBNAct2d, is_conv_bn_act, plain_conv2d
from fastconv.nn import _conv_bn
from fastconv.nn.sequential import FusedSequential, fusable_runs

_KINDS = {"BasicBlock": 2, "Bottleneck": 3}


class ResNetBlock(nn.Module):
    """A fused torchvision ResNet block. ``kind`` is "BasicBlock" or "Bottleneck";
    `ResNetBlock.from_torchvision(block)` shares (does not copy) a torchvision block's modules.
    A downsample ``nn.Sequential(Conv2d, BatchNorm2d)`` becomes a ConvBNAct2d (same keys)."""

    __prepare_scriptable__ = _fx.refuse_torchscript

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 kind: str = "Bottleneck", groups: int = 1, base_width: int = 64, dilation: int = 1,
                 device=None, dtype=None) -> None:  # fmt: skip
        """torchvision's BasicBlock / Bottleneck(inplanes, planes, stride, downsample, groups,
        base_width, dilation) with the same modules, initialisation and keys."""
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"fastconv: kind must be one of {sorted(_KINDS)}; got {kind!r}")
        factory = dict(device=device, dtype=dtype)
        if kind == "BasicBlock":
            if groups != 1 or base_width != 64 or dilation != 1:
                raise ValueError(f"fastconv: a BasicBlock takes groups=1, base_width=64 and dilation=1 (torchvision's "
                                 f"rule); got groups={groups}, base_width={base_width}, dilation={dilation}")  # fmt: skip
            convs = [nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False, **factory),
                     nn.Conv2d(planes, planes, 3, 1, 1, bias=False, **factory)]  # fmt: skip
        else:
            width = int(planes * (base_width / 64.0)) * groups
            convs = [nn.Conv2d(inplanes, width, 1, bias=False, **factory),
                     nn.Conv2d(width, width, 3, stride, dilation, dilation, groups, bias=False, **factory),
                     nn.Conv2d(width, planes * 4, 1, bias=False, **factory)]  # fmt: skip
        units = [(conv, nn.BatchNorm2d(conv.out_channels, **factory)) for conv in convs]
        self._setup(kind, units, nn.ReLU(inplace=True), downsample, stride)

    def _setup(self, kind: str, units: list, relu: nn.Module, downsample: Optional[nn.Module], stride: int) -> None:
        self.kind, self.depth = kind, len(units)
        for i, (conv, bn) in enumerate(units, 1):
            setattr(self, f"conv{i}", conv)
            setattr(self, f"bn{i}", bn)
        self.relu = relu
        if downsample is not None and is_conv_bn_act(downsample):
            downsample = ConvBNAct2d.from_modules(*downsample)
        elif downsample is not None and fusable_runs(downsample):
            downsample = FusedSequential.from_sequential(downsample)  # timm's avg-pool downsample (ResNet-D)
        self.downsample = downsample
        self.stride = stride
        self._caches = [DerivedTensorCache() for _ in units]

    @classmethod
    def from_torchvision(cls, block: nn.Module) -> "ResNetBlock":
        kind = type(block).__name__
        if kind not in _KINDS or not type(block).__module__.startswith("torchvision.models"):
            raise ValueError(f"fastconv: block must be a torchvision BasicBlock or Bottleneck; got {type(block).__name__}")
        units = []
        for i in range(1, _KINDS[kind] + 1):
            conv, bn = getattr(block, f"conv{i}"), getattr(block, f"bn{i}")
            if plain_conv2d(conv) is None or type(bn) is not nn.BatchNorm2d:
                raise ValueError(
                    f"fastconv: block.conv{i} and block.bn{i} must be a Conv2d and a BatchNorm2d; "
                    f"got {type(conv).__name__}, {type(bn).__name__}"
                )
            units.append((plain_conv2d(conv), bn))
        if type(block.relu) is not nn.ReLU:
            raise ValueError(f"fastconv: block.relu must be an nn.ReLU; got {type(block.relu).__name__}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._setup(kind, units, block.relu, block.downsample, block.stride)
        return train_like(fused, block.training, block)

    @classmethod
    def from_timm(cls, block: nn.Module) -> "ResNetBlock":
        """The ResNetBlock of a timm ResNet ``BasicBlock`` or ``Bottleneck``, sharing its modules:
        the same keys (``conv1.weight``, ``bn1.*``, ..., ``downsample.*``). One with a
        squeeze-excitation, anti-aliasing, drop block, drop path or a non-ReLU activation is
        refused, naming it (timm_blocks.resnet_block_refusal)."""
        from fastconv.nn.timm_blocks import resnet_block_refusal, shared_batch_norm, timm_class

        kind = type(block).__name__
        if timm_class(block) != ("timm.models.resnet", kind) or kind not in _KINDS:
            raise ValueError(f"fastconv: block must be a timm BasicBlock or Bottleneck; got {type(block).__name__}")
        reason = resnet_block_refusal(block)
        if reason:
            raise ValueError(f"fastconv: ResNetBlock.from_timm: block cannot be fused: {reason}")
        units = [(plain_conv2d(getattr(block, f"conv{i}")), shared_batch_norm(getattr(block, f"bn{i}"), f"bn{i}")[0])
                 for i in range(1, _KINDS[kind] + 1)]  # fmt: skip
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._setup(kind, units, nn.ReLU(inplace=True), block.downsample, block.stride)
        # The BatchNorms are plain ones sharing timm's state, each in its timm BatchNorm's mode.
        return train_like(fused, block.training, block, *(bn for _, bn in units))

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
            out = _conv_bn.conv_bn_act(out, conv, bn, "relu", cache)
        # relu(bn(conv(out)) + identity): in eval one kernel, the 1x1 GEMM (Bottleneck) or the
        # implicit GEMM (BasicBlock's 3x3) adding the identity before its ReLU.
        (conv, bn), cache = units[-1], self._caches[-1]
        return _conv_bn.conv_bn_act(out, conv, bn, "relu", cache, residual=identity, activation_after_residual=True)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def is_torchvision_resnet_block(module: nn.Module) -> bool:
    """Exactly torchvision's BasicBlock or Bottleneck (a subclass may have its own forward)."""
    return type(module).__name__ in _KINDS and type(module).__module__ == "torchvision.models.resnet"


__all__ = ["ResNetBlock", "is_torchvision_resnet_block"]
