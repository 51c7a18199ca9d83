"""bn_act in Triton: y = act(x * scale[c] + shift[c]), forward and backward.

The op is memory-bound (one read and one write per element forward; two reads and one write
backward), so the kernels are shaped by the layout, not the arithmetic:

* "rows" kernels serve tensors whose channels are innermost (channels_last, and channel slices
  of a channels_last buffer): a program owns BLOCK_R pixels x BLOCK_C channels, loads its
  scale and shift once, and reads each pixel's channels as one contiguous vector.
* "planes" kernels serve everything else (NCHW, spatial slices, broadcast gradients): a
  program owns one (n, c) plane, so scale and shift are scalars, and walks it BLOCK_S at a time.

When the pixel dimensions of every tensor merge into one stride (`merged_stride`), the kernels
index by a single row or pixel number; otherwise they divide it into (n, h, w) and use all the
strides, so that no input is ever copied to make it contiguous.

The backward reduction over N, H and W (for grad_scale and grad_shift) is deterministic: each
program sums a fixed share of the pixels into its own slot of a partials buffer, and the host
sums the partials in a fixed order. No float atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastconv._geometry import accumulate_dtype, channels_innermost
from fastconv.triton_kernels._indexing import (
    MAX_GRID_Y,
    merged_stride,
    needs_64bit_index,
    pixel_offsets,
    pixel_strides,
    reduction_split,
)
from fastconv.triton_kernels._tuning import autotune
from fastconv.triton_kernels.activations import activation_derivative, apply_activation

# Offsets past 2**31 - 1 - this take the 64-bit path: room for one block of masked overshoot.
_INDEX_HEADROOM = 4096

_ROWS_CONFIGS = [
    # (BLOCK_R, BLOCK_C): the first config is the one the CPU interpreter uses.
    triton.Config({"BLOCK_R": 64, "BLOCK_C": 32}, num_warps=4),
    triton.Config({"BLOCK_R": 32, "BLOCK_C": 64}, num_warps=4),
    triton.Config({"BLOCK_R": 64, "BLOCK_C": 64}, num_warps=4),
    triton.Config({"BLOCK_R": 128, "BLOCK_C": 32}, num_warps=4),
    triton.Config({"BLOCK_R": 16, "BLOCK_C": 128}, num_warps=4),
    triton.Config({"BLOCK_R": 64, "BLOCK_C": 128}, num_warps=8),
    triton.Config({"BLOCK_R": 32, "BLOCK_C": 256}, num_warps=8),
]
_PLANES_CONFIGS = [
    triton.Config({"BLOCK_S": 256}, num_warps=4),
    triton.Config({"BLOCK_S": 512}, num_warps=4),
    triton.Config({"BLOCK_S": 1024}, num_warps=4),
    triton.Config({"BLOCK_S": 2048}, num_warps=8),
    triton.Config({"BLOCK_S": 4096}, num_warps=8),
]
_SMALLEST_BLOCK_R = 16
_SMALLEST_BLOCK_S = 256


@triton.jit
def _spatial_offsets(spatial, W, stride_h, stride_w, MERGED: tl.constexpr):
    """Offsets of spatial positions h*W + w within one plane."""
    if MERGED:
        return spatial * stride_w
    return (spatial // W) * stride_h + (spatial % W) * stride_w


@autotune(configs=_ROWS_CONFIGS, key=["C", "R", "ACTIVATION", "MERGED"])
@triton.jit
def _rows_forward(
    x_ptr, y_ptr, scale_ptr, shift_ptr,
    R, C, H, W,  # R = N*H*W pixels, C channels; H and W split a pixel number when not MERGED
    x_sn, x_sh, x_sw,  # strides of x over n, h, w (its channel stride is 1)
    y_sn, y_sh, y_sw,  # the same for y
    ACTIVATION: tl.constexpr,  # code from fastconv.activations
    MERGED: tl.constexpr,  # pixel dims merge into the stride passed as *_sw
    INDEX_64: tl.constexpr,  # some offset may exceed 2**31
    WIDE: tl.constexpr,  # compute in float64 (float64 inputs) instead of float32
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    block = tl.program_id(0)
    if INDEX_64:
        block = block.to(tl.int64)  # before the multiply, which would overflow in int32
    pixels = block * BLOCK_R + tl.arange(0, BLOCK_R)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    scale = tl.load(scale_ptr + channels, mask=channel_mask, other=0.0).to(compute)
    shift = tl.load(shift_ptr + channels, mask=channel_mask, other=0.0).to(compute)

    mask = (pixels < R)[:, None] & channel_mask[None, :]
    x_offsets = pixel_offsets(pixels, H, W, x_sn, x_sh, x_sw, MERGED)[:, None] + channels[None, :]
    y_offsets = pixel_offsets(pixels, H, W, y_sn, y_sh, y_sw, MERGED)[:, None] + channels[None, :]
    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(compute)
    y = apply_activation(x * scale[None, :] + shift[None, :], ACTIVATION)
    tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@autotune(configs=_PLANES_CONFIGS, key=["C", "HW", "ACTIVATION", "MERGED"])
@triton.jit
def _planes_forward(
    x_ptr, y_ptr, scale_ptr, shift_ptr,
    C, HW, W,  # channels; pixels per plane; W splits a spatial index when not MERGED
    x_sn, x_sc, x_sh, x_sw,  # strides of x
    y_sn, y_sc, y_sh, y_sw,  # strides of y
    ACTIVATION: tl.constexpr, MERGED: tl.constexpr, INDEX_64: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    plane = tl.program_id(0)  # n * C + c
    if INDEX_64:
        plane = plane.to(tl.int64)
    n = plane // C
    c = plane % C
    scale = tl.load(scale_ptr + c).to(compute)
    shift = tl.load(shift_ptr + c).to(compute)
    x_plane = x_ptr + n * x_sn + c * x_sc
    y_plane = y_ptr + n * y_sn + c * y_sc
    # Axis 1 is capped at 65535 programs, so a program walks every num_programs(1)-th block.
    for start in range(tl.program_id(1) * BLOCK_S, HW, tl.num_programs(1) * BLOCK_S):
        spatial = start + tl.arange(0, BLOCK_S)
        mask = spatial < HW
        x = tl.load(x_plane + _spatial_offsets(spatial, W, x_sh, x_sw, MERGED), mask=mask, other=0.0)
        y = apply_activation(x.to(compute) * scale + shift, ACTIVATION)
        tl.store(y_plane + _spatial_offsets(spatial, W, y_sh, y_sw, MERGED), y.to(y_ptr.dtype.element_ty), mask=mask)


@autotune(configs=_ROWS_CONFIGS, key=["C", "R", "ACTIVATION", "MERGED"])
@triton.jit
def _rows_backward(
    g_ptr, x_ptr, gx_ptr, scale_ptr, shift_ptr,
    partial_scale_ptr, partial_shift_ptr,  # [num_programs(0), C] partial sums, one row per program
    R, C, H, W,
    g_sn, g_sh, g_sw, x_sn, x_sh, x_sw, gx_sn, gx_sh, gx_sw,
    ACTIVATION: tl.constexpr, MERGED: tl.constexpr, INDEX_64: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    scale = tl.load(scale_ptr + channels, mask=channel_mask, other=0.0).to(compute)
    shift = tl.load(shift_ptr + channels, mask=channel_mask, other=0.0).to(compute)
    sum_scale = tl.zeros([BLOCK_C], dtype=compute)
    sum_shift = tl.zeros([BLOCK_C], dtype=compute)
    # Each program takes every num_programs(0)-th block of pixels: a fixed share, so that the
    # partial sums, and hence the gradients, are the same on every run.
    for start in range(tl.program_id(0) * BLOCK_R, R, tl.num_programs(0) * BLOCK_R):
        pixels = start + tl.arange(0, BLOCK_R)
        if INDEX_64:
            pixels = pixels.to(tl.int64)
        mask = (pixels < R)[:, None] & channel_mask[None, :]
        g_offsets = pixel_offsets(pixels, H, W, g_sn, g_sh, g_sw, MERGED)[:, None] + channels[None, :]
        x_offsets = pixel_offsets(pixels, H, W, x_sn, x_sh, x_sw, MERGED)[:, None] + channels[None, :]
        gx_offsets = pixel_offsets(pixels, H, W, gx_sn, gx_sh, gx_sw, MERGED)[:, None] + channels[None, :]
        g = tl.load(g_ptr + g_offsets, mask=mask, other=0.0).to(compute)
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(compute)
        z = x * scale[None, :] + shift[None, :]
        grad_z = tl.where(mask, g * activation_derivative(z, ACTIVATION), 0.0)
        tl.store(gx_ptr + gx_offsets, (grad_z * scale[None, :]).to(gx_ptr.dtype.element_ty), mask=mask)
        sum_scale += tl.sum(grad_z * x, axis=0)
        sum_shift += tl.sum(grad_z, axis=0)
    partial_offsets = tl.program_id(0) * C + channels
    tl.store(partial_scale_ptr + partial_offsets, sum_scale, mask=channel_mask)
    tl.store(partial_shift_ptr + partial_offsets, sum_shift, mask=channel_mask)


@autotune(configs=_PLANES_CONFIGS, key=["C", "HW", "ACTIVATION", "MERGED"])
@triton.jit
def _planes_backward(
    g_ptr, x_ptr, gx_ptr, scale_ptr, shift_ptr,
    partial_scale_ptr, partial_shift_ptr,  # [num_programs(1), N * C] partial sums
    NC, C, HW, W,
    g_sn, g_sc, g_sh, g_sw, x_sn, x_sc, x_sh, x_sw, gx_sn, gx_sc, gx_sh, gx_sw,
    ACTIVATION: tl.constexpr, MERGED: tl.constexpr, INDEX_64: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    plane = tl.program_id(0)
    if INDEX_64:
        plane = plane.to(tl.int64)
    n = plane // C
    c = plane % C
    scale = tl.load(scale_ptr + c).to(compute)
    shift = tl.load(shift_ptr + c).to(compute)
    g_plane = g_ptr + n * g_sn + c * g_sc
    x_plane = x_ptr + n * x_sn + c * x_sc
    gx_plane = gx_ptr + n * gx_sn + c * gx_sc
    sum_scale = tl.zeros([BLOCK_S], dtype=compute)
    sum_shift = tl.zeros([BLOCK_S], dtype=compute)
    for start in range(tl.program_id(1) * BLOCK_S, HW, tl.num_programs(1) * BLOCK_S):
        spatial = start + tl.arange(0, BLOCK_S)
        mask = spatial < HW
        g = tl.load(g_plane + _spatial_offsets(spatial, W, g_sh, g_sw, MERGED), mask=mask, other=0.0).to(compute)
        x = tl.load(x_plane + _spatial_offsets(spatial, W, x_sh, x_sw, MERGED), mask=mask, other=0.0).to(compute)
        grad_z = tl.where(mask, g * activation_derivative(x * scale + shift, ACTIVATION), 0.0)
        gx = (grad_z * scale).to(gx_ptr.dtype.element_ty)
        tl.store(gx_plane + _spatial_offsets(spatial, W, gx_sh, gx_sw, MERGED), gx, mask=mask)
        sum_scale += grad_z * x
        sum_shift += grad_z
    slot = tl.program_id(1) * NC + plane
    tl.store(partial_scale_ptr + slot, tl.sum(sum_scale, axis=0))
    tl.store(partial_shift_ptr + slot, tl.sum(sum_shift, axis=0))


# --------------------------------------------------------------------------------------------
# Host side: layout analysis, allocation and launch.


def _spatial_strides(tensors: list[torch.Tensor]) -> tuple[bool, list[tuple[int, int, int, int]]]:
    """(merged, per-tensor (n, c, h, w) strides), h and w merged into the last when possible."""
    _, _, h, w = tensors[0].shape
    merged = [merged_stride((h, w), (t.stride(2), t.stride(3))) for t in tensors]
    if all(stride is not None for stride in merged):
        return True, [(t.stride(0), t.stride(1), 0, stride) for t, stride in zip(tensors, merged)]
    return False, [tuple(t.stride()) for t in tensors]


def channels_innermost_all(tensors: list[torch.Tensor]) -> bool:
    """The "rows" kernels serve a call when every tensor's channels are innermost."""
    return all(channels_innermost(t) for t in tensors)


