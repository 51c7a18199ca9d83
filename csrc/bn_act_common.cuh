// Pieces shared by the bn_act forward and backward kernels: memory packs, index
// geometry, launch shapes and the dtype / index-width dispatch.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "layout.h"

namespace fastconv {

constexpr int kBlockThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kBlockThreads / kWarpSize;
// Occupancy floor given to ptxas (__launch_bounds__): caps registers at 128/thread, so at
// least 16 warps per SM keep loads in flight. Without it ptxas picked 64 registers for
// some variants and spilled.
constexpr int kMinBlocksPerSM = 2;

// ---------------------------------------------------------------------------------------
// Memory packs: N elements moved as one aligned access. Loads return the raw pack and
// conversion to fp32 happens at use, so UNROLL packs of 16-bit data in flight cost half
// the registers of converted floats.

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void unpack(const Pack<T, N>& pk, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<float>(pk.v[i]);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// ---------------------------------------------------------------------------------------
// Index geometry (kernel arguments, passed by value).

// Element strides of one tensor; size-1 dims have stride 0 (see Layout).
template <typename idx_t>
struct Strides {
  idx_t n, c, h, w;
};

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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

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

// Calls f(T{}, S{}, idx_t{}) with T the element type of x, S that of scale/shift (T or
// float) and idx_t int32_t or int64_t.
template <typename F>
void dispatch_types(at::ScalarType x_type, at::ScalarType scale_type, bool wide_index, F&& f) {
  auto with_x = [&](auto t_tag) {
    using T = decltype(t_tag);
    auto with_scale = [&](auto s_tag) {
      if (wide_index) {
        f(t_tag, s_tag, int64_t{0});
      } else {
        f(t_tag, s_tag, int32_t{0});
      }
    };
    if (scale_type == at::kFloat) {
      with_scale(float{});
    } else {
      with_scale(T{});
    }
  };
  switch (x_type) {
    case at::kFloat: with_x(float{}); break;
    case at::kHalf: with_x(c10::Half{}); break;
    case at::kBFloat16: with_x(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "bn_act: unsupported dtype ", x_type);
  }
}

}  // namespace fastconv
