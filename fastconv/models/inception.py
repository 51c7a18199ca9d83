"""GoogLeNet and Inception-V3 (torchvision's layouts and keys) from fastconv's BasicConv2d and
InceptionBlock."""

from __future__ import annotations

from collections import namedtuple
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from fastconv.nn.inception import BasicConv2d, InceptionBlock

GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])
InceptionOutputs = namedtuple("InceptionOutputs", ["logits", "aux_logits"])


def _transform_input(x: torch.Tensor) -> torch.Tensor:
    """torchvision's transform_input: ImageNet-normalised input re-normalised to [-1, 1]."""
    return torch.cat((
        x[:, 0:1] * (0.229 / 0.5) + (0.485 - 0.5) / 0.5,
        x[:, 1:2] * (0.224 / 0.5) + (0.456 - 0.5) / 0.5,
        x[:, 2:3] * (0.225 / 0.5) + (0.406 - 0.5) / 0.5,
    ), 1)  # fmt: skip


def _googlenet_block(c_in: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
                     pool_proj: int) -> InceptionBlock:  # fmt: skip
    return InceptionBlock("Inception", dict(
        branch1=BasicConv2d(c_in, ch1x1, 1),
        branch2=nn.Sequential(BasicConv2d(c_in, ch3x3red, 1), BasicConv2d(ch3x3red, ch3x3, 3, padding=1)),
        # torchvision's 3x3 where the paper has 5x5 (pytorch/vision#906), kept for its weights.
        branch3=nn.Sequential(BasicConv2d(c_in, ch5x5red, 1), BasicConv2d(ch5x5red, ch5x5, 3, padding=1)),
        branch4=nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), BasicConv2d(c_in, pool_proj, 1)),
    ))  # fmt: skip


class GoogLeNetAux(nn.Module):
    """torchvision GoogLeNet's InceptionAux (keys ``conv.*``, ``fc1.*``, ``fc2.*``)."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.7) -> None:
        super().__init__()
        self.conv = BasicConv2d(in_channels, 128, 1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x):
        x = torch.flatten(self.conv(F.adaptive_avg_pool2d(x, (4, 4))), 1)
        return self.fc2(self.dropout(F.relu(self.fc1(x), inplace=True)))


class GoogLeNet(nn.Module):
    """torchvision's GoogLeNet: the same attributes, state_dict keys and forward (in training
    with aux_logits, the (logits, aux2, aux1) namedtuple; else the logits). Every BasicConv2d
    is fastconv's, every Inception block an InceptionBlock. Initialised as torchvision's
    init_weights=True (truncated normal, std 0.01, for convs and Linears)."""

    def __init__(self, num_classes: int = 1000, aux_logits: bool = False, transform_input: bool = False,
                 dropout: float = 0.2, dropout_aux: float = 0.7) -> None:  # fmt: skip
        super().__init__()
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.conv1 = BasicConv2d(3, 64, 7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, 1)
        self.conv3 = BasicConv2d(64, 192, 3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = _googlenet_block(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = _googlenet_block(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = _googlenet_block(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = _googlenet_block(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = _googlenet_block(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = _googlenet_block(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = _googlenet_block(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = _googlenet_block(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = _googlenet_block(832, 384, 192, 384, 48, 128, 128)
        self.aux1: Optional[nn.Module] = GoogLeNetAux(512, num_classes, dropout_aux) if aux_logits else None
        self.aux2: Optional[nn.Module] = GoogLeNetAux(528, num_classes, dropout_aux) if aux_logits else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        if self.transform_input:
            x = _transform_input(x)
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if self.training and self.aux_logits:
            return GoogLeNetOutputs(x, aux2, aux1)
        return x


def _conv(c_in: int, c_out: int, kernel_size, stride=1, padding=0) -> BasicConv2d:
    return BasicConv2d(c_in, c_out, kernel_size, stride, padding)


def _inception_a(c: int, pool_features: int) -> InceptionBlock:
    return InceptionBlock("InceptionA", dict(
        branch1x1=_conv(c, 64, 1), branch5x5_1=_conv(c, 48, 1), branch5x5_2=_conv(48, 64, 5, padding=2),
        branch3x3dbl_1=_conv(c, 64, 1), branch3x3dbl_2=_conv(64, 96, 3, padding=1),
        branch3x3dbl_3=_conv(96, 96, 3, padding=1), branch_pool=_conv(c, pool_features, 1),
    ))  # fmt: skip


def _inception_b(c: int) -> InceptionBlock:
    return InceptionBlock("InceptionB", dict(
        branch3x3=_conv(c, 384, 3, stride=2), branch3x3dbl_1=_conv(c, 64, 1),
        branch3x3dbl_2=_conv(64, 96, 3, padding=1), branch3x3dbl_3=_conv(96, 96, 3, stride=2),
    ))  # fmt: skip


def _inception_c(c: int, c7: int) -> InceptionBlock:
    return InceptionBlock("InceptionC", dict(
        branch1x1=_conv(c, 192, 1),
        branch7x7_1=_conv(c, c7, 1), branch7x7_2=_conv(c7, c7, (1, 7), padding=(0, 3)),
        branch7x7_3=_conv(c7, 192, (7, 1), padding=(3, 0)),
        branch7x7dbl_1=_conv(c, c7, 1), branch7x7dbl_2=_conv(c7, c7, (7, 1), padding=(3, 0)),
        branch7x7dbl_3=_conv(c7, c7, (1, 7), padding=(0, 3)), branch7x7dbl_4=_conv(c7, c7, (7, 1), padding=(3, 0)),
        branch7x7dbl_5=_conv(c7, 192, (1, 7), padding=(0, 3)),
        branch_pool=_conv(c, 192, 1),
    ))  # fmt: skip


def _inception_d(c: int) -> InceptionBlock:
    return InceptionBlock("InceptionD", dict(
        branch3x3_1=_conv(c, 192, 1), branch3x3_2=_conv(192, 320, 3, stride=2),
        branch7x7x3_1=_conv(c, 192, 1), branch7x7x3_2=_conv(192, 192, (1, 7), padding=(0, 3)),
        branch7x7x3_3=_conv(192, 192, (7, 1), padding=(3, 0)), branch7x7x3_4=_conv(192, 192, 3, stride=2),
    ))  # fmt: skip


def _inception_e(c: int) -> InceptionBlock:
    return InceptionBlock("InceptionE", dict(
        branch1x1=_conv(c, 320, 1),
        branch3x3_1=_conv(c, 384, 1), branch3x3_2a=_conv(384, 384, (1, 3), padding=(0, 1)),
        branch3x3_2b=_conv(384, 384, (3, 1), padding=(1, 0)),
        branch3x3dbl_1=_conv(c, 448, 1), branch3x3dbl_2=_conv(448, 384, 3, padding=1),
        branch3x3dbl_3a=_conv(384, 384, (1, 3), padding=(0, 1)),
        branch3x3dbl_3b=_conv(384, 384, (3, 1), padding=(1, 0)),
        branch_pool=_conv(c, 192, 1),
    ))  # fmt: skip


class InceptionV3Aux(nn.Module):
    """torchvision Inception-V3's InceptionAux (keys ``conv0.*``, ``conv1.*``, ``fc.*``)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv0 = _conv(in_channels, 128, 1)
        self.conv1 = _conv(128, 768, 5)
        self.conv1.stddev = 0.01  # torchvision's init reads these
        self.fc = nn.Linear(768, num_classes)
        self.fc.stddev = 0.001

    def forward(self, x):
        x = self.conv1(self.conv0(F.avg_pool2d(x, kernel_size=5, stride=3)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))


