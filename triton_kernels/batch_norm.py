"""Training-mode BatchNorm in Triton: the batch statistics, and the backward through them.

A fused Conv -> BN -> activation unit in training writes c = conv(x), takes its per-channel
batch statistics with `channel_stats`, and normalises with bn_act's forward kernel, using
scale = weight * invstd and shift = bias - mean * scale (`batch_norm_scale_shift`). Its backward is
`batch_norm_act_backward`: the gradient flows through the statistics too, as in
torch.nn.functional.batch_norm(training=True).

The kernels follow bn_act's layout split (fastconv/triton_kernels/bn_act.py): "rows" kernels
for tensors whose channels are innermost (channels_last and its channel slices), "planes"
kernels, one program per (n, c) plane, for everything else; no input is ever copied.

Every reduction is deterministic: each program reduces a fixed share of the pixels into its own
slot of a partials buffer, and the host combines the partials with torch ops, whose order is
fixed for a fixed shape. No float atomics.

Statistics are numerically stable when |mean| >> std: a program never sums raw squares. It
subtracts a pivot (its first value of the channel) from what it loads, reduces each block to
(count, mean, M2 = sum of squared deviations from the block's own mean), merges that into its
running triple with Chan's formula, and the host merges the programs' triples the same way,
in float64 (they are small). Seen on 1000 + 2 N(0, 1) in float32: the variance within one
float32 ulp of float64's, where sum(c**2)/R - mean**2 is 0.2 to 0.5 off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastconv._affine import batch_norm_scale_shift
from fastconv._geometry import accumulate_dtype
from fastconv.triton_kernels._indexing import (
    MAX_GRID_Y,
    needs_64bit_index,
    pixel_offsets,
    pixel_strides,
    reduction_split,
)
from fastconv.triton_kernels._statistics import chan_merge, merge_partitions
from fastconv.triton_kernels._tuning import autotune
from fastconv.triton_kernels.activations import activation_derivative
from fastconv.triton_kernels.bn_act import (
    _INDEX_HEADROOM,
    _PLANES_CONFIGS,
    _ROWS_CONFIGS,
    _SMALLEST_BLOCK_R,
    _SMALLEST_BLOCK_S,
    channels_innermost_all,
    _flags,
    _spatial_offsets,
    _spatial_strides,
)


# --------------------------------------------------------------------------------------------
# Batch statistics: per program, (count, mean, M2) of its share of each channel.


@autotune(configs=_ROWS_CONFIGS, key=["C", "R", "MERGED"])
@triton.jit
def _rows_stats(
    c_ptr,
    # [num_programs(0), C] partials, one row per program: (count, mean, M2) of c - pivot, and
    # the pivot (kept apart: the host adds it in float64, where no digit of the mean is lost)
    count_ptr, mean_ptr, m2_ptr, pivot_ptr,
    R, C, H, W,  # R = N*H*W pixels, C channels; H and W split a pixel number when not MERGED
    c_sn, c_sh, c_sw,  # strides of c over n, h, w (its channel stride is 1)
    MERGED: tl.constexpr,  # pixel dims merge into the stride passed as c_sw
    INDEX_64: tl.constexpr,  # some offset may exceed 2**31
    WIDE: tl.constexpr,  # compute in float64 (float64 input) instead of float32
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    first = tl.program_id(0)
    if INDEX_64:
        first = first.to(tl.int64)
    first = first * BLOCK_R
    # The program's first value of each channel is its pivot: the sums are of c - pivot, small
    # beside |mean| when std is, so that block means, and their deltas, keep their digits.
    pivot_offsets = pixel_offsets(first, H, W, c_sn, c_sh, c_sw, MERGED) + channels
    pivot = tl.load(c_ptr + pivot_offsets, mask=channel_mask & (first < R), other=0.0).to(compute)
    # Counts in float, as merge weights: exact to 2**24 pixels per program in float32.
    count = tl.zeros([BLOCK_C], dtype=compute)
    mean = tl.zeros([BLOCK_C], dtype=compute)  # of c - pivot
    m2 = tl.zeros([BLOCK_C], dtype=compute)
    # Every num_programs(0)-th block of pixels: a fixed share, the same on every run.
    for start in range(first, R, tl.num_programs(0) * BLOCK_R):
        pixels = start + tl.arange(0, BLOCK_R)
        pixel_mask = pixels < R
        mask = pixel_mask[:, None] & channel_mask[None, :]
        offsets = pixel_offsets(pixels, H, W, c_sn, c_sh, c_sw, MERGED)[:, None] + channels[None, :]
        x = tl.load(c_ptr + offsets, mask=mask, other=0.0).to(compute)
        x = tl.where(mask, x - pivot[None, :], 0.0)
        block_count = tl.sum(pixel_mask.to(compute), axis=0)
        block_mean = tl.sum(x, axis=0) / block_count
        deviation = tl.where(mask, x - block_mean[None, :], 0.0)
        count, mean, m2 = chan_merge(count, mean, m2, block_count, block_mean, tl.sum(deviation * deviation, axis=0))
    offsets = tl.program_id(0) * C + channels
    tl.store(count_ptr + offsets, count, mask=channel_mask)
    tl.store(mean_ptr + offsets, mean, mask=channel_mask)
    tl.store(pivot_ptr + offsets, pivot, mask=channel_mask)
    tl.store(m2_ptr + offsets, m2, mask=channel_mask)


@autotune(configs=_PLANES_CONFIGS, key=["C", "HW", "MERGED"])
@triton.jit
def _planes_stats(
    c_ptr,
    count_ptr, mean_ptr, m2_ptr, pivot_ptr,  # [num_programs(1), N * C] partials, as _rows_stats's
    NC, C, HW, W,  # planes; channels; pixels per plane; W splits a spatial index when not MERGED
    c_sn, c_sc, c_sh, c_sw,  # strides of c
    MERGED: tl.constexpr, INDEX_64: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    plane = tl.program_id(0)  # n * C + c
    if INDEX_64:
        plane = plane.to(tl.int64)
    n = plane // C
    c = plane % C
    c_plane = c_ptr + n * c_sn + c * c_sc
    first = tl.program_id(1) * BLOCK_S
    pivot = tl.load(c_plane + _spatial_offsets(first, W, c_sh, c_sw, MERGED), mask=first < HW, other=0.0).to(compute)
    count = tl.full([], 0.0, compute)
    mean = tl.full([], 0.0, compute)  # of c - pivot
    m2 = tl.full([], 0.0, compute)
    for start in range(first, HW, tl.num_programs(1) * BLOCK_S):
        spatial = start + tl.arange(0, BLOCK_S)
        mask = spatial < HW
        x = tl.load(c_plane + _spatial_offsets(spatial, W, c_sh, c_sw, MERGED), mask=mask, other=0.0).to(compute)
        x = tl.where(mask, x - pivot, 0.0)
        block_count = tl.sum(mask.to(compute), axis=0)
        block_mean = tl.sum(x, axis=0) / block_count
        deviation = tl.where(mask, x - block_mean, 0.0)
        count, mean, m2 = chan_merge(count, mean, m2, block_count, block_mean, tl.sum(deviation * deviation, axis=0))
    slot = tl.program_id(1) * NC + plane
    tl.store(count_ptr + slot, count)
    tl.store(mean_ptr + slot, mean)
    tl.store(pivot_ptr + slot, pivot)
    tl.store(m2_ptr + slot, m2)


# --------------------------------------------------------------------------------------------
# Backward, pass 1: per program, sum(g) and sum(g * (c - mean)) of its share, g = grad_y * act'(z).


@autotune(configs=_ROWS_CONFIGS, key=["C", "R", "ACTIVATION", "MERGED"])
@triton.jit
def _rows_grad_sums(
    g_ptr, c_ptr, scale_ptr, shift_ptr, mean_ptr,
    sum_g_ptr, sum_gx_ptr,  # [num_programs(0), C] partial sums, one row per program
    R, C, H, W,
    g_sn, g_sh, g_sw, c_sn, c_sh, c_sw,  # (n, h, w) strides of grad_y and c
    ACTIVATION: tl.constexpr,  # code from fastconv.activations
    MERGED: tl.constexpr, INDEX_64: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    scale = tl.load(scale_ptr + channels, mask=channel_mask, other=0.0).to(compute)
    shift = tl.load(shift_ptr + channels, mask=channel_mask, other=0.0).to(compute)
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0.0).to(compute)
    sum_g = tl.zeros([BLOCK_C], dtype=compute)
    sum_gx = tl.zeros([BLOCK_C], dtype=compute)
    for start in range(tl.program_id(0) * BLOCK_R, R, tl.num_programs(0) * BLOCK_R):
        pixels = start + tl.arange(0, BLOCK_R)
        if INDEX_64:
            pixels = pixels.to(tl.int64)
        mask = (pixels < R)[:, None] & channel_mask[None, :]
        g_offsets = pixel_offsets(pixels, H, W, g_sn, g_sh, g_sw, MERGED)[:, None] + channels[None, :]
        c_offsets = pixel_offsets(pixels, H, W, c_sn, c_sh, c_sw, MERGED)[:, None] + channels[None, :]
        g = tl.load(g_ptr + g_offsets, mask=mask, other=0.0).to(compute)
        x = tl.load(c_ptr + c_offsets, mask=mask, other=0.0).to(compute)
        # z exactly as bn_act's forward computes it, so that the kinks fall on the same side.
        z = x * scale[None, :] + shift[None, :]
        grad_z = tl.where(mask, g * activation_derivative(z, ACTIVATION), 0.0)
        sum_g += tl.sum(grad_z, axis=0)
        sum_gx += tl.sum(grad_z * (x - mean[None, :]), axis=0)
    offsets = tl.program_id(0) * C + channels
    tl.store(sum_g_ptr + offsets, sum_g, mask=channel_mask)
    tl.store(sum_gx_ptr + offsets, sum_gx, mask=channel_mask)


@autotune(configs=_PLANES_CONFIGS, key=["C", "HW", "ACTIVATION", "MERGED"])
@triton.jit
def _planes_grad_sums(
    g_ptr, c_ptr, scale_ptr, shift_ptr, mean_ptr,
    sum_g_ptr, sum_gx_ptr,  # [num_programs(1), N * C] partial sums
    NC, C, HW, W,
    g_sn, g_sc, g_sh, g_sw, c_sn, c_sc, c_sh, c_sw,
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
    mean = tl.load(mean_ptr + c).to(compute)
    g_plane = g_ptr + n * g_sn + c * g_sc
    c_plane = c_ptr + n * c_sn + c * c_sc
    sum_g = tl.zeros([BLOCK_S], dtype=compute)
    sum_gx = tl.zeros([BLOCK_S], dtype=compute)
    for start in range(tl.program_id(1) * BLOCK_S, HW, tl.num_programs(1) * BLOCK_S):
        spatial = start + tl.arange(0, BLOCK_S)
        mask = spatial < HW
        g = tl.load(g_plane + _spatial_offsets(spatial, W, g_sh, g_sw, MERGED), mask=mask, other=0.0).to(compute)
        x = tl.load(c_plane + _spatial_offsets(spatial, W, c_sh, c_sw, MERGED), mask=mask, other=0.0).to(compute)
        grad_z = tl.where(mask, g * activation_derivative(x * scale + shift, ACTIVATION), 0.0)
        sum_g += grad_z
        sum_gx += grad_z * (x - mean)
    slot = tl.program_id(1) * NC + plane
    tl.store(sum_g_ptr + slot, tl.sum(sum_g, axis=0))
    tl.store(sum_gx_ptr + slot, tl.sum(sum_gx, axis=0))


# --------------------------------------------------------------------------------------------
# Backward, pass 2: grad_c = scale * (g - mean_g - (c - mean) * coef), elementwise.
# mean_g = sum(g) / R and coef = invstd**2 * sum(g * (c - mean)) / R come from pass 1.


@autotune(configs=_ROWS_CONFIGS, key=["C", "R", "ACTIVATION", "MERGED"])
@triton.jit
def _rows_grad_input(
    g_ptr, c_ptr, gc_ptr, scale_ptr, shift_ptr, mean_ptr, mean_g_ptr, coef_ptr,
    R, C, H, W,
    g_sn, g_sh, g_sw, c_sn, c_sh, c_sw, gc_sn, gc_sh, gc_sw,
    ACTIVATION: tl.constexpr, MERGED: tl.constexpr, INDEX_64: tl.constexpr, WIDE: tl.constexpr,
    ACCUMULATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    block = tl.program_id(0)
    if INDEX_64:
        block = block.to(tl.int64)  # before the multiply, which would overflow in int32
    pixels = block * BLOCK_R + tl.arange(0, BLOCK_R)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    scale = tl.load(scale_ptr + channels, mask=channel_mask, other=0.0).to(compute)[None, :]
    shift = tl.load(shift_ptr + channels, mask=channel_mask, other=0.0).to(compute)[None, :]
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0.0).to(compute)[None, :]
    mean_g = tl.load(mean_g_ptr + channels, mask=channel_mask, other=0.0).to(compute)[None, :]
    coef = tl.load(coef_ptr + channels, mask=channel_mask, other=0.0).to(compute)[None, :]

    mask = (pixels < R)[:, None] & channel_mask[None, :]
    g_offsets = pixel_offsets(pixels, H, W, g_sn, g_sh, g_sw, MERGED)[:, None] + channels[None, :]
    c_offsets = pixel_offsets(pixels, H, W, c_sn, c_sh, c_sw, MERGED)[:, None] + channels[None, :]
    gc_offsets = pixel_offsets(pixels, H, W, gc_sn, gc_sh, gc_sw, MERGED)[:, None] + channels[None, :]
    g = tl.load(g_ptr + g_offsets, mask=mask, other=0.0).to(compute)
    x = tl.load(c_ptr + c_offsets, mask=mask, other=0.0).to(compute)
    grad_z = g * activation_derivative(x * scale + shift, ACTIVATION)
    grad_c = scale * (grad_z - mean_g - (x - mean) * coef)
    if ACCUMULATE:  # a dense block's gradient buffer: add, in the compute precision
        grad_c += tl.load(gc_ptr + gc_offsets, mask=mask, other=0.0).to(compute)
    tl.store(gc_ptr + gc_offsets, grad_c.to(gc_ptr.dtype.element_ty), mask=mask)


@autotune(configs=_PLANES_CONFIGS, key=["C", "HW", "ACTIVATION", "MERGED"])
@triton.jit
def _planes_grad_input(
    g_ptr, c_ptr, gc_ptr, scale_ptr, shift_ptr, mean_ptr, mean_g_ptr, coef_ptr,
    C, HW, W,
    g_sn, g_sc, g_sh, g_sw, c_sn, c_sc, c_sh, c_sw, gc_sn, gc_sc, gc_sh, gc_sw,
    ACTIVATION: tl.constexpr, MERGED: tl.constexpr, INDEX_64: tl.constexpr, WIDE: tl.constexpr,
    ACCUMULATE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    plane = tl.program_id(0)  # n * C + c
    if INDEX_64:
        plane = plane.to(tl.int64)
    n = plane // C
    c = plane % C
    scale = tl.load(scale_ptr + c).to(compute)
    shift = tl.load(shift_ptr + c).to(compute)
    mean = tl.load(mean_ptr + c).to(compute)
    mean_g = tl.load(mean_g_ptr + c).to(compute)
    coef = tl.load(coef_ptr + c).to(compute)
    g_plane = g_ptr + n * g_sn + c * g_sc
    c_plane = c_ptr + n * c_sn + c * c_sc
    gc_plane = gc_ptr + n * gc_sn + c * gc_sc
    # Axis 1 is capped at 65535 programs, so a program walks every num_programs(1)-th block.
    for start in range(tl.program_id(1) * BLOCK_S, HW, tl.num_programs(1) * BLOCK_S):
        spatial = start + tl.arange(0, BLOCK_S)
        mask = spatial < HW
        g = tl.load(g_plane + _spatial_offsets(spatial, W, g_sh, g_sw, MERGED), mask=mask, other=0.0).to(compute)
        x = tl.load(c_plane + _spatial_offsets(spatial, W, c_sh, c_sw, MERGED), mask=mask, other=0.0).to(compute)
        grad_z = g * activation_derivative(x * scale + shift, ACTIVATION)
        grad_c = scale * (grad_z - mean_g - (x - mean) * coef)
        gc_offsets = _spatial_offsets(spatial, W, gc_sh, gc_sw, MERGED)
        if ACCUMULATE:
            grad_c += tl.load(gc_plane + gc_offsets, mask=mask, other=0.0).to(compute)
        tl.store(gc_plane + gc_offsets, grad_c.to(gc_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side.




def channel_stats(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) per channel of c (N, C, H, W) over N, H and W; var is biased (divides by R).

    With R = N*H*W: mean = sum(c) / R, var = sum((c - mean)**2) / R, in float32 (float64 for
    float64 c), NaN for both when R == 0 (as torch.var_mean). Any strides; c is never copied.

    Traffic: reads c once, 1 element read (c.element_size() bytes) per element, writes nothing
    per element; the partials are O(programs x C). Each program reduces every block it loads
    (less a pivot) to (count, mean, M2) and merges them with Chan's formula, so a large mean
    does not cancel the variance away; the host merges the programs' partials in float64, in
    a fixed order.
    """
    N, C, H, W = c.shape
    accumulate = accumulate_dtype(c.dtype)
    R = N * H * W
    if R == 0 or C == 0:
        nan = torch.full((C,), float("nan"), dtype=accumulate, device=c.device)
        return nan, nan.clone()
    flags = dict(INDEX_64=needs_64bit_index([c], _INDEX_HEADROOM), WIDE=c.dtype == torch.float64)
    if channels_innermost_all([c]):
        merged, (strides,) = pixel_strides([c])
        split = reduction_split(triton.cdiv(R, _SMALLEST_BLOCK_R), triton.cdiv(C, 64), c.device)
        means = torch.empty(split, C, dtype=accumulate, device=c.device)
        counts, m2s, pivots = (torch.empty_like(means) for _ in range(3))
        grid = lambda meta: (split, triton.cdiv(C, meta["BLOCK_C"]))
        _rows_stats[grid](c, counts, means, m2s, pivots, R, C, H, W, *strides, MERGED=merged, **flags)
    else:
        merged, (strides,) = _spatial_strides([c])
        split = reduction_split(triton.cdiv(H * W, _SMALLEST_BLOCK_S), N * C, c.device)
        means = torch.empty(split * N, C, dtype=accumulate, device=c.device)
        counts, m2s, pivots = (torch.empty_like(means) for _ in range(3))
        _planes_stats[(N * C, split)](c, counts, means, m2s, pivots, N * C, C, H * W, W, *strides, MERGED=merged, **flags)
    # A program that got no pixels has count 0 and mean 0 (pivot included), and adds nothing.
    return merge_partitions(counts, means.double() + pivots.double(), m2s, R, accumulate)


