"""bn_act on a GPU: what only a GPU can show: determinism, CUDA graphs, 64-bit indexing, autocast.

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
