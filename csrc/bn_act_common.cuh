// Pieces shared by the bn_act kernels and the training BatchNorm's (batch_norm.cuh), which
// walk tensors the same two ways (layout.h's kRows and kPlanes / kStrided paths): the row
// and plane geometry and their launch shapes. The generic pieces are in common.cuh.
#pragma once

#include <algorithm>
#include <cstdint>

#include "autotune.h"
#include "common.cuh"
#include "layout.h"
#include "shared_memory.cuh"

namespace fastconv {

// ---------------------------------------------------------------------------------------
// Index geometry (kernel arguments, passed by value).

// kRows path: a row is one (n, h, w) position holding C contiguous channels.
template <typename idx_t>
struct RowGeom {
  idx_t rows;    // N * H * W
  idx_t H, W;    // to split a row index into (n, h, w) when !uniform
  bool uniform;  // rows evenly spaced in every tensor: offset = row * strides.w
};

template <typename idx_t>
__device__ __forceinline__ idx_t row_offset(const RowGeom<idx_t>& g, const Strides<idx_t>& s,
                                            idx_t row) {
  if (g.uniform) return row * s.w;
  const idx_t w = row % g.W;
  const idx_t nh = row / g.W;
  return (nh / g.H) * s.n + (nh % g.H) * s.h + w * s.w;
}

// kPlanes / kStrided paths: each (n, c) plane of H*W elements is cut into `tiles` runs;
// one warp handles one (plane, tile) task at a time.
template <typename idx_t>
struct PlaneGeom {
  idx_t tasks;     // planes * tiles
  idx_t tiles;     // runs per plane (chosen so that there are enough warps of work)
  idx_t tile_len;  // packs per run (the last run of a plane may be shorter)
  idx_t len;       // packs per plane
  idx_t W;         // kStrided only: splits an in-plane index into (h, w)
  int C;           // channels, to split a plane index into (n, c)
};

template <typename idx_t>
struct PlaneTask {
  idx_t n, tile, begin, end;  // [begin, end) packs of plane (n, c), run number `tile`
  int c;
};

template <typename idx_t>
__device__ __forceinline__ PlaneTask<idx_t> plane_task(const PlaneGeom<idx_t>& g, idx_t task) {
  PlaneTask<idx_t> t;
  const idx_t plane = task / g.tiles;
  t.tile = task - plane * g.tiles;
  t.n = plane / g.C;
  t.c = static_cast<int>(plane - t.n * g.C);
  t.begin = t.tile * g.tile_len;
  t.end = t.begin + g.tile_len < g.len ? t.begin + g.tile_len : g.len;
  return t;
}

// Offset of pack k inside a plane: contiguous planes are a flat run, strided ones need
// the (h, w) split.
template <bool CONTIG, int VEC, typename idx_t>
__device__ __forceinline__ idx_t plane_offset(const PlaneGeom<idx_t>& g, const Strides<idx_t>& s,
                                              idx_t k) {
  if (CONTIG) return k * VEC;
  return (k / g.W) * s.h + (k % g.W) * s.w;
}

// ---------------------------------------------------------------------------------------
// Loads of the kernels that read two tensors (grad_y and x) per element: UNROLL packs of
// each in flight, the raw packs kept for conversion at use.

// kRows: packs of rows r0 + u * step (those < geom.rows), channels c0..c0+VEC-1.
template <int VEC, int UNROLL, typename T, typename idx_t>
__device__ __forceinline__ void load_row_pairs(const RowGeom<idx_t>& geom, idx_t r0, idx_t step,
                                               int c0, const T* g, const Strides<idx_t>& gs,
                                               Pack<T, VEC> (&gpk)[UNROLL], const T* x,
                                               const Strides<idx_t>& xs,
                                               Pack<T, VEC> (&xpk)[UNROLL]) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const idx_t r = r0 + u * step;
    if (r < geom.rows) {
      gpk[u] = load_pack<VEC>(g + row_offset(geom, gs, r) + c0);
      xpk[u] = load_pack<VEC>(x + row_offset(geom, xs, r) + c0);
    }
  }
}

// kPlanes / kStrided: packs k0 + u * kWarpSize (those < end) of one plane of g and of x.
template <bool CONTIG, int VEC, int UNROLL, typename T, typename idx_t>
__device__ __forceinline__ void load_plane_pairs(const PlaneGeom<idx_t>& geom, idx_t k0,
                                                 idx_t end, const T* gp, const Strides<idx_t>& gs,
                                                 Pack<T, VEC> (&gpk)[UNROLL], const T* xp,
                                                 const Strides<idx_t>& xs,
                                                 Pack<T, VEC> (&xpk)[UNROLL]) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const idx_t k = k0 + u * kWarpSize;
    if (k < end) {
      gpk[u] = load_pack<VEC>(gp + plane_offset<CONTIG, VEC>(geom, gs, k));
      xpk[u] = load_pack<VEC>(xp + plane_offset<CONTIG, VEC>(geom, xs, k));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Endings of the stage-1 kernels that reduce two sums per channel (bn_act's backward,
// batch_norm's gradient sums) into a [2, parts, C] float32 workspace. Fixed-shape trees, so
// the sums are deterministic and independent of the tuning variant.

// kRows: sums a[i], b[i] of channels c0..c0+VEC-1 over threadIdx.y (a power of two) by a
// tree in dynamic shared memory ([2 * VEC][blockDim.y][blockDim.x] floats); block row
// blockIdx.y writes part blockIdx.y. Every thread of the block calls it, inactive ones
// (c0 >= C) with zeros.
template <int VEC>
__device__ __forceinline__ void rows_sums_to_parts(const float (&a)[VEC], const float (&b)[VEC],
                                                   float* __restrict__ ws, int64_t parts, int C,
                                                   int c0, bool active) {
  FASTCONV_DYNAMIC_SHARED(float, smem);
  const int tx = threadIdx.x, ty = threadIdx.y, nx = blockDim.x, ny = blockDim.y;
  auto slot = [&](int k, int row) -> float& { return smem[(k * ny + row) * nx + tx]; };
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    slot(i, ty) = a[i];
    slot(VEC + i, ty) = b[i];
  }
  __syncthreads();
  for (int half = ny / 2; half > 0; half /= 2) {
    if (ty < half) {
#pragma unroll
      for (int k = 0; k < 2 * VEC; ++k) slot(k, ty) += slot(k, ty + half);
    }
    __syncthreads();
  }
  if (ty == 0 && active) {
    float* part_a = ws + static_cast<int64_t>(blockIdx.y) * C;
    float* part_b = ws + (parts + blockIdx.y) * C;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      part_a[c0 + i] = slot(i, 0);
      part_b[c0 + i] = slot(VEC + i, 0);
    }
  }
}

