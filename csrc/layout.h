// Host-side layout analysis: which kernel family handles a given set of 4-D tensors.
//
// The forward op looks at {x, y}, the backward at {x, grad_y, grad_x}; every tensor in
// the set must satisfy a path's stride requirements for that path to be used.
#pragma once

#include <ATen/core/Tensor.h>

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

}  // namespace fastconv
