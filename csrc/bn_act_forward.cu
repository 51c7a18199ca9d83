// Forward bn_act kernels: y = act(x * scale[c] + shift[c]), fp32 math, any input strides.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "activations.cuh"
#include "autotune.h"
#include "bn_act.h"
#include "bn_act_common.cuh"

namespace fastconv {
namespace {

// kRows path. Each thread owns VEC consecutive channels (scale/shift kept in registers)
// and walks rows with a grid-sized stride, UNROLL rows in flight at a time.
template <typename T, typename S, typename idx_t, int VEC, int UNROLL>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM) rows_forward_kernel(
    const T* __restrict__ x,      // input, channel stride 1
    T* __restrict__ y,            // output, channel stride 1
    const S* __restrict__ scale,  // [C] per-channel multiplier
    const S* __restrict__ shift,  // [C] per-channel offset
    RowGeom<idx_t> geom,          // row count and row -> (n, h, w) split
    Strides<idx_t> xs,            // x element strides
    Strides<idx_t> ys,            // y element strides
    int C,                        // channels, a multiple of VEC
    int act) {                    // ActivationCode
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;
  float sc[VEC], sh[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    sc[i] = static_cast<float>(scale[c0 + i]);
    sh[i] = static_cast<float>(shift[c0 + i]);
  }
  const idx_t step = static_cast<idx_t>(gridDim.y) * blockDim.y;
  for (idx_t r0 = blockIdx.y * blockDim.y + threadIdx.y; r0 < geom.rows; r0 += step * UNROLL) {
    // All loads first, then all math/stores, so UNROLL independent loads are in flight.
    Pack<T, VEC> xv[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const idx_t r = r0 + u * step;
      if (r < geom.rows) xv[u] = load_pack<VEC>(x + row_offset(geom, xs, r) + c0);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const idx_t r = r0 + u * step;
      if (r >= geom.rows) break;
      float v[VEC];
      unpack(xv[u], v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] = v[i] * sc[i] + sh[i];
      activation_forward(act, v);
      store_pack<VEC>(y + row_offset(geom, ys, r) + c0, v);
    }
  }
}

// kPlanes (CONTIG) and kStrided (!CONTIG, VEC == 1) paths. One warp per (plane, tile)
// task; lanes stride through the tile, UNROLL packs in flight per lane.
template <typename T, typename S, typename idx_t, int VEC, int UNROLL, bool CONTIG>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM) planes_forward_kernel(
    const T* __restrict__ x,      // input
    T* __restrict__ y,            // output
    const S* __restrict__ scale,  // [C] per-channel multiplier
    const S* __restrict__ shift,  // [C] per-channel offset
    PlaneGeom<idx_t> geom,        // plane tiling, see PlaneGeom
    Strides<idx_t> xs,            // x element strides
    Strides<idx_t> ys,            // y element strides
    int act) {                    // ActivationCode
  const int lane = threadIdx.x % kWarpSize;
  const idx_t warp = (static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const idx_t num_warps = static_cast<idx_t>(gridDim.x) * blockDim.x / kWarpSize;
  for (idx_t task = warp; task < geom.tasks; task += num_warps) {
    const PlaneTask<idx_t> t = plane_task(geom, task);
    const float sc = static_cast<float>(scale[t.c]);
    const float sh = static_cast<float>(shift[t.c]);
    const T* xp = x + t.n * xs.n + t.c * xs.c;
    T* yp = y + t.n * ys.n + t.c * ys.c;
    for (idx_t k0 = t.begin + lane; k0 < t.end; k0 += kWarpSize * UNROLL) {
      Pack<T, VEC> xv[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const idx_t k = k0 + u * kWarpSize;
        if (k < t.end) xv[u] = load_pack<VEC>(xp + plane_offset<CONTIG, VEC>(geom, xs, k));
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const idx_t k = k0 + u * kWarpSize;
        if (k >= t.end) break;
        float v[VEC];
        unpack(xv[u], v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] = v[i] * sc + sh;
        activation_forward(act, v);
        store_pack<VEC>(yp + plane_offset<CONTIG, VEC>(geom, ys, k), v);
      }
    }
  }
}

template <typename T, typename S, typename idx_t>
void forward_typed(const Layout& L, const at::Tensor& x, const at::Tensor& scale,
                   const at::Tensor& shift, const at::Tensor& y, int act) {
  constexpr int kVec = kPackBytes / sizeof(T);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const S* scp = scale.const_data_ptr<S>();
  const S* shp = shift.const_data_ptr<S>();
  const Strides<idx_t> xs = strides_of<idx_t>(L, 0);
  const Strides<idx_t> ys = strides_of<idx_t>(L, 1);
  const int pack = L.vec ? kVec : 1;
  const uint64_t key = layout_tune_key(kOpBnActForward, L, x, scale.scalar_type() == at::kFloat);

  // Variant v of each path = unroll depth {1, 4}; the pack width is fixed by alignment.
  if (L.path == Path::kRows) {
    using Kernel = decltype(&rows_forward_kernel<T, S, idx_t, 1, 1>);
    const Kernel kernels[2][2] = {
        {rows_forward_kernel<T, S, idx_t, 1, 1>, rows_forward_kernel<T, S, idx_t, 1, 4>},
        {rows_forward_kernel<T, S, idx_t, kVec, 1>, rows_forward_kernel<T, S, idx_t, kVec, 4>}};
    const RowsLaunch cfg = rows_launch(L.N * L.H * L.W, L.C, pack, /*min_rows_per_thread=*/1);
    const RowGeom<idx_t> geom = row_geom<idx_t>(L);
    auto launch = [&](int v) {
      kernels[L.vec][v]<<<cfg.grid, cfg.block, 0, stream>>>(xp, yp, scp, shp, geom, xs, ys,
                                                             static_cast<int>(L.C), act);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch(pick_variant(key, 2, /*fallback=*/1, launch));
    return;
  }

  using Kernel = decltype(&planes_forward_kernel<T, S, idx_t, 1, 1, true>);
  const Kernel contiguous[2][2] = {
      {planes_forward_kernel<T, S, idx_t, 1, 1, true>, planes_forward_kernel<T, S, idx_t, 1, 4, true>},
      {planes_forward_kernel<T, S, idx_t, kVec, 1, true>,
       planes_forward_kernel<T, S, idx_t, kVec, 4, true>}};
  // The strided fallback is for odd layouts; one variant keeps the build small.
  const Kernel strided = planes_forward_kernel<T, S, idx_t, 1, 4, false>;
  const int64_t len = L.H * L.W / pack;
  const PlanesLaunch cfg = planes_launch(L.N * L.C, len);
  const PlaneGeom<idx_t> geom = plane_geom<idx_t>(L, cfg, len);
  const bool is_strided = L.path == Path::kStrided;
  auto launch = [&](int v) {
    const Kernel k = is_strided ? strided : contiguous[L.vec][v];
    k<<<cfg.grid, cfg.block, 0, stream>>>(xp, yp, scp, shp, geom, xs, ys, act);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  launch(pick_variant(key, is_strided ? 1 : 2, /*fallback=*/1, launch));
}

}  // namespace

void launch_bn_act_forward(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& y, int act) {
  const Layout L = make_layout({x, y});
  dispatch_types(x.scalar_type(), scale.scalar_type(), L.wide_index, [&](auto t, auto s, auto i) {
    forward_typed<decltype(t), decltype(s), decltype(i)>(L, x, scale, shift, y, act);
  });
}

}  // namespace fastconv