class Inception3(nn.Module):
    """torchvision's Inception3: the same attributes, state_dict keys and forward (in training
    with aux_logits, the (logits, aux_logits) namedtuple; else the logits). Initialised as
    torchvision's init_weights=True (truncated normal, std 0.1, or the module's stddev)."""

    def __init__(self, num_classes: int = 1000, aux_logits: bool = False, transform_input: bool = False,
                 dropout: float = 0.5) -> None:  # fmt: skip
        super().__init__()
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.Conv2d_1a_3x3 = _conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _conv(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = _conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _conv(80, 192, 3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = _inception_a(192, 32)
        self.Mixed_5c = _inception_a(256, 64)
        self.Mixed_5d = _inception_a(288, 64)
        self.Mixed_6a = _inception_b(288)
        self.Mixed_6b = _inception_c(768, 128)
        self.Mixed_6c = _inception_c(768, 160)
        self.Mixed_6d = _inception_c(768, 160)
        self.Mixed_6e = _inception_c(768, 192)
        self.AuxLogits: Optional[nn.Module] = InceptionV3Aux(768, num_classes) if aux_logits else None
        self.Mixed_7a = _inception_d(768)
        self.Mixed_7b = _inception_e(1280)
        self.Mixed_7c = _inception_e(2048)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(2048, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                std = float(m.stddev) if hasattr(m, "stddev") else 0.1
                nn.init.trunc_normal_(m.weight, mean=0.0, std=std, a=-2, b=2)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        if self.transform_input:
            x = _transform_input(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(self.maxpool1(x))))
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        aux = self.AuxLogits(x) if self.AuxLogits is not None and self.training else None
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        x = self.fc(torch.flatten(self.dropout(self.avgpool(x)), 1))
        if self.training and self.aux_logits:
            return InceptionOutputs(x, aux)
        return x


def googlenet(*, aux_logits: bool = False, num_classes: int = 1000, transform_input: bool = False,
              dropout: float = 0.2, dropout_aux: float = 0.7) -> GoogLeNet:  # fmt: skip
    """torchvision's googlenet (``weights=None``: transform_input False), from fastconv modules;
    loads ``torchvision.models.googlenet(weights=None, aux_logits=aux_logits).state_dict()``
    with strict=True."""
    return GoogLeNet(num_classes, aux_logits, transform_input, dropout, dropout_aux)


def inception_v3(*, aux_logits: bool = False, num_classes: int = 1000, transform_input: bool = False,
                 dropout: float = 0.5) -> Inception3:  # fmt: skip
    """torchvision's inception_v3 (``weights=None``: transform_input False), from fastconv
    modules; loads ``torchvision.models.inception_v3(weights=None, aux_logits=aux_logits)``'s
    state_dict with strict=True. Input at least 75x75 (299x299 is the model's own)."""
    return Inception3(num_classes, aux_logits, transform_input, dropout)
