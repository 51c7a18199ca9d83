"""Dense kxk convolution in Triton as an implicit GEMM, with a fused per-output-channel epilogue
and, optionally, the per-channel batch statistics of what it wrote (a fused BatchNorm's first half).

Per group g the convolution is a GEMM out[m, j] = sum_k A[m, k] * B[k, j]: m runs over the
M = N*Ho*Wo output pixels (n, oh, ow), j over the N_g = C_out/groups output channels of the group,
and k over the K_g = C_g*KH*KW window entries (ky, kx, c), C_g = C_in/groups, with

    A[m, (ky, kx, c)] = x[n, g*C_g + c, oh*SH - top + ky*DH, ow*SW - left + kx*DW]  (0 off the image)
    B[(ky, kx, c), j] = weight[g*N_g + j, c, ky, kx].

"Implicit": A is never materialised (no im2col buffer); each program gathers its [BLOCK_M, BLOCK_K]
tiles of A straight from x and feeds them to tl.dot. Two ways to walk K, chosen by SMALL_C:

* Taps x channel blocks (C_g >= 16). One flat loop over (tap, channel block) pairs: a tap's input
  rows are the tile's precomputed window corners plus one scalar offset, its out-of-image mask is
  four compares per pixel, and the channels are a plain arange, so there is no division per K
  element. The loop is flat rather than nested so that Triton software-pipelines it across taps:
  with 64 channels and BLOCK_K = 64 a nested loop's inner trip count would be 1, and nothing
  would overlap. On channels_last x a tap's tile is BLOCK_M contiguous channel runs.
* Flattened K (C_g < 16: the 3-channel stem, narrow groups). A K block of the taps-x-channels walk
  would hold C_g useful lanes of at least 16 (tl.dot's smallest K); instead k runs over all
  K_g = C_g*KH*KW entries in (ky, kx, c) order, and each K block splits its indices into
  (ky, kx, c) by division, once per block for BLOCK_K lanes, not per pixel. The stem's K = 27 is
  then one block of 32.

Epilogue, per output channel, in float32 (float64 for float64 inputs): act((acc + bias) * scale +
shift), stored in out's dtype; with a residual (a tensor of out's shape, any strides) either
act(v) + residual or act(v + residual), ResNet's order, so that a BasicBlock's last 3x3 conv
writes relu(bn(conv) + identity) in one pass and the sum never exists unactivated in memory. With STATS each program also reduces the values it stored (rounded
to out's dtype and back, so the statistics describe exactly what was written) to a count, a mean
and M2 (the sum of squared deviations from that mean) per channel over its valid pixels, and
stores them in its own row of two [tiles_m, C_out] partial buffers; the host merges the rows with
Chan et al.'s formula for combining partitions (torch ops, fixed order: deterministic, no atomics,
and stable when |mean| >> std, since no sum of squares of raw values is ever formed).

Every tensor is read through its own strides (x channels_last, NCHW or a channel slice; out a
channel slice of a wider buffer, of which only out's own elements are written). On a GPU a weight
whose input channels are not innermost is repacked to channels_last first (small next to the
conv): the B tiles are then contiguous runs, where a (C_out, C_in, kh, kw)-contiguous weight
would put every element of a B tile in its own memory sector.

Layouts in code generation (checked by compiling every config for sm_90 without a GPU and reading
registers and spills off the cubin): a gather whose offsets Triton cannot prove contiguous gets
its default layout, threads along the tile's last axis, so a [BLOCK_M, BLOCK_K] gather leaves
each thread a column of up to 32 pixels, each with its own offset and mask registers (spills of
0.4 to 2 KB per thread). Hence A tiles whose channels are not innermost (NCHW, crops) and all
small-C tiles are gathered as [BLOCK_K, BLOCK_M] and transposed (PIXEL_MAJOR), and an out whose
channels are not innermost is stored transposed (OUT_PIXEL_MAJOR): threads then run along the
pixels, which on NCHW are also the contiguous axis. And Triton infers vector loads only from
multiples of 16; ALIGN states smaller powers of two (40 channels: multiples of 8), without which
such tiles load one element at a time and lose cp.async pipelining.

float64 (the interpreter's oracle and gradcheck) never goes through tl.dot: it takes rank-1
updates in float64, one (tap, channel) at a time, as pointwise.py does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fastconv._geometry import accumulate_dtype, output_size
from fastconv.triton_kernels._indexing import needs_64bit_index
from fastconv.triton_kernels._statistics import merge_partitions, tile_moments
from fastconv.triton_kernels._tuning import autotune, interpreter_first
from fastconv.triton_kernels.activations import apply_activation

# Offsets past 2**31 - 1 - this take the 64-bit path. Masked pixels are clamped to pixel 0, so
# only a channel block's overshoot and the padding's negative taps stray, and never dereferenced.
_INDEX_HEADROOM = 2**24

# Below this many input channels per group a K block of channels would be mostly masked lanes
# (tl.dot needs K >= 16): such convs take the flattened-K path, if the window fits its 15-bit
# tap masks (see the kernel).
_SMALL_C = 16
_SMALL_C_MAX_WINDOW = 15

# Consecutive programs walk a band of _BAND_M pixel blocks down every column of (group, output
# channel block) before moving to the next band, so that the x rows of the band stay in L2 while
# every column reads them, and each column's weight tiles are reused by the band's pixel blocks.
_BAND_M = tl.constexpr(8)

_TAP_CONFIGS = interpreter_first(
    # (BLOCK_M pixels, BLOCK_N output channels, BLOCK_K input channels of one tap per step).
    # The interpreter's: few programs, and BLOCK_K = 32 so that a test with C_g = 40 walks two
    # channel blocks per tap, the second with masked tail channels.
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4),
    [
        # The default (what FASTCONV_TRITON_AUTOTUNE=0 and the GPU tests run) must not spill in
        # any specialisation, and float32 without TF32 (a CUDA-core FMA dot, the tests' float32)
        # is the hungry one. sm_90, offline (tests/test_triton_configs.py), Triton 3.6 / 3.8:
        # 128x128x64 w8 took 255 registers and spilled 12 / 8 B channels_last, and 6.3 KB / 56 B
        # with INDEX_64 on NCHW; 128x128x32, 128x64x64 and 64x64x64 on 4 warps still spilled
        # there (0.7 to 10 KB on 3.6). 64x64x64 on 8 warps takes 62 to 124 registers (218 for
        # 3.6's INDEX_64 NCHW float32) and spills nothing; the larger tiles stay candidates.
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        # General purpose: 128..512 channels.
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
        # No 128x256x64 or 256x128x64 on 8 warps: 128 accumulators a thread, 255 registers, and
        # spills in 15 of the 17 (case, Triton) pairs measured, 16 B to 67 KB; only 3.8's
        # float16 channels_last and NCHW without statistics fit, once each.
        # 64 output channels at large M (ResNet50's 56x56 stage, VGG's first block): the whole
        # channel range in one column, tall pixel tiles.
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        # 32 output channels (DenseNet's 3x3 writes 32 from 128).
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        # Few pixels, many channels (7x7 and 14x14 stages): smaller pixel tiles fill the 132 SMs.
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        # 16 to 48 channels per group: K blocks that waste no lanes.
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    ],
)
_FLAT_CONFIGS = interpreter_first(
    # (BLOCK_M pixels, BLOCK_N output channels, BLOCK_K flattened (ky, kx, c) entries per step)
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4),
    [
        # The stem (3 -> 32, K = 27, 1.6M pixels at batch 128) is memory-bound on its output:
        # one K step (nothing to pipeline), the whole channel range per program. At most 16
        # gathered A elements per thread (BLOCK_M * BLOCK_K <= 512 * num_warps) keeps sm_90 at
        # 64 to 128 registers; 32 per thread doubles that. The default (FASTCONV_TRITON_AUTOTUNE=0)
        # takes 16 channels per program: 128x32x32 spilled 100 B for float32 without TF32 on
        # Triton 3.6 (255 registers; a CUDA-core dot), where 128x16x32 takes 222 and no stack
        # (66 to 185 registers elsewhere, sm_90, tests/test_triton_configs.py).
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=16, num_stages=1),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1),
        # Wider outputs, and longer K (8 to 15 channels per group, 5x5 and 7x7 windows).
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=16, num_stages=2),
        # (On Triton 3.6 this one spills 1.3 KB on the 7x7 stem; 3.8 fits it in 112 registers.)
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    ],
)

# Shapes, and the flags that change the code (layout ones included: a tile tuned for
# channels_last need not suit NCHW); the autotuner adds the tensors' dtypes itself.
_KEY = ["M", "H", "W", "C_G", "N_G", "GROUPS", "KH", "KW", "SH", "SW", "DH", "DW",
        "HAS_BIAS", "HAS_SCALE", "HAS_SHIFT", "ACTIVATION", "HAS_RESIDUAL", "ACT_AFTER_RESIDUAL", "STATS", "TF32",
        "PIXEL_MAJOR", "OUT_PIXEL_MAJOR", "ALIGN", "INDEX_64"]


@triton.jit
def _load_vector(ptr, index, mask, WIDE: tl.constexpr):
    """ptr[index] (a per-channel vector) in the compute dtype."""
    compute = tl.float64 if WIDE else tl.float32
    return tl.load(ptr + index, mask=mask, other=0.0).to(compute)


@triton.jit
def _dot(a, b, acc, TF32: tl.constexpr):
    """acc + a @ b on the tensor cores; float32 operands in full precision unless TF32."""
    if TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _conv_gemm_kernel(
    x_ptr, w_ptr, out_ptr,
    bias_ptr, scale_ptr, shift_ptr, residual_ptr,  # absent tensors get a dummy pointer
    mean_ptr, m2_ptr,  # [tiles_m, GROUPS * N_G] partial statistics (STATS only)
    M, H, W, Ho, Wo,  # M = N*Ho*Wo output pixels; input and output spatial sizes
    C_G, N_G, GROUPS,  # input and output channels per group; groups
    pad_top, pad_left,  # the bottom and right padding only shape Ho and Wo
    x_sn, x_sc, x_sh, x_sw,  # strides of x
    w_so, w_sc, w_sh, w_sw,  # strides of weight over output channel, input channel, ky, kx
    o_sn, o_sc, o_sh, o_sw,  # strides of out
    r_sn, r_sc, r_sh, r_sw,  # strides of the residual (out's shape)
    KH: tl.constexpr, KW: tl.constexpr,  # window
    SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,  # stride, dilation
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr,  # code from fastconv.activations
    HAS_RESIDUAL: tl.constexpr,
    ACT_AFTER_RESIDUAL: tl.constexpr,  # act(v + residual) instead of act(v) + residual
    STATS: tl.constexpr,  # also store per-tile (mean, M2) of the stored values
    SMALL_C: tl.constexpr,  # walk K flattened over (ky, kx, c) instead of taps x channel blocks
    PIXEL_MAJOR: tl.constexpr,  # gather A tiles as [BLOCK_K, BLOCK_M] (x's channels not innermost)
    OUT_PIXEL_MAJOR: tl.constexpr,  # likewise the store of out (out's channels not innermost)
    ALIGN: tl.constexpr,  # channels innermost everywhere, and every offset a multiple of ALIGN
    TF32: tl.constexpr,  # float32 operands may go through the tensor cores as tf32
    INDEX_64: tl.constexpr,  # some offset may exceed 2**31
    WIDE: tl.constexpr,  # float64: rank-1 updates in float64 instead of tl.dot
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    # Banded order: see _BAND_M. A column is a (group, output channel block) pair.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N_G, BLOCK_N)
    per_band = _BAND_M * GROUPS * blocks_n
    first_m = (pid // per_band) * _BAND_M
    band_rows = tl.minimum(blocks_m - first_m, _BAND_M)
    pid_m = first_m + (pid % per_band) % band_rows
    column = (pid % per_band) // band_rows
    g = column // blocks_n
    pid_n = column % blocks_n
    if INDEX_64:
        pid_m = pid_m.to(tl.int64)  # before the multiplies, which would overflow in int32
        pid_n = pid_n.to(tl.int64)
        g = g.to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rows < M
    rows = tl.where(m_mask, rows, 0)  # masked pixels read pixel 0: their offsets stay in range
    ow = rows % Wo
    rest = rows // Wo
    oh = rest % Ho
    n = rest // Ho
    # Each pixel's window corner, and its x offset: a tap adds one scalar to it.
    ih0 = oh * SH - pad_top
    iw0 = ow * SW - pad_left
    x_row0 = n * x_sn + ih0 * x_sh + iw0 * x_sw
    o_rows = n * o_sn + oh * o_sh + ow * o_sw  # now, so that n, oh, ow need not live through the loop
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols < N_G
    channels = g * N_G + cols  # output channels
    w_cols = channels * w_so
    if ALIGN > 1:
        w_cols = tl.multiple_of(w_cols, ALIGN)
    x_first = g * C_G  # the group's first input channel

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=compute)
    if WIDE:
        for tap in range(0, KH * KW):
            ky = tap // KW
            kx = tap % KW
            if INDEX_64:
                ky = ky.to(tl.int64)
                kx = kx.to(tl.int64)
            ih = ih0 + ky * DH
            iw = iw0 + kx * DW
            inside = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_rows = x_row0 + (ky * DH) * x_sh + (kx * DW) * x_sw
            w_tap = w_cols + ky * w_sh + kx * w_sw
            for c_step in range(0, C_G):
                c = c_step
                if INDEX_64:
                    c = c.to(tl.int64)
                a = tl.load(x_ptr + x_rows + (x_first + c) * x_sc, mask=inside, other=0.0).to(compute)
                b = tl.load(w_ptr + w_tap + c * w_sc, mask=n_mask, other=0.0).to(compute)
                acc += a[:, None] * b[None, :]
    elif SMALL_C:
        # Which taps of each pixel's window lie on the image, as one bit mask: bit ky for rows,
        # bit 16 + kx for columns (the host sends only windows of up to 15x15 here); masked
        # pixels get none. A K lane's mask is then shifts and ands, and a pixel costs one word.
        window = tl.zeros([BLOCK_M], dtype=tl.int32)
        for i in tl.static_range(KH):
            ih = ih0 + i * DH
            window = window | (((ih >= 0) & (ih < H) & m_mask).to(tl.int32) << i)
        for j in tl.static_range(KW):
            iw = iw0 + j * DW
            window = window | (((iw >= 0) & (iw < W)).to(tl.int32) << (16 + j))
        for k0 in range(0, C_G * KH * KW, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            if INDEX_64:
                ks = ks.to(tl.int64)
            k_mask = ks < C_G * KH * KW
            # (ky, kx, c) of each K lane: divisions on BLOCK_K lanes, shared by the BLOCK_M pixels.
            tap = ks // C_G
            c = ks - tap * C_G
            ky = tl.where(k_mask, tap // KW, KH)  # bit KH is never set: a lane past K reads nothing
            kx = tap % KW
            x_ks = (ky * DH) * x_sh + (kx * DW) * x_sw + (x_first + c) * x_sc
            inside = ((window[None, :] >> ky[:, None]) & (window[None, :] >> (kx + 16)[:, None]) & 1) != 0
            # Gathered as [BLOCK_K, BLOCK_M] and transposed: a gather gets Triton's default layout,
            # threads along the last axis, here the pixels, so each thread holds few of them.
            # Gathered as [BLOCK_M, BLOCK_K], a 128x32 tile on 4 warps left each thread 32 pixels'
            # offsets and masks and spilled on sm_90 (255 registers, 400 bytes of stack);
            # transposed it takes 127 registers and no stack.
            a = tl.trans(tl.load(x_ptr + x_ks[:, None] + x_row0[None, :], mask=inside, other=0.0))
            w_ks = c * w_sc + ky * w_sh + kx * w_sw
            b = tl.load(w_ptr + w_ks[:, None] + w_cols[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _dot(a, b.to(a.dtype), acc, TF32)
    else:
        c_blocks = tl.cdiv(C_G, BLOCK_K)
        for step_i in range(0, KH * KW * c_blocks):
            step = step_i
            if INDEX_64:
                step = step.to(tl.int64)
            tap = step // c_blocks  # scalar work, once per step
            c0 = (step - tap * c_blocks) * BLOCK_K
            ky = tap // KW
            kx = tap - ky * KW
            ih = ih0 + ky * DH
            iw = iw0 + kx * DW
            inside = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_rows = x_row0 + ((ky * DH) * x_sh + (kx * DW) * x_sw)
            cs = c0 + tl.arange(0, BLOCK_K)
            k_mask = cs < C_G
            if PIXEL_MAJOR:
                a = tl.trans(tl.load(x_ptr + ((x_first + cs) * x_sc)[:, None] + x_rows[None, :],
                                     mask=k_mask[:, None] & inside[None, :], other=0.0))
            elif ALIGN > 1:
                # Channels innermost (x_sc == 1) and every offset a multiple of ALIGN: say so,
                # for the vector loads Triton infers only from multiples of 16 itself.
                x_base = tl.multiple_of(x_rows + x_first, ALIGN)
                k_mask = tl.max_constancy(k_mask, ALIGN)
                a = tl.load(x_ptr + x_base[:, None] + cs[None, :], mask=inside[:, None] & k_mask[None, :], other=0.0)
            else:
                a = tl.load(x_ptr + x_rows[:, None] + ((x_first + cs) * x_sc)[None, :],
                            mask=inside[:, None] & k_mask[None, :], other=0.0)
            # Masked channel rows of B are zero, so A's masked lanes add nothing either way.
            w_ks = cs * w_sc + (ky * w_sh + kx * w_sw)
            if ALIGN > 1:
                w_ks = tl.multiple_of(w_ks, ALIGN)
            b = tl.load(w_ptr + w_ks[:, None] + w_cols[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _dot(a, b.to(a.dtype), acc, TF32)

    # Epilogue, per output channel.
    v = acc
    if HAS_BIAS:
        v += _load_vector(bias_ptr, channels, n_mask, WIDE)[None, :]
    if HAS_SCALE:
        v = v * _load_vector(scale_ptr, channels, n_mask, WIDE)[None, :]
    if HAS_SHIFT:
        v += _load_vector(shift_ptr, channels, n_mask, WIDE)[None, :]
    if HAS_RESIDUAL:
        # The pixels' (n, oh, ow) again rather than kept through the K loop: three more live
        # vectors there for a rare epilogue. Loaded in the store's orientation (see x).
        ow = rows % Wo
        rest = rows // Wo
        r_rows = (rest // Ho) * r_sn + (rest % Ho) * r_sh + ow * r_sw
        if OUT_PIXEL_MAJOR:
            residual = tl.trans(tl.load(residual_ptr + (channels * r_sc)[:, None] + r_rows[None, :],
                                        mask=n_mask[:, None] & m_mask[None, :], other=0.0))
        elif ALIGN > 1:  # the residual's channels innermost too (_alignment)
            r_channels = tl.max_contiguous(tl.multiple_of(channels, ALIGN), ALIGN)
            residual = tl.load(residual_ptr + tl.multiple_of(r_rows, ALIGN)[:, None] + r_channels[None, :],
                               mask=m_mask[:, None] & tl.max_constancy(n_mask, ALIGN)[None, :], other=0.0)
        else:
            residual = tl.load(residual_ptr + r_rows[:, None] + (channels * r_sc)[None, :],
                               mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        residual = residual.to(compute)
        if ACT_AFTER_RESIDUAL:
            v = apply_activation(v + residual, ACTIVATION)
        else:
            v = apply_activation(v, ACTIVATION) + residual
    else:
        v = apply_activation(v, ACTIVATION)
    stored = v.to(out_ptr.dtype.element_ty)
    if OUT_PIXEL_MAJOR:
        # out's channels are not innermost: store transposed, threads along the pixels (see x).
        tl.store(out_ptr + (channels * o_sc)[:, None] + o_rows[None, :], tl.trans(stored),
                 mask=n_mask[:, None] & m_mask[None, :])
    elif ALIGN > 1:
        o_channels = tl.max_contiguous(tl.multiple_of(channels, ALIGN), ALIGN)
        o_mask = tl.max_constancy(n_mask, ALIGN)
        tl.store(out_ptr + tl.multiple_of(o_rows, ALIGN)[:, None] + o_channels[None, :], stored,
                 mask=m_mask[:, None] & o_mask[None, :])
    else:
        tl.store(out_ptr + o_rows[:, None] + (channels * o_sc)[None, :], stored, mask=m_mask[:, None] & n_mask[None, :])
    if STATS:
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(compute)
        s = tl.where(m_mask[:, None], stored.to(compute), 0.0)
        tile_mean, tile_m2 = tile_moments(s, m_mask[:, None], count, 0)  # the mean in float64
        p_offsets = pid_m * (GROUPS * N_G) + channels
        tl.store(mean_ptr + p_offsets, tile_mean, mask=n_mask)
        tl.store(m2_ptr + p_offsets, tile_m2, mask=n_mask)


# One kernel, two config lists: the autotuner of each path only times the tiles that suit it.
_conv_gemm_taps = autotune(configs=_TAP_CONFIGS, key=_KEY)(_conv_gemm_kernel)
_conv_gemm_flat = autotune(configs=_FLAT_CONFIGS, key=_KEY)(_conv_gemm_kernel)


# --------------------------------------------------------------------------------------------
# Host side.


def _combine_statistics(partial_mean, partial_m2, block_m: int, M: int, dtype: torch.dtype):
    """Per-channel (mean, biased variance) over all M pixels from per-tile (mean, M2) rows: tile i
    holds block_m pixels, except a shorter last tile."""
    tiles = triton.cdiv(M, block_m)
    counts = torch.arange(tiles, device=partial_mean.device, dtype=torch.float64).mul_(-block_m).add_(M)
    counts = counts.clamp_(max=block_m)[:, None]
    return merge_partitions(counts, partial_mean[:tiles], partial_m2[:tiles], M, dtype)


def _alignment(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, C_g: int, N_g: int,
               residual: Optional[torch.Tensor] = None) -> int:
    """The largest power of two up to 16 dividing every pixel and window stride, each group's first
    channel and each tensor's start, in elements, when all the tensors (the residual too, when
    given) have their channels innermost; else 1 (no hint).

    Triton itself infers vector loads only from multiples of 16; 40 channels (a multiple of 8)
    would otherwise load A and B tiles one element at a time, and no cp.async pipelining.
    """
    tensors = (x, weight, out) + ((residual,) if residual is not None else ())
    if any(t.stride(1) != 1 for t in tensors):
        return 1
    values = [C_g, N_g] + [t.stride(d) for t in tensors for d in (0, 2, 3)]
    values += [t.storage_offset() for t in tensors]
    divisor = 0
    for v in values:
        divisor = math.gcd(divisor, v)
    align = 16
    while divisor % align:
        align //= 2
    return align


def _check_vector(name: str, t: Optional[torch.Tensor], channels: int) -> None:
    if t is None:
        return
    if tuple(t.shape) != (channels,) or not t.is_contiguous():
        raise ValueError(f"fastconv: {name} must be a contiguous ({channels},) vector; got {tuple(t.shape)}")


def conv_bn_act_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    activation: int = 0,
    compute_stats: bool = False,
    allow_tf32: bool = False,
    residual: Optional[torch.Tensor] = None,
    activation_after_residual: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """out = act((conv2d(x, weight) + bias) * scale + shift) [+ residual]; returns (out, mean, var).

    x (N, C_in, H, W) and weight (C_out, C_in/groups, kh, kw), in one dtype, may have any
    strides; out (N, C_out, Ho, Wo) is preallocated in that dtype with any strides, and only its
    elements are written (it must not overlap x). padding is (top, left, bottom, right), zeros.
    bias (x's dtype), scale and shift (x's dtype or float32) are contiguous (C_out,) vectors, None
    when absent; activation codes as in fastconv.activations. Accumulates in float32 (float64 for
    float64 inputs); float32 operands use tf32 tensor cores only when allow_tf32.

    With compute_stats, mean and var are the per-channel mean and biased variance over (N, Ho,
    Wo) of out as stored (after rounding to out's dtype), float32 (float64 for float64 inputs),
    NaN when out has no pixels; otherwise both are None. Deterministic.

    residual, of out's shape and dtype with any strides (not overlapping out: the autotuner's
    timing runs repeat the launch), is added after the activation, or before it when
    activation_after_residual. It excludes compute_stats (the statistics are a training
    BatchNorm's input, the plain conv).
    """
    N, C, H, W = x.shape
    C_out, C_g, KH, KW = weight.shape
    if groups < 1 or C_g * groups != C or C_out % groups != 0:
        raise ValueError(f"fastconv: weight {tuple(weight.shape)} does not fit {C} input channels in {groups} groups")
    Ho, Wo = output_size((H, W), (KH, KW), stride, padding, dilation)
    if tuple(out.shape) != (N, C_out, Ho, Wo):
        raise ValueError(f"fastconv: out has shape {tuple(out.shape)}, expected {(N, C_out, Ho, Wo)}")
    if weight.dtype != x.dtype or out.dtype != x.dtype:
        raise ValueError(f"fastconv: x, weight and out must share a dtype; got {x.dtype}, {weight.dtype}, {out.dtype}")
    for name, t in (("bias", bias), ("scale", scale), ("shift", shift)):
        _check_vector(name, t, C_out)
    if residual is not None:
        if tuple(residual.shape) != tuple(out.shape) or residual.dtype != out.dtype:
            raise ValueError(f"fastconv: residual must match out's shape {tuple(out.shape)} and dtype {out.dtype}; "
                             f"got {tuple(residual.shape)} and {residual.dtype}")  # fmt: skip
        if compute_stats:
            raise ValueError("fastconv: compute_stats takes no residual (its statistics are of the plain conv)")
    wide = x.dtype == torch.float64
    stat_dtype = accumulate_dtype(x.dtype)
    M = N * Ho * Wo
    if M == 0 or C_out == 0:
        if not compute_stats:
            return out, None, None
        nan = torch.full((C_out,), float("nan"), dtype=stat_dtype, device=x.device)
        return out, nan, nan.clone()

    small_c = C_g < _SMALL_C and max(KH, KW) <= _SMALL_C_MAX_WINDOW
    if x.is_cuda and not small_c and not wide and weight.stride(1) != 1:
        weight = weight.contiguous(memory_format=torch.channels_last)
    kernel = _conv_gemm_flat if small_c else _conv_gemm_taps
    partial_mean = partial_m2 = x  # a dummy pointer, never touched without STATS
    if compute_stats:
        tiles = triton.cdiv(M, min(config.kwargs["BLOCK_M"] for config in kernel.configs))
        partial_mean = torch.empty(tiles, C_out, dtype=torch.float64, device=x.device)  # see tile_moments
        partial_m2 = torch.empty(tiles, C_out, dtype=stat_dtype, device=x.device)
    vectors = [t for t in (bias, scale, shift, residual) if t is not None]
    flags = dict(
        KH=KH, KW=KW, SH=stride[0], SW=stride[1], DH=dilation[0], DW=dilation[1],
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        ACTIVATION=int(activation), HAS_RESIDUAL=residual is not None,
        ACT_AFTER_RESIDUAL=bool(activation_after_residual) and residual is not None,
        STATS=bool(compute_stats), SMALL_C=small_c,
        PIXEL_MAJOR=x.stride(1) != 1, OUT_PIXEL_MAJOR=out.stride(1) != 1,
        ALIGN=1 if small_c else _alignment(x, weight, out, C_g, C_out // groups, residual),
        TF32=bool(allow_tf32) and x.dtype == torch.float32,
        INDEX_64=needs_64bit_index([x, weight, out] + vectors, _INDEX_HEADROOM), WIDE=wide,
    )
    r_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    # Absent tensors are never loaded (their HAS_ flag is off); any pointer will do.
    bias, scale, shift, residual = (t if t is not None else x for t in (bias, scale, shift, residual))
    N_g = C_out // groups
    # The grid function sees the config that runs (the autotuner's last call is the real launch):
    # the statistics' tile count follows its BLOCK_M.
    chosen = {}

    def grid(meta):
        chosen["BLOCK_M"] = meta["BLOCK_M"]
        return (triton.cdiv(M, meta["BLOCK_M"]) * groups * triton.cdiv(N_g, meta["BLOCK_N"]),)

    kernel[grid](
        x, weight, out, bias, scale, shift, residual, partial_mean, partial_m2,
        M, H, W, Ho, Wo, C_g, N_g, groups, padding[0], padding[1],
        *x.stride(), *weight.stride(), *out.stride(), *r_strides,
        **flags,
    )
    if not compute_stats:
        return out, None, None
    mean, var = _combine_statistics(partial_mean, partial_m2, chosen["BLOCK_M"], M, stat_dtype)
    return out, mean, var
