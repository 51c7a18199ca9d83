// Training-mode BatchNorm in CUDA C++: fastconv_cuda::batch_norm_stats (per-channel batch
// mean and biased variance) and fastconv_cuda::batch_norm_act_backward (the gradient through
// activation, affine and batch statistics). The CUDA twins of triton_kernels/batch_norm.py,
// with the same formulas; see its docstrings. The stage-1 kernels are in batch_norm.cuh;
// this file holds the second stages, the launchers and the ops.
//
// Layouts follow bn_act (bn_act_common.cuh): the rows kernels serve tensors whose channels
// are innermost (channels_last and its channel slices), 16-byte packs of channels when
// aligned; the planes kernels serve everything else, one warp per (n, c) plane tile.
//
// Every reduction is deterministic: each block (rows) or warp task (planes) owns one slot of
// a [k, parts, C] fp32 workspace and fills it in a fixed order; a second kernel combines the
// parts of each channel in a fixed order, in float64. No atomics. The partition depends on
// the shapes, layout and SM count only; the autotuned variants differ in unroll depth, which
// never reorders the arithmetic of a thread, so every variant gives bit-identical results.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "activations.cuh"
#include "autotune.h"
#include "batch_norm.cuh"
#include "bn_act_common.cuh"
#include "checks.h"
#include "layout.h"

