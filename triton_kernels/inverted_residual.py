"""The MobileNetV2 inverted residual and the depthwise-separable (MobileNetV1) block as one
Triton kernel each call: the expanded tensor never reaches memory. `fused_block` is the
inference kernel (and the training forward's last pass, fastconv/ops/inverted_residual_train.py);
`hidden_statistics` is the training forward's statistics pass over the depthwise output.

    e = act_e(x @ We^T + b_e)            1x1 expansion, C_in -> C_hid       (absent: e = x)
    d = act_d(dwKxK(e, Wd) + b_d)        depthwise k x k, stride s, C_hid
    y = act_p(d @ Wp^T + b_p) (+ r)      1x1 projection, C_hid -> C_out; r the residual

The BatchNorms are folded on the host (the module's job, or the op's when it is given scales):
each scale into its weight's rows, each shift a bias here. The depthwise-separable block is
the inverted residual without the expansion (expand_weight None: the depthwise reads x), so
this one kernel serves both, and `act_p` is None for the inverted residual's linear projection.

Tiling. A program owns BLOCK_P output pixels x BLOCK_CO output channels and loops over the
hidden channels in chunks of BLOCK_H. For each chunk and each of the k*k taps it gathers the x
rows of the tap's input pixels ([BLOCK_P, C_in] in BLOCK_K steps, masked), runs the expansion
on the tensor cores (tl.dot, fp32 accumulation), adds b_e, applies act_e, and ZEROES the taps
that fall in the padding: the padding belongs to the expanded tensor, and act_e(b_e) of a
padding tap is not zero (relu6 of a positive shift). The tap is then multiplied by its depthwise
weights and accumulated in fp32 registers; after the taps come b_d and act_d, the chunk is
rounded to the dot dtype (as PyTorch's own chain rounds every intermediate) and tl.dot adds it
into the [BLOCK_P, BLOCK_CO] projection accumulator. After the loop: b_p, act_p, the residual,
one store.

The price of this gather kernel: no spatial tile plus halo is kept, so the expansion is
recomputed once per tap (x9 for 3x3) and once per output-channel block (the grid's second
axis, cdiv(C_out, BLOCK_CO) programs per pixel block, each redoing expansion and depthwise),
and the x rows are re-read from L1/L2 for every (hidden chunk, tap). The second kernel,
triton_kernels/inverted_residual_tiled.py, owns a 2-D output tile, computes the expansion once
per pixel of its window (tile plus halo) into a per-program scratch slot and reads the taps
back from it: 2x the expansion's FLOPs at stride 1 and 5x at stride 2 instead of 9x, for a
round trip through L1/L2 and two barriers per hidden chunk. `fused_block` times both at a
shape's first call on a GPU and keeps the faster (FASTCONV_FUSED_BLOCK_KERNEL=gather|tiled
forces one); without a GPU timer, in a graph capture and in deterministic mode it runs the
gather kernel. `traffic()` counts both kernels' FLOPs and bytes against the block-I/O floor so
that the benchmark's floor figures need no GPU. Unmeasured on a GPU.

Registers: the live fp32 tiles are the depthwise accumulator and the expanded tap, BLOCK_P x
BLOCK_H each, and the projection accumulator BLOCK_P x BLOCK_CO: 2*64*32 + 64*64 = 8192 values
for the GPU default (64, 32, 64), 64 per thread at 4 warps. That estimate was low: ptxas
(sm_90, offline) gives the default tile 254 registers at 4 warps, and in fp32 spills 96 bytes
with num_stages=2; the 64-bit pointer tiles of the gathers ([BLOCK_P, BLOCK_K] and
[BLOCK_K, BLOCK_H] addresses) and the layout conversions between the MMA accumulator and the
depthwise's blocked tile cost more than the accumulators. At 8 warps and one stage it takes 128
registers in fp16/bf16 and 188 in fp32, no spills: the default. No pipelining (num_stages=1):
the K loop is one or a few steps (C_in <= 160), and stages only held more operand tiles.

Layouts: every tensor is read through its strides. NCHW x is converted once, at the boundary,
to channels_last (one copy of x: the gathers read C_in contiguous channels per pixel, which
NCHW would turn into C_in scattered loads); a channel slice of a channels_last buffer is read
in place. The output is written through its strides in whatever layout the caller allocated.
fp32, fp16 and bf16 inputs, fp32 accumulation; fp32 dots run in full precision unless TF32 is
allowed. float64 is the op's torch backend's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from fastconv._geometry import channels_innermost, output_size
from fastconv.triton_kernels._indexing import needs_64bit_index, pixel_coordinates
from fastconv.triton_kernels._statistics import merge_partitions, tile_moments
from fastconv.triton_kernels._tuning import autotune, interpreter_first, parallel_programs
from fastconv.triton_kernels.activations import apply_activation

# Offsets past 2**31 - 1 - this take the 64-bit path: a block of masked overshoot times a stride.
_INDEX_HEADROOM = 2**24

_CONFIGS = interpreter_first(
    # The interpreter pays per program and per op, not per element: one big pixel tile (a
    # 9x9 test image is one program, C_out up to 512 one column) and wide chunks (a 960-wide
    # hidden layer in 8 steps): a 160 -> 960 -> 320 block on 7x7 takes about 8 s
    # in the interpreter (one program, 8 chunks x 9 taps x 2 K steps).
    triton.Config({"BLOCK_P": 128, "BLOCK_H": 128, "BLOCK_CO": 512, "BLOCK_K": 128}, num_warps=4),
    [
        # The moderate default first (FASTCONV_TRITON_AUTOTUNE=0 runs only it): see Registers.
        # ptxas counts (sm_90, Triton 3.8, offline) in the comments: fp16 / fp32, no spills.
        triton.Config({"BLOCK_P": 64, "BLOCK_H": 32, "BLOCK_CO": 64, "BLOCK_K": 32}, num_warps=8, num_stages=1),  # 128 / 188
        triton.Config({"BLOCK_P": 32, "BLOCK_H": 32, "BLOCK_CO": 128, "BLOCK_K": 32}, num_warps=8, num_stages=1),  # 128 / 128
        triton.Config({"BLOCK_P": 64, "BLOCK_H": 64, "BLOCK_CO": 64, "BLOCK_K": 32}, num_warps=8, num_stages=1),  # 244 / 224
        triton.Config({"BLOCK_P": 128, "BLOCK_H": 32, "BLOCK_CO": 64, "BLOCK_K": 32}, num_warps=8, num_stages=1),  # 254 / 254
        triton.Config({"BLOCK_P": 64, "BLOCK_H": 32, "BLOCK_CO": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1),  # 246 / 248
    ],
)


@triton.jit
def _dot(a, b, acc, TF32: tl.constexpr):
    if TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _bias(ptr, index, mask, HAS: tl.constexpr, BLOCK: tl.constexpr):
    """ptr[index] in fp32, or zeros when absent (one return: the compiler wants one type)."""
    bias = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS:
        bias = tl.load(ptr + index, mask=mask, other=0.0).to(tl.float32)
    return bias


@triton.jit
def _depthwise_of_expansion(
    x_ptr, we_ptr, be_ptr, wd_ptr, hs, h_mask, x_pixel, ih0, iw0, p_mask, H, W, C_IN, x_sc, x_sh, x_sw,
    we_sh, we_sk, wd_sh, wd_st,
    KH: tl.constexpr, KW: tl.constexpr, DILATION: tl.constexpr, HAS_EXPAND: tl.constexpr, HAS_BE: tl.constexpr,
    ACT_E: tl.constexpr, TF32: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw(act_e(x @ We^T + b_e)) for BLOCK_P output pixels and the hidden channels hs, in fp32,
    before the depthwise's bias and activation (see Tiling in the module docstring)."""
    dot_dtype = x_ptr.dtype.element_ty
    b_e = _bias(be_ptr, hs, h_mask, HAS_BE, BLOCK_H)[None, :]
    d = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)
    # A run-time loop over taps: 3x3 and 5x5 alike compile to one body (an unrolled 5x5 of
    # nested GEMM loops would take LLVM minutes), and the per-tap index math is a few
    # integer ops against a [BLOCK_P, C_in] x [C_in, BLOCK_H] GEMM.
    for tap in range(KH * KW):
        ih = ih0 + (tap // KW) * DILATION
        iw = iw0 + (tap % KW) * DILATION
        inside = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        rows = x_pixel + ih * x_sh + iw * x_sw
        if HAS_EXPAND:
            e = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)
            for k0 in range(0, C_IN, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < C_IN
                a = tl.load(x_ptr + rows[:, None] + (ks * x_sc)[None, :],
                            mask=inside[:, None] & k_mask[None, :], other=0.0)
                # Masked k rows of the weight are zero, so masked lanes of a add nothing.
                b = tl.load(we_ptr + (ks * we_sk)[:, None] + (hs * we_sh)[None, :],
                            mask=k_mask[:, None] & h_mask[None, :], other=0.0)
                e = _dot(a, b.to(dot_dtype), e, TF32)
            e = apply_activation(e + b_e, ACT_E)
            # The zero padding is the expanded tensor's: act_e(b_e) must not leak in.
            e = tl.where(inside[:, None], e, 0.0)
        else:
            e = tl.load(x_ptr + rows[:, None] + (hs * x_sc)[None, :],
                        mask=inside[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
        w_tap = tl.load(wd_ptr + hs * wd_sh + tap * wd_st, mask=h_mask, other=0.0).to(tl.float32)
        d += e * w_tap[None, :]
    return d


@autotune(
    configs=_CONFIGS,
    key=["P", "C_IN", "C_HID", "C_OUT", "KH", "KW", "STRIDE", "DILATION", "HAS_EXPAND", "HAS_RESIDUAL", "TF32"],
)
@triton.jit
def _fused_block(
    x_ptr, we_ptr, be_ptr, wd_ptr, bd_ptr, wp_ptr, bp_ptr, r_ptr, out_ptr,  # absent: a dummy pointer
    P, H, W, HO, WO, C_IN, C_HID, C_OUT,  # P = N*HO*WO output pixels
    pad_top, pad_left,
    x_sn, x_sc, x_sh, x_sw,
    we_sh, we_sk,  # expansion weight (C_hid, C_in): strides over hidden and input channel
    wd_sh, wd_st,  # depthwise weight (C_hid, KH*KW): strides over hidden channel and tap
    wp_so, wp_sh,  # projection weight (C_out, C_hid)
    r_sn, r_sc, r_sh, r_sw,
    o_sn, o_sc, o_sh, o_sw,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, DILATION: tl.constexpr,
    HAS_EXPAND: tl.constexpr, HAS_BE: tl.constexpr, HAS_BD: tl.constexpr, HAS_BP: tl.constexpr,
    ACT_E: tl.constexpr, ACT_D: tl.constexpr, ACT_P: tl.constexpr,  # codes of fastconv.activations
    HAS_RESIDUAL: tl.constexpr, TF32: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    dot_dtype = x_ptr.dtype.element_ty
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    if INDEX_64:
        pid_p = pid_p.to(tl.int64)
    pixels = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = pixels < P
    n, oh, ow = pixel_coordinates(pixels, HO, WO)
    cos = pid_o * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = cos < C_OUT
    ih0 = oh * STRIDE - pad_top
    iw0 = ow * STRIDE - pad_left

    acc = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
    for h0 in range(0, C_HID, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_mask = hs < C_HID
        d = _depthwise_of_expansion(
            x_ptr, we_ptr, be_ptr, wd_ptr, hs, h_mask, n * x_sn, ih0, iw0, p_mask, H, W, C_IN, x_sc, x_sh, x_sw,
            we_sh, we_sk, wd_sh, wd_st, KH, KW, DILATION, HAS_EXPAND, HAS_BE, ACT_E, TF32, BLOCK_P, BLOCK_H, BLOCK_K,
        )  # fmt: skip
        d = apply_activation(d + _bias(bd_ptr, hs, h_mask, HAS_BD, BLOCK_H)[None, :], ACT_D)
        # d's masked hidden columns zeroed, not just met by the projection weight's zero rows:
        # an Inf in x makes them NaN (Inf times the expansion weight's zero padding columns),
        # and NaN * 0 would spread NaN to every output of the pixel (seen: an Inf pixel's whole
        # 3x3 neighbourhood NaN where PyTorch's relu6 gives 6).
        d = tl.where(h_mask[None, :], d, 0.0)
        wp = tl.load(wp_ptr + (hs * wp_sh)[:, None] + (cos * wp_so)[None, :],
                     mask=h_mask[:, None] & co_mask[None, :], other=0.0)
        acc = _dot(d.to(dot_dtype), wp.to(dot_dtype), acc, TF32)

    v = apply_activation(acc + _bias(bp_ptr, cos, co_mask, HAS_BP, BLOCK_CO)[None, :], ACT_P)
    out_mask = p_mask[:, None] & co_mask[None, :]
    if HAS_RESIDUAL:
        r_offsets = (n * r_sn + oh * r_sh + ow * r_sw)[:, None] + (cos * r_sc)[None, :]
        v += tl.load(r_ptr + r_offsets, mask=out_mask, other=0.0).to(tl.float32)
    o_offsets = (n * o_sn + oh * o_sh + ow * o_sw)[:, None] + (cos * o_sc)[None, :]
    tl.store(out_ptr + o_offsets, v.to(out_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------------------------
# Host side.


def fused_block(
    x: torch.Tensor,
    expand_weight: Optional[torch.Tensor],
    expand_bias: Optional[torch.Tensor],
    dw_weight: torch.Tensor,
    dw_bias: Optional[torch.Tensor],
    project_weight: torch.Tensor,
    project_bias: Optional[torch.Tensor],
    out: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: int,
    padding: tuple[int, int],
    dilation: int = 1,
    expand_activation: int = 0,
    dw_activation: int = 0,
    project_activation: int = 0,
    residual: Optional[torch.Tensor] = None,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """Writes the fused block into `out` (N, C_out, Ho, Wo, any strides, x's dtype); returns it.

    Weights are 2-D with any strides: expand (C_hid, C_in) or None, dw (C_hid, kh*kw) with the
    taps row-major (kernel_size = (kh, kw)), project (C_out, C_hid); BatchNorm scales already folded into them, shifts
    given as the fp32 (or x-dtype) biases. padding is (top, left); Ho and Wo come from out.
    residual (N, C_out, Ho, Wo) is added after the projection's activation. Activation codes as
    in fastconv.activations. Checks are the op's; this only asserts the shapes it indexes by.
    """
    N, C_in, H, W = x.shape
    C_hid = dw_weight.shape[0]
    C_out = project_weight.shape[0]
    HO, WO = out.shape[2], out.shape[3]
    kh, kw = kernel_size
    assert kh * kw == dw_weight.shape[1], "dw_weight must be (C_hid, kh*kw)"
    assert project_weight.shape[1] == C_hid and (expand_weight is not None or C_hid == C_in)
    assert tuple(out.shape) == (N, C_out, HO, WO)
    P = N * HO * WO
    if P == 0 or C_out == 0:
        return out
    if not channels_innermost(x) and C_in > 1:
        x = x.contiguous(memory_format=torch.channels_last)  # the one conversion: see the docstring
    dummy = x
    we = expand_weight if expand_weight is not None else dummy
    r = residual if residual is not None else dummy
    r_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    flags = dict(
        KH=kh, KW=kw, STRIDE=int(stride), DILATION=int(dilation),
        HAS_EXPAND=expand_weight is not None, HAS_BE=expand_bias is not None, HAS_BD=dw_bias is not None,
        HAS_BP=project_bias is not None, ACT_E=int(expand_activation), ACT_D=int(dw_activation),
        ACT_P=int(project_activation), HAS_RESIDUAL=residual is not None,
        TF32=bool(allow_tf32) and x.dtype == torch.float32,
        INDEX_64=needs_64bit_index([x, out] + ([residual] if residual is not None else []), _INDEX_HEADROOM),
    )  # fmt: skip

    pointers = (x, we, expand_bias if expand_bias is not None else dummy, dw_weight,
                dw_bias if dw_bias is not None else dummy, project_weight,
                project_bias if project_bias is not None else dummy, r, out)  # fmt: skip
    strides = (*x.stride(), we.stride(0) if expand_weight is not None else 0,
               we.stride(1) if expand_weight is not None else 0, dw_weight.stride(0), dw_weight.stride(1),
               project_weight.stride(0), project_weight.stride(1), *r_strides, *out.stride())  # fmt: skip

    def gather():
        def grid(meta):
            return (triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(C_out, meta["BLOCK_CO"]))

        _fused_block[grid](*pointers, P, H, W, HO, WO, C_in, C_hid, C_out, padding[0], padding[1], *strides, **flags)

    if expand_weight is None:
        gather()  # no expansion to recompute: the taps read x itself
        return out
    from fastconv.triton_kernels import inverted_residual_tiled as tiled_kernels

    def tiled():
        kernel = tiled_kernels.fused_block_tiled
        configs = list({id(c): c for c in [*kernel.all_configs, *kernel.configs]}.values())
        slot = max(tiled_kernels.slot_elements(c, kernel_size, int(stride), int(dilation)) for c in configs)
        co_blocks = max(triton.cdiv(C_out, c.kwargs["BLOCK_CO"]) for c in configs)
        programs = max(1, parallel_programs(x.device) // co_blocks)
        scratch = torch.empty(programs * co_blocks * slot, dtype=x.dtype, device=x.device)

        def grid(meta):
            tiles = N * triton.cdiv(HO, meta["TILE_H"]) * triton.cdiv(WO, meta["TILE_W"])
            return (min(tiles, programs), triton.cdiv(C_out, meta["BLOCK_CO"]))

        unused = ("HAS_EXPAND",)
        kernel[grid](*pointers, scratch, N, H, W, HO, WO, C_in, C_hid, C_out, padding[0], padding[1], *strides, slot,
                     **{k: v for k, v in flags.items() if k not in unused})  # fmt: skip

    choice = _kernel_choice(x, (N, C_in, H, W, C_hid, C_out, kernel_size, int(stride), int(dilation), x.dtype,
                                x.stride(), out.stride(), residual is not None, flags["TF32"]),
                            {"gather": gather, "tiled": tiled})  # fmt: skip
    {"gather": gather, "tiled": tiled}[choice]()
    global last_kernel
    last_kernel = choice
    return out


# Which of the two kernels runs a shape: the gather kernel (this file's, the expansion recomputed
# per tap) or the tiled one (inverted_residual_tiled.py, once per window pixel), timed at the
# first call on a GPU and cached, as the CUDA kernels pick their template variants.
# FASTCONV_FUSED_BLOCK_KERNEL=gather|tiled forces one (the tests run both in the interpreter).
_CHOSEN_KERNEL: dict = {}
last_kernel = "gather"  # the kernel of the latest call with an expansion (the benchmark records it)


def _kernel_choice(x: torch.Tensor, key: tuple, launches: dict) -> str:
    from fastconv._timing import choose_kernel

    return choose_kernel("FASTCONV_FUSED_BLOCK_KERNEL", launches, key, x, _CHOSEN_KERNEL)


_STATS_CONFIGS = interpreter_first(
    triton.Config({"BLOCK_P": 128, "BLOCK_H": 128, "BLOCK_K": 128}, num_warps=4),
    [
        # The forward kernel's expansion and depthwise tiles without the projection's
        # accumulator. ptxas (sm_90, Triton 3.8, offline), fp16 / fp32 registers, no spills:
        triton.Config({"BLOCK_P": 64, "BLOCK_H": 32, "BLOCK_K": 32}, num_warps=8, num_stages=1),  # 127 / 156
        triton.Config({"BLOCK_P": 128, "BLOCK_H": 32, "BLOCK_K": 32}, num_warps=8, num_stages=1),  # 250 / 232
        triton.Config({"BLOCK_P": 64, "BLOCK_H": 64, "BLOCK_K": 32}, num_warps=8, num_stages=1),  # 198 / 194
    ],
)


@autotune(configs=_STATS_CONFIGS, key=["P", "C_IN", "C_HID", "KH", "KW", "STRIDE", "DILATION", "HAS_EXPAND", "TF32"])
@triton.jit
def _hidden_stats(
    x_ptr, we_ptr, be_ptr, wd_ptr, mean_ptr, m2_ptr,  # mean/M2: [programs, C_hid] partials
    P, H, W, HO, WO, C_IN, C_HID,
    pad_top, pad_left,
    x_sn, x_sc, x_sh, x_sw,
    we_sh, we_sk,
    wd_sh, wd_st,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, DILATION: tl.constexpr,
    HAS_EXPAND: tl.constexpr, HAS_BE: tl.constexpr, ACT_E: tl.constexpr, TF32: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The training forward's statistics pass: per program, the count, mean and M2 over its
    BLOCK_P output pixels of the depthwise output d = dw(act_e(x @ We^T + b_e)) (before its
    BatchNorm), every hidden channel; d itself is never stored. The host merges the rows."""
    pid_p = tl.program_id(0)
    if INDEX_64:
        pid_p = pid_p.to(tl.int64)
    pixels = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = pixels < P
    n, oh, ow = pixel_coordinates(pixels, HO, WO)
    count = tl.minimum(P - pid_p * BLOCK_P, BLOCK_P).to(tl.float32)
    for h0 in range(0, C_HID, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_mask = hs < C_HID
        d = _depthwise_of_expansion(
            x_ptr, we_ptr, be_ptr, wd_ptr, hs, h_mask, n * x_sn, oh * STRIDE - pad_top, ow * STRIDE - pad_left, p_mask,
            H, W, C_IN, x_sc, x_sh, x_sw, we_sh, we_sk, wd_sh, wd_st, KH, KW, DILATION, HAS_EXPAND, HAS_BE, ACT_E,
            TF32, BLOCK_P, BLOCK_H, BLOCK_K,
        )  # fmt: skip
        # Pixels past P gathered nothing (every tap masked): d is exactly 0 there.
        mean, m2 = tile_moments(d, p_mask[:, None], count, 0)
        tl.store(mean_ptr + pid_p * C_HID + hs, mean, mask=h_mask)
        tl.store(m2_ptr + pid_p * C_HID + hs, m2, mask=h_mask)


def hidden_statistics(
    x: torch.Tensor,
    expand_weight: Optional[torch.Tensor],
    expand_bias: Optional[torch.Tensor],
    dw_weight: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: int,
    padding: tuple[int, int],
    out_size: tuple[int, int],
    dilation: int = 1,
    expand_activation: int = 0,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) in float32 per hidden channel of dw(act_e(x @ We^T + b_e)) over
    (N, Ho, Wo), the depthwise output before its BatchNorm: what the training forward needs to
    normalise it, without it ever being stored. Arguments as `fused_block`'s."""
    N, C_in, H, W = x.shape
    C_hid = dw_weight.shape[0]
    HO, WO = out_size
    kh, kw = kernel_size
    P = N * HO * WO
    if not channels_innermost(x) and C_in > 1:
        x = x.contiguous(memory_format=torch.channels_last)
    we = expand_weight if expand_weight is not None else x
    strides = (*x.stride(), we.stride(0) if expand_weight is not None else 0,
               we.stride(1) if expand_weight is not None else 0, dw_weight.stride(0), dw_weight.stride(1))  # fmt: skip
    flags = dict(KH=kh, KW=kw, STRIDE=int(stride), DILATION=int(dilation), HAS_BE=expand_bias is not None,
                 ACT_E=int(expand_activation), TF32=bool(allow_tf32) and x.dtype == torch.float32,
                 INDEX_64=needs_64bit_index([x], _INDEX_HEADROOM))  # fmt: skip
    be = expand_bias if expand_bias is not None else x
    result = {}

    def gather():
        tiles = triton.cdiv(P, min(config.kwargs["BLOCK_P"] for config in _hidden_stats.configs))
        partial_mean = torch.empty(tiles, C_hid, dtype=torch.float64, device=x.device)  # see tile_moments
        partial_m2 = torch.empty(tiles, C_hid, dtype=torch.float32, device=x.device)
        chosen = {}

        def grid(meta):
            chosen["BLOCK_P"] = meta["BLOCK_P"]  # the autotuner's last call is the real launch
            return (triton.cdiv(P, meta["BLOCK_P"]),)

        _hidden_stats[grid](x, we, be, dw_weight, partial_mean, partial_m2, P, H, W, HO, WO, C_in, C_hid, padding[0],
                            padding[1], *strides, HAS_EXPAND=expand_weight is not None, **flags)  # fmt: skip
        block = chosen["BLOCK_P"]
        used = triton.cdiv(P, block)
        counts = torch.arange(used, device=x.device, dtype=torch.float64).mul_(-block).add_(P).clamp_(max=block)[:, None]
        result["stats"] = merge_partitions(counts, partial_mean[:used], partial_m2[:used], P, torch.float32)

    if expand_weight is None:
        gather()
        return result["stats"]
    from fastconv.triton_kernels import inverted_residual_tiled as tiled_kernels

    def tiled():
        kernel = tiled_kernels.hidden_stats_tiled
        configs = list({id(c): c for c in [*kernel.all_configs, *kernel.configs]}.values())
        slot = max(tiled_kernels.slot_elements(c, kernel_size, int(stride), int(dilation)) for c in configs)
        programs = parallel_programs(x.device)
        scratch = torch.empty(programs * slot, dtype=x.dtype, device=x.device)
        # Rows start empty (count 0, mean 0, M2 0): each program merges its tiles into its row.
        counts = torch.zeros(programs, dtype=torch.float32, device=x.device)
        partial_mean = torch.zeros(programs, C_hid, dtype=torch.float64, device=x.device)
        partial_m2 = torch.zeros(programs, C_hid, dtype=torch.float32, device=x.device)

        def grid(meta):
            return (min(N * triton.cdiv(HO, meta["TILE_H"]) * triton.cdiv(WO, meta["TILE_W"]), programs),)

        kernel[grid](x, we, be, dw_weight, scratch, counts, partial_mean, partial_m2, N, H, W, HO, WO, C_in, C_hid,
                     padding[0], padding[1], *strides, slot, **flags)  # fmt: skip
        # Rows of programs the grid left out keep count 0: they add nothing to the merge.
        result["stats"] = merge_partitions(counts[:, None], partial_mean, partial_m2, P, torch.float32)

    key = ("statistics", N, C_in, H, W, C_hid, kernel_size, int(stride), int(dilation), x.dtype, x.stride(), flags["TF32"])
    {"gather": gather, "tiled": tiled}[_kernel_choice(x, key, {"gather": gather, "tiled": tiled})]()
    return result["stats"]


# --------------------------------------------------------------------------------------------
# What the kernel moves and computes, for the benchmark's floor figures (no GPU needed).


@dataclass(frozen=True)
class Traffic:
    """Bytes and FLOPs of one fused-block call (multiply-add = 2 FLOPs).

    io_floor_bytes: the block's input read once, its output written once, the residual read
    (the block-I/O floor). unfused_bytes: the same chain with every intermediate
    written and read back (the eager cuDNN chain's minimum). load_bytes/store_bytes: what the
    kernel's load and store instructions ask for, served mostly by L1/L2 (x re-gathered for
    every hidden chunk and tap, weights per program); dram_bytes_estimate: the floor plus the
    weights once, i.e. assuming the gathers of one program stay in L1/L2 and the weights (at
    most 960 x 160 + 960 x 9 + 320 x 960 values, under 1 MB in fp16) in L2.
    flops: the block's own work; kernel_flops: what the gather kernel executes, with the
    expansion recomputed per tap and the expansion and depthwise per output-channel block;
    tiled_kernel_flops: the tiled kernel's at its default 8x8 tile, the expansion once per
    window pixel (rounded up to its 64-pixel steps) and per output-channel block.
    """

    io_floor_bytes: int
    unfused_bytes: int
    load_bytes: int
    store_bytes: int
    dram_bytes_estimate: int
    flops: int
    kernel_flops: int
    tiled_kernel_flops: int


def traffic(
    n: int, c_in: int, h: int, w: int, c_hid: int, c_out: int, *, kernel_size: int = 3, stride: int = 1,
    expand: bool = True, residual: bool = False, element_size: int = 2, block_p: int = 64, block_h: int = 32,
    block_co: int = 64,
) -> Traffic:
    """Traffic of the fused kernel for one block shape and tile; the defaults are the GPU
    default config and fp16. Without `expand`, c_hid must equal c_in (the separable block)."""
    pad = (kernel_size - 1) // 2
    ho, wo = output_size((h, w), (kernel_size, kernel_size), (stride, stride), (pad, pad, pad, pad), (1, 1))
    taps = kernel_size * kernel_size
    pixels_in, pixels_out = n * h * w, n * ho * wo
    x_bytes = pixels_in * c_in * element_size
    y_bytes = pixels_out * c_out * element_size
    r_bytes = y_bytes if residual else 0
    io_floor = x_bytes + y_bytes + r_bytes
    hidden = pixels_in * c_hid * element_size  # the expanded tensor, at the input's resolution
    dw_out = pixels_out * c_hid * element_size
    if expand:
        unfused = x_bytes + 2 * hidden + 2 * dw_out + y_bytes + r_bytes
    else:
        unfused = x_bytes + 2 * dw_out + y_bytes + r_bytes
    programs_p = triton.cdiv(pixels_out, block_p)
    programs_o = triton.cdiv(c_out, block_co)
    programs = programs_p * programs_o
    chunks = triton.cdiv(c_hid, block_h)
    gathered_width = c_in if expand else block_h  # per chunk and tap: all of C_in, or the chunk
    x_loads = programs * chunks * taps * block_p * gathered_width * element_size
    weight_elements = (c_hid * c_in if expand else 0) * taps + c_hid * taps + c_hid * min(block_co, c_out)
    weight_loads = programs * weight_elements * element_size
    vectors = programs * (2 * c_hid + block_co) * 4
    load_bytes = x_loads + weight_loads + vectors + r_bytes
    weights_once = ((c_hid * c_in if expand else 0) + c_hid * taps + c_out * c_hid) * element_size
    dram = io_floor + weights_once
    expand_flops = 2 * pixels_in * c_in * c_hid if expand else 0
    dw_flops = 2 * pixels_out * c_hid * taps
    project_flops = 2 * pixels_out * c_hid * c_out
    kernel_expand = 2 * pixels_out * taps * c_in * c_hid * programs_o if expand else 0
    tile, step = 8, 64  # the tiled kernel's default: 8x8 outputs, its window 64 pixels a step
    window = ((tile - 1) * stride + kernel_size) ** 2
    tiles = n * triton.cdiv(ho, tile) * triton.cdiv(wo, tile)
    tiled_expand = 2 * tiles * triton.cdiv(window, step) * step * c_in * c_hid * programs_o if expand else 0
    return Traffic(
        io_floor_bytes=io_floor,
        unfused_bytes=unfused,
        load_bytes=load_bytes,
        store_bytes=y_bytes,
        dram_bytes_estimate=dram,
        flops=expand_flops + dw_flops + project_flops,
        kernel_flops=kernel_expand + dw_flops * programs_o + project_flops,
        tiled_kernel_flops=(tiled_expand + dw_flops * programs_o + project_flops) if expand else
        kernel_expand + dw_flops * programs_o + project_flops,
    )
