"""InvertedResidual (MobileNetV2) and DepthwiseSeparableConv2d (MobileNetV1): whole blocks as
one fused kernel in eval, exact BatchNorm training through fastconv's unfused ops.

* **eval** (every BatchNorm in eval mode with running statistics): each conv's BatchNorm is
  folded into its weight and a per-channel shift, once, cached until a source tensor changes
  (`DerivedTensorCache`, as ConvBNAct2d), and the block runs as one `fastconv::inverted_residual`
  call: the expanded tensor never reaches memory. The depthwise-separable block is the same op
  and kernel without the expansion.
* **train** (every BatchNorm with batch statistics): one `fastconv::inverted_residual_train`
  call (fastconv/nn/_block_training.py), which never stores the expanded tensor in the
  forward and keeps only x, the pre-BatchNorm projection and the statistics for a backward
  that recomputes the block's hidden tensors: about 1/t of the unfused chain's activation
  memory. Batch statistics, running-stat updates with momentum or the cumulative average,
  num_batches_tracked, gradients equal to torchvision's.
* **the unfused training path** (``fused_training = False``, BatchNorms in mixed modes, a
  child of another kind): each conv + BatchNorm as ConvBNAct2d's training path, on fastconv's
  per-conv ops (`conv2d_batch_stats` then `batch_norm_act`); exact too.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastconv._validation import fail
from fastconv.activations import activation_code
from fastconv.nn._modes import train_like
from fastconv.nn import _conv_bn, _fx
from fastconv.nn._block_training import fused_block_train, fused_training_applies
from fastconv.nn._fold_cache import DerivedTensorCache
from fastconv.nn.conv_bn_act import _ACTIVATION_MODULES, ConvBNAct2d, plain_conv2d
from fastconv.ops.inverted_residual import depthwise_separable_conv2d, inverted_residual


def _check_channels(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(f"{name} must be an int >= 1; got {value!r}")


class InvertedResidual(nn.Module):
    """A drop-in for torchvision's ``mobilenetv2.InvertedResidual``, with the same children and
    state_dict keys (``conv.0.0.weight``, ``conv.0.1.*``, ...): ``conv`` is
    ``[ConvBNAct2d expand (when expand_ratio != 1), ConvBNAct2d depthwise 3x3, Conv2d project,
    BatchNorm2d]``. Eval runs the whole block as one fused kernel; see the module docstring.

    Args:
        inp, oup, stride, expand_ratio: torchvision's (hidden width round(inp * expand_ratio)).
        activation: after the expansion and the depthwise conv; "relu6" is MobileNetV2's.
        eps, momentum: the BatchNorms' (torchvision's defaults).
    """

    __prepare_scriptable__ = _fx.refuse_torchscript
    fused_training = True  # False: the unfused training path (see the module docstring)

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float, activation: Optional[str] = "relu6",
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        _check_channels(inp=inp, oup=oup)
        if stride not in (1, 2):
            fail(f"stride must be 1 or 2, as torchvision's InvertedResidual; got {stride!r}")
        activation_code(activation)
        hidden = int(round(inp * expand_ratio))
        factory = dict(device=device, dtype=dtype)
        bn = dict(eps=eps, momentum=momentum, **factory)
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct2d(inp, hidden, 1, activation=activation, **bn))
        layers += [
            ConvBNAct2d(hidden, hidden, 3, stride, groups=hidden, activation=activation, **bn),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False, **factory),
            nn.BatchNorm2d(oup, eps, momentum, **factory),
        ]
        self._setup(nn.Sequential(*layers), inp, oup, stride, activation)

    def _setup(self, conv: nn.Sequential, inp: int, oup: int, stride: int, activation: Optional[str]) -> None:
        # torchvision's attributes, so code that reads them keeps working.
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = conv
        self.out_channels = oup
        self._is_cn = stride > 1
        self.activation = activation
        self._project_cache = DerivedTensorCache()

    @classmethod
    def from_torchvision(cls, block: nn.Module) -> "InvertedResidual":
        """An InvertedResidual around torchvision's block's modules, sharing (not copying) its
        parameters and buffers."""
        conv = getattr(block, "conv", None)
        if not isinstance(conv, nn.Sequential) or len(conv) not in (3, 4):
            fail(f"block must be a torchvision mobilenetv2.InvertedResidual; got {type(block).__name__}")
        units = [ConvBNAct2d.from_modules(*unit) for unit in list(conv)[:-2]]
        names = {unit.activation for unit in units}
        if len(names) != 1:
            fail(f"the expansion and depthwise activations must be the same; got {sorted(map(str, names))}")
        project, bn = conv[-2], conv[-1]
        if type(project) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d:
            fail(f"block.conv must end with Conv2d, BatchNorm2d; got {type(project).__name__}, {type(bn).__name__}")
        depthwise = units[-1][0]
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        inp = units[0][0].in_channels
        fused._setup(nn.Sequential(*units, project, bn), inp, project.out_channels, depthwise.stride[0], names.pop())
        return train_like(fused, block.training, block)

    def _fusable(self) -> bool:
        """Every child the kind the kernel implements, and every BatchNorm in eval with running
        statistics; otherwise the children run as they are (a SyncBatchNorm swapped in, say)."""
        *units, project, bn = self.conv
        if any(type(unit) is not ConvBNAct2d or type(unit[0]) is not nn.Conv2d or type(unit[1]) is not nn.BatchNorm2d
               for unit in units) or type(project) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d:  # fmt: skip
            return False
        return not any(_conv_bn.uses_batch_stats(unit[1]) for unit in units) and not _conv_bn.uses_batch_stats(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx.symbolically_traced():
            return _fx.opaque_call(self, x)  # one node of an fx graph (see fastconv/nn/_fx.py)
        *units, project, bn = self.conv
        training_units = [(unit[0], unit[1]) if type(unit) is ConvBNAct2d else None for unit in units] + [(project, bn)]
        if self.fused_training and None not in training_units and fused_training_applies(x, training_units):
            expand = training_units[0] if len(units) == 2 else None
            return fused_block_train(x, expand, training_units[-2], training_units[-1],
                                     (self.activation if expand else None, self.activation, None), self.use_res_connect)  # fmt: skip
        if not self._fusable():
            h = x
            for unit in units:
                h = unit(h)
            if type(project) is nn.Conv2d and type(bn) is nn.BatchNorm2d:
                h = _conv_bn.conv_bn_act(h, project, bn, None, self._project_cache)
            else:
                h = bn(project(h))
            return x + h if self.use_res_connect else h
        expand = units[0].folded_weight_and_shift() if len(units) == 2 else (None, None)
        dw_weight, dw_shift = units[-1].folded_weight_and_shift()
        project_weight, project_shift = _conv_bn.folded(self._project_cache, project, bn)
        return inverted_residual(
            x, expand[0], dw_weight, project_weight, stride=self.stride, expand_shift=expand[1], dw_shift=dw_shift,
            project_shift=project_shift, activation=self.activation, use_residual=self.use_res_connect,
        )  # fmt: skip


class DepthwiseSeparableConv2d(nn.Module):
    """The MobileNetV1 block: depthwise k x k -> BatchNorm -> act, 1x1 -> BatchNorm -> act, and an
    optional skip; one fused kernel in eval (see the module docstring).

    The children follow timm's ``DepthwiseSeparableConv`` without SE: ``conv_dw`` (Conv2d, groups =
    in_channels), ``bn1``, ``conv_pw`` (1x1 Conv2d), ``bn2``; state_dict keys ``conv_dw.weight``,
    ``bn1.{weight,bias,running_mean,running_var,num_batches_tracked}``, ``conv_pw.weight``,
    ``bn2.*``, as timm's (whose bn1/bn2 are BatchNormAct2d with BatchNorm2d's keys); `from_timm`
    takes a timm block, tested against timm in test_optimize_timm.

    Args:
        in_channels, out_channels, kernel_size (odd), stride, dilation: the depthwise conv's
            (padding (k - 1) // 2 * dilation).
        dw_activation, pw_activation: after each BatchNorm; MobileNetV1 has ReLU after both.
            timm's default is no activation after the pointwise BatchNorm (pw_activation=None).
        skip: add the input (stride 1 and in_channels == out_channels only).
        eps, momentum: the BatchNorms'.
    """

    __prepare_scriptable__ = _fx.refuse_torchscript
    fused_training = True  # False: the unfused training path (see the module docstring)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1,
                 dw_activation: Optional[str] = "relu6", pw_activation: Optional[str] = "relu6", skip: bool = False,
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        _check_channels(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                        dilation=dilation)  # fmt: skip
        if kernel_size % 2 == 0:
            fail(f"kernel_size must be odd (padding (k - 1) // 2 keeps the size at stride 1); got {kernel_size}")
        if skip and (stride != 1 or in_channels != out_channels):
            fail(f"skip needs stride 1 and in_channels == out_channels; got stride {stride}, "
                 f"in_channels {in_channels}, out_channels {out_channels}")  # fmt: skip
        activation_code(dw_activation, "dw_activation")
        activation_code(pw_activation, "pw_activation")
        factory = dict(device=device, dtype=dtype)
        padding = (kernel_size - 1) // 2 * dilation
        self.conv_dw = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding, dilation, in_channels,
                                 bias=False, **factory)  # fmt: skip
        self.bn1 = nn.BatchNorm2d(in_channels, eps, momentum, **factory)
        self.conv_pw = nn.Conv2d(in_channels, out_channels, 1, bias=False, **factory)
        self.bn2 = nn.BatchNorm2d(out_channels, eps, momentum, **factory)
        self.dw_activation, self.pw_activation, self.skip = dw_activation, pw_activation, bool(skip)
        self._dw_cache, self._pw_cache = DerivedTensorCache(), DerivedTensorCache()

    @classmethod
    def from_timm(cls, block: nn.Module) -> "DepthwiseSeparableConv2d":
        """The DepthwiseSeparableConv2d of timm's ``DepthwiseSeparableConv`` (no SE, no
        anti-aliasing, no drop path), sharing its parameters and buffers: bn1's and bn2's
        activations become dw_activation and pw_activation, ``has_skip`` the skip. A block this
        kernel cannot honour is refused, naming why (timm_blocks.depthwise_separable_refusal)."""
        from fastconv.nn.timm_blocks import depthwise_separable_refusal, shared_batch_norm, timm_class

        if timm_class(block) != ("timm.models._efficientnet_blocks", "DepthwiseSeparableConv"):
            fail(f"block must be timm's DepthwiseSeparableConv; got {type(block).__module__}.{type(block).__name__}")
        reason = depthwise_separable_refusal(block)
        if reason:
            fail(f"DepthwiseSeparableConv2d.from_timm: block cannot be fused: {reason}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.conv_dw, (fused.bn1, fused.dw_activation) = plain_conv2d(block.conv_dw), shared_batch_norm(block.bn1, "bn1")
        fused.conv_pw, (fused.bn2, fused.pw_activation) = plain_conv2d(block.conv_pw), shared_batch_norm(block.bn2, "bn2")
        fused.skip = bool(block.has_skip)
        fused._dw_cache, fused._pw_cache = DerivedTensorCache(), DerivedTensorCache()
        return train_like(fused, block.training, block, fused.bn1, fused.bn2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx.symbolically_traced():
            return _fx.opaque_call(self, x)
        residual = x if self.skip else None
        kinds_ok = all(type(m) is nn.Conv2d for m in (self.conv_dw, self.conv_pw)) and all(
            type(m) is nn.BatchNorm2d for m in (self.bn1, self.bn2)
        )
        if not kinds_ok:
            h = _activate(self.bn1(self.conv_dw(x)), self.dw_activation)
            h = _activate(self.bn2(self.conv_pw(h)), self.pw_activation)
            return h + x if self.skip else h
        units = [(self.conv_dw, self.bn1), (self.conv_pw, self.bn2)]
        if self.fused_training and fused_training_applies(x, units):
            return fused_block_train(x, None, *units, (None, self.dw_activation, self.pw_activation), self.skip)
        if _conv_bn.uses_batch_stats(self.bn1) or _conv_bn.uses_batch_stats(self.bn2):
            h = _conv_bn.conv_bn_act(x, self.conv_dw, self.bn1, self.dw_activation, self._dw_cache)
            h = _conv_bn.conv_bn_act(h, self.conv_pw, self.bn2, self.pw_activation, self._pw_cache)
            return h + x if self.skip else h
        dw_weight, dw_shift = _conv_bn.folded(self._dw_cache, self.conv_dw, self.bn1)
        pw_weight, pw_shift = _conv_bn.folded(self._pw_cache, self.conv_pw, self.bn2)
        return depthwise_separable_conv2d(
            x, dw_weight, pw_weight, stride=self.conv_dw.stride, padding=self.conv_dw.padding,
            dilation=self.conv_dw.dilation, dw_shift=dw_shift, dw_activation=self.dw_activation, pw_shift=pw_shift,
            pw_activation=self.pw_activation, residual=residual,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"dw_activation={self.dw_activation!r}, pw_activation={self.pw_activation!r}, skip={self.skip}"


def _activate(h: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """The activation as a plain module, for children swapped for other kinds."""
    return h if activation is None else _ACTIVATION_MODULES[activation]()(h)


__all__ = ["DepthwiseSeparableConv2d", "InvertedResidual"]
