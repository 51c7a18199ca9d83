// Stage-1 kernels of the training-mode BatchNorm ops: the per-part statistics of
// batch_norm_stats and the two passes of batch_norm_act_backward. Included by
// batch_norm.cu alone, which holds the second-stage reductions, the launchers and the
// ops; its header comment gives the design.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "activations.cuh"
#include "bn_act_common.cuh"
#include "shared_memory.cuh"

namespace fastconv {
namespace bn_train {

// ---------------------------------------------------------------------------------------
// Device helpers.

// Chan's merge of a (count, mean, M2) triple b into a running one a; means are of values
// less one common pivot. Empty b is a no-op; empty a takes b exactly.
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb, float mean_b,
                                           float m2_b) {
  if (nb == 0.f) return;
  const float total = n + nb;
  const float weight = nb / total;
  const float delta = mean_b - mean;
  mean += delta * weight;
  m2 += m2_b + delta * delta * (n * weight);
  n = total;
}

// The per-channel parameters of the backward, as the forward uses them.
struct BnParams {
  const float* mean;    // [C] batch mean of c
  const float* invstd;  // [C] 1 / sqrt(var + eps)
  const float* weight;  // [C] or nullptr (w = 1)
  const float* bias;    // [C] or nullptr (b = 0)
};

// scale = w * invstd and shift = b - mean * scale, each product and difference rounded to
// fp32 on its own (no fma), as fastconv.reference.batch_norm_scale_shift's torch ops do: the
// forward's z is then reproduced bit for bit, and the activation's kinks fall alike.
__device__ __forceinline__ void channel_affine(const BnParams& p, int64_t c, float& scale,
                                               float& shift, float& mean) {
  mean = p.mean[c];
  const float w = p.weight != nullptr ? p.weight[c] : 1.f;
  const float b = p.bias != nullptr ? p.bias[c] : 0.f;
  scale = __fmul_rn(w, p.invstd[c]);
  shift = __fsub_rn(b, __fmul_rn(mean, scale));
}

// z = c * scale + shift as one fma: what nvcc contracts bn_act's forward expression to.
__device__ __forceinline__ float affine(float x, float scale, float shift) {
  return fmaf(x, scale, shift);
}

// ---------------------------------------------------------------------------------------
// batch_norm_stats, stage 1: (count, mean, M2) of c - pivot per part and channel.
//
// The pivot is the part's first value of the channel, so that the running means and their
// deltas are of size std, not |mean|, and keep their digits. Each thread runs Welford's
// update over its rows; the block merges its threads' triples with Chan's formula.

// Workspace of the statistics: [4, parts, C] = count, mean and M2 of c - pivot, pivot.
struct StatsParts {
  float* ws;
  int64_t parts;
  __device__ __forceinline__ void store(int64_t part, int64_t C, int64_t c, float n, float mean,
                                        float m2, float pivot) const {
    const int64_t at = part * C + c, plane = parts * C;
    ws[at] = n;
    ws[plane + at] = mean;
    ws[2 * plane + at] = m2;
    ws[3 * plane + at] = pivot;
  }
};

// kRows path. Thread = VEC channels; rows blockIdx.y * blockDim.y + threadIdx.y + k * step.
template <typename T, typename idx_t, int VEC, int UNROLL>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM) rows_stats_kernel(
    const T* __restrict__ x,  // c, channel stride 1
    RowGeom<idx_t> geom,      // row count and row -> (n, h, w) split
    Strides<idx_t> xs,        // c's element strides
    int C,                    // channels, a multiple of VEC
    StatsParts out) {         // part blockIdx.y
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < C;  // inactive threads still join the block merge, empty
  const idx_t p0 = static_cast<idx_t>(blockIdx.y) * blockDim.y;  // the block's first row
  float pivot[VEC], mean[VEC], m2[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) pivot[i] = mean[i] = m2[i] = 0.f;
  if (active && p0 < geom.rows) unpack(load_pack<VEC>(x + row_offset(geom, xs, p0) + c0), pivot);

  // Counts in float, as merge weights: exact up to 2^24 rows per thread.
  float count = 0.f;
  const idx_t step = static_cast<idx_t>(gridDim.y) * blockDim.y;
  const idx_t first = active ? p0 + static_cast<idx_t>(threadIdx.y) : geom.rows;
  for (idx_t r0 = first; r0 < geom.rows; r0 += step * UNROLL) {
    Pack<T, VEC> pk[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const idx_t r = r0 + u * step;
      if (r < geom.rows) pk[u] = load_pack<VEC>(x + row_offset(geom, xs, r) + c0);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (r0 + u * step >= geom.rows) break;
      float v[VEC];
      unpack(pk[u], v);
      count += 1.f;
      const float inv = 1.f / count;  // shared by the VEC channels of the row
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float shifted = v[i] - pivot[i];
        const float delta = shifted - mean[i];
        mean[i] += delta * inv;
        m2[i] += delta * (shifted - mean[i]);
      }
    }
  }

  // Chan's merge over threadIdx.y (a power of two) by a fixed tree; smem is
  // [1 + 2 * VEC][blockDim.y][blockDim.x]: count, means, M2s.
  FASTCONV_DYNAMIC_SHARED(float, smem);
  const int tx = threadIdx.x, ty = threadIdx.y, nx = blockDim.x, ny = blockDim.y;
  auto slot = [&](int k, int row) -> float& { return smem[(k * ny + row) * nx + tx]; };
  auto publish = [&]() {
    slot(0, ty) = count;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      slot(1 + i, ty) = mean[i];
      slot(1 + VEC + i, ty) = m2[i];
    }
  };
  publish();
  __syncthreads();
  for (int half = ny / 2; half > 0; half /= 2) {
    if (ty < half) {
      const float nb = slot(0, ty + half);
      if (nb > 0.f) {
        const float total = count + nb;
        const float weight = nb / total;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float delta = slot(1 + i, ty + half) - mean[i];
          mean[i] += delta * weight;
          m2[i] += slot(1 + VEC + i, ty + half) + delta * delta * (count * weight);
        }
        count = total;
        publish();  // only rows below `half` are written, and only rows >= half are read
      }
    }
    __syncthreads();
  }
  if (ty == 0 && active) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out.store(blockIdx.y, C, c0 + i, count, mean[i], m2[i], pivot[i]);
  }
}

