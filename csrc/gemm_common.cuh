// The tensor-core GEMM core shared by fastconv_cuda::pointwise_forward (pointwise.cu)
// and fastconv_cuda::conv_bn_act_forward (conv_bn_act.cu): one CTA computes a BM x BN tile of
//   out[m, j] = epilogue_j(sum_k A[m, k] * B[j, k])
// with A read by a pluggable operand loader (pointwise pixels, or implicit-GEMM taps) and B
// a 2-D weight view. mma.sync m16n8k16 for fp16/bf16, m16n8k8 tf32 for fp32, fp32 accumulate.
//
// Pipeline: global -> registers -> shared memory, double buffered. The next K tile's loads
// are issued before the MMAs of the current one, so their latency hides behind the math,
// and the registers are where the pointwise prologue is applied, on any layout. cp.async
// would bypass the registers, which the prologue and the element-wise strided loads need; a
// deeper cp.async pipeline for the plain 16-byte case is left for when it can be measured.
//
// Summation order: every variant adds the K products in ascending 16-wide (8 for tf32)
// steps into the same accumulator layout, so all tile variants give bit-identical outputs,
// as autotune.h requires; the statistics are reduced per fixed 64-row chunk (kStatRows)
// in a fixed order, so they are variant-independent too.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "activations.cuh"
#include "gemm_mma.cuh"

