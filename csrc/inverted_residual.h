// The fused inverted residual's two CUDA kernels share one argument block: the CUDA-core
// kernel (inverted_residual.cu, every dtype) and the tensor-core kernel
// (inverted_residual_mma.cu, fp16 / bf16). The op itself, its checks and its Meta kernel are
// in inverted_residual.cu; the caller (fastconv/ops/inverted_residual.py) picks the kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

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

// The tensor-core kernel's side (inverted_residual_mma.cu).
namespace mma_block {

constexpr int kTileH = 8, kTileW = 8;
// Its limit on dynamic shared memory (sm_90 allows 227 KB a CTA).
constexpr int64_t kMaxSharedBytes = 160 * 1024;

int64_t shared_bytes(int win_h, int win_w, int64_t C_in, bool expand);

// Why the kernel cannot take a block ("" when it can): fp16 / bf16 only, even channel counts
// (its operands are loaded in pairs), and the tile's window within kMaxSharedBytes.
std::string unsupported(at::ScalarType dtype, int64_t C_in, int64_t C_hid, int win_h, int win_w, bool expand);

// Launches the kernel over every group of output channels; `a` is filled as for the CUDA-core
// kernel but with this kernel's 8x8 tiles (win_h/w, tiles_h/w) and all C_out channels.
void launch(const BlockArgs& a, at::ScalarType dtype, int device, int64_t batch, cudaStream_t stream);

}  // namespace mma_block
}  // namespace fastconv
