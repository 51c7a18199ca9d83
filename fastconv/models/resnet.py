"""ResNet-50 (torchvision's layout and keys) from fastconv's fused modules."""

from __future__ import annotations

from torch import nn

from fastconv.models._init import torchvision_init
from fastconv.nn import ConvBNAct2d, ResNetBlock
from fastconv.nn.attribute_fusion import FoldedBatchNorm2d, FusedConv2d


class ResNet(nn.Module):
    """torchvision's ResNet with Bottleneck blocks: the same attributes and state_dict keys.

    The stem runs as one fused conv + BatchNorm + ReLU: ``conv1`` is a FusedConv2d (the conv's
    keys) that also runs ``bn1``, a FoldedBatchNorm2d (BatchNorm2d's keys, passing its input
    through), and ``relu`` is an Identity, as fastconv.optimize makes torchvision's. Each block is
    a ResNetBlock and each downsample a ConvBNAct2d (``downsample.0.weight``, ``downsample.1.*``).
    """

    def __init__(self, layers: list[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        bn1 = FoldedBatchNorm2d(64)
        self.conv1 = FusedConv2d.from_modules(nn.Conv2d(3, 64, 7, 2, 3, bias=False), bn1, "relu")
        self.bn1 = bn1  # after conv1: torchvision's key order
        self.relu = nn.Identity()  # conv1 applies bn1 and the ReLU
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * 4, num_classes)
        torchvision_init(self, linear_std=None)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = ConvBNAct2d(self.inplanes, planes * 4, 1, stride, activation=None)
        layers = [ResNetBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [ResNetBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet50(*, num_classes: int = 1000) -> ResNet:
    """torchvision's resnet50 (v1.5: the stride on the 3x3 conv), from fastconv modules."""
    return ResNet([3, 4, 6, 3], num_classes)
