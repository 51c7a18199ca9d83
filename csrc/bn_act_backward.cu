// Backward bn_act kernels.
//
//   z = x * scale[c] + shift[c],  d = grad_y * act'(z)
//   grad_x = d * scale[c],  grad_shift[c] = sum(d),  grad_scale[c] = sum(d * x)
//
// The per-channel sums are deterministic: stage 1 (fused with grad_x, so g and x are read
// once) writes fp32 partial sums to a [2, parts, C] workspace, each slot owned by exactly
// one block or warp and reduced in a fixed order; stage 2 sums the parts of each channel
// in a fixed order. No float atomics. The partition depends only on the shapes, layout and
// SM count, never on the autotuned variant (variants only change how many loads are in
// flight, not the order of the additions), so every variant gives bit-identical sums.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <ATen/ops/empty.h>

#include "activations.cuh"
#include "autotune.h"
#include "bn_act.h"
#include "bn_act_common.cuh"

namespace fastconv {
namespace {

// Rows of the backward kernel on the kRows path handle at least this many rows per
// thread, which bounds the workspace to a small fraction of the tensor traffic.
constexpr int64_t kMinRowsPerThread = 16;

// Stage-2 block: 32 channels x kReduceLanes partial rows.
constexpr int kReduceLanes = 16;

// kRows path, stage 1. Thread = VEC channels; sums accumulate in registers over the
// thread's rows, then blockDim.y lanes are tree-reduced in shared memory; block row
// blockIdx.y owns workspace part blockIdx.y.
template <typename T, typename S, typename idx_t, int VEC, int UNROLL>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM) rows_backward_kernel(
    const T* __restrict__ g,      // grad_y, channel stride 1
    const T* __restrict__ x,      // forward input, channel stride 1
    T* __restrict__ gx,           // grad_x (output), channel stride 1
    const S* __restrict__ scale,  // [C] per-channel multiplier
    const S* __restrict__ shift,  // [C] per-channel offset
    RowGeom<idx_t> geom,          // row count and row -> (n, h, w) split
    Strides<idx_t> gs,            // grad_y element strides
    Strides<idx_t> xs,            // x element strides
    Strides<idx_t> gxs,           // grad_x element strides
    int C,                        // channels, a multiple of VEC
    int act,                      // ActivationCode
    float* __restrict__ ws,       // [2, gridDim.y, C] partials: [0] sum(d), [1] sum(d * x)
    int64_t parts) {              // gridDim.y, the workspace's middle dim
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  const bool active = c0 < C;  // inactive threads still join the block reduction
  float sc[VEC], sh[VEC], sum_d[VEC], sum_dx[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    sc[i] = active ? static_cast<float>(scale[c0 + i]) : 0.f;
    sh[i] = active ? static_cast<float>(shift[c0 + i]) : 0.f;
    sum_d[i] = 0.f;
    sum_dx[i] = 0.f;
  }
  const idx_t step = static_cast<idx_t>(gridDim.y) * blockDim.y;
  const idx_t first = active ? static_cast<idx_t>(blockIdx.y * blockDim.y + threadIdx.y) : geom.rows;
  for (idx_t r0 = first; r0 < geom.rows; r0 += step * UNROLL) {
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
      for (int i = 0; i < VEC; ++i) z[i] = xv[i] * sc[i] + sh[i];
      activation_grad(act, z, d);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        d[i] *= gv[i];
        sum_d[i] += d[i];
        sum_dx[i] += d[i] * xv[i];
        z[i] = d[i] * sc[i];  // reuse z as the grad_x pack
      }
      store_pack<VEC>(gx + row_offset(geom, gxs, r) + c0, z);
    }
  }

  rows_sums_to_parts<VEC>(sum_d, sum_dx, ws, parts, C, c0, active);
}

