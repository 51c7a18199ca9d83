// The fused inverted residual's CUDA-core kernel (fastconv_cuda::inverted_residual_forward
// with kernel 0; its host side is inverted_residual.cu): the MobileNetV2 inverted residual
// (and, without the expansion, the depthwise-separable block) in one kernel, the expanded
// tensor never in memory:
//
//     e = act_e(x @ We^T + be)        1x1 expansion (absent: e = x)
//     d = act_d(dw(e) + bd)           depthwise k x k, stride s, dilation, zero padding of e
//     y = act_p(d @ Wp^T + bp) (+ r)  1x1 projection, then the residual
//
// with the BatchNorm scales folded into the weights by the caller (fastconv/ops/
// inverted_residual.py) and the shifts as float32 biases.
//
// One CTA owns a kTileH x kTileW tile of output pixels of one image and a group of up to
// kGroupOut output channels. One group holds MobileNetV2's widest block (320); MobileNetV1's
// 512- and 1024-channel blocks take two or three, one launch each, each redoing the depthwise
// (the host offsets the projection's rows, its bias, the output and the residual per group:
// done in the kernel, the offsets cost the 128-register budget 108 bytes of spills). It
// stages the tile's input window (the tile and its halo: ((kTileH - 1) s + (kh - 1) dil + 1)
// rows, likewise columns) in shared memory once, in x's dtype, then walks the hidden channels
// in chunks of kChunk: the chunk's expansion over the whole window into shared memory, its
// depthwise conv over the tile into shared memory, and the chunk's share of the projection
// into per-thread float accumulators, which hold the tile's kTileH * kTileW outputs of the
// group (at most kMaxAcc per thread). Only x, the weights and y touch global memory.
//
// This is the CUDA-core kernel: every product is an fp32 FMA, the intermediates stay fp32
// (more exact than eager's half-precision e and d), every dtype. In half precision the op's
// `kernel` argument picks it (0) or the tensor-core kernel (1, inverted_residual_mma_kernel.cuh:
// both GEMMs on mma.sync, 8x8 tiles); the Python caller times the two at a shape's first call,
// and `auto` times the cuda backend against Triton's kernels. Unmeasured: no GPU has run
// either; tests/cuda_emulation.py runs both on the CPU. ptxas (sm_90, nvcc 13.0, offline):
// 128 registers for each dtype, no spills.
#pragma once

#include <cstdint>

#include "inverted_residual.h"
#include "shared_memory.cuh"

