// Tensor-core primitives of the GEMM core (gemm_common.cuh): ldmatrix, mma.sync for
// fp16 / bf16 (m16n8k16) and tf32 (m16n8k8), and one BK-deep stage of a warp's MMAs on
// K-contiguous shared-memory tiles. sm_80+ instructions; the extension builds for sm_90.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace fastconv {
namespace gemm {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma_16bit(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7},"
        " {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7},"
        " {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;  // round to nearest (away), like cuBLAS; the MMA alone would truncate
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7},"
      " {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One BK-deep stage of MMAs on shared tiles As [BM][LDS], Bs [BN][LDS] (K contiguous).
// Fragment layouts are the PTX ISA's for row.col m16n8k16 / m16n8k8: thread (g = lane / 4,
// t = lane % 4) holds A rows g, g+8 and B column g; ldmatrix.x4 on 16-bit tiles returns
// exactly those registers. The 16-byte row padding puts the 8 rows of each 8x8 matrix in
// distinct bank groups, so neither path has bank conflicts.
template <typename T, class Cfg, int BK, int LDS>
__device__ __forceinline__ void mma_stage(const T* As, const T* Bs, int lane, int wm, int wn,
                                          float (&acc)[Cfg::MT][Cfg::NT][4]) {
  const T* a_base = As + (wm * Cfg::WTM) * LDS;
  const T* b_base = Bs + (wn * Cfg::WTN) * LDS;
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[Cfg::MT][4];
#pragma unroll
      for (int mt = 0; mt < Cfg::MT; ++mt) {
        // lanes 0-15: rows 0-15 at kk; lanes 16-31: rows 0-15 at kk + 8 -> a0..a3
        ldmatrix_x4(af[mt], a_base + (mt * 16 + (lane & 15)) * LDS + kk + (lane >> 4) * 8);
      }
#pragma unroll
      for (int np = 0; np < Cfg::NT / 2; ++np) {
        // matrices: (n 0-7, kk), (n 0-7, kk+8), (n 8-15, kk), (n 8-15, kk+8)
        uint32_t bf[4];
        ldmatrix_x4(bf, b_base + (np * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + kk +
                            ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int mt = 0; mt < Cfg::MT; ++mt) {
          mma_16bit<T>(acc[mt][2 * np], af[mt], bf[0], bf[1]);
          mma_16bit<T>(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
        }
      }
    }
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 8) {
      uint32_t af[Cfg::MT][4];
#pragma unroll
      for (int mt = 0; mt < Cfg::MT; ++mt) {
        const float* a = a_base + (mt * 16 + g) * LDS + kk + t;
        af[mt][0] = to_tf32(a[0]);
        af[mt][1] = to_tf32(a[8 * LDS]);
        af[mt][2] = to_tf32(a[4]);
        af[mt][3] = to_tf32(a[8 * LDS + 4]);
      }
#pragma unroll
      for (int nt = 0; nt < Cfg::NT; ++nt) {
        const float* b = b_base + (nt * 8 + g) * LDS + kk + t;
        const uint32_t b0 = to_tf32(b[0]), b1 = to_tf32(b[4]);
#pragma unroll
        for (int mt = 0; mt < Cfg::MT; ++mt) mma_tf32(acc[mt][nt], af[mt], b0, b1);
      }
    }
  }
}

}  // namespace gemm
}  // namespace fastconv
