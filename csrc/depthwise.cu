// fastconv_cuda::depthwise_forward / depthwise_backward_input / depthwise_backward_weight:
// argument checks, output allocation, kernel-family choice and the CUDA / Meta
// registrations. Kernels live in depthwise_rows.cu, depthwise_planes.cu and
// depthwise_direct.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "autotune.h"
#include "checks.h"
#include "depthwise.h"
#include "layout.h"

namespace fastconv {
namespace {

constexpr const char* kForward = "fastconv_cuda::depthwise_forward";
constexpr const char* kBackwardInput = "fastconv_cuda::depthwise_backward_input";
constexpr const char* kBackwardWeight = "fastconv_cuda::depthwise_backward_weight";

// Validated geometry of one depthwise convolution.
struct Geometry {
  int64_t N, C, H, W;  // x
  int64_t Cm, m;       // weight.size(0) = C * m
  int64_t KH, KW, sh, sw, pt, pl, pb, pr, dh, dw;
  int64_t Ho, Wo;
};

// Checks x, weight and the int lists; returns the geometry. Sizes, paddings, strides and
// dilations are bounded by kMaxNarrowIndex so the kernels' int32 coordinates never overflow.
Geometry check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_input(op, x, "x", 4);
  FC_CHECK(is_supported_dtype(x.scalar_type()), op, "x", "float32, float16 or bfloat16",
           x.scalar_type());
  FC_CHECK(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1, op, "x",
           "a tensor with at least one channel, row and column (N may be 0)",
           c10::str("shape ", x.sizes()));
  FC_CHECK(x.size(0) <= std::numeric_limits<int32_t>::max() && x.size(1) <= kMaxNarrowIndex &&
               x.size(2) <= kMaxNarrowIndex && x.size(3) <= kMaxNarrowIndex,
           op, "x", c10::str("at most 2^31-1 images and 2^30 channels, rows, columns"),
           c10::str("shape ", x.sizes()));

  FC_CHECK_SAME_DEVICE(op, weight, "weight", x, "x");
  FC_CHECK(weight.scalar_type() == x.scalar_type(), op, "weight",
           c10::str("x's dtype (", x.scalar_type(), ")"), weight.scalar_type());
  const int64_t C = x.size(1);
  FC_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(0) >= C &&
               weight.size(0) % C == 0 && weight.size(2) >= 1 && weight.size(3) >= 1,
           op, "weight",
           c10::str("a 4-D tensor of shape (C*m, 1, KH, KW) with C = x.size(1) = ", C,
                    ", m >= 1, KH >= 1, KW >= 1"),
           c10::str("shape ", weight.sizes()));
  FC_CHECK(weight.size(0) <= kMaxNarrowIndex, op, "weight", "at most 2^30 output channels",
           c10::str("shape ", weight.sizes()));

  const auto [Hp, Wp] = check_conv_params(op, x, stride, padding, dilation);

  Geometry g;
  g.N = x.size(0);
  g.C = C;
  g.H = x.size(2);
  g.W = x.size(3);
  g.Cm = weight.size(0);
  g.m = g.Cm / C;
  g.KH = weight.size(2);
  g.KW = weight.size(3);
  g.sh = stride[0];
  g.sw = stride[1];
  g.pt = padding[0];
  g.pl = padding[1];
  g.pb = padding[2];
  g.pr = padding[3];
  g.dh = dilation[0];
  g.dw = dilation[1];
  // Effective extents in int64 (KH, dh are each < 2^31, their product may not fit int32).
  const int64_t ext_h = (g.KH - 1) * g.dh + 1, ext_w = (g.KW - 1) * g.dw + 1;
  g.Ho = ext_h <= Hp ? (Hp - ext_h) / g.sh + 1 : 0;
  g.Wo = ext_w <= Wp ? (Wp - ext_w) / g.sw + 1 : 0;
  FC_CHECK(g.Ho >= 1 && g.Wo >= 1, op, "weight",
           "a (dilated) kernel that fits in the padded input (output size >= 1)",
           c10::str("kernel ", g.KH, "x", g.KW, " with dilation ", dilation, " on padded input ",
                    Hp, "x", Wp, " (output ", (Hp - ext_h) / g.sh + 1, "x",
                    (Wp - ext_w) / g.sw + 1, ")"));
  return g;
}

void check_grad(const char* op, const at::Tensor& grad_c, const at::Tensor& x,
                const Geometry& g) {
  FC_CHECK_SAME_DEVICE(op, grad_c, "grad_c", x, "x");
  FC_CHECK(grad_c.scalar_type() == x.scalar_type(), op, "grad_c",
           c10::str("x's dtype (", x.scalar_type(), ")"), grad_c.scalar_type());
  const std::vector<int64_t> expected = {g.N, g.Cm, g.Ho, g.Wo};
  FC_CHECK(grad_c.sizes() == at::IntArrayRef(expected), op, "grad_c",
           c10::str("the output's shape ", at::IntArrayRef(expected)), grad_c.sizes());
}

at::Tensor opt_contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// Runs one correlation with the best applicable kernel family: the rows kernels when the
// output's channels are innermost (as the layout rule makes them for a channels_last x).
void run_conv(const DwConv& p, int op) {
  if (channels_innermost(p.out)) {
    if (!launch_dw_rows(p, op)) launch_dw_direct(p);
  } else {
    if (!launch_dw_planes(p, op)) launch_dw_direct(p);
  }
}

