// Host entry points of the depthwise convolution kernels (fastconv_cuda::depthwise_*).
//
// The ops themselves (checks, allocation, path choice, registration) are in depthwise.cu;
// the kernel families live in depthwise_rows.cu (channels-innermost, vectorised over
// channels), depthwise_planes.cu (one (n, c) plane tile per block, input tile in shared
// memory) and depthwise_direct.cu (any layout / 64-bit fallbacks, backward input gather,
// backward weight).
//
// Callers have validated the arguments, set the device guard, allocated the outputs and
// handled empty batches; `weight` and the epilogue vectors are contiguous.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastconv {

// One depthwise correlation "in -> out":
//   out[n, oc, i, j] = epi(sum_{a,b} in[n, oc / m, i*sh - pt + a*dh, j*sw - pl + b*dw] * w'[oc, a, b])
// with m = out.size(1) / in.size(1), zero padding and w' = weight, or weight rotated by 180
// degrees when `flip` (the stride-1 backward-input pass is this correlation on grad_c with
// flipped taps and pt' = (KH-1)*dh - pt, which may be negative).
struct DwConv {
  at::Tensor in;      // (N, Cin, Hi, Wi), any strides
  at::Tensor weight;  // (Cout, 1, KH, KW), contiguous, in's dtype
  at::Tensor out;     // (N, Cout, Ho, Wo), any non-overlapping strides
  int64_t KH, KW, sh, sw, pt, pl, dh, dw;
  bool flip = false;
  // Epilogue out = act((acc + bias[oc]) * scale[oc] + shift[oc]); undefined = absent.
  at::Tensor bias, scale, shift;
  int act = 0;
};

// `op` below is the call's TuneOp (autotune.h): kOpDwForward or kOpDwBackwardInput.

// Channels-innermost in and out, m == 1, 16-byte packs along channels. Returns false (and
// launches nothing) when the problem does not qualify.
bool launch_dw_rows(const DwConv& p, int op);

// Plane tiles in shared memory; any in/out strides, any m. Returns false when the tensors
// need 64-bit indexing or the smallest tile does not fit in shared memory.
bool launch_dw_planes(const DwConv& p, int op);

// One output element per thread, any layout, 32- or 64-bit indexing. Always applies.
void launch_dw_direct(const DwConv& p);

// Backward input (gather form, no atomics), any stride / dilation / multiplier:
// grad_x[n, c, h, w] = sum_{k < m, a, b} grad_c[n, c*m + k, i, j] * weight[c*m + k, a, b]
// over the (a, b) with h = i*sh - pt + a*dh and w = j*sw - pl + b*dw for integer in-range i, j.
void launch_dw_gather(const at::Tensor& grad_c, const at::Tensor& weight,
                      const at::Tensor& grad_x, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                      int64_t dh, int64_t dw);

// Backward weight and bias, deterministic two-stage reduction.
void launch_dw_wgrad(const at::Tensor& grad_c, const at::Tensor& x, int64_t KH, int64_t KW,
                     int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh, int64_t dw,
                     const at::Tensor& grad_weight, const at::Tensor& grad_bias);

}  // namespace fastconv
