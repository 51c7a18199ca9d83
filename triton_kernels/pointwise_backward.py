"""The weight gradient of the pointwise (1x1) convolution in Triton.

The weight gradient, grad_w[j, k] = sum_m grad_c[m, j] * a[m, k] with a the prologue's output
(recomputed from x on load), is deterministic: each program sums a fixed share of the pixel
blocks into its own slot of a float32 partials buffer, and the host sums the slots in a fixed
order. No float atomics.

The grad_input pass needs no kernel of its own: it is the forward GEMM (pointwise.py) with the
transposed weight. float64 takes rank-1 updates instead of tl.dot, as the forward does.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastconv._geometry import accumulate_dtype
from fastconv.triton_kernels._indexing import needs_64bit_index, pixel_offsets, pixel_strides, reduction_split
from fastconv.triton_kernels._tuning import autotune, interpreter_first
from fastconv.triton_kernels.pointwise import _INDEX_HEADROOM, _PROLOGUE_KEY, _check_4d, _dot, _load_vector, _prologue

_WEIGHT_CONFIGS = interpreter_first(
    # (BLOCK_N output channels, BLOCK_K input channels: the program's grad_w tile; BLOCK_M
    # pixels per step of the reduction)
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 128}, num_warps=4),
    [
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_M": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_M": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_M": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_M": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 64, "BLOCK_M": 64}, num_warps=4, num_stages=4),
        # Tiny channel counts (K or C_out of 16): all the parallelism is in the pixels.
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "BLOCK_M": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 16, "BLOCK_M": 128}, num_warps=4, num_stages=3),
    ],
)
# The smallest reduction block over all weight configs: sizes the partials buffer, which must
# exist before the autotuner picks a config.
_SMALLEST_WEIGHT_BLOCK_M = 32

# --------------------------------------------------------------------------------------------
# Weight gradient: grad_w[j, k] = sum_m grad_c[m, j] * prologue(x)[m, k], per program a
# [BLOCK_N, BLOCK_K] tile of grad_w summed over a fixed share of the pixel blocks.


@autotune(configs=_WEIGHT_CONFIGS, key=["M", "K", "NO", "MERGED", "TF32"] + _PROLOGUE_KEY)
@triton.jit
def _weight_grad(
    g_ptr, x_ptr,
    partial_ptr,  # [num_programs(2), NO, K] partial sums, one slab per program along axis 2
    in_scale_ptr, in_shift_ptr,  # absent vectors get a dummy pointer
    M, K, NO, H, W,  # as in _gemm
    g_sn, g_sc, g_sh, g_sw,  # strides of grad_c (N, NO, H, W)
    x_sn, x_sc, x_sh, x_sw,  # strides of x (N, K, H, W)
    HAS_IN_SCALE: tl.constexpr, HAS_IN_SHIFT: tl.constexpr, IN_ACTIVATION: tl.constexpr,
    PROLOGUE: tl.constexpr, MERGED: tl.constexpr, TF32: tl.constexpr, INDEX_64: tl.constexpr,
    WIDE: tl.constexpr,  # as in _gemm
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_first = tl.program_id(1) * BLOCK_K
    slot = tl.program_id(2)
    ks = k_first + tl.arange(0, BLOCK_K)
    if INDEX_64:
        cols = cols.to(tl.int64)
        ks = ks.to(tl.int64)
        slot = slot.to(tl.int64)
    n_mask = cols < NO
    k_mask = ks < K
    g_cols = cols * g_sc
    x_cols = ks * x_sc
    # This program's input channels are fixed, so their prologue vectors load once.
    in_scale = 1.0
    in_shift = 0.0
    if HAS_IN_SCALE:
        in_scale = _load_vector(in_scale_ptr, ks, k_mask, WIDE)[None, :]
    if HAS_IN_SHIFT:
        in_shift = _load_vector(in_shift_ptr, ks, k_mask, WIDE)[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=compute)
    # Each program takes every num_programs(2)-th block of pixels: a fixed share, so that the
    # partial sums, and hence the gradient, are the same on every run.
    for start in range(slot * BLOCK_M, M, tl.num_programs(2) * BLOCK_M):
        pixels = start + tl.arange(0, BLOCK_M)
        if INDEX_64:
            pixels = pixels.to(tl.int64)
        m_mask = pixels < M
        # grad_c loaded transposed, [BLOCK_N, BLOCK_M], so the dot needs no tl.trans.
        g_offsets = g_cols[:, None] + pixel_offsets(pixels, H, W, g_sn, g_sh, g_sw, MERGED)[None, :]
        g = tl.load(g_ptr + g_offsets, mask=n_mask[:, None] & m_mask[None, :], other=0.0)
        x_rows = pixel_offsets(pixels, H, W, x_sn, x_sh, x_sw, MERGED)
        if WIDE:
            g = g.to(compute)
            # One input channel at a time: its column of products, summed over the pixels,
            # lands in column k of acc. k_first..k_end stays inside this program's tile.
            k_end = tl.minimum(k_first + BLOCK_K, K)
            for k_step in range(k_first, k_end):
                k = k_step
                if INDEX_64:
                    k = k.to(tl.int64)
                a = tl.load(x_ptr + x_rows + k * x_sc, mask=m_mask, other=0.0).to(compute)
                if PROLOGUE:
                    k_scale = 1.0
                    k_shift = 0.0
                    if HAS_IN_SCALE:
                        k_scale = tl.load(in_scale_ptr + k).to(compute)
                    if HAS_IN_SHIFT:
                        k_shift = tl.load(in_shift_ptr + k).to(compute)
                    a = _prologue(a, k_scale, k_shift, m_mask, HAS_IN_SCALE, HAS_IN_SHIFT, IN_ACTIVATION)
                column = tl.sum(g * a[None, :], axis=1)
                acc = tl.where((ks == k)[None, :], acc + column[:, None], acc)
        else:
            a_mask = m_mask[:, None] & k_mask[None, :]
            a = tl.load(x_ptr + x_rows[:, None] + x_cols[None, :], mask=a_mask, other=0.0)
            if PROLOGUE:
                a = _prologue(a.to(compute), in_scale, in_shift, a_mask, HAS_IN_SCALE, HAS_IN_SHIFT, IN_ACTIVATION)
                a = a.to(x_ptr.dtype.element_ty)  # the same rounding as the forward's operand
            acc = _dot(g.to(a.dtype), a, acc, TF32)
    offsets = (slot * NO + cols)[:, None] * K + ks[None, :]
    tl.store(partial_ptr + offsets, acc, mask=n_mask[:, None] & k_mask[None, :])


def pointwise_weight_grad(
    grad_c: torch.Tensor,
    x: torch.Tensor,
    in_scale: Optional[torch.Tensor] = None,
    in_shift: Optional[torch.Tensor] = None,
    in_activation: int = 0,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """grad_w[j, k] = sum over n, h, w of grad_c[n, j, h, w] * prologue_k(x[n, k, h, w]).

    Returns a new contiguous (C_out, C_in) float32 tensor (float64 for float64 x). The prologue
    is recomputed exactly as pointwise_gemm applies it, including the cast back to x's dtype;
    grad_c is cast to x's dtype for the dot. Deterministic: a fixed per-program share of the
    pixels summed into float32 partials, the partials summed by torch in a fixed order.
    """
    N, K, H, W = x.shape
    NO = grad_c.shape[1]
    _check_4d("grad_c", grad_c, (N, NO, H, W))
    accumulate = accumulate_dtype(x.dtype)
    M = N * H * W
    if M == 0 or NO == 0 or K == 0:
        return torch.zeros(NO, K, dtype=accumulate, device=x.device)
    merged, ((g_sn, g_sh, g_sw), (x_sn, x_sh, x_sw)) = pixel_strides([grad_c, x])
    for t in (in_scale, in_shift):
        if t is not None and not t.is_contiguous():
            raise ValueError("pointwise: per-channel vectors must be contiguous")
    # The tile count is only an estimate here (the config is not yet chosen); it just sizes how
    # many programs share the pixels.
    split = reduction_split(triton.cdiv(M, _SMALLEST_WEIGHT_BLOCK_M), triton.cdiv(NO, 64) * triton.cdiv(K, 64), x.device)
    partial = torch.empty(split, NO, K, dtype=accumulate, device=x.device)
    flags = dict(
        HAS_IN_SCALE=in_scale is not None, HAS_IN_SHIFT=in_shift is not None, IN_ACTIVATION=int(in_activation),
        PROLOGUE=in_scale is not None or in_shift is not None or int(in_activation) != 0,
        MERGED=merged, TF32=bool(allow_tf32) and x.dtype == torch.float32,
        INDEX_64=needs_64bit_index([grad_c, x, partial], _INDEX_HEADROOM), WIDE=x.dtype == torch.float64,
    )
    in_scale, in_shift = (t if t is not None else x for t in (in_scale, in_shift))
    # Channel blocks on axis 0, which has no 65535 cap (BLOCK_N may be 16).
    grid = lambda meta: (triton.cdiv(NO, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]), split)
    _weight_grad[grid](
        grad_c, x, partial, in_scale, in_shift, M, K, NO, H, W,
        g_sn, grad_c.stride(1), g_sh, g_sw, x_sn, x.stride(1), x_sh, x_sw,
        **flags,
    )
    # torch.sum reduces in a fixed order for a fixed shape: the second, deterministic stage.
    return partial.sum(0)
