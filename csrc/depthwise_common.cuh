// Pieces shared by the depthwise kernel families: geometry and epilogue kernel arguments,
// runtime-typed per-channel parameter loads, and host helpers to build them.
//
// Accumulation order (so that every tuning variant of a family is bit-identical):
//   rows / direct kernels: acc = 0; for a (rows, ascending): skip rows outside the input;
//     for b (ascending): acc = fmaf(x or 0, w[a, b], acc)   (padding columns add 0 * w)
//   planes kernels: acc = 0; for b: for a: acc = fmaf(x or 0, w[a, b], acc)
// Variants of one family differ only in how many outputs a thread computes at once.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "activations.cuh"
#include "autotune.h"
#include "common.cuh"
#include "depthwise.h"
#include "layout.h"
#include "shared_memory.cuh"

namespace fastconv {
namespace dw {

// Geometry of one correlation in -> out (see DwConv). All values fit in int32: the op
// checks sizes, strides, paddings and dilations against kMaxNarrowIndex.
struct ConvGeom {
  int N, Cin, Hi, Wi;   // input
  int Cout, Ho, Wo;     // output (N shared)
  int m;                // Cout / Cin
  int KH, KW, sh, sw, pt, pl, dh, dw;
  int flip;             // 1: tap t reads weight tap KH*KW-1-t
};

// Per-channel parameter pointers; kind says how to read each one.
enum ParamKind : int { kParamAbsent = 0, kParamFloat = 1, kParamSame = 2 };

struct Epilogue {
  const void* bias;
  const void* scale;
  const void* shift;
  int bias_kind, scale_kind, shift_kind;
  int act;
};

template <typename T>
__device__ __forceinline__ float load_param(const void* p, int kind, int64_t i, float absent) {
  if (kind == kParamFloat) return static_cast<const float*>(p)[i];
  if (kind == kParamSame) return static_cast<float>(static_cast<const T*>(p)[i]);
  return absent;
}

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> zero_pack() {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = static_cast<T>(0.f);
  return pk;
}

// Dynamic shared memory of every depthwise kernel (one declaration, 16-byte aligned).
__device__ __forceinline__ float* dyn_smem() {
  FASTCONV_DYNAMIC_SHARED(float4, dw_dyn_smem);
  return reinterpret_cast<float*>(dw_dyn_smem);
}

// Default dynamic shared memory limit without opting in per kernel.
constexpr size_t kMaxDynSmem = 48 * 1024;

// ---------------------------------------------------------------------------------------
// Host side.

inline ConvGeom make_geom(const DwConv& p) {
  ConvGeom g;
  g.N = static_cast<int>(p.in.size(0));
  g.Cin = static_cast<int>(p.in.size(1));
  g.Hi = static_cast<int>(p.in.size(2));
  g.Wi = static_cast<int>(p.in.size(3));
  g.Cout = static_cast<int>(p.out.size(1));
  g.Ho = static_cast<int>(p.out.size(2));
  g.Wo = static_cast<int>(p.out.size(3));
  g.m = g.Cout / g.Cin;
  g.KH = static_cast<int>(p.KH);
  g.KW = static_cast<int>(p.KW);
  g.sh = static_cast<int>(p.sh);
  g.sw = static_cast<int>(p.sw);
  g.pt = static_cast<int>(p.pt);
  g.pl = static_cast<int>(p.pl);
  g.dh = static_cast<int>(p.dh);
  g.dw = static_cast<int>(p.dw);
  g.flip = p.flip ? 1 : 0;
  return g;
}

inline int param_kind(const at::Tensor& t) {
  if (!t.defined()) return kParamAbsent;
  return t.scalar_type() == at::kFloat ? kParamFloat : kParamSame;
}

// For kParamSame the pointer is read as T (x's dtype); a float32 tensor with x float32 is
// read as float either way.
inline Epilogue make_epilogue(const DwConv& p) {
  Epilogue e;
  e.bias = p.bias.defined() ? p.bias.const_data_ptr() : nullptr;
  e.scale = p.scale.defined() ? p.scale.const_data_ptr() : nullptr;
  e.shift = p.shift.defined() ? p.shift.const_data_ptr() : nullptr;
  e.bias_kind = param_kind(p.bias);
  e.scale_kind = param_kind(p.scale);
  e.shift_kind = param_kind(p.shift);
  e.act = p.act;
  return e;
}

// Largest element offset reachable in t, plus one (strides are non-negative).
inline int64_t index_span(const at::Tensor& t) {
  int64_t span = 1;
  for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * t.stride(d);
  return span;
}

// True when some tensor needs 64-bit element indexing (same rule as layout.h).
inline bool needs_wide_index(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t->numel() > kMaxNarrowIndex || index_span(*t) > kMaxNarrowIndex) return true;
  }
  return false;
}

// Element strides of a 4-D tensor; size-1 dims get 0 (their index is always 0, and an
// arbitrary stride there must not reach the narrow index type).
template <typename idx_t>
Strides<idx_t> strides4(const at::Tensor& t) {
  auto s = [&](int d) { return static_cast<idx_t>(t.size(d) == 1 ? 0 : t.stride(d)); };
  return {s(0), s(1), s(2), s(3)};
}

// The stride class of a correlation for the tuning key: (min(sw, 3), min(sh, 3)) in 4 bits.
inline int dw_stride_code(const DwConv& p) {
  return static_cast<int>(std::min<int64_t>(p.sw, 3) * 4 + std::min<int64_t>(p.sh, 3));
}

// Compact code of a template specialisation choice, mixed into the tuning key.
inline uint64_t dw_tune_key(const at::Tensor& ref, int op, int path, int64_t numel,
                            int64_t inner, int kernel_code, int stride_code) {
  const uint64_t base = tune_key(ref.get_device(), op, path, static_cast<int>(ref.scalar_type()),
                                 /*scale_is_float=*/false, /*wide_index=*/false, /*vec=*/true,
                                 numel, inner);
  // tune_key uses the low 39 bits.
  return base | (static_cast<uint64_t>(kernel_code & 0xff) << 40) |
         (static_cast<uint64_t>(stride_code & 0xff) << 48);
}

// Calls f(T{}, idx_t{}) with T the element type and idx_t int32_t or int64_t.
template <typename F>
void dispatch_dtype_index(at::ScalarType type, bool wide, F&& f) {
  // dispatch_types also walks a scale dtype; depthwise reads its parameters through
  // runtime kinds, so only the S == T branch is taken (scale_type == type).
  dispatch_types(type, type, wide, [&](auto t, auto s, auto i) {
    if constexpr (std::is_same_v<decltype(t), decltype(s)>) f(t, i);
  });
}

}  // namespace dw
}  // namespace fastconv
