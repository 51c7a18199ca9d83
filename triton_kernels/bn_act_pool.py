"""act(x * scale[c] + shift[c]) averaged over 2x2 windows (stride 2, floor): DenseNet's
transition in eval, BatchNorm -> ReLU -> 2x2 average pool, as one pass before its 1x1 conv.

The pool commutes with the 1x1 conv but not with the ReLU, so pooling first needs the ReLU's
output, and that is what this kernel produces without storing it: it reads x once and writes a
quarter of it. The conv then runs on a quarter of the pixels (4x fewer FLOPs), where the
prologue-fused conv at full resolution wrote and the pool re-read a full-resolution output.

A program owns BLOCK_P output pixels x BLOCK_C channels; each of the four window taps is one
masked gather through x's strides (channels_last: BLOCK_C contiguous channels per pixel), the
affine and activation in float32 (float64 for float64 inputs: the gradchecks' and the
interpreter's oracle), the four summed so and rounded once. Any layout in;
the output is allocated by the caller (channels_last when x's channels are innermost).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastconv.triton_kernels._indexing import needs_64bit_index, pixel_coordinates
from fastconv.triton_kernels._tuning import autotune, interpreter_first
from fastconv.triton_kernels.activations import apply_activation

_INDEX_HEADROOM = 2**24

_CONFIGS = interpreter_first(
    triton.Config({"BLOCK_P": 128, "BLOCK_C": 64}, num_warps=4),
    [
        # Memory-bound: enough bytes in flight per program. ptxas (sm_90, offline): 80 registers
        # channels_last fp16, 246-255 NCHW fp32 (its 64-bit gather addresses), no spills.
        triton.Config({"BLOCK_P": 64, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_P": 32, "BLOCK_C": 128}, num_warps=4),
        triton.Config({"BLOCK_P": 128, "BLOCK_C": 32}, num_warps=4),
    ],
)


@autotune(configs=_CONFIGS, key=["P", "C", "ACTIVATION"])
@triton.jit
def _bn_act_avg_pool(
    x_ptr, scale_ptr, shift_ptr, out_ptr,
    P, C, HO, WO,  # P = N * HO * WO pooled pixels
    x_sn, x_sc, x_sh, x_sw,
    o_sn, o_sc, o_sh, o_sw,
    ACTIVATION: tl.constexpr, INDEX_64: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    compute = tl.float64 if WIDE else tl.float32
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    if INDEX_64:
        pid_p = pid_p.to(tl.int64)
    pixels = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = pixels < P
    n, oh, ow = pixel_coordinates(pixels, HO, WO)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    mask = p_mask[:, None] & c_mask[None, :]
    scale = tl.load(scale_ptr + cs, mask=c_mask, other=0.0).to(compute)[None, :]
    shift = tl.load(shift_ptr + cs, mask=c_mask, other=0.0).to(compute)[None, :]
    total = tl.zeros([BLOCK_P, BLOCK_C], dtype=compute)
    corner = n * x_sn + (2 * oh) * x_sh + (2 * ow) * x_sw
    for tap in range(4):
        rows = corner + (tap // 2) * x_sh + (tap % 2) * x_sw
        v = tl.load(x_ptr + rows[:, None] + (cs * x_sc)[None, :], mask=mask, other=0.0).to(compute)
        total += apply_activation(v * scale + shift, ACTIVATION)
    o_offsets = (n * o_sn + oh * o_sh + ow * o_sw)[:, None] + (cs * o_sc)[None, :]
    tl.store(out_ptr + o_offsets, (total * 0.25).to(out_ptr.dtype.element_ty), mask=mask)


def bn_act_avg_pool(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, activation: int,
                    out: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Writes avg_pool2d(act(x * scale + shift), 2) into out (N, C, H // 2, W // 2); returns it.
    scale and shift are contiguous (C,) vectors. Checks are the op's."""
    N, C, H, W = x.shape
    HO, WO = out.shape[2], out.shape[3]
    assert (HO, WO) == (H // 2, W // 2) and out.shape[:2] == x.shape[:2]
    P = N * HO * WO
    if P == 0:
        return out

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(C, meta["BLOCK_C"]))

    _bn_act_avg_pool[grid](
        x, scale, shift, out, P, C, HO, WO, *x.stride(), *out.stride(),
        ACTIVATION=int(activation), INDEX_64=needs_64bit_index([x, out], _INDEX_HEADROOM),
        WIDE=x.dtype == torch.float64,
    )  # fmt: skip
    return out