// kPlanes (CONTIG) and kStrided (!CONTIG, VEC == 1) paths, stage 1. One warp per
// (plane, tile) task; the warp's sums go to workspace part n * tiles + tile.
template <typename T, typename S, typename idx_t, int VEC, int UNROLL, bool CONTIG>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM) planes_backward_kernel(
    const T* __restrict__ g,      // grad_y
    const T* __restrict__ x,      // forward input
    T* __restrict__ gx,           // grad_x (output)
    const S* __restrict__ scale,  // [C] per-channel multiplier
    const S* __restrict__ shift,  // [C] per-channel offset
    PlaneGeom<idx_t> geom,        // plane tiling, see PlaneGeom
    Strides<idx_t> gs,            // grad_y element strides
    Strides<idx_t> xs,            // x element strides
    Strides<idx_t> gxs,           // grad_x element strides
    int act,                      // ActivationCode
    float* __restrict__ ws,       // [2, N * tiles, C] partials: [0] sum(d), [1] sum(d * x)
    int64_t parts) {              // N * tiles, the workspace's middle dim
  const int lane = threadIdx.x % kWarpSize;
  const idx_t warp = (static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const idx_t num_warps = static_cast<idx_t>(gridDim.x) * blockDim.x / kWarpSize;
  for (idx_t task = warp; task < geom.tasks; task += num_warps) {
    const PlaneTask<idx_t> t = plane_task(geom, task);
    const float sc = static_cast<float>(scale[t.c]);
    const float sh = static_cast<float>(shift[t.c]);
    const T* gp = g + t.n * gs.n + t.c * gs.c;
    const T* xp = x + t.n * xs.n + t.c * xs.c;
    T* gxp = gx + t.n * gxs.n + t.c * gxs.c;
    float sum_d = 0.f, sum_dx = 0.f;
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
        for (int i = 0; i < VEC; ++i) z[i] = xv[i] * sc + sh;
        activation_grad(act, z, d);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          d[i] *= gv[i];
          sum_d += d[i];
          sum_dx += d[i] * xv[i];
          z[i] = d[i] * sc;  // reuse z as the grad_x pack
        }
        store_pack<VEC>(gxp + plane_offset<CONTIG, VEC>(geom, gxs, k), z);
      }
    }
    warp_sums_to_parts(sum_d, sum_dx, geom, t, lane, ws, parts);
  }
}

// Stage 2: grad_shift[c] = sum_p ws[0, p, c], grad_scale[c] = sum_p ws[1, p, c]. Lane ty
// of the block sums parts ty, ty + kReduceLanes, ... in order, then a fixed tree.
template <typename S>
__global__ void __launch_bounds__(kWarpSize * kReduceLanes) reduce_parts_kernel(
    const float* __restrict__ ws,  // [2, parts, C] partial sums from stage 1
    int64_t parts,                 // workspace middle dim
    int64_t C,                     // channels
    S* __restrict__ grad_shift,    // [C] output, blockIdx.y == 0
    S* __restrict__ grad_scale) {  // [C] output, blockIdx.y == 1
  __shared__ float acc[kReduceLanes][kWarpSize];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpSize + tx;
  const float* src = ws + blockIdx.y * parts * C;
  float sum = 0.f;
  if (c < C) {
    for (int64_t p = ty; p < parts; p += kReduceLanes) sum += src[p * C + c];
  }
  acc[ty][tx] = sum;
  __syncthreads();
  for (int half = kReduceLanes / 2; half > 0; half /= 2) {
    if (ty < half) acc[ty][tx] += acc[ty + half][tx];
    __syncthreads();
  }
  if (ty == 0 && c < C) (blockIdx.y == 0 ? grad_shift : grad_scale)[c] = static_cast<S>(acc[0][tx]);
}