// ---------------------------------------------------------------------------------------
// Meta kernels: the same checks and output allocation as the CUDA kernels, no launch.

at::Tensor depthwise_forward_meta(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  const std::optional<at::Tensor>& scale,
                                  const std::optional<at::Tensor>& shift, int64_t activation) {
  const Geometry g = check_conv(kForward, x, weight, stride, padding, dilation);
  const std::string outs = c10::str("C*m = weight.size(0) = ", g.Cm);
  check_channel_vector(kForward, bias, "bias", x, g.Cm, outs, /*allow_float=*/false);
  check_channel_vector(kForward, scale, "scale", x, g.Cm, outs, /*allow_float=*/true);
  check_channel_vector(kForward, shift, "shift", x, g.Cm, outs, /*allow_float=*/true);
  check_activation(kForward, "activation", activation);
  return empty_output(x, {g.N, g.Cm, g.Ho, g.Wo});
}

at::Tensor depthwise_backward_input_meta(const at::Tensor& grad_c, const at::Tensor& x,
                                         const at::Tensor& weight, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = check_conv(kBackwardInput, x, weight, stride, padding, dilation);
  check_grad(kBackwardInput, grad_c, x, g);
  return empty_output(x, x.sizes());
}

std::tuple<at::Tensor, at::Tensor> depthwise_backward_weight_meta(
    const at::Tensor& grad_c, const at::Tensor& x, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = check_conv(kBackwardWeight, x, weight, stride, padding, dilation);
  check_grad(kBackwardWeight, grad_c, x, g);
  return {at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous)),
          at::empty({g.Cm}, x.options().memory_format(at::MemoryFormat::Contiguous))};
}

// ---------------------------------------------------------------------------------------
// CUDA kernels.

at::Tensor depthwise_forward(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation,
                             const std::optional<at::Tensor>& scale,
                             const std::optional<at::Tensor>& shift, int64_t activation) {
  at::Tensor y =
      depthwise_forward_meta(x, weight, bias, stride, padding, dilation, scale, shift, activation);
  if (y.numel() == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  DwConv p;
  p.in = x;
  p.weight = weight.contiguous();
  p.out = y;
  p.KH = weight.size(2);
  p.KW = weight.size(3);
  p.sh = stride[0];
  p.sw = stride[1];
  p.pt = padding[0];
  p.pl = padding[1];
  p.dh = dilation[0];
  p.dw = dilation[1];
  p.bias = opt_contiguous(bias);
  p.scale = opt_contiguous(scale);
  p.shift = opt_contiguous(shift);
  p.act = static_cast<int>(activation);
  run_conv(p, kOpDwForward);
  return y;
}

at::Tensor depthwise_backward_input(const at::Tensor& grad_c, const at::Tensor& x,
                                   const at::Tensor& weight, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  at::Tensor grad_x =
      depthwise_backward_input_meta(grad_c, x, weight, stride, padding, dilation);
  if (grad_x.numel() == 0) return grad_x;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = weight.contiguous();
  const int64_t KH = weight.size(2), KW = weight.size(3);
  if (stride[0] == 1 && stride[1] == 1 && weight.size(0) == x.size(1)) {
    // Stride 1, m == 1: grad_x is the correlation of grad_c with the flipped kernel and
    // padding (K-1)*d - pad (negative when pad exceeds the dilated kernel extent).
    DwConv p;
    p.in = grad_c;
    p.weight = w;
    p.out = grad_x;
    p.KH = KH;
    p.KW = KW;
    p.sh = 1;
    p.sw = 1;
    p.pt = (KH - 1) * dilation[0] - padding[0];
    p.pl = (KW - 1) * dilation[1] - padding[1];
    p.dh = dilation[0];
    p.dw = dilation[1];
    p.flip = true;
    run_conv(p, kOpDwBackwardInput);
  } else {
    launch_dw_gather(grad_c, w, grad_x, stride[0], stride[1], padding[0], padding[1],
                     dilation[0], dilation[1]);
  }
  return grad_x;
}

std::tuple<at::Tensor, at::Tensor> depthwise_backward_weight(
    const at::Tensor& grad_c, const at::Tensor& x, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  auto [grad_w, grad_b] =
      depthwise_backward_weight_meta(grad_c, x, weight, stride, padding, dilation);
  if (grad_c.numel() == 0) {
    // Empty batch: the sums are exactly zero.
    return {grad_w.zero_(), grad_b.zero_()};
  }
  const c10::cuda::CUDAGuard guard(x.device());
  launch_dw_wgrad(grad_c, x, weight.size(2), weight.size(3), stride[0], stride[1], padding[0],
                  padding[1], dilation[0], dilation[1], grad_w, grad_b);
  return {grad_w, grad_b};
}

}  // namespace
}  // namespace fastconv

// The schemas are defined once, in registration.cpp.
TORCH_LIBRARY_IMPL(fastconv_cuda, CUDA, m) {
  m.impl("depthwise_forward", &fastconv::depthwise_forward);
  m.impl("depthwise_backward_input", &fastconv::depthwise_backward_input);
  m.impl("depthwise_backward_weight", &fastconv::depthwise_backward_weight);
}

TORCH_LIBRARY_IMPL(fastconv_cuda, Meta, m) {
  m.impl("depthwise_forward", &fastconv::depthwise_forward_meta);
  m.impl("depthwise_backward_input", &fastconv::depthwise_backward_input_meta);
  m.impl("depthwise_backward_weight", &fastconv::depthwise_backward_weight_meta);
}