def batch_norm_act_backward(
    grad_y: torch.Tensor,
    c: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: int,
    accumulate_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_c, grad_weight, grad_bias) of y = act(z), z = (c - mean) * invstd * w + b, in
    training mode: mean and invstd are c's own batch statistics, and the gradient flows
    through them (torch.nn.functional.batch_norm(training=True)'s backward).

    With scale, shift = batch_norm_scale_shift(mean, invstd, weight, bias), z = c * scale + shift (as
    bn_act's forward computes it), g = grad_y * act'(z), R = N*H*W, and per channel
    Sg = sum(g), Sgx = sum(g * (c - mean)):

        grad_weight = invstd * Sgx        grad_bias = Sg        (float32; float64 for float64)
        grad_c = scale * (g - Sg / R - (c - mean) * invstd**2 * Sgx / R)    (c's dtype)

    grad_c takes torch.empty_like(c)'s layout; grad_y and c may have any strides. weight and
    bias may be None (w = 1, b = 0); their gradients are returned all the same. R == 0 gives
    an empty grad_c and zero parameter gradients. `activation` is a code of
    fastconv.activations.

    Traffic: two passes. The first reads grad_y and c and reduces Sg and Sgx (deterministic
    partials, summed on the host); the second reads grad_y and c again, recomputes g and
    writes grad_c. Per element: 4 reads and 1 write, 5 * element_size bytes (when grad_y has
    c's dtype), plus O(programs x C) of partials.

    accumulate_into: a tensor of c's shape and dtype, any strides (a channel slice of a dense
    block's gradient buffer), to which grad_c is added in place and which is returned as grad_c:
    one more read per element, where a separate grad_c and an add would cost a write and
    three more passes.
    """
    grad_c = torch.empty_like(c) if accumulate_into is None else accumulate_into
    N, C, H, W = c.shape
    accumulate = accumulate_dtype(c.dtype)
    R = N * H * W
    if c.numel() == 0:
        zeros = torch.zeros(C, dtype=accumulate, device=c.device)
        return grad_c, zeros, zeros.clone()
    mean, invstd = mean.to(accumulate), invstd.to(accumulate)
    scale, shift = batch_norm_scale_shift(mean, invstd, weight, bias)
    tensors = [grad_y, c, grad_c]
    flags = _flags(c, tensors, activation)
    rows = channels_innermost_all(tensors)
    accumulate_flag = dict(ACCUMULATE=accumulate_into is not None)
    if rows:
        merged, strides = pixel_strides(tensors)
        split = reduction_split(triton.cdiv(R, _SMALLEST_BLOCK_R), triton.cdiv(C, 64), c.device)
        sum_g = torch.empty(split, C, dtype=accumulate, device=c.device)
        sum_gx = torch.empty_like(sum_g)
        grid = lambda meta: (split, triton.cdiv(C, meta["BLOCK_C"]))
        _rows_grad_sums[grid](
            grad_y, c, scale, shift, mean, sum_g, sum_gx, R, C, H, W, *strides[0], *strides[1], MERGED=merged, **flags
        )
    else:
        merged, strides = _spatial_strides(tensors)
        split = reduction_split(triton.cdiv(H * W, _SMALLEST_BLOCK_S), N * C, c.device)
        sum_g = torch.empty(split * N, C, dtype=accumulate, device=c.device)
        sum_gx = torch.empty_like(sum_g)
        _planes_grad_sums[(N * C, split)](
            grad_y, c, scale, shift, mean, sum_g, sum_gx, N * C, C, H * W, W, *strides[0], *strides[1],
            MERGED=merged, **flags,
        )
    # The second, deterministic stage: torch.sum's order is fixed for a fixed shape.
    sum_g, sum_gx = sum_g.sum(0), sum_gx.sum(0)
    grad_weight = invstd * sum_gx
    mean_g = sum_g / R
    coef = invstd * invstd * sum_gx / R
    if rows:
        grid = lambda meta: (triton.cdiv(R, meta["BLOCK_R"]), triton.cdiv(C, meta["BLOCK_C"]))
        _rows_grad_input[grid](
            grad_y, c, grad_c, scale, shift, mean, mean_g, coef, R, C, H, W, *strides[0], *strides[1], *strides[2],
            MERGED=merged, **flags, **accumulate_flag,
        )
    else:
        grid = lambda meta: (N * C, min(triton.cdiv(H * W, meta["BLOCK_S"]), MAX_GRID_Y))
        _planes_grad_input[grid](
            grad_y, c, grad_c, scale, shift, mean, mean_g, coef, C, H * W, W, *strides[0], *strides[1], *strides[2],
            MERGED=merged, **flags, **accumulate_flag,
        )
    return grad_c, grad_weight, sum_g
