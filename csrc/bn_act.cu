// fastconv_cuda::bn_act_forward / bn_act_backward: argument checks, output allocation and
// the CUDA dispatch-key registration. Kernels live in bn_act_forward.cu / bn_act_backward.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "activations.cuh"
#include "bn_act.h"
#include "checks.h"

namespace fastconv {
namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Checks shared by both ops: x is a 4-D float/half/bf16 CUDA tensor; scale/shift are 1-D
// [C] on x's device, with one dtype that is x's dtype or float32 (batch_norm's mixed
// precision convention); the activation code is known.
void check_common(const char* op, const at::Tensor& x, const at::Tensor& scale,
                  const at::Tensor& shift, int64_t activation) {
  // Meta tensors pass too: the Meta kernels below run these same checks without a GPU.
  FC_CHECK(x.is_cuda() || x.is_meta(), op, "x", "a CUDA tensor", c10::str("a tensor on ", x.device()));
  FC_CHECK_DIM(op, x, "x", 4);
  FC_CHECK(is_supported_dtype(x.scalar_type()), op, "x", "float32, float16 or bfloat16",
           x.scalar_type());
  const int64_t C = x.size(1);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{scale, "scale"},
                                std::pair<const at::Tensor&, const char*>{shift, "shift"}}) {
    FC_CHECK_SAME_DEVICE(op, t, name, x, "x");
    FC_CHECK(t.dim() == 1 && t.size(0) == C, op, name,
             c10::str("a 1-D tensor of size C = x.size(1) = ", C), c10::str("shape ", t.sizes()));
  }
  FC_CHECK(scale.scalar_type() == x.scalar_type() || scale.scalar_type() == at::kFloat, op,
           "scale", c10::str("x's dtype (", x.scalar_type(), ") or float32"), scale.scalar_type());
  FC_CHECK(shift.scalar_type() == scale.scalar_type(), op, "shift",
           c10::str("scale's dtype (", scale.scalar_type(), ")"), shift.scalar_type());
  FC_CHECK(activation >= 0 && activation < kActCount, op, "activation",
           c10::str("an activation code in [0, ", kActCount - 1,
                    "] (0 none, 1 relu, 2 relu6, 3 silu, 4 hardswish)"),
           activation);
}

void check_grad(const char* op, const at::Tensor& grad_y, const at::Tensor& x) {
  FC_CHECK_SAME_DEVICE(op, grad_y, "grad_y", x, "x");
  FC_CHECK(grad_y.sizes() == x.sizes(), op, "grad_y", c10::str("x's shape ", x.sizes()),
           grad_y.sizes());
  FC_CHECK(grad_y.scalar_type() == x.scalar_type(), op, "grad_y",
           c10::str("x's dtype (", x.scalar_type(), ")"), grad_y.scalar_type());
}

constexpr const char* kForward = "fastconv_cuda::bn_act_forward";
constexpr const char* kBackward = "fastconv_cuda::bn_act_backward";

// Meta kernels: the same checks and output allocation as the CUDA kernels, no launch. They
// give the raw ops shapes under fake tensors, and let a machine without a GPU test the checks.
at::Tensor bn_act_forward_meta(const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& shift, int64_t activation) {
  check_common(kForward, x, scale, shift, activation);
  // preserve_format: same strides as a dense x, else x's suggested memory format.
  return at::empty_like(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_meta(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& shift, int64_t activation) {
  check_common(kBackward, x, scale, shift, activation);
  check_grad(kBackward, grad_y, x);
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
  m.impl("bn_act_backward", &fastconv::bn_act_backward);
}

TORCH_LIBRARY_IMPL(fastconv_cuda, Meta, m) {
  m.impl("bn_act_forward", &fastconv::bn_act_forward_meta);
  m.impl("bn_act_backward", &fastconv::bn_act_backward_meta);
}
