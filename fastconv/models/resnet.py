"""ResNet-50 (torchvision's layout and keys) from fastconv's fused modules."""

from __future__ import annotations

from torch import nn

from fastconv.models._init import torchvision_init
from fastconv.nn import BatchNormAct2d, ConvBNAct2d, ResNetBlock


class ResNet(nn.Module):
    """torchvision's ResNet with Bottleneck blocks: the same attributes and state_dict keys.

    The stem's BatchNorm and ReLU are one BatchNormAct2d (``bn1``, BatchNorm2d's keys; ``relu``
    is an Identity with none), each block is a ResNetBlock and each downsample a ConvBNAct2d
    (``downsample.0.weight``, ``downsample.1.*``). Like fastconv.optimize's ResNet, the stem
    conv is not fused with its BatchNorm: one module for both would change the keys.
    """

    def __init__(self, layers: list[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = BatchNormAct2d(64, "relu")
        self.relu = nn.Identity()  # bn1 applies the ReLU
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