// kPlanes / kStrided: sums a and b over the warp by a shuffle tree; lane 0 writes part
// n * tiles + tile of the warp's task.
template <typename idx_t>
__device__ __forceinline__ void warp_sums_to_parts(float a, float b, const PlaneGeom<idx_t>& geom,
                                                   const PlaneTask<idx_t>& t, int lane,
                                                   float* __restrict__ ws, int64_t parts) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
  }
  if (lane == 0) {
    const int64_t part = static_cast<int64_t>(t.n) * geom.tiles + t.tile;
    ws[part * geom.C + t.c] = a;
    ws[(parts + part) * geom.C + t.c] = b;
  }
}

// ---------------------------------------------------------------------------------------
// Host side: geometry from a Layout and launch shapes.

template <typename idx_t>
Strides<idx_t> strides_of(const Layout& L, int tensor) {
  const auto& s = L.strides[tensor];
  return {static_cast<idx_t>(s[0]), static_cast<idx_t>(s[1]), static_cast<idx_t>(s[2]),
          static_cast<idx_t>(s[3])};
}

template <typename idx_t>
RowGeom<idx_t> row_geom(const Layout& L) {
  return {static_cast<idx_t>(L.N * L.H * L.W), static_cast<idx_t>(L.H),
          static_cast<idx_t>(L.W), L.uniform_rows};
}

struct RowsLaunch {
  dim3 grid, block;
};

// Threads along channels (one pack each), rows spread over blockDim.y and the grid.
// blockDim.y is a power of two so the backward's in-block tree reduction is simple.
// The grid is at most one wave of resident blocks: the grid-stride loop then reuses each
// thread's per-channel scale/shift registers over many rows. `min_rows_per_thread` bounds
// the grid further (backward: fewer blocks = smaller partial-sum workspace).
inline RowsLaunch rows_launch(int64_t rows, int64_t C, int pack, int64_t min_rows_per_thread) {
  const int64_t packs = C / pack;
  const int64_t col_blocks = ceil_div(packs, kBlockThreads);
  const int tx = static_cast<int>(ceil_div(packs, col_blocks));
  int ty = 1;
  while (ty * 2 * tx <= kBlockThreads) ty *= 2;
  const int64_t wave = int64_t{sm_count()} * (2048 / (tx * ty));
  int64_t gy = ceil_div(rows, ty * min_rows_per_thread);
  gy = std::min<int64_t>({gy, std::max<int64_t>(1, wave / col_blocks), 65535});
  return {dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(std::max<int64_t>(gy, 1))),
          dim3(tx, ty)};
}

struct PlanesLaunch {
  int64_t tiles, tile_len, tasks;
  dim3 grid, block;
};

// One warp per (plane, tile) task. Planes are split into tiles only when there are too
// few planes to occupy every warp slot of the GPU, and never below one pack per lane.
inline PlanesLaunch planes_launch(int64_t planes, int64_t len) {
  const int64_t warp_slots = int64_t{sm_count()} * 64;
  const int64_t max_tiles = std::max<int64_t>(1, ceil_div(len, kWarpSize));
  const int64_t tiles = std::min(max_tiles, std::max<int64_t>(1, ceil_div(warp_slots, planes)));
  PlanesLaunch cfg;
  cfg.tiles = tiles;
  cfg.tile_len = ceil_div(len, tiles);
  cfg.tasks = planes * tiles;
  const int64_t blocks = std::min<int64_t>(ceil_div(cfg.tasks, kWarpsPerBlock),
                                           int64_t{sm_count()} * (2048 / kBlockThreads));
  cfg.grid = dim3(static_cast<unsigned>(blocks));
  cfg.block = dim3(kBlockThreads);
  return cfg;
}

template <typename idx_t>
PlaneGeom<idx_t> plane_geom(const Layout& L, const PlanesLaunch& cfg, int64_t len) {
  return {static_cast<idx_t>(cfg.tasks), static_cast<idx_t>(cfg.tiles),
          static_cast<idx_t>(cfg.tile_len), static_cast<idx_t>(len), static_cast<idx_t>(L.W),
          static_cast<int>(L.C)};
}

// Tuning key of a bn_act / batch_norm launch: the layout's path, width and alignment, and
// the size classes of the tensor and of its inner run (channels on kRows, H*W otherwise).
inline uint64_t layout_tune_key(int op, const Layout& L, const at::Tensor& x,
                                bool scale_is_float) {
  const int64_t inner = L.path == Path::kRows ? L.C : L.H * L.W;
  return tune_key(x.get_device(), op, static_cast<int>(L.path), static_cast<int>(x.scalar_type()),
                  scale_is_float, L.wide_index, L.vec, x.numel(), inner);
}

}  // namespace fastconv
