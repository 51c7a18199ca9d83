// fastconv_cuda::inverted_residual_forward: the MobileNetV2 inverted residual (and, without
// the expansion, the depthwise-separable block) in one kernel, the expanded tensor never in
// memory; BatchNorm scales folded into the weights by the caller (fastconv/ops/
// inverted_residual.py), shifts as float32 biases. This file holds the op: its checks (shared
// with the Meta kernel) and its launches of the two kernels, `kernel` 0 on the CUDA cores
// (inverted_residual_kernel.cuh, every dtype) and 1 on the tensor cores
// (inverted_residual_mma_kernel.cuh, fp16 / bf16; launched by inverted_residual_mma.cu).
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "checks.h"
#include "common.cuh"
#include "inverted_residual.h"
#include "inverted_residual_kernel.cuh"
#include "inverted_residual_mma.h"

namespace fastconv {
namespace {

constexpr const char* kOp = "fastconv_cuda::inverted_residual_forward";
constexpr int64_t kMaxSharedBytes = 96 * 1024;  // of sm_90's 227 KB: two CTAs an SM
const at::Tensor* present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

void check_matrix(const at::Tensor& w, const char* name, const at::Tensor& x, int64_t rows,
                  int64_t columns, const char* shape) {
  FC_CHECK_SAME_DEVICE(kOp, w, name, x, "x");
  FC_CHECK(w.scalar_type() == x.scalar_type(), kOp, name, c10::str("x's dtype (", x.scalar_type(), ")"),
           w.scalar_type());
  FC_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == columns && w.is_contiguous(), kOp, name,
           c10::str("a contiguous ", shape, " = (", rows, ", ", columns, ") matrix"),
           c10::str("shape ", w.sizes(), " with strides ", w.strides()));
}

void check_bias(const std::optional<at::Tensor>& b, const char* name, const at::Tensor& x, int64_t size) {
  const at::Tensor* t = present(b);
  if (t == nullptr) return;
  FC_CHECK_SAME_DEVICE(kOp, *t, name, x, "x");
  FC_CHECK(t->dim() == 1 && t->size(0) == size && t->is_contiguous() && t->scalar_type() == at::kFloat,
           kOp, name, c10::str("a contiguous float32 vector of ", size), c10::str(t->sizes(), " ", t->scalar_type()));
}

// Every argument, and the kernel's limits; returns the input window of a tile.
std::pair<int, int> check_block(const at::Tensor& x, const std::optional<at::Tensor>& expand_weight,
                                const std::optional<at::Tensor>& expand_bias, const at::Tensor& dw_weight,
                                const std::optional<at::Tensor>& dw_bias, const at::Tensor& project_weight,
                                const std::optional<at::Tensor>& project_bias, at::IntArrayRef kernel_size,
                                int64_t stride, at::IntArrayRef padding, int64_t dilation, int64_t act_e,
                                int64_t act_d, int64_t act_p, const std::optional<at::Tensor>& residual,
                                const at::Tensor& out, int64_t kernel) {
  check_input(kOp, x, "x", 4);
  FC_CHECK(is_supported_dtype(x.scalar_type()), kOp, "x", "float32, float16 or bfloat16", x.scalar_type());
  FC_CHECK(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1 && x.size(2) <= kMaxNarrowIndex &&
               x.size(3) <= kMaxNarrowIndex && x.size(1) <= kMaxNarrowIndex,
           kOp, "x", "at least one channel, row and column, and at most 2^30 of each", c10::str("shape ", x.sizes()));
  FC_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1 && kernel_size[0] <= 15 &&
               kernel_size[1] <= 15,
           kOp, "kernel_size", "two sizes in [1, 15]", kernel_size);
  FC_CHECK(stride >= 1 && stride <= 4, kOp, "stride", "in [1, 4]", stride);
  FC_CHECK(dilation >= 1 && dilation <= 4, kOp, "dilation", "in [1, 4]", dilation);
  FC_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0 && padding[0] <= 64 && padding[1] <= 64,
           kOp, "padding", "(top, left), each in [0, 64]", padding);
  for (const auto& [name, code] : {std::pair<const char*, int64_t>{"expand_activation", act_e},
                                   {"dw_activation", act_d}, {"project_activation", act_p}}) {
    check_activation(kOp, name, code);
  }
  const int64_t C_in = x.size(1), C_hid = dw_weight.size(0), C_out = project_weight.size(0);
  if (const at::Tensor* we = present(expand_weight)) {
    check_matrix(*we, "expand_weight", x, C_hid, C_in, "(C_hid, C_in)");
  } else {
    FC_CHECK(C_hid == C_in, kOp, "dw_weight", c10::str("C_in = ", C_in, " rows without an expansion"), C_hid);
    FC_CHECK(present(expand_bias) == nullptr, kOp, "expand_bias", "None without an expansion", "a tensor");
  }
  check_matrix(dw_weight, "dw_weight", x, C_hid, kernel_size[0] * kernel_size[1], "(C_hid, kh * kw)");
  check_matrix(project_weight, "project_weight", x, C_out, C_hid, "(C_out, C_hid)");
  FC_CHECK(C_out >= 1 && C_out <= kMaxNarrowIndex, kOp, "project_weight", "1 to 2^30 output channels", C_out);
  check_bias(expand_bias, "expand_bias", x, C_hid);
  check_bias(dw_bias, "dw_bias", x, C_hid);
  check_bias(project_bias, "project_bias", x, C_out);
  FC_CHECK_SAME_DEVICE(kOp, out, "out", x, "x");
  FC_CHECK(out.scalar_type() == x.scalar_type(), kOp, "out", c10::str("x's dtype (", x.scalar_type(), ")"),
           out.scalar_type());
  // Ho and Wo come from out (the caller's bottom and right padding shape them); every read of x
  // is bounds-checked, so any output size is safe.
  FC_CHECK(out.dim() == 4 && out.size(0) == x.size(0) && out.size(1) == C_out && out.size(2) >= 1 &&
               out.size(3) >= 1 && out.size(2) <= kMaxNarrowIndex && out.size(3) <= kMaxNarrowIndex,
           kOp, "out", c10::str("(N, C_out, Ho, Wo) = (", x.size(0), ", ", C_out, ", Ho, Wo), Ho and Wo >= 1"),
           c10::str("shape ", out.sizes()));
  FC_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, kOp, "out",
           "a tensor whose elements do not overlap one another", c10::str("strides ", out.strides()));
  FC_CHECK(x.is_meta() || !may_share_elements(out, x), kOp, "out",
           "a tensor that does not overlap x", "one that does");
  if (const at::Tensor* r = present(residual)) {
    check_like(kOp, *r, "residual", out, "out");
    FC_CHECK(x.is_meta() || !may_share_elements(out, *r), kOp, "residual",
             "a tensor that does not overlap out", "one that does");
  }
  FC_CHECK(kernel == kCudaCoreKernel || kernel == kTensorCoreKernel, kOp, "kernel",
           c10::str(kCudaCoreKernel, " (CUDA cores) or ", kTensorCoreKernel, " (tensor cores)"), kernel);
  const int k_h = static_cast<int>(kernel_size[0]), k_w = static_cast<int>(kernel_size[1]);
  const int s = static_cast<int>(stride), dil = static_cast<int>(dilation);
  if (kernel == kTensorCoreKernel) {
    const int win_h = window(mma_block::kTileH, k_h, s, dil), win_w = window(mma_block::kTileW, k_w, s, dil);
    const std::string why = mma_block::unsupported(x.scalar_type(), C_in, C_hid, win_h, win_w, present(expand_weight));
    FC_CHECK(why.empty(), kOp, "kernel", c10::str("a block the tensor-core kernel takes: ", why), kernel);
    return {win_h, win_w};
  }
  const int win_h = window(fma_block::kTileH, k_h, s, dil), win_w = window(fma_block::kTileW, k_w, s, dil);
  const int64_t bytes = fma_block::shared_bytes(win_h, win_w, C_in, x.element_size());
  FC_CHECK(bytes <= kMaxSharedBytes, kOp, "x",
           c10::str("few enough input channels for a tile's ", win_h, "x", win_w, " window in ", kMaxSharedBytes,
                    " bytes of shared memory (wider blocks take Triton's kernel)"),
           c10::str(C_in, " channels of ", x.element_size(), " bytes: ", bytes, " bytes"));
  return {win_h, win_w};
}

