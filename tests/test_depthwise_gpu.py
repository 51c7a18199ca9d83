"""depthwise_conv2d on a GPU: the sanitizer subset, determinism, CUDA graphs, 64-bit indexing.

`benchmarks/gpu_check.sh` also runs the tests with "sanitizer" in their name under
compute-sanitizer's memcheck and racecheck, so those are kept small.
"""

from __future__ import annotations

import pytest
import torch

import fastconv
from harness import ON_GPU, LAYOUTS, assert_matches_reference, backends_under_test, random_tensor, run_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")]

GPU_BACKENDS = [p for p in backends_under_test() if p.values[0] != "torch"]


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
