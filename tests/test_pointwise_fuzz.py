"""pointwise_conv2d on random shapes, layouts and fusions, drawn by hypothesis."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastconv.ops import pointwise as pointwise_ops
from harness import FUZZ_LAYOUTS, backends_under_test, seeded
from test_pointwise import make, run

FUZZ_BACKENDS = [p for p in backends_under_test(pointwise_ops.FORWARD) if p.values[0] != "cuda" or torch.cuda.is_available()]


@pytest.mark.parametrize("backend", FUZZ_BACKENDS)
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.tuples(st.integers(0, 2), st.integers(1, 40), st.integers(1, 9), st.integers(1, 9)),
    out_channels=st.integers(1, 40),
    layout=st.sampled_from(FUZZ_LAYOUTS),
    epilogue=st.booleans(),
    residual=st.booleans(),
    prologue=st.booleans(),
    activation=st.sampled_from([None, "relu", "silu"]),
    after=st.booleans(),
)
def test_random_fusions_match_float64(backend, seed, shape, out_channels, layout, epilogue, residual, prologue, activation, after):
    seeded(seed)
    tensors = make(shape, out_channels, layout=layout, epilogue=epilogue, residual=residual, prologue=prologue)
    run(backend, tensors, activation=activation, after=after, in_activation="relu" if prologue else None)
