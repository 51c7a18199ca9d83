// Host side of the fused inverted residual's tensor-core kernel
// (inverted_residual_mma_kernel.cuh, which says how it works): its limits, its launches over
// the groups of output channels, and the first-call timing of its two variants.
#include "inverted_residual_mma.h"

#include <c10/cuda/CUDAException.h>

#include "autotune.h"
#include "common.cuh"
#include "inverted_residual_mma_kernel.cuh"

namespace fastconv {
namespace mma_block {
namespace {

// One launch per group of 32 * kNT output channels.
template <typename T, int kNT>
void launch_groups(const BlockArgs& a, int64_t blocks, int64_t bytes, cudaStream_t stream) {
  constexpr int kGroup = 32 * kNT;
  C10_CUDA_CHECK(cudaFuncSetAttribute(inverted_residual_mma_kernel<T, kNT>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  for (int o0 = 0; o0 < a.C_out; o0 += kGroup) {
    inverted_residual_mma_kernel<T, kNT>
        <<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(group_args<T>(a, o0, kGroup));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The variants' accumulator widths (see the header comment), the first the default.
constexpr int kVariants = 2;

template <typename T>
void launch_variant(int variant, const BlockArgs& a, int64_t blocks, int64_t bytes, cudaStream_t stream) {
  if (variant == 0) {
    launch_groups<T, 12>(a, blocks, bytes, stream);
  } else {
    launch_groups<T, 4>(a, blocks, bytes, stream);
  }
}

}  // namespace

int64_t shared_bytes(int win_h, int win_w, int64_t C_in, bool expand) {
  const Plan p = plan(win_h, win_w, static_cast<int>(C_in), expand);
  return p.x_bytes + p.e_bytes + p.d_bytes;
}

std::string unsupported(at::ScalarType dtype, int64_t C_in, int64_t C_hid, int win_h, int win_w, bool expand) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) {
    return c10::str("float16 or bfloat16 x (the tensor-core kernel); got ", dtype);
  }
  if (C_in % 2 != 0 || C_hid % 2 != 0) {
    return c10::str("even C_in and C_hid (the tensor-core kernel loads channel pairs); got C_in ", C_in,
                    ", C_hid ", C_hid);
  }
  const int64_t bytes = shared_bytes(win_h, win_w, C_in, expand);
  if (bytes > kMaxSharedBytes) {
    return c10::str("a tile window within ", kMaxSharedBytes, " bytes of shared memory (the tensor-core kernel's ",
                    win_h, "x", win_w, " window of ", C_in, " channels takes ", bytes, ")");
  }
  return "";
}

void launch(const BlockArgs& a, at::ScalarType dtype, int device, int64_t batch, cudaStream_t stream) {
  const int64_t blocks = batch * a.tiles_h * a.tiles_w;
  const int64_t numel = batch * a.C_in * a.H * a.W;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "fastconv_cuda::inverted_residual_forward: ", blocks,
              " tiles exceed the grid");
  const int64_t bytes = shared_bytes(a.win_h, a.win_w, a.C_in, a.we != nullptr);
  // Block shapes that differ in what the winner could be: the dtype, the expansion, the
  // stride and the sizes (powers of two) of x, the hidden width and the output channels.
  const uint64_t key = tune_key(device, kOpFusedBlock, a.we != nullptr ? 1 + (a.stride > 1) : 0,
                                static_cast<int>(dtype), false, false, false, numel, a.C_hid) |
                       (static_cast<uint64_t>(log2_bucket(a.C_out)) << 40);
  auto run = [&](int variant) {
    if (dtype == at::kHalf) {
      launch_variant<c10::Half>(variant, a, blocks, bytes, stream);
    } else {
      launch_variant<c10::BFloat16>(variant, a, blocks, bytes, stream);
    }
  };
  run(pick_variant(key, kVariants, 0, run));
}

}  // namespace mma_block
}  // namespace fastconv
