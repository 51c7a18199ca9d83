"""DenseNet's dense block and transition, with torchvision's modules and state_dict keys.

DenseBlock runs the whole block as one op (fastconv::dense_block_train or _eval) on one
channels_last feature buffer, so its activation memory is linear in depth where torchvision's
naive block is quadratic, without the recompute of its ``memory_efficient=True`` checkpointing;
fastconv/ops/dense_block.py explains how. Its children are DenseLayers holding torchvision's
``norm1, conv1, norm2, conv2``, so ``denseblock1.denselayer1.norm1.weight`` and every other key
is torchvision's and pretrained weights load unchanged.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from fastconv._validation import fail
from fastconv.nn._modes import train_like
from fastconv.nn import _fx
from fastconv.nn._conv_bn import update_running_stats, uses_batch_stats
from fastconv.nn._fold_cache import DerivedTensorCache
from fastconv.ops import dense_block as _dense_ops  # noqa: F401  (registers the ops)
from fastconv.ops._common import autocast_inputs


def _folded_bn(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with bn(x) == x * scale + shift under the running statistics, in float32
    (float64 for float64 parameters): the precision the kernels' prologues and epilogues take."""
    wide = torch.float64 if bn.running_var.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(bn.running_var.to(wide) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(wide)
    shift = -bn.running_mean.to(wide) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(wide)
    return scale, shift


def _check_input(x, channels: int, module: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        fail(f"{module}: x must be a 4-D tensor (N, C, H, W); got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[1] != channels:
        fail(f"{module}: x must have num_input_features={channels} channels; got {x.shape[1]} (x of shape {tuple(x.shape)})")


class DenseLayer(nn.Module):
    """torchvision's ``_DenseLayer``: BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv [-> dropout].

    The same children and keys. Inside a DenseBlock it only holds the parameters: the block
    runs all its layers as one op. Called on its own (a tensor, or the list of earlier
    features torchvision's layer takes) it computes torchvision's layer eagerly.
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float = 0.0,
                 device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = nn.BatchNorm2d(num_input_features, **factory)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False, **factory)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate, **factory)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False, **factory)
        self.drop_rate = float(drop_rate)

    def forward(self, features: Union[torch.Tensor, list[torch.Tensor]]) -> torch.Tensor:
        x = torch.cat(features, 1) if isinstance(features, (list, tuple)) else features
        new = self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))
        if self.drop_rate > 0:
            new = F.dropout(new, p=self.drop_rate, training=self.training)
        return new


def _check_block_arguments(num_layers, num_input_features, bn_size, growth_rate, drop_rate) -> None:
    for name, value, least in (("num_layers", num_layers, 1), ("num_input_features", num_input_features, 1),
                               ("bn_size", bn_size, 1), ("growth_rate", growth_rate, 1)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            fail(f"DenseBlock: {name} must be an int >= {least}; got {value!r}")
    if not 0.0 <= float(drop_rate) < 1.0:
        fail(f"DenseBlock: drop_rate must be in [0, 1); got {drop_rate!r}")


class DenseBlock(nn.ModuleDict):
    """A drop-in for torchvision's ``_DenseBlock``: its output is ``torch.cat([x, new_1, ...,
    new_L], 1)`` with the same values, in a channels_last buffer of C0 + L*growth_rate channels.

    Training (every BatchNorm with batch statistics) and eval (every one with running
    statistics) each run as one fused op; each layer's BatchNorms update their own running
    statistics exactly as nn.BatchNorm2d does. A block whose BatchNorms mix the two modes, or
    differ in eps, runs torchvision's per-layer computation instead: correct, not fused.
    """

    __prepare_scriptable__ = _fx.refuse_torchscript

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float = 0.0, device=None, dtype=None) -> None:  # fmt: skip
        _check_block_arguments(num_layers, num_input_features, bn_size, growth_rate, drop_rate)
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate, device, dtype)
            self.add_module(f"denselayer{i + 1}", layer)
        self.num_input_features, self.growth_rate, self.drop_rate = num_input_features, growth_rate, float(drop_rate)
        self._fold_cache = DerivedTensorCache()

    @classmethod
    def from_torchvision(cls, block: nn.Module) -> "DenseBlock":
        """The DenseBlock of a torchvision ``_DenseBlock``, sharing its parameters and
        buffers. ``memory_efficient`` is honoured by construction: the same function, with
        less memory than its checkpointing. A layer that is not a plain _DenseLayer (other
        children, other kernel sizes, a conv bias) is refused, naming what differs."""
        return cls._from_layers(list(block.children()), block.training, "DenseBlock.from_torchvision")

    @classmethod
    def from_timm(cls, block: nn.Module) -> "DenseBlock":
        """The DenseBlock of a timm ``densenet.DenseBlock``, sharing its parameters and buffers:
        the same keys. timm's norms are BatchNormAct2d with a ReLU, which is the fused ReLU
        here; a block with another activation or a drop layer is refused, naming it."""
        from fastconv.nn.timm_blocks import dense_block_refusal, shared_batch_norm, timm_class

        if timm_class(block) != ("timm.models.densenet", "DenseBlock"):
            fail(f"DenseBlock.from_timm: block must be timm's densenet.DenseBlock; got {type(block).__name__}")
        reason = dense_block_refusal(block)
        if reason:
            fail(f"DenseBlock.from_timm: block cannot be fused: {reason}")
        layers = []
        for layer in block.children():
            view = nn.Module()  # torchvision's layer shape, holding timm's modules (norms as plain BatchNorm2d)
            view.norm1, view.conv1 = shared_batch_norm(layer.norm1, "norm1")[0], layer.conv1
            view.norm2, view.conv2 = shared_batch_norm(layer.norm2, "norm2")[0], layer.conv2
            view.drop_rate = layer.drop_rate
            layers.append(train_like(view, layer.training, layer, view.norm1, view.norm2))
        return cls._from_layers(layers, block.training, "DenseBlock.from_timm")

    @classmethod
    def _from_layers(cls, layers: list, training: bool, where: str) -> "DenseBlock":
        if not layers:
            fail(f"{where}: block has no layers")
        first = layers[0]
        fused = cls(len(layers), first.norm1.num_features, first.conv1.out_channels // first.conv2.out_channels,
                    first.conv2.out_channels, getattr(first, "drop_rate", 0.0), device="meta")  # fmt: skip
        for i, (source, target) in enumerate(zip(layers, fused.values())):
            _check_torchvision_layer(source, target, i, where)
            for name in ("norm1", "conv1", "norm2", "conv2"):
                setattr(target, name, getattr(source, name))  # share, not copy
            train_like(target, source.training, source)
        return train_like(fused, training, *layers)

    def _layers(self) -> list[DenseLayer]:
        return list(self.values())

    def _norms(self) -> list[nn.BatchNorm2d]:
        return [bn for layer in self._layers() for bn in (layer.norm1, layer.norm2)]

    def _fused_mode(self) -> str:
        """"train", "eval", or "layers" (torchvision's per-layer computation)."""
        norms, layers = self._norms(), self._layers()
        if len({bn.eps for bn in norms}) != 1 or any(bn.weight is None for bn in norms):
            return "layers"
        batch_stats = {uses_batch_stats(bn) for bn in norms}
        dropout = {layer.training and layer.drop_rate > 0 for layer in layers}
        if batch_stats == {True} and len(dropout) == 1 and len({layer.drop_rate for layer in layers}) == 1:
            return "train"
        if batch_stats == {False} and dropout == {False}:
            return "eval"
        return "layers"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx.symbolically_traced():
            return _fx.opaque_call(self, x)
        _check_input(x, self.num_input_features, "DenseBlock")
        mode = self._fused_mode()
        if mode == "layers":
            features = [x]
            for layer in self._layers():
                features.append(layer(features))
            return torch.cat(features, 1)
        if mode == "eval":
            return self._eval_forward(x)
        return self._train_forward(x)

    def _conv_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, list, list]:
        layers = self._layers()
        x, *weights = autocast_inputs(x, *(l.conv1.weight for l in layers), *(l.conv2.weight for l in layers))
        return x, weights[: len(layers)], weights[len(layers) :]

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self._layers()
        x, conv1, conv2 = self._conv_weights(x)
        drop_rate = layers[0].drop_rate if layers[0].training else 0.0
        masks = []
        if drop_rate > 0:
            # F.dropout's draw: bernoulli(1 - p) over the new features' shape and layout, layer by layer.
            shape = (x.shape[0], self.growth_rate, *x.shape[2:])
            masks = [torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - drop_rate).bool() for _ in layers]
        features, mean, var, _, bottleneck_mean, bottleneck_var = torch.ops.fastconv.dense_block_train(
            x, [l.norm1.weight for l in layers], [l.norm1.bias for l in layers], conv1,
            [l.norm2.weight for l in layers], [l.norm2.bias for l in layers], conv2, masks, drop_rate,
            layers[0].norm1.eps,
        )  # fmt: skip
        count = x.shape[0] * x.shape[2] * x.shape[3]
        for j, layer in enumerate(layers):
            prefix = self.num_input_features + j * self.growth_rate
            for bn, m, v in ((layer.norm1, mean[:prefix], var[:prefix]), (layer.norm2, bottleneck_mean[j], bottleneck_var[j])):
                if bn.training and bn.track_running_stats:
                    update_running_stats(bn, m, v, count)
        return features

    def _folded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        norms = self._norms()
        sources = [t for bn in norms for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]
        return self._fold_cache.get(sources, tuple(bn.eps for bn in norms), lambda: [_folded_bn(bn) for bn in norms])

    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        x, conv1, conv2 = self._conv_weights(x)
        folded = self._folded()
        norm1, norm2 = folded[0::2], folded[1::2]
        return torch.ops.fastconv.dense_block_eval(
            x, [s for s, _ in norm1], [t for _, t in norm1], conv1, [s for s, _ in norm2], [t for _, t in norm2], conv2
        )


