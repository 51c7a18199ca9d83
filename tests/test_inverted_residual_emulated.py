"""The fused block's two CUDA kernels in half precision, on the extension built for the CPU
(tests/cuda_emulation.py): fp16 and bf16 against float64 with the 2x-PyTorch rule, through the
op's whole cuda path (the Python folding, the C++ checks and launches, the kernels). The
Triton interpreter cannot run bf16 dots, and the CPU suite's other fused-block cases are
float32 (test_inverted_residual.py runs those on the emulated cuda backend too).

Every emulated CTA is 256 threads; the shapes keep the CTAs few (about a second a test).
"""

from __future__ import annotations

import pytest
import torch

from harness import EMULATED_CUDA, on_backend
from test_inverted_residual import call, check, make, ops

pytestmark = [pytest.mark.emulated, pytest.mark.skipif(not EMULATED_CUDA, reason="runs without a GPU only")]

KERNELS = ["cuda_cores", "tensor_cores"]

# (C_in, C_hid, C_out, H=W, stride, k, expand, use_residual): MobileNetV2-like blocks, edges that
# leave partial tiles, hidden widths that leave a partial chunk of 32, C_in not a multiple of
# the MMA's 16, and output widths that leave partial warps' columns.
CASES = {
    "expand-s1-residual-9": (24, 144, 24, 9, 1, 3, True, True),
    "expand-s2-11": (16, 96, 24, 11, 2, 3, True, False),
    "expand-s2-k5-9": (18, 50, 30, 9, 2, 5, True, False),
    "expand-ratio-1-7": (20, 20, 12, 7, 1, 3, True, False),
    "no-expand-s1-10": (40, 40, 72, 10, 1, 3, False, False),
    "no-expand-s2-13": (34, 34, 18, 13, 2, 3, False, False),
}


def run(kernel, t, **options):
    y = check(f"cuda:{kernel}", t, lowp=True, **options)
    assert ops.last_kernel("cuda") == kernel
    return y


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_block_kernels_match_float64(kernel, case, dtype):
    c_in, c_hid, c_out, hw, stride, k, expand, use_residual = CASES[case]
    t = make(c_in, c_hid, c_out, hw, n=2, k=k, dtype=dtype, expand=expand)
    run(kernel, t, stride=stride, use_residual=use_residual, pw_activation=None if expand else "relu")


@pytest.mark.parametrize("layout", ["nchw", "channel_slice"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_block_kernels_read_any_layout(kernel, layout):
    run(kernel, make(24, 64, 24, 9, n=1, dtype=torch.float16, layout=layout), stride=1, use_residual=True)


@pytest.mark.parametrize("variant, c_out", [(0, 400), (1, 200)], ids=["groups-of-384", "groups-of-128"])
def test_tensor_core_kernel_variants_over_groups_of_output_channels(variant, c_out, monkeypatch):
    """Each template variant (FASTCONV_EMULATION_VARIANT makes the first-call timing keep it),
    over output channels that take two groups of 384 (the second partial) or two of 128, each
    launch writing its slice of the output and its bias; then the separable block, whose
    residual tensor each launch offsets to its group too."""
    monkeypatch.setenv("FASTCONV_EMULATION_VARIANT", str(variant))
    run("tensor_cores", make(16, 32, c_out, 5, n=1, dtype=torch.bfloat16), stride=1)
    t = make(16, 0, c_out + 2, 6, n=1, dtype=torch.bfloat16, expand=False, residual_tensor=True)
    run("tensor_cores", t, stride=1, pw_activation="relu")


def test_cuda_core_kernel_groups_of_output_channels():
    """400 output channels on the CUDA cores: a group of 384 and a partial one of 16, with and
    without the separable block's residual tensor."""
    run("cuda_cores", make(16, 32, 400, 5, n=1, dtype=torch.float16), stride=1)
    t = make(16, 0, 400, 5, n=1, dtype=torch.float16, expand=False, residual_tensor=True)
    run("cuda_cores", t, stride=1, pw_activation="relu")


def test_cuda_core_kernel_odd_channels():
    run("cuda_cores", make(17, 41, 23, 13, n=1, dtype=torch.float16), stride=2)


def test_tensor_core_kernel_refuses_what_it_cannot_take():
    """Forced onto a block it cannot take (odd C_in), the tensor-core kernel is refused, saying
    why, before anything launches."""
    with on_backend("cuda:tensor_cores"), pytest.raises(RuntimeError, match=(
        r"FASTCONV_CUDA_FUSED_BLOCK_KERNEL=tensor_cores: its tensor-core kernel: it needs even C_in and C_hid "
        r".* got C_in 17, C_hid 40"
    )):  # fmt: skip
        call(make(17, 40, 24, 7, dtype=torch.float16))


@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_block_kernels_activations_and_residual_tensor(kernel):
    """SiLU and hardswish (no kink for rounding to land on) and a residual tensor after the
    projection's activation, as the depthwise-separable block takes them."""
    t = make(32, 32, 40, 8, n=2, dtype=torch.float16, expand=False, residual_tensor=True)
    run(kernel, t, stride=1, activation="silu", pw_activation="hardswish")
