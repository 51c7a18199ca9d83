"""What the extension's C++ checks decide on real memory, which the Meta kernels cannot show
(meta tensors have no addresses): run on the extension built for the CPU
(tests/cuda_emulation.py), whose checks are the GPU build's own."""

from __future__ import annotations

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
