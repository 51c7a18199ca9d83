// Pieces shared by every elementwise-style kernel family (bn_act, batch_norm, depthwise):
// the launch constants, 16-byte memory packs, per-tensor element strides, the host helpers
// ceil_div and sm_count, and the dtype / index-width dispatch. Nothing here is specific to
// one family; family pieces live in <family>_common.cuh.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

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
// Index geometry and host helpers.

// Element strides of one tensor; size-1 dims have stride 0 (see Layout).
template <typename idx_t>
struct Strides {
  idx_t n, c, h, w;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

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
    default: TORCH_CHECK(false, "dispatch_types: unsupported dtype ", x_type, " (the op's checks refuse it first)");
  }
}

}  // namespace fastconv
