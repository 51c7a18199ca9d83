// fastconv_cuda::bn_act_forward / bn_act_backward: argument checks, output allocation and
// the CUDA dispatch-key registration. Kernels live in bn_act_forward.cu / bn_act_backward.cu.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "bn_act.h"
#include "checks.h"

namespace fastconv {
namespace {

// Checks shared by both ops: x is a 4-D float/half/bf16 CUDA tensor; scale/shift are 1-D
// [C] on x's device, with one dtype that is x's dtype or float32 (batch_norm's mixed
// precision convention); the activation code is known.
void check_common(const char* op, const at::Tensor& x, const at::Tensor& scale,
                  const at::Tensor& shift, int64_t activation) {
  check_input(op, x, "x", 4);
  FC_CHECK(is_supported_dtype(x.scalar_type()), op, "x", "float32, float16 or bfloat16",
           x.scalar_type());
  const std::string channels = c10::str("C = x.size(1) = ", x.size(1));
  check_channel_vector(op, scale, "scale", x, x.size(1), channels, /*allow_float=*/true);
  check_channel_vector(op, shift, "shift", x, x.size(1), channels, /*allow_float=*/true);
  FC_CHECK(shift.scalar_type() == scale.scalar_type(), op, "shift",
           c10::str("scale's dtype (", scale.scalar_type(), ")"), shift.scalar_type());
  check_activation(op, "activation", activation);
}

constexpr const char* kForward = "fastconv_cuda::bn_act_forward";
constexpr const char* kForwardOut = "fastconv_cuda::bn_act_forward_out";
constexpr const char* kBackward = "fastconv_cuda::bn_act_backward";

// out of bn_act_forward_out: x's shape, dtype and device, its elements distinct and apart
// from x's (the kernels read x and write out in one pass, in no particular order).
void check_out(const at::Tensor& x, const at::Tensor& out) {
  check_like(kForwardOut, out, "out", x, "x");
  FC_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, kForwardOut, "out",
           "a tensor whose elements do not overlap one another", c10::str("strides ", out.strides()));
  // Meta tensors have no memory to overlap (their storages all read as aliases): checked on CUDA.
  FC_CHECK(x.is_meta() || !may_share_elements(out, x), kForwardOut,
           "out", "a tensor that does not overlap x", "one that does");
}

// Meta kernels: the same checks and output allocation as the CUDA kernels, no launch. They
// give the raw ops shapes under fake tensors, and let a machine without a GPU test the checks.
at::Tensor bn_act_forward_meta(const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& shift, int64_t activation) {
  check_common(kForward, x, scale, shift, activation);
  // preserve_format: same strides as a dense x, else x's suggested memory format.
  return at::empty_like(x);
}

void bn_act_forward_out_meta(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                             int64_t activation, const at::Tensor& out) {
  check_common(kForwardOut, x, scale, shift, activation);
  check_out(x, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_meta(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& shift, int64_t activation) {
  check_common(kBackward, x, scale, shift, activation);
  check_like(kBackward, grad_y, "grad_y", x, "x");
  return {at::empty_like(x), at::empty({x.size(1)}, scale.options()),
          at::empty({x.size(1)}, shift.options())};
}

at::Tensor bn_act_forward(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                          int64_t activation) {
  at::Tensor y = bn_act_forward_meta(x, scale, shift, activation);
  if (y.numel() == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  launch_bn_act_forward(x, scale.contiguous(), shift.contiguous(), y,
                        static_cast<int>(activation));
  return y;
}

void bn_act_forward_out(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                        int64_t activation, const at::Tensor& out) {
  bn_act_forward_out_meta(x, scale, shift, activation, out);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  // The layout is analysed over x and out together (make_layout): a slice of a wider buffer
  // keeps the rows path when both have channels innermost, the vector loads when both align.
  launch_bn_act_forward(x, scale.contiguous(), shift.contiguous(), out, static_cast<int>(activation));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward(const at::Tensor& grad_y,
                                                               const at::Tensor& x,
                                                               const at::Tensor& scale,
                                                               const at::Tensor& shift,
                                                               int64_t activation) {
  auto [grad_x, grad_scale, grad_shift] = bn_act_backward_meta(grad_y, x, scale, shift, activation);
  if (x.numel() == 0) {
    // Empty sums: the parameter gradients are exactly zero.
    return {grad_x, grad_scale.zero_(), grad_shift.zero_()};
  }
  const c10::cuda::CUDAGuard guard(x.device());
  launch_bn_act_backward(grad_y, x, scale.contiguous(), shift.contiguous(), grad_x, grad_scale,
                         grad_shift, static_cast<int>(activation));
  return {grad_x, grad_scale, grad_shift};
}

}  // namespace
}  // namespace fastconv

// The schemas are defined once, in registration.cpp.
TORCH_LIBRARY_IMPL(fastconv_cuda, CUDA, m) {
  m.impl("bn_act_forward", &fastconv::bn_act_forward);
  m.impl("bn_act_forward_out", &fastconv::bn_act_forward_out);
  m.impl("bn_act_backward", &fastconv::bn_act_backward);
}

TORCH_LIBRARY_IMPL(fastconv_cuda, Meta, m) {
  m.impl("bn_act_forward", &fastconv::bn_act_forward_meta);
  m.impl("bn_act_forward_out", &fastconv::bn_act_forward_out_meta);
  m.impl("bn_act_backward", &fastconv::bn_act_backward_meta);
}
