"""MobileNetV2 (torchvision's layout and keys) and MobileNetV1 (Howard et al. 2017) from
fastconv's fused modules."""

from __future__ import annotations

from torch import nn

from fastconv.models._init import torchvision_init
from fastconv.nn import ConvBNAct2d, DepthwiseSeparableConv2d, InvertedResidual

# (expansion t, channels c, repeats n, first stride s): torchvision's MobileNetV2 table.
_V2_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
# (out channels, stride) of MobileNetV1's 13 depthwise-separable blocks (the paper's Table 1).
_V1_SETTING = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def _make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding (from the TensorFlow MobileNet code)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class _MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, width_mult: float, dropout: float) -> None:
        super().__init__()
        channels = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNAct2d(3, channels, 3, 2, activation="relu6")]
        for t, c, n, s in _V2_SETTING:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, expand_ratio=t))
                channels = out
        features.append(ConvBNAct2d(channels, self.last_channel, 1, activation="relu6"))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        torchvision_init(self)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(x.flatten(1))


def mobilenet_v2(*, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> nn.Module:
    """torchvision's MobileNetV2 (the same modules' layout, forward and state_dict keys:
    ``features.0.0.weight`` ..., ``classifier.1.weight``), built from ConvBNAct2d and
    fastconv's InvertedResidual."""
    return _MobileNetV2(num_classes, width_mult, dropout)


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017): a 3x3 stride-2 conv + BN + ReLU, 13 depthwise-separable
    blocks (depthwise 3x3 + BN + ReLU, 1x1 + BN + ReLU), global average pooling, a Linear.

    torchvision has no MobileNetV1, so the keys are fastconv's own, in torchvision's style:
    ``features.0.0.weight`` (stem conv), ``features.0.1.{weight,bias,running_mean,running_var,
    num_batches_tracked}`` (stem BN), ``features.{1..13}.conv_dw.weight``, ``.bn1.*``,
    ``.conv_pw.weight``, ``.bn2.*`` (timm's DepthwiseSeparableConv names), ``classifier.weight``,
    ``classifier.bias``. Channels are ``_make_divisible(c * width_mult, 8)``, torchvision's
    MobileNet rounding (the paper's width multiplier α).
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.0, *,
                 eager: bool = False) -> None:  # fmt: skip
        super().__init__()
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise ValueError(f"fastconv: width_mult must be a number > 0; got {width_mult!r}")
        channels = _make_divisible(32 * width_mult)
        if eager:
            features: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels),
                                                       nn.ReLU(inplace=True))]  # fmt: skip
        else:
            features = [ConvBNAct2d(3, channels, 3, 2, activation="relu")]
        for c, s in _V1_SETTING:
            out = _make_divisible(c * width_mult)
            block = _EagerSeparable if eager else DepthwiseSeparableConv2d
            features.append(block(channels, out, 3, s, dw_activation="relu", pw_activation="relu"))
            channels = out
        self.features = nn.Sequential(*features)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)
        torchvision_init(self)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1)).flatten(1)
        return self.classifier(self.dropout(x))


class _EagerSeparable(nn.Module):
    """A MobileNetV1 block in plain PyTorch layers (cuDNN's convs), with DepthwiseSeparableConv2d's
    children and keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, *, dw_activation: str,
                 pw_activation: str) -> None:  # fmt: skip
        super().__init__()
        self.conv_dw = nn.Conv2d(in_channels, in_channels, kernel_size, stride, kernel_size // 2, groups=in_channels,
                                 bias=False)  # fmt: skip
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv_pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        assert dw_activation == pw_activation == "relu"  # MobileNetV1's

    def forward(self, x):
        return nn.functional.relu(self.bn2(self.conv_pw(nn.functional.relu(self.bn1(self.conv_dw(x))))))


def mobilenet_v1(width_mult: float = 1.0, *, num_classes: int = 1000, dropout: float = 0.0) -> MobileNetV1:
    """MobileNetV1 at the given width multiplier; see MobileNetV1 for its state_dict keys."""
    return MobileNetV1(num_classes, width_mult, dropout)


def mobilenet_v1_eager(width_mult: float = 1.0, *, num_classes: int = 1000, dropout: float = 0.0) -> MobileNetV1:
    """MobileNetV1 in plain PyTorch layers with mobilenet_v1's keys: the eager (cuDNN) model
    `python -m fastconv bench --model mobilenet_v1` compares against, since torchvision has none."""
    return MobileNetV1(num_classes, width_mult, dropout, eager=True)
