"""Hypothesis strategies the fuzz tests share: strided 4-D views of any memory order, with steps,
offsets and expanded (stride-0) dimensions, as broadcasting and `Tensor.expand` make them (the
gradient of `y.sum()` arrives as one), and the layouts of the tests' own `random_tensor`."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from harness import DEVICE


@st.composite
def strided_views(draw, min_batch: int = 0, max_size: int = 6, expanded: bool = True):
    """A builder of a 4-D (N, C, H, W) view of a larger buffer whose dims lie in any memory
    order, with steps and offsets; with `expanded`, any dimension may have stride 0 (one value
    repeated along it). Built after seeding: the data comes from torch's generator, the
    geometry from hypothesis."""
    shape = [draw(st.integers(min_batch if i == 0 else 1, max_size)) for i in range(4)]
    order = draw(st.permutations(range(4)))  # memory order, outermost first
    steps = [draw(st.sampled_from((1, 1, 2))) for _ in range(4)]
    offsets = [draw(st.integers(0, 2)) for _ in range(4)]
    repeated = [expanded and draw(st.sampled_from((False, False, False, True))) for _ in range(4)]
    stored = [1 if repeated[d] else shape[d] for d in range(4)]
    buffer_shape = [offsets[d] + max(stored[d], 1) * steps[d] for d in order]
    index = tuple(slice(offsets[d], offsets[d] + stored[d] * steps[d], steps[d]) for d in range(4))

    def build(dtype: torch.dtype = torch.float32, scale: float = 3.0) -> torch.Tensor:
        buffer = (torch.randn(buffer_shape, device=DEVICE) * scale).to(dtype)
        view = buffer.permute([order.index(d) for d in range(4)])[index]  # back to (N, C, H, W)
        return view.expand(shape) if any(repeated) else view

    build.shape = tuple(shape)
    build.expanded = any(repeated) and any(shape[d] > 1 for d in range(4) if repeated[d])
    return build