// kPlanes (CONTIG) and kStrided (!CONTIG, VEC == 1) paths. One warp per (plane, tile) task;
// the pivot is the tile's first value. Each lane reduces a pack to its own (VEC, mean, M2)
// and Chan-merges it into its running triple; the lanes merge by a fixed shuffle tree.
template <typename T, typename idx_t, int VEC, int UNROLL, bool CONTIG>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM) planes_stats_kernel(
    const T* __restrict__ x,  // c
    PlaneGeom<idx_t> geom,    // plane tiling, see PlaneGeom
    Strides<idx_t> xs,        // c's element strides
    StatsParts out) {         // part n * tiles + tile
  const int lane = threadIdx.x % kWarpSize;
  const idx_t warp = (static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const idx_t num_warps = static_cast<idx_t>(gridDim.x) * blockDim.x / kWarpSize;
  for (idx_t task = warp; task < geom.tasks; task += num_warps) {
    const PlaneTask<idx_t> t = plane_task(geom, task);
    const T* xp = x + t.n * xs.n + t.c * xs.c;
    const float pivot =
        t.begin < t.end ? static_cast<float>(xp[plane_offset<CONTIG, VEC>(geom, xs, t.begin)]) : 0.f;
    float count = 0.f, mean = 0.f, m2 = 0.f;
    for (idx_t k0 = t.begin + lane; k0 < t.end; k0 += kWarpSize * UNROLL) {
      Pack<T, VEC> pk[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const idx_t k = k0 + u * kWarpSize;
        if (k < t.end) pk[u] = load_pack<VEC>(xp + plane_offset<CONTIG, VEC>(geom, xs, k));
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        if (k0 + u * kWarpSize >= t.end) break;
        float v[VEC];
        unpack(pk[u], v);
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          v[i] -= pivot;
          sum += v[i];
        }
        const float pack_mean = sum * (1.f / VEC);
        float pack_m2 = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) pack_m2 += (v[i] - pack_mean) * (v[i] - pack_mean);
        chan_merge(count, mean, m2, static_cast<float>(VEC), pack_mean, pack_m2);
      }
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const float nb = __shfl_down_sync(0xffffffffu, count, offset);
      const float mean_b = __shfl_down_sync(0xffffffffu, mean, offset);
      const float m2_b = __shfl_down_sync(0xffffffffu, m2, offset);
      chan_merge(count, mean, m2, nb, mean_b, m2_b);
    }
    if (lane == 0) {
      out.store(static_cast<int64_t>(t.n) * geom.tiles + t.tile, geom.C, t.c, count, mean, m2, pivot);
    }
  }
}

// ---------------------------------------------------------------------------------------
// batch_norm_act_backward, pass 1: per part and channel, Sg = sum(g) and
// Sgx = sum(g * (c - mean)), g = grad_y * act'(z). Workspace [2, parts, C].

