"""What the extension's C++ checks decide on real memory, which the Meta kernels cannot show
(meta tensors have no addresses): run on the extension built for the CPU
(tests/cuda_emulation.py), whose checks are the GPU build's own."""

from __future__ import annotations

import os

import pytest
import torch

from harness import EMULATED_CUDA

pytestmark = [pytest.mark.emulated, pytest.mark.skipif(not EMULATED_CUDA, reason="runs without a GPU only")]


def _bn_act_out(x, out):
    from cuda_emulation import emulated_ops

    c = x.shape[1]
    emulated_ops().bn_act_forward_out(x, torch.rand(c) + 0.5, torch.randn(c), 2, out)


def test_out_may_be_a_channel_slice_beside_x_in_one_buffer():
    """An Inception block's BatchNorm reads one slice of a buffer and writes another (the
    check once asked at::get_overlap_status, which answers TooHard for any slice)."""
    buffer = torch.randn(2, 12, 5, 5).to(memory_format=torch.channels_last)
    x, out = buffer[:, :5], buffer[:, 6:11]
    before = buffer.clone()
    _bn_act_out(x, out)
    assert torch.equal(buffer[:, :6], before[:, :6]) and torch.equal(buffer[:, 11:], before[:, 11:])
    assert not torch.equal(out, before[:, 6:11])  # written; the values are the op tests' business
    fresh = torch.empty(2, 5, 5, 5)
    _bn_act_out(buffer[:, 1:6], fresh)  # a sliced x and an output of its own


@pytest.mark.parametrize("overlap", ["same", "shifted-slice", "transposed-view"])
def test_out_that_shares_an_element_with_x_is_refused(overlap):
    buffer = torch.randn(2, 12, 5, 5).to(memory_format=torch.channels_last)
    x = buffer[:, :6]
    out = {"same": x, "shifted-slice": buffer[:, 3:9], "transposed-view": x.transpose(2, 3)}[overlap]
    with pytest.raises(RuntimeError, match=r"bn_act_forward_out: argument 'out' must be a tensor that does not overlap x"):
        _bn_act_out(x, out)


def _tuned_outputs(path: str) -> None:
    """Runs every autotuned CUDA op once on fixed inputs, on the emulated extension, and saves
    the outputs and gradients to `path` (FASTCONV_EMULATION_VARIANT picks the variants)."""
    import fastconv
    from cuda_emulation import emulated_cuda_backend
    from fastconv.ops.inverted_residual import forced_kernel

    torch.manual_seed(0)
    cl = torch.channels_last
    out = {}
    with emulated_cuda_backend(), fastconv.use_backend("cuda"):
        x = torch.randn(2, 24, 9, 7).to(memory_format=cl).requires_grad_()
        y = fastconv.bn_act(x, torch.rand(24) + 0.5, torch.randn(24), activation="relu6")
        out["bn_act"] = [y, *torch.autograd.grad(y, x, torch.randn_like(y))]
        w = torch.randn(24, 1, 3, 3, requires_grad=True)
        y = fastconv.depthwise_conv2d(x, w, stride=2, padding=1)
        out["depthwise"] = [y, *torch.autograd.grad(y, (x, w), torch.randn_like(y))]
        xh = torch.randn(2, 32, 9, 7).half().to(memory_format=cl)
        out["pointwise"] = [fastconv.pointwise_conv2d(xh, torch.randn(48, 32, 1, 1).half())]
        out["conv2d_bn_act"] = [fastconv.conv2d_bn_act(xh, torch.randn(40, 32, 3, 3).half(), stride=1, padding=1)]
        weights = (torch.randn(96, 16, 1, 1).half(), torch.randn(96, 1, 3, 3).half(), torch.randn(200, 96, 1, 1).half())
        xi = torch.randn(2, 16, 11, 11).half().to(memory_format=cl)
        with forced_kernel("cuda", "tensor_cores"):
            out["inverted_residual"] = [fastconv.inverted_residual(xi, *weights, stride=1)]
    torch.save({name: [t.detach() for t in tensors] for name, tensors in out.items()}, path)


def test_tuned_variants_agree_bit_for_bit(tmp_path):
    """autotune.h's promise, which makes the first-call timing harmless to determinism: every
    template variant of a tuned op gives the same bits. One process per forced variant (the
    tuner keeps a key's winner for the process's life); bn_act, depthwise (forward and
    backward), the pointwise and implicit GEMMs and the fused block's tensor-core kernel."""
    import subprocess
    import sys

    outputs = []
    for variant in range(3):
        path = tmp_path / f"variant{variant}.pt"
        environment = {**os.environ, "FASTCONV_EMULATION_VARIANT": str(variant)}
        subprocess.run([sys.executable, __file__, str(path)], check=True, env=environment, cwd=os.path.dirname(__file__))
        outputs.append(torch.load(path))
    for name, tensors in outputs[0].items():
        for variant, other in enumerate(outputs[1:], start=1):
            assert all(torch.equal(a, b) for a, b in zip(tensors, other[name])), f"{name}: variant {variant} differs from 0"


if __name__ == "__main__":
    import sys

    sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    _tuned_outputs(sys.argv[1])
