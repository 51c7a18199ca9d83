// The fused inverted residual on the tensor cores (fp16 / bf16): the CUDA-core kernel's
// dataflow (inverted_residual.cu) with both 1x1 convs as mma.sync m16n8k16 GEMMs
// (mma_instructions.cuh, fp32 accumulation) and a larger tile to feed them:
//
//     e = act_e(x @ We^T + be)        over the tile's input window: M = window pixels, N = a
//                                     chunk of 32 hidden channels, K = C_in
//     d = act_d(dw(e) + bd)           CUDA cores, fp32, over the tile's 64 pixels
//     y = act_p(d @ Wp^T + bp) (+ r)  M = 64 pixels, N = the group's output channels, K = the
//                                     chunk; accumulated over the chunks in registers
//
// One CTA of 8 warps owns an 8x8 tile of output pixels of one image and a group of up to
// 32 * kNT output channels. The window of x is staged once in shared memory (padded to 16
// pixels and 16 channels, zeros there, so the padding adds nothing to a product); each chunk
// writes e over the window and d over the tile to shared memory in x's dtype, as eager
// PyTorch rounds e and d (the CUDA-core kernel keeps them in fp32). Without an expansion e is
// the window's chunk of x, read straight from global memory, so MobileNetV1's 1024-channel
// windows never need staging.
//
// Why 8x8 (the CUDA-core kernel takes 4x4): every CTA reads both weight matrices from L2 once
// per tile; at 4x4 MobileNetV2's 160-960-320 block would read 0.9 MB of weights for 16 pixels
// (57 KB a pixel, against 0.96 KB of x and y); 8x8 cuts that 4x and the stride-1 halo's
// recompute from 2.25x to 1.56x. The weights' fragments come from global memory through L1
// (32-bit loads of channel pairs), not through shared memory: no staging, no extra barrier.
//
// Variants (timed at the first call, autotune.h): kNT = 12 (groups of 384 output channels: one
// launch for every MobileNetV2 block, 96 accumulators a thread, one CTA an SM) or kNT = 4
// (groups of 128: more launches, each redoing the expansion, at a third of the accumulators).
// Each output's sums run in the same order in both, so they agree bit for bit.
// Unmeasured: no GPU has run this kernel; tests/cuda_emulation.py runs it on the CPU (every
// thread a std::thread, mma.sync emulated from the PTX ISA's fragment tables). Its host side
// is inverted_residual_mma.cu.
#pragma once

#include <cstdint>

#include "inverted_residual.h"
#include "mma_instructions.cuh"
#include "shared_memory.cuh"

