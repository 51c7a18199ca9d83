"""The dense-block ops on a GPU, at DenseNet121's channel counts (64 input features, growth 32,
bottleneck 128) on a small odd map: both GPU backends, float16 and bfloat16 (bfloat16 tl.dot
is wrong in the CPU interpreter, so this is its only test), train and eval, forward and
backward, against float64 with the 2x-PyTorch rule.

Named "sanitizer" so that gpu_check.sh's smoke step runs it first, and its cuda share under
compute-sanitizer memcheck and racecheck.
"""

from __future__ import annotations

import pytest
import torch

from harness import ON_GPU, assert_matches_reference
from test_bn_act_pool import run_training, train_inputs, training_reference
from test_dense_block import check_block

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_dense_block_sanitizer_subset(backend, dtype, train):
    check_block(backend, dtype, train, n=2, c0=64, layers=3, growth=32, bn_size=4, h=9, w=7)


@pytest.mark.parametrize("layout", ["channels_last", "channel_slice", "nchw"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_transition_bn_act_pool_sanitizer_subset(backend, dtype, layout):
    """The transition's one-pass BatchNorm + ReLU + 2x2 pool at DenseNet121's first transition
    width on an odd map, against float64 with the 2x-PyTorch rule."""
    import torch.nn.functional as F

    import fastconv
    from harness import random_tensor

    x = random_tensor((4, 256, 15, 13), dtype, layout)
    scale, shift = torch.rand(256, device="cuda") + 0.5, torch.randn(256, device="cuda")
    with fastconv.use_backend(backend):
        y = fastconv.bn_act_avg_pool(x, scale, shift, "relu")
    want = F.avg_pool2d(F.relu(x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)), 2)
    yard = F.avg_pool2d(F.relu(x * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1)), 2)
    assert_matches_reference("y", y, want, yard, terms=4)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_transition_training_pool_sanitizer_subset(backend, dtype):
    """The training transition's one-pass BatchNorm (batch statistics) + ReLU + pool, forward and
    backward, at DenseNet121's first transition width on an odd map, against float64 training
    BatchNorm with the 2x-PyTorch rule."""
    c, weight, bias = train_inputs((4, 256, 15, 13), dtype, "channels_last")
    y, grads, grad_y, leaves = run_training(backend, c, weight, bias, "silu")
    torch.cuda.synchronize()
    wide = [t.detach().double().requires_grad_(True) for t in leaves]
    y64 = training_reference(*wide, "silu")
    half = [t.detach().requires_grad_(True) for t in leaves]
    yardstick = training_reference(*half, "silu")
    assert_matches_reference("y", y, y64, yardstick, terms=4)
    for name, got, want, plain in zip(("c", "weight", "bias"), grads, torch.autograd.grad(y64, wide, grad_y.double()),
                                      torch.autograd.grad(yardstick, half, grad_y)):  # fmt: skip
        assert_matches_reference(f"grad_{name}", got, want, plain, terms=4 * 15 * 13)
