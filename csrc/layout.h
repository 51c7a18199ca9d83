// Host-side layout analysis: which kernel path handles a given set of 4-D tensors (bn_act,
// batch_norm), the alignment test, and the output-layout rule of every family.
//
// make_layout: bn_act's forward looks at {x, y}, its backward at {x, grad_y, grad_x}; every
// tensor in the set must satisfy a path's stride requirements for that path to be used.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <array>
#include <cstdint>
#include <vector>

namespace fastconv {

enum class Path : int {
  kRows = 0,     // channels innermost (stride(1) == 1): rows of (n, h, w) x C channels
  kPlanes = 1,   // each (n, c) plane of H*W elements is one contiguous run
  kStrided = 2,  // anything else: full 4-D index math per element
};

// Packs are 16 bytes (one LDG.128 / STG.128) in the vectorized kernels.
constexpr int kPackBytes = 16;

// Tensors are addressed with int32 when every index and offset stays below 2^30: the
// grid-stride loops add at most 2^30 to an in-range index, so nothing can overflow.
constexpr int64_t kMaxNarrowIndex = int64_t{1} << 30;

struct Layout {
  Path path;
  bool vec;           // every tensor is aligned for kPackBytes packs along the fast dim
  bool uniform_rows;  // kRows only: offset(row) = row * strides[i][3] for every tensor
  bool wide_index;    // some index or offset needs 64 bits
  int64_t N, C, H, W;
  // Per tensor (in the order given), element strides for (n, c, h, w). Strides of size-1
  // dims are zeroed; with uniform_rows, (n, h, w) become (0, 0, row_stride).
  std::vector<std::array<int64_t, 4>> strides;
};

// `tensors` share sizes and dtype (checked by the caller) and have numel() > 0.
Layout make_layout(const std::vector<at::Tensor>& tensors);

// True when p is aligned to `bytes` (the vectorised paths' 16-byte packs).
inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// ---------------------------------------------------------------------------------------
// The output-layout rule of every CUDA family, written once (its Python twin is
// fastconv/_conv_args.py's output_memory_format; the two must agree, which
// tests/test_extension_meta.py checks): an output is channels_last when the input's channels
// are innermost, stride(1) == 1, and there is more than one channel; otherwise NCHW. With one
// channel both formats are the same memory and stride(1) says nothing, so NCHW is chosen.

inline bool channels_innermost(const at::Tensor& t) { return t.size(1) > 1 && t.stride(1) == 1; }

inline at::MemoryFormat output_memory_format(const at::Tensor& x) {
  return channels_innermost(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// A new 4-D output of shape `sizes` with x's dtype and device, laid out by the rule above.
inline at::Tensor empty_output(const at::Tensor& x, at::IntArrayRef sizes) {
  return at::empty(sizes, x.options().memory_format(output_memory_format(x)));
}

}  // namespace fastconv
