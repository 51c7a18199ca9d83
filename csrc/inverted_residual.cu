// fastconv_cuda::inverted_residual_forward: the MobileNetV2 inverted residual (and, without
// the expansion, the depthwise-separable block) in one kernel, the expanded tensor never in
// memory:
//
//     e = act_e(x @ We^T + be)        1x1 expansion (absent: e = x)
//     d = act_d(dw(e) + bd)           depthwise k x k, stride s, dilation, zero padding of e
//     y = act_p(d @ Wp^T + bp) (+ r)  1x1 projection, then the residual
//
// with the BatchNorm scales folded into the weights by the caller (fastconv/ops/
// inverted_residual.py) and the shifts as float32 biases.
//
// One CTA owns a kTileH x kTileW tile of output pixels of one image and a group of up to
// kGroupOut output channels. One group holds MobileNetV2's widest block (320); MobileNetV1's
// 512- and 1024-channel blocks take two or three, one launch each, each redoing the depthwise
// (the host offsets the projection's rows, its bias, the output and the residual per group:
// done in the kernel, the offsets cost the 128-register budget 108 bytes of spills). It
// stages the tile's input window (the tile and its halo: ((kTileH - 1) s + (kh - 1) dil + 1)
// rows, likewise columns) in shared memory once, in x's dtype, then walks the hidden channels
// in chunks of kChunk: the chunk's expansion over the whole window into shared memory, its
// depthwise conv over the tile into shared memory, and the chunk's share of the projection
// into per-thread float accumulators, which hold the tile's kTileH * kTileW outputs of the
// group (at most kMaxAcc per thread). Only x, the weights and y touch global memory.
//
// This is the CUDA-core kernel: every product is an fp32 FMA, the intermediates stay fp32
// (more exact than eager's half-precision e and d), every dtype. In half precision the op's
// `kernel` argument picks it (0) or the tensor-core kernel (1, inverted_residual_mma.cu: both
// GEMMs on mma.sync, 8x8 tiles); the Python caller times the two at a shape's first call, and
// `auto` times the cuda backend against Triton's kernels. Unmeasured: no GPU has run either.
// ptxas (sm_90, nvcc 13.0, offline): 128 registers for each dtype, no spills.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>

#include "activations.cuh"
#include "checks.h"
#include "common.cuh"
#include "inverted_residual.h"

