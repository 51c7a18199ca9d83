"""AlexNet (torchvision's layout and keys) from fastconv's FusedSequential."""

from __future__ import annotations

import torch
from torch import nn

from fastconv.nn.sequential import FusedSequential


class AlexNet(nn.Module):
    """torchvision's AlexNet (the one-GPU variant of Krizhevsky et al.'s "one weird trick"
    paper): ``features`` is a FusedSequential with torchvision's children and keys
    (``features.0.weight``, ``features.0.bias``, ``features.3.weight``, ...), each Conv2d run
    with its bias and the ReLU after it in the conv's epilogue: the 11x11 stride-4 stem and the
    5x5 conv on the implicit GEMM. ``avgpool`` and ``classifier`` as torchvision's.

    Initialisation is nn.Conv2d's and nn.Linear's own, as torchvision's AlexNet has none.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = FusedSequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(p=dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def alexnet(*, num_classes: int = 1000, dropout: float = 0.5) -> AlexNet:
    """torchvision's alexnet, from fastconv modules; loads its state_dict with strict=True."""
    return AlexNet(num_classes, dropout)
