"""timm's blocks as fastconv's fused ones, keeping timm's attribute names and so its keys.

timm is not a dependency: its classes are recognised by module and name, and only the
configurations whose every part a fused kernel honours are taken. `refusal(block)` says why
one is not (a squeeze-excitation, anti-aliasing, a drop path that is live in training, a
conv with its own padding, an activation without a kernel); such a block keeps its own
forward, and its conv -> BatchNorm pairs are still fused one by one (attribute_fusion).

| timm class | becomes |
|---|---|
| `_efficientnet_blocks.InvertedResidual` | TimmInvertedResidual (here): one fused kernel in eval |
| `_efficientnet_blocks.DepthwiseSeparableConv` | DepthwiseSeparableConv2d (its names are timm's) |
| `resnet.BasicBlock` / `resnet.Bottleneck` | ResNetBlock: the residual add and ReLU in the last conv's epilogue |
| `densenet.DenseBlock` / `densenet.DenseTransition` | DenseBlock / Transition |

timm's norms are BatchNormAct2d: a BatchNorm2d with BatchNorm2d's keys plus an activation and
a drop. Each becomes a plain nn.BatchNorm2d sharing its parameters and buffers, its
activation carried by the fused module.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from fastconv._validation import fail
from fastconv.nn._modes import train_like
from fastconv.nn import _conv_bn, _fx
from fastconv.nn._block_training import fused_block_train, fused_training_applies
from fastconv.nn._fold_cache import DerivedTensorCache
from fastconv.nn.attribute_fusion import batch_norm_activation
from fastconv.nn.conv_bn_act import plain_conv2d
from fastconv.ops.inverted_residual import inverted_residual

_EFFICIENTNET = "timm.models._efficientnet_blocks"


def timm_class(module: nn.Module) -> Optional[tuple[str, str]]:
    """(module, class name) of a timm class, or None for anything else."""
    kind = type(module)
    return (kind.__module__, kind.__name__) if kind.__module__.startswith("timm.") else None


def shared_batch_norm(bn: nn.Module, where: str) -> tuple[nn.BatchNorm2d, Optional[str]]:
    """(a plain BatchNorm2d sharing bn's parameters and buffers, bn's activation name) for a
    BatchNorm2d or timm's BatchNormAct2d; refused, naming why, when its activation or drop
    has no fused kernel."""
    usable, activation, why = batch_norm_activation(bn)
    if not usable:
        fail(f"{where} must be a BatchNorm2d or timm's BatchNormAct2d that fastconv can fuse; got {type(bn).__name__}: {why}")
    if type(bn) is nn.BatchNorm2d:
        return bn, None
    plain = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
    plain.weight, plain.bias = bn.weight, bn.bias  # shared, not copied
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(plain, name, getattr(bn, name))
    plain.train(bn.training)
    return plain, activation


def _identity_refusal(block: nn.Module, names: tuple) -> Optional[str]:
    for name in names:
        part = getattr(block, name, None)
        if part is not None and type(part) is not nn.Identity:
            return f"its {name} ({type(part).__name__}) has no fused kernel"
    return None


def _conv_refusal(block: nn.Module, names: tuple) -> Optional[str]:
    for name in names:
        conv = getattr(block, name, None)
        plain = plain_conv2d(conv)
        if plain is None or plain.padding_mode != "zeros" or isinstance(plain.padding, str):
            return f"its {name} ({type(conv).__name__}) is not a plain zero-padded Conv2d"
    return None


def _norm_refusal(block: nn.Module, names: tuple, activations: Optional[tuple] = None) -> Optional[str]:
    for i, name in enumerate(names):
        usable, activation, why = batch_norm_activation(getattr(block, name, None))
        if not usable:
            return f"its {name}: {why}"
        if activations is not None and activation not in activations[i]:
            return f"its {name}'s activation {activation!r} is not one of {sorted(map(str, activations[i]))}"
    return None


def _first(*reasons: Optional[str]) -> Optional[str]:
    return next((r for r in reasons if r), None)


def inverted_residual_refusal(block: nn.Module) -> Optional[str]:
    if getattr(block, "conv_s2d", None) is not None:
        return "its space-to-depth stem conv (conv_s2d) has no fused kernel"
    reason = _first(_identity_refusal(block, ("aa", "se", "drop_path")),
                    _conv_refusal(block, ("conv_pw", "conv_dw", "conv_pwl")), _norm_refusal(block, ("bn1", "bn2", "bn3")))  # fmt: skip
    if reason:
        return reason
    if block.conv_pw.kernel_size != (1, 1) or block.conv_pwl.kernel_size != (1, 1):
        return "its expansion or projection is not a 1x1 conv"
    if block.conv_dw.groups != block.conv_dw.in_channels or block.conv_dw.stride[0] != block.conv_dw.stride[1]:
        return "its conv_dw is not a depthwise conv with one stride along both axes"
    acts = [batch_norm_activation(getattr(block, n))[1] for n in ("bn1", "bn2", "bn3")]
    if acts[0] != acts[1] or acts[2] is not None:
        return f"the kernel takes one activation after the expansion and the depthwise conv and none after the projection; got {acts}"
    return None


def depthwise_separable_refusal(block: nn.Module) -> Optional[str]:
    if getattr(block, "conv_s2d", None) is not None:
        return "its space-to-depth stem conv (conv_s2d) has no fused kernel"
    reason = _first(_identity_refusal(block, ("aa", "se", "drop_path")), _conv_refusal(block, ("conv_dw", "conv_pw")),
                    _norm_refusal(block, ("bn1", "bn2")))  # fmt: skip
    if reason:
        return reason
    if block.conv_pw.kernel_size != (1, 1) or block.conv_dw.groups != block.conv_dw.in_channels:
        return "its conv_dw is not depthwise or its conv_pw is not 1x1"
    return None


def resnet_block_refusal(block: nn.Module) -> Optional[str]:
    depth = 3 if type(block).__name__ == "Bottleneck" else 2
    if getattr(block, "se", None) is not None:
        return f"its squeeze-excitation ({type(block.se).__name__}) has no fused kernel"
    if getattr(block, "drop_path", None) is not None:
        return "its drop path (stochastic depth) has no fused kernel"
    return _first(_identity_refusal(block, ("drop_block", "aa")),
                  _conv_refusal(block, tuple(f"conv{i}" for i in range(1, depth + 1))),
                  _norm_refusal(block, tuple(f"bn{i}" for i in range(1, depth + 1)), ((None,),) * depth),
                  next((f"its act{i} ({type(getattr(block, f'act{i}')).__name__}) is not an nn.ReLU"
                        for i in range(1, depth + 1) if type(getattr(block, f"act{i}", None)) is not nn.ReLU), None))  # fmt: skip


def dense_layer_refusal(layer: nn.Module) -> Optional[str]:
    names = {name for name, _ in layer.named_children()}
    if names != {"norm1", "conv1", "norm2", "conv2"}:
        return f"its layer's children are {sorted(names)}, not norm1, conv1, norm2, conv2"
    return _first(_conv_refusal(layer, ("conv1", "conv2")), _norm_refusal(layer, ("norm1", "norm2"), (("relu",),) * 2))


def dense_block_refusal(block: nn.Module) -> Optional[str]:
    layers = list(block.children())
    if not layers:
        return "it has no layers"
    return _first(*(dense_layer_refusal(layer) for layer in layers))


def transition_refusal(transition: nn.Module) -> Optional[str]:
    names = [name for name, _ in transition.named_children()]
    if names != ["norm", "conv", "pool"]:
        return f"its children are {names}, not norm, conv, pool"
    if type(transition.pool) is not nn.AvgPool2d:
        return f"its pool ({type(transition.pool).__name__}, anti-aliased) is not AvgPool2d(2, 2)"
    return _first(_conv_refusal(transition, ("conv",)), _norm_refusal(transition, ("norm",), (("relu",),)))


class TimmInvertedResidual(nn.Module):
    """timm's ``InvertedResidual`` without squeeze-excitation or anti-aliasing (MobileNetV2's block
    in timm), with timm's attributes and keys: ``conv_pw`` (1x1 expansion), ``bn1``, ``conv_dw``,
    ``bn2``, ``conv_pwl`` (1x1 projection), ``bn3``. Eval runs the block as one
    `fastconv::inverted_residual` kernel, each BatchNorm folded and cached; training runs
    InvertedResidual's fused training op, exact BatchNorm2d semantics. Made by `from_timm`,
    which shares the block's parameters."""

    __prepare_scriptable__ = _fx.refuse_torchscript
    fused_training = True  # False: the unfused training path (as InvertedResidual's)

    @classmethod
    def from_timm(cls, block: nn.Module) -> "TimmInvertedResidual":
        if timm_class(block) != (_EFFICIENTNET, "InvertedResidual"):
            fail(f"block must be timm's InvertedResidual; got {type(block).__module__}.{type(block).__name__}")
        reason = inverted_residual_refusal(block)
        if reason:
            fail(f"TimmInvertedResidual.from_timm: block cannot be fused: {reason}")
        fused = cls()
        fused.conv_pw, (fused.bn1, fused.activation) = plain_conv2d(block.conv_pw), shared_batch_norm(block.bn1, "bn1")
        fused.conv_dw, (fused.bn2, _) = plain_conv2d(block.conv_dw), shared_batch_norm(block.bn2, "bn2")
        fused.conv_pwl, (fused.bn3, _) = plain_conv2d(block.conv_pwl), shared_batch_norm(block.bn3, "bn3")
        fused.has_skip = bool(block.has_skip)
        fused._caches = [DerivedTensorCache() for _ in range(3)]
        return train_like(fused, block.training, block, fused.bn1, fused.bn2, fused.bn3)

    def _units(self) -> list:
        return [(self.conv_pw, self.bn1, self.activation), (self.conv_dw, self.bn2, self.activation),
                (self.conv_pwl, self.bn3, None)]  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx.symbolically_traced():
            return _fx.opaque_call(self, x)
        units = self._units()
        if self.fused_training and fused_training_applies(x, [(conv, bn) for conv, bn, _ in units]):
            return fused_block_train(x, *((conv, bn) for conv, bn, _ in units), (self.activation, self.activation, None),
                                     self.has_skip)  # fmt: skip
        plain = all(type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d for conv, bn, _ in units)
        if not plain or any(_conv_bn.uses_batch_stats(bn) for _, bn, _ in units):
            # Training (or a child swapped for another kind): each unit in its BatchNorm's own mode.
            h = x
            for (conv, bn, activation), cache in zip(units, self._caches):
                h = _conv_bn.conv_bn_act(h, conv, bn, activation, cache) if plain else _activate(bn(conv(h)), activation)
            return h + x if self.has_skip else h
        (expand, expand_shift), (dw, dw_shift), (project, project_shift) = (
            _conv_bn.folded(cache, conv, bn) for (conv, bn, _), cache in zip(units, self._caches))  # fmt: skip
        return inverted_residual(
            x, expand, dw, project, stride=self.conv_dw.stride, padding=self.conv_dw.padding,
            dilation=self.conv_dw.dilation, expand_shift=expand_shift, dw_shift=dw_shift, project_shift=project_shift,
            activation=self.activation, use_residual=self.has_skip,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, has_skip={self.has_skip}"


def _activate(h: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    from fastconv.nn.conv_bn_act import _ACTIVATION_MODULES

    return h if activation is None else _ACTIVATION_MODULES[activation]()(h)


def _converters() -> dict[tuple[str, str], tuple[Callable, Callable]]:
    """(timm module, class) -> (refusal, conversion). Imported late: these modules import this one."""
    from fastconv.nn.dense import DenseBlock, Transition
    from fastconv.nn.inverted_residual import DepthwiseSeparableConv2d
    from fastconv.nn.resnet import ResNetBlock

    return {
        (_EFFICIENTNET, "InvertedResidual"): (inverted_residual_refusal, TimmInvertedResidual.from_timm),
        (_EFFICIENTNET, "DepthwiseSeparableConv"): (depthwise_separable_refusal, DepthwiseSeparableConv2d.from_timm),
        ("timm.models.resnet", "BasicBlock"): (resnet_block_refusal, ResNetBlock.from_timm),
        ("timm.models.resnet", "Bottleneck"): (resnet_block_refusal, ResNetBlock.from_timm),
        ("timm.models.densenet", "DenseBlock"): (dense_block_refusal, DenseBlock.from_timm),
        ("timm.models.densenet", "DenseTransition"): (transition_refusal, Transition.from_timm),
    }


def is_timm_block(module: nn.Module) -> bool:
    """Whether module is one of the timm classes above (whether or not it can be fused)."""
    return timm_class(module) in _converters()


def timm_block_refusal(module: nn.Module) -> Optional[str]:
    """Why a timm block above cannot be fused, or None when it can."""
    return _converters()[timm_class(module)][0](module)


def convert_timm_block(module: nn.Module) -> nn.Module:
    """The fused module for a timm block above that `timm_block_refusal` takes."""
    return _converters()[timm_class(module)][1](module)


__all__ = ["TimmInvertedResidual", "convert_timm_block", "is_timm_block", "shared_batch_norm", "timm_block_refusal"]