namespace fastconv {
namespace gemm {

// Statistics partials are per chunk of this many output rows (every BM is a multiple).
constexpr int kStatRows = 64;

// Per-channel vector read as float32 or as the operand dtype (runtime kind, no templates).
enum VecKind : int { kVecAbsent = 0, kVecFloat = 1, kVecSame = 2 };
struct ChannelVec {
  const void* ptr;
  int kind;
};

template <typename T>
__device__ __forceinline__ float load_vec(const ChannelVec& v, int64_t i, float absent) {
  if (v.kind == kVecFloat) return __ldg(static_cast<const float*>(v.ptr) + i);
  if (v.kind == kVecSame) return static_cast<float>(static_cast<const T*>(v.ptr)[i]);
  return absent;
}

// Everything but the A operand. Sizes are per group; M, K, N < 2^31 - 2^10 (host check).
struct GemmArgs {
  int M, K, N;
  int blocks_m, blocks_n;  // tile counts, grid.x = blocks_m * blocks_n
  // B[j, k] = b[(group * N + j) * b_sn + k * b_sk]
  const void* b;
  int64_t b_sn, b_sk;
  // Output pixel m -> (n, h, w) over Ho x Wo; channel c = group * N + j.
  int Ho, Wo;
  void* out;
  int64_t o_sn, o_sc, o_sh, o_sw;
  bool pair_store;  // out's channel stride is 1 and pairs (c, c+1), c even, are 2-aligned
  const void* residual;  // null: none; may be `out` itself (same element, same thread)
  int64_t r_sn, r_sc, r_sh, r_sw;
  bool act_after_residual;
  ChannelVec bias, scale, shift;  // per output channel c
  int act;
  // Prologue on A (pointwise only): a = in_act(a * in_scale[k] + in_shift[k]).
  bool prologue;
  ChannelVec in_scale, in_shift;
  int in_act;
  // Statistics: (rough mean, correction, M2, 0) per [ceil(M / kStatRows)][C_out], or null.
  float4* stats;
  int C_out;
  // Element-wise (!VEC) loads: map each operand's chunks to threads K-fastest (true when
  // its K elements are near in memory: channels_last x, K-contiguous B) or rows-fastest.
  bool a_kfast, b_kfast;
};

// Tile shape: BM x BN outputs, BK16 K elements per stage for 16-bit types (half that for
// fp32, so a stage has the same bytes), WARPS_M x WARPS_N warps.
template <int BM_, int BN_, int BK16_, int WARPS_M_, int WARPS_N_>
struct TileCfg {
  static constexpr int BM = BM_, BN = BN_, BK16 = BK16_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
  static constexpr int MT = WTM / 16, NT = WTN / 8;              // mma tiles per warp
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile must be whole 16x16 pairs");
  static_assert(BM % kStatRows == 0, "statistics chunks must not straddle tiles");
};

// 16 bytes of operand: the unit of global loads and shared-memory stores.
template <typename T>
struct alignas(16) Chunk {
  static constexpr int V = 16 / sizeof(T);
  T v[V];
};

// ---------------------------------------------------------------------------------------
// Epilogue pieces.

template <typename T>
__device__ __forceinline__ Chunk<T> zero_chunk() {
  Chunk<T> c;
#pragma unroll
  for (int i = 0; i < Chunk<T>::V; ++i) c.v[i] = static_cast<T>(0.f);
  return c;
}

template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T a, b;
};

template <typename T>
__device__ __forceinline__ T round_to(float v) {
  return static_cast<T>(v);  // round to nearest even, as PyTorch's casts
}

// Pixel m of an Ho x Wo output -> element offset with strides (sn, sh, sw).
__device__ __forceinline__ int64_t pixel_offset(int m, int Ho, int Wo, int64_t sn, int64_t sh,
                                                int64_t sw) {
  const unsigned hw = static_cast<unsigned>(Ho) * static_cast<unsigned>(Wo);
  const unsigned n = static_cast<unsigned>(m) / hw, r = static_cast<unsigned>(m) % hw;
  const unsigned h = r / static_cast<unsigned>(Wo), w = r % static_cast<unsigned>(Wo);
  return static_cast<int64_t>(n) * sn + static_cast<int64_t>(h) * sh +
         static_cast<int64_t>(w) * sw;
}

// Applies the epilogue to acc in place, stores it, and leaves in acc the stored values read
// back in fp32 (what the statistics are taken over).
template <typename T, class Cfg>
__device__ __forceinline__ void epilogue_store(const GemmArgs& g, float (&acc)[Cfg::MT][Cfg::NT][4],
                                               int m_warp, int n_warp, int group, int lane) {
  const int gq = lane >> 2, tq = lane & 3;
  float bias[Cfg::NT][2], scale[Cfg::NT][2], shift[Cfg::NT][2];
#pragma unroll
  for (int nt = 0; nt < Cfg::NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int j = n_warp + nt * 8 + 2 * tq + e;
      const int64_t c = static_cast<int64_t>(group) * g.N + (j < g.N ? j : 0);
      bias[nt][e] = load_vec<T>(g.bias, c, 0.f);
      scale[nt][e] = load_vec<T>(g.scale, c, 1.f);
      shift[nt][e] = load_vec<T>(g.shift, c, 0.f);
    }
  }
  T* out = static_cast<T*>(g.out);
  const T* res = static_cast<const T*>(g.residual);
#pragma unroll
  for (int mt = 0; mt < Cfg::MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m_warp + mt * 16 + gq + 8 * h;
      if (m >= g.M) continue;
      const int64_t o_pix = pixel_offset(m, g.Ho, g.Wo, g.o_sn, g.o_sh, g.o_sw);
      const int64_t r_pix = res ? pixel_offset(m, g.Ho, g.Wo, g.r_sn, g.r_sh, g.r_sw) : 0;
#pragma unroll
      for (int nt = 0; nt < Cfg::NT; ++nt) {
        const int j0 = n_warp + nt * 8 + 2 * tq;
        if (j0 >= g.N) continue;
        const int64_t c0 = static_cast<int64_t>(group) * g.N + j0;
        T q[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float z[1] = {(acc[mt][nt][2 * h + e] + bias[nt][e]) * scale[nt][e] + shift[nt][e]};
          float r = 0.f;
          const bool add = res != nullptr && j0 + e < g.N;
          if (add) {
            r = static_cast<float>(res[r_pix + (c0 + e) * g.r_sc]);
            if (g.act_after_residual) z[0] += r;
          }
          activation_forward(g.act, z);
          // Only add when there is a residual: -0 + 0 would turn a -0 output into +0.
          const float v = (add && !g.act_after_residual) ? z[0] + r : z[0];
          q[e] = round_to<T>(v);
          acc[mt][nt][2 * h + e] = static_cast<float>(q[e]);
        }
        T* o = out + o_pix + c0 * g.o_sc;
        if (g.pair_store) {  // j0 even, N even: both columns are in range
          *reinterpret_cast<Pair<T>*>(o) = Pair<T>{q[0], q[1]};
        } else {
          o[0] = q[0];
          if (j0 + 1 < g.N) o[g.o_sc] = q[1];
        }
      }
    }
  }
}

