"""Every Triton config of every kernel family, forced one at a time on a GPU.

The rest of the suite runs one config per kernel (FASTCONV_TRITON_AUTOTUNE=0); the autotuner
may pick any of them, so each must be right.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fastconv
from harness import ON_GPU, assert_matches_reference, backends_under_test, random_tensor, run_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")]

GPU_BACKENDS = [p for p in backends_under_test() if p.values[0] != "torch"]


def inputs(shape, dtype=torch.float16, layout="channels_last", requires_grad=False):
    x = random_tensor(shape, dtype, layout, scale=3.0).requires_grad_(requires_grad)
    scale = (torch.randn(shape[1], device="cuda") * 0.5 + 1).requires_grad_(requires_grad)
    shift = torch.randn(shape[1], device="cuda").requires_grad_(requires_grad)
    return x, scale, shift


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


def conv_bn_act_workload():
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


def fused_block_workload(kernel: str):
    """The fused inverted residual forced onto one of its two kernels: stride 1 with the
    residual and stride 2, odd sizes, fp16, against float64 with the 2x-PyTorch rule (SiLU)."""
    from test_inverted_residual import check, make

    import os

    import torch.nn.functional as F

    from fastconv.triton_kernels.inverted_residual import hidden_statistics

    for c_in, c_hid, c_out, hw, stride, residual in ((24, 144, 24, 15, 1, True), (32, 192, 64, 13, 2, False)):
        t = make(c_in, c_hid, c_out, hw, n=2, dtype=torch.float16)
        check(f"triton:{kernel}", t, lowp=True, stride=stride, use_residual=residual, activation="silu")
        # The training forward's statistics pass over the same block (its kernel forced alike).
        we, wd = t["expand_weight"].view(c_hid, c_in), t["dw_weight"].view(c_hid, 9)
        be = torch.randn(c_hid, device="cuda")
        ho = (hw - 1) // stride + 1
        os.environ["FASTCONV_FUSED_BLOCK_KERNEL"] = kernel
        try:
            mean, var = hidden_statistics(t["x"], we, be, wd, (3, 3), stride, (1, 1), (ho, ho), 1, 2)
        finally:
            os.environ.pop("FASTCONV_FUSED_BLOCK_KERNEL")
        e = F.relu6(F.conv2d(t["x"].double(), we.double()[:, :, None, None]) + be.double()[None, :, None, None])
        d = F.conv2d(e, wd.double().view(c_hid, 1, 3, 3), stride=stride, padding=1, groups=c_hid)
        want_var, want_mean = torch.var_mean(d, dim=(0, 2, 3), correction=0)
        # The tiled kernel rounds e to fp16 as eager's expanded tensor is: 1% catches a wrong index.
        for got, want in ((mean, want_mean), (var, want_var)):
            torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


# Each module of fastconv.triton_kernels, with the workload that reaches all of its kernels.
WORKLOADS = {
    "bn_act": bn_act_workload, "depthwise": depthwise_stats_workload, "depthwise_backward": depthwise_workload,
    "pointwise": pointwise_workload, "pointwise_backward": pointwise_workload, "conv_bn_act": conv_bn_act_workload,
    "batch_norm": batch_norm_workload, "inverted_residual_tiled": lambda: fused_block_workload("tiled"),
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
