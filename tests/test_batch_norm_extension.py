"""The training-mode BatchNorm ops of the extension fastconv._C, on the Meta device.

fastconv_cuda::batch_norm_stats and fastconv_cuda::batch_norm_act_backward have Meta kernels
that run the CUDA kernels' argument checks and output allocation, so their schemas, output
shapes, dtypes and layouts, and their error messages are tested here without a GPU; the
numbers are checked on a GPU by the tests that parametrize over backends (test_conv_bn_act.py,
test_conv_bn_act_module.py, test_conv_bn_act_gpu.py). With FASTCONV_EXPECT_EXTENSION=1 (CI) a
missing extension fails these tests instead of skipping them.
"""

from __future__ import annotations

import pytest
import torch

from fastconv.ops import batch_norm as batch_norm_ops
from harness import require_extension

require_extension()

ops = torch.ops.fastconv_cuda
SHAPE = (2, 6, 5, 7)


def meta_tensor(shape=SHAPE, dtype=torch.float16, layout="channels_last"):
    if layout == "channel_slice":  # channels 1..C+1 of a wider channels_last buffer
        wide = torch.empty(shape[0], shape[1] + 3, *shape[2:], dtype=dtype, device="meta")
        return wide.contiguous(memory_format=torch.channels_last)[:, 1 : shape[1] + 1]
    if layout == "spatial_slice":  # a crop: neither dense NCHW nor channels_last
        return torch.empty(shape[0], shape[1], shape[2] + 2, shape[3] + 3, dtype=dtype, device="meta")[:, :, 1:-1, 2:-1]
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=memory_format)


def backward_inputs(dtype=torch.float16, layout="channels_last"):
    c = meta_tensor(dtype=dtype, layout=layout)
    stats = torch.empty(SHAPE[1], device="meta")
    return c, torch.empty_like(c), stats, torch.empty_like(stats)


def test_schemas():
    assert str(ops.batch_norm_stats.default._schema) == "fastconv_cuda::batch_norm_stats(Tensor c) -> (Tensor, Tensor)"
    assert str(ops.batch_norm_act_backward.default._schema) == (
        "fastconv_cuda::batch_norm_act_backward(Tensor grad_y, Tensor c, Tensor mean, Tensor invstd, Tensor? weight,"
        " Tensor? bias, int activation) -> (Tensor, Tensor, Tensor)"
    )


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", ("nchw", "channels_last", "channel_slice", "spatial_slice"))
def test_stats_are_float32_per_channel(layout, dtype):
    mean, var = ops.batch_norm_stats(meta_tensor(dtype=dtype, layout=layout))
    for out in (mean, var):
        assert out.shape == (SHAPE[1],) and out.dtype == torch.float32 and out.device.type == "meta"


def test_stats_of_an_empty_batch_keep_the_channel_count():
    mean, var = ops.batch_norm_stats(meta_tensor(shape=(0, 6, 5, 7)))
    assert mean.shape == var.shape == (6,)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", ("nchw", "channels_last", "channel_slice", "spatial_slice"))
def test_backward_grad_c_takes_empty_like_layout(layout, dtype):
    c, grad_y, mean, invstd = backward_inputs(dtype, layout)
    grad_c, grad_weight, grad_bias = ops.batch_norm_act_backward(grad_y, c, mean, invstd, None, None, 3)
    assert grad_c.shape == c.shape and grad_c.dtype == c.dtype
    assert grad_c.stride() == torch.empty_like(c).stride()
    for out in (grad_weight, grad_bias):
        assert out.shape == (SHAPE[1],) and out.dtype == torch.float32


