"""Two ops that write into given or pooled outputs, on random shapes, layouts, epilogues and
faults, drawn by hypothesis: `conv2d_out` (the implicit GEMM stored into a channel slice of a
wider buffer, with statistics or an epilogue) and `bn_act_avg_pool` (BatchNorm, activation
and the 2x2 pool in one pass). Each example matches float64, leaves the rest of the buffer
untouched, or raises a ValueError naming the argument."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastconv
from fastconv import reference
from harness import FUZZ_LAYOUTS, mismatch_report, on_backend, random_tensor, seeded

BACKENDS = ["torch", "triton"]
ARGUMENTS = re.compile(r"\b(x|weight|bias|scale|shift|activation|out|stride|padding|dilation|groups|compute_stats)\b")


def _close(name, got, want, tolerance=1e-4):
    report = mismatch_report(name, got, want, tolerance * max(1.0, want.abs().max().item() if want.numel() else 1.0))
    assert report.startswith(f"{name}: 0 of"), report


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_conv2d_out_random_cases(backend, data):
    n, c_in, c_out = data.draw(st.integers(0, 2), "n"), data.draw(st.integers(1, 8), "c_in"), data.draw(st.integers(1, 8), "c_out")
    h, w, k = data.draw(st.integers(3, 8), "h"), data.draw(st.integers(3, 8), "w"), data.draw(st.sampled_from([3, 5]), "k")
    stride, pad = data.draw(st.sampled_from([1, 2]), "stride"), data.draw(st.integers(0, 2), "padding")
    stats = data.draw(st.booleans(), "stats")
    epilogue = not stats and data.draw(st.booleans(), "epilogue")
    fault = data.draw(st.sampled_from([None, None, None, "out shape", "out dtype", "stats with epilogue"]), "fault")
    seeded(data.draw(st.integers(0, 2**31 - 1), "seed"))
    x = random_tensor((n, c_in, h, w), torch.float32, data.draw(st.sampled_from(FUZZ_LAYOUTS), "layout"))
    weight = torch.randn(c_out, c_in, k, k) / (c_in * k)
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    if ho < 1 or wo < 1:
        return
    buffer = torch.full((n, c_out + 5, ho, wo), float("nan")).contiguous(memory_format=torch.channels_last)
    out = buffer[:, 2 : 2 + c_out]
    scale = torch.rand(c_out) + 0.5 if epilogue or fault == "stats with epilogue" else None
    shift = torch.randn(c_out) if epilogue else None
    activation = "relu" if epilogue else None
    if fault == "out shape":
        out = buffer[:, 2 : 1 + c_out] if c_out > 1 else buffer[:, 2:4]
    elif fault == "out dtype":
        out = torch.empty(n, c_out, ho, wo, dtype=torch.float64)
    if fault == "stats with epilogue":
        stats = True
    try:
        with on_backend(backend):
            mean, var = torch.ops.fastconv.conv2d_out(x, weight, (stride,) * 2, (pad,) * 4, (1, 1), 1, stats, out, None,
                                                      scale, shift, activation)  # fmt: skip
    except ValueError as error:
        assert fault is not None, f"a valid case raised: {error}"
        assert ARGUMENTS.search(str(error)), f"the message names no argument: {error}"
        return
    except RuntimeError as error:
        # conv2d_out serves the implicit GEMM only; anything else must say so.
        assert "implicit GEMM" in str(error) or fault is not None, str(error)
        return
    assert fault is None, f"fault {fault!r} was accepted"
    want = F.conv2d(x.double(), weight.double(), None, stride, pad)
    if stats and n > 0:
        var_want, mean_want = torch.var_mean(want, dim=(0, 2, 3), unbiased=False)
        _close("mean", mean, mean_want)
        _close("var", var, var_want)
    if epilogue:
        want = F.relu(want * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))
    _close("out", out, want)
    untouched = torch.cat([buffer[:, :2], buffer[:, 2 + c_out :]], 1)
    assert untouched.isnan().all(), "conv2d_out wrote outside its slice"


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_bn_act_avg_pool_random_cases(backend, data):
    n, c = data.draw(st.integers(0, 2), "n"), data.draw(st.integers(1, 40), "c")
    h, w = data.draw(st.integers(1, 9), "h"), data.draw(st.integers(1, 9), "w")
    activation = data.draw(st.sampled_from([None, "relu", "relu6", "silu"]), "activation")
    fault = data.draw(st.sampled_from([None, None, None, "scale length", "shift dtype"]), "fault")
    seeded(data.draw(st.integers(0, 2**31 - 1), "seed"))
    x = random_tensor((n, c, h, w), torch.float32, data.draw(st.sampled_from(FUZZ_LAYOUTS), "layout"))
    scale, shift = torch.rand(c) + 0.5, torch.randn(c)
    if fault == "scale length":
        scale = torch.rand(c + 1)
    elif fault == "shift dtype":
        shift = shift.double()
    try:
        with on_backend(backend):
            y = fastconv.bn_act_avg_pool(x, scale, shift, activation)
    except ValueError as error:
        assert fault is not None or min(h, w) < 2, f"a valid case raised: {error}"
        assert ARGUMENTS.search(str(error)), f"the message names no argument: {error}"
        return
    assert fault is None and min(h, w) >= 2, f"fault {fault!r} (or a {h}x{w} map) was accepted"
    want = F.avg_pool2d(reference.bn_act(x.double(), scale.double(), shift.double(), activation), 2)
    _close("y", y, want)
