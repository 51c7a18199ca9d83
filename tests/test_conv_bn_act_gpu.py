"""conv2d_bn_act and ConvBNAct2d on a GPU: bfloat16 implicit GEMMs (wrong in Triton's CPU
interpreter), half-precision training against BatchNorm2d, determinism, CUDA graphs.

Tests named "sanitizer" also run under compute-sanitizer in benchmarks/gpu_check.sh: keep
them small.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastconv
from fastconv.nn import ConvBNAct2d
from fastconv.ops import conv_bn_act as conv_ops
from harness import ON_GPU, needs_cuda_backend, assert_matches_reference, backends_under_test, random_tensor, run_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")]

GPU_BACKENDS = [p for p in backends_under_test(conv_ops.FORWARD) if p.values[0] != "torch"]


def conv_inputs(shape, out_channels, kernel, groups, dtype, layout="channels_last", requires_grad=True):
    x = random_tensor(shape, dtype, layout).requires_grad_(requires_grad)
    fan_in = shape[1] // groups * kernel[0] * kernel[1]
    weight = (torch.randn(out_channels, shape[1] // groups, *kernel, device="cuda") / fan_in**0.5).to(dtype)
    scale = torch.randn(out_channels, device="cuda") * 0.5 + 1
    shift = torch.randn(out_channels, device="cuda")
    return [t.requires_grad_(requires_grad) for t in (x, weight, scale, shift)]


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", ("nchw", "channels_last", "channel_slice"))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_conv_bn_act_sanitizer_subset(backend, layout, dtype):
    """A small implicit GEMM (3x3, stride 2, groups 2, odd sizes) forward and backward."""
    tensors = conv_inputs((2, 32, 11, 9), 48, (3, 3), 2, dtype, layout)

    def call(x, weight, scale, shift):
        return fastconv.conv2d_bn_act(x, weight, None, 2, 1, 1, 2, scale=scale, shift=shift, activation="silu")

    y = run_backend(backend, call, *tensors)
    grads = run_backend(backend, torch.autograd.grad, y.float().sum(), tensors)
    torch.cuda.synchronize()
    wide = [t.detach().double().requires_grad_() for t in tensors]
    with fastconv.use_backend("torch"):
        y64 = call(*wide)
        yardstick = call(*tensors)
        # c is rounded to half precision on both sides before the parameter gradients sum over
        # the pixels: the torch backend's error is the yardstick.
        lowp_grads = torch.autograd.grad(yardstick.float().sum(), tensors)
    assert_matches_reference("y", y, y64, yardstick, terms=16 * 9)
    names = ("x", "weight", "scale", "shift")
    for name, got, want, plain in zip(names, grads, torch.autograd.grad(y64.sum(), wide), lowp_grads):
        assert_matches_reference(f"grad_{name}", got, want, plain, terms=48 * 9 if name == "x" else 2 * 6 * 5)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", ("channels_last", "channel_slice"))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_residual_epilogue_sanitizer_subset(backend, layout, dtype):
    """ResNet's BasicBlock ending: relu(bn(conv3x3) + identity) in the implicit GEMM's epilogue,
    the identity in its own layout (an NCHW residual under channels_last x and out, or a channel
    slice), with its gradient."""
    tensors = conv_inputs((2, 32, 9, 11), 40, (3, 3), 1, dtype, layout)
    residual = random_tensor((2, 40, 9, 11), dtype, "nchw" if layout == "channels_last" else layout)
    tensors.append(residual.requires_grad_())

    def call(x, weight, scale, shift, residual):
        return fastconv.conv2d_bn_act(x, weight, None, 1, 1, scale=scale, shift=shift, activation="relu",
                                      residual=residual, activation_after_residual=True)  # fmt: skip

    y = run_backend(backend, call, *tensors)
    grads = run_backend(backend, torch.autograd.grad, y.float().sum(), tensors)
    torch.cuda.synchronize()
    wide = [t.detach().double().requires_grad_() for t in tensors]
    with fastconv.use_backend("torch"):
        y64 = call(*wide)
        yardstick = call(*tensors)
        lowp_grads = torch.autograd.grad(yardstick.float().sum(), tensors)
    assert_matches_reference("y", y, y64, yardstick, terms=32 * 9)
    names = ("x", "weight", "scale", "shift", "residual")
    for name, got, want, plain in zip(names, grads, torch.autograd.grad(y64.sum(), wide), lowp_grads):
        assert_matches_reference(f"grad_{name}", got, want, plain, terms=40 * 9 if name == "x" else 2 * 9 * 11)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_batch_statistics_sanitizer_subset(backend):
    x, weight, _, _ = conv_inputs((2, 8, 13, 13), 16, (7, 7), 1, torch.float16, requires_grad=False)
    bias = torch.full((16,), 50.0, device="cuda", dtype=torch.float16)  # |mean| >> std
    c, mean, var = run_backend(
        backend, torch.ops.fastconv.conv2d_batch_stats, x, weight, bias, (2, 2), (3, 3, 3, 3), (1, 1), 1
    )
    torch.cuda.synchronize()
    expected_var, expected_mean = torch.var_mean(c.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_statistics_and_backward_are_bitwise_deterministic(backend):
    fused = ConvBNAct2d(64, 64, 3).cuda().half().to(memory_format=torch.channels_last).train()
    x = random_tensor((16, 64, 28, 28), torch.float16, "channels_last").requires_grad_()
    results = []
    for _ in range(3):
        with fastconv.use_backend(backend):
            y = fused(x)
            grads = torch.autograd.grad(y.float().square().sum(), [x, *fused.parameters()])
        results.append((y, *grads))
    for again in results[1:]:
        for a, b in zip(results[0], again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_half_precision_training_step_within_twice_batchnorm_error(backend):
    """fp16 channels_last training against nn.Sequential(Conv2d, BatchNorm2d, SiLU) in fp16,
    both measured against the same unit in float64."""
    torch.manual_seed(0)
    unit = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.SiLU()).cuda()
    fused = ConvBNAct2d(32, 64, 3, 2, activation="silu").cuda()
    fused.load_state_dict(unit.state_dict())
    x = random_tensor((8, 32, 29, 29), torch.float16, "channels_last")
    grad_y = random_tensor((8, 64, 15, 15), torch.float16, "channels_last")

    def step(module, x, dtype):
        module = module.to(dtype).to(memory_format=torch.channels_last).train()
        x = x.detach().to(dtype).requires_grad_()
        y = module(x)
        grads = torch.autograd.grad(y, [x, *module.parameters()], grad_y.to(dtype))
        return (y, *grads), [b.clone() for b in module[1].buffers()]

    with fastconv.use_backend(backend):
        ours, our_stats = step(copy.deepcopy(fused), x, torch.float16)
    theirs, their_stats = step(copy.deepcopy(unit), x, torch.float16)
    exact, exact_stats = step(copy.deepcopy(unit), x, torch.float64)
    pixels = 8 * 15 * 15
    for name, got, lowp, want in zip(("y", "grad_x", "grad_conv", "grad_gamma", "grad_beta"), ours, theirs, exact):
        assert_matches_reference(name, got, want, lowp, terms=pixels if name.startswith("grad_") else 32 * 9)
    for got, want in zip(our_stats, exact_stats):
        if got.dtype == torch.int64:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", GPU_BACKENDS + ["auto"])
def test_eval_cuda_graph_capture_and_replay(backend):
    fused = ConvBNAct2d(16, 32, 3).cuda().half().to(memory_format=torch.channels_last).eval()
    x = random_tensor((8, 16, 14, 14), torch.float16, "channels_last")
    with torch.no_grad(), fastconv.use_backend(backend):
        fused(x)  # warm up: autotuning and the fold cache happen outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = fused(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    with torch.no_grad(), fastconv.use_backend("torch"):
        expected = fused(x)
    torch.testing.assert_close(y, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize(
    "backend", [p for p in backends_under_test(fastconv.ops.batch_norm.BACKWARD) if p.values[0] != "torch"]
)
def test_batch_norm_kernels_sanitizer_subset(backend, layout):
    """batch_norm_stats and batch_norm_act_backward on a small fp16 case: odd sizes, |mean| >> std,
    grad_y in the other layout than c."""
    shape = (3, 24, 7, 5)
    c = random_tensor(shape, torch.float16, layout).add_(20.0)
    grad_y = random_tensor(shape, torch.float16, "channels_last" if layout == "nchw" else "nchw")
    weight = torch.rand(shape[1], device="cuda") + 0.5
    bias = torch.randn(shape[1], device="cuda")
    mean, var = run_backend(backend, torch.ops.fastconv.batch_norm_stats, c)
    torch.cuda.synchronize()
    expected_var, expected_mean = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-4, atol=1e-5)

    invstd = torch.rsqrt(var + 1e-5)
    grads = run_backend(
        backend, torch.ops.fastconv.batch_norm_act_backward, grad_y, c, mean, invstd, weight, bias, "silu"
    )
    torch.cuda.synchronize()
    assert grads[0].stride() == torch.empty_like(c).stride()
    wide = [t.double() for t in (grad_y, c, mean, invstd, weight, bias)]
    exact = fastconv.reference.batch_norm_act_backward(*wide, "silu")
    lowp = fastconv.reference.batch_norm_act_backward(grad_y, c, mean, invstd, weight, bias, "silu")
    pixels = shape[0] * shape[2] * shape[3]
    for name, got, want, plain in zip(("grad_c", "grad_weight", "grad_bias"), grads, exact, lowp):
        assert got.dtype == (c.dtype if name == "grad_c" else torch.float32)
        assert_matches_reference(name, got, want, plain if name == "grad_c" else None, terms=pixels)


# The CUDA implicit GEMM called directly ------------------------------------------------------

_ACTS = {None: 0, "relu": 1, "relu6": 2, "silu": 3, "hardswish": 4}


def _conv_reference(x, weight, bias, stride, padding, dilation, groups, scale, shift, activation):
    top, left, bottom, right = padding
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (left, right, top, bottom)), weight, bias, stride, 0, dilation, groups)
    return fastconv.reference.conv_epilogue(y, scale, shift, activation)


def _conv_case(shape, c_out, kernel, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1,
               layout="channels_last", dtype=torch.float16, activation="relu", stats=True):
    x = random_tensor(shape, dtype, layout)
    fan_in = shape[1] // groups * kernel[0] * kernel[1]
    weight = (torch.randn(c_out, shape[1] // groups, *kernel, device="cuda") / fan_in**0.5).to(dtype)
    bias = torch.randn(c_out, device="cuda").to(dtype)
    scale, shift = torch.rand(c_out, device="cuda") + 0.5, torch.randn(c_out, device="cuda")
    conv = (stride, padding, dilation, groups)
    out, mean, var = torch.ops.fastconv_cuda.conv_bn_act_forward(
        x, weight, bias, list(stride), list(padding), list(dilation), groups, scale, shift, _ACTS[activation], stats, False
    )
    expected64 = _conv_reference(x.double(), weight.double(), bias.double(), *conv, scale.double(), shift.double(), activation)
    lowp = _conv_reference(x, weight, bias, *conv, scale, shift, activation)
    assert_matches_reference("out", out, expected64, lowp, terms=fan_in)
    from fastconv._conv_args import output_memory_format

    assert out.is_contiguous(memory_format=output_memory_format(x))
    if stats:
        # The statistics are of the stored (rounded) output, so compare with torch's over `out`.
        want_var, want_mean = torch.var_mean(out.float(), dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(mean, want_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var, want_var, rtol=1e-4, atol=1e-5)
    else:
        assert mean.shape == var.shape == (0,)
    return x, weight, bias, scale, shift, out, mean, var


@needs_cuda_backend
@pytest.mark.parametrize(
    "shape, c_out, kernel, options",
    [
        ((2, 16, 13, 11), 24, (3, 3), dict(stride=(2, 2), padding=(1, 1, 1, 1))),
        ((2, 16, 13, 11), 24, (3, 3), dict(stride=(2, 2), padding=(1, 1, 1, 1), layout="nchw")),
        ((3, 32, 9, 10), 32, (3, 3), dict(padding=(1, 1, 1, 1), groups=2)),
        ((2, 24, 12, 12), 40, (1, 7), dict(padding=(0, 3, 0, 3), activation="silu")),
        ((2, 16, 15, 15), 16, (7, 1), dict(padding=(3, 0, 3, 0), layout="channel_slice")),
        ((2, 8, 17, 17), 16, (3, 3), dict(padding=(2, 2, 2, 2), dilation=(2, 2))),
        ((2, 8, 16, 16), 12, (4, 4), dict(stride=(2, 2), padding=(1, 1, 2, 2), activation=None)),  # "same"-like, even kernel
        ((1, 3, 64, 64), 32, (7, 7), dict(stride=(2, 2), padding=(3, 3, 3, 3))),  # a stem: 3 channels, scalar loads
        ((2, 8, 30, 30), 16, (11, 11), dict(stride=(4, 4), padding=(2, 2, 2, 2), layout="spatial_slice")),
        ((4, 256, 7, 7), 160, (3, 3), dict(padding=(1, 1, 1, 1), stats=False)),  # skinny, long K
        ((2, 64, 56, 56), 64, (3, 3), dict(padding=(1, 1, 1, 1))),
    ],
    ids=["3x3s2", "3x3s2-nchw", "groups2", "1x7", "7x1-slice", "dil2", "asym-pad-even", "stem7x7", "11x11s4", "skinny", "56x56"],
)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_conv_forward_cuda_matches_float64(shape, c_out, kernel, options, dtype):
    _conv_case(shape, c_out, kernel, dtype=dtype, **options)


@needs_cuda_backend
def test_conv_forward_cuda_statistics_are_deterministic_and_nan_when_empty():
    x, weight, bias, scale, shift, out, mean, var = _conv_case((8, 32, 30, 30), 48, (3, 3), padding=(1, 1, 1, 1))
    for _ in range(3):
        again = torch.ops.fastconv_cuda.conv_bn_act_forward(x, weight, bias, [1, 1], [1, 1, 1, 1], [1, 1], 1, scale, shift, 1, True, False)
        assert torch.equal(again[0], out) and torch.equal(again[1], mean) and torch.equal(again[2], var)
    empty = torch.empty(0, 32, 30, 30, device="cuda", dtype=torch.float16)
    out, mean, var = torch.ops.fastconv_cuda.conv_bn_act_forward(empty, weight, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, None, None, 0, True, False)
    assert out.shape == (0, 48, 30, 30) and mean.isnan().all() and var.isnan().all()


@needs_cuda_backend
@pytest.mark.parametrize("layout, groups", [("channels_last", 1), ("nchw", 2)], ids=["vec", "scalar-groups"])
def test_conv_forward_cuda_sanitizer_tiny(layout, groups):
    _conv_case((1, 8, 6, 5), 6, (3, 3), stride=(1, 2), padding=(1, 0, 1, 2), groups=groups, layout=layout)


@needs_cuda_backend
def test_conv_forward_cuda_tf32():
    x = torch.randn(2, 8, 9, 9, device="cuda")
    weight = torch.randn(16, 8, 3, 3, device="cuda") / 8
    out, _, _ = torch.ops.fastconv_cuda.conv_bn_act_forward(x, weight, None, [1, 1], [1] * 4, [1, 1], 1, None, None, 0, False, True)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, weight, padding=1), atol=1e-2, rtol=1e-2)


@needs_cuda_backend
@pytest.mark.parametrize("dtype, tf32", [(torch.float16, False), (torch.bfloat16, False), (torch.float32, True)], ids=["fp16", "bf16", "tf32"])
def test_conv_forward_cuda_statistics_when_mean_dominates(dtype, tf32):
    """|mean| >> std: per-chunk means refined by their deviations keep the variance accurate."""
    x = random_tensor((4, 16, 20, 20), dtype, "channels_last")
    weight = (torch.randn(24, 16, 3, 3, device="cuda") / 12).to(dtype)
    bias = torch.full((24,), 1000.0 if dtype == torch.float32 else 50.0, device="cuda").to(dtype)
    out, mean, var = torch.ops.fastconv_cuda.conv_bn_act_forward(x, weight, bias, [1, 1], [1] * 4, [1, 1], 1, None, None, 0, True, tf32)
    want_var, want_mean = torch.var_mean(out.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-4, atol=1e-5)
