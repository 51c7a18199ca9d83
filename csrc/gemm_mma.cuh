// One BK-deep stage of a warp's tensor-core MMAs on K-contiguous shared-memory tiles, for the
// GEMM core (gemm_common.cuh), on mma_instructions.cuh's ldmatrix and mma.sync.
#pragma once

#include <cstdint>

#include "mma_instructions.cuh"

namespace fastconv {
namespace gemm {

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