template <typename T, typename idx_t, int VEC, int UNROLL>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM) rows_grad_sums_kernel(
    const T* __restrict__ g,  // grad_y, channel stride 1
    const T* __restrict__ x,  // c, channel stride 1
    BnParams params,          // per-channel mean, invstd, weight, bias
    RowGeom<idx_t> geom,      // row count and row -> (n, h, w) split
    Strides<idx_t> gs,        // grad_y element strides
    Strides<idx_t> xs,        // c element strides
    int C,                    // channels, a multiple of VEC
    int act,                  // ActivationCode
    float* __restrict__ ws,   // [2, gridDim.y, C]: [0] Sg, [1] Sgx
    int64_t parts) {          // gridDim.y
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < C;  // inactive threads still join the block reduction
  float sc[VEC], sh[VEC], mu[VEC], sum_g[VEC], sum_gx[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    sc[i] = sh[i] = mu[i] = 0.f;
    if (active) channel_affine(params, c0 + i, sc[i], sh[i], mu[i]);
    sum_g[i] = sum_gx[i] = 0.f;
  }
  const idx_t step = static_cast<idx_t>(gridDim.y) * blockDim.y;
  const idx_t first = active ? static_cast<idx_t>(blockIdx.y) * blockDim.y + threadIdx.y : geom.rows;
  for (idx_t r0 = first; r0 < geom.rows; r0 += step * UNROLL) {
    Pack<T, VEC> gpk[UNROLL], xpk[UNROLL];
    load_row_pairs<VEC, UNROLL>(geom, r0, step, c0, g, gs, gpk, x, xs, xpk);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (r0 + u * step >= geom.rows) break;
      float gv[VEC], xv[VEC], z[VEC], d[VEC];
      unpack(gpk[u], gv);
      unpack(xpk[u], xv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] = affine(xv[i], sc[i], sh[i]);
      activation_grad(act, z, d);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        d[i] *= gv[i];
        sum_g[i] += d[i];
        sum_gx[i] += d[i] * (xv[i] - mu[i]);
      }
    }
  }

  rows_sums_to_parts<VEC>(sum_g, sum_gx, ws, parts, C, c0, active);
}

template <typename T, typename idx_t, int VEC, int UNROLL, bool CONTIG>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM) planes_grad_sums_kernel(
    const T* __restrict__ g,  // grad_y
    const T* __restrict__ x,  // c
    BnParams params,          // per-channel mean, invstd, weight, bias
    PlaneGeom<idx_t> geom,    // plane tiling, see PlaneGeom
    Strides<idx_t> gs,        // grad_y element strides
    Strides<idx_t> xs,        // c element strides
    int act,                  // ActivationCode
    float* __restrict__ ws,   // [2, N * tiles, C]: [0] Sg, [1] Sgx
    int64_t parts) {          // N * tiles
  const int lane = threadIdx.x % kWarpSize;
  const idx_t warp = (static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const idx_t num_warps = static_cast<idx_t>(gridDim.x) * blockDim.x / kWarpSize;
  for (idx_t task = warp; task < geom.tasks; task += num_warps) {
    const PlaneTask<idx_t> t = plane_task(geom, task);
    float sc, sh, mu;
    channel_affine(params, t.c, sc, sh, mu);
    const T* gp = g + t.n * gs.n + t.c * gs.c;
    const T* xp = x + t.n * xs.n + t.c * xs.c;
    float sum_g = 0.f, sum_gx = 0.f;
    for (idx_t k0 = t.begin + lane; k0 < t.end; k0 += kWarpSize * UNROLL) {
      Pack<T, VEC> gpk[UNROLL], xpk[UNROLL];
      load_plane_pairs<CONTIG, VEC, UNROLL>(geom, k0, t.end, gp, gs, gpk, xp, xs, xpk);
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        if (k0 + u * kWarpSize >= t.end) break;
        float gv[VEC], xv[VEC], z[VEC], d[VEC];
        unpack(gpk[u], gv);
        unpack(xpk[u], xv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) z[i] = affine(xv[i], sc, sh);
        activation_grad(act, z, d);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          d[i] *= gv[i];
          sum_g += d[i];
          sum_gx += d[i] * (xv[i] - mu);
        }
      }
    }
    warp_sums_to_parts(sum_g, sum_gx, geom, t, lane, ws, parts);
  }
}

// ---------------------------------------------------------------------------------------
// batch_norm_act_backward, pass 2: grad_c = scale * (g - mean_g - (c - mean) * coef), or with
// `accumulate` grad_c += that (batch_norm_act_backward_accumulate: a dense block's layers add
// into one gradient buffer; each element is read and written by one thread, no atomics).

// z += the VEC values at p, in float32 (the sum is rounded once, by the store).
template <int VEC, typename T>
__device__ __forceinline__ void add_existing(const T* p, float (&z)[VEC]) {
  float prev[VEC];
  unpack(load_pack<VEC>(p), prev);
#pragma unroll
  for (int i = 0; i < VEC; ++i) z[i] += prev[i];
}

