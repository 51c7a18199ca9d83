// Depthwise "planes" kernels: one block per tile of PB (n, oc) planes x TH x TW outputs.
//
// The block stages the input tile plus halo of each of its planes in shared memory as fp32
// (zero outside the image), together with the planes' weights and epilogue values. A
// thread then computes P vertically adjacent outputs of one column: for each filter column
// b it loads the (P-1)*SH + K input values of that column once into registers and applies
// all K taps of the column to all P outputs (K, SH compile-time, dilation 1 along H).
// K == 0 is the runtime-geometry variant (any KH, KW, stride, dilation).
//
// Any input strides (contiguous NCHW, spatial crops, channels_last views) and any output
// strides; multiplier m >= 1 (plane (n, oc) reads input channel oc / m).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "depthwise_common.cuh"

namespace fastconv {
namespace dw {
namespace {

constexpr int kPlanesPath = 1;

struct PlaneTiles {
  int PB, TH, TW;         // planes per block, output rows and columns per tile
  int IH, IW;             // input tile with halo: (TH-1)*sh + (KH-1)*dh + 1, same for W
  int tiles_h, tiles_w;   // tiles per plane
  int planes;             // N * Cout
};

template <typename T, int K, int SH, int P>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM) dw_planes_kernel(
    const T* __restrict__ in,   // (N, Cin, Hi, Wi), any strides
    const T* __restrict__ wt,   // (Cout, KH*KW) contiguous
    T* __restrict__ out,        // (N, Cout, Ho, Wo), any strides
    ConvGeom g,                 // geometry
    Strides<int> is,            // in element strides
    Strides<int> os,            // out element strides
    Epilogue ep,                // per-channel epilogue
    PlaneTiles t) {             // tiling
  const int KK = g.KH * g.KW;
  const int IHW = t.IH * t.IW;
  float* s_in = dyn_smem();           // [PB][IH][IW]
  float* s_w = s_in + t.PB * IHW;     // [PB][KK]
  float* s_ep = s_w + t.PB * KK;      // [PB][3]: bias, scale, shift

  int bid = blockIdx.x;
  const int tile_w = bid % t.tiles_w;
  bid /= t.tiles_w;
  const int tile_h = bid % t.tiles_h;
  const int plane0 = (bid / t.tiles_h) * t.PB;
  const int row0 = tile_h * t.TH * g.sh - g.pt;  // input row of tile row 0 (may be < 0)
  const int col0 = tile_w * t.TW * g.sw - g.pl;

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;

  // Stage the input tiles: a warp per (plane, row), lanes along the row.
  for (int pr = warp; pr < t.PB * t.IH; pr += nwarps) {
    const int pl = pr / t.IH;
    const int h = row0 + (pr - pl * t.IH);
    const int gp = plane0 + pl;
    float* dst = s_in + pr * t.IW;
    if (gp < t.planes && h >= 0 && h < g.Hi) {
      const int n = gp / g.Cout;
      const int c = (gp - n * g.Cout) / g.m;
      const T* src = in + n * is.n + c * is.c + h * is.h;
      for (int cc = lane; cc < t.IW; cc += kWarpSize) {
        const int w = col0 + cc;
        dst[cc] = (w >= 0 && w < g.Wi) ? static_cast<float>(src[w * is.w]) : 0.f;
      }
    } else {
      for (int cc = lane; cc < t.IW; cc += kWarpSize) dst[cc] = 0.f;
    }
  }
  for (int idx = tid; idx < t.PB * KK; idx += blockDim.x) {
    const int pl = idx / KK;
    const int tap = idx - pl * KK;
    const int gp = plane0 + pl;
    float v = 0.f;
    if (gp < t.planes) {
      const int oc = gp % g.Cout;
      v = static_cast<float>(wt[oc * KK + (g.flip ? KK - 1 - tap : tap)]);
    }
    s_w[idx] = v;
  }
  for (int pl = tid; pl < t.PB; pl += blockDim.x) {
    const int gp = plane0 + pl;
    const bool ok = gp < t.planes;
    const int oc = ok ? gp % g.Cout : 0;
    s_ep[3 * pl] = ok ? load_param<T>(ep.bias, ep.bias_kind, oc, 0.f) : 0.f;
    s_ep[3 * pl + 1] = ok ? load_param<T>(ep.scale, ep.scale_kind, oc, 1.f) : 1.f;
    s_ep[3 * pl + 2] = ok ? load_param<T>(ep.shift, ep.shift_kind, oc, 0.f) : 0.f;
  }
  __syncthreads();  // the only barrier

  const int RG = t.TH / P;  // row groups per tile (TH is a multiple of P)
  const int groups = t.PB * RG * t.TW;
  for (int gi = tid; gi < groups; gi += blockDim.x) {
    const int col = gi % t.TW;
    const int q = gi / t.TW;
    const int rg = q % RG;
    const int pl = q / RG;
    const int gp = plane0 + pl;
    const int j = tile_w * t.TW + col;
    const int i0 = tile_h * t.TH + rg * P;
    if (gp >= t.planes || j >= g.Wo || i0 >= g.Ho) continue;

    // Rows past Ho inside the tile still read staged (in-bounds) shared memory.
    const float* base = s_in + (pl * t.IH + rg * P * g.sh) * t.IW + col * g.sw;
    const float* wk = s_w + pl * KK;
    float acc[P];
#pragma unroll
    for (int p = 0; p < P; ++p) acc[p] = 0.f;
    if constexpr (K > 0) {
      constexpr int WIN = (P - 1) * SH + K;
#pragma unroll
      for (int b = 0; b < K; ++b) {
        const float* cb = base + b * g.dw;
        float win[WIN];
#pragma unroll
        for (int r = 0; r < WIN; ++r) win[r] = cb[r * t.IW];
#pragma unroll
        for (int a = 0; a < K; ++a) {
          const float wv = wk[a * K + b];
#pragma unroll
          for (int p = 0; p < P; ++p) acc[p] = fmaf(win[p * SH + a], wv, acc[p]);
        }
      }
    } else {
      for (int b = 0; b < g.KW; ++b) {
        const float* cb = base + b * g.dw;
        for (int a = 0; a < g.KH; ++a) {
          const float wv = wk[a * g.KW + b];
          const float* ca = cb + a * g.dh * t.IW;
#pragma unroll
          for (int p = 0; p < P; ++p) acc[p] = fmaf(ca[p * g.sh * t.IW], wv, acc[p]);
        }
      }
    }

    const float bias = s_ep[3 * pl], scale = s_ep[3 * pl + 1], shift = s_ep[3 * pl + 2];
    float z[P];
#pragma unroll
    for (int p = 0; p < P; ++p) z[p] = (acc[p] + bias) * scale + shift;
    activation_forward(ep.act, z);
    const int n = gp / g.Cout;
    const int oc = gp - n * g.Cout;
    T* dst = out + n * os.n + oc * os.c + j * os.w;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int i = i0 + p;
      if (i >= g.Ho) break;
      dst[i * os.h] = static_cast<T>(z[p]);
    }
  }
}

// Tile shape for P outputs per thread; false when even the smallest tile does not fit.
bool plan_tiles(const ConvGeom& g, int P, PlaneTiles* t, size_t* smem) {
  const int64_t KK = int64_t{g.KH} * g.KW;
  const int64_t planes = int64_t{g.N} * g.Cout;
  const int64_t target = int64_t{kBlockThreads} * P;  // outputs per block: one group per thread
  int64_t TW = std::min<int64_t>(g.Wo, 32);
  int64_t TH = std::min<int64_t>(ceil_div(g.Ho, P) * P, ceil_div(ceil_div(target, TW), P) * P);
  int64_t PB = std::max<int64_t>(1, std::min<int64_t>(planes, target / (TW * TH)));
  auto in_h = [&] { return (TH - 1) * g.sh + int64_t{g.KH - 1} * g.dh + 1; };
  auto in_w = [&] { return (TW - 1) * g.sw + int64_t{g.KW - 1} * g.dw + 1; };
  auto bytes = [&] { return sizeof(float) * PB * (in_h() * in_w() + KK + 3); };
  while (bytes() > kMaxDynSmem) {
    if (PB > 1) {
      PB = (PB + 1) / 2;
    } else if (TH > P) {
      TH = ceil_div(TH / 2, P) * P;
    } else if (TW > 1) {
      TW = (TW + 1) / 2;
    } else {
      return false;
    }
  }
  t->PB = static_cast<int>(PB);
  t->TH = static_cast<int>(TH);
  t->TW = static_cast<int>(TW);
  t->IH = static_cast<int>(in_h());
  t->IW = static_cast<int>(in_w());
  t->tiles_h = static_cast<int>(ceil_div(g.Ho, TH));
  t->tiles_w = static_cast<int>(ceil_div(g.Wo, TW));
  t->planes = static_cast<int>(planes);
  *smem = bytes();
  return true;
}

template <typename T>
bool planes_typed(const DwConv& p, int op) {
  const ConvGeom g = make_geom(p);
  constexpr int kOutputs[2] = {2, 4};
  PlaneTiles tiles[2];
  size_t smem[2];
  for (int v = 0; v < 2; ++v) {
    if (!plan_tiles(g, kOutputs[v], &tiles[v], &smem[v])) return false;
  }

  const bool spec_k = p.KH == p.KW && (p.KH == 3 || p.KH == 5 || p.KH == 7) && p.dh == 1 &&
                      (p.sh == 1 || p.sh == 2);
  const int k_idx = !spec_k ? 0 : p.KH == 3 ? 1 : p.KH == 5 ? 2 : 3;
  const int s_idx = spec_k && p.sh == 2 ? 1 : 0;
  using Kernel = decltype(&dw_planes_kernel<T, 0, 0, 2>);
  const Kernel kernels[4][2][2] = {
      {{dw_planes_kernel<T, 0, 0, 2>, dw_planes_kernel<T, 0, 0, 4>},
       {dw_planes_kernel<T, 0, 0, 2>, dw_planes_kernel<T, 0, 0, 4>}},
      {{dw_planes_kernel<T, 3, 1, 2>, dw_planes_kernel<T, 3, 1, 4>},
       {dw_planes_kernel<T, 3, 2, 2>, dw_planes_kernel<T, 3, 2, 4>}},
      {{dw_planes_kernel<T, 5, 1, 2>, dw_planes_kernel<T, 5, 1, 4>},
       {dw_planes_kernel<T, 5, 2, 2>, dw_planes_kernel<T, 5, 2, 4>}},
      {{dw_planes_kernel<T, 7, 1, 2>, dw_planes_kernel<T, 7, 1, 4>},
       {dw_planes_kernel<T, 7, 2, 2>, dw_planes_kernel<T, 7, 2, 4>}}};

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const T* inp = p.in.const_data_ptr<T>();
  const T* wp = p.weight.const_data_ptr<T>();
  T* outp = p.out.mutable_data_ptr<T>();
  const Strides<int> is = strides4<int>(p.in);
  const Strides<int> os = strides4<int>(p.out);
  const Epilogue ep = make_epilogue(p);
  auto launch = [&](int v) {
    const PlaneTiles& t = tiles[v];
    const int64_t blocks = ceil_div(t.planes, t.PB) * t.tiles_h * t.tiles_w;
    kernels[k_idx][s_idx][v]<<<static_cast<unsigned>(blocks), kBlockThreads, smem[v], stream>>>(
        inp, wp, outp, g, is, os, ep, t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const uint64_t key = dw_tune_key(p.out, op, kPlanesPath, p.out.numel(),
                                   int64_t{g.Ho} * g.Wo,
                                   k_idx * 8 + static_cast<int>(std::min<int64_t>(p.KW, 7)),
                                   dw_stride_code(p));
  launch(pick_variant(key, 2, /*fallback=*/1, launch));
  return true;
}

}  // namespace
}  // namespace dw

bool launch_dw_planes(const DwConv& p, int op) {
  using namespace dw;
  if (needs_wide_index({&p.in, &p.out, &p.weight})) return false;
  bool launched = false;
  dispatch_dtype_index(p.in.scalar_type(), /*wide=*/false, [&](auto t, auto i) {
    if constexpr (std::is_same_v<decltype(i), int32_t>) launched = planes_typed<decltype(t)>(p, op);
  });
  return launched;
}

}  // namespace fastconv
