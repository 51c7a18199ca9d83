"""Depthwise 2-D convolution in Triton: the fused forward (bias, scale/shift, activation, and
the batch statistics of a training BatchNorm).

A depthwise conv does KH*KW multiply-adds per output element and has no reduction over
channels, so it is memory-bound and a matrix-multiply formulation (tl.dot with K = 1) only
wastes the tensor cores: every kernel here loops directly over the KHxKW window, loading one
vector per tap, and KH, KW, stride and dilation are compile-time constants so that the common
3x3, 5x5 and 7x7 windows at stride 1 or 2 unroll completely. Padding stays a runtime value
(it may be asymmetric, as padding="same" needs for even kernels).

The layout picks the tile, as in bn_act.py:

* "rows" kernels serve tensors whose channels are innermost (channels_last, and channel slices
  of a channels_last buffer): a program owns BLOCK_P output pixels x BLOCK_C channels, so each
  tap reads contiguous channel vectors of x, and loads its BLOCK_C weights once.
* "planes" kernels serve everything else (NCHW, spatial crops): a program owns BLOCK_PL whole
  (n, channel) planes x BLOCK_S pixels of each, numbered flat within the plane, and reads one
  weight per plane and tap. Several planes per program keep small late-stage planes (7x7)
  from leaving most lanes idle.

Every kernel takes every tensor's full strides, so either family is correct for any layout
(the choice is only about speed), and no input is ever copied to make it contiguous.

With STATS (depthwise_forward_with_stats, for a fused BatchNorm in training) the forward also
reduces the values it stored, rounded to y's dtype and back, to per-channel partials: a rows
program its tile's (mean, M2) per channel, a planes program (mean, M2) per plane of all the
blocks it walked (Chan's merge in float64 between blocks). The host merges the [programs,
channels] partials with _statistics.merge_partitions: deterministic, no atomics, and no sum of
raw squares anywhere (see _statistics.tile_moments for the tile's two passes).

Output channel oc reads input channel oc // M (depth multiplier M). The backward passes are
in depthwise_backward.py.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastconv._geometry import accumulate_dtype, channels_innermost, empty_output, output_size
from fastconv.triton_kernels._indexing import MAX_GRID_Y, needs_64bit_index
from fastconv.triton_kernels._statistics import chan_merge, merge_partitions, tile_moments
from fastconv.triton_kernels._tuning import autotune, interpreter_first
from fastconv.triton_kernels.activations import apply_activation

# Offsets past 2**31 - 1 - this take the 64-bit path: room for a block of masked overshoot; masked window taps in the padding may wrap harmlessly, never dereferenced.
_INDEX_HEADROOM = 65536

# Windows with more taps than this walk their rows in a run-time loop (each row's taps still
# unrolled): LLVM's time to compile grows faster than linearly with the unrolled loads, and a
# fully unrolled 5x5 window on a tile of scalar (unvectorised) loads takes 30 s to compile.
_MAX_UNROLLED_TAPS = 16
# The backward weight pass vectorises over up to this many taps at once (a 3x3 window in one
# block, 5x5 in two, 7x7 in four); more would cost registers without saving memory traffic.
_MAX_TAP_BLOCK = 16

# (BLOCK_P output pixels, BLOCK_C channels); depthwise_backward.py's input pass takes the same
# candidates with its own default.
_ROWS_INTERPRETER_CONFIG = triton.Config({"BLOCK_P": 128, "BLOCK_C": 32}, num_warps=4)
_ROWS_DEVICE_CONFIGS = [
    # The default: 127 to 158 registers, no spills, forward (sm_90, Triton 3.6 and 3.8).
    triton.Config({"BLOCK_P": 64, "BLOCK_C": 32}, num_warps=4),
    triton.Config({"BLOCK_P": 32, "BLOCK_C": 32}, num_warps=4),
    triton.Config({"BLOCK_P": 16, "BLOCK_C": 64}, num_warps=4),
    triton.Config({"BLOCK_P": 32, "BLOCK_C": 64}, num_warps=4),
    triton.Config({"BLOCK_P": 64, "BLOCK_C": 64}, num_warps=8),
    triton.Config({"BLOCK_P": 8, "BLOCK_C": 128}, num_warps=4),
    triton.Config({"BLOCK_P": 16, "BLOCK_C": 128}, num_warps=8),
    triton.Config({"BLOCK_P": 128, "BLOCK_C": 8}, num_warps=4),
]
_ROWS_CONFIGS = interpreter_first(_ROWS_INTERPRETER_CONFIG, _ROWS_DEVICE_CONFIGS)
_PLANES_CONFIGS = interpreter_first(
    # (BLOCK_PL planes, BLOCK_S pixels per plane); small planes want several per program.
    triton.Config({"BLOCK_PL": 16, "BLOCK_S": 256}, num_warps=4),
    [
        triton.Config({"BLOCK_PL": 4, "BLOCK_S": 128}, num_warps=4),
        triton.Config({"BLOCK_PL": 1, "BLOCK_S": 256}, num_warps=4),
        triton.Config({"BLOCK_PL": 1, "BLOCK_S": 512}, num_warps=4),
        triton.Config({"BLOCK_PL": 1, "BLOCK_S": 1024}, num_warps=8),
        triton.Config({"BLOCK_PL": 2, "BLOCK_S": 256}, num_warps=4),
        triton.Config({"BLOCK_PL": 4, "BLOCK_S": 64}, num_warps=4),
        triton.Config({"BLOCK_PL": 8, "BLOCK_S": 64}, num_warps=4),
        triton.Config({"BLOCK_PL": 16, "BLOCK_S": 16}, num_warps=4),
    ],
)
_GEOMETRY_KEY = ["KH", "KW", "SH", "SW", "DH", "DW"]


# --------------------------------------------------------------------------------------------
# Shared pieces.


@triton.jit
def _split_pixels(pixels, Ho, Wo):
    """(n, oh, ow) of flat pixel numbers (n*Ho + oh)*Wo + ow."""
    ow = pixels % Wo
    rest = pixels // Wo
    return rest // Ho, rest % Ho, ow


@triton.jit
def _epilogue(acc, channels, channel_mask, bias_ptr, scale_ptr, shift_ptr,
              CHANNEL_AXIS: tl.constexpr,  # axis of acc that runs over channels (0 or 1)
              HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
              ACTIVATION: tl.constexpr, WIDE: tl.constexpr):
    """act(((acc + bias) * scale) + shift) per channel; an absent vector costs nothing."""
    compute = tl.float64 if WIDE else tl.float32
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channels, mask=channel_mask, other=0.0).to(compute)
        if CHANNEL_AXIS == 0:
            acc += bias[:, None]
        else:
            acc += bias[None, :]
    if HAS_SCALE:
        scale = tl.load(scale_ptr + channels, mask=channel_mask, other=0.0).to(compute)
        if CHANNEL_AXIS == 0:
            acc = acc * scale[:, None]
        else:
            acc = acc * scale[None, :]
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + channels, mask=channel_mask, other=0.0).to(compute)
        if CHANNEL_AXIS == 0:
            acc += shift[:, None]
        else:
            acc += shift[None, :]
    return apply_activation(acc, ACTIVATION)


# --------------------------------------------------------------------------------------------
# Forward: y = act(((conv(x, w) + bias) * scale) + shift).


@triton.jit
def _rows_forward_row(acc, x_ptr, w_ptr, a, x_pixel, ih0, iw0, pixel_mask, x_channel, channels,
                      channel_mask, H, W, x_sh, x_sw, w_sc, w_sh, w_sw,
                      KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, WIDE: tl.constexpr):
    """acc[p, c] += x[n, c // M, ih, iw] * w[c, a, b] over the taps b of window row a."""
    compute = tl.float64 if WIDE else tl.float32
    ih = ih0 + a * DH
    row_inside = pixel_mask & (ih >= 0) & (ih < H)
    x_row = x_pixel + ih * x_sh
    w_row = w_ptr + channels * w_sc + a * w_sh
    for b in tl.static_range(KW):
        iw = iw0 + b * DW
        inside = row_inside & (iw >= 0) & (iw < W)  # zero padding outside the image
        weight = tl.load(w_row + b * w_sw, mask=channel_mask, other=0.0)
        offsets = (x_row + iw * x_sw)[:, None] + x_channel[None, :]
        x = tl.load(x_ptr + offsets, mask=inside[:, None] & channel_mask[None, :], other=0.0)
        acc += x.to(compute) * weight.to(compute)[None, :]
    return acc


@autotune(configs=_ROWS_CONFIGS, key=["R", "CM", "M", "H", "W", "ACTIVATION", "STATS"] + _GEOMETRY_KEY)
@triton.jit
def _rows_forward(
    x_ptr, w_ptr, y_ptr, bias_ptr, scale_ptr, shift_ptr,  # absent vectors get a dummy pointer
    mean_ptr, m2_ptr,  # [num_programs(0), CM] per-tile mean (float64) and M2 of the stored y (STATS only)
    R, CM, M,  # R = N*Ho*Wo output pixels; CM = C*M output channels; M depth multiplier
    H, W, Ho, Wo,  # input and output spatial sizes
    pad_top, pad_left,  # the bottom and right padding only shape Ho and Wo
    x_sn, x_sc, x_sh, x_sw,  # strides of x (x_sc is 1 on the layouts this kernel is for)
    w_sc, w_sh, w_sw,  # strides of weight over output channel, tap row, tap column
    y_sn, y_sc, y_sh, y_sw,  # strides of y
    KH: tl.constexpr, KW: tl.constexpr,  # window
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,  # stride, dilation
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr,  # code from fastconv.activations
    STATS: tl.constexpr,  # also store per-tile (mean, M2) per channel of the values stored
    UNROLL: tl.constexpr,  # unroll the loop over window rows too, not only each row's taps
    INDEX_64: tl.constexpr,  # some offset may exceed 2**31
    WIDE: tl.constexpr,  # accumulate in float64 (float64 inputs) instead of float32
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    block = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if INDEX_64:
        block = block.to(tl.int64)  # before the multiply, which would overflow in int32
        channels = channels.to(tl.int64)
    pixels = block * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_mask = pixels < R
    channel_mask = channels < CM
    n, oh, ow = _split_pixels(pixels, Ho, Wo)
    # Top-left corner of each output pixel's window in the (unpadded) input.
    ih0 = oh * SH - pad_top
    iw0 = ow * SW - pad_left
    x_pixel = n * x_sn
    x_channel = (channels // M) * x_sc
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=compute)
    if UNROLL:
        for a in tl.static_range(KH):
            acc = _rows_forward_row(acc, x_ptr, w_ptr, a, x_pixel, ih0, iw0, pixel_mask, x_channel, channels,
                                    channel_mask, H, W, x_sh, x_sw, w_sc, w_sh, w_sw, KW, DH, DW, WIDE)
    else:
        for a in range(KH):
            acc = _rows_forward_row(acc, x_ptr, w_ptr, a, x_pixel, ih0, iw0, pixel_mask, x_channel, channels,
                                    channel_mask, H, W, x_sh, x_sw, w_sc, w_sh, w_sw, KW, DH, DW, WIDE)
    y = _epilogue(acc, channels, channel_mask, bias_ptr, scale_ptr, shift_ptr, 1,
                  HAS_BIAS, HAS_SCALE, HAS_SHIFT, ACTIVATION, WIDE)
    stored = y.to(y_ptr.dtype.element_ty)
    y_offsets = (n * y_sn + oh * y_sh + ow * y_sw)[:, None] + (channels * y_sc)[None, :]
    tl.store(y_ptr + y_offsets, stored, mask=pixel_mask[:, None] & channel_mask[None, :])
    if STATS:
        # The tile's (mean, M2) per channel, in registers, of the values as stored (rounded to
        # y's dtype and back): the statistics of exactly what was written.
        count = tl.minimum(R - block * BLOCK_P, BLOCK_P).to(compute)
        s = tl.where(pixel_mask[:, None], stored.to(compute), 0.0)
        tile_mean, tile_m2 = tile_moments(s, pixel_mask[:, None], count, 0)
        p_offsets = block * CM + channels
        tl.store(mean_ptr + p_offsets, tile_mean, mask=channel_mask)
        tl.store(m2_ptr + p_offsets, tile_m2, mask=channel_mask)


@triton.jit
def _planes_forward_row(acc, x_ptr, w_ptr, a, x_plane, ih0, iw0, spatial_mask, planes_ch, plane_mask,
                        H, W, x_sh, x_sw, w_sc, w_sh, w_sw,
                        KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, WIDE: tl.constexpr):
    """acc[q, s] += x[plane q, ih, iw] * w[channel of q, a, b] over the taps b of row a."""
    compute = tl.float64 if WIDE else tl.float32
    ih = ih0 + a * DH
    row_inside = spatial_mask & (ih >= 0) & (ih < H)
    x_row = ih * x_sh
    w_row = w_ptr + planes_ch * w_sc + a * w_sh
    for b in tl.static_range(KW):
        iw = iw0 + b * DW
        inside = row_inside & (iw >= 0) & (iw < W)
        weight = tl.load(w_row + b * w_sw, mask=plane_mask, other=0.0)
        offsets = x_plane[:, None] + (x_row + iw * x_sw)[None, :]
        x = tl.load(x_ptr + offsets, mask=plane_mask[:, None] & inside[None, :], other=0.0)
        acc += x.to(compute) * weight.to(compute)[:, None]
    return acc


@autotune(configs=_PLANES_CONFIGS, key=["NCM", "CM", "M", "H", "W", "HWo", "ACTIVATION", "STATS"] + _GEOMETRY_KEY)
@triton.jit
def _planes_forward(
    x_ptr, w_ptr, y_ptr, bias_ptr, scale_ptr, shift_ptr,
    mean_ptr, m2_ptr,  # [num_programs(1), NCM] mean (float64), M2 per (program share, plane) (STATS only)
    NCM, CM, M,  # NCM = N*C*M output planes, numbered n*CM + oc
    H, W, HWo, Wo,  # input size; output pixels per plane and output width
    pad_top, pad_left,
    x_sn, x_sc, x_sh, x_sw, w_sc, w_sh, w_sw, y_sn, y_sc, y_sh, y_sw,  # as in _rows_forward
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACTIVATION: tl.constexpr,
    STATS: tl.constexpr, UNROLL: tl.constexpr, INDEX_64: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_PL: tl.constexpr, BLOCK_S: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    planes = tl.program_id(0) * BLOCK_PL + tl.arange(0, BLOCK_PL)
    if INDEX_64:
        planes = planes.to(tl.int64)
    plane_mask = planes < NCM
    n = planes // CM
    channels = planes % CM
    x_plane = n * x_sn + (channels // M) * x_sc
    y_plane = n * y_sn + channels * y_sc
    if STATS:
        # Running (count, mean, M2) per plane of this program's blocks, merged block by block,
        # in float64 (a few operations per plane and block) so that the mean keeps its digits.
        count = tl.zeros([BLOCK_PL], dtype=tl.float64)
        mean = tl.zeros([BLOCK_PL], dtype=tl.float64)
        m2 = tl.zeros([BLOCK_PL], dtype=tl.float64)
    # Axis 1 is capped at 65535 programs, so a program walks every num_programs(1)-th block.
    for start in range(tl.program_id(1) * BLOCK_S, HWo, tl.num_programs(1) * BLOCK_S):
        spatial = start + tl.arange(0, BLOCK_S)
        if INDEX_64:
            spatial = spatial.to(tl.int64)  # so that ih * x_sh is computed in 64 bits
        spatial_mask = spatial < HWo
        oh = spatial // Wo
        ow = spatial % Wo
        ih0 = oh * SH - pad_top
        iw0 = ow * SW - pad_left
        acc = tl.zeros([BLOCK_PL, BLOCK_S], dtype=compute)
        if UNROLL:
            for a in tl.static_range(KH):
                acc = _planes_forward_row(acc, x_ptr, w_ptr, a, x_plane, ih0, iw0, spatial_mask, channels,
                                          plane_mask, H, W, x_sh, x_sw, w_sc, w_sh, w_sw, KW, DH, DW, WIDE)
        else:
            for a in range(KH):
                acc = _planes_forward_row(acc, x_ptr, w_ptr, a, x_plane, ih0, iw0, spatial_mask, channels,
                                          plane_mask, H, W, x_sh, x_sw, w_sc, w_sh, w_sw, KW, DH, DW, WIDE)
        y = _epilogue(acc, channels, plane_mask, bias_ptr, scale_ptr, shift_ptr, 0,
                      HAS_BIAS, HAS_SCALE, HAS_SHIFT, ACTIVATION, WIDE)
        stored = y.to(y_ptr.dtype.element_ty)
        y_offsets = y_plane[:, None] + (oh * y_sh + ow * y_sw)[None, :]
        tl.store(y_ptr + y_offsets, stored, mask=plane_mask[:, None] & spatial_mask[None, :])
        if STATS:
            # The block's (mean, M2) per plane, in registers, merged into the running ones.
            block_count = tl.minimum(HWo - start, BLOCK_S).to(compute)
            s = tl.where(spatial_mask[None, :], stored.to(compute), 0.0)
            block_mean, block_m2 = tile_moments(s, spatial_mask[None, :], block_count, 1)
            count, mean, m2 = chan_merge(count, mean, m2, block_count.to(tl.float64), block_mean,
                                          block_m2.to(tl.float64))
    if STATS:
        slot = tl.program_id(1)
        if INDEX_64:
            slot = slot.to(tl.int64)
        p_offsets = slot * NCM + planes
        tl.store(mean_ptr + p_offsets, mean, mask=plane_mask)
        tl.store(m2_ptr + p_offsets, m2.to(m2_ptr.dtype.element_ty), mask=plane_mask)


# --------------------------------------------------------------------------------------------
# Host side: geometry, layout, allocation and launch.


def _geometry(weight: torch.Tensor, stride, dilation) -> dict:
    KH, KW = weight.shape[2], weight.shape[3]
    return dict(KH=KH, KW=KW, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1])


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def _weight_strides(weight: torch.Tensor) -> tuple[int, int, int]:
    return weight.stride(0), weight.stride(2), weight.stride(3)


def _forward(x, weight, bias, stride, padding, dilation, scale, shift, activation: int, stats: bool):
    """depthwise_forward's launch; with stats also (mean, var) of y as stored, else (None, None)."""
    N, C, H, W = x.shape
    CM, KH, KW = weight.shape[0], weight.shape[2], weight.shape[3]
    M = CM // C
    Ho, Wo = output_size((H, W), (KH, KW), stride, padding, dilation)
    y = empty_output((N, CM, Ho, Wo), x)
    stat_dtype = accumulate_dtype(x.dtype)
    if y.numel() == 0:
        if not stats:
            return y, None, None
        nan = torch.full((CM,), float("nan"), dtype=stat_dtype, device=x.device)
        return y, nan, nan.clone()
    pad_top, pad_left = padding[0], padding[1]
    present = [t for t in (bias, scale, shift) if t is not None]
    rows = channels_innermost(x)
    R, NCM, HWo = N * Ho * Wo, N * CM, Ho * Wo
    partial_mean = partial_m2 = weight  # a dummy pointer, never touched without STATS
    if stats:
        # Sized for the config with the most programs; the autotuner picks one only at launch.
        if rows:
            shape = (triton.cdiv(R, min(c.kwargs["BLOCK_P"] for c in _rows_forward.configs)), CM)
        else:
            shape = (min(triton.cdiv(HWo, min(c.kwargs["BLOCK_S"] for c in _planes_forward.configs)), MAX_GRID_Y), NCM)
        partial_mean = torch.empty(shape, dtype=torch.float64, device=x.device)  # see tile_moments
        partial_m2 = torch.empty(shape, dtype=stat_dtype, device=x.device)
    flags = dict(
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        ACTIVATION=int(activation), STATS=bool(stats), UNROLL=KH * KW <= _MAX_UNROLLED_TAPS,
        INDEX_64=needs_64bit_index([x, y, weight] + present + ([partial_mean] if stats else []), _INDEX_HEADROOM),
        WIDE=x.dtype == torch.float64,
        **_geometry(weight, stride, dilation),
    )
    # Absent vectors are never loaded (their HAS_ flag is off); any pointer will do.
    bias, scale, shift = (t if t is not None else weight for t in (bias, scale, shift))
    # The grid function sees the config that runs (the autotuner's last call is the real
    # launch): the statistics' partition sizes follow its block.
    chosen = {}
    if rows:
        def grid(meta):
            chosen["BLOCK"] = meta["BLOCK_P"]
            return (triton.cdiv(R, meta["BLOCK_P"]), triton.cdiv(CM, meta["BLOCK_C"]))

        _rows_forward[grid](
            x, weight, y, bias, scale, shift, partial_mean, partial_m2, R, CM, M, H, W, Ho, Wo, pad_top, pad_left,
            *_strides4(x), *_weight_strides(weight), *_strides4(y), **flags,
        )
    else:
        def grid(meta):
            chosen["BLOCK"] = meta["BLOCK_S"]
            return (triton.cdiv(NCM, meta["BLOCK_PL"]), min(triton.cdiv(HWo, meta["BLOCK_S"]), MAX_GRID_Y))

        _planes_forward[grid](
            x, weight, y, bias, scale, shift, partial_mean, partial_m2, NCM, CM, M, H, W, HWo, Wo, pad_top, pad_left,
            *_strides4(x), *_weight_strides(weight), *_strides4(y), **flags,
        )
    if not stats:
        return y, None, None
    block = chosen["BLOCK"]
    if rows:
        # Tile i holds `block` pixels of every channel, the last tile fewer.
        tiles = triton.cdiv(R, block)
        counts = torch.arange(tiles, device=x.device, dtype=torch.float64).mul_(-block).add_(R).clamp_(max=block)
        means, m2s = partial_mean[:tiles], partial_m2[:tiles]
    else:
        # Slot p of axis 1 took the blocks p, p + slots, ... of every plane: full blocks but for
        # the plane's last. Its row holds one partition per plane, N of them per channel.
        blocks = triton.cdiv(HWo, block)
        slots = min(blocks, MAX_GRID_Y)
        counts = torch.arange(slots, device=x.device, dtype=torch.float64).neg_().add_(blocks - 1)
        counts = counts.div_(slots, rounding_mode="floor").add_(1).mul_(block)
        counts[(blocks - 1) % slots] -= blocks * block - HWo
        counts = counts.repeat_interleave(N)
        means, m2s = partial_mean[:slots].view(slots * N, CM), partial_m2[:slots].view(slots * N, CM)
    mean, var = merge_partitions(counts[:, None], means, m2s, R, stat_dtype)
    return y, mean, var


def depthwise_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    activation: int,
) -> torch.Tensor:
    """act(((depthwise_conv(x, weight) + bias) * scale) + shift); None means absent.

    y is channels_last when x's channels are innermost (and C > 1), else contiguous NCHW.
    """
    return _forward(x, weight, bias, stride, padding, dilation, scale, shift, activation, False)[0]


def depthwise_forward_with_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var): y = depthwise_conv(x, weight) + bias, as depthwise_forward computes and
    lays it out, and its per-channel batch statistics, fused into the same kernel.

    mean and var are the mean and biased variance over (N, Ho, Wo) of each output channel of y
    as stored (after rounding to y's dtype), float32 (float64 for float64 x), NaN when y has no
    pixels. Deterministic: each program stores its (mean, M2) partials, merged on the host in a
    fixed order (no atomics), and stable when |mean| >> std.
    """
    return _forward(x, weight, bias, stride, padding, dilation, None, None, 0, True)
