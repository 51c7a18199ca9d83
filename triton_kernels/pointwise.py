"""Pointwise (1x1) convolution in Triton, as a GEMM over pixels, with a fused per-input-channel
prologue and a fused per-output-channel epilogue (the weight gradient is in
pointwise_backward.py).

A 1x1 convolution is out[m, j] = sum_k A[m, k] * B[k, j] with M = N*H*W pixels, K = C_in and
N_gemm = C_out, A[m, k] = x[n, k, h, w] and B[k, j] = weight[j, k]. Unlike the depthwise conv it
does K multiply-adds per output element, so it belongs on the tensor cores (tl.dot), tiled
[BLOCK_M pixels x BLOCK_N output channels] with a loop over BLOCK_K input channels.

* Prologue, per input channel, on the loaded A tile: a = in_act(a * in_scale[k] + in_shift[k]),
  computed in float32 and cast back to the dot dtype. This is DenseNet's BN -> ReLU -> conv1x1
  without writing the BN output to memory.
* Epilogue, per output channel, in float32: v = (acc + bias) * scale + shift, then either
  act(v) + residual or act(v + residual) (ResNet's order).

With STATS (pointwise_gemm_with_stats, for a fused BatchNorm in training) each program also
reduces the tile it stored, rounded to out's dtype and back, to a (mean, M2) per output channel
(tile_moments) in its own row of two [tiles_m, C_out] buffers, which the host merges with
_statistics.merge_partitions, as conv_bn_act does: deterministic, no atomics.

Every tensor is read through its own strides, so x may be channels_last, NCHW, or a channel
slice of a wider channels_last buffer (DenseNet's concatenation), and out may be a channel slice
too: the kernels write only out's own elements. The weight is a 2-D (C_out, C_in) view with
any strides; the grad_input pass hands in the transposed view (C_in, C_out) of the same weight.
When the pixel dims (n, h, w) of every tensor merge into one stride (`merged_stride`), a pixel's
offset is one multiply; otherwise it is split into (n, h, w). Either way the offsets are
computed once per tile, outside the K loop, so the split costs little.

float64 (the interpreter's gradcheck) never goes through tl.dot, whose float64 support varies
with the Triton version and target: it takes rank-1 updates in float64 instead, correct and slow.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastconv._geometry import accumulate_dtype
from fastconv.triton_kernels._indexing import needs_64bit_index, pixel_offsets, pixel_strides
from fastconv.triton_kernels._statistics import merge_partitions, tile_moments
from fastconv.triton_kernels._tuning import autotune, interpreter_first
from fastconv.triton_kernels.activations import apply_activation

# Offsets past 2**31 - 1 - this take the 64-bit path: room for a block of pixels or channels past the end, times a stride.
_INDEX_HEADROOM = 2**24

# Consecutive programs of the forward walk GROUP_M pixel blocks down one column of output
# channel blocks before moving right, so that the x tiles of a group stay in L2 while every
# channel block reads them (matters when C_out spans several blocks).
_GROUP_M = tl.constexpr(8)


_GEMM_CONFIGS = interpreter_first(
    # (BLOCK_M pixels, BLOCK_N output channels, BLOCK_K input channels per step)
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4),
    [
        # The general-purpose tile first.
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        # Wide: huge M, K of 16 to 32 (early stages, 112x112x16 -> 96): one or two K steps, so
        # large pixel tiles and K blocks that waste no masked lanes.
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        # Skinny: few pixels, long K (late stages, 7x7x960 -> 160): small pixel tiles so the
        # grid still fills the SMs, deep K steps and pipelining.
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    ],
)
_FLAG_KEY = ["HAS_BIAS", "HAS_SCALE", "HAS_SHIFT", "ACTIVATION", "HAS_RESIDUAL", "ACT_AFTER_RESIDUAL"]
_PROLOGUE_KEY = ["HAS_IN_SCALE", "HAS_IN_SHIFT", "IN_ACTIVATION"]


# --------------------------------------------------------------------------------------------
# Shared pieces.


@triton.jit
def _load_vector(ptr, index, mask, WIDE: tl.constexpr):
    """ptr[index] (a per-channel vector) in the compute dtype."""
    compute = tl.float64 if WIDE else tl.float32
    return tl.load(ptr + index, mask=mask, other=0.0).to(compute)


@triton.jit
def _prologue(a, in_scale, in_shift, valid,
              HAS_IN_SCALE: tl.constexpr, HAS_IN_SHIFT: tl.constexpr, IN_ACTIVATION: tl.constexpr):
    """in_act(a * in_scale + in_shift), zero outside `valid`.

    The zero matters: in_act(in_shift) of a padding lane is not zero, and would otherwise enter
    the weight gradient's sum over pixels (the forward masks it on store anyway).
    """
    if HAS_IN_SCALE:
        a = a * in_scale
    if HAS_IN_SHIFT:
        a = a + in_shift
    a = apply_activation(a, IN_ACTIVATION)
    return tl.where(valid, a, 0.0)


@triton.jit
def _dot(a, b, acc, TF32: tl.constexpr):
    """acc + a @ b on the tensor cores; float32 operands in full precision unless TF32."""
    if TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    return tl.dot(a, b, acc, input_precision="ieee")


# --------------------------------------------------------------------------------------------
# Forward (and grad_input, with the transposed weight): out = epilogue(prologue(x) @ w.T).


@autotune(
    configs=_GEMM_CONFIGS,
    key=["M", "K", "NO", "MERGED", "TF32", "STATS"] + _FLAG_KEY + _PROLOGUE_KEY,
    # Timing runs repeat the kernel: out may be the residual itself (an in-place add), so put
    # it back after each.
    restore_value=["out_ptr"],
)
@triton.jit
def _gemm(
    x_ptr, w_ptr, out_ptr,
    bias_ptr, scale_ptr, shift_ptr, residual_ptr,  # absent tensors get a dummy pointer
    in_scale_ptr, in_shift_ptr,  # the prologue's vectors, likewise
    mean_ptr, m2_ptr,  # [tiles_m, NO] per-tile mean (float64) and M2 of the stored out (STATS only)
    M, K, NO,  # M = N*H*W pixels, K input channels, NO output channels
    H, W,  # split a pixel number into (n, h, w) when not MERGED
    x_sn, x_sc, x_sh, x_sw,  # strides of x (when MERGED, x_sw is the merged pixel stride)
    w_sj, w_sk,  # strides of the 2-D weight over output channel j and input channel k
    o_sn, o_sc, o_sh, o_sw,  # strides of out
    r_sn, r_sc, r_sh, r_sw,  # strides of the residual
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr,  # code from fastconv.activations
    HAS_RESIDUAL: tl.constexpr,
    ACT_AFTER_RESIDUAL: tl.constexpr,  # act(v + residual) instead of act(v) + residual
    HAS_IN_SCALE: tl.constexpr, HAS_IN_SHIFT: tl.constexpr,
    IN_ACTIVATION: tl.constexpr,  # the prologue's activation code
    PROLOGUE: tl.constexpr,  # any of the three above: otherwise A goes to the dot as loaded
    STATS: tl.constexpr,  # also store per-tile (mean, M2) per output channel of the values stored
    MERGED: tl.constexpr,  # every tensor's pixel dims merge into the stride passed as *_sw
    TF32: tl.constexpr,  # float32 operands may go through the tensor cores as tf32
    INDEX_64: tl.constexpr,  # some offset may exceed 2**31
    WIDE: tl.constexpr,  # float64: rank-1 updates in float64 instead of tl.dot
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    # Grouped order: see _GROUP_M.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(NO, BLOCK_N)
    per_group = _GROUP_M * blocks_n
    first_m = (pid // per_group) * _GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, _GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    if INDEX_64:
        pid_m = pid_m.to(tl.int64)  # before the multiply, which would overflow in int32
        pid_n = pid_n.to(tl.int64)
    pixels = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = pixels < M
    n_mask = cols < NO
    x_rows = pixel_offsets(pixels, H, W, x_sn, x_sh, x_sw, MERGED)
    w_cols = cols * w_sj

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=compute)
    if WIDE:
        for k_step in range(0, K):
            k = k_step
            if INDEX_64:
                k = k.to(tl.int64)
            a = tl.load(x_ptr + x_rows + k * x_sc, mask=m_mask, other=0.0).to(compute)
            if PROLOGUE:
                in_scale = 1.0
                in_shift = 0.0
                if HAS_IN_SCALE:
                    in_scale = tl.load(in_scale_ptr + k).to(compute)
                if HAS_IN_SHIFT:
                    in_shift = tl.load(in_shift_ptr + k).to(compute)
                a = _prologue(a, in_scale, in_shift, m_mask, HAS_IN_SCALE, HAS_IN_SHIFT, IN_ACTIVATION)
            b = tl.load(w_ptr + k * w_sk + w_cols, mask=n_mask, other=0.0).to(compute)
            acc += a[:, None] * b[None, :]
    else:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            if INDEX_64:
                ks = ks.to(tl.int64)  # so that ks * x_sc (an NCHW plane) is 64-bit
            k_mask = ks < K
            a_mask = m_mask[:, None] & k_mask[None, :]
            a = tl.load(x_ptr + x_rows[:, None] + (ks * x_sc)[None, :], mask=a_mask, other=0.0)
            if PROLOGUE:
                in_scale = 1.0
                in_shift = 0.0
                if HAS_IN_SCALE:
                    in_scale = _load_vector(in_scale_ptr, ks, k_mask, WIDE)[None, :]
                if HAS_IN_SHIFT:
                    in_shift = _load_vector(in_shift_ptr, ks, k_mask, WIDE)[None, :]
                a = _prologue(a.to(compute), in_scale, in_shift, a_mask, HAS_IN_SCALE, HAS_IN_SHIFT, IN_ACTIVATION)
                a = a.to(x_ptr.dtype.element_ty)  # back to the dot dtype, as the contract says
            # Masked k rows of B are zero, so whatever A holds there adds nothing.
            b = tl.load(w_ptr + (ks * w_sk)[:, None] + w_cols[None, :], mask=k_mask[:, None] & n_mask[None, :],
                        other=0.0)
            acc = _dot(a, b.to(a.dtype), acc, TF32)

    # Epilogue, per output channel.
    v = acc
    if HAS_BIAS:
        v += _load_vector(bias_ptr, cols, n_mask, WIDE)[None, :]
    if HAS_SCALE:
        v = v * _load_vector(scale_ptr, cols, n_mask, WIDE)[None, :]
    if HAS_SHIFT:
        v += _load_vector(shift_ptr, cols, n_mask, WIDE)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        r_offsets = pixel_offsets(pixels, H, W, r_sn, r_sh, r_sw, MERGED)[:, None] + (cols * r_sc)[None, :]
        residual = tl.load(residual_ptr + r_offsets, mask=out_mask, other=0.0).to(compute)
        if ACT_AFTER_RESIDUAL:
            v = apply_activation(v + residual, ACTIVATION)
        else:
            v = apply_activation(v, ACTIVATION) + residual
    else:
        v = apply_activation(v, ACTIVATION)
    stored = v.to(out_ptr.dtype.element_ty)
    o_offsets = pixel_offsets(pixels, H, W, o_sn, o_sh, o_sw, MERGED)[:, None] + (cols * o_sc)[None, :]
    tl.store(out_ptr + o_offsets, stored, mask=out_mask)
    if STATS:
        # The tile's (mean, M2) per channel, in registers, of the values as stored (rounded to
        # out's dtype and back): the statistics of exactly what was written.
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(compute)
        s = tl.where(m_mask[:, None], stored.to(compute), 0.0)
        tile_mean, tile_m2 = tile_moments(s, m_mask[:, None], count, 0)
        p_offsets = pid_m * NO + cols
        tl.store(mean_ptr + p_offsets, tile_mean, mask=n_mask)
        tl.store(m2_ptr + p_offsets, tile_m2, mask=n_mask)


# --------------------------------------------------------------------------------------------
# Host side: layout analysis, allocation and launch.


def _check_4d(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"pointwise: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _launch(x, weight, out, bias, scale, shift, activation, residual, activation_after_residual,
            in_scale, in_shift, in_activation, allow_tf32, stats: bool):
    """pointwise_gemm's launch; returns (out, mean, var), the statistics None without stats."""
    N, K, H, W = x.shape
    NO = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"pointwise: weight has shape {tuple(weight.shape)}, expected ({NO}, {K})")
    _check_4d("out", out, (N, NO, H, W))
    if residual is not None:
        _check_4d("residual", residual, (N, NO, H, W))
    M = N * H * W
    stat_dtype = accumulate_dtype(x.dtype)
    if M == 0 or NO == 0:
        if not stats:
            return out, None, None
        nan = torch.full((NO,), float("nan"), dtype=stat_dtype, device=x.device)
        return out, nan, nan.clone()
    pixel_tensors = [x, out] + ([residual] if residual is not None else [])
    merged, strides = pixel_strides(pixel_tensors)
    (x_sn, x_sh, x_sw), (o_sn, o_sh, o_sw) = strides[0], strides[1]
    r_strides = (0, 0, 0, 0)
    if residual is not None:
        r_sn, r_sh, r_sw = strides[2]
        r_strides = (r_sn, residual.stride(1), r_sh, r_sw)
    vectors = [t for t in (bias, scale, shift, in_scale, in_shift) if t is not None]
    for t in vectors:
        if not t.is_contiguous():
            raise ValueError("pointwise: per-channel vectors must be contiguous")
    wide = x.dtype == torch.float64
    partial_mean = partial_m2 = x  # a dummy pointer, never touched without STATS
    if stats:
        # Sized for the config with the most tiles; the autotuner picks one only at launch.
        tiles = triton.cdiv(M, min(config.kwargs["BLOCK_M"] for config in _gemm.configs))
        partial_mean = torch.empty(tiles, NO, dtype=torch.float64, device=x.device)  # see tile_moments
        partial_m2 = torch.empty(tiles, NO, dtype=stat_dtype, device=x.device)
    flags = dict(
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        ACTIVATION=int(activation), HAS_RESIDUAL=residual is not None,
        ACT_AFTER_RESIDUAL=bool(activation_after_residual) and residual is not None,
        HAS_IN_SCALE=in_scale is not None, HAS_IN_SHIFT=in_shift is not None, IN_ACTIVATION=int(in_activation),
        PROLOGUE=in_scale is not None or in_shift is not None or int(in_activation) != 0,
        STATS=bool(stats), MERGED=merged, TF32=bool(allow_tf32) and x.dtype == torch.float32,
        INDEX_64=needs_64bit_index(pixel_tensors + [weight] + ([partial_mean] if stats else []), _INDEX_HEADROOM),
        WIDE=wide,
    )
    # Absent tensors are never loaded (their HAS_ flag is off); any pointer will do.
    bias, scale, shift, residual, in_scale, in_shift = (
        t if t is not None else x for t in (bias, scale, shift, residual, in_scale, in_shift)
    )
    # The grid function sees the config that runs (the autotuner's last call is the real
    # launch): the statistics' tile count follows its BLOCK_M.
    chosen = {}

    def grid(meta):
        chosen["BLOCK_M"] = meta["BLOCK_M"]
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(NO, meta["BLOCK_N"]),)

    _gemm[grid](
        x, weight, out, bias, scale, shift, residual, in_scale, in_shift, partial_mean, partial_m2,
        M, K, NO, H, W,
        x_sn, x.stride(1), x_sh, x_sw, weight.stride(0), weight.stride(1),
        o_sn, out.stride(1), o_sh, o_sw, *r_strides,
        **flags,
    )
    if not stats:
        return out, None, None
    # Tile i holds BLOCK_M pixels of every channel, the last tile fewer.
    block = chosen["BLOCK_M"]
    tiles = triton.cdiv(M, block)
    counts = torch.arange(tiles, device=x.device, dtype=torch.float64).mul_(-block).add_(M).clamp_(max=block)
    mean, var = merge_partitions(counts[:, None], partial_mean[:tiles], partial_m2[:tiles], M, stat_dtype)
    return out, mean, var


