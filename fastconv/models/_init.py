"""torchvision's weight initialisation, shared by the model definitions."""

from __future__ import annotations

from torch import nn


def torchvision_init(model: nn.Module, conv_nonlinearity: str = "relu", linear_std: float = 0.01) -> None:
    """Kaiming-normal (fan_out) convs, unit/zero BatchNorms, and normal(0, linear_std) Linear
    weights (linear_std None: nn.Linear's own), as torchvision's MobileNets and ResNets do."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=conv_nonlinearity)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
