// The fused inverted residual's two CUDA kernels share one argument block: the CUDA-core
// kernel (inverted_residual.cu, every dtype) and the tensor-core kernel
// (inverted_residual_mma_kernel.cuh, fp16 / bf16; its host side inverted_residual_mma.h). The
// op itself, its checks and its Meta kernel are in inverted_residual.cu; the caller
// (fastconv/ops/inverted_residual.py) picks the kernel.
#pragma once

#include <cstdint>

#include "activations.cuh"

namespace fastconv {

struct BlockArgs {
  const void* x;
  int64_t xn, xc, xh, xw;  // x element strides
  int C_in, C_hid, C_out, H, W, Ho, Wo;
  const void* we;  // (C_hid, C_in) contiguous, or null: no expansion (C_hid == C_in)
  const void* wd;  // (C_hid, kh * kw) contiguous, taps row-major
  const void* wp;  // (C_out, C_hid) contiguous
  const float *be, *bd, *bp;  // float32 biases, or null
  int kh, kw, stride, dilation, pad_top, pad_left;
  int act_e, act_d, act_p;
  const void* residual;  // (N, C_out, Ho, Wo) or null
  int64_t rn, rc, rh, rw;
  void* out;
  int64_t on, oc, oh, ow;
  int win_h, win_w;  // the input window of a tile
  int tiles_h, tiles_w;
};

// The kernel codes of the op's `kernel` argument.
constexpr int kCudaCoreKernel = 0;
constexpr int kTensorCoreKernel = 1;

// The input window of a tile: its rows (columns) of x, the halo included.
__host__ __device__ inline int window(int tile, int kernel, int stride, int dilation) {
  return (tile - 1) * stride + (kernel - 1) * dilation + 1;
}

__device__ __forceinline__ float activation_of(int act, float v) {
  float z[1] = {v};
  activation_forward(act, z);
  return z[0];
}

// The arguments of the launch for output channels [o0, o0 + group): the projection's rows,
// its bias, the output and the residual offset to the group.
template <typename T>
inline BlockArgs group_args(const BlockArgs& a, int o0, int group) {
  BlockArgs g = a;
  g.C_out = a.C_out - o0 < group ? a.C_out - o0 : group;
  g.wp = static_cast<const T*>(a.wp) + int64_t{o0} * a.C_hid;
  g.bp = a.bp != nullptr ? a.bp + o0 : nullptr;
  g.out = static_cast<T*>(a.out) + o0 * a.oc;
  g.residual = a.residual != nullptr ? static_cast<const T*>(a.residual) + o0 * a.rc : nullptr;
  return g;
}

// The tensor-core kernel's tile (inverted_residual_mma_kernel.cuh).
namespace mma_block {
constexpr int kTileH = 8, kTileW = 8;
}  // namespace mma_block

}  // namespace fastconv
