"""The extension's conv_bn_act op (fastconv_cuda::conv_bn_act_forward, the implicit-GEMM conv
with its epilogue and batch statistics) on the Meta device: output shapes and layouts for
groups, dilation and padding, and the checks.
"""

from __future__ import annotations

import pytest
import torch

from harness import require_extension

require_extension()

ops = torch.ops.fastconv_cuda


def test_conv_bn_act_op_schema():
    assert str(ops.conv_bn_act_forward.default._schema) == (
        "fastconv_cuda::conv_bn_act_forward(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[4] padding,"
        " int[2] dilation, int groups, Tensor? scale, Tensor? shift, int activation, bool compute_stats,"
        " bool allow_tf32) -> (Tensor, Tensor, Tensor)"
    )


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
def test_conv_bn_act_forward_output_layout_follows_output_memory_format(memory_format, channels, expect_cl):
    from fastconv._geometry import output_memory_format

    x, weight = conv_meta(shape=(2, channels, 11, 13), memory_format=memory_format)
    out, mean, var = conv_call(x, weight, stride=(2, 2), padding=(1, 0, 2, 1))
    # Ho = (11 + 1 + 2 - 3) // 2 + 1 = 6, Wo = (13 + 0 + 1 - 3) // 2 + 1 = 6
    assert out.shape == (2, 12, 6, 6) and out.dtype == torch.float16
    assert out.is_contiguous(memory_format=torch.channels_last if expect_cl else torch.contiguous_format)
    assert out.is_contiguous(memory_format=output_memory_format(x))
    assert mean.shape == var.shape == (12,) and mean.dtype == var.dtype == torch.float32


def test_conv_bn_act_forward_shapes_for_groups_dilation_and_no_stats():
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
def test_conv_bn_act_forward_checks_name_the_argument(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call(*conv_meta())


def test_gemm_ops_refuse_cpu_tensors():
    with pytest.raises(NotImplementedError, match="fastconv_cuda::conv_bn_act_forward.*CPU"):
        conv_call(torch.randn(1, 2, 5, 5).half(), torch.randn(3, 2, 3, 3).half())
