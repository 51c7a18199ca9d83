"""Train/eval modes across a conversion: the fused module takes its source's mode, and every
module it shares with the source keeps its own.

`nn.Module.train(mode)` is recursive. Calling it on a fused block built around a torchvision
block's children would reset each child's own mode: a BatchNorm frozen with `.eval()` inside a
training model (the usual fine-tuning of detection backbones) would silently start using batch
statistics and updating its running ones.
"""

from __future__ import annotations

from torch import nn


def train_like(fused: nn.Module, mode: bool, *sources: nn.Module) -> nn.Module:
    """fused.train(mode), then every module of `sources` (and their submodules) that fused now
    holds gets back the mode it had. Returns fused."""
    own = {id(m): m.training for source in sources if isinstance(source, nn.Module) for m in source.modules()}
    fused.train(mode)
    for module in fused.modules():
        if id(module) in own:
            module.training = own[id(module)]
    return fused