def test_channel_slice_grad_c_is_dense_channels_last():
    c, _, mean, invstd = backward_inputs(layout="channel_slice")
    grad_c, _, _ = ops.batch_norm_act_backward(torch.empty_like(c), c, mean, invstd, None, None, 0)
    assert grad_c.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("param_dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_backward_accepts_grad_y_strides_and_any_float_parameters(param_dtype):
    c, _, mean, invstd = backward_inputs(layout="channels_last")
    grad_y = meta_tensor(layout="nchw")  # strides unlike c's
    weight = torch.empty(SHAPE[1], dtype=param_dtype, device="meta")
    grad_c, grad_weight, grad_bias = ops.batch_norm_act_backward(grad_y, c, mean, invstd, weight, weight, 4)
    assert grad_c.stride() == c.stride() and grad_weight.dtype == grad_bias.dtype == torch.float32


def backward_call(**changes):
    c, grad_y, mean, invstd = backward_inputs()
    args = dict(grad_y=grad_y, c=c, mean=mean, invstd=invstd, weight=None, bias=None, activation=1)
    args.update({name: change(args) for name, change in changes.items()})
    return lambda: ops.batch_norm_act_backward(*args.values())


OP = "fastconv_cuda::batch_norm_act_backward: "


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: ops.batch_norm_stats(meta_tensor()[0]), r"batch_norm_stats: argument 'c' must be 4-D, but got 3-D"),
        (lambda: ops.batch_norm_stats(meta_tensor(dtype=torch.float64)),
         r"batch_norm_stats: argument 'c' must be float32, float16 or bfloat16, but got Double"),
        (backward_call(c=lambda a: a["c"].double(), grad_y=lambda a: a["grad_y"].double()),
         OP + r"argument 'c' must be float32, float16 or bfloat16, but got Double"),
        (backward_call(grad_y=lambda a: a["grad_y"][:1]), OP + r"argument 'grad_y' must be c's shape \[2, 6, 5, 7\], but got \[1, 6, 5, 7\]"),
        (backward_call(grad_y=lambda a: a["grad_y"].float()), OP + r"argument 'grad_y' must be c's dtype \(Half\), but got Float"),
        (backward_call(mean=lambda a: a["mean"][:4]),
         OP + r"argument 'mean' must be a 1-D tensor of size C = c.size\(1\) = 6, but got shape \[4\]"),
        (backward_call(invstd=lambda a: a["invstd"].half()),
         OP + r"argument 'invstd' must be float32 \(the statistics' precision\), but got Half"),
        (backward_call(weight=lambda a: torch.empty(6, 1, device="meta")),
         OP + r"argument 'weight' must be a 1-D tensor of size C = c.size\(1\) = 6, but got shape \[6, 1\]"),
        (backward_call(bias=lambda a: torch.empty(6, dtype=torch.float64, device="meta")),
         OP + r"argument 'bias' must be float32, float16 or bfloat16, but got Double"),
        (backward_call(activation=lambda a: 5), OP + r"argument 'activation' must be an activation code in \[0, 4\].*but got 5"),
    ],
    ids=["stats-rank", "stats-dtype", "dtype", "grad-shape", "grad-dtype", "mean-size", "invstd-dtype", "weight-rank",
         "bias-dtype", "activation"],  # fmt: skip
)
def test_checks_name_the_argument_the_expectation_and_the_value(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call()


def test_cpu_tensors_are_refused_by_the_dispatcher():
    with pytest.raises(NotImplementedError, match="batch_norm_stats"):
        ops.batch_norm_stats(torch.randn(2, 3, 4, 4))


def test_cuda_is_registered_and_refuses_float64():
    for implementations in (batch_norm_ops.STATS, batch_norm_ops.BACKWARD):
        assert implementations.has("cuda")
    c = torch.empty(SHAPE, dtype=torch.float64, device="meta")
    stats = torch.empty(SHAPE[1], dtype=torch.float64, device="meta")
    reason = "its kernels take float32, float16 and bfloat16; got float64"
    stats_supports, backward_supports = (i._supports["cuda"] for i in (batch_norm_ops.STATS, batch_norm_ops.BACKWARD))
    assert stats_supports(c=c) == reason
    backward_call = dict(grad_y=torch.empty_like(c), c=c, mean=stats, invstd=stats, weight=None, bias=None, activation="relu")
    assert backward_supports(**backward_call) == reason
    assert stats_supports(c=c.float()) is None