def pointwise_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    activation: int = 0,
    residual: Optional[torch.Tensor] = None,
    activation_after_residual: bool = False,
    in_scale: Optional[torch.Tensor] = None,
    in_shift: Optional[torch.Tensor] = None,
    in_activation: int = 0,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """out[n, j, h, w] = epilogue_j(sum_k prologue_k(x[n, k, h, w]) * weight[j, k]); returns out.

    x (N, C_in, H, W) and the 2-D weight (C_out, C_in) may have any strides (the grad_input
    pass gives the transposed view of the forward weight); out (N, C_out, H, W) is preallocated
    with any strides, in x's dtype, and only its elements are written. It must not overlap x;
    it may be the residual itself. A None vector is absent (scale 1, shift 0, and likewise for
    the prologue); activation codes as in fastconv.activations. Accumulates in float32 (float64
    for float64 inputs); float32 operands use tf32 tensor cores only when allow_tf32.
    """
    return _launch(
        x, weight, out, bias, scale, shift, activation, residual, activation_after_residual,
        in_scale, in_shift, in_activation, allow_tf32, False,
    )[0]


def pointwise_gemm_with_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, var): out = conv1x1(x, weight) + bias written as pointwise_gemm writes it (same
    kernel, same arguments' rules), and its per-output-channel batch statistics, fused into the
    GEMM's epilogue.

    mean and var are the mean and biased variance over (N, H, W) of out as stored (after
    rounding to out's dtype), float32 (float64 for float64 x), NaN when out has no pixels.
    Deterministic: per-tile (mean, M2) partials merged on the host in a fixed order (no
    atomics), and stable when |mean| >> std.
    """
    return _launch(x, weight, out, bias, None, None, 0, None, False, None, None, 0, allow_tf32, True)