// Per-channel moments of the stored values of each kStatRows-row chunk of this tile, written
// to g.stats[chunk][c] = (rough mean, correction, M2, 0). Two passes: a rough mean, then the
// deviations d from it, whose sum refines the mean (rough + sum(d)/n, kept as two floats so
// the combine can add them in float64) and gives M2 = sum(d^2) - sum(d)^2/n. Without the
// correction a float32 chunk mean loses digits when |mean| >> std (a sum of 64 values near
// 1000 is off by ~1e-3), which the combine's n_i (mean_i - mean)^2 turns into ~1e-5..1e-4
// relative error in the variance. (fp16/bf16 chunk sums are exact anyway: 64 values on a
// coarse grid fit float32's 24 bits.)
// The order is fixed per chunk and independent of the tile shape: per 16-row mma block, each
// lane adds its rows (g, g+8), an xor butterfly sums the 8 lanes of a column, and the four
// blocks of a chunk are added in order. `scratch` is the tile's shared memory, free once the
// main loop's last barrier has passed.
template <class Cfg>
__device__ void tile_statistics(const GemmArgs& g, const float (&acc)[Cfg::MT][Cfg::NT][4],
                                int m0, int n0, int wm, int wn, int group, int lane, int tid,
                                float* scratch) {
  constexpr int BN = Cfg::BN, kBlocks = Cfg::BM / 16, kChunks = Cfg::BM / kStatRows;
  auto block_sum = reinterpret_cast<float (*)[BN]>(scratch);               // [kBlocks][BN]
  auto block_dev = reinterpret_cast<float (*)[BN]>(scratch + kBlocks * BN);  // [kBlocks][BN]
  auto chunk_mean = reinterpret_cast<float (*)[BN]>(scratch + 2 * kBlocks * BN);
  const int gq = lane >> 2, tq = lane & 3;
  auto column_sum = [&](float s) {
    s += __shfl_xor_sync(0xffffffffu, s, 4);
    s += __shfl_xor_sync(0xffffffffu, s, 8);
    return s + __shfl_xor_sync(0xffffffffu, s, 16);
  };
  auto chunk_rows = [&](int chunk) { return min(kStatRows, g.M - (m0 + chunk * kStatRows)); };
  for (int pass = 0; pass < 2; ++pass) {
#pragma unroll
    for (int mt = 0; mt < Cfg::MT; ++mt) {
      const int row = wm * Cfg::WTM + mt * 16;  // first row of the block, in the tile
      const bool v0 = m0 + row + gq < g.M, v1 = m0 + row + gq + 8 < g.M;
#pragma unroll
      for (int nt = 0; nt < Cfg::NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = wn * Cfg::WTN + nt * 8 + 2 * tq + e;
          const float a = acc[mt][nt][e], b = acc[mt][nt][2 + e];
          if (pass == 0) {
            const float s = column_sum((v0 ? a : 0.f) + (v1 ? b : 0.f));
            if (gq == 0) block_sum[row / 16][col] = s;
          } else {
            const float mu = chunk_mean[row / kStatRows][col];
            const float da = v0 ? a - mu : 0.f, db = v1 ? b - mu : 0.f;
            const float q = column_sum(da * da + db * db), d = column_sum(da + db);
            if (gq == 0) {
              block_sum[row / 16][col] = q;
              block_dev[row / 16][col] = d;
            }
          }
        }
      }
    }
    __syncthreads();
    for (int i = tid; i < kChunks * BN; i += Cfg::kThreads) {
      const int chunk = i / BN, col = i % BN, b0 = 4 * chunk;
      const int rows = chunk_rows(chunk);
      const float s = ((block_sum[b0][col] + block_sum[b0 + 1][col]) + block_sum[b0 + 2][col]) +
                      block_sum[b0 + 3][col];
      if (pass == 0) {
        chunk_mean[chunk][col] = rows > 0 ? s / static_cast<float>(rows) : 0.f;
      } else if (rows > 0 && n0 + col < g.N) {
        const float d = ((block_dev[b0][col] + block_dev[b0 + 1][col]) + block_dev[b0 + 2][col]) +
                        block_dev[b0 + 3][col];
        const float correction = d / static_cast<float>(rows);
        const int64_t c = static_cast<int64_t>(group) * g.N + n0 + col;
        const int64_t slot = static_cast<int64_t>(m0 / kStatRows + chunk) * g.C_out + c;
        g.stats[slot] =
            make_float4(chunk_mean[chunk][col], correction, fmaxf(s - d * correction, 0.f), 0.f);
      }
    }
    __syncthreads();  // pass 1 rewrites block_sum
  }
}

