// Stands in for csrc/gemm_mma.cuh in the CPU build of the fused block's tensor-core kernel:
// mma.sync m16n8k16 (fp32 accumulation) emulated from the PTX ISA's fragment layouts, written
// from the ISA's tables, not from the kernel's loads, so that a kernel whose fragments do not
// match them computes wrong products here too. The warp's 32 lanes meet at a barrier, each
// publishes its registers, and each computes its own four accumulators from all of them.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <barrier>
#include <cstdint>

#include "cuda_runtime.h"

namespace emulation {

struct Warp {
  std::barrier<> meet{32};
  uint32_t a[32][4];
  uint32_t b[32][2];
};

inline Warp* warps = nullptr;  // the running CTA's

}  // namespace emulation

namespace fastconv {
namespace gemm {

// Element `half` (0: the low 16 bits, the lower-indexed element) of a register of two.
template <typename T>
inline float element(uint32_t reg, int half) {
  const auto bits = static_cast<unsigned short>(half ? reg >> 16 : reg & 0xffffu);
  return static_cast<float>(T(bits, T::from_bits()));
}

template <typename T>
inline void mma_16bit(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  emulation::Warp& warp = emulation::warps[threadIdx.x / 32];
  for (int i = 0; i < 4; ++i) warp.a[lane][i] = a[i];
  warp.b[lane][0] = b0;
  warp.b[lane][1] = b1;
  warp.meet.arrive_and_wait();
  // PTX ISA, "Matrix fragments for mma.m16n8k16" (16-bit types), with groupID = lane / 4 and
  // threadID_in_group = lane % 4:
  //   A (16 x 16, row): a_i, i in 0..7: row groupID (+8 for i in {2, 3, 6, 7}), column
  //     threadID_in_group * 2 + (i & 1) (+8 for i >= 4); two elements a register, in order.
  //   B (16 x 8, col): b_i, i in 0..3: row threadID_in_group * 2 + (i & 1) (+8 for i >= 2),
  //     column groupID.
  //   C, D (16 x 8, f32): c_i: row groupID (+8 for i >= 2), column threadID_in_group * 2 + (i & 1).
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float sum = d[i];
    for (int k = 0; k < 16; ++k) {
      const int a_index = (row >= 8 ? 2 : 0) + (k >= 8 ? 4 : 0) + (k & 1);  // a_i
      const int a_lane = (row % 8) * 4 + (k % 8) / 2;
      const int b_index = (k >= 8 ? 2 : 0) + (k & 1);  // b_i
      const int b_lane = col * 4 + (k % 8) / 2;
      const float av = element<T>(warp.a[a_lane][a_index / 2], a_index % 2);
      const float bv = element<T>(warp.b[b_lane][b_index / 2], b_index % 2);
      sum = std::fma(av, bv, sum);
    }
    d[i] = sum;
  }
  warp.meet.arrive_and_wait();  // nobody overwrites its registers before all have read them
}

}  // namespace gemm
}  // namespace fastconv
