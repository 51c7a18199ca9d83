"""The extension's depthwise ops (fastconv_cuda::depthwise_*) on the Meta device: output
layouts and the geometry checks.
"""

from __future__ import annotations

import pytest
import torch

from harness import require_extension

require_extension()

ops = torch.ops.fastconv_cuda


def depthwise_meta(memory_format=torch.channels_last, out_channels=16):
    x = torch.empty(2, 8, 9, 9, dtype=torch.float16, device="meta").contiguous(memory_format=memory_format)
    return x, torch.empty(out_channels, 1, 3, 3, dtype=torch.float16, device="meta")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_depthwise_outputs_follow_the_input_layout(memory_format):
    x, weight = depthwise_meta(memory_format)
    y = ops.depthwise_forward(x, weight, None, [2, 2], [1, 1, 1, 1], [1, 1], None, None, 2)
    assert y.shape == (2, 16, 5, 5) and y.is_contiguous(memory_format=memory_format)
    grad_x = ops.depthwise_backward_input(torch.empty_like(y), x, weight, [2, 2], [1, 1, 1, 1], [1, 1])
    assert grad_x.shape == x.shape and grad_x.is_contiguous(memory_format=memory_format)
    grad_weight, grad_bias = ops.depthwise_backward_weight(torch.empty_like(y), x, weight, [2, 2], [1, 1, 1, 1], [1, 1])
    assert grad_weight.shape == weight.shape and grad_bias.shape == (16,) and grad_bias.dtype == torch.float16


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda x, w: ops.depthwise_forward(x, w, None, [0, 1], [0] * 4, [1, 1], None, None, 0), r"argument 'stride' must be .*, but got \[0, 1\]"),
        (lambda x, w: ops.depthwise_forward(x, w[:12], None, [1, 1], [0] * 4, [1, 1], None, None, 0), r"argument 'weight' must be .*C = x.size\(1\) = 8.*, but got shape \[12, 1, 3, 3\]"),
        (lambda x, w: ops.depthwise_forward(x, w, None, [1, 1], [0, 0, -1, 0], [1, 1], None, None, 0), r"argument 'padding' must be .*, but got \[0, 0, -1, 0\]"),
        (lambda x, w: ops.depthwise_forward(x, w, None, [1, 1], [0] * 4, [5, 5], None, None, 0), r"argument 'weight' must be a \(dilated\) kernel that fits .* \(output -1x-1\)"),
        (lambda x, w: ops.depthwise_forward(x, w.float(), None, [1, 1], [0] * 4, [1, 1], None, None, 0), r"argument 'weight'.*Half.*Float"),
    ],
    ids=["stride", "weight-channels", "padding", "output-size", "weight-dtype"],
)
def test_depthwise_checks_name_the_argument(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call(*depthwise_meta())
