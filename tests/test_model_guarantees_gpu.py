"""Whole-model guarantees on a GPU: an optimised MobileNetV2 (fused blocks, their fused training
op) and a DenseBlock under torch.cuda.make_graphed_callables and torch.compile(mode=
"reduce-overhead"), on a side stream, and every conv op on inputs whose data pointer is not
16-byte aligned. Each matches the same computation run plainly; written for the first GPU run.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

import fastconv
from harness import ON_GPU

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")]


def _models():
    torch.manual_seed(0)
    mobilenet = fastconv.optimize(torchvision.models.mobilenet_v2(num_classes=10).features[:6]).cuda()
    return {"mobilenet_v2 blocks": (mobilenet, 3), "dense block": (fastconv.nn.DenseBlock(2, 16, 2, 8).cuda(), 16)}


def _step(module, x, grad_y):
    y = module(x)
    grads = torch.autograd.grad(y, [x, *module.parameters()], grad_y)
    return y, grads


@pytest.mark.parametrize("name", ["mobilenet_v2 blocks", "dense block"])
def test_make_graphed_callables_trains_like_eager(name):
    """Training captured with make_graphed_callables: the fastconv ops' first-call timing happens
    in the warm-up outside capture, and the replays' outputs and gradients equal eager's."""
    module, channels = _models()[name]
    module.train()
    eager = copy.deepcopy(module)
    x = torch.randn(4, channels, 32, 32, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(module, (x,))
    for _ in range(3):
        x = torch.randn(4, channels, 32, 32, device="cuda", requires_grad=True)
        y = graphed(x)
        grad_y = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x, *module.parameters()], grad_y)
        want, want_grads = _step(eager, x.detach().requires_grad_(), grad_y)
        torch.testing.assert_close(y, want, rtol=1e-3, atol=1e-3)
        for got, expected in zip(grads, want_grads):
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["mobilenet_v2 blocks", "dense block"])
def test_reduce_overhead_compile_in_eval(name):
    module, channels = _models()[name]
    module.eval()
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(4, channels, 32, 32, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            y = compiled(x)
        torch.testing.assert_close(y, module(x), rtol=1e-3, atol=1e-3)


def test_side_stream_matches_the_default_stream():
    """Kernels launch on the current stream: a training step on a side stream gives what the
    default stream gives, after the side stream is waited for."""
    module, channels = _models()["mobilenet_v2 blocks"]
    twin = copy.deepcopy(module)
    x = torch.randn(4, channels, 32, 32, device="cuda", requires_grad=True)
    grad_y = torch.randn_like(module(x))
    want, want_grads = _step(twin, x, grad_y)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y, grads = _step(module, x, grad_y)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y, want)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected)


def _misaligned(shape, dtype=torch.float16):
    """A tensor whose data pointer is one element past a 16-byte boundary (a slice at an odd
    element offset), channels_last."""
    n, c, h, w = shape
    flat = torch.randn(n * c * h * w + 1, device="cuda", dtype=dtype)
    t = flat[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    assert t.data_ptr() % 16 != 0 and t.is_contiguous(memory_format=torch.channels_last)
    return t


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_misaligned_data_pointers_take_a_correct_path(backend):
    x = _misaligned((2, 16, 9, 11))
    scale, shift = torch.rand(16, device="cuda") + 0.5, torch.randn(16, device="cuda")
    dw, pw = torch.randn(16, 1, 3, 3, device="cuda", dtype=x.dtype), torch.randn(24, 16, 1, 1, device="cuda", dtype=x.dtype)
    conv = torch.randn(24, 16, 3, 3, device="cuda", dtype=x.dtype) / 12
    x64 = x.double()
    checks = {
        "bn_act": (lambda: fastconv.bn_act(x, scale, shift, "relu6"),
                   F.relu6(x64 * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))),
        "depthwise": (lambda: fastconv.depthwise_conv2d(x, dw, padding=1), F.conv2d(x64, dw.double(), None, 1, 1, 1, 16)),
        "pointwise": (lambda: fastconv.pointwise_conv2d(x, pw), F.conv2d(x64, pw.double())),
        "conv2d_bn_act": (lambda: fastconv.conv2d_bn_act(x, conv, padding=1, activation="relu"),
                          F.relu(F.conv2d(x64, conv.double(), None, 1, 1))),
    }  # fmt: skip
    with fastconv.use_backend(backend):
        for name, (run, want) in checks.items():
            got = run()
            tolerance = 4e-3 * max(1.0, want.abs().max().item())
            assert (got.double() - want).abs().max().item() <= tolerance, name
