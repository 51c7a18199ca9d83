"""The fused block's two CUDA kernels, run on the CPU in emulation (tests/cuda_emulation.py):
their source as the GPU compiles it, reached through the cuda backend's Python side, against
float64 with the 2x-PyTorch rule, in fp16 and bf16 (which the Triton interpreter cannot test)
and, on the CUDA cores, float32.

Every emulated CTA is 256 threads; the shapes keep the CTAs few (under a second a test).
"""

from __future__ import annotations

import pytest
import torch

import cuda_emulation
from fastconv._geometry import empty_output, normalise_geometry
from harness import assert_matches_reference, poisoned_allocations
from test_inverted_residual import chain, make, ops

pytestmark = pytest.mark.skipif(cuda_emulation.compiler() is None, reason="needs a C++20 host compiler (g++)")


def run_emulated(t, monkeypatch, kernel, *, stride=1, activation="relu6", pw_activation=None, use_residual=False,
                 variant=0):  # fmt: skip
    """The block through fastconv.ops.inverted_residual._forward_cuda, its kernel forced
    ("cuda_cores" or "tensor_cores") and the extension's op swapped for the emulation."""
    monkeypatch.setenv("FASTCONV_CUDA_FUSED_BLOCK_KERNEL", kernel)
    monkeypatch.setattr(ops, "_cuda_forward_op",
                        lambda: lambda *args, **kwargs: cuda_emulation.emulated_forward_op(*args, **kwargs,
                                                                                           variant=variant))  # fmt: skip
    k = t["dw_weight"].shape[-1]
    stride_, padding, dilation = normalise_geometry((k, k), stride, (k - 1) // 2, 1)
    expand = "expand_weight" in t
    residual = t["x"] if use_residual else t.get("residual")
    options = dict(
        stride=stride_, padding=padding, dilation=dilation, expand_scale=t.get("expand_scale"),
        expand_shift=t.get("expand_shift"), expand_activation=activation if expand else None,
        dw_scale=t["dw_scale"], dw_shift=t["dw_shift"], dw_activation=activation, project_scale=t["project_scale"],
        project_shift=t["project_shift"], project_activation=pw_activation, residual=residual,
    )  # fmt: skip
    weights = dict(expand_weight=t.get("expand_weight"), dw_weight=t["dw_weight"], project_weight=t["project_weight"])
    with poisoned_allocations():  # NaN in the output: an element the kernel misses shows
        out = empty_output(ops._check(t["x"], *weights.values(), *options.values()), t["x"])
        ops._forward_cuda(out=out, x=t["x"], **weights, **options)
    assert ops.last_kernel("cuda") == kernel
    return out


def check(t, monkeypatch, kernel, **options):
    y = run_emulated(t, monkeypatch, kernel, **options)
    options.pop("variant", None)
    y64 = chain({k: v.double() for k, v in t.items()}, **options)
    yardstick = chain(t, **options) if t["x"].dtype != torch.float32 else None
    assert_matches_reference("y", y, y64, yardstick, terms=t["dw_weight"].shape[0])
    return y


KERNELS = ["cuda_cores", "tensor_cores"]


# (C_in, C_hid, C_out, H=W, stride, k, expand, use_residual): MobileNetV2-like blocks, edges that
# leave partial 8x8 tiles, hidden widths that leave a partial chunk of 32, C_in not a multiple
# of the MMA's 16, and output widths that leave partial warps' columns.
CASES = {
    "expand-s1-residual-9": (24, 144, 24, 9, 1, 3, True, True),
    "expand-s2-11": (16, 96, 24, 11, 2, 3, True, False),
    "expand-s2-k5-9": (18, 50, 30, 9, 2, 5, True, False),
    "expand-ratio-1-7": (20, 20, 12, 7, 1, 3, True, False),
    "no-expand-s1-10": (40, 40, 72, 10, 1, 3, False, False),
    "no-expand-s2-13": (34, 34, 18, 13, 2, 3, False, False),
}


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_block_kernels_match_float64(kernel, case, dtype, monkeypatch):
    c_in, c_hid, c_out, hw, stride, k, expand, use_residual = CASES[case]
    t = make(c_in, c_hid, c_out, hw, n=2, k=k, dtype=dtype, expand=expand)
    pw_activation = None if expand else "relu"
    check(t, monkeypatch, kernel, stride=stride, use_residual=use_residual, pw_activation=pw_activation)


@pytest.mark.parametrize("case", ["expand-s1-residual-9", "no-expand-s2-13"])
def test_cuda_core_kernel_float32_and_odd_channels(case, monkeypatch):
    c_in, c_hid, c_out, hw, stride, k, expand, use_residual = CASES[case]
    check(make(c_in, c_hid, c_out, hw, n=2, k=k, expand=expand), monkeypatch, "cuda_cores", stride=stride,
          use_residual=use_residual)  # fmt: skip
    check(make(17, 41, 23, 13, n=1, dtype=torch.float16), monkeypatch, "cuda_cores", stride=2)


def test_tensor_core_kernel_refuses_what_it_cannot_take(monkeypatch):
    """Forced onto a block it cannot take (odd C_in), the tensor-core kernel is refused, saying
    why, before anything launches."""
    with pytest.raises(RuntimeError, match=r"FASTCONV_CUDA_FUSED_BLOCK_KERNEL=tensor_cores: its tensor-core kernel: "
                                           r"it needs even C_in and C_hid .* got C_in 17, C_hid 40"):  # fmt: skip
        run_emulated(make(17, 40, 24, 7, dtype=torch.float16), monkeypatch, "tensor_cores")


@pytest.mark.parametrize("layout", ["nchw", "channel_slice"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_block_kernels_read_any_layout(kernel, layout, monkeypatch):
    t = make(24, 64, 24, 9, n=1, dtype=torch.float16, layout=layout)
    check(t, monkeypatch, kernel, stride=1, use_residual=True)


@pytest.mark.parametrize("variant", [0, 1], ids=["groups-of-384", "groups-of-128"])
def test_tensor_core_kernel_groups_of_output_channels(variant, monkeypatch):
    """400 output channels: two launches of 384 (the second a partial group) or four of 128, each
    writing its slice of the output, its residual and its bias; the variants agree bit for bit."""
    t = make(16, 32, 400, 5, n=1, dtype=torch.bfloat16, residual_tensor=True)
    y = check(t, monkeypatch, "tensor_cores", stride=1, variant=variant)
    other = run_emulated(t, monkeypatch, "tensor_cores", stride=1, variant=1 - variant)
    assert torch.equal(y, other)


def test_cuda_core_kernel_groups_of_output_channels(monkeypatch):
    """400 output channels on the CUDA cores: a group of 384 and a partial one of 16."""
    check(make(16, 32, 400, 5, n=1, dtype=torch.float16, residual_tensor=True), monkeypatch, "cuda_cores", stride=1)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_block_kernels_activations_and_residual_tensor(kernel, monkeypatch):
    """SiLU and hardswish (no kink for rounding to land on) and a residual tensor after the
    projection's activation, as the depthwise-separable block takes them."""
    t = make(32, 32, 40, 8, n=2, dtype=torch.float16, expand=False, residual_tensor=True)
    check(t, monkeypatch, kernel, stride=1, activation="silu", pw_activation="hardswish")
