// fastconv_cuda::bn_act_avg_pool: out = avg_pool2d(act(x * scale[c] + shift[c]), 2), stride 2,
// floor (an odd last row or column is dropped): DenseNet's transition, BatchNorm -> ReLU ->
// 2x2 average pool, in one pass before its 1x1 conv, which then runs on a quarter of the pixels
// (fastconv/ops/bn_act_pool.py counts what it saves).
//
// Memory-bound: it reads x once and writes a quarter of it. One thread per output element,
// the threads' order following out's memory order (channels fastest when out's channels are
// innermost, the columns fastest otherwise), so that both the four tap loads of a warp and its
// store are coalesced on channels_last and NCHW alike; any other strides are read as given.
// Affine, activation and the average in fp32, rounded once. ptxas (sm_90, offline): 25 to 31
// registers, no spills.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "activations.cuh"
#include "checks.h"
#include "common.cuh"

namespace fastconv {
namespace {

constexpr const char* kOp = "fastconv_cuda::bn_act_avg_pool";
constexpr int kThreads = 256;

template <typename idx_t>
struct PoolGeom {
  idx_t total;         // N * C * HO * WO output elements
  idx_t C, HO, WO;
  bool channels_fast;  // thread order (n, ho, wo, c) when true, (n, c, ho, wo) otherwise
  idx_t xn, xc, xh, xw;  // x element strides
  idx_t on, oc, oh, ow;  // out element strides
};

template <typename T, typename S, typename idx_t>
__global__ void __launch_bounds__(kThreads) bn_act_avg_pool_kernel(const T* __restrict__ x,
                                                                   const S* __restrict__ scale,
                                                                   const S* __restrict__ shift,
                                                                   T* __restrict__ out,
                                                                   PoolGeom<idx_t> g, int act) {
  const idx_t step = static_cast<idx_t>(gridDim.x) * blockDim.x;
  for (idx_t i = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < g.total; i += step) {
    idx_t n, c, ho, wo, rest;
    if (g.channels_fast) {
      c = i % g.C;
      rest = i / g.C;
      wo = rest % g.WO;
      rest /= g.WO;
      ho = rest % g.HO;
      n = rest / g.HO;
    } else {
      wo = i % g.WO;
      rest = i / g.WO;
      ho = rest % g.HO;
      rest /= g.HO;
      c = rest % g.C;
      n = rest / g.C;
    }
    const float sc = static_cast<float>(scale[c]);
    const float sh = static_cast<float>(shift[c]);
    const T* corner = x + n * g.xn + c * g.xc + (2 * ho) * g.xh + (2 * wo) * g.xw;
    float v[4] = {static_cast<float>(corner[0]), static_cast<float>(corner[g.xw]),
                  static_cast<float>(corner[g.xh]), static_cast<float>(corner[g.xh + g.xw])};
#pragma unroll
    for (int t = 0; t < 4; ++t) v[t] = v[t] * sc + sh;
    activation_forward(act, v);
    out[n * g.on + c * g.oc + ho * g.oh + wo * g.ow] =
        static_cast<T>(((v[0] + v[1]) + (v[2] + v[3])) * 0.25f);
  }
}

// x is 4-D float/half/bf16 of at least 2x2; scale and shift [C] in one dtype, x's or float32;
// out (N, C, H / 2, W / 2) in x's dtype on x's device, its elements distinct and not x's.
void check_pool(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                int64_t activation, const at::Tensor& out) {
  check_input(kOp, x, "x", 4);
  FC_CHECK(is_supported_dtype(x.scalar_type()), kOp, "x", "float32, float16 or bfloat16",
           x.scalar_type());
  FC_CHECK(x.size(2) >= 2 && x.size(3) >= 2, kOp, "x", "at least 2x2 for a 2x2 pool",
           c10::str("shape ", x.sizes()));
  const std::string channels = c10::str("C = x.size(1) = ", x.size(1));
  check_channel_vector(kOp, scale, "scale", x, x.size(1), channels, /*allow_float=*/true);
  check_channel_vector(kOp, shift, "shift", x, x.size(1), channels, /*allow_float=*/true);
  FC_CHECK(shift.scalar_type() == scale.scalar_type(), kOp, "shift",
           c10::str("scale's dtype (", scale.scalar_type(), ")"), shift.scalar_type());
  check_activation(kOp, "activation", activation);
  FC_CHECK_SAME_DEVICE(kOp, out, "out", x, "x");
  FC_CHECK(out.scalar_type() == x.scalar_type(), kOp, "out",
           c10::str("x's dtype (", x.scalar_type(), ")"), out.scalar_type());
  FC_CHECK(out.dim() == 4 && out.size(0) == x.size(0) && out.size(1) == x.size(1) &&
               out.size(2) == x.size(2) / 2 && out.size(3) == x.size(3) / 2,
           kOp, "out",
           c10::str("of shape (", x.size(0), ", ", x.size(1), ", ", x.size(2) / 2, ", ",
                    x.size(3) / 2, ")"),
           c10::str("shape ", out.sizes()));
  FC_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, kOp, "out",
           "a tensor whose elements do not overlap one another", c10::str("strides ", out.strides()));
  // Meta tensors have no memory to overlap (their storages all read as aliases): checked on CUDA.
  FC_CHECK(x.is_meta() || !may_share_elements(out, x), kOp, "out",
           "a tensor that does not overlap x", "one that does");
}

void bn_act_avg_pool_meta(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                          int64_t activation, const at::Tensor& out) {
  check_pool(x, scale, shift, activation, out);
}

void bn_act_avg_pool(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                     int64_t activation, const at::Tensor& out) {
  check_pool(x, scale, shift, activation, out);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor sc = scale.contiguous(), sh = shift.contiguous();
  // 64-bit offsets when any element offset of x or out could pass 2^31 - 1.
  auto extent = [](const at::Tensor& t) {
    int64_t e = 0;
    for (int d = 0; d < t.dim(); ++d) e += (t.size(d) - 1) * t.stride(d);
    return e;
  };
  const bool wide = std::max(extent(x), extent(out)) >= (int64_t{1} << 31) - 1 ||
                    out.numel() >= (int64_t{1} << 31) - 1;
  const int64_t blocks = std::min<int64_t>(ceil_div(out.numel(), kThreads), int64_t{sm_count()} * 32);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_types(x.scalar_type(), sc.scalar_type(), wide, [&](auto t, auto s, auto i) {
    using T = decltype(t);
    using S = decltype(s);
    using idx_t = decltype(i);
    const PoolGeom<idx_t> g{static_cast<idx_t>(out.numel()), static_cast<idx_t>(out.size(1)),
                            static_cast<idx_t>(out.size(2)), static_cast<idx_t>(out.size(3)),
                            out.stride(1) == 1 && out.size(1) > 1,
                            static_cast<idx_t>(x.stride(0)), static_cast<idx_t>(x.stride(1)),
                            static_cast<idx_t>(x.stride(2)), static_cast<idx_t>(x.stride(3)),
                            static_cast<idx_t>(out.stride(0)), static_cast<idx_t>(out.stride(1)),
                            static_cast<idx_t>(out.stride(2)), static_cast<idx_t>(out.stride(3))};
    bn_act_avg_pool_kernel<T, S, idx_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        x.const_data_ptr<T>(), sc.const_data_ptr<S>(), sh.const_data_ptr<S>(), out.data_ptr<T>(), g,
        static_cast<int>(activation));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace fastconv

// The schema is defined once, in registration.cpp.
TORCH_LIBRARY_IMPL(fastconv_cuda, CUDA, m) { m.impl("bn_act_avg_pool", &fastconv::bn_act_avg_pool); }

TORCH_LIBRARY_IMPL(fastconv_cuda, Meta, m) {
  m.impl("bn_act_avg_pool", &fastconv::bn_act_avg_pool_meta);
}
