"""fastconv.nn.DepthwiseConv2d against the nn.Conv2d it replaces, and convert_depthwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness import DEVICE, random_tensor


def test_depthwise_conv2d_is_a_conv2d_with_the_same_state_dict():
    from fastconv.nn import DepthwiseConv2d

    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8).to(DEVICE)
    depthwise = DepthwiseConv2d(8, 16, 3, stride=2, padding=1).to(DEVICE)
    assert list(depthwise.state_dict()) == list(conv.state_dict())
    depthwise.load_state_dict(conv.state_dict())
    x = random_tensor((2, 8, 9, 9), torch.float32, "channels_last")
    torch.testing.assert_close(depthwise(x), conv(x))
    with pytest.raises(ValueError, match=r"groups must equal in_channels \(8\) for a depthwise conv; got 2"):
        DepthwiseConv2d(8, 16, 3, groups=2)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_depthwise_conv2d_padding_modes(padding_mode):
    from fastconv.nn import DepthwiseConv2d

    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode=padding_mode).to(DEVICE)
    x = random_tensor((1, 4, 6, 7), torch.float32, "nchw")
    torch.testing.assert_close(DepthwiseConv2d.from_conv(conv)(x), conv(x))


def test_convert_depthwise_on_torchvision_mobilenet_v2():
    torchvision = pytest.importorskip("torchvision")
    from fastconv.nn import DepthwiseConv2d, convert_depthwise

    original = torchvision.models.mobilenet_v2(num_classes=10).to(DEVICE).eval()
    converted = torchvision.models.mobilenet_v2(num_classes=10).to(DEVICE).eval()
    converted.load_state_dict(original.state_dict())
    convert_depthwise(converted)
    assert sum(isinstance(m, DepthwiseConv2d) for m in converted.modules()) == 17
    assert list(converted.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x))
