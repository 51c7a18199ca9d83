// fastconv_cuda::conv_bn_act_forward: a k x k (grouped, strided, dilated, asymmetrically padded)
// convolution as an implicit GEMM on the tensor cores, with the epilogue
//   out = act((conv(x, weight) + bias) * scale + shift)
// and optionally the per-channel mean and biased variance of the stored output (BatchNorm's
// training statistics) reduced in the same pass. The checks, the tap loader plugged
// into gemm_common.cuh's kernel, the statistics combine, and the CUDA / Meta registrations.
//
// GEMM view, per group g: M = N*Ho*Wo output pixels, K_g = (C_in/groups)*KH*KW, N_g =
// C_out/groups, with k = (r*KW + s)*C_in_g + c (channels fastest, so that a 16-byte chunk
// of k is one 16-byte load from a channels_last x).
#include <ATen/core/Tensor.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "conv_bn_act.h"
#include "gemm_launch.cuh"

namespace fastconv {
namespace gemm {
namespace {

constexpr const char* kOp = "fastconv_cuda::conv_bn_act_forward";

// A[m, k] = x[n, g*C_in_g + c, oh*sh - pt + r*dh, ow*sw - pl + s*dw], zero outside x.
template <typename T>
struct ConvA {
  struct Params {
    const T* x;
    int64_t sn, sc, sh, sw;
    int M, H, W, Ho, Wo, Cg, KW, str_h, str_w, pt, pl, dh, dw;
  };
  struct Row {
    int64_t base;  // image n, first channel of the group
    int ih0, iw0;  // input coordinates of tap (0, 0)
    bool ok;
  };
  static __device__ __forceinline__ Row row(const Params& p, int m, int group) {
    Row r{0, 0, 0, m < p.M};
    if (r.ok) {
      const unsigned hw = static_cast<unsigned>(p.Ho) * static_cast<unsigned>(p.Wo);
      const unsigned n = static_cast<unsigned>(m) / hw, rem = static_cast<unsigned>(m) % hw;
      const int oh = static_cast<int>(rem / static_cast<unsigned>(p.Wo));
      const int ow = static_cast<int>(rem % static_cast<unsigned>(p.Wo));
      r.base = static_cast<int64_t>(n) * p.sn + static_cast<int64_t>(group) * p.Cg * p.sc;
      r.ih0 = oh * p.str_h - p.pt;
      r.iw0 = ow * p.str_w - p.pl;
    }
    return r;
  }
  template <bool VEC>
  static __device__ __forceinline__ void load(const Params& p, const Row& r, int k, int K,
                                              Chunk<T>& chunk) {
    int c = k % p.Cg;
    const int rs = k / p.Cg;
    int kr = rs / p.KW, ks = rs % p.KW;
    if constexpr (VEC) {  // C_in_g % V == 0: the chunk is V channels of one tap
      const int ih = r.ih0 + kr * p.dh, iw = r.iw0 + ks * p.dw;
      const bool in = r.ok && k < K && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
      chunk = in ? *reinterpret_cast<const Chunk<T>*>(
                       p.x + r.base + static_cast<int64_t>(ih) * p.sh +
                       static_cast<int64_t>(iw) * p.sw + c)
                 : zero_chunk<T>();
    } else {
#pragma unroll
      for (int e = 0; e < Chunk<T>::V; ++e) {
        const int ih = r.ih0 + kr * p.dh, iw = r.iw0 + ks * p.dw;
        const bool in = r.ok && k + e < K && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
        chunk.v[e] = in ? p.x[r.base + static_cast<int64_t>(c) * p.sc +
                              static_cast<int64_t>(ih) * p.sh + static_cast<int64_t>(iw) * p.sw]
                        : static_cast<T>(0.f);
        if (++c == p.Cg) {  // next k: carry into the tap instead of dividing again
          c = 0;
          if (++ks == p.KW) {
            ks = 0;
            ++kr;
          }
        }
      }
    }
  }
};

// Combines the per-64-row-chunk partials of channel blockIdx.x in a fixed order (Chan et
// al.): mean = sum n_i mean_i / n, M2 = sum M2_i + sum n_i (mean_i - mean)^2, in float64
// (mean_i = rough_i + correction_i, see tile_statistics) so that the combine adds no error of
// its own. Deterministic: fixed thread shares, fixed tree.
constexpr int kCombineThreads = 256;
__global__ void __launch_bounds__(kCombineThreads)
    combine_statistics(const float4* partial, int chunks, int M, int C, float* mean, float* var) {
  __shared__ double tree[kCombineThreads];
  const int c = blockIdx.x, tid = threadIdx.x;
  auto reduce = [&](double v) {
    tree[tid] = v;
    __syncthreads();
    for (int s = kCombineThreads / 2; s > 0; s >>= 1) {
      if (tid < s) tree[tid] += tree[tid + s];
      __syncthreads();
    }
    const double total = tree[0];
    __syncthreads();  // tree is reused by the next reduction
    return total;
  };
  auto rows = [&](int i) { return static_cast<double>(min(kStatRows, M - i * kStatRows)); };
  auto chunk_mean = [&](const float4& p) {
    return static_cast<double>(p.x) + static_cast<double>(p.y);
  };
  double s = 0.0;
  for (int i = tid; i < chunks; i += kCombineThreads) {
    s += rows(i) * chunk_mean(partial[static_cast<int64_t>(i) * C + c]);
  }
  const double mu = reduce(s) / M;
  double q = 0.0;
  for (int i = tid; i < chunks; i += kCombineThreads) {
    const float4 p = partial[static_cast<int64_t>(i) * C + c];
    const double d = chunk_mean(p) - mu;
    q += static_cast<double>(p.z) + rows(i) * d * d;
  }
  const double m2 = reduce(q);
  if (tid == 0) {
    mean[c] = static_cast<float>(mu);
    var[c] = static_cast<float>(m2 / M);
  }
}

// Validated geometry.
struct Geometry {
  int64_t N, C_in, H, W, C_out, groups, KH, KW, Ho, Wo;
};

Geometry check_conv(const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                    int64_t activation, bool allow_tf32) {
  check_input(kOp, x, "x", 4);
  check_mma_dtype(kOp, x, allow_tf32);
  FC_CHECK(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1, kOp, "x",
           "a tensor with at least one channel, row and column (N may be 0)",
           c10::str("shape ", x.sizes()));
  // Sizes, pads, strides and dilations below 2^30: the kernels' tap math is int32.
  FC_CHECK(x.size(1) <= kMaxNarrowIndex && x.size(2) <= kMaxNarrowIndex &&
               x.size(3) <= kMaxNarrowIndex,
           kOp, "x", "at most 2^30 channels, rows and columns", c10::str("shape ", x.sizes()));
  FC_CHECK_SAME_DEVICE(kOp, weight, "weight", x, "x");
  FC_CHECK_DIM(kOp, weight, "weight", 4);
  FC_CHECK(weight.scalar_type() == x.scalar_type(), kOp, "weight",
           c10::str("x's dtype (", x.scalar_type(), ")"), weight.scalar_type());
  FC_CHECK(groups >= 1 && groups <= 65535, kOp, "groups", "in [1, 65535]", groups);
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), groups,
             weight.size(2), weight.size(3), 0, 0};
  FC_CHECK(weight.size(1) * groups == g.C_in, kOp, "weight",
           c10::str("of shape (C_out, C_in / groups, KH, KW) with C_in / groups = ", g.C_in,
                    " / ", groups, " (C_in = x.size(1) must equal weight.size(1) * groups)"),
           c10::str("shape ", weight.sizes()));
  FC_CHECK(g.C_out >= 1 && g.C_out % groups == 0 && g.KH >= 1 && g.KW >= 1, kOp, "weight",
           c10::str("of shape (C_out, C_in / groups, KH, KW) with C_out >= 1 a multiple of "
                    "groups = ", groups, " and KH, KW >= 1"),
           c10::str("shape ", weight.sizes()));
  const auto [Hp, Wp] = check_conv_params(kOp, x, stride, padding, dilation);
  const int64_t ext_h = (g.KH - 1) * dilation[0] + 1, ext_w = (g.KW - 1) * dilation[1] + 1;
  g.Ho = ext_h <= Hp ? (Hp - ext_h) / stride[0] + 1 : 0;
  g.Wo = ext_w <= Wp ? (Wp - ext_w) / stride[1] + 1 : 0;
  FC_CHECK(g.Ho >= 1 && g.Wo >= 1, kOp, "x", "large enough for the kernel (input too small for "
           "the kernel: the output would be empty)",
           c10::str("padded input ", Hp, "x", Wp, " for a dilated kernel ", ext_h, "x", ext_w));
  const int64_t M = g.N * g.Ho * g.Wo, K = weight.size(1) * g.KH * g.KW;
  FC_CHECK(M <= kMaxGemmDim && K <= kMaxGemmDim && grid_fits(M, g.C_out / groups), kOp, "x",
           "at most 2^31 - 1025 output pixels N*Ho*Wo and taps C_in/groups*KH*KW per output",
           c10::str(M, " output pixels and ", K, " taps"));
  const std::string outs = c10::str("C_out = weight.size(0) = ", g.C_out);
  check_channel_vector(kOp, bias, "bias", x, g.C_out, outs, /*allow_float=*/false);
  check_channel_vector(kOp, scale, "scale", x, g.C_out, outs, /*allow_float=*/true);
  check_channel_vector(kOp, shift, "shift", x, g.C_out, outs, /*allow_float=*/true);
  check_activation(kOp, "activation", activation);
  return g;
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// out follows the layout rule (layout.h); the statistics are [C_out] float32, or empty.
Outputs allocate(const at::Tensor& x, const Geometry& g, bool compute_stats) {
  at::Tensor out = empty_output(x, {g.N, g.C_out, g.Ho, g.Wo});
  const int64_t n = compute_stats ? g.C_out : 0;
  const auto f32 = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  return {out, at::empty({n}, f32), at::empty({n}, f32)};
}

Outputs conv_bn_act_forward_meta(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          const std::optional<at::Tensor>& scale,
                          const std::optional<at::Tensor>& shift, int64_t activation,
                          bool compute_stats, bool allow_tf32) {
  const Geometry g = check_conv(x, weight, bias, stride, padding, dilation, groups, scale, shift,
                                activation, allow_tf32);
  return allocate(x, g, compute_stats);
}

// The conv into `out` (any strides: its own allocation, or a channel slice of a dense block's
// or an Inception block's buffer; the GEMM's store follows out's strides), and the statistics.
void run_conv(const Geometry& geo, const at::Tensor& x, const at::Tensor& weight,
              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
              const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
              int64_t activation, bool compute_stats, const at::Tensor& out, const at::Tensor& mean,
              const at::Tensor& var, const at::Tensor& residual = at::Tensor(),
              bool activation_after_residual = false) {
  if (out.numel() == 0) {
    // No output pixels: like torch.var_mean over an empty set, both statistics are NaN.
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    var.fill_(std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t Cg = geo.C_in / groups, Ng = geo.C_out / groups;
  const int64_t V = 16 / x.element_size();
  const int64_t Kg = Cg * geo.KH * geo.KW;
  const auto ps = pixel_strides(x);
  bool vec = x.stride(1) == 1 && Cg % V == 0 && aligned16(x.const_data_ptr());
  for (int64_t s : ps) vec = vec && s % V == 0;
  // The weight in the loader's k order, one K-contiguous row per output channel (grouped:
  // group g's rows are rows g*C_out_g...): in place when it is channels_last, else a cached
  // repacked copy (conv_bn_act_weight.cpp).
  const PackedWeight w = packed_conv_weight(weight, vec);

  GemmArgs g{};
  g.M = static_cast<int>(geo.N * geo.Ho * geo.Wo);
  g.K = static_cast<int>(Kg);
  g.N = static_cast<int>(Ng);
  g.b = w.rows.const_data_ptr();
  g.b_sn = w.row_stride;
  g.b_sk = 1;
  set_output(g, out, Ng);
  if (residual.defined()) {
    set_residual(g, residual);
    g.act_after_residual = activation_after_residual;
  }
  at::Tensor keep[3];
  g.bias = channel_vec(bias, keep[0]);
  g.scale = channel_vec(scale, keep[1]);
  g.shift = channel_vec(shift, keep[2]);
  g.act = static_cast<int>(activation);
  g.C_out = static_cast<int>(geo.C_out);
  g.a_kfast = channels_innermost(x);
  g.b_kfast = true;  // rows are K-contiguous
  const int chunks = static_cast<int>((g.M + kStatRows - 1) / kStatRows);
  at::Tensor partial;
  if (compute_stats) {
    partial = at::empty({chunks, geo.C_out, 4}, x.options().dtype(at::kFloat));
    g.stats = reinterpret_cast<float4*>(partial.data_ptr<float>());
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_mma_dtype(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    using A = ConvA<T>;
    const typename A::Params ap{
        x.const_data_ptr<T>(), ps[0], x.stride(1), ps[1], ps[2], g.M,
        static_cast<int>(geo.H), static_cast<int>(geo.W), static_cast<int>(geo.Ho),
        static_cast<int>(geo.Wo), static_cast<int>(Cg), static_cast<int>(geo.KW),
        static_cast<int>(stride[0]), static_cast<int>(stride[1]), static_cast<int>(padding[0]),
        static_cast<int>(padding[1]), static_cast<int>(dilation[0]),
        static_cast<int>(dilation[1])};
    auto launch = [&](int v) {
      if (vec) {
        launch_variant<T, A, true>(v, ap, g, static_cast<int>(groups), stream);
      } else {
        launch_variant<T, A, false>(v, ap, g, static_cast<int>(groups), stream);
      }
    };
    // Timing launches rewrite out and the partials with the same values: harmless.
    const uint64_t key = gemm_tune_key(x, kOpConvBnAct, vec, compute_stats, g.M, g.N, g.K, groups);
    launch(pick_variant(key, kNumVariants, default_variant(g.M, g.N), launch));
  });
  if (compute_stats) {
    combine_statistics<<<static_cast<unsigned>(geo.C_out), kCombineThreads, 0, stream>>>(
        g.stats, chunks, g.M, g.C_out, mean.data_ptr<float>(), var.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

Outputs conv_bn_act_forward(const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                     int64_t activation, bool compute_stats, bool allow_tf32) {
  const Geometry geo = check_conv(x, weight, bias, stride, padding, dilation, groups, scale,
                                  shift, activation, allow_tf32);
  auto [out, mean, var] = allocate(x, geo, compute_stats);
  run_conv(geo, x, weight, bias, stride, padding, dilation, groups, scale, shift, activation,
           compute_stats, out, mean, var);
  return {out, mean, var};
}

constexpr const char* kOpOut = "fastconv_cuda::conv_bn_act_out";

// conv_bn_act_out's checks beyond the conv's: out is (N, C_out, Ho, Wo) in x's dtype on x's
// device, its elements distinct and not x's (the kernel reads x while it stores); a residual has
// out's shape, dtype and device and shares no element with out (the variant picker's timing
// launches repeat the store, which would add it again), and excludes the statistics.
std::tuple<at::Tensor, at::Tensor> check_out_and_allocate(const at::Tensor& x, const Geometry& g,
                                                          bool compute_stats,
                                                          const std::optional<at::Tensor>& residual,
                                                          const at::Tensor& out) {
  FC_CHECK_SAME_DEVICE(kOpOut, out, "out", x, "x");
  FC_CHECK(out.scalar_type() == x.scalar_type(), kOpOut, "out",
           c10::str("x's dtype (", x.scalar_type(), ")"), out.scalar_type());
  FC_CHECK(out.dim() == 4 && out.size(0) == g.N && out.size(1) == g.C_out && out.size(2) == g.Ho &&
               out.size(3) == g.Wo,
           kOpOut, "out", c10::str("of shape (", g.N, ", ", g.C_out, ", ", g.Ho, ", ", g.Wo, ")"),
           c10::str("shape ", out.sizes()));
  FC_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, kOpOut, "out",
           "a tensor whose elements do not overlap one another", c10::str("strides ", out.strides()));
  // Meta tensors have no memory to overlap (their storages all read as aliases): checked on CUDA.
  FC_CHECK(x.is_meta() || !may_share_elements(out, x), kOpOut, "out",
           "a tensor that does not overlap x", "one that does");
  if (residual.has_value() && residual->defined()) {
    const at::Tensor& r = *residual;
    FC_CHECK_SAME_DEVICE(kOpOut, r, "residual", x, "x");
    FC_CHECK(r.scalar_type() == x.scalar_type(), kOpOut, "residual",
             c10::str("x's dtype (", x.scalar_type(), ")"), r.scalar_type());
    FC_CHECK(r.sizes() == out.sizes(), kOpOut, "residual", c10::str("out's shape ", out.sizes()),
             c10::str("shape ", r.sizes()));
    FC_CHECK(x.is_meta() || !may_share_elements(out, r), kOpOut,
             "residual", "a tensor that does not overlap out", "one that does");
    FC_CHECK(!compute_stats, kOpOut, "compute_stats",
             "false with a residual (the statistics are of the plain conv)", "true");
  }
  const int64_t n = compute_stats ? g.C_out : 0;
  const auto f32 = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  return {at::empty({n}, f32), at::empty({n}, f32)};
}

std::tuple<at::Tensor, at::Tensor> conv_bn_act_out_meta(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
    int64_t activation, bool compute_stats, bool allow_tf32,
    const std::optional<at::Tensor>& residual, bool /*activation_after_residual*/,
    const at::Tensor& out) {
  const Geometry g = check_conv(x, weight, bias, stride, padding, dilation, groups, scale, shift,
                                activation, allow_tf32);
  return check_out_and_allocate(x, g, compute_stats, residual, out);
}

std::tuple<at::Tensor, at::Tensor> conv_bn_act_out(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
    int64_t activation, bool compute_stats, bool allow_tf32,
    const std::optional<at::Tensor>& residual, bool activation_after_residual,
    const at::Tensor& out) {
  const Geometry geo = check_conv(x, weight, bias, stride, padding, dilation, groups, scale,
                                  shift, activation, allow_tf32);
  auto [mean, var] = check_out_and_allocate(x, geo, compute_stats, residual, out);
  run_conv(geo, x, weight, bias, stride, padding, dilation, groups, scale, shift, activation,
           compute_stats, out, mean, var, residual.has_value() ? *residual : at::Tensor(),
           activation_after_residual);
  return {mean, var};
}

}  // namespace
}  // namespace gemm
}  // namespace fastconv

// The schema is defined once, in registration.cpp.
TORCH_LIBRARY_IMPL(fastconv_cuda, CUDA, m) {
  m.impl("conv_bn_act_forward", &fastconv::gemm::conv_bn_act_forward);
  m.impl("conv_bn_act_out", &fastconv::gemm::conv_bn_act_out);
}

TORCH_LIBRARY_IMPL(fastconv_cuda, Meta, m) {
  m.impl("conv_bn_act_forward", &fastconv::gemm::conv_bn_act_forward_meta);
  m.impl("conv_bn_act_out", &fastconv::gemm::conv_bn_act_out_meta);
}
