"""Depthwise 2-D convolution in Triton: the two backward passes, grad_input, and grad_weight
with grad_bias, of the plain convolution (the epilogue's backward is bn_act's).

They share the forward's layout rule and window loops (depthwise.py): "rows" kernels for
tensors whose channels are innermost, "planes" kernels for the rest, full strides everywhere.

Output channel oc reads input channel oc // M (depth multiplier M). The backward input pass
is a gather (each input pixel sums over the taps whose output position is integral and in
range), so it needs no atomics. The backward weight pass is deterministic: each program sums
a fixed share of the pixels for a block of channels and a block of taps into its own slot of
a partials buffer, and the host sums the partials in a fixed order. No float atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastconv._geometry import accumulate_dtype, channels_innermost, empty_output
from fastconv.triton_kernels._indexing import MAX_GRID_Y, needs_64bit_index, reduction_split
from fastconv.triton_kernels._tuning import autotune, interpreter_first
from fastconv.triton_kernels.depthwise import (
    _GEOMETRY_KEY,
    _INDEX_HEADROOM,
    _MAX_TAP_BLOCK,
    _MAX_UNROLLED_TAPS,
    _PLANES_CONFIGS,
    _ROWS_DEVICE_CONFIGS,
    _ROWS_INTERPRETER_CONFIG,
    _geometry,
    _split_pixels,
    _strides4,
    _weight_strides,
)

# The backward input pass takes the forward's tiles (the same [pixels, channels] gather), but
# its own default: with a depth multiplier the M output channels of each input channel are a
# run-time loop around the unrolled taps, and the forward's default 64x32 on 4 warps spilled
# there (float32, multiplier 2, channels_last: 255 registers, 260 B on Triton 3.6, 28 B on
# 3.8). 32x32 on 8 warps takes 60 to 100 registers and spills nothing on either; tiles of
# 8 elements a thread (32x32 on 4 warps, 64x32 on 8) spilled 106 B at 80 registers on 3.8's
# float16 (sm_90, offline, tests/test_triton_configs.py).
_ROWS_INPUT_CONFIGS = interpreter_first(
    _ROWS_INTERPRETER_CONFIG,
    [triton.Config({"BLOCK_P": 32, "BLOCK_C": 32}, num_warps=8)] + _ROWS_DEVICE_CONFIGS,
)
# The backward weight tiles are 3-D ([pixels, taps, channels]), so they are smaller per axis.
# The default 16x32 on 8 warps: 8x32 on 4 warps spilled 8 B at 72 registers on Triton 3.8
# (float16, channels_last, 3x3); 16x32 w8 takes 80 to 167 registers and no stack on 3.6 and 3.8.
_ROWS_WEIGHT_CONFIGS = interpreter_first(
    triton.Config({"BLOCK_P": 64, "BLOCK_C": 32}, num_warps=4),
    [
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 32}, num_warps=8),
        triton.Config({"BLOCK_P": 8, "BLOCK_C": 32}, num_warps=4),
        triton.Config({"BLOCK_P": 32, "BLOCK_C": 32}, num_warps=8),
        triton.Config({"BLOCK_P": 8, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 64}, num_warps=8),
        triton.Config({"BLOCK_P": 4, "BLOCK_C": 128}, num_warps=4),
    ],
)
_PLANES_WEIGHT_CONFIGS = interpreter_first(
    # (BLOCK_C channels, BLOCK_S pixels per plane)
    triton.Config({"BLOCK_C": 8, "BLOCK_S": 256}, num_warps=4),
    [
        triton.Config({"BLOCK_C": 2, "BLOCK_S": 64}, num_warps=4),
        triton.Config({"BLOCK_C": 1, "BLOCK_S": 256}, num_warps=4),
        triton.Config({"BLOCK_C": 1, "BLOCK_S": 512}, num_warps=8),
        triton.Config({"BLOCK_C": 2, "BLOCK_S": 128}, num_warps=4),
        triton.Config({"BLOCK_C": 4, "BLOCK_S": 64}, num_warps=4),
        triton.Config({"BLOCK_C": 8, "BLOCK_S": 32}, num_warps=4),
    ],
)
# The smallest block of each reduction axis over all configs: sizes the partials buffer,
# which must exist before the autotuner picks a config.
_SMALLEST_WEIGHT_BLOCK_P = 4
_SMALLEST_WEIGHT_BLOCK_S = 32

# --------------------------------------------------------------------------------------------
# Backward input: grad_x[n, c, h, w] = sum over r < M and taps (a, b) of
# grad_c[n, c*M + r, oh, ow] * w[c*M + r, a, b], where oh*SH = h + pad_top - a*DH (and the
# same for ow) has an integral solution inside the output. A gather: no two programs write
# the same element.


@triton.jit
def _source(t, S: tl.constexpr, So):
    """(o, valid): the output index o with o*S == t, and whether it exists in [0, So)."""
    o = t // S
    valid = (t >= 0) & (o < So)
    if S > 1:
        valid = valid & (t % S == 0)  # only every S-th input position is a window corner
    return o, valid


@triton.jit
def _rows_input_row(acc, g_ptr, w_ptr, a, g_pixel, th0, tw0, pixel_mask, g_channel, out_channels,
                    channel_mask, Ho, Wo, g_sh, g_sw, w_sc, w_sh, w_sw,
                    KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                    WIDE: tl.constexpr):
    """acc[p, c] += grad_c[n, oc, oh, ow] * w[oc, a, b] over the taps b of window row a."""
    compute = tl.float64 if WIDE else tl.float32
    oh, valid_h = _source(th0 - a * DH, SH, Ho)
    row_valid = pixel_mask & valid_h
    g_row = g_pixel + oh * g_sh
    w_row = w_ptr + out_channels * w_sc + a * w_sh
    for b in tl.static_range(KW):
        ow, valid_w = _source(tw0 - b * DW, SW, Wo)
        valid = row_valid & valid_w
        weight = tl.load(w_row + b * w_sw, mask=channel_mask, other=0.0)
        offsets = (g_row + ow * g_sw)[:, None] + g_channel[None, :]
        g = tl.load(g_ptr + offsets, mask=valid[:, None] & channel_mask[None, :], other=0.0)
        acc += g.to(compute) * weight.to(compute)[None, :]
    return acc


@autotune(configs=_ROWS_INPUT_CONFIGS, key=["R", "C", "M", "H", "W"] + _GEOMETRY_KEY)
@triton.jit
def _rows_backward_input(
    g_ptr, w_ptr, gx_ptr,
    R, C, M,  # R = N*H*W input pixels; C input channels; M depth multiplier
    H, W, Ho, Wo,
    pad_top, pad_left,
    g_sn, g_sc, g_sh, g_sw,  # strides of grad_c (any)
    w_sc, w_sh, w_sw,  # strides of weight over output channel, tap row, tap column
    gx_sn, gx_sc, gx_sh, gx_sw,  # strides of grad_x
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    UNROLL: tl.constexpr, INDEX_64: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    block = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if INDEX_64:
        block = block.to(tl.int64)
        channels = channels.to(tl.int64)
    pixels = block * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_mask = pixels < R
    channel_mask = channels < C
    n, h, w = _split_pixels(pixels, H, W)
    # Tap (a, b) reads input (h, w) from the output pixel whose window corner is
    # (h + pad_top - a*DH, w + pad_left - b*DW).
    th0 = h + pad_top
    tw0 = w + pad_left
    g_pixel = n * g_sn
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=compute)
    for r in range(M):  # the M output channels fed by each input channel
        out_channels = channels * M + r
        g_channel = out_channels * g_sc
        if UNROLL:
            for a in tl.static_range(KH):
                acc = _rows_input_row(acc, g_ptr, w_ptr, a, g_pixel, th0, tw0, pixel_mask, g_channel, out_channels,
                                      channel_mask, Ho, Wo, g_sh, g_sw, w_sc, w_sh, w_sw, KW, SH, SW, DH, DW, WIDE)
        else:
            for a in range(KH):
                acc = _rows_input_row(acc, g_ptr, w_ptr, a, g_pixel, th0, tw0, pixel_mask, g_channel, out_channels,
                                      channel_mask, Ho, Wo, g_sh, g_sw, w_sc, w_sh, w_sw, KW, SH, SW, DH, DW, WIDE)
    gx_offsets = (n * gx_sn + h * gx_sh + w * gx_sw)[:, None] + (channels * gx_sc)[None, :]
    tl.store(gx_ptr + gx_offsets, acc.to(gx_ptr.dtype.element_ty), mask=pixel_mask[:, None] & channel_mask[None, :])


@triton.jit
def _planes_input_row(acc, g_ptr, w_ptr, a, g_plane, th0, tw0, spatial_mask, out_channels, plane_mask,
                      Ho, Wo, g_sh, g_sw, w_sc, w_sh, w_sw,
                      KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                      WIDE: tl.constexpr):
    """acc[q, s] += grad_c[plane of q's oc, oh, ow] * w[oc, a, b] over the taps b of row a."""
    compute = tl.float64 if WIDE else tl.float32
    oh, valid_h = _source(th0 - a * DH, SH, Ho)
    row_valid = spatial_mask & valid_h
    g_row = oh * g_sh
    w_row = w_ptr + out_channels * w_sc + a * w_sh
    for b in tl.static_range(KW):
        ow, valid_w = _source(tw0 - b * DW, SW, Wo)
        valid = row_valid & valid_w
        weight = tl.load(w_row + b * w_sw, mask=plane_mask, other=0.0)
        offsets = g_plane[:, None] + (g_row + ow * g_sw)[None, :]
        g = tl.load(g_ptr + offsets, mask=plane_mask[:, None] & valid[None, :], other=0.0)
        acc += g.to(compute) * weight.to(compute)[:, None]
    return acc


@autotune(configs=_PLANES_CONFIGS, key=["NC", "C", "M", "HW", "W", "Ho", "Wo"] + _GEOMETRY_KEY)
@triton.jit
def _planes_backward_input(
    g_ptr, w_ptr, gx_ptr,
    NC, C, M,  # NC = N*C input planes, numbered n*C + c
    HW, W, Ho, Wo,  # input pixels per plane and input width; output size
    pad_top, pad_left,
    g_sn, g_sc, g_sh, g_sw, w_sc, w_sh, w_sw, gx_sn, gx_sc, gx_sh, gx_sw,  # as in _rows_backward_input
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    UNROLL: tl.constexpr, INDEX_64: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_PL: tl.constexpr, BLOCK_S: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    planes = tl.program_id(0) * BLOCK_PL + tl.arange(0, BLOCK_PL)
    if INDEX_64:
        planes = planes.to(tl.int64)
    plane_mask = planes < NC
    n = planes // C
    channels = planes % C
    gx_plane = n * gx_sn + channels * gx_sc
    for start in range(tl.program_id(1) * BLOCK_S, HW, tl.num_programs(1) * BLOCK_S):
        spatial = start + tl.arange(0, BLOCK_S)
        if INDEX_64:
            spatial = spatial.to(tl.int64)
        spatial_mask = spatial < HW
        h = spatial // W
        w = spatial % W
        th0 = h + pad_top
        tw0 = w + pad_left
        acc = tl.zeros([BLOCK_PL, BLOCK_S], dtype=compute)
        for r in range(M):
            out_channels = channels * M + r
            g_plane = n * g_sn + out_channels * g_sc
            if UNROLL:
                for a in tl.static_range(KH):
                    acc = _planes_input_row(acc, g_ptr, w_ptr, a, g_plane, th0, tw0, spatial_mask, out_channels,
                                            plane_mask, Ho, Wo, g_sh, g_sw, w_sc, w_sh, w_sw, KW, SH, SW, DH, DW, WIDE)
            else:
                for a in range(KH):
                    acc = _planes_input_row(acc, g_ptr, w_ptr, a, g_plane, th0, tw0, spatial_mask, out_channels,
                                            plane_mask, Ho, Wo, g_sh, g_sw, w_sc, w_sh, w_sw, KW, SH, SW, DH, DW, WIDE)
        gx_offsets = gx_plane[:, None] + (h * gx_sh + w * gx_sw)[None, :]
        tl.store(gx_ptr + gx_offsets, acc.to(gx_ptr.dtype.element_ty), mask=plane_mask[:, None] & spatial_mask[None, :])


# --------------------------------------------------------------------------------------------
# Backward weight: grad_w[oc, a, b] = sum over n, oh, ow of grad_c[n, oc, oh, ow] *
# x[n, oc // M, oh*SH - pad_top + a*DH, ow*SW - pad_left + b*DW], and grad_bias[oc] = sum of
# grad_c, from the same loads. Each program vectorises over a block of BLOCK_T taps (a 3-D
# tile), so grad_c is read once per tap block, and x once per tap (neighbouring taps hit cache).


@autotune(configs=_ROWS_WEIGHT_CONFIGS, key=["R", "CM", "M", "H", "W", "BLOCK_T"] + _GEOMETRY_KEY)
@triton.jit
def _rows_backward_weight(
    g_ptr, x_ptr,
    partial_w_ptr,  # [num_programs(1), CM, KH*KW] partial sums, one slab per program along axis 1
    partial_b_ptr,  # [num_programs(1), CM], written by the programs of tap block 0
    R, CM, M,  # R = N*Ho*Wo output pixels; CM output channels; M depth multiplier
    H, W, Ho, Wo,
    pad_top, pad_left,
    g_sn, g_sc, g_sh, g_sw,  # strides of grad_c
    x_sn, x_sc, x_sh, x_sw,  # strides of x
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_T: tl.constexpr,  # taps per program (power of two; axis 2 of the grid walks tap blocks)
    INDEX_64: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    slot = tl.program_id(1)
    if INDEX_64:
        channels = channels.to(tl.int64)
        slot = slot.to(tl.int64)
    channel_mask = channels < CM
    x_channel = (channels // M) * x_sc
    taps = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    tap_mask = taps < KH * KW
    # Offset of each tap's input position from the window corner, in rows and columns.
    tap_dh = (taps // KW) * DH
    tap_dw = (taps % KW) * DW
    acc_w = tl.zeros([BLOCK_T, BLOCK_C], dtype=compute)
    acc_b = tl.zeros([BLOCK_C], dtype=compute)
    # Each program takes every num_programs(1)-th block of pixels: a fixed share, so that the
    # partial sums, and hence the gradients, are the same on every run.
    for start in range(tl.program_id(1) * BLOCK_P, R, tl.num_programs(1) * BLOCK_P):
        pixels = start + tl.arange(0, BLOCK_P)
        if INDEX_64:
            pixels = pixels.to(tl.int64)
        pixel_mask = pixels < R
        n, oh, ow = _split_pixels(pixels, Ho, Wo)
        g_offsets = (n * g_sn + oh * g_sh + ow * g_sw)[:, None] + (channels * g_sc)[None, :]
        g = tl.load(g_ptr + g_offsets, mask=pixel_mask[:, None] & channel_mask[None, :], other=0.0).to(compute)
        acc_b += tl.sum(g, axis=0)
        ih = (oh * SH - pad_top)[:, None] + tap_dh[None, :]  # [BLOCK_P, BLOCK_T]
        iw = (ow * SW - pad_left)[:, None] + tap_dw[None, :]
        inside = pixel_mask[:, None] & tap_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_offsets = ((n * x_sn)[:, None] + ih * x_sh + iw * x_sw)[:, :, None] + x_channel[None, None, :]
        x = tl.load(x_ptr + x_offsets, mask=inside[:, :, None] & channel_mask[None, None, :], other=0.0)
        acc_w += tl.sum(x.to(compute) * g[:, None, :], axis=0)
    w_offsets = (slot * CM + channels)[None, :] * (KH * KW) + taps[:, None]
    tl.store(partial_w_ptr + w_offsets, acc_w, mask=tap_mask[:, None] & channel_mask[None, :])
    if tl.program_id(2) == 0:
        tl.store(partial_b_ptr + slot * CM + channels, acc_b, mask=channel_mask)


@autotune(configs=_PLANES_WEIGHT_CONFIGS, key=["N", "CM", "M", "H", "W", "HWo", "Wo", "BLOCK_T"] + _GEOMETRY_KEY)
@triton.jit
def _planes_backward_weight(
    g_ptr, x_ptr, partial_w_ptr, partial_b_ptr,  # as in _rows_backward_weight
    N, CM, M,
    H, W, HWo, Wo,  # input size; output pixels per plane and output width
    pad_top, pad_left,
    g_sn, g_sc, g_sh, g_sw, x_sn, x_sc, x_sh, x_sw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_T: tl.constexpr, INDEX_64: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    slot = tl.program_id(1)
    if INDEX_64:
        channels = channels.to(tl.int64)
        slot = slot.to(tl.int64)
    channel_mask = channels < CM
    g_channel = channels * g_sc
    x_channel = (channels // M) * x_sc
    taps = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    tap_mask = taps < KH * KW
    tap_dh = (taps // KW) * DH
    tap_dw = (taps % KW) * DW
    acc_w = tl.zeros([BLOCK_C, BLOCK_T], dtype=compute)
    acc_b = tl.zeros([BLOCK_C], dtype=compute)
    # Work items are (n, block of a plane's pixels); each program takes every
    # num_programs(1)-th one, a fixed share as in the rows kernel.
    blocks_per_plane = tl.cdiv(HWo, BLOCK_S)
    for item in range(tl.program_id(1), N * blocks_per_plane, tl.num_programs(1)):
        n = item // blocks_per_plane
        spatial = (item % blocks_per_plane) * BLOCK_S + tl.arange(0, BLOCK_S)
        if INDEX_64:
            n = n.to(tl.int64)
            spatial = spatial.to(tl.int64)
        spatial_mask = spatial < HWo
        oh = spatial // Wo
        ow = spatial % Wo
        g_offsets = (n * g_sn + g_channel)[:, None] + (oh * g_sh + ow * g_sw)[None, :]
        g = tl.load(g_ptr + g_offsets, mask=channel_mask[:, None] & spatial_mask[None, :], other=0.0).to(compute)
        acc_b += tl.sum(g, axis=1)
        ih = tap_dh[:, None] + (oh * SH - pad_top)[None, :]  # [BLOCK_T, BLOCK_S]
        iw = tap_dw[:, None] + (ow * SW - pad_left)[None, :]
        inside = tap_mask[:, None] & spatial_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_offsets = (n * x_sn + x_channel)[:, None, None] + (ih * x_sh + iw * x_sw)[None, :, :]
        x = tl.load(x_ptr + x_offsets, mask=channel_mask[:, None, None] & inside[None, :, :], other=0.0)
        acc_w += tl.sum(x.to(compute) * g[:, None, :], axis=2)
    w_offsets = (slot * CM + channels)[:, None] * (KH * KW) + taps[None, :]
    tl.store(partial_w_ptr + w_offsets, acc_w, mask=channel_mask[:, None] & tap_mask[None, :])
    if tl.program_id(2) == 0:
        tl.store(partial_b_ptr + slot * CM + channels, acc_b, mask=channel_mask)


def depthwise_backward_input(
    grad_c: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """Gradient of the plain conv (no epilogue) w.r.t. x; x supplies shape, dtype and layout."""
    N, C, H, W = x.shape
    CM, KH, KW = weight.shape[0], weight.shape[2], weight.shape[3]
    M = CM // C
    Ho, Wo = grad_c.shape[2], grad_c.shape[3]
    grad_x = empty_output((N, C, H, W), x)
    if grad_x.numel() == 0:
        return grad_x
    pad_top, pad_left = padding[0], padding[1]
    flags = dict(
        UNROLL=KH * KW <= _MAX_UNROLLED_TAPS, INDEX_64=needs_64bit_index([grad_c, grad_x, weight], _INDEX_HEADROOM),
        WIDE=x.dtype == torch.float64, **_geometry(weight, stride, dilation),
    )
    if channels_innermost(x):
        R = N * H * W
        grid = lambda meta: (triton.cdiv(R, meta["BLOCK_P"]), triton.cdiv(C, meta["BLOCK_C"]))
        _rows_backward_input[grid](
            grad_c, weight, grad_x, R, C, M, H, W, Ho, Wo, pad_top, pad_left,
            *_strides4(grad_c), *_weight_strides(weight), *_strides4(grad_x), **flags,
        )
    else:
        NC = N * C
        grid = lambda meta: (triton.cdiv(NC, meta["BLOCK_PL"]), min(triton.cdiv(H * W, meta["BLOCK_S"]), MAX_GRID_Y))
        _planes_backward_input[grid](
            grad_c, weight, grad_x, NC, C, M, H * W, W, Ho, Wo, pad_top, pad_left,
            *_strides4(grad_c), *_weight_strides(weight), *_strides4(grad_x), **flags,
        )
    return grad_x


def depthwise_backward_weight(
    grad_c: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight in weight's dtype and shape, contiguous; grad_bias (C*M,) in x's dtype).

    Deterministic: fixed per-program shares reduced into fp32 (fp64) partials, summed in a
    fixed order by torch.
    """
    N, C, H, W = x.shape
    CM, KH, KW = weight.shape[0], weight.shape[2], weight.shape[3]
    M = CM // C
    Ho, Wo = grad_c.shape[2], grad_c.shape[3]
    taps = KH * KW
    if grad_c.numel() == 0:
        grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
        return grad_weight, torch.zeros(CM, dtype=x.dtype, device=x.device)
    accumulate = accumulate_dtype(x.dtype)
    BLOCK_T = min(triton.next_power_of_2(taps), _MAX_TAP_BLOCK)
    tap_blocks = triton.cdiv(taps, BLOCK_T)
    pad_top, pad_left = padding[0], padding[1]
    # The channel-block count is only an estimate here (the config is not yet chosen); it
    # just sizes how many programs share the pixels.
    if channels_innermost(x):
        R = N * Ho * Wo
        split = reduction_split(triton.cdiv(R, _SMALLEST_WEIGHT_BLOCK_P), triton.cdiv(CM, 32) * tap_blocks, x.device)
    else:
        work = N * triton.cdiv(Ho * Wo, _SMALLEST_WEIGHT_BLOCK_S)
        split = reduction_split(work, triton.cdiv(CM, 4) * tap_blocks, x.device)
    partial_w = torch.empty(split, CM, taps, dtype=accumulate, device=x.device)
    partial_b = torch.empty(split, CM, dtype=accumulate, device=x.device)
    flags = dict(
        BLOCK_T=BLOCK_T, INDEX_64=needs_64bit_index([grad_c, x, partial_w], _INDEX_HEADROOM),
        WIDE=x.dtype == torch.float64, **_geometry(weight, stride, dilation),
    )
    # Channel blocks on axis 0, which has no 65535 cap (BLOCK_C may be 1).
    grid = lambda meta: (triton.cdiv(CM, meta["BLOCK_C"]), split, tap_blocks)
    if channels_innermost(x):
        _rows_backward_weight[grid](
            grad_c, x, partial_w, partial_b, N * Ho * Wo, CM, M, H, W, Ho, Wo, pad_top, pad_left,
            *_strides4(grad_c), *_strides4(x), **flags,
        )
    else:
        _planes_backward_weight[grid](
            grad_c, x, partial_w, partial_b, N, CM, M, H, W, Ho * Wo, Wo, pad_top, pad_left,
            *_strides4(grad_c), *_strides4(x), **flags,
        )
    # torch.sum reduces in a fixed order for a fixed shape: the second, deterministic stage.
    grad_weight = partial_w.sum(0).view(CM, 1, KH, KW).to(weight.dtype).contiguous()
    return grad_weight, partial_b.sum(0).to(x.dtype)