void inverted_residual_forward_meta(const at::Tensor& x, const std::optional<at::Tensor>& expand_weight,
                                    const std::optional<at::Tensor>& expand_bias, const at::Tensor& dw_weight,
                                    const std::optional<at::Tensor>& dw_bias, const at::Tensor& project_weight,
                                    const std::optional<at::Tensor>& project_bias, at::IntArrayRef kernel_size,
                                    int64_t stride, at::IntArrayRef padding, int64_t dilation, int64_t act_e,
                                    int64_t act_d, int64_t act_p, const std::optional<at::Tensor>& residual,
                                    const at::Tensor& out, int64_t kernel) {
  check_block(x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight, project_bias, kernel_size, stride,
              padding, dilation, act_e, act_d, act_p, residual, out, kernel);
}

void inverted_residual_forward(const at::Tensor& x, const std::optional<at::Tensor>& expand_weight,
                               const std::optional<at::Tensor>& expand_bias, const at::Tensor& dw_weight,
                               const std::optional<at::Tensor>& dw_bias, const at::Tensor& project_weight,
                               const std::optional<at::Tensor>& project_bias, at::IntArrayRef kernel_size,
                               int64_t stride, at::IntArrayRef padding, int64_t dilation, int64_t act_e,
                               int64_t act_d, int64_t act_p, const std::optional<at::Tensor>& residual,
                               const at::Tensor& out, int64_t kernel) {
  const auto [win_h, win_w] = check_block(x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight,
                                          project_bias, kernel_size, stride, padding, dilation, act_e, act_d, act_p,
                                          residual, out, kernel);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  BlockArgs a{};
  a.x = x.const_data_ptr();
  a.xn = x.stride(0), a.xc = x.stride(1), a.xh = x.stride(2), a.xw = x.stride(3);
  a.C_in = static_cast<int>(x.size(1));
  a.C_hid = static_cast<int>(dw_weight.size(0));
  a.C_out = static_cast<int>(project_weight.size(0));
  a.H = static_cast<int>(x.size(2)), a.W = static_cast<int>(x.size(3));
  a.Ho = static_cast<int>(out.size(2)), a.Wo = static_cast<int>(out.size(3));
  a.we = present(expand_weight) ? expand_weight->const_data_ptr() : nullptr;
  a.wd = dw_weight.const_data_ptr();
  a.wp = project_weight.const_data_ptr();
  a.be = present(expand_bias) ? expand_bias->const_data_ptr<float>() : nullptr;
  a.bd = present(dw_bias) ? dw_bias->const_data_ptr<float>() : nullptr;
  a.bp = present(project_bias) ? project_bias->const_data_ptr<float>() : nullptr;
  a.kh = static_cast<int>(kernel_size[0]), a.kw = static_cast<int>(kernel_size[1]);
  a.stride = static_cast<int>(stride), a.dilation = static_cast<int>(dilation);
  a.pad_top = static_cast<int>(padding[0]), a.pad_left = static_cast<int>(padding[1]);
  a.act_e = static_cast<int>(act_e), a.act_d = static_cast<int>(act_d), a.act_p = static_cast<int>(act_p);
  if (const at::Tensor* r = present(residual)) {
    a.residual = r->const_data_ptr();
    a.rn = r->stride(0), a.rc = r->stride(1), a.rh = r->stride(2), a.rw = r->stride(3);
  }
  a.out = out.data_ptr();
  a.on = out.stride(0), a.oc = out.stride(1), a.oh = out.stride(2), a.ow = out.stride(3);
  a.win_h = win_h, a.win_w = win_w;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (kernel == kTensorCoreKernel) {
    // Its operands are loaded as 32-bit channel pairs: weights whose data starts at an odd
    // element (a sliced parameter) are copied once (clone aligns them).
    at::Tensor we_aligned, wp_aligned;
    if (a.we != nullptr && reinterpret_cast<uintptr_t>(a.we) % 4 != 0) {
      we_aligned = expand_weight->clone();
      a.we = we_aligned.const_data_ptr();
    }
    if (reinterpret_cast<uintptr_t>(a.wp) % 4 != 0) {
      wp_aligned = project_weight.clone();
      a.wp = wp_aligned.const_data_ptr();
    }
    a.tiles_h = static_cast<int>(ceil_div(a.Ho, mma_block::kTileH));
    a.tiles_w = static_cast<int>(ceil_div(a.Wo, mma_block::kTileW));
    mma_block::launch(a, x.scalar_type(), x.get_device(), x.size(0), stream);
    return;
  }
  a.tiles_h = static_cast<int>(ceil_div(a.Ho, fma_block::kTileH));
  a.tiles_w = static_cast<int>(ceil_div(a.Wo, fma_block::kTileW));
  const int64_t blocks = x.size(0) * int64_t{a.tiles_h} * a.tiles_w;
  TORCH_CHECK(blocks < (int64_t{1} << 31), kOp, ": ", blocks, " tiles exceed the grid");
  const int64_t bytes = fma_block::shared_bytes(win_h, win_w, a.C_in, x.element_size());
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(cudaFuncSetAttribute(fma_block::inverted_residual_kernel<T>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    for (int o0 = 0; o0 < a.C_out; o0 += fma_block::kGroupOut) {  // one launch a group
      fma_block::inverted_residual_kernel<T><<<static_cast<unsigned>(blocks), fma_block::kThreads, bytes, stream>>>(
          group_args<T>(a, o0, fma_block::kGroupOut));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat: launch(float{}); break;
    case at::kHalf: launch(c10::Half{}); break;
    default: launch(c10::BFloat16{}); break;
  }
}

}  // namespace
}  // namespace fastconv

// The schema is defined once, in registration.cpp.
TORCH_LIBRARY_IMPL(fastconv_cuda, CUDA, m) {
  m.impl("inverted_residual_forward", &fastconv::inverted_residual_forward);
}

TORCH_LIBRARY_IMPL(fastconv_cuda, Meta, m) {
  m.impl("inverted_residual_forward", &fastconv::inverted_residual_forward_meta);
}
