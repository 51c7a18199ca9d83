"""The per-channel affine a training BatchNorm applies, shared by the reference and the kernels.

A training BatchNorm's forward (bn_act with these) and its backward must compute the very same
z = c * scale + shift, or the activation's kinks (ReLU at 0, ReLU6 at 6) fall on different
elements in the two passes. So the reference and the Triton/CUDA hosts both take it from here.
"""

from __future__ import annotations

from typing import Optional

import torch


def batch_norm_scale_shift(
    mean: torch.Tensor, invstd: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) = (w * invstd, b - mean * scale) in invstd's dtype; w = 1, b = 0 if None."""
    dtype = invstd.dtype
    w = weight.to(dtype) if weight is not None else torch.ones_like(invstd)
    b = bias.to(dtype) if bias is not None else torch.zeros_like(invstd)
    scale = w * invstd
    return scale, b - mean.to(dtype) * scale
