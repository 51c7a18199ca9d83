"""ConvBNAct2d: Conv2d -> BatchNorm2d -> activation as one fused unit, in training and in eval.

It is an ``nn.Sequential(Conv2d, BatchNorm2d[, activation])``, laid out exactly as torchvision's
``Conv2dNormActivation``, so the state_dict keys match (``0.weight``, ``1.weight``, ``1.bias``,
``1.running_mean``, ``1.running_var``, ``1.num_batches_tracked``) and pretrained weights load
unchanged. Only `forward` differs:

* **eval** (the BatchNorm's own mode): the running statistics are folded into the conv weight
  and a per-channel shift, once, and the folded pair is cached until any of the tensors it came
  from changes (`DerivedTensorCache`: version counters, addresses, dtypes, identities), so an
  optimizer step, `load_state_dict` and `.to()` all invalidate it with nothing for the user
  to remember. Then one conv kernel with a shift + activation epilogue.
* **train**: exact BatchNorm2d training semantics (batch statistics, biased variance to
  normalise, unbiased for the running update, momentum or the cumulative average when momentum
  is None, num_batches_tracked). The conv's epilogue computes the batch statistics as it writes
  c; one more pass normalises and applies the activation; the backward is one reduction and
  one elementwise pass (fastconv.ops.batch_norm) before the conv's backward.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from fastconv._geometry import positive_pair
from fastconv._validation import fail
from fastconv.activations import activation_code
from fastconv.nn._modes import train_like
from fastconv.nn import _conv_bn, _fx
from fastconv.nn._fold_cache import DerivedTensorCache
from fastconv.nn.depthwise import DepthwiseConv2d
from fastconv.nn.pointwise import PointwiseConv2d

_ACTIVATION_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish}
_ACTIVATION_NAMES = {module: name for name, module in _ACTIVATION_MODULES.items()}


def _activation_name(act: Union[None, str, nn.Module]) -> Optional[str]:
    if act is None or isinstance(act, str):
        activation_code(act)
        return act
    if type(act) is nn.Identity:
        return None
    if type(act) not in _ACTIVATION_NAMES:
        names = ", ".join(m.__name__ for m in _ACTIVATION_NAMES) + ", Identity"
        fail(f"act must be one of {names}, an activation name or None; got {type(act).__name__}")
    return _ACTIVATION_NAMES[type(act)]


def plain_conv2d(conv: nn.Module) -> Optional[nn.Conv2d]:
    """conv as a plain nn.Conv2d sharing its parameters, or None if it is not one.

    fastconv's DepthwiseConv2d and PointwiseConv2d are nn.Conv2d with the same semantics, run
    by another kernel; inside a fused unit the unit's own kernel runs the conv, so they are
    swapped back. This is what lets the per-kind converters run in any order without undoing
    a fusion. Any other subclass (timm's Conv2dSame, say) has its own forward: None.
    """
    if type(conv) is nn.Conv2d:
        return conv
    if type(conv) not in (DepthwiseConv2d, PointwiseConv2d):
        return None
    plain = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
    )  # fmt: skip
    plain.weight, plain.bias = conv.weight, conv.bias
    for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
        setattr(plain, name, getattr(conv, name))
    plain.train(conv.training)
    return plain


def _check_bn_arguments(eps, momentum) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        fail(f"eps must be a finite number > 0; got {eps!r}")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1):
        fail(f"momentum must be a number in [0, 1], or None for a cumulative average; got {momentum!r}")


class ConvBNAct2d(nn.Sequential):
    """A drop-in for torchvision's ``Conv2dNormActivation`` with BatchNorm2d (and ReLU, ReLU6,
    SiLU, Hardswish or no activation), fused by fastconv.

    Args:
        in_channels, out_channels, kernel_size, stride, groups, dilation, bias: as nn.Conv2d.
        padding: as nn.Conv2d; None gives torchvision's default, (kernel_size - 1) // 2 * dilation.
        activation: "relu6" (MobileNet's), "relu", "silu", "hardswish" or None.
        eps, momentum: as nn.BatchNorm2d (momentum None: a cumulative moving average).
    """

    __prepare_scriptable__ = _fx.refuse_torchscript

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=None,
        groups: int = 1,
        dilation=1,
        activation: Optional[str] = "relu6",
        bias: bool = False,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(f"{name} must be an int >= 1; got {value!r}")
        if in_channels % groups or out_channels % groups:
            fail(
                f"in_channels and out_channels must be divisible by groups; got in_channels={in_channels}, "
                f"out_channels={out_channels}, groups={groups}"
            )
        kernel = positive_pair(kernel_size, "kernel_size")
        dilation_ = positive_pair(dilation, "dilation")
        if padding is None:
            padding = tuple((k - 1) // 2 * d for k, d in zip(kernel, dilation_))
        _check_bn_arguments(eps, momentum)
        activation_code(activation)
        factory = dict(device=device, dtype=dtype)
        layers = [
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding, dilation_, groups, bias, **factory),
            nn.BatchNorm2d(out_channels, eps, momentum, **factory),
        ]
        if activation is not None:
            layers.append(_ACTIVATION_MODULES[activation](inplace=True))  # torchvision's choice
        super().__init__(*layers)
        self.activation = activation
        self._fold_cache = DerivedTensorCache()

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: Union[None, str, nn.Module] = None) -> "ConvBNAct2d":
        """A ConvBNAct2d around existing modules, sharing (not copying) their parameters.

        `act` is an activation module (ReLU, ReLU6, SiLU, Hardswish, Identity), a name, or None.
        """
        # Exact types: a subclass (timm's Conv2dSame, timm's BatchNormAct2d with its activation
        # and drop path) has semantics the fused kernels would silently drop.
        plain = plain_conv2d(conv)
        if plain is None:
            fail(f"conv must be an nn.Conv2d (or fastconv's DepthwiseConv2d/PointwiseConv2d), not a subclass with "
                 f"its own forward; got {type(conv).__module__}.{type(conv).__name__}")  # fmt: skip
        conv = plain
        if conv.padding_mode != "zeros":
            fail(f"conv.padding_mode must be 'zeros'; got {conv.padding_mode!r}")
        if type(bn) is not nn.BatchNorm2d:
            fail(f"bn must be an nn.BatchNorm2d, not a subclass whose extra semantics would be dropped; "
                 f"got {type(bn).__module__}.{type(bn).__name__}")  # fmt: skip
        if bn.num_features != conv.out_channels:
            fail(f"bn.num_features must equal conv.out_channels={conv.out_channels}; got {bn.num_features}")
        activation = _activation_name(act)
        layers = [conv, bn]
        if isinstance(act, nn.Module):
            layers.append(act)
        elif activation is not None:
            layers.append(_ACTIVATION_MODULES[activation](inplace=True))
        fused = cls.__new__(cls)
        nn.Sequential.__init__(fused, *layers)
        fused.activation = activation
        fused._fold_cache = DerivedTensorCache()
        return train_like(fused, conv.training, *layers)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx.symbolically_traced():
            return _fx.opaque_call(self, x)
        conv, bn = self[0], self[1]
        if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d:
            # A child swapped for another kind, say by nn.SyncBatchNorm.convert_sync_batchnorm
            # under DDP: fusing would silently drop its semantics (cross-GPU statistics), so run
            # the modules as they are.
            return nn.Sequential.forward(self, x)
        if conv.padding_mode != "zeros":
            fail(f"the conv's padding_mode must be 'zeros'; got {conv.padding_mode!r}")
        return _conv_bn.conv_bn_act(x, conv, bn, self.activation, self._fold_cache)

    # -- eval: folding -----------------------------------------------------------------------

    def folded_weight_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, shift): conv(x, weight) + shift == bn(conv(x)) under the running statistics,
        cached until any tensor it comes from changes (see DerivedTensorCache)."""
        return _conv_bn.folded(self._fold_cache, self[0], self[1])

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


def convert_conv_bn_act(model: nn.Module) -> nn.Module:
    """Replace, in place, every Conv2d -> BatchNorm2d[ -> activation] that fastconv fuses by its
    fused module, sharing its modules: ``nn.Sequential(Conv2d, BatchNorm2d[, act])`` (such as
    torchvision's Conv2dNormActivation) by a ConvBNAct2d, torchvision's InvertedResidual by
    fastconv's, torchvision's ResNet blocks by ResNetBlock, runs of Conv2d, BatchNorm2d[, act]
    children inside a plain nn.Sequential by FusedSequential. State_dict keys do not change.

    The fusion part of `fastconv.optimize`'s pipeline (fastconv/nn/_pipeline.py): together with
    convert_depthwise and convert_pointwise, in any order or repetition, it gives optimize's
    model. Returns the model."""
    from fastconv.nn import _pipeline  # the pipeline imports this module

    return _pipeline.convert(model, ("fuse",))


def is_conv_bn_act(module: nn.Module) -> bool:
    """Whether module is an nn.Sequential(Conv2d, BatchNorm2d[, activation]) ConvBNAct2d can
    take over (ConvBNAct2d itself excluded); the conv may be fastconv's Depthwise/PointwiseConv2d."""
    if not isinstance(module, nn.Sequential) or isinstance(module, ConvBNAct2d) or len(module) not in (2, 3):
        return False
    if type(module).forward is not nn.Sequential.forward:
        return False  # a Sequential subclass with its own forward
    conv, bn = plain_conv2d(module[0]), module[1]
    if conv is None or conv.padding_mode != "zeros" or type(bn) is not nn.BatchNorm2d:
        return False
    return len(module) == 2 or type(module[2]) in _ACTIVATION_NAMES or type(module[2]) is nn.Identity


