"""What only a GPU can show: determinism, CUDA graphs, 64-bit indexing, autocast.

`benchmarks/gpu_check.sh` also runs the tests with "sanitizer" in their name under
compute-sanitizer's memcheck and racecheck, so those are kept small.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fastconv
from harness import ON_GPU, LAYOUTS, assert_matches_reference, backends_under_test, random_tensor, run_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")]

GPU_BACKENDS = [p for p in backends_under_test() if p.values[0] != "torch"]


def inputs(shape, dtype=torch.float16, layout="channels_last", requires_grad=False):
    x = random_tensor(shape, dtype, layout, scale=3.0).requires_grad_(requires_grad)
    scale = (torch.randn(shape[1], device="cuda") * 0.5 + 1).requires_grad_(requires_grad)
    shift = torch.randn(shape[1], device="cuda").requires_grad_(requires_grad)
    return x, scale, shift


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bn_act_sanitizer_subset(backend, layout):
    """Small forward and backward calls on every layout, for memcheck and racecheck."""
    x, scale, shift = inputs((2, 19, 9, 7), torch.float16, layout, requires_grad=True)
    y = run_backend(backend, fastconv.bn_act, x, scale, shift, "relu6")
    grads = run_backend(backend, torch.autograd.grad, y.float().sum(), (x, scale, shift))
    torch.cuda.synchronize()
    x64 = x.detach().double().requires_grad_()
    s64, b64 = scale.detach().double().requires_grad_(), shift.detach().double().requires_grad_()
    y64 = fastconv.reference.bn_act(x64, s64, b64, "relu6")
    assert_matches_reference("y", y, y64, fastconv.reference.bn_act(x, scale, shift, "relu6"))
    for name, got, want in zip(("grad_x", "grad_scale", "grad_shift"), grads, torch.autograd.grad(y64.sum(), (x64, s64, b64))):
        assert_matches_reference(name, got, want, terms=1 if name == "grad_x" else 2 * 9 * 7)


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_backward_is_bitwise_deterministic(backend, layout):
    x, scale, shift = inputs((32, 96, 28, 28), torch.float16, layout)
    grad_y = torch.randn_like(x)
    first = run_backend(backend, torch.ops.fastconv.bn_act_backward, grad_y, x, scale, shift, "silu")
    for _ in range(3):
        again = run_backend(backend, torch.ops.fastconv.bn_act_backward, grad_y, x, scale, shift, "silu")
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS + ["auto"])
def test_cuda_graph_capture_and_replay(backend):
    x, scale, shift = inputs((8, 32, 14, 14))
    with fastconv.use_backend(backend):
        fastconv.bn_act(x, scale, shift, "relu6")  # warm up: compile, autotune, time
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = fastconv.bn_act(x, scale, shift, "relu6")
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, fastconv.reference.bn_act(x, scale, shift, "relu6"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_autocast_half_activation_with_float32_parameters(backend):
    conv = torch.nn.Conv2d(8, 16, 3, padding=1).cuda()
    x = torch.randn(2, 8, 9, 9, device="cuda")
    scale, shift = torch.randn(16, device="cuda"), torch.randn(16, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        features = conv(x)
        y = run_backend(backend, fastconv.bn_act, features, scale, shift, "relu")
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, fastconv.reference.bn_act(features, scale, shift, "relu"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensors_past_two_to_the_31_elements(backend):
    """Offsets past 2**31 need 64-bit index arithmetic; check the far end of the tensor."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free device memory; {free / 2**30:.1f} GiB free")
    x, scale, shift = inputs((2, 64, 4096, 4100), torch.float16, "channels_last")
    y = run_backend(backend, fastconv.bn_act, x, scale, shift, "relu6")
    tail = (slice(1, 2), slice(None), slice(4090, None), slice(None))
    torch.testing.assert_close(y[tail], fastconv.reference.bn_act(x[tail], scale, shift, "relu6"))
    del y


