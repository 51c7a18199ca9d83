"""Pieces the convolution ops share: output layout, ATen's backward, the epilogue's backward."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fastconv._geometry import output_memory_format


def in_layout(result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`result` with the layout the kernels give (output_memory_format of x)."""
    memory_format = output_memory_format(x)
    return result if result.is_contiguous(memory_format=memory_format) else result.contiguous(memory_format=memory_format)


def call_key(x: torch.Tensor, weight: torch.Tensor, *rest) -> tuple:
    """What `auto` caches its choice by: shapes, layout, dtypes and the op's options."""
    return (tuple(x.shape), x.stride(), tuple(weight.shape), x.dtype, x.device) + tuple(
        tuple(r) if isinstance(r, (list, tuple)) else (r.dtype if isinstance(r, torch.Tensor) else r) for r in rest
    )


def convolution_backward(
    grad_c: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    output_mask: list[bool],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_x, grad_weight) of the plain convolution by ATen's convolution_backward (cuDNN on
    a GPU). Asymmetric padding, which ATen cannot express, pads x explicitly (a copy).

    Autograd cannot be used in here: an op's implementation runs below the autograd key.
    """
    top, left, bottom, right = padding
    symmetric = (top, left) == (bottom, right)
    padded = x if symmetric else F.pad(x, (left, right, top, bottom))
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_c, padded, weight, None, list(stride), [top, left] if symmetric else [0, 0], list(dilation),
        False, [0, 0], groups, output_mask,
    )  # fmt: skip
    if grad_x is not None and not symmetric:
        grad_x = grad_x[:, :, top : top + x.shape[2], left : left + x.shape[3]]
    return grad_x, grad_weight


def has_epilogue(scale, shift, activation) -> bool:
    return scale is not None or shift is not None or activation is not None


def filled_scale_shift(scale, shift, channels: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """scale and shift for bn_act and its backward, which want both in one dtype: an absent one
    is 1 or 0 in the given one's dtype (float32 when neither is given). A float64 shift alone
    once became float32 here, which cost float64 gradients 1e-7 of relative precision."""
    given = scale if scale is not None else shift
    dtype = given.dtype if given is not None else torch.float32
    scale = scale if scale is not None else torch.ones(channels, dtype=dtype, device=device)
    shift = shift if shift is not None else torch.zeros(channels, dtype=dtype, device=device)
    return scale, shift.to(scale.dtype)


def epilogue_backward(grad_y, c, scale, shift, activation):
    """(grad_c, grad_scale, grad_shift) of y = act(c * scale + shift), through bn_act's backward;
    an absent scale or shift is 1 or 0."""
    return torch.ops.fastconv.bn_act_backward(grad_y, c, *filled_scale_shift(scale, shift, c.shape[1], c.device),
                                              activation)  # fmt: skip
