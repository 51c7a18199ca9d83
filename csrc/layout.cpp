// Layout analysis for the bn_act and batch_norm kernels (see layout.h).
#include "layout.h"

namespace fastconv {
namespace {

// True when the (h, w) dims of one tensor form a single unit-stride run of H*W elements.
bool plane_is_contiguous(const std::array<int64_t, 4>& s, int64_t H, int64_t W) {
  return (W == 1 || s[3] == 1) && (H == 1 || s[2] == (W == 1 ? 1 : W));
}

// If the rows (n, h, w) of one tensor are evenly spaced, returns true and their spacing.
bool rows_are_uniform(const std::array<int64_t, 4>& s, const int64_t (&size)[4],
                      int64_t* row_stride) {
  *row_stride = 0;
  int64_t expected = -1;
  for (int d : {3, 2, 0}) {  // innermost row dim first
    if (size[d] == 1) continue;
    if (expected < 0) {
      *row_stride = s[d];
    } else if (s[d] != expected) {
      return false;
    }
    expected = s[d] * size[d];  // a broadcast (stride 0) dim keeps expecting 0
  }
  return true;
}

}  // namespace

Layout make_layout(const std::vector<at::Tensor>& tensors) {
  const at::Tensor& ref = tensors.front();
  Layout L;
  L.N = ref.size(0);
  L.C = ref.size(1);
  L.H = ref.size(2);
  L.W = ref.size(3);
  const int64_t size[4] = {L.N, L.C, L.H, L.W};
  const int64_t pack = kPackBytes / ref.element_size();

  bool channels_innermost = L.C > 1;
  bool planes_contiguous = true;
  bool aligned = true;
  L.wide_index = ref.numel() > kMaxNarrowIndex;
  for (const at::Tensor& t : tensors) {
    std::array<int64_t, 4> s;
    int64_t span = 1;
    for (int d = 0; d < 4; ++d) {
      // A size-1 dim never moves the index, so its stride is irrelevant; zeroing it
      // keeps the stride tests below from tripping over arbitrary values there.
      s[d] = size[d] == 1 ? 0 : t.stride(d);
      span += (size[d] - 1) * s[d];
    }
    L.wide_index |= span > kMaxNarrowIndex;
    channels_innermost &= s[1] == 1;
    planes_contiguous &= plane_is_contiguous(s, L.H, L.W);
    aligned &= is_aligned(t.data_ptr(), kPackBytes);
    L.strides.push_back(s);
  }

  L.path = channels_innermost ? Path::kRows : planes_contiguous ? Path::kPlanes : Path::kStrided;
  L.uniform_rows = false;
  L.vec = false;
  if (L.path == Path::kRows) {
    std::vector<int64_t> row_strides;
    L.uniform_rows = true;
    for (const auto& s : L.strides) {
      int64_t rs;
      L.uniform_rows &= rows_are_uniform(s, size, &rs);
      row_strides.push_back(rs);
    }
    if (L.uniform_rows) {
      for (size_t i = 0; i < L.strides.size(); ++i) L.strides[i] = {0, 1, 0, row_strides[i]};
    }
    L.vec = aligned && L.C % pack == 0;
    for (const auto& s : L.strides) {
      L.vec &= s[0] % pack == 0 && s[2] % pack == 0 && s[3] % pack == 0;
    }
  } else if (L.path == Path::kPlanes) {
    L.vec = aligned && (L.H * L.W) % pack == 0;
    for (const auto& s : L.strides) L.vec &= s[0] % pack == 0 && s[1] % pack == 0;
  }
  return L;
}

}  // namespace fastconv
