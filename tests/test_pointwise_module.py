"""fastconv.nn.PointwiseConv2d against the nn.Conv2d it replaces, and convert_pointwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness import DEVICE, random_tensor


def test_pointwise_conv2d_is_a_conv2d_with_the_same_state_dict():
    from fastconv.nn import PointwiseConv2d

    conv = nn.Conv2d(8, 12, 1).to(DEVICE)
    pointwise = PointwiseConv2d.from_conv(conv)
    assert list(pointwise.state_dict()) == list(conv.state_dict()) and pointwise.weight is conv.weight
    x = random_tensor((2, 8, 5, 5), torch.float32, "channels_last")
    torch.testing.assert_close(pointwise(x), conv(x))
    with pytest.raises(ValueError, match=r"kernel_size must be 1 for a pointwise conv; got 3"):
        PointwiseConv2d(8, 12, 3)
    with pytest.raises(ValueError, match=r"conv must be a 1x1, stride-1, unpadded, ungrouped nn.Conv2d"):
        PointwiseConv2d.from_conv(nn.Conv2d(8, 12, 1, stride=2))


def test_convert_pointwise_and_depthwise_on_torchvision_mobilenet_v2():
    torchvision = pytest.importorskip("torchvision")
    from fastconv.nn import PointwiseConv2d, convert_depthwise, convert_pointwise

    original = torchvision.models.mobilenet_v2(num_classes=10).to(DEVICE).eval()
    converted = torchvision.models.mobilenet_v2(num_classes=10).to(DEVICE).eval()
    converted.load_state_dict(original.state_dict())
    convert_pointwise(convert_depthwise(converted))
    assert sum(isinstance(m, PointwiseConv2d) for m in converted.modules()) == 34  # MobileNetV2's 1x1 convs (benchmarks/FLOORS.md)
    assert list(converted.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), atol=1e-4, rtol=1e-4)
