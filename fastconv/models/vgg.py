"""VGG-16, with and without BatchNorm (torchvision's layout and keys), from fastconv's FusedSequential."""

from __future__ import annotations

from torch import nn

from fastconv.models._init import torchvision_init
from fastconv.nn.sequential import FusedSequential

# torchvision's configuration "D": channels, "M" for a 2x2 max pool.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    """torchvision's VGG: ``features`` is a FusedSequential (Conv2d, BatchNorm2d, ReLU, ...,
    MaxPool2d: the same children and keys, ``features.0.weight``, ``features.1.*``, ...), each
    conv run with its BatchNorm and ReLU fused; without BatchNorm (Conv2d, ReLU, ...), each conv
    with its bias and ReLU in the epilogue. ``avgpool`` and ``classifier`` as torchvision's."""

    def __init__(self, cfg: list, num_classes: int = 1000, dropout: float = 0.5, batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for value in cfg:
            if value == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                norm = [nn.BatchNorm2d(value)] if batch_norm else []
                layers += [nn.Conv2d(channels, value, 3, padding=1), *norm, nn.ReLU(inplace=True)]
                channels = value
        self.features = FusedSequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )  # fmt: skip
        torchvision_init(self)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def vgg16_bn(*, num_classes: int = 1000, dropout: float = 0.5) -> VGG:
    """torchvision's vgg16_bn, from fastconv modules; loads its state_dict with strict=True."""
    return VGG(_VGG16, num_classes, dropout)


def vgg16(*, num_classes: int = 1000, dropout: float = 0.5) -> VGG:
    """torchvision's vgg16 (no BatchNorm), from fastconv modules; loads its state_dict with strict=True."""
    return VGG(_VGG16, num_classes, dropout, batch_norm=False)