// ---------------------------------------------------------------------------------------
// The kernel. A (the operand loader) provides:
//   struct Params;                                    kernel argument
//   struct Row; static Row row(const Params&, int m, int group);   per-row state, once
//   static void load(const Params&, const Row&, int k, int K, Chunk<T>&)  VEC: 16-byte load
//     of k..k+V-1 (K % V == 0); otherwise V element loads, each masked by k + i < K.
//     Out-of-range rows, taps and k give zeros.
// VEC: 16-byte global loads of A and B along K (host checked strides and alignment);
// chunks then map K-fastest onto threads so a warp reads whole rows. Element-wise mode maps
// an operand K-fastest too when its K run is near in memory (g.a_kfast: channels_last x, where
// a chunk's 8 elements are one 16-byte run, so each element load of a warp touches 8 pixels'
// 64-byte runs instead of 32 pixels' sectors; g.b_kfast: K-contiguous weight rows), else rows
// fastest, so that a warp reads 32 neighbouring pixels of one channel (NCHW coalesced). The
// mapping only decides which thread loads a chunk: shared memory, and the result, are the same.
// The explicit minimum of 1 CTA per SM matters: without it, CUDA 13's ptxas capped the
// 256-thread variant at 128 registers and spilled 68-92 bytes (and spilled around SiLU's
// division slow-path call in others); with it every variant compiles spill-free, in 100-227
// registers for the pointwise loader and 104-237 for the conv taps (CUDA 13.0, -Xptxas -v;
// the runtime chunk mapping of the element-wise path raised the top from 213, still 2 CTAs
// of 128 threads per SM).
template <typename T, class Cfg, class A, bool VEC>
__global__ void __launch_bounds__(Cfg::kThreads, 1) gemm_kernel(const typename A::Params ap,
                                                             const GemmArgs g) {
  constexpr int V = Chunk<T>::V;
  constexpr int BK = Cfg::BK16 * 2 / static_cast<int>(sizeof(T));
  constexpr int LDS = BK + V;  // +16 bytes per row: conflict-free ldmatrix (see mma_stage)
  constexpr int KC = BK / V;   // chunks per tile row
  constexpr int A_TOTAL = Cfg::BM * KC, B_TOTAL = Cfg::BN * KC;
  constexpr int A_PER = (A_TOTAL + Cfg::kThreads - 1) / Cfg::kThreads;
  constexpr int B_PER = (B_TOTAL + Cfg::kThreads - 1) / Cfg::kThreads;
  constexpr int STAGE = (Cfg::BM + Cfg::BN) * LDS;
  __shared__ alignas(16) T smem[2 * STAGE];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N;
  const int group = blockIdx.y;
  // Tiles in groups of 8 along M sweep all of N before moving on, so the A tiles of a
  // group stay in L2 while every N tile reads them.
  constexpr int kGroupM = 8;
  const int pid = blockIdx.x, per_group = kGroupM * g.blocks_n;
  const int first_m = (pid / per_group) * kGroupM;
  const int rows_of_group = min(g.blocks_m - first_m, kGroupM);
  const int tile_m = first_m + (pid % per_group) % rows_of_group;
  const int tile_n = (pid % per_group) / rows_of_group;
  const int m0 = tile_m * Cfg::BM, n0 = tile_n * Cfg::BN;

  auto chunk_pos = [&](int c, int rows, bool kfast, int& r, int& kc) {
    if (VEC || kfast) {
      r = c / KC;
      kc = c % KC;
    } else {
      r = c % rows;
      kc = c / rows;
    }
  };
  // Per-thread row state, computed once: the K loop only moves along k.
  typename A::Row arow[A_PER];
  int a_kc[A_PER];
#pragma unroll
  for (int i = 0; i < A_PER; ++i) {
    int r, kc;
    chunk_pos(tid + i * Cfg::kThreads, Cfg::BM, g.a_kfast, r, kc);
    a_kc[i] = kc;
    arow[i] = A::row(ap, m0 + r, group);
  }
  const T* bptr = static_cast<const T*>(g.b);
  int64_t b_off[B_PER];
  bool b_ok[B_PER];
  int b_kc[B_PER];
#pragma unroll
  for (int i = 0; i < B_PER; ++i) {
    int r, kc;
    chunk_pos(tid + i * Cfg::kThreads, Cfg::BN, g.b_kfast, r, kc);
    b_kc[i] = kc;
    b_ok[i] = n0 + r < g.N;
    b_off[i] = (static_cast<int64_t>(group) * g.N + n0 + r) * g.b_sn;
  }

  Chunk<T> areg[A_PER], breg[B_PER];
  auto load_stage = [&](int k0) {
#pragma unroll
    for (int i = 0; i < A_PER; ++i) {
      if (A_TOTAL % Cfg::kThreads == 0 || tid + i * Cfg::kThreads < A_TOTAL)
        A::template load<VEC>(ap, arow[i], k0 + a_kc[i] * V, g.K, areg[i]);
    }
#pragma unroll
    for (int i = 0; i < B_PER; ++i) {
      if (!(B_TOTAL % Cfg::kThreads == 0 || tid + i * Cfg::kThreads < B_TOTAL)) continue;
      const int k = k0 + b_kc[i] * V;
      if (VEC) {
        breg[i] = (b_ok[i] && k < g.K) ? *reinterpret_cast<const Chunk<T>*>(bptr + b_off[i] + k)
                                       : zero_chunk<T>();
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          breg[i].v[e] = (b_ok[i] && k + e < g.K) ? bptr[b_off[i] + (k + e) * g.b_sk]
                                                  : static_cast<T>(0.f);
        }
      }
    }
  };
  auto store_stage = [&](int buf, int k0) {
    T* As = smem + buf * STAGE;
    T* Bs = As + Cfg::BM * LDS;
#pragma unroll
    for (int i = 0; i < A_PER; ++i) {
      const int c = tid + i * Cfg::kThreads;
      if (!(A_TOTAL % Cfg::kThreads == 0 || c < A_TOTAL)) continue;
      int r, kc;
      chunk_pos(c, Cfg::BM, g.a_kfast, r, kc);
      if (g.prologue) {  // on load, in fp32, back to T; padding rows / k stay exactly 0
        const bool row_ok = m0 + r < g.M;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const int k = k0 + kc * V + e;
          if (row_ok && k < g.K) {
            float z[1] = {static_cast<float>(areg[i].v[e]) * load_vec<T>(g.in_scale, k, 1.f) +
                          load_vec<T>(g.in_shift, k, 0.f)};
            activation_forward(g.in_act, z);
            areg[i].v[e] = round_to<T>(z[0]);
          }
        }
      }
      *reinterpret_cast<Chunk<T>*>(As + r * LDS + kc * V) = areg[i];
    }
