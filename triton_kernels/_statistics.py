"""The host half of fastconv's fused batch statistics: merging per-program partials.

Kernels that compute BatchNorm statistics (conv_gemm's epilogue, batch_norm.channel_stats)
reduce what each program saw to a count, a mean and M2 (the sum of squared deviations from that
mean), per channel. Chan et al.'s formula for combining partitions merges them:

    mean = sum n_i mean_i / n,    M2 = sum M2_i + sum n_i (mean_i - mean)^2,    var = M2 / n.

Deviations are taken from means and no raw sum of squares is ever formed, so the variance keeps
its precision when |mean| >> std (E[c^2] - mean^2 in float32 loses it all at mean/std ~ 1000).
The merge runs in float64 over programs x channels numbers, and torch's fixed-shape sums make it
deterministic: no atomics anywhere.
"""

from __future__ import annotations

import torch


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
