// Argument validation for the fastconv_cuda ops, written once for every kernel family.
//
// Every failure message names the op, the argument, what was expected and what was
// actually passed, so a caller can fix the call without reading this code.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "activation_codes.h"
#include "layout.h"

// FC_CHECK(cond, op, arg, expected, actual): `expected` and `actual` are anything
// c10::str can print; build composite descriptions with c10::str(...).
#define FC_CHECK(cond, op, arg, expected, actual)                                    \
  TORCH_CHECK((cond), op, ": argument '", arg, "' must be ", expected, ", but got ", \
              actual)

#define FC_CHECK_DIM(op, t, arg, d)                   \
  FC_CHECK((t).dim() == (d), op, arg, c10::str(d, "-D"), \
           c10::str((t).dim(), "-D with shape ", (t).sizes()))

#define FC_CHECK_SAME_DEVICE(op, t, arg, ref, ref_arg)                                   \
  FC_CHECK((t).device() == (ref).device(), op, arg,                                      \
           c10::str("on the same device as '", ref_arg, "' (", (ref).device(), ")"), \
           (t).device())

namespace fastconv {

// The element types of the bn_act, depthwise and batch_norm kernels (the tensor-core GEMMs
// have their own rule, gemm_launch.cuh's check_mma_dtype: fp32 only as tf32).
inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The main input of an op: a CUDA tensor, or a meta tensor (the Meta kernels run these same
// checks without a GPU), of `dim` dimensions.
inline void check_input(const char* op, const at::Tensor& t, const char* arg, int64_t dim) {
  FC_CHECK(t.is_cuda() || t.is_meta(), op, arg, "a CUDA tensor",
           c10::str("a tensor on ", t.device()));
  FC_CHECK_DIM(op, t, arg, dim);
}

// t has ref's shape, device and dtype (a gradient of ref, say).
inline void check_like(const char* op, const at::Tensor& t, const char* arg, const at::Tensor& ref,
                       const char* ref_arg) {
  FC_CHECK_SAME_DEVICE(op, t, arg, ref, ref_arg);
  FC_CHECK(t.sizes() == ref.sizes(), op, arg, c10::str(ref_arg, "'s shape ", ref.sizes()),
           t.sizes());
  FC_CHECK(t.scalar_type() == ref.scalar_type(), op, arg,
           c10::str(ref_arg, "'s dtype (", ref.scalar_type(), ")"), t.scalar_type());
}

// Whether a and b (same dtype) can share an element. Exact for the case that matters: channel
// slices of one channels_last buffer (DenseNet's concatenations, an Inception block's
// branches), which interleave in memory but share no element: same pixel strides and sizes,
// channel stride 1, and per-pixel channel runs [offset, offset + C) that fit between pixels.
// Otherwise, overlapping address ranges count as sharing. (at::get_overlap_status answers
// TooHard for any tensor that is not dense, a slice among them, even of another storage.)
// The twin of fastconv/ops/pointwise.py's _may_overlap.
inline bool may_share_elements(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.is_alias_of(b)) return false;
  auto span = [](const at::Tensor& t) {  // [first, last] element offsets in the storage
    int64_t last = t.storage_offset();
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    return std::pair<int64_t, int64_t>{t.storage_offset(), last};
  };
  const auto [a_first, a_last] = span(a);
  const auto [b_first, b_last] = span(b);
  if (a_last < b_first || b_last < a_first) return false;
  if (a.dim() != 4 || b.dim() != 4) return true;
  bool same_pixels = a.size(2) == b.size(2) && a.size(3) == b.size(3);
  for (int d : {0, 2, 3}) same_pixels = same_pixels && a.stride(d) == b.stride(d);
  if (same_pixels && a.stride(1) == 1 && b.stride(1) == 1) {
    const int64_t base = std::min(a.storage_offset(), b.storage_offset());
    const int64_t a0 = a.storage_offset() - base, a1 = a0 + a.size(1);
    const int64_t b0 = b.storage_offset() - base, b1 = b0 + b.size(1);
    int64_t min_pixel_stride = std::numeric_limits<int64_t>::max();
    for (int d : {0, 2, 3}) {
      if (a.size(d) > 1) min_pixel_stride = std::min(min_pixel_stride, a.stride(d));
    }
    if (std::max(a1, b1) <= min_pixel_stride) return a0 < b1 && b0 < a1;
  }
  return true;
}

inline void check_activation(const char* op, const char* name, int64_t code) {
  FC_CHECK(code >= 0 && code < kActCount, op, name,
           c10::str("an activation code in [0, ", kActCount - 1,
                    "] (0 none, 1 relu, 2 relu6, 3 silu, 4 hardswish)"),
           code);
}

// Optional per-channel vector: 1-D of `size` on x's device, x's dtype (or float32 when
// allow_float). `what` says which channels, e.g. "C_out = weight.size(0) = 24".
inline void check_channel_vector(const char* op, const std::optional<at::Tensor>& t,
                                 const char* name, const at::Tensor& x, int64_t size,
                                 const std::string& what, bool allow_float) {
  if (!t.has_value() || !t->defined()) return;
  FC_CHECK_SAME_DEVICE(op, *t, name, x, "x");
  FC_CHECK(t->dim() == 1 && t->size(0) == size, op, name, c10::str("a 1-D tensor of size ", what),
           c10::str("shape ", t->sizes()));
  if (allow_float) {
    FC_CHECK(t->scalar_type() == x.scalar_type() || t->scalar_type() == at::kFloat, op, name,
             c10::str("x's dtype (", x.scalar_type(), ") or float32"), t->scalar_type());
  } else {
    FC_CHECK(t->scalar_type() == x.scalar_type(), op, name,
             c10::str("x's dtype (", x.scalar_type(), ")"), t->scalar_type());
  }
}

// The int lists of a 2-D convolution on x: stride (sh, sw), padding (top, left, bottom,
// right), dilation (dh, dw). Each value and the padded input size are bounded by
// kMaxNarrowIndex (2^30), so the kernels' int32 tap coordinates cannot overflow. Returns the
// padded input's (rows, columns).
inline std::pair<int64_t, int64_t> check_conv_params(const char* op, const at::Tensor& x,
                                                     at::IntArrayRef stride,
                                                     at::IntArrayRef padding,
                                                     at::IntArrayRef dilation) {
  FC_CHECK(stride.size() == 2, op, "stride", "a list of 2 ints (sh, sw)", stride);
  FC_CHECK(padding.size() == 4, op, "padding",
           "a list of 4 ints (pad_top, pad_left, pad_bottom, pad_right)", padding);
  FC_CHECK(dilation.size() == 2, op, "dilation", "a list of 2 ints (dh, dw)", dilation);
  for (int64_t s : stride) {
    FC_CHECK(s >= 1 && s <= kMaxNarrowIndex, op, "stride", "in [1, 2^30] in each dim", stride);
  }
  for (int64_t p : padding) {
    FC_CHECK(p >= 0 && p <= kMaxNarrowIndex, op, "padding", "in [0, 2^30] in each entry",
             padding);
  }
  for (int64_t d : dilation) {
    FC_CHECK(d >= 1 && d <= kMaxNarrowIndex, op, "dilation", "in [1, 2^30] in each dim",
             dilation);
  }
  const int64_t Hp = x.size(2) + padding[0] + padding[2], Wp = x.size(3) + padding[1] + padding[3];
  FC_CHECK(Hp <= kMaxNarrowIndex && Wp <= kMaxNarrowIndex, op, "padding",
           "such that the padded input is at most 2^30 rows and columns",
           c10::str(padding, " on x of shape ", x.sizes()));
  return {Hp, Wp};
}

}  // namespace fastconv
