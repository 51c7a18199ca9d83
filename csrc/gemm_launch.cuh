// Host side of the tensor-core GEMM core (gemm_common.cuh), shared by pointwise.cu and
// conv_bn_act.cu: argument checks common to both ops, the tile variants, and their launch.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "autotune.h"
#include "checks.h"
#include "gemm_common.cuh"
#include "layout.h"

namespace fastconv {
namespace gemm {

// M, K and N are ints in the kernels; tile starts may run one tile past them.
constexpr int64_t kMaxGemmDim = std::numeric_limits<int32_t>::max() - 1024;

// The tile variants, timed per shape class on first use (see autotune.h):
//   0  128x128, 8 warps of 64x32: big M and N (ResNet / EfficientNet expansions)
//   1  128x64,  4 warps of 64x32: big M, N around 64
//   2  64x64,   4 warps of 32x32, 64-deep K: skinny M (7x7 maps) with long K
//   3  64x32,   4 warps of 32x16, 64-deep K: skinny M and small N, more CTAs to fill the SMs
//   4  128x32,  4 warps of 32x32, 16-deep K: huge M with K of 16 and small N (stem layers)
// K depths are for 16-bit operands; fp32 stages are half as deep (same bytes of smem).
// Every variant's shared memory is under the 48 KiB static limit (largest: 40 KiB).
using Cfg0 = TileCfg<128, 128, 32, 2, 4>;
using Cfg1 = TileCfg<128, 64, 32, 2, 2>;
using Cfg2 = TileCfg<64, 64, 64, 2, 2>;
using Cfg3 = TileCfg<64, 32, 64, 2, 2>;
using Cfg4 = TileCfg<128, 32, 16, 4, 1>;
constexpr int kNumVariants = 5;

// A first guess, used while a CUDA graph is being captured (no timing possible).
inline int default_variant(int64_t M, int64_t N) {
  if (M <= 8192) return N <= 32 ? 3 : 2;
  if (N <= 32) return 4;
  return N <= 64 ? 1 : 0;
}

inline bool is_mma_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat;
}

// x's dtype must run on the tensor cores: fp16 / bf16, or fp32 as tf32 when allowed.
inline void check_mma_dtype(const char* op, const at::Tensor& x, bool allow_tf32) {
  FC_CHECK(is_mma_dtype(x.scalar_type()), op, "x",
           "float16, bfloat16, or float32 with allow_tf32 (the tensor-core kernels have no "
           "float64 path; the triton and torch backends do)",
           x.scalar_type());
  FC_CHECK(x.scalar_type() != at::kFloat || allow_tf32, op, "x",
           "float16 or bfloat16 when allow_tf32 is false (float32 runs only as tf32 on the "
           "tensor cores; exact float32 is served by the triton and torch backends)",
           x.scalar_type());
}

// Contiguous copy of an optional vector (C values) and its kernel view. `keep` owns it.
inline ChannelVec channel_vec(const std::optional<at::Tensor>& t, at::Tensor& keep) {
  if (!t.has_value() || !t->defined()) return {nullptr, kVecAbsent};
  keep = t->contiguous();
  return {keep.const_data_ptr(), keep.scalar_type() == at::kFloat ? kVecFloat : kVecSame};
}

inline bool aligned16(const void* p) { return is_aligned(p, 16); }

// Element strides of (n, h, w) with size-1 dims zeroed (their index is always 0, so their
// stride must not spoil the alignment tests).
inline std::array<int64_t, 3> pixel_strides(const at::Tensor& t) {
  auto s = [&](int d) { return t.size(d) == 1 ? int64_t{0} : t.stride(d); };
  return {s(0), s(2), s(3)};
}

// Output-side fields of GemmArgs: out (and residual) strides and the paired-store test.
inline void set_output(GemmArgs& g, const at::Tensor& out, int64_t channels_per_group) {
  const auto ps = pixel_strides(out);
  g.out = out.data_ptr();
  g.o_sn = ps[0];
  g.o_sc = out.stride(1);
  g.o_sh = ps[1];
  g.o_sw = ps[2];
  g.Ho = static_cast<int>(out.size(2));
  g.Wo = static_cast<int>(out.size(3));
  // Two neighbouring channels as one store: channel stride 1, every pair start even.
  const int64_t pair_bytes = 2 * out.element_size();
  g.pair_store = out.stride(1) == 1 && channels_per_group % 2 == 0 &&
                 reinterpret_cast<uintptr_t>(out.data_ptr()) % pair_bytes == 0 &&
                 ps[0] % 2 == 0 && ps[1] % 2 == 0 && ps[2] % 2 == 0;
}

// Residual-side fields of GemmArgs: the residual's pointer and strides (it has out's shape).
inline void set_residual(GemmArgs& g, const at::Tensor& residual) {
  const auto rs = pixel_strides(residual);
  g.residual = residual.const_data_ptr();
  g.r_sn = rs[0];
  g.r_sc = residual.stride(1);
  g.r_sh = rs[1];
  g.r_sw = rs[2];
}

// Launches variant `v` of gemm_kernel<T, ., A, VEC> over `groups` groups.
template <typename T, class A, bool VEC, class Cfg>
void launch_cfg(const typename A::Params& ap, GemmArgs g, int groups, cudaStream_t stream) {
  g.blocks_m = static_cast<int>((g.M + Cfg::BM - 1) / Cfg::BM);
  g.blocks_n = static_cast<int>((g.N + Cfg::BN - 1) / Cfg::BN);
  const dim3 grid(static_cast<unsigned>(g.blocks_m) * static_cast<unsigned>(g.blocks_n),
                  static_cast<unsigned>(groups));
  gemm_kernel<T, Cfg, A, VEC><<<grid, Cfg::kThreads, 0, stream>>>(ap, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, class A, bool VEC>
void launch_variant(int v, const typename A::Params& ap, const GemmArgs& g, int groups,
                    cudaStream_t stream) {
  switch (v) {
    case 0: launch_cfg<T, A, VEC, Cfg0>(ap, g, groups, stream); break;
    case 1: launch_cfg<T, A, VEC, Cfg1>(ap, g, groups, stream); break;
    case 2: launch_cfg<T, A, VEC, Cfg2>(ap, g, groups, stream); break;
    case 3: launch_cfg<T, A, VEC, Cfg3>(ap, g, groups, stream); break;
    default: launch_cfg<T, A, VEC, Cfg4>(ap, g, groups, stream); break;
  }
}

// The grid is (tiles, groups): tiles on x (2^31 - 1 cap), groups on y (65535 cap). The
// smallest tile (64 x 32) gives the most tiles.
inline bool grid_fits(int64_t M, int64_t N) {
  return ((M + 63) / 64) * ((N + 31) / 32) <= std::numeric_limits<int32_t>::max();
}

// Cache key of one GEMM shape class: op, dtype, load path, prologue, and the power-of-two
// buckets of M, N, K and the group count.
inline uint64_t gemm_tune_key(const at::Tensor& x, int op, bool vec, bool prologue, int64_t M,
                              int64_t N, int64_t K, int64_t groups) {
  const uint64_t base = tune_key(x.get_device(), op, /*path=*/vec ? 1 : 0,
                                 static_cast<int>(x.scalar_type()), prologue,
                                 /*wide_index=*/false, vec, M, N);
  // tune_key uses the low 39 bits.
  return base | (static_cast<uint64_t>(log2_bucket(K)) << 40) |
         (static_cast<uint64_t>(log2_bucket(groups)) << 48);
}

// Calls f(T{}) for x's dtype (one of is_mma_dtype).
template <typename F>
void dispatch_mma_dtype(at::ScalarType t, F&& f) {
  if (t == at::kHalf) {
    f(c10::Half{});
  } else if (t == at::kBFloat16) {
    f(c10::BFloat16{});
  } else {
    f(float{});
  }
}

}  // namespace gemm
}  // namespace fastconv
