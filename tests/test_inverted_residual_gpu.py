"""The fused inverted residual on a GPU: every distinct MobileNetV2 block shape at a small
batch, in float16 and bfloat16 (bfloat16 tl.dot is wrong in the CPU interpreter, so this is
its only test), against float64 with the 2x-PyTorch rule; and the autotuned configs.

Named "sanitizer" so that gpu_check.sh's smoke step runs it first.
"""

from __future__ import annotations

import pytest
import torch

from harness import ON_GPU
from test_inverted_residual import check, make

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")]

# (C_in, C_hidden, C_out, H=W, stride, use_residual): torchvision mobilenet_v2's distinct blocks
# at 224x224 input, spatial size divided by 8 (odd sizes kept odd) to stay small.
MOBILENET_V2_BLOCKS = [
    (32, 32, 16, 15, 1, False),
    (16, 96, 24, 15, 2, False),
    (24, 144, 24, 7, 1, True),
    (24, 144, 32, 7, 2, False),
    (32, 192, 32, 5, 1, True),
    (32, 192, 64, 5, 2, False),
    (64, 384, 64, 3, 1, True),
    (64, 384, 96, 3, 1, False),
    (96, 576, 96, 3, 1, True),
    (96, 576, 160, 3, 2, False),
    (160, 960, 160, 3, 1, True),
    (160, 960, 320, 3, 1, False),
]


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("block", MOBILENET_V2_BLOCKS, ids=lambda b: f"{b[0]}-{b[1]}-{b[2]}-s{b[4]}")
@pytest.mark.parametrize("backend", ["cuda:cuda_cores", "cuda:tensor_cores", "triton:gather", "triton:tiled"])
def test_inverted_residual_sanitizer_subset(backend, block, dtype):
    c_in, c_hid, c_out, hw, stride, use_residual = block
    if backend == "triton:tiled" and c_hid == c_in:
        pytest.skip("no expansion: the gather kernel serves it whatever is forced")
    t = make(c_in, c_hid, c_out, hw, n=2, dtype=dtype, expand=c_hid != c_in)
    check(backend, t, lowp=True, stride=stride, use_residual=use_residual)


@pytest.mark.parametrize("layout", ["nchw", "channel_slice"])
@pytest.mark.parametrize("kernel", ["cuda_cores", "tensor_cores"])
def test_inverted_residual_cuda_any_layout_and_odd_tiles_sanitizer_subset(kernel, layout):
    """The CUDA kernels read x through its strides and mask their 4x4 (8x8) tiles at odd edges."""
    t = make(24, 144, 24, 9, n=3, dtype=torch.float16, expand=True, layout=layout)
    check(f"cuda:{kernel}", t, lowp=True, stride=1, use_residual=True)
    t = make(16, 96, 24, 11, n=1, dtype=torch.float16, expand=True, layout=layout)
    check(f"cuda:{kernel}", t, lowp=True, stride=2, use_residual=False)
    t = make(24, 144, 400, 13, n=2, dtype=torch.bfloat16, expand=True, layout=layout)  # two groups of outputs
    check(f"cuda:{kernel}", t, lowp=True, stride=1, use_residual=False)


# MobileNetV1's widest depthwise-separable blocks (C_in, C_out, H=W, stride), small images: more
# output channels than one CTA's group of 384 (the CUDA kernel's blockIdx.y), and windows of
# 512 and 1024 half-precision channels in shared memory.
MOBILENET_V1_WIDE_BLOCKS = [(256, 512, 7, 2), (512, 512, 5, 1), (512, 1024, 7, 2), (1024, 1024, 3, 1)]


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("block", MOBILENET_V1_WIDE_BLOCKS, ids=lambda b: f"{b[0]}-{b[1]}-s{b[3]}")
@pytest.mark.parametrize("backend", ["cuda:cuda_cores", "cuda:tensor_cores", "triton"])
def test_mobilenet_v1_wide_blocks_sanitizer_subset(backend, block, dtype):
    c_in, c_out, hw, stride = block
    t = make(c_in, 0, c_out, hw, n=2, dtype=dtype, expand=False)
    check(backend, t, lowp=True, stride=stride, activation="relu", pw_activation="relu")


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("block", [MOBILENET_V2_BLOCKS[i] for i in (0, 2, 3, 10)], ids=lambda b: f"{b[0]}-{b[1]}-{b[2]}-s{b[4]}")
def test_inverted_residual_training_sanitizer_subset(block, dtype):
    """The fused training op (statistics pass, fused kernel, recomputing backward) in half
    precision: output and input gradient within twice torchvision's own error against float64
    (SiLU: no kink for a rounding to land on)."""
    import copy

    from torch import nn
    from torchvision.models.mobilenetv2 import InvertedResidual as TorchvisionBlock

    import fastconv
    from harness import assert_matches_reference, random_tensor
    from test_inverted_residual_module import randomise_batch_norms

    c_in, c_hid, c_out, hw, stride, _ = block
    reference = TorchvisionBlock(c_in, c_out, stride, c_hid // c_in, norm_layer=nn.BatchNorm2d)
    for unit in reference.conv[:-2]:
        unit[2] = nn.SiLU()
    reference = randomise_batch_norms(reference).cuda().train()
    fused = fastconv.nn.InvertedResidual.from_torchvision(copy.deepcopy(reference)).to(dtype)
    x = random_tensor((4, c_in, hw, hw), dtype, "channels_last").requires_grad_()

    def run(module, inputs, backend="auto"):
        with fastconv.use_backend(backend):
            y = module(inputs)
            return y, torch.autograd.grad(y, inputs, grad_y.to(y.dtype))[0]

    grad_y = random_tensor((4, c_out, (hw - 1) // stride + 1, (hw - 1) // stride + 1), torch.float32, "channels_last")
    y, grad_x = run(fused, x, "triton")
    want, want_x = run(copy.deepcopy(reference).double(), x.detach().double().requires_grad_())
    yard, yard_x = run(copy.deepcopy(reference).to(dtype), x.detach().clone().requires_grad_())
    assert_matches_reference("y", y, want, yard, terms=c_hid)
    assert_matches_reference("grad x", grad_x, want_x, yard_x, terms=4 * hw * hw)