template <typename T, typename S, typename idx_t>
void backward_typed(const Layout& L, const at::Tensor& g, const at::Tensor& x,
                    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& gx,
                    const at::Tensor& grad_scale, const at::Tensor& grad_shift, int act) {
  constexpr int kVec = kPackBytes / sizeof(T);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const T* gp = g.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  T* gxp = gx.mutable_data_ptr<T>();
  const S* scp = scale.const_data_ptr<S>();
  const S* shp = shift.const_data_ptr<S>();
  const Strides<idx_t> xs = strides_of<idx_t>(L, 0);
  const Strides<idx_t> gs = strides_of<idx_t>(L, 1);
  const Strides<idx_t> gxs = strides_of<idx_t>(L, 2);
  const int pack = L.vec ? kVec : 1;
  const uint64_t key = layout_tune_key(kOpBnActBackward, L, x, scale.scalar_type() == at::kFloat);

  at::Tensor ws;
  int64_t parts = 0;
  if (L.path == Path::kRows) {
    // 8-wide (16-bit) packs keep 32 channel accumulators/params per thread; unrolling them
    // 4 deep exceeds the 128-register budget and spills, so that variant goes 2 deep.
    constexpr int kDeep = kVec >= 8 ? 2 : 4;
    using Kernel = decltype(&rows_backward_kernel<T, S, idx_t, 1, 1>);
    const Kernel kernels[2][2] = {
        {rows_backward_kernel<T, S, idx_t, 1, 1>, rows_backward_kernel<T, S, idx_t, 1, 4>},
        {rows_backward_kernel<T, S, idx_t, kVec, 1>, rows_backward_kernel<T, S, idx_t, kVec, kDeep>}};
    const RowsLaunch cfg = rows_launch(L.N * L.H * L.W, L.C, pack, kMinRowsPerThread);
    const RowGeom<idx_t> geom = row_geom<idx_t>(L);
    const size_t smem = sizeof(float) * 2 * pack * cfg.block.x * cfg.block.y;
    parts = cfg.grid.y;
    ws = at::empty({2, parts, L.C}, x.options().dtype(at::kFloat));
    float* wsp = ws.mutable_data_ptr<float>();
    auto launch = [&](int v) {
      kernels[L.vec][v]<<<cfg.grid, cfg.block, smem, stream>>>(
          gp, xp, gxp, scp, shp, geom, gs, xs, gxs, static_cast<int>(L.C), act, wsp, parts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch(pick_variant(key, 2, /*fallback=*/1, launch));
  } else {
    using Kernel = decltype(&planes_backward_kernel<T, S, idx_t, 1, 1, true>);
    const Kernel contiguous[2][2] = {
        {planes_backward_kernel<T, S, idx_t, 1, 1, true>,
         planes_backward_kernel<T, S, idx_t, 1, 4, true>},
        {planes_backward_kernel<T, S, idx_t, kVec, 1, true>,
         planes_backward_kernel<T, S, idx_t, kVec, 4, true>}};
    const Kernel strided = planes_backward_kernel<T, S, idx_t, 1, 4, false>;
    const int64_t len = L.H * L.W / pack;
    const PlanesLaunch cfg = planes_launch(L.N * L.C, len);
    const PlaneGeom<idx_t> geom = plane_geom<idx_t>(L, cfg, len);
    const bool is_strided = L.path == Path::kStrided;
    parts = L.N * cfg.tiles;
    ws = at::empty({2, parts, L.C}, x.options().dtype(at::kFloat));
    float* wsp = ws.mutable_data_ptr<float>();
    auto launch = [&](int v) {
      const Kernel k = is_strided ? strided : contiguous[L.vec][v];
      k<<<cfg.grid, cfg.block, 0, stream>>>(gp, xp, gxp, scp, shp, geom, gs, xs, gxs, act, wsp,
                                            parts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch(pick_variant(key, is_strided ? 1 : 2, /*fallback=*/1, launch));
  }

  const dim3 grid(static_cast<unsigned>(ceil_div(L.C, kWarpSize)), 2);
  reduce_parts_kernel<S><<<grid, dim3(kWarpSize, kReduceLanes), 0, stream>>>(
      ws.const_data_ptr<float>(), parts, L.C, grad_shift.mutable_data_ptr<S>(),
      grad_scale.mutable_data_ptr<S>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_bn_act_backward(const at::Tensor& grad_y, const at::Tensor& x,
                            const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& grad_x, const at::Tensor& grad_scale,
                            const at::Tensor& grad_shift, int act) {
  const Layout L = make_layout({x, grad_y, grad_x});
  dispatch_types(x.scalar_type(), scale.scalar_type(), L.wide_index, [&](auto t, auto s, auto i) {
    backward_typed<decltype(t), decltype(s), decltype(i)>(L, grad_y, x, scale, shift, grad_x,
                                                          grad_scale, grad_shift, act);
  });
}

}  // namespace fastconv