namespace fastconv {
namespace {

using namespace bn_train;  // the stage-1 kernels and their helpers

// Rows kernels that reduce visit at least this many rows per thread: it bounds the number
// of parts (the workspace and the second stage) to a small fraction of the tensor traffic.
constexpr int64_t kMinRowsPerThread = 16;

// Second-stage block: 32 channels x kReduceLanes lanes over the parts.
constexpr int kReduceLanes = 16;

// ---------------------------------------------------------------------------------------
// Second stages: fixed-order float64 reductions over the parts of each channel.

// Sum over threadIdx.y of acc[ty][tx] by a fixed tree; the total lands in acc[0][tx]. Every
// thread of the block must call it.
__device__ __forceinline__ void tree_over_lanes(double (&acc)[kReduceLanes][kWarpSize]) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  __syncthreads();
#pragma unroll
  for (int half = kReduceLanes / 2; half > 0; half /= 2) {
    if (ty < half) acc[ty][tx] += acc[ty + half][tx];
    __syncthreads();
  }
}

// Stage 2: per channel, mean = sum_p n_p * (pivot_p + mean_p) / R, then
// M2 = sum_p M2_p + n_p * (pivot_p + mean_p - mean)^2, all in float64 (the Triton host merge).
__global__ void __launch_bounds__(kWarpSize * kReduceLanes) merge_stats_kernel(
    const float* __restrict__ ws,  // [4, parts, C] from stage 1
    int64_t parts, int64_t C,
    double R,                      // N * H * W > 0
    float* __restrict__ mean_out,  // [C]
    float* __restrict__ var_out) { // [C], biased
  __shared__ double acc[kReduceLanes][kWarpSize];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpSize + tx;
  const int64_t plane = parts * C;
  auto part_mean = [&](int64_t at) {
    return static_cast<double>(ws[3 * plane + at]) + static_cast<double>(ws[plane + at]);
  };
  double sum = 0.0;
  if (c < C) {
    for (int64_t p = ty; p < parts; p += kReduceLanes) {
      const int64_t at = p * C + c;
      const double n = ws[at];
      if (n > 0.0) sum += n * part_mean(at);
    }
  }
  acc[ty][tx] = sum;
  tree_over_lanes(acc);
  const double mean = acc[0][tx] / R;
  __syncthreads();  // everyone has read acc[0][tx] before it is overwritten
  double m2 = 0.0;
  if (c < C) {
    for (int64_t p = ty; p < parts; p += kReduceLanes) {
      const int64_t at = p * C + c;
      const double n = ws[at];
      if (n > 0.0) {  // an empty part adds nothing (and its pivot may be anything)
        const double delta = part_mean(at) - mean;
        m2 += static_cast<double>(ws[2 * plane + at]) + n * delta * delta;
      }
    }
  }
  acc[ty][tx] = m2;
  tree_over_lanes(acc);
  if (ty == 0 && c < C) {
    mean_out[c] = static_cast<float>(mean);
    var_out[c] = static_cast<float>(acc[0][tx] / R);
  }
}

// Stage 2 of pass 1: Sg and Sgx per channel in float64, fixed order; writes
// grad_weight = invstd * Sgx, grad_bias = Sg, and pass 2's mean_g = Sg / R and
// coef = invstd^2 * Sgx / R into coefs [2, C].
__global__ void __launch_bounds__(kWarpSize * kReduceLanes) finish_grad_sums_kernel(
    const float* __restrict__ ws,     // [2, parts, C] from pass 1
    int64_t parts, int64_t C,
    double R,                         // N * H * W > 0
    const float* __restrict__ invstd, // [C]
    float* __restrict__ grad_weight,  // [C]
    float* __restrict__ grad_bias,    // [C]
    float* __restrict__ coefs) {      // [2, C]: mean_g, coef
  __shared__ double acc[kReduceLanes][kWarpSize];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpSize + tx;
  double totals[2];
  for (int k = 0; k < 2; ++k) {
    double sum = 0.0;
    if (c < C) {
      for (int64_t p = ty; p < parts; p += kReduceLanes) sum += ws[(k * parts + p) * C + c];
    }
    acc[ty][tx] = sum;
    tree_over_lanes(acc);
    totals[k] = acc[0][tx];
    __syncthreads();  // everyone has read acc[0][tx] before the next round overwrites it
  }
  if (ty == 0 && c < C) {
    const double inv = invstd[c];
    grad_bias[c] = static_cast<float>(totals[0]);
    grad_weight[c] = static_cast<float>(inv * totals[1]);
    coefs[c] = static_cast<float>(totals[0] / R);
    coefs[C + c] = static_cast<float>(inv * inv * totals[1] / R);
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

uint64_t key_of(int op, const Layout& L, const at::Tensor& c) {
  return layout_tune_key(op, L, c, /*scale_is_float=*/true);
}

// Variant v of each path = unroll depth {1, deep}; the pack width is fixed by alignment.
// 8-wide (16-bit) packs keep 8 accumulators or parameters per channel array per thread;
// unrolling those 4 deep exceeds the 128-register budget, so they go 2 deep (as bn_act).
template <typename T>
constexpr int deep_unroll() {
  return kPackBytes / sizeof(T) >= 8 ? 2 : 4;
}

template <typename T, typename idx_t>
void stats_typed(const Layout& L, const at::Tensor& c, const at::Tensor& mean,
                 const at::Tensor& var) {
  constexpr int kVec = kPackBytes / sizeof(T);
  constexpr int kDeep = deep_unroll<T>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const T* xp = c.const_data_ptr<T>();
  const Strides<idx_t> xs = strides_of<idx_t>(L, 0);
  const int pack = L.vec ? kVec : 1;
  const uint64_t key = key_of(kOpBnStats, L, c);
  at::Tensor ws;
  int64_t parts = 0;
  if (L.path == Path::kRows) {
    using Kernel = decltype(&rows_stats_kernel<T, idx_t, 1, 1>);
    const Kernel kernels[2][2] = {
        {rows_stats_kernel<T, idx_t, 1, 1>, rows_stats_kernel<T, idx_t, 1, 4>},
        {rows_stats_kernel<T, idx_t, kVec, 1>, rows_stats_kernel<T, idx_t, kVec, kDeep>}};
    const RowsLaunch cfg = rows_launch(L.N * L.H * L.W, L.C, pack, kMinRowsPerThread);
    const RowGeom<idx_t> geom = row_geom<idx_t>(L);
    const size_t smem = sizeof(float) * (1 + 2 * pack) * cfg.block.x * cfg.block.y;
    parts = cfg.grid.y;
    ws = at::empty({4, parts, L.C}, c.options().dtype(at::kFloat));
    const StatsParts out{ws.mutable_data_ptr<float>(), parts};
    auto launch = [&](int v) {
      kernels[L.vec][v]<<<cfg.grid, cfg.block, smem, stream>>>(xp, geom, xs, static_cast<int>(L.C),
                                                                out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch(pick_variant(key, 2, /*fallback=*/1, launch));
  } else {
    using Kernel = decltype(&planes_stats_kernel<T, idx_t, 1, 1, true>);
    const Kernel contiguous[2][2] = {
        {planes_stats_kernel<T, idx_t, 1, 1, true>, planes_stats_kernel<T, idx_t, 1, 4, true>},
        {planes_stats_kernel<T, idx_t, kVec, 1, true>, planes_stats_kernel<T, idx_t, kVec, 4, true>}};
    const Kernel strided = planes_stats_kernel<T, idx_t, 1, 4, false>;
    const int64_t len = L.H * L.W / pack;
    const PlanesLaunch cfg = planes_launch(L.N * L.C, len);
    const PlaneGeom<idx_t> geom = plane_geom<idx_t>(L, cfg, len);
    const bool is_strided = L.path == Path::kStrided;
    parts = L.N * cfg.tiles;
    ws = at::empty({4, parts, L.C}, c.options().dtype(at::kFloat));
    const StatsParts out{ws.mutable_data_ptr<float>(), parts};
    auto launch = [&](int v) {
      const Kernel k = is_strided ? strided : contiguous[L.vec][v];
      k<<<cfg.grid, cfg.block, 0, stream>>>(xp, geom, xs, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch(pick_variant(key, is_strided ? 1 : 2, /*fallback=*/1, launch));
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(L.C, kWarpSize)));
  merge_stats_kernel<<<grid, dim3(kWarpSize, kReduceLanes), 0, stream>>>(
      ws.const_data_ptr<float>(), parts, L.C, static_cast<double>(L.N * L.H * L.W),
      mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename idx_t>
void backward_typed(const Layout& L, const at::Tensor& g, const at::Tensor& c, const BnParams& params,
                    const at::Tensor& gc, const at::Tensor& grad_weight,
                    const at::Tensor& grad_bias, int act, bool accumulate) {
  constexpr int kVec = kPackBytes / sizeof(T);
  constexpr int kDeep = deep_unroll<T>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const T* gp = g.const_data_ptr<T>();
  const T* xp = c.const_data_ptr<T>();
  T* gcp = gc.mutable_data_ptr<T>();
  // Layout order: {c, grad_y, grad_c}.
  const Strides<idx_t> xs = strides_of<idx_t>(L, 0);
  const Strides<idx_t> gs = strides_of<idx_t>(L, 1);
  const Strides<idx_t> gcs = strides_of<idx_t>(L, 2);
  const int pack = L.vec ? kVec : 1;
  const int C = static_cast<int>(L.C);
  // coefs: [2, C] = mean_g, coef, from pass 1 for pass 2.
  const at::Tensor coefs = at::empty({2, L.C}, c.options().dtype(at::kFloat));
  const float* cfp = coefs.const_data_ptr<float>();

  at::Tensor ws;
  int64_t parts = 0;
  if (L.path == Path::kRows) {
    using Kernel = decltype(&rows_grad_sums_kernel<T, idx_t, 1, 1>);
    const Kernel kernels[2][2] = {
        {rows_grad_sums_kernel<T, idx_t, 1, 1>, rows_grad_sums_kernel<T, idx_t, 1, 4>},
        {rows_grad_sums_kernel<T, idx_t, kVec, 1>, rows_grad_sums_kernel<T, idx_t, kVec, kDeep>}};
    const RowsLaunch cfg = rows_launch(L.N * L.H * L.W, L.C, pack, kMinRowsPerThread);
    const RowGeom<idx_t> geom = row_geom<idx_t>(L);
    const size_t smem = sizeof(float) * 2 * pack * cfg.block.x * cfg.block.y;
    parts = cfg.grid.y;
    ws = at::empty({2, parts, L.C}, c.options().dtype(at::kFloat));
    float* wsp = ws.mutable_data_ptr<float>();
    auto launch = [&](int v) {
      kernels[L.vec][v]<<<cfg.grid, cfg.block, smem, stream>>>(gp, xp, params, geom, gs, xs, C, act,
                                                                wsp, parts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch(pick_variant(key_of(kOpBnGradSums, L, c), 2, /*fallback=*/1, launch));
  } else {
    using Kernel = decltype(&planes_grad_sums_kernel<T, idx_t, 1, 1, true>);
    const Kernel contiguous[2][2] = {
        {planes_grad_sums_kernel<T, idx_t, 1, 1, true>, planes_grad_sums_kernel<T, idx_t, 1, 4, true>},
        {planes_grad_sums_kernel<T, idx_t, kVec, 1, true>,
         planes_grad_sums_kernel<T, idx_t, kVec, 4, true>}};
    const Kernel strided = planes_grad_sums_kernel<T, idx_t, 1, 4, false>;
    const int64_t len = L.H * L.W / pack;
    const PlanesLaunch cfg = planes_launch(L.N * L.C, len);
    const PlaneGeom<idx_t> geom = plane_geom<idx_t>(L, cfg, len);
    const bool is_strided = L.path == Path::kStrided;
    parts = L.N * cfg.tiles;
    ws = at::empty({2, parts, L.C}, c.options().dtype(at::kFloat));
    float* wsp = ws.mutable_data_ptr<float>();
    auto launch = [&](int v) {
      const Kernel k = is_strided ? strided : contiguous[L.vec][v];
      k<<<cfg.grid, cfg.block, 0, stream>>>(gp, xp, params, geom, gs, xs, act, wsp, parts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch(pick_variant(key_of(kOpBnGradSums, L, c), is_strided ? 1 : 2, /*fallback=*/1, launch));
  }

  const double R = static_cast<double>(L.N * L.H * L.W);
  finish_grad_sums_kernel<<<dim3(static_cast<unsigned>(ceil_div(L.C, kWarpSize))),
                            dim3(kWarpSize, kReduceLanes), 0, stream>>>(
      ws.const_data_ptr<float>(), parts, L.C, R, params.invstd, grad_weight.mutable_data_ptr<float>(),
      grad_bias.mutable_data_ptr<float>(), coefs.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const uint64_t key = key_of(kOpBnGradInput, L, c);
  if (L.path == Path::kRows) {
    using Kernel = decltype(&rows_grad_input_kernel<T, idx_t, 1, 1>);
    const Kernel kernels[2][2] = {
        {rows_grad_input_kernel<T, idx_t, 1, 1>, rows_grad_input_kernel<T, idx_t, 1, 4>},
        {rows_grad_input_kernel<T, idx_t, kVec, 1>, rows_grad_input_kernel<T, idx_t, kVec, kDeep>}};
    const RowsLaunch cfg = rows_launch(L.N * L.H * L.W, L.C, pack, /*min_rows_per_thread=*/1);
    const RowGeom<idx_t> geom = row_geom<idx_t>(L);
    auto launch = [&](int v) {
      kernels[L.vec][v]<<<cfg.grid, cfg.block, 0, stream>>>(gp, xp, gcp, params, cfp, geom, gs, xs,
                                                             gcs, C, act, accumulate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // Accumulating, a timing launch would add a second time: the fallback variant, untimed.
    launch(accumulate ? 1 : pick_variant(key, 2, /*fallback=*/1, launch));
    return;
  }
  using Kernel = decltype(&planes_grad_input_kernel<T, idx_t, 1, 1, true>);
  const Kernel contiguous[2][2] = {
      {planes_grad_input_kernel<T, idx_t, 1, 1, true>, planes_grad_input_kernel<T, idx_t, 1, 4, true>},
      {planes_grad_input_kernel<T, idx_t, kVec, 1, true>,
       planes_grad_input_kernel<T, idx_t, kVec, 4, true>}};
  const Kernel strided = planes_grad_input_kernel<T, idx_t, 1, 4, false>;
  const int64_t len = L.H * L.W / pack;
  const PlanesLaunch cfg = planes_launch(L.N * L.C, len);
  const PlaneGeom<idx_t> geom = plane_geom<idx_t>(L, cfg, len);
  const bool is_strided = L.path == Path::kStrided;
  auto launch = [&](int v) {
    const Kernel k = is_strided ? strided : contiguous[L.vec][v];
    k<<<cfg.grid, cfg.block, 0, stream>>>(gp, xp, gcp, params, cfp, geom, gs, xs, gcs, act, accumulate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  launch(accumulate ? 1 : pick_variant(key, is_strided ? 1 : 2, /*fallback=*/1, launch));
}

// ---------------------------------------------------------------------------------------
// Ops: checks, outputs, dispatch.

constexpr const char* kStats = "fastconv_cuda::batch_norm_stats";
constexpr const char* kBackward = "fastconv_cuda::batch_norm_act_backward";
constexpr const char* kAccumulate = "fastconv_cuda::batch_norm_act_backward_accumulate";

void check_c(const char* op, const at::Tensor& c) {
  check_input(op, c, "c", 4);
  FC_CHECK(is_supported_dtype(c.scalar_type()), op, "c", "float32, float16 or bfloat16",
           c.scalar_type());
}

// A [C] vector on c's device; the statistics must be float32, the affine parameters any of
// the supported float dtypes.
void check_vector(const char* op, const at::Tensor& t, const char* name, const at::Tensor& c,
                  bool statistics) {
  FC_CHECK_SAME_DEVICE(op, t, name, c, "c");
  const int64_t C = c.size(1);
  FC_CHECK(t.dim() == 1 && t.size(0) == C, op, name,
           c10::str("a 1-D tensor of size C = c.size(1) = ", C), c10::str("shape ", t.sizes()));
  if (statistics) {
    FC_CHECK(t.scalar_type() == at::kFloat, op, name, "float32 (the statistics' precision)",
             t.scalar_type());
  } else {
    FC_CHECK(is_supported_dtype(t.scalar_type()), op, name, "float32, float16 or bfloat16",
             t.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_meta(const at::Tensor& c) {
  check_c(kStats, c);
  const auto options = c.options().dtype(at::kFloat);
  return {at::empty({c.size(1)}, options), at::empty({c.size(1)}, options)};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& c) {
  check_c(kStats, c);
  const int64_t C = c.size(1);
  const auto options = c.options().dtype(at::kFloat);
  if (c.size(0) * c.size(2) * c.size(3) == 0) {
    // An empty batch: NaN, as torch.var_mean gives.
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {at::full({C}, nan, options), at::full({C}, nan, options)};
  }
  at::Tensor mean = at::empty({C}, options), var = at::empty({C}, options);
  if (C == 0) return {mean, var};
  const c10::cuda::CUDAGuard guard(c.device());
  const Layout L = make_layout({c});
  dispatch_types(c.scalar_type(), at::kFloat, L.wide_index, [&](auto t, auto, auto i) {
    stats_typed<decltype(t), decltype(i)>(L, c, mean, var);
  });
  return {mean, var};
}

void check_backward(const at::Tensor& grad_y, const at::Tensor& c, const at::Tensor& mean,
                    const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, int64_t activation) {
  const char* op = kBackward;
  check_c(op, c);
  check_like(op, grad_y, "grad_y", c, "c");
  check_vector(op, mean, "mean", c, /*statistics=*/true);
  check_vector(op, invstd, "invstd", c, /*statistics=*/true);
  if (weight.has_value()) check_vector(op, *weight, "weight", c, /*statistics=*/false);
  if (bias.has_value()) check_vector(op, *bias, "bias", c, /*statistics=*/false);
  check_activation(op, "activation", activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_meta(
    const at::Tensor& grad_y, const at::Tensor& c, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t activation) {
  check_backward(grad_y, c, mean, invstd, weight, bias, activation);
  const auto options = c.options().dtype(at::kFloat);
  // grad_c: preserve_format, i.e. c's strides when c is dense, else its suggested format.
  return {at::empty_like(c), at::empty({c.size(1)}, options), at::empty({c.size(1)}, options)};
}

// Pass 1 and 2 of the backward into grad_c (written, or added into with `accumulate`).
void run_backward(const at::Tensor& grad_y, const at::Tensor& c, const at::Tensor& mean,
                  const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias, int64_t activation, const at::Tensor& grad_c,
                  const at::Tensor& grad_weight, const at::Tensor& grad_bias, bool accumulate) {
  if (c.numel() == 0) {
    // Empty sums: the parameter gradients are exactly zero.
    grad_weight.zero_();
    grad_bias.zero_();
    return;
  }
  const c10::cuda::CUDAGuard guard(c.device());
  // The kernels read [C] float32 vectors; the parameters convert exactly.
  auto as_float = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
  };
  const at::Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const at::Tensor weight_f = as_float(weight), bias_f = as_float(bias);
  const BnParams params{mean_c.const_data_ptr<float>(), invstd_c.const_data_ptr<float>(),
                        weight_f.defined() ? weight_f.const_data_ptr<float>() : nullptr,
                        bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr};
  const Layout L = make_layout({c, grad_y, grad_c});
  dispatch_types(c.scalar_type(), at::kFloat, L.wide_index, [&](auto t, auto, auto i) {
    backward_typed<decltype(t), decltype(i)>(L, grad_y, c, params, grad_c, grad_weight, grad_bias,
                                             static_cast<int>(activation), accumulate);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward(
    const at::Tensor& grad_y, const at::Tensor& c, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t activation) {
  // std::tie, not a structured binding: the dispatch lambda below captures these, which
  // C++17 (torch 2.11's -std=c++17 build) does not allow for structured bindings.
  at::Tensor grad_c, grad_weight, grad_bias;
  std::tie(grad_c, grad_weight, grad_bias) =
      batch_norm_act_backward_meta(grad_y, c, mean, invstd, weight, bias, activation);
  run_backward(grad_y, c, mean, invstd, weight, bias, activation, grad_c, grad_weight, grad_bias,
               /*accumulate=*/false);
  return {grad_c, grad_weight, grad_bias};
}

// The accumulating twin's checks: grad_c is c's shape and dtype on c's device (any strides: a
// prefix slice of a dense block's gradient buffer), and overlaps neither c nor grad_y.
std::tuple<at::Tensor, at::Tensor> batch_norm_act_backward_accumulate_meta(
    const at::Tensor& grad_y, const at::Tensor& c, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t activation, const at::Tensor& grad_c) {
  check_backward(grad_y, c, mean, invstd, weight, bias, activation);
  check_like(kAccumulate, grad_c, "grad_c", c, "c");
  FC_CHECK(at::has_internal_overlap(grad_c) != at::MemOverlap::Yes, kAccumulate, "grad_c",
           "a tensor whose elements do not overlap one another",
           c10::str("strides ", grad_c.strides()));
  // Meta tensors have no memory to overlap (their storages all read as aliases): checked on CUDA.
  FC_CHECK(c.is_meta() || (!may_share_elements(grad_c, c) &&
                           !may_share_elements(grad_c, grad_y)),
           kAccumulate, "grad_c", "a tensor that overlaps neither c nor grad_y", "one that does");
  const auto options = c.options().dtype(at::kFloat);
  return {at::empty({c.size(1)}, options), at::empty({c.size(1)}, options)};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_act_backward_accumulate(
    const at::Tensor& grad_y, const at::Tensor& c, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t activation, const at::Tensor& grad_c) {
  at::Tensor grad_weight, grad_bias;
  std::tie(grad_weight, grad_bias) = batch_norm_act_backward_accumulate_meta(
      grad_y, c, mean, invstd, weight, bias, activation, grad_c);
  run_backward(grad_y, c, mean, invstd, weight, bias, activation, grad_c, grad_weight, grad_bias,
               /*accumulate=*/true);
  return {grad_weight, grad_bias};
}

}  // namespace
}  // namespace fastconv

// The schema is defined once, in registration.cpp.
TORCH_LIBRARY_IMPL(fastconv_cuda, CUDA, m) {
  m.impl("batch_norm_stats", &fastconv::batch_norm_stats);
  m.impl("batch_norm_act_backward", &fastconv::batch_norm_act_backward);
  m.impl("batch_norm_act_backward_accumulate", &fastconv::batch_norm_act_backward_accumulate);
}

TORCH_LIBRARY_IMPL(fastconv_cuda, Meta, m) {
  m.impl("batch_norm_stats", &fastconv::batch_norm_stats_meta);
  m.impl("batch_norm_act_backward", &fastconv::batch_norm_act_backward_meta);
  m.impl("batch_norm_act_backward_accumulate", &fastconv::batch_norm_act_backward_accumulate_meta);
}
