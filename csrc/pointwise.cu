// fastconv_cuda::pointwise_forward: a 1x1 convolution as one tensor-core GEMM over pixels,
//   out[n, j, h, w] = epilogue_j(sum_k prologue_k(x[n, k, h, w]) * weight[j, k]),
// the semantics of triton_kernels/pointwise.py's pointwise_gemm. The checks, the
// pixel loader plugged into gemm_common.cuh's kernel, and the CUDA / Meta registrations.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <utility>

#include "gemm_launch.cuh"

namespace fastconv {
namespace gemm {
namespace {

constexpr const char* kOp = "fastconv_cuda::pointwise_forward";

// A[m, k] = x[n, k, h, w] for pixel m = (n, h, w).
template <typename T>
struct PointwiseA {
  struct Params {
    const T* x;
    int64_t sn, sc, sh, sw;
    int M, H, W;
  };
  struct Row {
    int64_t off;
    bool ok;
  };
  static __device__ __forceinline__ Row row(const Params& p, int m, int /*group*/) {
    const bool ok = m < p.M;
    return {ok ? pixel_offset(m, p.H, p.W, p.sn, p.sh, p.sw) : 0, ok};
  }
  template <bool VEC>
  static __device__ __forceinline__ void load(const Params& p, const Row& r, int k, int K,
                                              Chunk<T>& c) {
    if constexpr (VEC) {  // channel stride 1, K % V == 0: the chunk is all in or all out
      c = (r.ok && k < K) ? *reinterpret_cast<const Chunk<T>*>(p.x + r.off + k) : zero_chunk<T>();
    } else {
#pragma unroll
      for (int e = 0; e < Chunk<T>::V; ++e) {
        c.v[e] = (r.ok && k + e < K) ? p.x[r.off + static_cast<int64_t>(k + e) * p.sc]
                                     : static_cast<T>(0.f);
      }
    }
  }
};

void check_pointwise(const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                     const std::optional<at::Tensor>& shift, int64_t activation,
                     const std::optional<at::Tensor>& residual,
                     const std::optional<at::Tensor>& in_scale,
                     const std::optional<at::Tensor>& in_shift, int64_t in_activation,
                     bool allow_tf32, const at::Tensor& out) {
  check_input(kOp, x, "x", 4);
  check_mma_dtype(kOp, x, allow_tf32);
  const int64_t C_in = x.size(1);
  FC_CHECK_SAME_DEVICE(kOp, weight, "weight", x, "x");
  FC_CHECK(weight.dim() == 2 && weight.size(1) == C_in, kOp, "weight",
           c10::str("a 2-D (C_out, C_in) tensor with C_in = x.size(1) = ", C_in),
           c10::str("shape ", weight.sizes()));
  FC_CHECK(weight.scalar_type() == x.scalar_type(), kOp, "weight",
           c10::str("x's dtype (", x.scalar_type(), ")"), weight.scalar_type());
  const int64_t C_out = weight.size(0);
  const std::vector<int64_t> shape = {x.size(0), C_out, x.size(2), x.size(3)};
  for (const auto& [t, name] :
       {std::pair<const at::Tensor*, const char*>{&out, "out"},
        std::pair<const at::Tensor*, const char*>{residual ? &*residual : nullptr, "residual"}}) {
    if (t == nullptr || !t->defined()) continue;
    FC_CHECK_SAME_DEVICE(kOp, *t, name, x, "x");
    FC_CHECK(t->sizes() == at::IntArrayRef(shape), kOp, name,
             c10::str("shape (N, C_out, H, W) = ", at::IntArrayRef(shape)), t->sizes());
    FC_CHECK(t->scalar_type() == x.scalar_type(), kOp, name,
             c10::str("x's dtype (", x.scalar_type(), ")"), t->scalar_type());
  }
  const std::string outs = c10::str("C_out = weight.size(0) = ", C_out);
  const std::string ins = c10::str("C_in = x.size(1) = ", C_in);
  check_channel_vector(kOp, bias, "bias", x, C_out, outs, /*allow_float=*/false);
  check_channel_vector(kOp, scale, "scale", x, C_out, outs, /*allow_float=*/true);
  check_channel_vector(kOp, shift, "shift", x, C_out, outs, /*allow_float=*/true);
  check_channel_vector(kOp, in_scale, "in_scale", x, C_in, ins, /*allow_float=*/true);
  check_channel_vector(kOp, in_shift, "in_shift", x, C_in, ins, /*allow_float=*/true);
  check_activation(kOp, "activation", activation);
  check_activation(kOp, "in_activation", in_activation);
  const int64_t M = x.size(0) * x.size(2) * x.size(3);
  FC_CHECK(M <= kMaxGemmDim && C_in <= kMaxGemmDim && C_out <= kMaxGemmDim &&
               grid_fits(M, C_out),
           kOp, "x", "at most 2^31 - 1025 pixels N*H*W and channels (and their tile grid)",
           c10::str("shape ", x.sizes(), " with C_out = ", C_out));
}

void pointwise_forward_meta(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& shift, int64_t activation,
                            const std::optional<at::Tensor>& residual,
                            bool /*activation_after_residual*/,
                            const std::optional<at::Tensor>& in_scale,
                            const std::optional<at::Tensor>& in_shift, int64_t in_activation,
                            bool allow_tf32, const at::Tensor& out) {
  check_pointwise(x, weight, bias, scale, shift, activation, residual, in_scale, in_shift,
                  in_activation, allow_tf32, out);
}

// Whether x and the weight qualify for 16-byte loads along K.
bool vec_operands(const at::Tensor& x, const at::Tensor& w) {
  const int64_t V = 16 / x.element_size();
  if (x.size(1) % V != 0 || x.stride(1) != 1 || !aligned16(x.const_data_ptr())) return false;
  for (int64_t s : pixel_strides(x)) {
    if (s % V != 0) return false;
  }
  return w.stride(1) == 1 && w.stride(0) % V == 0 && aligned16(w.const_data_ptr());
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& w, GemmArgs g, bool vec, bool prologue,
         const at::Tensor& out, const at::Tensor& residual) {
  using A = PointwiseA<T>;
  const auto ps = pixel_strides(x);
  const typename A::Params ap{x.const_data_ptr<T>(), ps[0], x.stride(1), ps[1], ps[2],
                              g.M, static_cast<int>(x.size(2)), static_cast<int>(x.size(3))};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](int v, const GemmArgs& args) {
    if (vec) {
      launch_variant<T, A, true>(v, ap, args, 1, stream);
    } else {
      launch_variant<T, A, false>(v, ap, args, 1, stream);
    }
  };
  // Timing launches repeat the call. When out shares elements with the residual (out +=
  // residual in place), that would add the residual several times, so they then write into
  // a scratch copy of out, allocated only when timing actually runs (not on a tuned call, nor
  // under capture). Disjoint slices of one buffer need no scratch.
  GemmArgs timing = g;
  at::Tensor scratch;
  const bool needs_scratch = residual.defined() && may_share_elements(out, residual);
  const uint64_t key = gemm_tune_key(x, kOpPointwise, vec, prologue, g.M, g.N, g.K, 1);
  const int v = pick_variant(key, kNumVariants, default_variant(g.M, g.N), [&](int variant) {
    if (needs_scratch && !scratch.defined()) {
      scratch = at::empty_strided(out.sizes(), out.strides(), out.options());
      timing.out = scratch.data_ptr();
    }
    launch(variant, timing);
  });
  launch(v, g);
}

void pointwise_forward(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& scale,
                       const std::optional<at::Tensor>& shift, int64_t activation,
                       const std::optional<at::Tensor>& residual, bool activation_after_residual,
                       const std::optional<at::Tensor>& in_scale,
                       const std::optional<at::Tensor>& in_shift, int64_t in_activation,
                       bool allow_tf32, const at::Tensor& out) {
  check_pointwise(x, weight, bias, scale, shift, activation, residual, in_scale, in_shift,
                  in_activation, allow_tf32, out);
  // out must not overlap x or weight: the Python op checks that exactly (channel slices of
  // one buffer interleave without sharing elements, which ATen's range test would reject).
  at::assert_no_internal_overlap(out);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const bool vec_x = x.size(1) % (16 / x.element_size()) == 0 && x.stride(1) == 1;
  // The weight is tiny next to x: a row-major copy when that turns on the 16-byte path
  // (e.g. the transposed view the grad_input pass hands in).
  at::Tensor w = weight;
  if (vec_x && !vec_operands(x, w)) w = weight.contiguous();
  if (vec_x && !aligned16(w.const_data_ptr())) w = weight.clone(at::MemoryFormat::Contiguous);
  const bool vec = vec_operands(x, w);

  GemmArgs g{};
  g.M = static_cast<int>(x.size(0) * x.size(2) * x.size(3));
  g.K = static_cast<int>(x.size(1));
  g.N = static_cast<int>(weight.size(0));
  g.b = w.const_data_ptr();
  g.b_sn = w.stride(0);
  g.b_sk = w.stride(1);
  set_output(g, out, g.N);
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    res = *residual;
    set_residual(g, res);
  }
  g.act_after_residual = activation_after_residual;
  at::Tensor keep[5];
  g.bias = channel_vec(bias, keep[0]);
  g.scale = channel_vec(scale, keep[1]);
  g.shift = channel_vec(shift, keep[2]);
  g.act = static_cast<int>(activation);
  g.in_scale = channel_vec(in_scale, keep[3]);
  g.in_shift = channel_vec(in_shift, keep[4]);
  g.in_act = static_cast<int>(in_activation);
  g.prologue = g.in_scale.kind != kVecAbsent || g.in_shift.kind != kVecAbsent || g.in_act != 0;
  g.stats = nullptr;
  g.C_out = g.N;
  g.a_kfast = channels_innermost(x);
  g.b_kfast = g.b_sk == 1;
  dispatch_mma_dtype(x.scalar_type(), [&](auto t) {
    run<decltype(t)>(x, w, g, vec, g.prologue, out, res);
  });
}

}  // namespace
}  // namespace gemm
}  // namespace fastconv

// The schema is defined once, in registration.cpp.
TORCH_LIBRARY_IMPL(fastconv_cuda, CUDA, m) {
  m.impl("pointwise_forward", &fastconv::gemm::pointwise_forward);
}

TORCH_LIBRARY_IMPL(fastconv_cuda, Meta, m) {
  m.impl("pointwise_forward", &fastconv::gemm::pointwise_forward_meta);
}
