"""conv2d_bn_act on random geometries, layouts and epilogues (a residual before or after the
activation included), drawn by hypothesis: every route (implicit GEMM, depthwise, pointwise)
and the batch statistics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fastconv._geometry import output_size
from fastconv.ops import conv_bn_act as conv_ops
from harness import FUZZ_LAYOUTS, backends_under_test, run_backend, seeded
from test_conv_bn_act import make, run, with_residual

FUZZ_BACKENDS = [p for p in backends_under_test(conv_ops.FORWARD) if p.values[0] != "cuda" or torch.cuda.is_available()]


@pytest.mark.parametrize("backend", FUZZ_BACKENDS)
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(0, 2),
    groups=st.integers(1, 3),
    channels_per_group=st.integers(1, 5),
    out_per_group=st.integers(1, 5),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    layout=st.sampled_from(FUZZ_LAYOUTS),
    epilogue=st.booleans(),
    bias=st.booleans(),
    activation=st.sampled_from([None, "relu", "silu"]),
    residual=st.sampled_from([None, "before-activation", "after-activation"]),
    residual_layout=st.sampled_from(FUZZ_LAYOUTS),
)
def test_random_geometries_match_float64(
    backend, seed, batch, groups, channels_per_group, out_per_group, size, kernel, stride, dilation, padding, layout,
    epilogue, bias, activation, residual, residual_layout,
):  # fmt: skip
    seeded(seed)
    padding4 = (*padding, *padding)
    assume(min(output_size(size, kernel, stride, padding4, dilation)) >= 1)
    case = ((batch, groups * channels_per_group, *size), groups * out_per_group, kernel, stride, padding, dilation, groups)
    t, geometry = make(case, layout=layout, bias=bias, epilogue=epilogue)
    if residual is not None:
        t = with_residual(t, geometry, residual_layout)
    run(backend, t, geometry, activation=activation, after=residual == "before-activation")
    t.pop("residual", None)
    # The training route's statistics of the same convolution, as stored.
    x, weight = t["x"].detach(), t["weight"].detach()
    bias_ = t["bias"].detach() if bias else None
    c, mean, var = run_backend(
        backend, torch.ops.fastconv.conv2d_batch_stats, x, weight, bias_, stride, padding4, dilation, groups
    )
    if c.numel():
        expected_var, expected_mean = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
        torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var.double(), expected_var, rtol=1e-4, atol=1e-6)
