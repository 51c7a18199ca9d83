"""fastconv.inverted_residual and fastconv.depthwise_separable_conv2d (the fused-block op)
against eager PyTorch's unfused chain in float64.

Sizes follow the interpreter's cost (about 0.1 s per hidden chunk and tap of one program):
batch 1, odd 7x7 to 15x15 images, one program per call at the interpreter's tile, except
where a test forces the GPU default tile to cover the pixel, hidden and output-channel blocks.
The module tests (torchvision's blocks, training) are in test_inverted_residual_module.py.
"""

from __future__ import annotations

import importlib
import os
import re

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv.activations import apply_activation
from harness import (
    DEVICE,
    assert_matches_reference,
    backends_under_test,
    on_backend,
    poisoned_allocations,
    random_tensor,
    run_backend,
    skip_interpreted_bf16_dot,
    wide,
    with_fused_block_kernels,
)

# The module, not the function of the same name that fastconv.ops exports.
ops = importlib.import_module("fastconv.ops.inverted_residual")
BACKENDS = backends_under_test(ops.FORWARD)
KERNELS = with_fused_block_kernels(BACKENDS)  # the tiled Triton kernel too, on blocks with an expansion


def make(c_in, c_hid, c_out, hw=7, *, n=1, k=3, dtype=torch.float32, layout="channels_last", expand=True,
         residual_tensor=False, stride=1):  # fmt: skip
    """Weights scaled so every stage's outputs stay O(1); BatchNorm vectors random, scales
    around 1, shifts around 0.5 (relu6(shift) of a padding tap would show)."""
    p = wide(dtype)
    t = {"x": random_tensor((n, c_in, hw, hw), dtype, layout)}
    hidden = c_hid if expand else c_in
    if expand:
        t["expand_weight"] = (torch.randn(c_hid, c_in, 1, 1, device=DEVICE) / c_in**0.5).to(dtype)
        t["expand_scale"] = (torch.rand(c_hid, device=DEVICE) + 0.5).to(p)
        t["expand_shift"] = (torch.randn(c_hid, device=DEVICE) * 0.5 + 0.5).to(p)
    t["dw_weight"] = (torch.randn(hidden, 1, k, k, device=DEVICE) / k).to(dtype)
    t["dw_scale"] = (torch.rand(hidden, device=DEVICE) + 0.5).to(p)
    t["dw_shift"] = (torch.randn(hidden, device=DEVICE) * 0.5 + 0.5).to(p)
    t["project_weight"] = (torch.randn(c_out, hidden, 1, 1, device=DEVICE) / hidden**0.5).to(dtype)
    t["project_scale"] = (torch.rand(c_out, device=DEVICE) + 0.5).to(p)
    t["project_shift"] = torch.randn(c_out, device=DEVICE).to(p)
    if residual_tensor:
        ho = (hw - 1) // stride + 1
        t["residual"] = random_tensor((n, c_out, ho, ho), dtype, layout)
    return t