namespace fastconv {
namespace {

constexpr const char* kOp = "fastconv_cuda::inverted_residual_forward";
constexpr int kThreads = 256;
constexpr int kTileH = 4, kTileW = 4, kTile = kTileH * kTileW;
constexpr int kChunk = 32;  // hidden channels per step
constexpr int kMaxAcc = 24;  // accumulators per thread: kTile * group <= kThreads * kMaxAcc
constexpr int kGroupOut = kThreads * kMaxAcc / kTile;  // 384 output channels a launch
constexpr int64_t kMaxSharedBytes = 96 * 1024;  // of sm_90's 227 KB: two CTAs an SM

// The window of x in x's dtype (16-byte aligned end), then the float chunks of e and d. In
// half precision MobileNetV1's widest window fits: 1024 channels at stride 1 (6x6 pixels) take
// 72 KB, 512 at stride 2 (9x9) 81 KB.
__host__ __device__ inline int64_t window_bytes(int win_h, int win_w, int64_t C_in, int64_t element_size) {
  return (int64_t{win_h} * win_w * C_in * element_size + 15) / 16 * 16;
}

inline int64_t shared_bytes(int win_h, int win_w, int64_t C_in, int64_t element_size) {
  const int64_t pixels = int64_t{win_h} * win_w;
  return window_bytes(win_h, win_w, C_in, element_size) +
         (pixels * kChunk + int64_t{kTile} * kChunk) * int64_t{sizeof(float)};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) inverted_residual_kernel(const BlockArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int pixels = a.win_h * a.win_w;
  T* xs = reinterpret_cast<T*>(smem);  // [pixels][C_in]: the window of x
  float* es = reinterpret_cast<float*>(smem + window_bytes(a.win_h, a.win_w, a.C_in, sizeof(T)));  // [pixels][kChunk]
  float* ds = es + pixels * kChunk;    // [kTile][kChunk]: the chunk of d

  const int tid = threadIdx.x;
  const int64_t tiles = int64_t{a.tiles_h} * a.tiles_w;
  const int64_t n = blockIdx.x / tiles;
  const int tile = static_cast<int>(blockIdx.x % tiles);
  const int oy0 = (tile / a.tiles_w) * kTileH, ox0 = (tile % a.tiles_w) * kTileW;
  const int iy0 = oy0 * a.stride - a.pad_top, ix0 = ox0 * a.stride - a.pad_left;

  const T* x = static_cast<const T*>(a.x) + n * a.xn;
  for (int64_t i = tid; i < int64_t{pixels} * a.C_in; i += kThreads) {
    const int c = static_cast<int>(i % a.C_in);  // channels fastest: coalesced on channels_last
    const int p = static_cast<int>(i / a.C_in);
    const int iy = iy0 + p / a.win_w, ix = ix0 + p % a.win_w;
    const bool inside = iy >= 0 && iy < a.H && ix >= 0 && ix < a.W;
    xs[i] = inside ? x[c * a.xc + iy * a.xh + ix * a.xw] : T(0.f);
  }

  float acc[kMaxAcc];
#pragma unroll
  for (int k = 0; k < kMaxAcc; ++k) acc[k] = 0.f;
  const T* we = static_cast<const T*>(a.we);
  const T* wd = static_cast<const T*>(a.wd);
  const T* wp = static_cast<const T*>(a.wp);
  const int taps = a.kh * a.kw;

  for (int h0 = 0; h0 < a.C_hid; h0 += kChunk) {
    __syncthreads();  // xs is written; the previous chunk's es and ds are consumed
    // 1. The expansion over the window, zero where the window leaves the image: the depthwise
    //    conv's zero padding is of e, not of x.
    for (int i = tid; i < pixels * kChunk; i += kThreads) {
      const int hh = i % kChunk, p = i / kChunk, h = h0 + hh;
      const int iy = iy0 + p / a.win_w, ix = ix0 + p % a.win_w;
      float v = 0.f;
      if (h < a.C_hid && iy >= 0 && iy < a.H && ix >= 0 && ix < a.W) {
        const T* xp = xs + int64_t{p} * a.C_in;
        if (we != nullptr) {
          const T* w = we + int64_t{h} * a.C_in;
          for (int c = 0; c < a.C_in; ++c) v = fmaf(static_cast<float>(xp[c]), static_cast<float>(w[c]), v);
          v = activation_of(a.act_e, v + (a.be ? a.be[h] : 0.f));
        } else {
          v = static_cast<float>(xp[h]);
        }
      }
      es[i] = v;
    }
    __syncthreads();
    // 2. The depthwise conv of the chunk over the tile.
    for (int i = tid; i < kTile * kChunk; i += kThreads) {
      const int hh = i % kChunk, q = i / kChunk, h = h0 + hh;
      float v = 0.f;
      if (h < a.C_hid) {
        const int qy = q / kTileW, qx = q % kTileW;
        const T* w = wd + int64_t{h} * taps;
        for (int ky = 0; ky < a.kh; ++ky) {
          for (int kx = 0; kx < a.kw; ++kx) {
            const int p = (qy * a.stride + ky * a.dilation) * a.win_w + qx * a.stride + kx * a.dilation;
            v = fmaf(es[p * kChunk + hh], static_cast<float>(w[ky * a.kw + kx]), v);
          }
        }
        v = activation_of(a.act_d, v + (a.bd ? a.bd[h] : 0.f));
      }
      ds[i] = v;
    }
    __syncthreads();
    // 3. The chunk's share of the projection: output (q, o0 + o) is thread j % kThreads's
    //    accumulator j / kThreads, j = o * kTile + q.
    const int width = min(kChunk, a.C_hid - h0);
#pragma unroll
    for (int k = 0; k < kMaxAcc; ++k) {
      const int j = tid + k * kThreads;
      if (j >= kTile * a.C_out) break;
      const int q = j % kTile, o = j / kTile;
      const T* w = wp + int64_t{o} * a.C_hid + h0;
      const float* dq = ds + q * kChunk;
      float s = acc[k];
      for (int hh = 0; hh < width; ++hh) s = fmaf(dq[hh], static_cast<float>(w[hh]), s);
      acc[k] = s;
    }
  }

  // The projection's bias and activation, the residual, one store per output.
  T* out = static_cast<T*>(a.out);
  const T* residual = static_cast<const T*>(a.residual);
#pragma unroll
  for (int k = 0; k < kMaxAcc; ++k) {
    const int j = tid + k * kThreads;
    if (j >= kTile * a.C_out) break;
    const int q = j % kTile, o = j / kTile;
    const int oy = oy0 + q / kTileW, ox = ox0 + q % kTileW;
    if (oy >= a.Ho || ox >= a.Wo) continue;
    float v = activation_of(a.act_p, acc[k] + (a.bp ? a.bp[o] : 0.f));
    if (residual != nullptr) v += static_cast<float>(residual[n * a.rn + o * a.rc + oy * a.rh + ox * a.rw]);
    out[n * a.on + o * a.oc + oy * a.oh + ox * a.ow] = static_cast<T>(v);
  }
}

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
  FC_CHECK(x.is_meta() || at::get_overlap_status(out, x) == at::MemOverlapStatus::No, kOp, "out",
           "a tensor that does not overlap x", "one that does");
  if (const at::Tensor* r = present(residual)) {
    check_like(kOp, *r, "residual", out, "out");
    FC_CHECK(x.is_meta() || at::get_overlap_status(out, *r) == at::MemOverlapStatus::No, kOp, "residual",
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
  const int win_h = window(kTileH, k_h, s, dil), win_w = window(kTileW, k_w, s, dil);
  const int64_t bytes = shared_bytes(win_h, win_w, C_in, x.element_size());
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
  a.tiles_h = static_cast<int>(ceil_div(a.Ho, kTileH));
  a.tiles_w = static_cast<int>(ceil_div(a.Wo, kTileW));
  const int64_t blocks = x.size(0) * int64_t{a.tiles_h} * a.tiles_w;
  TORCH_CHECK(blocks < (int64_t{1} << 31), kOp, ": ", blocks, " tiles exceed the grid");
  const int64_t bytes = shared_bytes(win_h, win_w, a.C_in, x.element_size());
  const int64_t element = x.element_size();
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(cudaFuncSetAttribute(inverted_residual_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
    for (int64_t o0 = 0; o0 < project_weight.size(0); o0 += kGroupOut) {  // one launch a group
      BlockArgs g = a;
      g.C_out = static_cast<int>(std::min<int64_t>(kGroupOut, project_weight.size(0) - o0));
      g.wp = static_cast<const char*>(a.wp) + o0 * a.C_hid * element;
      g.bp = a.bp != nullptr ? a.bp + o0 : nullptr;
      g.out = static_cast<char*>(a.out) + o0 * a.oc * element;
      g.residual = a.residual != nullptr ? static_cast<const char*>(a.residual) + o0 * a.rc * element : nullptr;
      inverted_residual_kernel<T><<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(g);
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
