"""The conv ops on tensors past 2**31 elements: offsets there need 64-bit index arithmetic
(the Triton kernels' INDEX_64 specialisations, the CUDA kernels' int64 pixel offsets).

Each test runs one op forward and backward on a (2, 64, 4096, 4100) float16 channels_last x,
2^31 + 2.1M elements (4.3 GB), and checks the far end of the results, the last rows of the second
image, whose offsets are the largest, against the same op run by PyTorch on just those rows
(with their halo). bn_act's own test is in test_bn_act_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastconv
from harness import ON_GPU, assert_matches_reference, backends_under_test, random_tensor, run_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")]

GPU_BACKENDS = [p for p in backends_under_test() if p.values[0] != "torch"]
SHAPE = (2, 64, 4096, 4100)
assert SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3] > 2**31
TAIL_ROWS = 6  # output rows checked at the bottom of the second image


@pytest.fixture
def large_x():
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip(f"needs 40 GiB of free device memory (x, y and their gradients); {free / 2**30:.1f} GiB free")
    x = random_tensor(SHAPE, torch.float16, "channels_last").requires_grad_(True)
    yield x
    del x
    torch.cuda.empty_cache()


def check_tail(name, got, x, grad_y, weight, groups, padding, residual=None):
    """got = (y, grad_x) of a stride-1 conv with `padding` rows and columns of zeros (plus
    `residual`); checked on the last TAIL_ROWS rows of image 1 against F.conv2d on those rows
    and their halo, in float64 (and in float16, PyTorch's own error, for the yardstick)."""
    y, grad_x = got
    H = x.shape[2]
    first = H - TAIL_ROWS  # the first output row checked
    # Output rows first..H-1 read input rows first-padding..H-1 and `padding` rows of zeros below.
    rows = x.detach()[1:2, :, first - padding :]
    want = {}
    for dtype in (torch.float64, torch.float16):
        sub = rows.to(dtype).requires_grad_(True)
        y_sub = F.conv2d(F.pad(sub, (padding, padding, 0, padding)), weight.detach().to(dtype), groups=groups)
        (grad_sub,) = torch.autograd.grad(y_sub, sub, grad_y[1:2, :, first:].to(dtype))
        # Input rows within `padding` of the top of the window also feed output rows above it.
        if residual is not None:
            y_sub = y_sub + residual[1:2, :, first:].to(dtype)
        want[dtype] = (y_sub.detach(), grad_sub[:, :, 2 * padding :])
    assert_matches_reference(f"{name} y", y[1:2, :, first:], want[torch.float64][0], want[torch.float16][0],
                             terms=weight[0].numel())  # fmt: skip
    assert_matches_reference(f"{name} grad_x", grad_x[1:2, :, first + padding :], want[torch.float64][1],
                             want[torch.float16][1], terms=weight.shape[0] * weight.shape[2] * weight.shape[3])  # fmt: skip


def run_op(backend, op, x, weight):
    y = run_backend(backend, op, x, weight)
    grad_y = torch.randn_like(y)
    (grad_x,) = run_backend(backend, torch.autograd.grad, y, x, grad_y)
    torch.cuda.synchronize()
    return (y, grad_x), grad_y


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_depthwise_past_two_to_the_31_elements(backend, large_x):
    weight = (torch.randn(64, 1, 3, 3, device="cuda") / 3).half()
    got, grad_y = run_op(backend, lambda x, w: fastconv.depthwise_conv2d(x, w, padding=1), large_x, weight)
    check_tail("depthwise", got, large_x, grad_y, weight, groups=64, padding=1)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_pointwise_past_two_to_the_31_elements(backend, large_x):
    weight = (torch.randn(64, 64, 1, 1, device="cuda") / 8).half()
    got, grad_y = run_op(backend, lambda x, w: fastconv.pointwise_conv2d(x, w), large_x, weight)
    check_tail("pointwise", got, large_x, grad_y, weight, groups=1, padding=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_implicit_gemm_past_two_to_the_31_elements(backend, large_x):
    """The 3x3 implicit GEMM, with ResNet's residual epilogue reading a tensor as large."""
    weight = (torch.randn(64, 64, 3, 3, device="cuda") / 24).half()
    residual = torch.randn_like(large_x.detach())

    def conv(x, w):
        return fastconv.conv2d_bn_act(x, w, None, 1, 1, residual=residual)

    got, grad_y = run_op(backend, conv, large_x, weight)
    check_tail("implicit GEMM", got, large_x, grad_y, weight, groups=1, padding=1, residual=residual)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_batch_statistics_past_two_to_the_31_elements(backend, large_x):
    """The training BatchNorm's statistics and backward over 2^31 elements: the reductions'
    partials and the elementwise pass's offsets."""
    c = large_x.detach()
    mean, var = run_backend(backend, torch.ops.fastconv.batch_norm_stats, c)
    want_var, want_mean = torch.var_mean(c.float(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, want_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var, want_var, rtol=1e-4, atol=1e-4)
    invstd = torch.rsqrt(var + 1e-5)
    grad_y = torch.randn_like(c)
    grad_c, _, grad_bias = run_backend(backend, torch.ops.fastconv.batch_norm_act_backward, grad_y, c, mean, invstd,
                                       None, None, None)  # fmt: skip
    torch.testing.assert_close(grad_bias, grad_y.float().sum((0, 2, 3)), rtol=1e-3, atol=1e-1)
    view = (1, -1, 1, 1)

    def xhat(c):
        return (c.float() - mean.view(view)) * invstd.view(view)

    # The per-channel means of g * xhat and g, an image at a time (float32 copies of one image).
    pixels = c.shape[0] * c.shape[2] * c.shape[3]
    mean_gx = sum((grad_y[i : i + 1].float() * xhat(c[i : i + 1])).sum((0, 2, 3)) for i in range(c.shape[0])) / pixels
    mean_g = grad_bias / pixels
    tail = (slice(1, 2), slice(None), slice(-TAIL_ROWS, None))
    want = invstd.view(view) * (grad_y[tail].float() - mean_g.view(view) - xhat(c[tail]) * mean_gx.view(view))
    torch.testing.assert_close(grad_c[tail].float(), want, rtol=2e-2, atol=2e-2)