#pragma unroll
    for (int i = 0; i < B_PER; ++i) {
      const int c = tid + i * Cfg::kThreads;
      if (!(B_TOTAL % Cfg::kThreads == 0 || c < B_TOTAL)) continue;
      int r, kc;
      chunk_pos(c, Cfg::BN, g.b_kfast, r, kc);
      *reinterpret_cast<Chunk<T>*>(Bs + r * LDS + kc * V) = breg[i];
    }
  };

  float acc[Cfg::MT][Cfg::NT][4];
#pragma unroll
  for (int mt = 0; mt < Cfg::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < Cfg::NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

  const int k_tiles = (g.K + BK - 1) / BK;
  if (k_tiles > 0) {
    load_stage(0);
    store_stage(0, 0);
    __syncthreads();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int buf = kt & 1;
    const bool more = kt + 1 < k_tiles;
    if (more) load_stage((kt + 1) * BK);  // in flight during the MMAs below
    const T* As = smem + buf * STAGE;
    mma_stage<T, Cfg, BK, LDS>(As, As + Cfg::BM * LDS, lane, wm, wn, acc);
    // The other buffer was last read in iteration kt - 1, which ended with a barrier.
    if (more) store_stage(buf ^ 1, (kt + 1) * BK);
    __syncthreads();
  }

  epilogue_store<T, Cfg>(g, acc, m0 + wm * Cfg::WTM, n0 + wn * Cfg::WTN, group, lane);
  if (g.stats != nullptr) {
    static_assert((2 * Cfg::BM / 16 + Cfg::BM / kStatRows) * Cfg::BN * sizeof(float) <=
                      sizeof(smem),
                  "statistics scratch must fit in the tile's shared memory");
    tile_statistics<Cfg>(g, acc, m0, n0, wm, wn, group, lane, tid, reinterpret_cast<float*>(smem));
  }
}

}  // namespace gemm
}  // namespace fastconv
