"""The compiled extension fastconv._C, as far as a machine without a GPU can exercise it.

Its ops have CUDA kernels and Meta kernels that run the very same argument checks and output
allocation, so the checks, the schemas and the output layouts are tested here; the kernels
themselves run in the GPU tests. With FASTCONV_EXPECT_EXTENSION=1 (CI) a missing extension
fails these tests instead of skipping them: the build is part of what CI checks.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastconv
from fastconv._extension import load_extension

_module, _why = load_extension()
if _module is None:
    if os.environ.get("FASTCONV_EXPECT_EXTENSION") == "1":
        raise AssertionError(f"FASTCONV_EXPECT_EXTENSION=1 but {_why}")
    pytest.skip(_why, allow_module_level=True)

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


def test_cuda_backend_is_built_and_waits_for_a_device():
    status = fastconv.backends.available()["cuda"]
    assert status.available == torch.cuda.is_available()
    if not status.available:
        assert status.reason == "no CUDA device is visible to torch"


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


# Tensor-core GEMM ops: pointwise_forward (1x1 conv) and conv_bn_act_forward (implicit GEMM) --------


def test_gemm_op_schemas():
    assert str(ops.pointwise_forward.default._schema) == (
        "fastconv_cuda::pointwise_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift,"
        " int activation, Tensor? residual, bool activation_after_residual, Tensor? in_scale, Tensor? in_shift,"
        " int in_activation, bool allow_tf32, Tensor(a!) out) -> ()"
    )
    assert str(ops.conv_bn_act_forward.default._schema) == (
        "fastconv_cuda::conv_bn_act_forward(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[4] padding,"
        " int[2] dilation, int groups, Tensor? scale, Tensor? shift, int activation, bool compute_stats,"
        " bool allow_tf32) -> (Tensor, Tensor, Tensor)"
    )


def pointwise_meta(dtype=torch.float16, c_in=16, c_out=24):
    """x: a channel slice of a wider channels_last buffer; out: a channel slice too."""
    x = torch.empty(2, c_in + 8, 5, 7, dtype=dtype, device="meta").contiguous(memory_format=torch.channels_last)[:, 4 : 4 + c_in]
    weight = torch.empty(c_out, c_in, dtype=dtype, device="meta")
    out = torch.empty(2, c_out + 3, 5, 7, dtype=dtype, device="meta").contiguous(memory_format=torch.channels_last)[:, :c_out]
    return x, weight, out


def pointwise_call(x, weight, out, bias=None, scale=None, shift=None, activation=0, residual=None, in_scale=None,
                   in_shift=None, in_activation=0, allow_tf32=False):
    return ops.pointwise_forward(x, weight, bias, scale, shift, activation, residual, False, in_scale, in_shift,
                                 in_activation, allow_tf32, out)


def test_pointwise_forward_meta_accepts_slices_transposed_weights_and_every_vector():
    x, weight, out = pointwise_meta()
    vec = lambda n, dtype=torch.float32: torch.empty(n, dtype=dtype, device="meta")  # noqa: E731
    assert pointwise_call(x, weight, out, vec(24, torch.float16), vec(24), vec(24), 2, out, vec(16), vec(16), 1) is None
    # The grad_input pass hands in the transposed view of a (C_in, C_out) weight.
    transposed = torch.empty(16, 24, dtype=torch.float16, device="meta").t()
    pointwise_call(x, transposed, out)
    x32, w32, out32 = pointwise_meta(torch.float32)
    pointwise_call(x32, w32, out32, allow_tf32=True)


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda x, w, o: pointwise_call(x.double(), w.double(), o.double()), r"argument 'x' must be float16, bfloat16, or float32 with allow_tf32.*but got Double"),
        (lambda x, w, o: pointwise_call(x.float(), w.float(), o.float()), r"argument 'x' must be float16 or bfloat16 when allow_tf32 is false.*but got Float"),
        (lambda x, w, o: pointwise_call(x, w[:, :8], o), r"argument 'weight' must be a 2-D \(C_out, C_in\) tensor with C_in = x.size\(1\) = 16, but got shape \[24, 8\]"),
        (lambda x, w, o: pointwise_call(x, w[None], o), r"argument 'weight' must be a 2-D .*, but got shape \[1, 24, 16\]"),
        (lambda x, w, o: pointwise_call(x, w.bfloat16(), o), r"argument 'weight' must be x's dtype \(Half\), but got BFloat16"),
        (lambda x, w, o: pointwise_call(x, w, o[:, :20]), r"argument 'out' must be shape \(N, C_out, H, W\) = \[2, 24, 5, 7\], but got \[2, 20, 5, 7\]"),
        (lambda x, w, o: pointwise_call(x, w, o.float()), r"argument 'out' must be x's dtype \(Half\), but got Float"),
        (lambda x, w, o: pointwise_call(x, w, o, residual=o[:1]), r"argument 'residual' must be shape .*, but got \[1, 24, 5, 7\]"),
        (lambda x, w, o: pointwise_call(x, w, o, bias=torch.empty(24, device="meta")), r"argument 'bias' must be x's dtype \(Half\), but got Float"),
        (lambda x, w, o: pointwise_call(x, w, o, scale=torch.empty(16, device="meta")), r"argument 'scale' must be a 1-D tensor of size C_out = weight.size\(0\) = 24, but got shape \[16\]"),
        (lambda x, w, o: pointwise_call(x, w, o, in_shift=torch.empty(24, device="meta")), r"argument 'in_shift' must be a 1-D tensor of size C_in = x.size\(1\) = 16, but got shape \[24\]"),
        (lambda x, w, o: pointwise_call(x, w, o, in_scale=torch.empty(16, dtype=torch.float64, device="meta")), r"argument 'in_scale' must be x's dtype \(Half\) or float32, but got Double"),
        (lambda x, w, o: pointwise_call(x, w, o, activation=7), r"argument 'activation' must be an activation code in \[0, 4\].*but got 7"),
        (lambda x, w, o: pointwise_call(x, w, o, in_activation=-1), r"argument 'in_activation' must be an activation code.*but got -1"),
    ],
    ids=["float64", "fp32-no-tf32", "weight-channels", "weight-rank", "weight-dtype", "out-shape", "out-dtype",
         "residual-shape", "bias-dtype", "scale-size", "in-shift-size", "in-scale-dtype", "activation", "in-activation"],
)
def test_pointwise_forward_checks_name_the_argument(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call(*pointwise_meta())


def conv_meta(shape=(2, 8, 11, 13), out_channels=12, kernel=(3, 3), groups=1, dtype=torch.float16,
              memory_format=torch.channels_last):
    x = torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=memory_format)
    return x, torch.empty(out_channels, shape[1] // groups, *kernel, dtype=dtype, device="meta")


def conv_call(x, weight, stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1, bias=None, scale=None,
              shift=None, activation=0, compute_stats=True, allow_tf32=False):
    return ops.conv_bn_act_forward(x, weight, bias, list(stride), list(padding), list(dilation), groups, scale, shift,
                            activation, compute_stats, allow_tf32)


@pytest.mark.parametrize(
    "memory_format, channels, expect_cl",
    [(torch.channels_last, 8, True), (torch.contiguous_format, 8, False), (torch.channels_last, 1, False)],
    ids=["channels_last", "nchw", "one-channel"],
)
def test_conv_forward_output_layout_follows_output_memory_format(memory_format, channels, expect_cl):
    from fastconv._conv_args import output_memory_format

    x, weight = conv_meta(shape=(2, channels, 11, 13), memory_format=memory_format)
    out, mean, var = conv_call(x, weight, stride=(2, 2), padding=(1, 0, 2, 1))
    # Ho = (11 + 1 + 2 - 3) // 2 + 1 = 6, Wo = (13 + 0 + 1 - 3) // 2 + 1 = 6
    assert out.shape == (2, 12, 6, 6) and out.dtype == torch.float16
    assert out.is_contiguous(memory_format=torch.channels_last if expect_cl else torch.contiguous_format)
    assert out.is_contiguous(memory_format=output_memory_format(x))
    assert mean.shape == var.shape == (12,) and mean.dtype == var.dtype == torch.float32


def test_conv_forward_shapes_for_groups_dilation_and_no_stats():
    x, weight = conv_meta(out_channels=6, kernel=(1, 7), groups=2)
    out, mean, var = conv_call(x, weight, padding=(0, 3, 0, 3), dilation=(2, 1), groups=2, compute_stats=False)
    assert out.shape == (2, 6, 11, 13) and mean.shape == var.shape == (0,) and mean.dtype == torch.float32
    x, weight = conv_meta(kernel=(3, 3))
    out, _, _ = conv_call(x, weight, padding=(0, 0, 0, 0), dilation=(2, 3))
    assert out.shape == (2, 12, 7, 7)  # 11 - 2*2 = 7, 13 - 2*3 = 7
    empty, mean, _ = conv_call(*conv_meta(shape=(0, 8, 11, 13)))
    assert empty.shape == (0, 12, 11, 13) and mean.shape == (12,)
    x32, w32 = conv_meta(dtype=torch.float32)
    assert conv_call(x32, w32, allow_tf32=True)[0].dtype == torch.float32


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda x, w: conv_call(x, w[:, :4]), r"argument 'weight' must be of shape \(C_out, C_in / groups, KH, KW\) with C_in / groups = 8 / 1.*but got shape \[12, 4, 3, 3\]"),
        (lambda x, w: conv_call(x, w[:, :4], groups=3), r"argument 'weight' must be .*C_in / groups = 8 / 3.*but got shape \[12, 4, 3, 3\]"),
        (lambda x, w: conv_call(x, w[:9, :4], groups=2), r"argument 'weight' must be .*C_out >= 1 a multiple of groups = 2.*but got shape \[9, 4, 3, 3\]"),
        (lambda x, w: conv_call(x, w, groups=0), r"argument 'groups' must be in \[1, 65535\], but got 0"),
        (lambda x, w: conv_call(x, w[0]), r"argument 'weight' must be 4-D, but got 3-D"),
        (lambda x, w: conv_call(x.double(), w.double()), r"argument 'x' must be float16, bfloat16, or float32 with allow_tf32.*but got Double"),
        (lambda x, w: conv_call(x.float(), w.float()), r"argument 'x' must be float16 or bfloat16 when allow_tf32 is false.*but got Float"),
        (lambda x, w: conv_call(x, w.float()), r"argument 'weight' must be x's dtype \(Half\), but got Float"),
        (lambda x, w: conv_call(x, w, stride=(1, 0)), r"argument 'stride' must be in \[1, 2\^30\] in each dim, but got \[1, 0\]"),
        (lambda x, w: conv_call(x, w, dilation=(0, 1)), r"argument 'dilation' must be in \[1, 2\^30\] in each dim, but got \[0, 1\]"),
        (lambda x, w: conv_call(x, w, padding=(1, -1, 1, 1)), r"argument 'padding' must be in \[0, 2\^30\] in each entry, but got \[1, -1, 1, 1\]"),
        (lambda x, w: conv_call(x, w, padding=(1, 1)), r"argument 'padding' must be a list of 4 ints"),
        (lambda x, w: conv_call(x, w, padding=(0,) * 4, dilation=(6, 1)), r"input too small for the kernel.*padded input 11x13 for a dilated kernel 13x3"),
        (lambda x, w: conv_call(x, w, bias=torch.empty(12, device="meta")), r"argument 'bias' must be x's dtype \(Half\), but got Float"),
        (lambda x, w: conv_call(x, w, scale=torch.empty(8, device="meta")), r"argument 'scale' must be a 1-D tensor of size C_out = weight.size\(0\) = 12, but got shape \[8\]"),
        (lambda x, w: conv_call(x, w, shift=torch.empty(12, dtype=torch.bfloat16, device="meta")), r"argument 'shift' must be x's dtype \(Half\) or float32, but got BFloat16"),
        (lambda x, w: conv_call(x, w, activation=5), r"argument 'activation' must be an activation code in \[0, 4\].*but got 5"),
    ],
    ids=["weight-channels", "groups-channels", "groups-out-channels", "groups-zero", "weight-rank", "float64",
         "fp32-no-tf32", "weight-dtype", "stride", "dilation", "padding", "padding-length", "too-small", "bias-dtype",
         "scale-size", "shift-dtype", "activation"],
)
def test_conv_forward_checks_name_the_argument(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call(*conv_meta())


def test_gemm_ops_refuse_cpu_tensors():
    with pytest.raises(NotImplementedError, match="fastconv_cuda::conv_bn_act_forward.*CPU"):
        conv_call(torch.randn(1, 2, 5, 5).half(), torch.randn(3, 2, 3, 3).half())