namespace fastconv {
namespace fma_block {

constexpr int kThreads = 256;
constexpr int kTileH = 4, kTileW = 4, kTile = kTileH * kTileW;
constexpr int kChunk = 32;  // hidden channels per step
constexpr int kMaxAcc = 24;  // accumulators per thread: kTile * group <= kThreads * kMaxAcc
constexpr int kGroupOut = kThreads * kMaxAcc / kTile;  // 384 output channels a launch

// The window of x in x's dtype (16-byte aligned end), then the float chunks of e and d. In
// half precision MobileNetV1's widest window fits: 1024 channels at stride 1 (6x6 pixels) take
// 72 KB, 512 at stride 2 (9x9) 81 KB.
__host__ __device__ inline int64_t window_bytes(int win_h, int win_w, int64_t C_in, int64_t element_size) {
  return (int64_t{win_h} * win_w * C_in * element_size + 15) / 16 * 16;
}

__host__ __device__ inline int64_t shared_bytes(int win_h, int win_w, int64_t C_in, int64_t element_size) {
  const int64_t pixels = int64_t{win_h} * win_w;
  return window_bytes(win_h, win_w, C_in, element_size) +
         (pixels * kChunk + int64_t{kTile} * kChunk) * int64_t{sizeof(float)};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) inverted_residual_kernel(const BlockArgs a) {
  FASTCONV_DYNAMIC_SHARED(unsigned char, smem);
  const int pixels = a.win_h * a.win_w;
  T* xs = reinterpret_cast<T*>(smem);  // [pixels][C_in]: the window of x
  float* es = reinterpret_cast<float*>(smem + window_bytes(a.win_h, a.win_w, a.C_in, sizeof(T)));  // [pixels][kChunk]
  float* ds = es + pixels * kChunk;    // [kTile][kChunk]: the chunk of d

  const int tid = threadIdx.x;
  const int64_t tiles = int64_t{a.tiles_h} * a.tiles_w;
  const int64_t n = blockIdx.x / tiles;
  const int tile = static_cast<int>(blockIdx.x % tiles);
  const int oy0 = (tile / a.tiles_w) * kTileH, ox0 = (tile % a.tiles_w) * kTileW;
  const int iy0 = oy0 * a.stride - a.pad_top, ix0 = ox0 * a.stride - a.pad_left;

  const T* x = static_cast<const T*>(a.x) + n * a.xn;
  for (int64_t i = tid; i < int64_t{pixels} * a.C_in; i += kThreads) {
    const int c = static_cast<int>(i % a.C_in);  // channels fastest: coalesced on channels_last
    const int p = static_cast<int>(i / a.C_in);
    const int iy = iy0 + p / a.win_w, ix = ix0 + p % a.win_w;
    const bool inside = iy >= 0 && iy < a.H && ix >= 0 && ix < a.W;
    xs[i] = inside ? x[c * a.xc + iy * a.xh + ix * a.xw] : T(0.f);
  }

  float acc[kMaxAcc];
#pragma unroll
  for (int k = 0; k < kMaxAcc; ++k) acc[k] = 0.f;
  const T* we = static_cast<const T*>(a.we);
  const T* wd = static_cast<const T*>(a.wd);
  const T* wp = static_cast<const T*>(a.wp);
  const int taps = a.kh * a.kw;

  for (int h0 = 0; h0 < a.C_hid; h0 += kChunk) {
    __syncthreads();  // xs is written; the previous chunk's es and ds are consumed
    // 1. The expansion over the window, zero where the window leaves the image: the depthwise
    //    conv's zero padding is of e, not of x.
    for (int i = tid; i < pixels * kChunk; i += kThreads) {
      const int hh = i % kChunk, p = i / kChunk, h = h0 + hh;
      const int iy = iy0 + p / a.win_w, ix = ix0 + p % a.win_w;
      float v = 0.f;
      if (h < a.C_hid && iy >= 0 && iy < a.H && ix >= 0 && ix < a.W) {
        const T* xp = xs + int64_t{p} * a.C_in;
        if (we != nullptr) {
          const T* w = we + int64_t{h} * a.C_in;
          for (int c = 0; c < a.C_in; ++c) v = fmaf(static_cast<float>(xp[c]), static_cast<float>(w[c]), v);
          v = activation_of(a.act_e, v + (a.be ? a.be[h] : 0.f));
        } else {
          v = static_cast<float>(xp[h]);
        }
      }
      es[i] = v;
    }
    __syncthreads();
    // 2. The depthwise conv of the chunk over the tile.
    for (int i = tid; i < kTile * kChunk; i += kThreads) {
      const int hh = i % kChunk, q = i / kChunk, h = h0 + hh;
      float v = 0.f;
      if (h < a.C_hid) {
        const int qy = q / kTileW, qx = q % kTileW;
        const T* w = wd + int64_t{h} * taps;
        for (int ky = 0; ky < a.kh; ++ky) {
          for (int kx = 0; kx < a.kw; ++kx) {
            const int p = (qy * a.stride + ky * a.dilation) * a.win_w + qx * a.stride + kx * a.dilation;
            v = fmaf(es[p * kChunk + hh], static_cast<float>(w[ky * a.kw + kx]), v);
          }
        }
        v = activation_of(a.act_d, v + (a.bd ? a.bd[h] : 0.f));
      }
      ds[i] = v;
    }
    __syncthreads();
    // 3. The chunk's share of the projection: output (q, o0 + o) is thread j % kThreads's
    //    accumulator j / kThreads, j = o * kTile + q.
    const int width = min(kChunk, a.C_hid - h0);
#pragma unroll
    for (int k = 0; k < kMaxAcc; ++k) {
      const int j = tid + k * kThreads;
      if (j >= kTile * a.C_out) break;
      const int q = j % kTile, o = j / kTile;
      const T* w = wp + int64_t{o} * a.C_hid + h0;
      const float* dq = ds + q * kChunk;
      float s = acc[k];
      for (int hh = 0; hh < width; ++hh) s = fmaf(dq[hh], static_cast<float>(w[hh]), s);
      acc[k] = s;
    }
  }

  // The projection's bias and activation, the residual, one store per output.
  T* out = static_cast<T*>(a.out);
  const T* residual = static_cast<const T*>(a.residual);
#pragma unroll
  for (int k = 0; k < kMaxAcc; ++k) {
    const int j = tid + k * kThreads;
    if (j >= kTile * a.C_out) break;
    const int q = j % kTile, o = j / kTile;
    const int oy = oy0 + q / kTileW, ox = ox0 + q % kTileW;
    if (oy >= a.Ho || ox >= a.Wo) continue;
    float v = activation_of(a.act_p, acc[k] + (a.bp ? a.bp[o] : 0.f));
    if (residual != nullptr) v += static_cast<float>(residual[n * a.rn + o * a.rc + oy * a.rh + ox * a.rw]);
    out[n * a.on + o * a.oc + oy * a.oh + ox * a.ow] = static_cast<T>(v);
  }
}

}  // namespace fma_block
}  // namespace fastconv