def _check_torchvision_layer(source: nn.Module, target: DenseLayer, index: int, where: str) -> None:
    where = f"{where}: layer {index + 1}"
    names = {name for name, _ in source.named_children()}
    expected = {"norm1", "relu1", "conv1", "norm2", "relu2", "conv2"}
    if not names <= expected or not {"norm1", "conv1", "norm2", "conv2"} <= names:
        fail(f"{where} must have torchvision's children {sorted(expected)}; got {sorted(names)}")
    for name in ("relu1", "relu2"):
        if name in names and type(getattr(source, name)) is not nn.ReLU:
            fail(f"{where}: {name} must be an nn.ReLU; got {type(getattr(source, name)).__name__}")
    for name in ("norm1", "norm2"):
        bn = getattr(source, name)
        if type(bn) is not nn.BatchNorm2d:
            fail(f"{where}: {name} must be an nn.BatchNorm2d; got {type(bn).__module__}.{type(bn).__name__}")
    for name in ("conv1", "conv2"):
        conv, like = getattr(source, name), getattr(target, name)
        if type(conv) is not nn.Conv2d:
            fail(f"{where}: {name} must be an nn.Conv2d; got {type(conv).__module__}.{type(conv).__name__}")
        geometry = lambda c: (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                              c.bias is not None, c.padding_mode)  # fmt: skip
        if geometry(conv) != geometry(like):
            fail(f"{where}: {name} must be {like} (torchvision's geometry, no bias); got {conv}")
    drop = getattr(source, "drop_rate", 0.0)
    if float(drop) != target.drop_rate:
        fail(f"{where}: drop_rate must be the block's {target.drop_rate}; got {drop}")


