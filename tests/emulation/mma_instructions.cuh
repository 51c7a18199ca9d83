// Stands in for csrc/mma_instructions.cuh in the CPU build (tests/cuda_emulation.py): ldmatrix
// and mma.sync emulated from the PTX ISA's tables, not from the kernels' loads, so that a
// kernel whose fragments do not match them computes wrong products here too. The warp's lanes
// meet at a barrier, each publishes its registers (or row addresses), and each computes its
// own results from all of them.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastconv {
namespace gemm {

inline uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p)); }

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 give the row addresses of matrix
// i; each lane receives, of every matrix i, row lane / 4's elements 2 (lane % 4) and + 1.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  emulation::Warp& warp = *emulation::warp;
  const int lane = emulation::lane_id;
  warp.address[lane] = p;
  warp.meet.arrive_and_wait();
  for (int i = 0; i < 4; ++i) {
    const auto* row = static_cast<const unsigned char*>(warp.address[8 * i + lane / 4]);
    std::memcpy(&r[i], row + 4 * (lane % 4), 4);
  }
  warp.meet.arrive_and_wait();
}

// Element `half` (0: the low 16 bits, the lower-indexed element) of a register of two.
template <typename T>
inline float element(uint32_t reg, int half) {
  const auto bits = static_cast<unsigned short>(half ? reg >> 16 : reg & 0xffffu);
  return static_cast<float>(T(bits, T::from_bits()));
}

// Publishes a lane's fragments; returns the warp's, after every lane has published.
inline emulation::Warp& publish(const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulation::Warp& warp = *emulation::warp;
  const int lane = emulation::lane_id;
  for (int i = 0; i < 4; ++i) warp.registers[lane][i] = a[i];
  warp.registers[lane][4] = b0;
  warp.registers[lane][5] = b1;
  warp.meet.arrive_and_wait();
  return warp;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: PTX ISA, "Matrix fragments for
// mma.m16n8k16" (16-bit types), groupID = lane / 4, threadID_in_group = lane % 4:
//   A (16 x 16): a_i, i in 0..7, two a register in order: row groupID (+8 for i in
//     {2, 3, 6, 7}), column threadID_in_group * 2 + (i & 1) (+8 for i >= 4).
//   B (16 x 8): b_i, i in 0..3: row threadID_in_group * 2 + (i & 1) (+8 for i >= 2), column
//     groupID.
//   C, D (16 x 8, f32): c_i: row groupID (+8 for i >= 2), column threadID_in_group * 2 + (i & 1).
template <typename T>
inline void mma_16bit(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulation::Warp& warp = publish(a, b0, b1);
  const int lane = emulation::lane_id, g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float sum = d[i];
    for (int k = 0; k < 16; ++k) {
      const int a_index = (row >= 8 ? 2 : 0) + (k >= 8 ? 4 : 0) + (k & 1);
      const int b_index = (k >= 8 ? 2 : 0) + (k & 1);
      const float av = element<T>(warp.registers[(row % 8) * 4 + (k % 8) / 2][a_index / 2], a_index % 2);
      const float bv = element<T>(warp.registers[col * 4 + (k % 8) / 2][4 + b_index / 2], b_index % 2);
      sum = std::fma(av, bv, sum);
    }
    d[i] = sum;
  }
  warp.meet.arrive_and_wait();  // nobody republishes before all have read
}

// cvt.rna.tf32.f32: 10 explicit mantissa bits, rounded to nearest with ties away from zero;
// the low 13 bits cleared. NaN and infinities pass through.
inline uint32_t to_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & ~0x1fffu;
  return u;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: "Matrix fragments for mma.m16n8k8"
// (.tf32): A (16 x 8): a_i, i in 0..3: row groupID (+8 for i in {1, 3}), column
// threadID_in_group (+4 for i >= 2). B (8 x 8): b_i, i in 0..1: row threadID_in_group (+4 for
// i = 1), column groupID. C, D as for m16n8k16.
inline void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulation::Warp& warp = publish(a, b0, b1);
  const int lane = emulation::lane_id, g = lane / 4, t = lane % 4;
  auto value = [](uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float sum = d[i];
    for (int k = 0; k < 8; ++k) {
      const int a_index = (row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0);
      const float av = value(warp.registers[(row % 8) * 4 + k % 4][a_index]);
      const float bv = value(warp.registers[col * 4 + k % 4][4 + (k >= 4 ? 1 : 0)]);
      sum = std::fma(av, bv, sum);
    }
    d[i] = sum;
  }
  warp.meet.arrive_and_wait();
}

}  // namespace gemm
}  // namespace fastconv
