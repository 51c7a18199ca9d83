// Host side of the fused inverted residual's tensor-core kernel (inverted_residual_mma.cu;
// the kernel itself is inverted_residual_mma_kernel.cuh).
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "inverted_residual.h"

namespace fastconv {
namespace mma_block {

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