def test_compile_with_cuda_graphs():
    x, scale, shift = inputs((4, 16, 8, 8))
    compiled = torch.compile(lambda x: fastconv.bn_act(x, scale, shift, "hardswish"), mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        y = compiled(x)
    torch.testing.assert_close(y, fastconv.reference.bn_act(x, scale, shift, "hardswish"))


def triton_kernels_of(module_name):
    """Every autotuned kernel of a fastconv.triton_kernels module, by name."""
    module = importlib.import_module(f"fastconv.triton_kernels.{module_name}")
    return [(name, kernel) for name, kernel in vars(module).items() if hasattr(kernel, "all_configs")]


def bn_act_workload():
    for layout in ("channels_last", "nchw"):
        for shape in ((3, 70, 9, 11), (2, 300, 5, 5)):
            x, scale, shift = inputs(shape, torch.float16, layout, requires_grad=True)
            y = run_backend("triton", fastconv.bn_act, x, scale, shift, "hardswish")
            grads = run_backend("triton", torch.autograd.grad, y.float().sum(), (x, scale, shift))
            x64, s64, b64 = (t.detach().double().requires_grad_() for t in (x, scale, shift))
            y64 = fastconv.reference.bn_act(x64, s64, b64, "hardswish")
            assert_matches_reference("y", y, y64, fastconv.reference.bn_act(x, scale, shift, "hardswish"))
            pixels = shape[0] * shape[2] * shape[3]
            for name, got, want in zip(("grad_x", "grad_scale", "grad_shift"), grads, torch.autograd.grad(y64.sum(), (x64, s64, b64))):
                assert_matches_reference(name, got, want, terms=1 if name == "grad_x" else pixels)


def depthwise_workload():
    # SiLU: a kinked activation's gradient in half precision flips at random elements (seen on
    # the CPU: grad_scale off by 3.5e-3 at 27.4 with ReLU6).
    for layout in ("channels_last", "nchw"):
        for shape, kernel, stride, multiplier in (((2, 72, 13, 11), 3, 2, 1), ((1, 40, 9, 9), 5, 1, 2)):
            x = random_tensor(shape, torch.float16, layout).requires_grad_()
            channels = shape[1] * multiplier
            weight = (torch.randn(channels, 1, kernel, kernel, device="cuda") / kernel).half().requires_grad_()
            scale = (torch.randn(channels, device="cuda") * 0.5 + 1).requires_grad_()
            shift = torch.randn(channels, device="cuda").requires_grad_()
            args = (stride, kernel // 2)
            y = run_backend("triton", fastconv.depthwise_conv2d, x, weight, None, *args, scale=scale, shift=shift, activation="silu")
            grads = run_backend("triton", torch.autograd.grad, y.float().sum(), (x, weight, scale, shift))
            wide = [t.detach().double().requires_grad_() for t in (x, weight, scale, shift)]
            y64 = fastconv.reference.depthwise_conv2d(
                wide[0], wide[1], None, (stride, stride), (kernel // 2,) * 4, (1, 1), wide[2], wide[3], "silu"
            )
            assert_matches_reference("y", y, y64, fastconv.reference.depthwise_conv2d(
                x, weight, None, (stride, stride), (kernel // 2,) * 4, (1, 1), scale, shift, "silu"))
            pixels = y.shape[0] * y.shape[2] * y.shape[3]
            # The yardstick: the same in float16 on the torch backend (c is rounded to float16
            # on both sides before the parameter gradients sum over the pixels).
            lowp = run_backend("torch", torch.autograd.grad, run_backend(
                "torch", fastconv.depthwise_conv2d, x, weight, None, *args, scale=scale, shift=shift, activation="silu"
            ).float().sum(), (x, weight, scale, shift))
            names = ("grad_x", "grad_weight", "grad_scale", "grad_shift")
            for name, got, want, plain in zip(names, grads, torch.autograd.grad(y64.sum(), wide), lowp):
                assert_matches_reference(name, got, want, plain, terms=kernel * kernel * multiplier if name == "grad_x" else pixels)


def _check_batch_stats(x, weight, stride, padding, groups):
    """conv2d_batch_stats on triton: c against the float64 conv, its statistics against c's own."""
    c, mean, var = run_backend("triton", torch.ops.fastconv.conv2d_batch_stats, x, weight, None, stride, padding, (1, 1), groups)
    expected = fastconv.reference.conv2d(x.double(), weight.double(), None, stride, padding, (1, 1), groups)
    lowp = fastconv.reference.conv2d(x, weight, None, stride, padding, (1, 1), groups)
    assert_matches_reference("c", c, expected, lowp, terms=weight[0].numel())
    expected_var, expected_mean = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-4, atol=1e-5)


def depthwise_stats_workload():
    depthwise_workload()
    for layout in ("channels_last", "nchw"):
        x = random_tensor((2, 72, 13, 11), torch.float16, layout)
        _check_batch_stats(x, (torch.randn(72, 1, 3, 3, device="cuda") / 3).half(), (2, 2), (1, 1, 1, 1), 72)


def pointwise_workload():
    for layout in ("channels_last", "nchw", "channel_slice"):
        x = random_tensor((2, 40, 9, 7), torch.float16, layout).requires_grad_()
        weight = (torch.randn(24, 40, 1, 1, device="cuda") / 6).half().requires_grad_()
        scale, shift = (torch.randn(24, device="cuda") * 0.5 + 1).requires_grad_(), torch.randn(24, device="cuda").requires_grad_()
        in_scale, in_shift = (torch.rand(40, device="cuda") + 0.5).requires_grad_(), torch.randn(40, device="cuda").requires_grad_()
        tensors = (x, weight, scale, shift, in_scale, in_shift)

        def call(x, weight, scale, shift, in_scale, in_shift):
            return fastconv.pointwise_conv2d(
                x, weight, scale=scale, shift=shift, activation="silu", in_scale=in_scale, in_shift=in_shift, in_activation="silu"
            )

        y = run_backend("triton", call, *tensors)
        grads = run_backend("triton", torch.autograd.grad, y.float().sum(), tensors)
        wide = [t.detach().double().requires_grad_() for t in tensors]
        with fastconv.use_backend("torch"):
            y64, lowp = call(*wide), call(*tensors)
            lowp_grads = torch.autograd.grad(lowp.float().sum(), tensors)
        assert_matches_reference("y", y, y64, lowp, terms=40)
        names = ("x", "weight", "scale", "shift", "in_scale", "in_shift")
        for name, got, want, plain in zip(names, grads, torch.autograd.grad(y64.sum(), wide), lowp_grads):
            assert_matches_reference(f"grad_{name}", got, want, plain, terms=24 if name == "x" else 2 * 9 * 7)
        _check_batch_stats(x.detach(), weight.detach(), (1, 1), (0, 0, 0, 0), 1)


def conv_gemm_workload():
    # The tap path (32 channels per group, 3x3 stride 2, groups 2) and the flattened-K path
    # (the 3-channel stem), forward with the epilogue and backward, then the statistics.
    for layout in ("channels_last", "nchw"):
        for shape, c_out, kernel, groups in (((2, 64, 13, 11), 48, 3, 2), ((2, 3, 17, 15), 16, 3, 1)):
            x = random_tensor(shape, torch.float16, layout).requires_grad_()
            weight = (torch.randn(c_out, shape[1] // groups, kernel, kernel, device="cuda") / 6).half().requires_grad_()
            scale, shift = (torch.randn(c_out, device="cuda") * 0.5 + 1).requires_grad_(), torch.randn(c_out, device="cuda").requires_grad_()
            tensors = (x, weight, scale, shift)

            def call(x, weight, scale, shift):
                return fastconv.conv2d_bn_act(x, weight, None, 2, 1, 1, groups, scale=scale, shift=shift, activation="silu")

            y = run_backend("triton", call, *tensors)
            grads = run_backend("triton", torch.autograd.grad, y.float().sum(), tensors)
            wide = [t.detach().double().requires_grad_() for t in tensors]
            with fastconv.use_backend("torch"):
                y64, lowp = call(*wide), call(*tensors)
                lowp_grads = torch.autograd.grad(lowp.float().sum(), tensors)
            assert_matches_reference("y", y, y64, lowp, terms=weight[0].numel())
            pixels = y.shape[0] * y.shape[2] * y.shape[3]
            names = ("x", "weight", "scale", "shift")
            for name, got, want, plain in zip(names, grads, torch.autograd.grad(y64.sum(), wide), lowp_grads):
                assert_matches_reference(f"grad_{name}", got, want, plain, terms=c_out * 9 if name == "x" else pixels)
            _check_batch_stats(x.detach(), weight.detach(), (2, 2), (1, 1, 1, 1), groups)


def batch_norm_workload():
    for layout in ("channels_last", "nchw"):
        c = random_tensor((3, 40, 9, 7), torch.float16, layout).add_(10)
        grad_y = random_tensor((3, 40, 9, 7), torch.float16, layout)
        mean, var = run_backend("triton", torch.ops.fastconv.batch_norm_stats, c)
        expected_var, expected_mean = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
        torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(var.double(), expected_var, rtol=1e-4, atol=1e-5)
        invstd = torch.rsqrt(var + 1e-5)
        weight, bias = torch.rand(40, device="cuda") + 0.5, torch.randn(40, device="cuda")
        grads = run_backend("triton", torch.ops.fastconv.batch_norm_act_backward, grad_y, c, mean, invstd, weight, bias, "silu")
        exact = fastconv.reference.batch_norm_act_backward(*(t.double() for t in (grad_y, c, mean, invstd, weight, bias)), "silu")
        lowp = fastconv.reference.batch_norm_act_backward(grad_y, c, mean, invstd, weight, bias, "silu")
        for name, got, want, plain in zip(("grad_c", "grad_weight", "grad_bias"), grads, exact, lowp):
            assert_matches_reference(name, got, want, plain if name == "grad_c" else None, terms=3 * 9 * 7)


WORKLOADS = {
    "bn_act": bn_act_workload, "depthwise": depthwise_stats_workload, "pointwise": pointwise_workload,
    "conv_gemm": conv_gemm_workload, "batch_norm": batch_norm_workload,
}


@pytest.mark.slow  # every config is a compile: minutes; gpu_check.sh leaves it out
@pytest.mark.skipif("triton" not in [p.values[0] for p in GPU_BACKENDS], reason="needs the triton backend")
@pytest.mark.parametrize("module_name", list(WORKLOADS))
def test_every_triton_config(module_name, monkeypatch):
    """The suite runs one config per kernel (FASTCONV_TRITON_AUTOTUNE=0); the autotuner may pick
    any of them on a GPU, so each must be right: force them one at a time."""
    for name, kernel in triton_kernels_of(module_name):
        for config in kernel.all_configs:
            monkeypatch.setattr(kernel, "configs", [config])
            kernel.cache.clear()
            try:
                WORKLOADS[module_name]()
            except AssertionError as error:
                raise AssertionError(f"{module_name}.{name} with {config}: {error}") from error
        monkeypatch.undo()
        kernel.cache.clear()


def depthwise_inputs(shape, kernel, layout, multiplier=1, requires_grad=False):
    x = random_tensor(shape, torch.float16, layout).requires_grad_(requires_grad)
    channels = shape[1] * multiplier
    weight = (torch.randn(channels, 1, kernel, kernel, device="cuda") / kernel).half().requires_grad_(requires_grad)
    bias = torch.randn(channels, device="cuda").half().requires_grad_(requires_grad)
    return x, weight, bias


@pytest.mark.parametrize("case", [(3, 1, 1), (3, 2, 1), (5, 1, 2), (7, 2, 1), (4, 1, 1)], ids=lambda c: f"k{c[0]}s{c[1]}m{c[2]}")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_depthwise_sanitizer_subset(backend, layout, case):
    """Small depthwise forward and backward calls on every layout, for memcheck and racecheck."""
    kernel, stride, multiplier = case
    x, weight, bias = depthwise_inputs((2, 24, 11, 9), kernel, layout, multiplier, requires_grad=True)
    padding = kernel // 2
    y = run_backend(backend, fastconv.depthwise_conv2d, x, weight, bias, stride, padding, activation="silu")
    grads = run_backend(backend, torch.autograd.grad, y.float().sum(), (x, weight, bias))
    torch.cuda.synchronize()
    wide = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    geometry = ((stride, stride), (padding,) * 4, (1, 1))
    y64 = fastconv.reference.depthwise_conv2d(*wide, *geometry, None, None, "silu")
    assert_matches_reference("y", y, y64, fastconv.reference.depthwise_conv2d(x, weight, bias, *geometry, None, None, "silu"))
    pixels = y.shape[0] * y.shape[2] * y.shape[3]
    for name, got, want in zip(("grad_x", "grad_weight", "grad_bias"), grads, torch.autograd.grad(y64.sum(), wide)):
        assert_matches_reference(name, got, want, terms=kernel * kernel * multiplier if name == "grad_x" else pixels)


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_depthwise_weight_gradient_is_bitwise_deterministic(backend, layout):
    x, weight, _ = depthwise_inputs((32, 96, 28, 28), 3, layout)
    grad_c = random_tensor((32, 96, 28, 28), torch.float16, layout)
    args = (grad_c, x, weight, (1, 1), (1, 1, 1, 1), (1, 1))
    first = run_backend(backend, torch.ops.fastconv.depthwise_conv2d_backward_weight, *args)
    for _ in range(3):
        again = run_backend(backend, torch.ops.fastconv.depthwise_conv2d_backward_weight, *args)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS + ["auto"])
def test_depthwise_cuda_graph_capture_and_replay(backend):
    x, weight, bias = depthwise_inputs((8, 32, 14, 14), 3, "channels_last")
    with fastconv.use_backend(backend):
        fastconv.depthwise_conv2d(x, weight, bias, 1, 1, activation="relu6")
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = fastconv.depthwise_conv2d(x, weight, bias, 1, 1, activation="relu6")
    x.copy_(torch.randn_like(x))
    graph.replay()
    expected = fastconv.reference.depthwise_conv2d(x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), None, None, "relu6")
    torch.testing.assert_close(y, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_depthwise_past_two_to_the_31_elements(backend):
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip(f"needs 40 GiB of free device memory; {free / 2**30:.1f} GiB free")
    x, weight, bias = depthwise_inputs((2, 32, 5800, 5800), 3, "channels_last")
    y = run_backend(backend, fastconv.depthwise_conv2d, x, weight, bias, 1, 1)
    # Output rows 5790..5798 of the last image read input rows 5789..5799: a valid conv there.
    expected = torch.nn.functional.conv2d(x[1:, :, 5789:].float(), weight.float(), bias.float(), 1, (0, 1), groups=32)
    torch.testing.assert_close(y[1:, :, 5790:5799].float(), expected, atol=2e-2, rtol=2e-2)


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
# fastconv_cuda::conv_forward) ----------------------------------------------------------------

needs_cuda_ops = pytest.mark.skipif(
    not fastconv.backends.available()["cuda"].available, reason="the cuda backend (extension) is unavailable"
)
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


@needs_cuda_ops
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


@needs_cuda_ops
@pytest.mark.parametrize("c_in", (16, 13), ids=("vec", "scalar"))
def test_pointwise_cuda_sanitizer_tiny(c_in):
    out, expected64, lowp = _pointwise_case((1, c_in, 3, 5), 10, torch.float16, "channel_slice", prologue=True, residual=True)
    assert_matches_reference("out", out, expected64, lowp, terms=c_in)


@needs_cuda_ops
def test_pointwise_cuda_tf32_only_when_allowed():
    x, weight = torch.randn(1, 8, 4, 4, device="cuda"), torch.randn(8, 8, device="cuda")
    out = torch.empty(1, 8, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="float16 or bfloat16 when allow_tf32 is false"):
        torch.ops.fastconv_cuda.pointwise_forward(x, weight, None, None, None, 0, None, False, None, None, 0, False, out)
    torch.ops.fastconv_cuda.pointwise_forward(x, weight, None, None, None, 0, None, False, None, None, 0, True, out)
    torch.testing.assert_close(out, torch.einsum("nkhw,jk->njhw", x, weight), atol=2e-2, rtol=2e-2)


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
    out, mean, var = torch.ops.fastconv_cuda.conv_forward(
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


@needs_cuda_ops
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


@needs_cuda_ops
def test_conv_forward_cuda_statistics_are_deterministic_and_nan_when_empty():
    x, weight, bias, scale, shift, out, mean, var = _conv_case((8, 32, 30, 30), 48, (3, 3), padding=(1, 1, 1, 1))
    for _ in range(3):
        again = torch.ops.fastconv_cuda.conv_forward(x, weight, bias, [1, 1], [1, 1, 1, 1], [1, 1], 1, scale, shift, 1, True, False)
        assert torch.equal(again[0], out) and torch.equal(again[1], mean) and torch.equal(again[2], var)
    empty = torch.empty(0, 32, 30, 30, device="cuda", dtype=torch.float16)
    out, mean, var = torch.ops.fastconv_cuda.conv_forward(empty, weight, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, None, None, 0, True, False)
    assert out.shape == (0, 48, 30, 30) and mean.isnan().all() and var.isnan().all()


@needs_cuda_ops
@pytest.mark.parametrize("layout, groups", [("channels_last", 1), ("nchw", 2)], ids=["vec", "scalar-groups"])
def test_conv_forward_cuda_sanitizer_tiny(layout, groups):
    _conv_case((1, 8, 6, 5), 6, (3, 3), stride=(1, 2), padding=(1, 0, 1, 2), groups=groups, layout=layout)


@needs_cuda_ops
def test_conv_forward_cuda_tf32():
    x = torch.randn(2, 8, 9, 9, device="cuda")
    weight = torch.randn(16, 8, 3, 3, device="cuda") / 8
    out, _, _ = torch.ops.fastconv_cuda.conv_forward(x, weight, None, [1, 1], [1] * 4, [1, 1], 1, None, None, 0, False, True)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, weight, padding=1), atol=1e-2, rtol=1e-2)


@needs_cuda_ops
@pytest.mark.parametrize("dtype, tf32", [(torch.float16, False), (torch.bfloat16, False), (torch.float32, True)], ids=["fp16", "bf16", "tf32"])
def test_conv_forward_cuda_statistics_when_mean_dominates(dtype, tf32):
    """|mean| >> std: per-chunk means refined by their deviations keep the variance accurate."""
    x = random_tensor((4, 16, 20, 20), dtype, "channels_last")
    weight = (torch.randn(24, 16, 3, 3, device="cuda") / 12).to(dtype)
    bias = torch.full((24,), 1000.0 if dtype == torch.float32 else 50.0, device="cuda").to(dtype)
    out, mean, var = torch.ops.fastconv_cuda.conv_forward(x, weight, bias, [1, 1], [1] * 4, [1, 1], 1, None, None, 0, True, tf32)
    want_var, want_mean = torch.var_mean(out.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-4, atol=1e-5)