def chain(t, *, stride=1, activation="relu6", pw_activation=None, use_residual=False):
    """Eager PyTorch in the tensors' dtype: conv -> BN -> act, dw -> BN -> act, conv -> BN (+ r)."""
    view = (1, -1, 1, 1)
    dtype = t["x"].dtype

    def bn(v, name):
        return v * t[f"{name}_scale"].to(dtype).view(view) + t[f"{name}_shift"].to(dtype).view(view)

    h = t["x"]
    if "expand_weight" in t:
        h = apply_activation(bn(F.conv2d(h, t["expand_weight"]), "expand"), activation)
    k = t["dw_weight"].shape[-1]
    h = F.conv2d(h, t["dw_weight"], stride=stride, padding=(k - 1) // 2, groups=h.shape[1])
    h = apply_activation(bn(h, "dw"), activation)
    y = apply_activation(bn(F.conv2d(h, t["project_weight"]), "project"), pw_activation)
    if use_residual:
        y = y + t["x"]
    if "residual" in t:
        y = y + t["residual"]
    return y


def call(t, *, stride=1, activation="relu6", pw_activation=None, use_residual=False):
    """The inverted residual when there is an expansion (linear projection), else the separable block."""
    if "expand_weight" in t or (pw_activation is None and "residual" not in t):
        return ops.inverted_residual(
            t["x"], t.get("expand_weight"), t["dw_weight"], t["project_weight"], stride=stride,
            expand_scale=t.get("expand_scale"), expand_shift=t.get("expand_shift"), dw_scale=t["dw_scale"],
            dw_shift=t["dw_shift"], project_scale=t["project_scale"], project_shift=t["project_shift"],
            activation=activation, use_residual=use_residual,
        )  # fmt: skip
    k = t["dw_weight"].shape[-1]
    return ops.depthwise_separable_conv2d(
        t["x"], t["dw_weight"], t["project_weight"], stride=stride, padding=(k - 1) // 2, dw_scale=t["dw_scale"],
        dw_shift=t["dw_shift"], dw_activation=activation, pw_scale=t["project_scale"], pw_shift=t["project_shift"],
        pw_activation=pw_activation, residual=t.get("residual"),
    )  # fmt: skip


def check(backend, t, lowp=False, **options):
    with poisoned_allocations():  # NaN in every torch.empty: an unwritten output element shows
        y = run_backend(backend, call, t, **options)
    y64 = chain({k: v.double() for k, v in t.items()}, **options)
    yardstick = chain(t, **options) if lowp else None
    # Terms per output: the projection's hidden channels, each of k*k taps of C_in products.
    hidden = t["dw_weight"].shape[0]
    assert_matches_reference("y", y, y64, yardstick, terms=hidden)
    return y


CASES = {
    # (c_in, c_hid, c_out, hw, stride, k, expand, use_residual); widths not multiples of any block.
    "expand-s1-residual-7": (24, 144, 24, 7, 1, 3, True, True),
    "expand-s2-13": (17, 40, 23, 13, 2, 3, True, False),
    "expand-s2-15-k5": (16, 48, 24, 15, 2, 5, True, False),
    "no-expand-s1-9": (32, 32, 16, 9, 1, 3, False, False),
    "no-expand-s2-15": (19, 19, 33, 15, 2, 3, False, False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", KERNELS)
def test_inverted_residual_matches_float64(backend, case):
    c_in, c_hid, c_out, hw, stride, k, expand, use_residual = CASES[case]
    if backend == "triton:tiled" and not expand:
        pytest.skip("the tiled kernel serves blocks with an expansion; the separable block reads x itself")
    t = make(c_in, c_hid, c_out, hw, k=k, expand=expand)
    y = check(backend, t, stride=stride, use_residual=use_residual)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["nchw", "channel_slice", "spatial_slice"])
@pytest.mark.parametrize("backend", KERNELS)
def test_layouts(backend, layout):
    """NCHW (converted once at the boundary, written back NCHW), a channel slice read in place,
    and a spatial crop; the output keeps the layout rule of every op."""
    t = make(12, 36, 12, 7, layout=layout)
    y = check(backend, t, use_residual=True)
    expected = torch.channels_last if layout == "channel_slice" else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected)


@pytest.mark.parametrize(
    "options",
    [dict(activation="relu6", pw_activation="relu6"), dict(activation="relu", pw_activation="silu"),
     dict(activation="hardswish", pw_activation=None)],
    ids=["relu6-relu6", "relu-silu", "hardswish-linear"],
)  # fmt: skip
@pytest.mark.parametrize("backend", BACKENDS)
def test_depthwise_separable_with_residual(backend, options):
    """MobileNetV1's block plus a residual tensor, with both activation positions."""
    check(backend, make(20, 0, 20, 9, expand=False, residual_tensor=True), **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_half_precision_within_twice_pytorch_error(backend, dtype):
    skip_interpreted_bf16_dot(backend, dtype)
    # silu: a smooth activation, so a rounding on either side of a kink does not decide the test.
    check(backend, make(32, 96, 32, 7, dtype=dtype), lowp=True, activation="silu", use_residual=True)
    check(backend, make(24, 0, 40, 9, dtype=dtype, expand=False), lowp=True, activation="silu", pw_activation="silu")


@pytest.mark.parametrize("n", [0, 1], ids=["batch0", "batch1"])
@pytest.mark.parametrize("backend", KERNELS)
def test_batch_zero_and_one(backend, n):
    t = make(8, 24, 16, 7, n=n)
    y = check(backend, t, stride=2)
    assert y.shape == (n, 16, 4, 4)


def test_gpu_default_tile_covers_every_block_axis(monkeypatch):
    """The GPU default config (64 pixels, 32 hidden, 64 output channels, 32 input channels) on
    a shape that needs two pixel blocks, two hidden chunks with a ragged end, three
    output-channel blocks and two K steps: the masking of every axis, in the interpreter."""
    from fastconv.triton_kernels import inverted_residual as kernels

    tuner = kernels._fused_block
    default = tuner.all_configs[1] if len(tuner.all_configs) > 1 and fastconv.backends.interpreting() else tuner.all_configs[0]
    assert (default.kwargs["BLOCK_P"], default.kwargs["BLOCK_H"], default.kwargs["BLOCK_CO"]) == (64, 32, 64)
    monkeypatch.setattr(tuner, "configs", [default])
    check("triton", make(40, 40, 130, 9), use_residual=False)  # 81 pixels, 40 hidden, 130 outputs


def test_tiled_gpu_default_tile_covers_every_axis(monkeypatch):
    """The tiled kernel's GPU default (8x8 output tiles, windows 64 pixels at a time, 32 hidden,
    64 output channels, 16 input channels) on a shape with ragged tiles in both directions,
    two images, more tiles than programs (the persistent loop reuses each program's scratch
    slot), a ragged hidden chunk, three output-channel blocks and two K steps; stride 1 and 2,
    the 3x3 and a 5x5 window."""
    from fastconv.triton_kernels import inverted_residual as host
    from fastconv.triton_kernels import inverted_residual_tiled as kernels

    tuner = kernels.fused_block_tiled
    default = tuner.all_configs[1] if len(tuner.all_configs) > 1 and fastconv.backends.interpreting() else tuner.all_configs[0]
    assert [default.kwargs[k] for k in ("TILE_H", "TILE_W", "BLOCK_WIN", "BLOCK_H", "BLOCK_CO", "BLOCK_K")] == \
        [8, 8, 64, 32, 64, 16]  # fmt: skip
    monkeypatch.setattr(tuner, "configs", [default])
    monkeypatch.setattr(host, "last_kernel", None)
    # 8 tiles of 8x8 and 3 output-channel blocks: the interpreter's 4 parallel programs give one
    # program per block, which loops over all 8 tiles.
    check("triton:tiled", make(20, 40, 130, 11, n=2), use_residual=False)
    assert host.last_kernel == "tiled"
    check("triton:tiled", make(20, 40, 24, 11, n=1, k=5), stride=2)


def test_kernel_choice_is_named_when_forced_wrongly(monkeypatch):
    monkeypatch.setenv("FASTCONV_FUSED_BLOCK_KERNEL", "fast")
    with pytest.raises(ValueError, match=r"FASTCONV_FUSED_BLOCK_KERNEL must be one of auto, gather, tiled; got 'fast'"):
        run_backend("triton", call, make(8, 16, 8, 7))


def test_choose_kernel_forces_caches_and_defaults(monkeypatch):
    """The choice both GPU backends make between their fused-block kernels: a forced name wins,
    an unknown one is named, and without a GPU timer the first kernel runs, untimed and uncached."""
    from fastconv._timing import choose_kernel
    from fastconv.ops.inverted_residual import KERNEL_ENVIRONMENT, forced_kernel

    launches = {"first": lambda: None, "second": lambda: None}
    chosen: dict = {}
    x = torch.empty(2)
    monkeypatch.delenv("FASTCONV_TEST_KERNEL", raising=False)
    assert choose_kernel("FASTCONV_TEST_KERNEL", launches, ("key",), x, chosen) == "first"
    assert chosen == {}  # nothing timed on the CPU, so nothing to remember
    monkeypatch.setenv("FASTCONV_TEST_KERNEL", "second")
    assert choose_kernel("FASTCONV_TEST_KERNEL", launches, ("key",), x, chosen) == "second"
    monkeypatch.setenv("FASTCONV_TEST_KERNEL", "third")
    with pytest.raises(ValueError, match=r"FASTCONV_TEST_KERNEL must be one of auto, first, second; got 'third'"):
        choose_kernel("FASTCONV_TEST_KERNEL", launches, ("key",), x, chosen)
    monkeypatch.delenv("FASTCONV_TEST_KERNEL")
    assert choose_kernel("FASTCONV_TEST_KERNEL", launches, ("cached",), x, {("cached",): "second"}) == "second"

    name = KERNEL_ENVIRONMENT["cuda"]
    monkeypatch.setenv(name, "cuda_cores")
    with forced_kernel("cuda", "tensor_cores"):
        assert os.environ[name] == "tensor_cores"
    assert os.environ[name] == "cuda_cores"  # restored
    with forced_kernel("cuda", ""):
        assert os.environ[name] == "cuda_cores"  # an empty kernel changes nothing


def test_fused_op_has_no_backward_and_says_so():
    t = make(8, 16, 8, 5)
    x = t["x"].requires_grad_(True)
    y = torch.ops.fastconv.inverted_residual(
        x, t["expand_weight"], t["dw_weight"], t["project_weight"], [1, 1], [1, 1, 1, 1], [1, 1], t["expand_scale"],
        t["expand_shift"], "relu6", t["dw_scale"], t["dw_shift"], "relu6", t["project_scale"], t["project_shift"],
        None, x,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_through_the_unfused_ops(backend):
    """With gradients wanted the public function runs fastconv's unfused ops: the float64
    chain's gradients for x, every weight and every BatchNorm vector."""
    t = {k: v.double().requires_grad_(True) for k, v in make(6, 12, 6, 5).items()}
    if backend == "cuda":
        pytest.skip("the cuda kernels take no float64")
    with on_backend(backend):
        y = call(t, use_residual=True, activation="silu")
        grad_y = torch.randn_like(y)
        grads = torch.autograd.grad(y, list(t.values()), grad_y)
    want = torch.autograd.grad(chain(t, use_residual=True, activation="silu"), list(t.values()), grad_y)
    for name, got, expected in zip(t, grads, want):
        torch.testing.assert_close(got, expected, msg=f"grad of {name}")


BAD = {
    "dw channels != expand out": (dict(dw_weight=(10, 1, 3, 3)), "dw_weight.shape[0] must equal expand_weight's output channels 12; got 10"),
    "project in != dw channels": (dict(project_weight=(6, 10, 1, 1)), "project_weight.shape[1] must equal dw_weight's channels 12; got 10"),
    "expand in != x channels": (dict(expand_weight=(12, 5, 1, 1)), "expand_weight.shape[1] must equal x's input channels 6; got 5"),
    "expand_scale length": (dict(expand_scale=(11,)), "expand_scale must have shape (12,), one value per hidden channel; got (11,)"),
    "dw_shift length": (dict(dw_shift=(13,)), "dw_shift must have shape (12,), one value per hidden channel; got (13,)"),
    "project_scale length": (dict(project_scale=(12,)), "project_scale must have shape (6,), one value per output channel; got (12,)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_named(backend, case):
    """Each error names the argument, the expected value and the actual one."""
    t = make(6, 12, 6, 5)
    changes, message = BAD[case]
    for name, shape in changes.items():
        t[name] = torch.randn(shape, device=DEVICE).to(t[name].dtype)
    with pytest.raises(ValueError, match=re.escape(message)):
        run_backend(backend, call, t)


def test_bad_residual_named():
    t = make(6, 12, 8, 5)
    with pytest.raises(ValueError, match=r"use_residual needs project_weight.shape\[0\] \(C_out\) equal to x's 6 channels \(C_in\); got 8"):
        call(t, use_residual=True)
    t = make(6, 12, 6, 5)
    with pytest.raises(ValueError, match="use_residual needs stride 1 .*; got stride 2"):
        call(t, stride=2, use_residual=True)
    t = make(6, 0, 6, 5, expand=False, residual_tensor=True)
    t["residual"] = t["residual"][:, :, :4]
    with pytest.raises(ValueError, match=r"residual must have shape \(1, 6, 5, 5\); got \(1, 6, 4, 5\)"):
        call(t, pw_activation="relu6")
    with pytest.raises(ValueError, match="expand_scale must be None when expand_weight is None"):
        ops.inverted_residual(t["x"], None, t["dw_weight"], t["project_weight"], expand_scale=t["dw_scale"])


@pytest.mark.parametrize("expand", [True, False], ids=["expand", "separable"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, expand):
    t = make(6, 10, 6, 5, expand=expand)
    args = (
        t["x"], t.get("expand_weight"), t["dw_weight"], t["project_weight"], [1, 1], [1, 1, 1, 1], [1, 1],
        t.get("expand_scale"), t.get("expand_shift"), "relu6" if expand else None, t["dw_scale"], t["dw_shift"],
        "relu6", t["project_scale"], t["project_shift"], None if expand else "relu", t["x"],
    )  # fmt: skip
    with on_backend(backend):
        torch.library.opcheck(torch.ops.fastconv.inverted_residual.default, args)


def test_traffic_counts_the_floor_and_the_tap_recompute():
    """traffic() of a MobileNetV2 block (batch 128, 56x56, 24 -> 144 -> 24, fp16) by hand."""
    from fastconv.triton_kernels.inverted_residual import traffic

    t = traffic(128, 24, 56, 56, 144, 24, residual=True)
    pixels = 128 * 56 * 56
    assert t.io_floor_bytes == 3 * pixels * 24 * 2  # x read, y written, x read again as the residual
    assert t.unfused_bytes == t.io_floor_bytes + 4 * pixels * 144 * 2  # two hidden tensors, each written and read
    assert t.flops == 2 * pixels * (24 * 144 + 144 * 9 + 144 * 24)
    # One output-channel block (24 <= 64): the expansion 9 times, the rest once.
    assert t.kernel_flops == 2 * pixels * (9 * 24 * 144 + 144 * 9 + 144 * 24)
    # The tiled kernel: 7x7 tiles of 8x8 a 56x56 image, each 10x10 window in 2 steps of 64.
    assert t.tiled_kernel_flops == 2 * 128 * 49 * 128 * 24 * 144 + 2 * pixels * (144 * 9 + 144 * 24)
    assert t.load_bytes > t.dram_bytes_estimate >= t.io_floor_bytes


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_meta_and_fake_tensors_give_the_real_run_s_layout(layout):
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = make(6, 12, 6, 7, layout=layout)
    real = call(t, stride=2)
    meta = call({k: v.to("meta") for k, v in t.items()}, stride=2)
    with FakeTensorMode() as mode:
        fake = call({k: mode.from_tensor(v) for k, v in t.items()}, stride=2)
    for got in (meta, fake):
        assert (got.shape, got.stride(), got.dtype) == (real.shape, real.stride(), real.dtype)
