"""DenseNet-BC 121/161/169/201 (torchvision's layout and keys) from fastconv's modules."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from fastconv.nn import BatchNormAct2d, DenseBlock, Transition
from fastconv.nn.sequential import FusedSequential


class DenseNet(nn.Module):
    """torchvision's DenseNet: the same attributes and state_dict keys (``features.conv0``,
    ``features.denseblock1.denselayer1.norm1``, ``features.transition1.conv``, ``features.norm5``,
    ``classifier``), so ``load_state_dict(torchvision_densenet.state_dict(), strict=True)`` works.

    ``features`` is a FusedSequential, whose stem conv0 -> norm0 -> relu0 runs as one fused
    conv + BatchNorm + ReLU; each dense block is a DenseBlock (one buffer, linear memory), each
    transition a Transition, and norm5 a BatchNormAct2d that applies the final ReLU.
    """

    def __init__(self, growth_rate: int = 32, block_config: tuple = (6, 12, 24, 16), num_init_features: int = 64,
                 bn_size: int = 4, drop_rate: float = 0.0, num_classes: int = 1000) -> None:  # fmt: skip
        super().__init__()
        layers = OrderedDict(
            conv0=nn.Conv2d(3, num_init_features, 7, 2, 3, bias=False),
            norm0=nn.BatchNorm2d(num_init_features),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(3, 2, 1),
        )
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            layers[f"denseblock{i + 1}"] = DenseBlock(num_layers, channels, bn_size, growth_rate, drop_rate)
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                layers[f"transition{i + 1}"] = Transition(channels, channels // 2)
                channels //= 2
        layers["norm5"] = BatchNormAct2d(channels, "relu")  # DenseNet.forward's F.relu, fused
        self.features = FusedSequential.from_sequential(nn.Sequential(layers))
        self.classifier = nn.Linear(channels, num_classes)
        _torchvision_densenet_init(self)

    def forward(self, x):
        features = self.features(x)
        return self.classifier(nn.functional.adaptive_avg_pool2d(features, 1).flatten(1))


def _torchvision_densenet_init(model: nn.Module) -> None:
    """torchvision DenseNet's: Kaiming-normal (fan_in) convs, unit/zero BatchNorms, zero Linear bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.constant_(m.bias, 0)


def densenet121(*, drop_rate: float = 0.0, num_classes: int = 1000) -> DenseNet:
    """torchvision's densenet121: growth 32, blocks (6, 12, 24, 16), 64 initial features."""
    return DenseNet(32, (6, 12, 24, 16), 64, 4, drop_rate, num_classes)


def densenet161(*, drop_rate: float = 0.0, num_classes: int = 1000) -> DenseNet:
    """torchvision's densenet161: growth 48, blocks (6, 12, 36, 24), 96 initial features."""
    return DenseNet(48, (6, 12, 36, 24), 96, 4, drop_rate, num_classes)


def densenet169(*, drop_rate: float = 0.0, num_classes: int = 1000) -> DenseNet:
    """torchvision's densenet169: growth 32, blocks (6, 12, 32, 32), 64 initial features."""
    return DenseNet(32, (6, 12, 32, 32), 64, 4, drop_rate, num_classes)


def densenet201(*, drop_rate: float = 0.0, num_classes: int = 1000) -> DenseNet:
    """torchvision's densenet201: growth 32, blocks (6, 12, 48, 32), 64 initial features."""
    return DenseNet(32, (6, 12, 48, 32), 64, 4, drop_rate, num_classes)
