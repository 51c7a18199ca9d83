"""BatchNormAct2d: nn.BatchNorm2d followed by an activation, one fused pass in inference."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastconv.activations import activation_code, apply_activation
from fastconv.nn import _fx
from fastconv.nn._fold_cache import DerivedTensorCache
from fastconv.ops.bn_act import bn_act

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Identity: None}


class BatchNormAct2d(nn.BatchNorm2d):
    """A drop-in for ``nn.Sequential(nn.BatchNorm2d(C), activation)``.

    It *is* a BatchNorm2d: the same parameters, buffers and state_dict keys, so pretrained
    BatchNorm weights load unchanged and tools that look for BatchNorm layers still find it.
    In training mode (or without running statistics) it runs BatchNorm2d's own forward, with
    its exact batch-statistics semantics, then the activation. In eval mode it folds the
    running statistics into a per-channel scale and shift and runs `fastconv.bn_act`: one
    read and one write of the activation instead of two of each.

    Under DDP use `fastconv.nn.convert_sync_batchnorm`, not torch's: torch's converter turns
    it into a plain SyncBatchNorm and silently drops the activation.
    """

    __prepare_scriptable__ = _fx.refuse_torchscript

    def __init__(
        self,
        num_features: int,
        activation: Optional[str] = "relu",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        activation_code(activation)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.activation = activation
        self._fold_cache = DerivedTensorCache()

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, act: Optional[nn.Module] = None) -> "BatchNormAct2d":
        """Wrap an existing BatchNorm2d (and ReLU/ReLU6/SiLU/Hardswish/Identity), sharing its state."""
        # Exactly a BatchNorm2d: a subclass carries semantics this module would silently drop
        # (timm's BatchNormAct2d has its own activation and drop path; fastconv's its activation).
        if type(bn) is not nn.BatchNorm2d:
            raise ValueError(f"fastconv: bn must be an nn.BatchNorm2d, not a subclass whose extra semantics would be "
                             f"dropped; got {type(bn).__module__}.{type(bn).__name__}")  # fmt: skip
        if act is not None and type(act) not in _ACTIVATION_MODULES:
            names = ", ".join(m.__name__ for m in _ACTIVATION_MODULES)
            raise ValueError(f"fastconv: act must be one of {names} or None; got {type(act).__name__}")
        fused = cls(bn.num_features, _ACTIVATION_MODULES[type(act)] if act is not None else None, bn.eps, bn.momentum,
                    bn.affine, bn.track_running_stats, device=torch.device("meta"))
        # Share, not copy: the fused module and the original see the same tensors.
        fused.weight, fused.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(fused, name, getattr(bn, name))
        fused.train(bn.training)
        return fused

    @classmethod
    def from_timm(cls, bn: nn.BatchNorm2d) -> "BatchNormAct2d":
        """Wrap timm's BatchNormAct2d (a BatchNorm2d with its own activation and drop), sharing its
        state: the activation is honoured; a drop layer other than Identity is refused."""
        from fastconv.nn.attribute_fusion import batch_norm_activation

        usable, activation, why = batch_norm_activation(bn)
        if not usable or type(bn).__name__ != "BatchNormAct2d":
            raise ValueError(f"fastconv: bn must be timm's BatchNormAct2d with a supported activation and no drop; "
                             f"got {type(bn).__name__}: {why or 'not timm BatchNormAct2d'}")  # fmt: skip
        plain = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        plain.weight, plain.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(plain, name, getattr(bn, name))
        plain.train(bn.training)
        act = type(bn.act)() if activation is not None else None
        return cls.from_modules(plain, act)

    def folded_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) with bn(x) == x * scale + shift under the running statistics.

        Cached until a source tensor changes (DerivedTensorCache); recomputed differentiably
        when gradients are wanted, so that eval-mode fine-tuning of weight and bias works.
        """
        sources = (self.weight, self.bias, self.running_mean, self.running_var)
        return self._fold_cache.get(sources, (self.eps,), self._fold)

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.rsqrt(self.running_var + self.eps)
        shift = -self.running_mean * scale
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx.symbolically_traced():
            return _fx.opaque_call(self, x)
        if self.training or not self.track_running_stats:
            return apply_activation(super().forward(x), self.activation)
        self._check_input_dim(x)
        scale, shift = self.folded_scale_shift()
        return bn_act(x, scale, shift, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class SyncBatchNormAct2d(nn.SyncBatchNorm):
    """nn.SyncBatchNorm followed by an activation: a BatchNormAct2d under DDP with synchronised
    statistics. The same state_dict keys as BatchNormAct2d. Made by `convert_sync_batchnorm`."""

    __prepare_scriptable__ = _fx.refuse_torchscript

    def __init__(self, num_features: int, activation: Optional[str] = "relu", *args, **kwargs) -> None:
        activation_code(activation)
        super().__init__(num_features, *args, **kwargs)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_activation(super().forward(x), self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """torch.nn.SyncBatchNorm.convert_sync_batchnorm that keeps BatchNormAct2d's activation.

    Torch's converter turns every BatchNorm, BatchNormAct2d included, into a plain SyncBatchNorm,
    which would silently drop the activation; this one makes a SyncBatchNormAct2d of each
    BatchNormAct2d (sharing its parameters and buffers) and leaves the rest to torch's. Returns
    the converted module (a new object when `module` itself is a BatchNorm), as torch's does.
    """
    if isinstance(module, BatchNormAct2d):
        synced = SyncBatchNormAct2d(
            module.num_features, module.activation, module.eps, module.momentum, module.affine,
            module.track_running_stats, process_group,
        )  # fmt: skip
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(synced, name, getattr(module, name))
        synced.train(module.training)
        return synced
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