namespace fastconv {
namespace mma_block {

constexpr int kThreads = 256;  // 8 warps: 2 along the tile's pixels x 4 along its output channels
constexpr int kTile = kTileH * kTileW;
constexpr int kChunk = 32;           // hidden channels a step: the expansion's N, the projection's K
constexpr int kPitchE = kChunk + 8;  // halves a row of e and d: 20 words, so the 8 rows of a
                                     // fragment load fall in 8 distinct 4-bank groups

// The shared-memory plan of one CTA.
struct Plan {
  int pixels, pixels_pad;  // the window's pixels, rounded up to the MMA's 16 rows
  int k_pad, pitch_x;      // C_in rounded up to 16 (the MMA's K); halves a row of the window
  int64_t x_bytes, e_bytes, d_bytes;
};

__host__ __device__ inline Plan plan(int win_h, int win_w, int C_in, bool expand) {
  Plan p;
  p.pixels = win_h * win_w;
  p.pixels_pad = (p.pixels + 15) / 16 * 16;
  p.k_pad = (C_in + 15) / 16 * 16;
  p.pitch_x = p.k_pad + 8;  // 4 * odd words: conflict-free fragment loads, as kPitchE
  p.x_bytes = expand ? int64_t{p.pixels_pad} * p.pitch_x * 2 : 0;  // multiples of 16 bytes
  p.e_bytes = int64_t{p.pixels_pad} * kPitchE * 2;
  p.d_bytes = int64_t{kTile} * kPitchE * 2;
  return p;
}

// Two consecutive 16-bit elements as one register (the lower address in the low half, as
// mma.sync wants); p is 4-byte aligned.
template <typename T>
__device__ __forceinline__ uint32_t shared_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

template <typename T>
__device__ __forceinline__ uint32_t global_pair(const T* p, bool valid) {
  return valid ? __ldg(reinterpret_cast<const unsigned int*>(p)) : 0u;
}

// The A fragment of m16n8k16 (PTX ISA, row major) from a row-major shared tile: lane
// (g = lane / 4, t = lane % 4) holds rows g and g + 8, columns 2t, 2t + 1 and 2t + 8, 2t + 9.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int pitch, int row0, int k0, int g, int t) {
  const T* top = tile + (row0 + g) * pitch + k0 + 2 * t;
  const T* bottom = top + 8 * pitch;
  a[0] = shared_pair(top);
  a[1] = shared_pair(bottom);
  a[2] = shared_pair(top + 8);
  a[3] = shared_pair(bottom + 8);
}

template <typename T, int kNT>
__global__ void __launch_bounds__(kThreads) inverted_residual_mma_kernel(const BlockArgs a) {
  FASTCONV_DYNAMIC_SHARED(unsigned char, smem);
  const bool expand = a.we != nullptr;
  const Plan pl = plan(a.win_h, a.win_w, a.C_in, expand);
  T* xs = reinterpret_cast<T*>(smem);                              // [pixels_pad][pitch_x]
  T* es = reinterpret_cast<T*>(smem + pl.x_bytes);                 // [pixels_pad][kPitchE]
  T* ds = reinterpret_cast<T*>(smem + pl.x_bytes + pl.e_bytes);    // [kTile][kPitchE]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t tiles = int64_t{a.tiles_h} * a.tiles_w;
  const int64_t n = blockIdx.x / tiles;
  const int tile = static_cast<int>(blockIdx.x % tiles);
  const int oy0 = (tile / a.tiles_w) * kTileH, ox0 = (tile % a.tiles_w) * kTileW;
  const int iy0 = oy0 * a.stride - a.pad_top, ix0 = ox0 * a.stride - a.pad_left;
  const T* x = static_cast<const T*>(a.x) + n * a.xn;
  auto in_image = [&](int p) {
    const int iy = iy0 + p / a.win_w, ix = ix0 + p % a.win_w;
    return p < pl.pixels && iy >= 0 && iy < a.H && ix >= 0 && ix < a.W;
  };
  auto x_at = [&](int p, int c) {
    return x[c * a.xc + (iy0 + p / a.win_w) * a.xh + (ix0 + p % a.win_w) * a.xw];
  };

  if (expand) {
    for (int i = tid; i < pl.pixels_pad * pl.k_pad; i += kThreads) {
      const int c = i % pl.k_pad, p = i / pl.k_pad;  // channels fastest: coalesced on channels_last
      xs[p * pl.pitch_x + c] = c < a.C_in && in_image(p) ? x_at(p, c) : T(0.f);
    }
    __syncthreads();
  }

  const T* we = static_cast<const T*>(a.we);
  const T* wd = static_cast<const T*>(a.wd);
  const T* wp = static_cast<const T*>(a.wp);
  const int taps = a.kh * a.kw;
  const int wm = warp >> 2, wn = warp & 3;  // the warp's 32 pixels and 8 * kNT output channels
  const int o_base = wn * kNT * 8;
  float acc[2][kNT][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

  for (int h0 = 0; h0 < a.C_hid; h0 += kChunk) {
    // 1. The chunk of e over the window, zero where the window leaves the image (the depthwise
    //    conv's zero padding is of e, not of x). The previous chunk's depthwise, the last reader
    //    of es, finished before the barrier ahead of its projection.
    if (expand) {
      for (int mt = warp; mt < pl.pixels_pad / 16; mt += kThreads / 32) {
        float ce[4][4] = {};
        for (int k0 = 0; k0 < pl.k_pad; k0 += 16) {
          uint32_t af[4];
          load_a(af, xs, pl.pitch_x, mt * 16, k0, g, t);
          const int c = k0 + 2 * t;  // C_in is even: a pair is wholly inside or outside
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            const int h = h0 + nt * 8 + g;
            const T* row = we + int64_t{h} * a.C_in;
            gemm::mma_16bit<T>(ce[nt], af, global_pair(row + c, h < a.C_hid && c < a.C_in),
                               global_pair(row + c + 8, h < a.C_hid && c + 8 < a.C_in));
          }
        }
        // c[0], c[1]: row g, columns 2t, 2t + 1; c[2], c[3]: row g + 8.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int p = mt * 16 + g + 8 * r;
          const bool inside = in_image(p);
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const int hh = nt * 8 + 2 * t + j, h = h0 + hh;
              const float v = inside && h < a.C_hid
                                  ? activation_of(a.act_e, ce[nt][2 * r + j] + (a.be ? a.be[h] : 0.f))
                                  : 0.f;
              es[p * kPitchE + hh] = static_cast<T>(v);
            }
          }
        }
      }
    } else {
      for (int i = tid; i < pl.pixels * kChunk; i += kThreads) {
        const int hh = i % kChunk, p = i / kChunk, h = h0 + hh;
        es[p * kPitchE + hh] = h < a.C_hid && in_image(p) ? x_at(p, h) : T(0.f);
      }
    }
    __syncthreads();
    // 2. The depthwise conv of the chunk over the tile, fp32 products of e's rounded values.
    for (int i = tid; i < kTile * kChunk; i += kThreads) {
      const int hh = i % kChunk, q = i / kChunk, h = h0 + hh;
      float v = 0.f;
      if (h < a.C_hid) {
        const int qy = q / kTileW, qx = q % kTileW;
        const T* w = wd + int64_t{h} * taps;
        for (int ky = 0; ky < a.kh; ++ky) {
          for (int kx = 0; kx < a.kw; ++kx) {
            const int p = (qy * a.stride + ky * a.dilation) * a.win_w + qx * a.stride + kx * a.dilation;
            v = fmaf(static_cast<float>(es[p * kPitchE + hh]), static_cast<float>(w[ky * a.kw + kx]), v);
          }
        }
        v = activation_of(a.act_d, v + (a.bd ? a.bd[h] : 0.f));
      }
      ds[q * kPitchE + hh] = static_cast<T>(v);
    }
    __syncthreads();
    // 3. The chunk's share of the projection. The next chunk's depthwise overwrites ds only
    //    after the barrier that follows its expansion, which every warp reaches after this.
