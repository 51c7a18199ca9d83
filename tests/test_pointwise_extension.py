"""The extension's pointwise op (fastconv_cuda::pointwise_forward, the tensor-core 1x1 GEMM) on
the Meta device: channel slices, transposed weights, every optional vector, and the checks.
"""

from __future__ import annotations

import pytest
import torch

from harness import require_extension

require_extension()

ops = torch.ops.fastconv_cuda


def test_pointwise_op_schema():
    assert str(ops.pointwise_forward.default._schema) == (
        "fastconv_cuda::pointwise_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift,"
        " int activation, Tensor? residual, bool activation_after_residual, Tensor? in_scale, Tensor? in_shift,"
        " int in_activation, bool allow_tf32, Tensor(a!) out) -> ()"
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
