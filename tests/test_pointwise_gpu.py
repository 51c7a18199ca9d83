"""pointwise_conv2d on a GPU: the sanitizer subset, determinism, CUDA graphs into a concat
buffer, and the CUDA tensor-core GEMM against float64.

`benchmarks/gpu_check.sh` also runs the tests with "sanitizer" in their name under
compute-sanitizer's memcheck and racecheck, so those are kept small.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fastconv
from harness import ON_GPU, LAYOUTS, needs_cuda_backend, assert_matches_reference, backends_under_test, random_tensor, run_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")]

GPU_BACKENDS = [p for p in backends_under_test() if p.values[0] != "torch"]


POINTWISE_BACKENDS = [p for p in backends_under_test(importlib.import_module("fastconv.ops.pointwise").FORWARD) if p.values[0] != "torch"]
# Tests that take the weight gradient under one backend need it to implement that too (cuda has
# only the forward so far).
POINTWISE_GRAD_BACKENDS = [
    p for p in backends_under_test(importlib.import_module("fastconv.ops.pointwise").WEIGHT_GRAD) if p.values[0] != "torch"
]


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", POINTWISE_GRAD_BACKENDS)
def test_pointwise_sanitizer_subset(backend, layout, dtype):
    """Small fused 1x1 convs on every layout; bfloat16 tl.dot is checked here, not on the CPU."""
    x = random_tensor((2, 40, 9, 7), dtype, layout).requires_grad_()
    weight = (torch.randn(24, 40, 1, 1, device="cuda") / 6).to(dtype).requires_grad_()
    scale = (torch.randn(24, device="cuda") * 0.5 + 1).requires_grad_()
    shift, in_shift = torch.randn(24, device="cuda").requires_grad_(), torch.randn(40, device="cuda").requires_grad_()
    in_scale = (torch.randn(40, device="cuda") * 0.5 + 1).requires_grad_()
    tensors = (x, weight, scale, shift, in_scale, in_shift)
    options = dict(activation="silu", in_activation="silu")

    def call(x, weight, scale, shift, in_scale, in_shift):
        return fastconv.pointwise_conv2d(x, weight, scale=scale, shift=shift, in_scale=in_scale, in_shift=in_shift, **options)

    y = run_backend(backend, call, *tensors)
    grads = run_backend(backend, torch.autograd.grad, y.float().sum(), tensors)
    torch.cuda.synchronize()
    wide = [t.detach().double().requires_grad_() for t in tensors]
    with fastconv.use_backend("torch"):
        y64 = call(*wide)
        yardstick = call(*tensors)
        # The prologue's output and c are rounded to half precision on both sides before the
        # parameter gradients sum over the pixels: the torch backend's error is the yardstick.
        lowp_grads = torch.autograd.grad(yardstick.float().sum(), tensors)
    assert_matches_reference("y", y, y64, yardstick, terms=40)
    names = ("x", "weight", "scale", "shift", "in_scale", "in_shift")
    for name, got, want, plain in zip(names, grads, torch.autograd.grad(y64.sum(), wide), lowp_grads):
        assert_matches_reference(f"grad_{name}", got, want, plain, terms=24 if name == "x" else 2 * 9 * 7)


@pytest.mark.parametrize("backend", POINTWISE_GRAD_BACKENDS)
def test_pointwise_weight_gradient_is_bitwise_deterministic(backend):
    x = random_tensor((32, 96, 28, 28), torch.float16, "channels_last")
    grad_c = random_tensor((32, 64, 28, 28), torch.float16, "channels_last")
    first = run_backend(backend, torch.ops.fastconv.pointwise_conv2d_backward_weight, grad_c, x, None, None, None)
    for _ in range(3):
        again = run_backend(backend, torch.ops.fastconv.pointwise_conv2d_backward_weight, grad_c, x, None, None, None)
        assert torch.equal(first, again)


@pytest.mark.parametrize("backend", POINTWISE_BACKENDS + ["auto"])
def test_pointwise_cuda_graph_into_a_concat_buffer(backend):
    buffer = torch.randn(8, 96, 14, 14, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(32, 64, 1, 1, device="cuda") / 8).half()
    in_scale, in_shift = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")
    run = lambda: fastconv.pointwise_conv2d(  # noqa: E731
        buffer[:, :64], weight, in_scale=in_scale, in_shift=in_shift, in_activation="relu", out=buffer[:, 64:]
    )
    with fastconv.use_backend(backend):
        run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
    buffer[:, :64].copy_(torch.randn(8, 64, 14, 14, device="cuda"))
    graph.replay()
    expected = fastconv.reference.pointwise_conv2d(buffer[:, :64], weight, None, None, None, None, None, False, in_scale, in_shift, "relu")
    torch.testing.assert_close(buffer[:, 64:], expected, atol=2e-2, rtol=2e-2)


# Tensor-core GEMM ops of the extension, called directly (fastconv_cuda::pointwise_forward and
# fastconv_cuda::conv_bn_act_forward) ----------------------------------------------------------------

_ACTS = {None: 0, "relu": 1, "relu6": 2, "silu": 3, "hardswish": 4}


def _pointwise_case(shape, c_out, dtype, layout, out_layout="channels_last", prologue=False, residual=False,
                    after=False, activation="relu6", transposed=False):
    """Inputs, the cuda op's output, and the float64 / low-precision references."""
    n, c_in, h, w = shape
    x = random_tensor(shape, dtype, layout)
    if transposed:  # the grad_input pass: a transposed view of a (C_in, C_out) weight
        weight = (torch.randn(c_in, c_out, device="cuda") / c_in**0.5).to(dtype).t()
    else:
        weight = (torch.randn(c_out, c_in, device="cuda") / c_in**0.5).to(dtype)
    bias = torch.randn(c_out, device="cuda").to(dtype)
    scale, shift = torch.rand(c_out, device="cuda") + 0.5, torch.randn(c_out, device="cuda")
    in_scale = torch.rand(c_in, device="cuda") + 0.5 if prologue else None
    in_shift = torch.randn(c_in, device="cuda") if prologue else None
    in_act = "relu" if prologue else None
    out = random_tensor((n, c_out, h, w), dtype, out_layout)
    res = random_tensor((n, c_out, h, w), dtype, out_layout) if residual else None
    args = (bias, scale, shift, activation, res, after, in_scale, in_shift, in_act)

    def reference(wide):
        cast = (lambda t: t.double() if t is not None else None) if wide else (lambda t: t)
        return fastconv.reference.pointwise_conv2d(
            cast(x), cast(weight)[:, :, None, None], *[cast(a) if isinstance(a, torch.Tensor) or a is None else a for a in args]
        )

    expected64, lowp = reference(True), reference(False)
    if residual:
        out = res  # out may be the residual itself: read and written by the same thread
    torch.ops.fastconv_cuda.pointwise_forward(
        x, weight, bias, scale, shift, _ACTS[activation], res, after, in_scale, in_shift, _ACTS[in_act], False, out
    )
    return out, expected64, lowp


