"""The extension's bn_act ops (fastconv_cuda::bn_act_forward / bn_act_backward) on the Meta
device: their checks, schemas and output layouts, which the Meta kernels share with the CUDA
kernels (test_extension_meta.py says how these files run, or fail, without a GPU).
"""

from __future__ import annotations

import pytest
import torch

from harness import require_extension

require_extension()

ops = torch.ops.fastconv_cuda


def meta_inputs(shape=(2, 6, 5, 7), dtype=torch.float16, memory_format=torch.channels_last):
    x = torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=memory_format)
    scale = torch.empty(shape[1], device="meta")
    return x, scale, torch.empty_like(scale)


def test_schemas_are_the_contract_of_fastconv_ops():
    assert str(ops.bn_act_forward.default._schema) == (
        "fastconv_cuda::bn_act_forward(Tensor x, Tensor scale, Tensor shift, int activation) -> Tensor"
    )
    assert str(ops.bn_act_backward.default._schema) == (
        "fastconv_cuda::bn_act_backward(Tensor grad_y, Tensor x, Tensor scale, Tensor shift, int activation)"
        " -> (Tensor, Tensor, Tensor)"
    )


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_outputs_keep_the_input_layout(memory_format):
    x, scale, shift = meta_inputs(memory_format=memory_format)
    y = ops.bn_act_forward(x, scale, shift, 2)
    assert y.shape == x.shape and y.stride() == x.stride() and y.dtype == x.dtype
    grad_x, grad_scale, grad_shift = ops.bn_act_backward(torch.empty_like(x), x, scale, shift, 2)
    assert grad_x.stride() == x.stride() and grad_scale.shape == (6,) and grad_shift.dtype == torch.float32


def test_channel_slice_output_is_dense_channels_last():
    wide = torch.empty(2, 9, 5, 7, dtype=torch.float16, device="meta").contiguous(memory_format=torch.channels_last)
    x = wide[:, 1:7]
    _, scale, shift = meta_inputs()
    y = ops.bn_act_forward(x, scale, shift, 0)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda x, s, b: ops.bn_act_forward(x[0], s, b, 0), r"argument 'x' must be 4-D, but got 3-D"),
        (lambda x, s, b: ops.bn_act_forward(x.double(), s, b, 0), r"argument 'x' must be float32, float16 or bfloat16, but got Double"),
        (lambda x, s, b: ops.bn_act_forward(x, s[:4], b, 0), r"argument 'scale' must be a 1-D tensor of size C = x.size\(1\) = 6, but got shape \[4\]"),
        (lambda x, s, b: ops.bn_act_forward(x, s.double(), b.double(), 0), r"argument 'scale' must be x's dtype \(Half\) or float32, but got Double"),
        (lambda x, s, b: ops.bn_act_forward(x, s, b.half(), 0), r"argument 'shift' must be scale's dtype \(Float\), but got Half"),
        (lambda x, s, b: ops.bn_act_forward(x, s, b, 5), r"argument 'activation' must be an activation code in \[0, 4\].*but got 5"),
        (lambda x, s, b: ops.bn_act_backward(x[:1], x, s, b, 0), r"argument 'grad_y' must be x's shape \[2, 6, 5, 7\], but got \[1, 6, 5, 7\]"),
        (lambda x, s, b: ops.bn_act_backward(x.float(), x, s, b, 0), r"argument 'grad_y' must be x's dtype \(Half\), but got Float"),
    ],
    ids=["rank", "dtype", "scale-size", "scale-dtype", "shift-dtype", "activation", "grad-shape", "grad-dtype"],
)
def test_checks_name_the_argument_the_expectation_and_the_value(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call(*meta_inputs())


def test_cpu_tensors_are_refused_by_the_dispatcher():
    with pytest.raises(NotImplementedError, match="fastconv_cuda::bn_act_forward.*CPU"):
        ops.bn_act_forward(torch.randn(2, 6, 5, 7), torch.randn(6), torch.randn(6), 0)