#pragma unroll
    for (int k0 = 0; k0 < kChunk; k0 += 16) {
      uint32_t af[2][4];
      load_a(af[0], ds, kPitchE, wm * 32, k0, g, t);
      load_a(af[1], ds, kPitchE, wm * 32 + 16, k0, g, t);
      const int k = h0 + k0 + 2 * t;  // C_hid is even: a pair is wholly inside or outside
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        if (o_base + nt * 8 >= a.C_out) break;  // warp-uniform: the group's last columns
        const int o = o_base + nt * 8 + g;
        const T* row = wp + int64_t{o} * a.C_hid;
        const uint32_t b0 = global_pair(row + k, o < a.C_out && k < a.C_hid);
        const uint32_t b1 = global_pair(row + k + 8, o < a.C_out && k + 8 < a.C_hid);
        gemm::mma_16bit<T>(acc[0][nt], af[0], b0, b1);
        gemm::mma_16bit<T>(acc[1][nt], af[1], b0, b1);
      }
    }
  }

  // The projection's bias and activation, the residual, one store per output.
  T* out = static_cast<T*>(a.out);
  const T* residual = static_cast<const T*>(a.residual);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int q = wm * 32 + mt * 16 + g + (i >> 1) * 8;
        const int o = o_base + nt * 8 + 2 * t + (i & 1);
        const int oy = oy0 + q / kTileW, ox = ox0 + q % kTileW;
        if (o >= a.C_out || oy >= a.Ho || ox >= a.Wo) continue;
        float v = activation_of(a.act_p, acc[mt][nt][i] + (a.bp ? a.bp[o] : 0.f));
        if (residual != nullptr) v += static_cast<float>(residual[n * a.rn + o * a.rc + oy * a.rh + ox * a.rw]);
        out[n * a.on + o * a.oc + oy * a.oh + ox * a.ow] = static_cast<T>(v);
      }
    }
  }
}

}  // namespace mma_block
}  // namespace fastconv