def _flags(x: torch.Tensor, tensors: list[torch.Tensor], activation: int) -> dict:
    return dict(ACTIVATION=activation, INDEX_64=needs_64bit_index(tensors, _INDEX_HEADROOM), WIDE=x.dtype == torch.float64)


def bn_act_forward(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """act(x * scale[c] + shift[c]); y keeps x's memory format (torch.empty_like's rule), or is
    `out` when given (x's shape, any strides: a channel slice of a wider buffer)."""
    y = torch.empty_like(x) if out is None else out
    if x.numel() == 0:
        return y
    N, C, H, W = x.shape
    flags = _flags(x, [x, y], activation)
    if channels_innermost_all([x, y]):
        merged, (xs, ys) = pixel_strides([x, y])
        grid = lambda meta: (triton.cdiv(N * H * W, meta["BLOCK_R"]), triton.cdiv(C, meta["BLOCK_C"]))
        _rows_forward[grid](x, y, scale, shift, N * H * W, C, H, W, *xs, *ys, MERGED=merged, **flags)
    else:
        merged, (xs, ys) = _spatial_strides([x, y])
        grid = lambda meta: (N * C, min(triton.cdiv(H * W, meta["BLOCK_S"]), MAX_GRID_Y))
        _planes_forward[grid](x, y, scale, shift, C, H * W, W, *xs, *ys, MERGED=merged, **flags)
    return y


def bn_act_backward(
    grad_y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_scale, grad_shift); the parameter grads in scale's dtype."""
    grad_x = torch.empty_like(x)
    N, C, H, W = x.shape
    accumulate = accumulate_dtype(x.dtype)
    if x.numel() == 0:
        zeros = torch.zeros(C, dtype=scale.dtype, device=x.device)
        return grad_x, zeros, zeros.clone()
    tensors = [grad_y, x, grad_x]
    flags = _flags(x, tensors, activation)
    if channels_innermost_all(tensors):
        merged, strides = pixel_strides(tensors)
        R = N * H * W
        split = reduction_split(triton.cdiv(R, _SMALLEST_BLOCK_R), triton.cdiv(C, 64), x.device)
        partial_scale = torch.empty(split, C, dtype=accumulate, device=x.device)
        partial_shift = torch.empty_like(partial_scale)
        grid = lambda meta: (split, triton.cdiv(C, meta["BLOCK_C"]))
        _rows_backward[grid](
            grad_y, x, grad_x, scale, shift, partial_scale, partial_shift, R, C, H, W,
            *strides[0], *strides[1], *strides[2], MERGED=merged, **flags,
        )
    else:
        merged, strides = _spatial_strides(tensors)
        split = reduction_split(triton.cdiv(H * W, _SMALLEST_BLOCK_S), N * C, x.device)
        partial_scale = torch.empty(split, N, C, dtype=accumulate, device=x.device)
        partial_shift = torch.empty_like(partial_scale)
        grid = (N * C, split)
        _planes_backward[grid](
            grad_y, x, grad_x, scale, shift, partial_scale, partial_shift, N * C, C, H * W, W,
            *strides[0], *strides[1], *strides[2], MERGED=merged, **flags,
        )
        partial_scale = partial_scale.view(split * N, C)
        partial_shift = partial_shift.view(split * N, C)
    # torch.sum reduces in a fixed order for a fixed shape: the second, deterministic stage.
    return grad_x, partial_scale.sum(0).to(scale.dtype), partial_shift.sum(0).to(shift.dtype)


