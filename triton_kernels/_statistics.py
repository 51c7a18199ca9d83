"""The host half of fastconv's fused batch statistics: merging per-program partials.

Kernels that compute BatchNorm statistics (conv_bn_act's epilogue, batch_norm.channel_stats)
reduce what each program saw to a count, a mean and M2 (the sum of squared deviations from that
mean), per channel. Chan et al.'s formula for combining partitions merges them:

    mean = sum n_i mean_i / n,    M2 = sum M2_i + sum n_i (mean_i - mean)^2,    var = M2 / n.

Deviations are taken from means and no raw sum of squares is ever formed, so the variance keeps
its precision when |mean| >> std (E[c^2] - mean^2 in float32 loses it all at mean/std ~ 1000).
The device half: `tile_moments` reduces a register tile, `chan_merge` folds a block into a
program's running triple. The host half, `merge_partitions`, merges the programs' partials; it
runs in float64 over programs x channels numbers, and torch's fixed-shape sums make it
deterministic: no atomics anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def merge_partitions(
    counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor, total: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel from [partitions, C] partials; counts may be [P, 1].

    A partition with count 0 must have mean 0 and M2 0: it then adds nothing.
    """
    counts, means, m2s = counts.double(), means.double(), m2s.double()
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return mean.to(dtype), (m2 / total).to(dtype)


@triton.jit
def tile_moments(s, valid, count, AXIS: tl.constexpr):
    """(mean, M2) along AXIS (0 or 1) of a 2-D tile s, over its `valid` entries (s is zero
    elsewhere), `count` of them per line (> 0). mean is float64, M2 s's dtype.

    A corrected two-pass: a rough mean, then the deviations d from it, and the mean refined by
    their mean: rough + sum(d)/count, in float64, so that a tile's mean keeps digits below one
    float32 ulp of itself. Those matter when |mean| >> std: the host merges tiles through
    count * (tile mean - mean)^2, and a float32 tile mean off by a unit of its sum's rounding
    (1e-4 at 1000) put 1e-5 to 6e-5 relative error into the variance of 1000 + N(0, 1); refined
    it is ~1e-7. M2 = sum(d^2) - sum(d)^2/count is then about that refined mean.
    """
    rough = tl.sum(s, axis=AXIS) / count
    if AXIS == 0:
        d = tl.where(valid, s - rough[None, :], 0.0)
    else:
        d = tl.where(valid, s - rough[:, None], 0.0)
    d_sum = tl.sum(d, axis=AXIS)
    correction = d_sum / count
    mean = rough.to(tl.float64) + correction.to(tl.float64)
    m2 = tl.maximum(tl.sum(d * d, axis=AXIS) - d_sum * correction, 0.0)
    return mean, m2


@triton.jit
def chan_merge(count, mean, m2, block_count, block_mean, block_m2):
    """Merge a block's (count, mean, M2) into a running one; block_count > 0, count >= 0."""
    total = count + block_count
    weight = block_count / total
    delta = block_mean - mean
    return total, mean + delta * weight, m2 + block_m2 + delta * delta * (count * weight)
