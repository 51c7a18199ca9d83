// The conv_bn_act family's host pieces shared between its files: the GEMM's B operand
// (conv_bn_act_weight.cpp), used by conv_bn_act.cu.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastconv {
namespace gemm {

// The conv weight (C_out, C_in_g, KH, KW) as the implicit GEMM reads it: one row per output
// channel holding k = (r*KW + s)*C_in_g + c, K_g = C_in_g*KH*KW values, at `row_stride`
// elements apart (a multiple of 16 bytes when `vec`, with a 16-byte-aligned start).
struct PackedWeight {
  at::Tensor rows;
  int64_t row_stride;
};

// A weight already in that order (channels_last, or C_in_g*KH == 1 with any dense layout) is
// used as it is. Any other is repacked, and outside CUDA-graph capture the repacked copy is
// cached (see conv_bn_act_weight.cpp), so that a weight used again costs no allocation and
// no launch.
PackedWeight packed_conv_weight(const at::Tensor& weight, bool vec);

}  // namespace gemm
}  // namespace fastconv