@needs_cuda_backend
@pytest.mark.parametrize(
    "shape, c_out, layout, options",
    [
        ((2, 64, 7, 9), 40, "channels_last", {}),
        ((3, 40, 5, 5), 24, "nchw", dict(prologue=True)),
        ((2, 32, 9, 7), 48, "channel_slice", dict(prologue=True, out_layout="channel_slice")),
        ((2, 20, 6, 5), 17, "spatial_slice", dict(out_layout="nchw", residual=True)),
        ((2, 48, 7, 7), 56, "channels_last", dict(residual=True, after=True, activation="relu")),
        ((4, 960, 7, 7), 160, "channels_last", {}),  # skinny: M = 196, long K
        ((2, 16, 112, 112), 96, "channels_last", dict(activation="silu")),  # wide: K = 16
        ((2, 72, 9, 9), 24, "channels_last", dict(transposed=True, activation=None)),
    ],
    ids=["cl", "nchw-prologue", "slice-in-out", "spatial-residual", "residual-before-act", "skinny", "wide", "transposed-w"],
)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_pointwise_cuda_op_matches_float64(shape, c_out, layout, options, dtype):
    out, expected64, lowp = _pointwise_case(shape, c_out, dtype, layout, **options)
    assert_matches_reference("out", out, expected64, lowp, terms=shape[1])


@needs_cuda_backend
@pytest.mark.parametrize("c_in", (16, 13), ids=("vec", "scalar"))
def test_pointwise_cuda_sanitizer_tiny(c_in):
    out, expected64, lowp = _pointwise_case((1, c_in, 3, 5), 10, torch.float16, "channel_slice", prologue=True, residual=True)
    assert_matches_reference("out", out, expected64, lowp, terms=c_in)


@needs_cuda_backend
def test_pointwise_cuda_tf32_only_when_allowed():
    x, weight = torch.randn(1, 8, 4, 4, device="cuda"), torch.randn(8, 8, device="cuda")
    out = torch.empty(1, 8, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="float16 or bfloat16 when allow_tf32 is false"):
        torch.ops.fastconv_cuda.pointwise_forward(x, weight, None, None, None, 0, None, False, None, None, 0, False, out)
    torch.ops.fastconv_cuda.pointwise_forward(x, weight, None, None, None, 0, None, False, None, None, 0, True, out)
    torch.testing.assert_close(out, torch.einsum("nkhw,jk->njhw", x, weight), atol=2e-2, rtol=2e-2)
