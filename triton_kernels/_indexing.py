"""Index arithmetic shared by the Triton kernels: pixel offsets, stride merging, 64-bit need.

A "pixel" is one (n, h, w) position. Where the pixel dims of every tensor of a call merge into
one stride (channels_last, and channel slices of it), kernels index pixels by one number;
otherwise they split it into (n, h, w) and use all three strides, never copying an input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastconv.triton_kernels._tuning import parallel_programs

# Largest grid along axes 1 and 2 that CUDA allows.
MAX_GRID_Y = 65535


@triton.jit
def pixel_offsets(pixels, H, W, stride_n, stride_h, stride_w, MERGED: tl.constexpr):
    """Offsets of pixel numbers (n*H + h)*W + w; when MERGED, stride_w is the merged stride."""
    if MERGED:
        return pixels * stride_w
    w = pixels % W
    rest = pixels // W
    return (rest // H) * stride_n + (rest % H) * stride_h + w * stride_w


@triton.jit
def pixel_coordinates(pixels, H, W):
    """(n, h, w) of pixel numbers (n*H + h)*W + w."""
    w = pixels % W
    rest = pixels // W
    return rest // H, rest % H, w


def merged_stride(sizes: tuple[int, ...], strides: tuple[int, ...]) -> int | None:
    """The stride s with element i of the flattened dims at offset i * s, or None if none exists.

    Dimensions of size 1 take any stride. This is what lets a kernel index a channels_last
    tensor, or a channel slice of one, by a single row index without dividing by H and W.
    """
    dims = [(size, stride) for size, stride in zip(sizes, strides) if size != 1]
    if not dims:
        return 1
    inner = dims[-1][1]
    expected = inner
    for size, stride in reversed(dims):
        if stride != expected:
            return None
        expected = stride * size
    return inner


def pixel_strides(tensors: list[torch.Tensor]) -> tuple[bool, list[tuple[int, int, int]]]:
    """(merged, per-tensor (n, h, w) strides); when merged, each triple is (0, 0, merged stride)."""
    n, _, h, w = tensors[0].shape
    merged = [merged_stride((n, h, w), (t.stride(0), t.stride(2), t.stride(3))) for t in tensors]
    if all(stride is not None for stride in merged):
        return True, [(0, 0, stride) for stride in merged]
    return False, [(t.stride(0), t.stride(2), t.stride(3)) for t in tensors]


def needs_64bit_index(tensors: list[torch.Tensor], headroom: int) -> bool:
    """Whether some offset may pass 2**31: the largest element offset of any tensor, or its
    element count, plus `headroom` for the overshoot of a kernel's masked lanes."""
    limit = 2**31 - 1 - headroom
    return any(
        sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) > limit or t.numel() > limit
        for t in tensors
    )


def reduction_split(work_blocks: int, other_programs: int, device: torch.device) -> int:
    """How many programs share one reduction: enough to fill the device, no more than blocks."""
    wanted = triton.cdiv(parallel_programs(device), max(other_programs, 1))
    return max(1, min(wanted, work_blocks, MAX_GRID_Y))