class Transition(nn.Sequential):
    """A drop-in for torchvision's ``_Transition``: BN -> ReLU -> 1x1 conv -> 2x2 average pool,
    with its children (``norm``, ``relu``, ``conv``, ``pool``) and keys.

    Eval: BatchNorm, ReLU and the pool in one pass (fastconv::bn_act_avg_pool: the pool commutes
    with the 1x1 conv, not with the ReLU), then the conv on a quarter of the pixels; with
    gradients wanted, the BatchNorm and ReLU as the full-resolution conv's prologue, then the
    pool. Training: the BatchNorm with batch statistics, ReLU and pool in one differentiable pass
    (fastconv::batch_norm_act_avg_pool), then the conv on a quarter of the pixels.
    """

    __prepare_scriptable__ = _fx.refuse_torchscript

    def __init__(self, num_input_features: int, num_output_features: int, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm = nn.BatchNorm2d(num_input_features, **factory)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, bias=False, **factory)
        self.pool = nn.AvgPool2d(2, 2)
        self._fold_cache = DerivedTensorCache()

    @classmethod
    def from_torchvision(cls, transition: nn.Module) -> "Transition":
        """The Transition of a torchvision ``_Transition``, sharing its parameters and buffers."""
        children = dict(transition.named_children())
        expected = {"norm": nn.BatchNorm2d, "relu": nn.ReLU, "conv": nn.Conv2d, "pool": nn.AvgPool2d}
        if set(children) != set(expected) or any(type(children[n]) is not t for n, t in expected.items()):
            got = {n: type(m).__name__ for n, m in children.items()}
            fail(f"Transition.from_torchvision: transition must be norm/relu/conv/pool as torchvision's; got {got}")
        return cls._from_parts(children["norm"], children["conv"], children["pool"], transition.training,
                               "Transition.from_torchvision")  # fmt: skip

    @classmethod
    def from_timm(cls, transition: nn.Module) -> "Transition":
        """The Transition of a timm ``densenet.DenseTransition`` (norm, conv, pool; its norm a
        BatchNormAct2d with a ReLU), sharing its parameters and buffers. An anti-aliased pool
        (BlurPool2d) is refused."""
        from fastconv.nn.timm_blocks import shared_batch_norm, timm_class, transition_refusal

        if timm_class(transition) != ("timm.models.densenet", "DenseTransition"):
            fail(f"Transition.from_timm: transition must be timm's densenet.DenseTransition; got {type(transition).__name__}")
        reason = transition_refusal(transition)
        if reason:
            fail(f"Transition.from_timm: transition cannot be fused: {reason}")
        norm = shared_batch_norm(transition.norm, "norm")[0]
        return cls._from_parts(norm, transition.conv, transition.pool, transition.training, "Transition.from_timm")

    @classmethod
    def _from_parts(cls, norm: nn.BatchNorm2d, conv: nn.Conv2d, pool: nn.AvgPool2d, training: bool, where: str):
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1 or conv.bias is not None:
            fail(f"{where}: conv must be a 1x1, stride-1 conv without bias; got {conv}")
        if (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) not in ((2, 2, 0, False), ((2, 2), (2, 2), 0, False)):
            fail(f"{where}: pool must be AvgPool2d(2, 2); got {pool}")
        fused = cls(conv.in_channels, conv.out_channels, device="meta")
        fused.norm, fused.conv = norm, conv
        return train_like(fused, training, norm, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx.symbolically_traced():
            return _fx.opaque_call(self, x)
        _check_input(x, self.norm.num_features, "Transition")
        ops = torch.ops.fastconv
        bn = self.norm
        if not uses_batch_stats(bn):
            scale, shift = self._fold_cache.get((bn.weight, bn.bias, bn.running_mean, bn.running_var), (bn.eps,),
                                                lambda: _folded_bn(bn))  # fmt: skip
            x, weight = autocast_inputs(x, self.conv.weight)
            wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, scale, shift))
            if not wants_grad and x.shape[2] >= 2 and x.shape[3] >= 2:
                # BN -> ReLU -> pool in one pass, then the conv on a quarter of the pixels
                # (fastconv/ops/bn_act_pool.py counts the bytes and FLOPs it saves).
                return ops.pointwise_conv2d(ops.bn_act_avg_pool(x, scale, shift, "relu"), weight)
            y = ops.pointwise_conv2d(x, weight, in_scale=scale, in_shift=shift, in_activation="relu")
            return F.avg_pool2d(y, 2, 2)
        x, weight = autocast_inputs(x, self.conv.weight)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        if bn.training and count == 1:
            fail(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        # Detached: the BatchNorm ops' backward differentiates through the statistics itself.
        mean, var = ops.batch_norm_stats(x.detach())
        invstd = torch.rsqrt(var + bn.eps)
        if bn.training and bn.track_running_stats:
            update_running_stats(bn, mean, var, count)
        if x.shape[2] >= 2 and x.shape[3] >= 2:
            # BN -> ReLU -> pool in one pass: the full-resolution activation is never written.
            return ops.pointwise_conv2d(ops.batch_norm_act_avg_pool(x, mean, invstd, bn.weight, bn.bias, "relu"), weight)
        a = ops.batch_norm_act(x, mean, invstd, bn.weight, bn.bias, "relu")
        return ops.pointwise_conv2d(F.avg_pool2d(a, 2, 2), weight)  # too small to pool: torch's error