template <typename T, typename idx_t, int VEC, int UNROLL>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM) rows_grad_input_kernel(
    const T* __restrict__ g,          // grad_y, channel stride 1
    const T* __restrict__ x,          // c, channel stride 1
    T* __restrict__ gx,               // grad_c (output), channel stride 1
    BnParams params,                  // per-channel mean, invstd, weight, bias
    const float* __restrict__ coefs,  // [2, C]: mean_g, coef
    RowGeom<idx_t> geom,              // row count and row -> (n, h, w) split
    Strides<idx_t> gs, Strides<idx_t> xs, Strides<idx_t> gxs,  // element strides
    int C,                            // channels, a multiple of VEC
    int act,                          // ActivationCode
    bool accumulate) {                // add into grad_c instead of overwriting it
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;
  float sc[VEC], sh[VEC], mu[VEC], mg[VEC], cf[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    channel_affine(params, c0 + i, sc[i], sh[i], mu[i]);
    mg[i] = coefs[c0 + i];
    cf[i] = coefs[C + c0 + i];
  }
  const idx_t step = static_cast<idx_t>(gridDim.y) * blockDim.y;
  for (idx_t r0 = static_cast<idx_t>(blockIdx.y) * blockDim.y + threadIdx.y; r0 < geom.rows;
       r0 += step * UNROLL) {
    Pack<T, VEC> gpk[UNROLL], xpk[UNROLL];
    load_row_pairs<VEC, UNROLL>(geom, r0, step, c0, g, gs, gpk, x, xs, xpk);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const idx_t r = r0 + u * step;
      if (r >= geom.rows) break;
      float gv[VEC], xv[VEC], z[VEC], d[VEC];
      unpack(gpk[u], gv);
      unpack(xpk[u], xv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] = affine(xv[i], sc[i], sh[i]);
      activation_grad(act, z, d);
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] = sc[i] * (d[i] * gv[i] - mg[i] - (xv[i] - mu[i]) * cf[i]);
      T* dst = gx + row_offset(geom, gxs, r) + c0;
      if (accumulate) add_existing<VEC>(dst, z);
      store_pack<VEC>(dst, z);
    }
  }
}

template <typename T, typename idx_t, int VEC, int UNROLL, bool CONTIG>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM) planes_grad_input_kernel(
    const T* __restrict__ g,          // grad_y
    const T* __restrict__ x,          // c
    T* __restrict__ gx,               // grad_c (output)
    BnParams params,                  // per-channel mean, invstd, weight, bias
    const float* __restrict__ coefs,  // [2, C]: mean_g, coef
    PlaneGeom<idx_t> geom,            // plane tiling, see PlaneGeom
    Strides<idx_t> gs, Strides<idx_t> xs, Strides<idx_t> gxs,  // element strides
    int act,                          // ActivationCode
    bool accumulate) {                // add into grad_c instead of overwriting it
  const int lane = threadIdx.x % kWarpSize;
  const idx_t warp = (static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const idx_t num_warps = static_cast<idx_t>(gridDim.x) * blockDim.x / kWarpSize;
  for (idx_t task = warp; task < geom.tasks; task += num_warps) {
    const PlaneTask<idx_t> t = plane_task(geom, task);
    float sc, sh, mu;
    channel_affine(params, t.c, sc, sh, mu);
    const float mg = coefs[t.c], cf = coefs[geom.C + t.c];
    const T* gp = g + t.n * gs.n + t.c * gs.c;
    const T* xp = x + t.n * xs.n + t.c * xs.c;
    T* gxp = gx + t.n * gxs.n + t.c * gxs.c;
    for (idx_t k0 = t.begin + lane; k0 < t.end; k0 += kWarpSize * UNROLL) {
      Pack<T, VEC> gpk[UNROLL], xpk[UNROLL];
      load_plane_pairs<CONTIG, VEC, UNROLL>(geom, k0, t.end, gp, gs, gpk, xp, xs, xpk);
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const idx_t k = k0 + u * kWarpSize;
        if (k >= t.end) break;
        float gv[VEC], xv[VEC], z[VEC], d[VEC];
        unpack(gpk[u], gv);
        unpack(xpk[u], xv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) z[i] = affine(xv[i], sc, sh);
        activation_grad(act, z, d);
#pragma unroll
        for (int i = 0; i < VEC; ++i) z[i] = sc * (d[i] * gv[i] - mg - (xv[i] - mu) * cf);
        T* dst = gxp + plane_offset<CONTIG, VEC>(geom, gxs, k);
        if (accumulate) add_existing<VEC>(dst, z);
        store_pack<VEC>(dst, z);
      }
    }
  }
}

}  // namespace bn_train
}  // namespace fastconv
