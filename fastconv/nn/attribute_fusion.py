"""Conv -> BatchNorm[ -> activation] pairs that are *attributes* of a module with its own
forward (timm's blocks and models, torchvision ResNet's stem), fused without changing a
state_dict key.

torchvision's units are Sequentials, which a fused Sequential can replace key for key. timm's
blocks keep their convs and norms as named attributes (``conv_pw``, ``bn1``, ...) and call them
in their own forward: ``x = self.conv_pw(x); x = self.bn1(x)``. A module replacing both would
rename the keys. So the pair is split across its two slots:

* the conv's slot gets a FusedConv2d: the same conv (its weight is the key ``conv_pw.weight``)
  whose forward also runs the BatchNorm and activation after it, on fastconv's fused conv
  (folded BatchNorm in eval, batch statistics and BatchNorm2d's running update in training);
* the BatchNorm's slot gets a FoldedBatchNorm2d: the same parameters and buffers (``bn1.*``),
  whose forward passes its input through, its work being done in the conv before it;
* an activation that follows the BatchNorm as its own attribute becomes nn.Identity.

Only the classes listed in FUSABLE_ATTRIBUTES are touched: their forwards are known to call
each pair back to back, and nowhere else. timm's BatchNormAct2d (a BatchNorm2d with its own
activation and drop) is honoured: its activation is fused, and one with a real drop layer is
left alone.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastconv.nn import _conv_bn, _fx
from fastconv.nn._fold_cache import DerivedTensorCache
from fastconv.nn.conv_bn_act import plain_conv2d

_ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Identity: None}

# (module, class) -> the (conv, bn, activation or None) attribute names its forward calls back to
# back. Read from timm 1.0's source: each pair's call sites are conv then norm and nothing else.
FUSABLE_ATTRIBUTES = {
    ("timm.models._efficientnet_blocks", "InvertedResidual"): (
        ("conv_s2d", "bn_s2d", None), ("conv_pw", "bn1", None), ("conv_dw", "bn2", None), ("conv_pwl", "bn3", None),
    ),
    ("timm.models._efficientnet_blocks", "DepthwiseSeparableConv"): (
        ("conv_s2d", "bn_s2d", None), ("conv_dw", "bn1", None), ("conv_pw", "bn2", None),
    ),
    ("timm.models._efficientnet_blocks", "ConvBnAct"): (("conv", "bn1", None),),
    ("timm.models._efficientnet_blocks", "EdgeResidual"): (("conv_exp", "bn1", None), ("conv_pwl", "bn2", None)),
    ("timm.layers.conv_bn_act", "ConvNormAct"): (("conv", "bn", None),),
    ("timm.models.efficientnet", "EfficientNet"): (("conv_stem", "bn1", None), ("conv_head", "bn2", None)),
    ("timm.models.resnet", "ResNet"): (("conv1", "bn1", "act1"),),
    # torchvision's ResNet: its forward runs conv1, bn1, relu, and uses self.relu nowhere else.
    ("torchvision.models.resnet", "ResNet"): (("conv1", "bn1", "relu"),),
    ("timm.models.resnet", "BasicBlock"): (("conv1", "bn1", None), ("conv2", "bn2", None)),
    ("timm.models.resnet", "Bottleneck"): (("conv1", "bn1", "act1"), ("conv2", "bn2", None), ("conv3", "bn3", None)),
}


def fusable_attributes(module: nn.Module) -> tuple:
    return FUSABLE_ATTRIBUTES.get((type(module).__module__, type(module).__name__), ())


def batch_norm_activation(bn: nn.Module) -> tuple[bool, Optional[str], str]:
    """(usable, activation name, why not) for a BatchNorm2d or timm's BatchNormAct2d."""
    if type(bn) is nn.BatchNorm2d or type(bn) is FoldedBatchNorm2d:
        return True, None, ""
    if not isinstance(bn, nn.BatchNorm2d) or type(bn).__name__ != "BatchNormAct2d":
        return False, None, f"{type(bn).__name__} is not a BatchNorm2d or timm's BatchNormAct2d"
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if drop is not None and type(drop) is not nn.Identity:
        return False, None, f"its drop layer ({type(drop).__name__}) has no fused kernel"
    if act is not None and type(act) not in _ACTIVATIONS:
        return False, None, f"its activation {type(act).__name__} has no fused kernel"
    return True, _ACTIVATIONS[type(act)] if act is not None else None, ""


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose work the FusedConv2d before it does: the same parameters and buffers
    (so the same keys), and a forward that returns its input."""

    __prepare_scriptable__ = _fx.refuse_torchscript

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> "FoldedBatchNorm2d":
        folded = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        folded.weight, folded.bias = bn.weight, bn.bias  # shared, not copied
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(folded, name, getattr(bn, name))
        folded.train(bn.training)
        return folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FusedConv2d(nn.Conv2d):
    """A Conv2d that also runs the BatchNorm (a FoldedBatchNorm2d in its parent) and activation
    after it: act(bn(conv(x))) on fastconv's fused conv, in the BatchNorm's own mode."""

    __prepare_scriptable__ = _fx.refuse_torchscript

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: FoldedBatchNorm2d, activation: Optional[str]) -> "FusedConv2d":
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode, device="meta")  # fmt: skip
        fused.weight, fused.bias = conv.weight, conv.bias
        # Not a child: the BatchNorm's keys stay in its own slot. The parent's train()/eval()
        # and .to() reach it there.
        object.__setattr__(fused, "folded_bn", bn)
        fused.activation = activation
        fused._fold_cache = DerivedTensorCache()
        fused.train(conv.training)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx.symbolically_traced():
            return _fx.opaque_call(self, x)
        return _conv_bn.conv_bn_act(x, self, self.folded_bn, self.activation, self._fold_cache)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused with the BatchNorm after it, activation={self.activation!r}"


def _hooked(module: nn.Module) -> bool:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(module, name, None) for name in hooks)


def fuse_attributes(module: nn.Module) -> tuple[list, list]:
    """Fuse, in place, each listed (conv, bn[, act]) attribute pair of a known class. Returns
    (replaced rows (attribute, from, to), skipped rows (attribute, kind, why))."""
    replaced, skipped = [], []
    for conv_name, bn_name, act_name in fusable_attributes(module):
        conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
        if conv is None or bn is None or isinstance(conv, FusedConv2d):
            continue  # absent in this configuration (conv_s2d), or fused already
        act = getattr(module, act_name, None) if act_name else None
        plain = plain_conv2d(conv)
        usable, activation, why = batch_norm_activation(bn)
        if plain is None:
            why = f"{type(conv).__name__} is not a plain Conv2d (its own padding or forward)"
        elif usable and bn.num_features != plain.out_channels:
            why = "the BatchNorm's channels are not the conv's outputs"
        elif usable and act is not None and (type(act) not in _ACTIVATIONS or activation is not None):
            why = f"the activation {type(act).__name__} has no fused kernel"
        elif any(_hooked(m) for m in (conv, bn, act) if m is not None):
            why = "has a hook, which a fused kernel would bypass"
        if why or not usable:
            skipped.append((conv_name, type(conv).__name__, why))
            continue
        if act is not None:
            activation = _ACTIVATIONS[type(act)]
            setattr(module, act_name, nn.Identity())
            replaced.append((act_name, type(act).__name__, f"Identity (fused into {conv_name})"))
        folded = FoldedBatchNorm2d.from_bn(bn)
        setattr(module, bn_name, folded)
        setattr(module, conv_name, FusedConv2d.from_modules(plain, folded, activation))
        replaced.append((conv_name, type(conv).__name__, f"FusedConv2d (+ {bn_name}, activation {activation})"))
        replaced.append((bn_name, type(bn).__name__, f"FoldedBatchNorm2d (run by {conv_name})"))
    return replaced, skipped


__all__ = ["FUSABLE_ATTRIBUTES", "FoldedBatchNorm2d", "FusedConv2d", "batch_norm_activation", "fuse_attributes"]
