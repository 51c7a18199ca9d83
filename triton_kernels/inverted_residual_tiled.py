"""The fused inverted residual with a spatial tile plus halo: each expanded value computed once
per program, not once per depthwise tap. The second kernel of `fused_block`
(triton_kernels/inverted_residual.py), for blocks with an expansion; the same arithmetic.

Tiling. A program owns a TILE_H x TILE_W tile of output pixels of one image and BLOCK_CO output
channels. Its input window is the tile plus the depthwise halo,

    WIN_H = (TILE_H - 1) * stride + (k - 1) * dilation + 1   rows (WIN_W columns likewise),

For each chunk of BLOCK_H hidden channels it runs the expansion GEMM over the window's pixels
(BLOCK_WIN at a time, tl.dot on the tensor cores, fp32 accumulation), applies b_e and act_e,
zeroes the pixels in the padding (the padding is the expanded tensor's), and stores the chunk
in the program's scratch slot. The k*k taps then read it back at their shifted window
positions, from L1/L2. What follows is the gather kernel's: b_d, act_d, the projection's tl.dot
into the [TILE_H*TILE_W, BLOCK_CO] accumulator, and one store of the block output.

Why scratch in global memory: Triton has no indexable shared memory, and a tap is a gather
from the window, not a slice of a register tile. The slot is written and read by one program
(CTA), ordered by barriers (tl.debug_barrier is bar.sync, which makes a CTA's global writes
visible to its own threads), and small enough to stay in L2: the grid is persistent (at most
`parallel_programs` programs, output-channel blocks included, loop over the tiles), each with
one slot of cdiv(WIN_H*WIN_W, BLOCK_WIN)*BLOCK_WIN x BLOCK_H values in x's dtype (the dtype
eager's expanded tensor has). For the default 8x8 tile in fp16: 8 KB at stride 1, 20 KB at
stride 2; every slot is sized for the largest config (the 8x16 tile at stride 2: 36 KB), and an
H200's 132 SMs get at most 528 slots, 19 MB of its 50 MB L2, of which the resident programs
(two or three a multiprocessor at 128-184 registers) touch about half.

The training forward's statistics pass has a tiled kernel too (`hidden_stats_tiled`, the same
tile without the projection): each program merges its tiles' (count, mean, M2) of the
depthwise output into its own row of partials (Chan's merge, in the order of its tiles), and
the host merges the rows; `hidden_statistics` chooses between it and the gather kernel's pass
as `fused_block` does.

Expansion work against the gather kernel's (once per tap, 9x for 3x3), for the 3x3 tiles
here: stride 1, an 8x8 tile's 10x10 window in 128 rows, 2x; stride 2, 17x17 in 320 rows, 5x
(stride 2's window has about 4 input pixels per output pixel: 4x is its floor). Both kernels
recompute the expansion once per output-channel block. Which is faster per shape is measured
on the GPU at the first call (fused_block's choice); unmeasured so far.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastconv.triton_kernels._statistics import chan_merge, tile_moments
from fastconv.triton_kernels._tuning import autotune, interpreter_first
from fastconv.triton_kernels.activations import apply_activation
from fastconv.triton_kernels.inverted_residual import _bias, _dot

CONFIGS = interpreter_first(
    # The interpreter pays per program: one tile covers a test image, wide chunks.
    triton.Config({"TILE_H": 16, "TILE_W": 16, "BLOCK_WIN": 128, "BLOCK_H": 128, "BLOCK_CO": 512, "BLOCK_K": 128},
                  num_warps=4),  # fmt: skip
    [
        # The default first (FASTCONV_TRITON_AUTOTUNE=0 runs only it). ptxas (sm_90, offline)
        # registers fp16 s1 / fp32 s2 / bf16 s2, Triton 3.8 and 3.6: the default 128 / 184 / 128
        # and 128 / 128 / 128, no spills; with BLOCK_K 32 (next) fp32 s2 spills 16 B on 3.6
        # (128 registers), and the 128-wide output blocks and the 8x16 tile 20-28 B in fp32 on 3.8:
        # the autotuner prunes those where they spill.
        triton.Config({"TILE_H": 8, "TILE_W": 8, "BLOCK_WIN": 64, "BLOCK_H": 32, "BLOCK_CO": 64, "BLOCK_K": 16},
                      num_warps=8, num_stages=1),  # fmt: skip
        triton.Config({"TILE_H": 8, "TILE_W": 8, "BLOCK_WIN": 64, "BLOCK_H": 32, "BLOCK_CO": 64, "BLOCK_K": 32},
                      num_warps=8, num_stages=1),  # fmt: skip
        triton.Config({"TILE_H": 8, "TILE_W": 8, "BLOCK_WIN": 64, "BLOCK_H": 16, "BLOCK_CO": 64, "BLOCK_K": 32},
                      num_warps=8, num_stages=1),  # fmt: skip
        triton.Config({"TILE_H": 8, "TILE_W": 8, "BLOCK_WIN": 64, "BLOCK_H": 32, "BLOCK_CO": 128, "BLOCK_K": 32},
                      num_warps=8, num_stages=1),  # fmt: skip
        triton.Config({"TILE_H": 8, "TILE_W": 16, "BLOCK_WIN": 64, "BLOCK_H": 32, "BLOCK_CO": 64, "BLOCK_K": 32},
                      num_warps=8, num_stages=1),  # fmt: skip
        triton.Config({"TILE_H": 4, "TILE_W": 8, "BLOCK_WIN": 32, "BLOCK_H": 64, "BLOCK_CO": 64, "BLOCK_K": 32},
                      num_warps=4, num_stages=1),  # fmt: skip
    ],
)


def window_size(tile: int, kernel: int, stride: int, dilation: int) -> int:
    return (tile - 1) * stride + (kernel - 1) * dilation + 1


def slot_elements(config: triton.Config, kernel_size: tuple[int, int], stride: int, dilation: int) -> int:
    """Scratch values one program of `config` uses (the kernel's SLOT_ELEMENTS must be at least this)."""
    meta = config.kwargs
    pixels = window_size(meta["TILE_H"], kernel_size[0], stride, dilation) * window_size(
        meta["TILE_W"], kernel_size[1], stride, dilation)  # fmt: skip
    return triton.cdiv(pixels, meta["BLOCK_WIN"]) * meta["BLOCK_WIN"] * meta["BLOCK_H"]


@triton.jit
def _window_depthwise(
    x_ptr, we_ptr, be_ptr, wd_ptr, slot, hs, h_mask, n, oh0, ow0, q_row, q_col, H, W, C_IN, pad_top, pad_left,
    x_sn, x_sc, x_sh, x_sw, we_sh, we_sk, wd_sh, wd_st,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, DILATION: tl.constexpr, HAS_BE: tl.constexpr,
    ACT_E: tl.constexpr, TF32: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_WIN: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw(act_e(x @ We^T + b_e)) of one tile's pixels and the hidden channels hs, in fp32, before
    the depthwise's bias and activation: the expansion once per window pixel into the slot,
    then the taps read back from it (see the module docstring)."""
    WIN_H: tl.constexpr = (TILE_H - 1) * STRIDE + (KH - 1) * DILATION + 1
    WIN_W: tl.constexpr = (TILE_W - 1) * STRIDE + (KW - 1) * DILATION + 1
    WIN_PIXELS: tl.constexpr = WIN_H * WIN_W
    dot_dtype = x_ptr.dtype.element_ty
    columns = tl.arange(0, BLOCK_H)
    b_e = _bias(be_ptr, hs, h_mask, HAS_BE, BLOCK_H)[None, :]
    tl.debug_barrier()  # every thread's taps of the previous chunk have read the slot
    for w0 in range(0, WIN_PIXELS, BLOCK_WIN):
        w = w0 + tl.arange(0, BLOCK_WIN)
        ih = oh0 * STRIDE - pad_top + w // WIN_W
        iw = ow0 * STRIDE - pad_left + w % WIN_W
        inside = (w < WIN_PIXELS) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        rows = n * x_sn + ih * x_sh + iw * x_sw
        e = tl.zeros([BLOCK_WIN, BLOCK_H], dtype=tl.float32)
        for k0 in range(0, C_IN, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < C_IN
            a = tl.load(x_ptr + rows[:, None] + (ks * x_sc)[None, :], mask=inside[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(we_ptr + (ks * we_sk)[:, None] + (hs * we_sh)[None, :],
                        mask=k_mask[:, None] & h_mask[None, :], other=0.0)
            e = _dot(a, b.to(dot_dtype), e, TF32)
        e = apply_activation(e + b_e, ACT_E)
        e = tl.where(inside[:, None], e, 0.0)  # the zero padding is the expanded tensor's
        tl.store(slot + w[:, None] * BLOCK_H + columns[None, :], e.to(slot.dtype.element_ty),
                 mask=(w < WIN_PIXELS)[:, None])  # fmt: skip
    tl.debug_barrier()  # the chunk's window is in the slot, for every thread's taps
    d = tl.zeros([TILE_H * TILE_W, BLOCK_H], dtype=tl.float32)
    for tap in range(KH * KW):
        window = (q_row * STRIDE + (tap // KW) * DILATION) * WIN_W + q_col * STRIDE + (tap % KW) * DILATION
        e_tap = tl.load(slot + window[:, None] * BLOCK_H + columns[None, :]).to(tl.float32)
        w_tap = tl.load(wd_ptr + hs * wd_sh + tap * wd_st, mask=h_mask, other=0.0).to(tl.float32)
        d += e_tap * w_tap[None, :]
    return d


@autotune(
    configs=CONFIGS,
    key=["N", "HO", "WO", "C_IN", "C_HID", "C_OUT", "KH", "KW", "STRIDE", "DILATION", "HAS_RESIDUAL", "TF32"],
)
@triton.jit
def fused_block_tiled(
    x_ptr, we_ptr, be_ptr, wd_ptr, bd_ptr, wp_ptr, bp_ptr, r_ptr, out_ptr, scratch_ptr,  # absent: a dummy
    N, H, W, HO, WO, C_IN, C_HID, C_OUT,
    pad_top, pad_left,
    x_sn, x_sc, x_sh, x_sw,
    we_sh, we_sk,  # expansion weight (C_hid, C_in)
    wd_sh, wd_st,  # depthwise weight (C_hid, KH*KW)
    wp_so, wp_sh,  # projection weight (C_out, C_hid)
    r_sn, r_sc, r_sh, r_sw,
    o_sn, o_sc, o_sh, o_sw,
    SLOT_ELEMENTS,  # scratch values per program, the same for every config (the host's maximum)
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, DILATION: tl.constexpr,
    HAS_BE: tl.constexpr, HAS_BD: tl.constexpr, HAS_BP: tl.constexpr,
    ACT_E: tl.constexpr, ACT_D: tl.constexpr, ACT_P: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, TF32: tl.constexpr, INDEX_64: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_WIN: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    dot_dtype = x_ptr.dtype.element_ty
    programs = tl.num_programs(0)
    pid_o = tl.program_id(1)
    slot = scratch_ptr + (pid_o * programs + tl.program_id(0)).to(tl.int64) * SLOT_ELEMENTS
    cos = pid_o * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = cos < C_OUT
    # The tile's output pixels, row-major.
    q = tl.arange(0, TILE_H * TILE_W)
    q_row, q_col = q // TILE_W, q % TILE_W
    tiles_w = tl.cdiv(WO, TILE_W)
    per_image = tl.cdiv(HO, TILE_H) * tiles_w
    for tile in range(tl.program_id(0), N * per_image, programs):  # persistent: one slot per program
        n = tile // per_image
        if INDEX_64:
            n = n.to(tl.int64)
        oh0 = (tile % per_image) // tiles_w * TILE_H
        ow0 = (tile % per_image) % tiles_w * TILE_W
        oh, ow = oh0 + q_row, ow0 + q_col
        acc = tl.zeros([TILE_H * TILE_W, BLOCK_CO], dtype=tl.float32)
        for h0 in range(0, C_HID, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_mask = hs < C_HID
            d = _window_depthwise(
                x_ptr, we_ptr, be_ptr, wd_ptr, slot, hs, h_mask, n, oh0, ow0, q_row, q_col, H, W, C_IN, pad_top,
                pad_left, x_sn, x_sc, x_sh, x_sw, we_sh, we_sk, wd_sh, wd_st, KH, KW, STRIDE, DILATION, HAS_BE, ACT_E,
                TF32, TILE_H, TILE_W, BLOCK_WIN, BLOCK_H, BLOCK_K,
            )  # fmt: skip
            d = apply_activation(d + _bias(bd_ptr, hs, h_mask, HAS_BD, BLOCK_H)[None, :], ACT_D)
            d = tl.where(h_mask[None, :], d, 0.0)  # NaN * 0 must not spread (see the gather kernel)
            wp = tl.load(wp_ptr + (hs * wp_sh)[:, None] + (cos * wp_so)[None, :],
                         mask=h_mask[:, None] & co_mask[None, :], other=0.0)
            acc = _dot(d.to(dot_dtype), wp.to(dot_dtype), acc, TF32)

        v = apply_activation(acc + _bias(bp_ptr, cos, co_mask, HAS_BP, BLOCK_CO)[None, :], ACT_P)
        out_mask = ((oh < HO) & (ow < WO))[:, None] & co_mask[None, :]
        if HAS_RESIDUAL:
            r_offsets = (n * r_sn + oh * r_sh + ow * r_sw)[:, None] + (cos * r_sc)[None, :]
            v += tl.load(r_ptr + r_offsets, mask=out_mask, other=0.0).to(tl.float32)
        o_offsets = (n * o_sn + oh * o_sh + ow * o_sw)[:, None] + (cos * o_sc)[None, :]
        tl.store(out_ptr + o_offsets, v.to(out_ptr.dtype.element_ty), mask=out_mask)


STATS_CONFIGS = interpreter_first(
    triton.Config({"TILE_H": 16, "TILE_W": 16, "BLOCK_WIN": 128, "BLOCK_H": 128, "BLOCK_K": 128}, num_warps=4),
    [
        # The forward's 8x8 tile without the projection, the default first. ptxas (sm_90,
        # offline), fp16 s1 / fp32 s2 registers on Triton 3.8 and 3.6: 126 / 104 and 128 / 110,
        # no spills. The forward's own default (a 64-pixel window step) spills 12 B in fp32 on 3.6.
        triton.Config({"TILE_H": 8, "TILE_W": 8, "BLOCK_WIN": 32, "BLOCK_H": 32, "BLOCK_K": 16}, num_warps=8,
                      num_stages=1),  # fmt: skip
        triton.Config({"TILE_H": 8, "TILE_W": 8, "BLOCK_WIN": 64, "BLOCK_H": 16, "BLOCK_K": 16}, num_warps=8,
                      num_stages=1),  # fmt: skip
        triton.Config({"TILE_H": 8, "TILE_W": 8, "BLOCK_WIN": 64, "BLOCK_H": 32, "BLOCK_K": 16}, num_warps=8,
                      num_stages=1),  # fmt: skip
        triton.Config({"TILE_H": 8, "TILE_W": 8, "BLOCK_WIN": 64, "BLOCK_H": 64, "BLOCK_K": 32}, num_warps=8,
                      num_stages=1),  # fmt: skip
        triton.Config({"TILE_H": 8, "TILE_W": 16, "BLOCK_WIN": 64, "BLOCK_H": 32, "BLOCK_K": 32}, num_warps=8,
                      num_stages=1),  # fmt: skip
    ],
)


@autotune(configs=STATS_CONFIGS, key=["N", "HO", "WO", "C_IN", "C_HID", "KH", "KW", "STRIDE", "DILATION", "TF32"])
@triton.jit
def hidden_stats_tiled(
    x_ptr, we_ptr, be_ptr, wd_ptr, scratch_ptr, count_ptr, mean_ptr, m2_ptr,  # [programs], [programs, C_hid] x2
    N, H, W, HO, WO, C_IN, C_HID,
    pad_top, pad_left,
    x_sn, x_sc, x_sh, x_sw,
    we_sh, we_sk,
    wd_sh, wd_st,
    SLOT_ELEMENTS,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, DILATION: tl.constexpr,
    HAS_BE: tl.constexpr, ACT_E: tl.constexpr, TF32: tl.constexpr, INDEX_64: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_WIN: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The training forward's statistics pass, tiled: each program merges the (count, mean,
    M2) of the depthwise output d (before its BatchNorm) over its tiles into its own row of
    partials (Chan's merge; the host merges the rows, as for the gather kernel's)."""
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    slot = scratch_ptr + program.to(tl.int64) * SLOT_ELEMENTS
    q = tl.arange(0, TILE_H * TILE_W)
    q_row, q_col = q // TILE_W, q % TILE_W
    tiles_w = tl.cdiv(WO, TILE_W)
    per_image = tl.cdiv(HO, TILE_H) * tiles_w
    count = tl.zeros([], dtype=tl.float32)
    for tile in range(program, N * per_image, programs):
        n = tile // per_image
        if INDEX_64:
            n = n.to(tl.int64)
        oh0 = (tile % per_image) // tiles_w * TILE_H
        ow0 = (tile % per_image) % tiles_w * TILE_W
        valid = ((oh0 + q_row) < HO) & ((ow0 + q_col) < WO)
        tile_count = tl.sum(valid.to(tl.float32), axis=0)
        for h0 in range(0, C_HID, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_mask = hs < C_HID
            d = _window_depthwise(
                x_ptr, we_ptr, be_ptr, wd_ptr, slot, hs, h_mask, n, oh0, ow0, q_row, q_col, H, W, C_IN, pad_top,
                pad_left, x_sn, x_sc, x_sh, x_sw, we_sh, we_sk, wd_sh, wd_st, KH, KW, STRIDE, DILATION, HAS_BE, ACT_E,
                TF32, TILE_H, TILE_W, BLOCK_WIN, BLOCK_H, BLOCK_K,
            )  # fmt: skip
            # A tile's pixels past the image read real window pixels, so their d is not 0. The
            # moments use only valid deviations, but the rough mean sums every entry: zeroed,
            # it stays close to the true mean (tile_moments' precision when |mean| >> std).
            d = tl.where(valid[:, None], d, 0.0)
            tile_mean, tile_m2 = tile_moments(d, valid[:, None], tile_count, 0)
            row = program.to(tl.int64) * C_HID + hs
            mean = tl.load(mean_ptr + row, mask=h_mask, other=0.0)
            m2 = tl.load(m2_ptr + row, mask=h_mask, other=0.0)
            _, mean, m2 = chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)
            tl.store(mean_ptr + row, mean, mask=h_mask)
            tl.store(m2_ptr + row, m2.to(m2_ptr.dtype.element_ty), mask=h_mask)
        count += tile_count
    tl.store(count_ptr + program, count)
