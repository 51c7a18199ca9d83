// Depthwise "rows" kernels: in and out channels-innermost (channels_last, or a channel slice
// of one), multiplier 1, 16-byte packs of VEC channels per thread.
//
// A thread owns one channel pack and computes P horizontally adjacent outputs of one output
// row per task. For each filter row it loads the (P-1)*SW + KW input packs the P outputs
// touch once into registers and reuses them across taps and outputs (KW, SW compile-time;
// dilation 1). KW == 0 is the runtime-geometry variant (any KW, stride, dilation). The
// block's weights (fp32, [tap][channel]) and epilogue vectors sit in shared memory.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "depthwise_common.cuh"

namespace fastconv {
namespace dw {
namespace {

// The VEC fp32 weights of one tap for VEC consecutive channels, as float4 loads from shared
// memory (the tap's row of the staged weight tile).
template <int VEC>
__device__ __forceinline__ void load_tap_weights(const float* w, float (&wv)[VEC]) {
#pragma unroll
  for (int v4 = 0; v4 < VEC / 4; ++v4) {
    const float4 f = reinterpret_cast<const float4*>(w)[v4];
    wv[4 * v4] = f.x;
    wv[4 * v4 + 1] = f.y;
    wv[4 * v4 + 2] = f.z;
    wv[4 * v4 + 3] = f.w;
  }
}

constexpr int kRowsPath = 0;
constexpr int kMaxRowsLanes = 16;  // channel packs per block (256 B of fp16 per pixel)

template <typename T, int KW, int SW, int P>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM) dw_rows_kernel(
    const T* __restrict__ in,   // (N, C, Hi, Wi), channel stride 1
    const T* __restrict__ wt,   // (C, KH*KW) contiguous
    T* __restrict__ out,        // (N, C, Ho, Wo), channel stride 1
    ConvGeom g,                 // geometry (m == 1, so Cin == Cout)
    Strides<int> is,            // in element strides (c == 1)
    Strides<int> os,            // out element strides (c == 1)
    Epilogue ep,                // per-channel epilogue
    int tasks,                  // N * Ho * wblocks
    int wblocks) {              // ceil(Wo / P)
  constexpr int VEC = kPackBytes / sizeof(T);
  static_assert(VEC % 4 == 0, "weights are read as float4");
  const int CB = blockDim.x * VEC;  // channels of this block
  const int KK = g.KH * g.KW;
  const int cbase = blockIdx.x * CB;
  float* s_w = dyn_smem();          // [KK][CB]
  float* s_ep = s_w + KK * CB;      // [3][CB]: bias, scale, shift

  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  // The block's weights are one contiguous run of CB * KK elements: read coalesced.
  for (int idx = tid; idx < KK * CB; idx += nthreads) {
    const int cl = idx / KK;
    const int t = idx - cl * KK;
    const int c = cbase + cl;
    float v = 0.f;
    if (c < g.Cout) v = static_cast<float>(wt[c * KK + (g.flip ? KK - 1 - t : t)]);
    s_w[t * CB + cl] = v;
  }
  for (int cl = tid; cl < CB; cl += nthreads) {
    const int c = cbase + cl;
    const bool ok = c < g.Cout;
    s_ep[cl] = ok ? load_param<T>(ep.bias, ep.bias_kind, c, 0.f) : 0.f;
    s_ep[CB + cl] = ok ? load_param<T>(ep.scale, ep.scale_kind, c, 1.f) : 1.f;
    s_ep[2 * CB + cl] = ok ? load_param<T>(ep.shift, ep.shift_kind, c, 0.f) : 0.f;
  }
  __syncthreads();  // the only barrier: idle channel lanes may leave after it

  const int cl0 = threadIdx.x * VEC;
  const int c0 = cbase + cl0;
  if (c0 >= g.Cout) return;  // Cout is a multiple of VEC on this path

  const Pack<T, VEC> zero = zero_pack<T, VEC>();
  const int kw = KW > 0 ? KW : g.KW;
  const int task_step = gridDim.y * blockDim.y;
  for (int task = blockIdx.y * blockDim.y + threadIdx.y; task < tasks; task += task_step) {
    const int jb = task % wblocks;
    const int r = task / wblocks;
    const int i = r % g.Ho;
    const int n = r / g.Ho;
    const int j0 = jb * P;

    float acc[P][VEC];
#pragma unroll
    for (int p = 0; p < P; ++p) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[p][v] = 0.f;
    }
    const T* in_n = in + n * is.n + c0;
    for (int a = 0; a < g.KH; ++a) {
      const int h = i * g.sh - g.pt + a * g.dh;
      if (h < 0 || h >= g.Hi) continue;
      const T* row = in_n + h * is.h;
      const float* w_row = s_w + a * kw * CB + cl0;
      if constexpr (KW > 0) {
        constexpr int WIN = (P - 1) * SW + KW;
        Pack<T, VEC> win[WIN];
        const int w0 = j0 * SW - g.pl;
#pragma unroll
        for (int q = 0; q < WIN; ++q) {
          const int w = w0 + q;
          win[q] = (w >= 0 && w < g.Wi) ? load_pack<VEC>(row + w * is.w) : zero;
        }
#pragma unroll
        for (int b = 0; b < KW; ++b) {
          float wv[VEC];
          load_tap_weights<VEC>(w_row + b * CB, wv);
#pragma unroll
          for (int p = 0; p < P; ++p) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              acc[p][v] = fmaf(static_cast<float>(win[p * SW + b].v[v]), wv[v], acc[p][v]);
            }
          }
        }
      } else {
        for (int b = 0; b < kw; ++b) {
          float wv[VEC];
          load_tap_weights<VEC>(w_row + b * CB, wv);
#pragma unroll
          for (int p = 0; p < P; ++p) {
            const int w = (j0 + p) * g.sw - g.pl + b * g.dw;
            const Pack<T, VEC> xv =
                (w >= 0 && w < g.Wi) ? load_pack<VEC>(row + w * is.w) : zero;
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              acc[p][v] = fmaf(static_cast<float>(xv.v[v]), wv[v], acc[p][v]);
            }
          }
        }
      }
    }

    float bias[VEC], scale[VEC], shift[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      bias[v] = s_ep[cl0 + v];
      scale[v] = s_ep[CB + cl0 + v];
      shift[v] = s_ep[2 * CB + cl0 + v];
    }
    T* out_row = out + n * os.n + i * os.h + c0;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int j = j0 + p;
      if (j >= g.Wo) break;
      float z[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) z[v] = (acc[p][v] + bias[v]) * scale[v] + shift[v];
      activation_forward(ep.act, z);
      store_pack<VEC>(out_row + j * os.w, z);
    }
  }
}

// Outputs per thread of tuning variant v (0 or 1). 16-bit packs are unpacked to fp32 in
// registers; with the widest windows (7 taps, or 5 taps at stride 2) four outputs exceed
// the 128-register budget of __launch_bounds__ and spill, so those shapes use {1, 2}.
constexpr int rows_outputs(int elem_bytes, int kw, int sw, int v) {
  const bool wide_window = elem_bytes == 2 && (kw == 7 || (kw == 5 && sw == 2));
  return wide_window ? (v == 0 ? 1 : 2) : (v == 0 ? 2 : 4);
}

template <typename T>
bool rows_typed(const DwConv& p, int op) {
  constexpr int VEC = kPackBytes / sizeof(T);
  const ConvGeom g = make_geom(p);
  const int64_t KK = p.KH * p.KW;

  // Kernel specialisation: KW in {3, 5, 7} with dilation 1 and stride 1 or 2 along W.
  const bool spec_k = (p.KW == 3 || p.KW == 5 || p.KW == 7) && p.dw == 1 && (p.sw == 1 || p.sw == 2);
  const int k_idx = !spec_k ? 0 : p.KW == 3 ? 1 : p.KW == 5 ? 2 : 3;  // 0 = runtime geometry
  const int s_idx = spec_k && p.sw == 2 ? 1 : 0;

  // Channel lanes per block; shrink them while the weight tile exceeds shared memory.
  const int64_t packs = g.Cout / VEC;
  int64_t tx = std::min<int64_t>(packs, kMaxRowsLanes);
  auto smem_of = [&](int64_t lanes) { return sizeof(float) * (KK + 3) * lanes * VEC; };
  while (tx > 1 && smem_of(tx) > kMaxDynSmem) tx = (tx + 1) / 2;
  if (smem_of(tx) > kMaxDynSmem) return false;
  const int64_t cblocks = ceil_div(packs, tx);
  tx = ceil_div(packs, cblocks);  // balance the lanes over the channel blocks
  const int64_t ty = std::max<int64_t>(1, kBlockThreads / tx);
  const size_t smem = smem_of(tx);

  using Kernel = decltype(&dw_rows_kernel<T, 0, 0, 2>);
  constexpr int E = sizeof(T);
  // [k_idx][s_idx][variant]; variant = outputs per thread, see rows_outputs.
  const Kernel kernels[4][2][2] = {
      {{dw_rows_kernel<T, 0, 0, rows_outputs(E, 0, 0, 0)>, dw_rows_kernel<T, 0, 0, rows_outputs(E, 0, 0, 1)>},
       {dw_rows_kernel<T, 0, 0, rows_outputs(E, 0, 0, 0)>, dw_rows_kernel<T, 0, 0, rows_outputs(E, 0, 0, 1)>}},
      {{dw_rows_kernel<T, 3, 1, rows_outputs(E, 3, 1, 0)>, dw_rows_kernel<T, 3, 1, rows_outputs(E, 3, 1, 1)>},
       {dw_rows_kernel<T, 3, 2, rows_outputs(E, 3, 2, 0)>, dw_rows_kernel<T, 3, 2, rows_outputs(E, 3, 2, 1)>}},
      {{dw_rows_kernel<T, 5, 1, rows_outputs(E, 5, 1, 0)>, dw_rows_kernel<T, 5, 1, rows_outputs(E, 5, 1, 1)>},
       {dw_rows_kernel<T, 5, 2, rows_outputs(E, 5, 2, 0)>, dw_rows_kernel<T, 5, 2, rows_outputs(E, 5, 2, 1)>}},
      {{dw_rows_kernel<T, 7, 1, rows_outputs(E, 7, 1, 0)>, dw_rows_kernel<T, 7, 1, rows_outputs(E, 7, 1, 1)>},
       {dw_rows_kernel<T, 7, 2, rows_outputs(E, 7, 2, 0)>, dw_rows_kernel<T, 7, 2, rows_outputs(E, 7, 2, 1)>}}};
  constexpr int kSpecKW[4] = {0, 3, 5, 7};
  const int spec_kw = kSpecKW[k_idx];
  const int spec_sw = k_idx == 0 ? 0 : s_idx + 1;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const T* inp = p.in.const_data_ptr<T>();
  const T* wp = p.weight.const_data_ptr<T>();
  T* outp = p.out.mutable_data_ptr<T>();
  const Strides<int> is = strides4<int>(p.in);
  const Strides<int> os = strides4<int>(p.out);
  const Epilogue ep = make_epilogue(p);
  // Up to one wave of resident blocks along y per channel block; the task loop strides.
  const int64_t wave = int64_t{sm_count()} * std::max<int64_t>(1, 2048 / (tx * ty));

  auto launch = [&](int v) {
    const int P = rows_outputs(E, spec_kw, spec_sw, v);
    const int64_t wblocks = ceil_div(g.Wo, P);
    const int64_t tasks = int64_t{g.N} * g.Ho * wblocks;
    int64_t gy = ceil_div(tasks, ty);
    gy = std::min<int64_t>({gy, std::max<int64_t>(1, 4 * wave / cblocks), 65535});
    const dim3 grid(static_cast<unsigned>(cblocks), static_cast<unsigned>(gy));
    const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
    kernels[k_idx][s_idx][v]<<<grid, block, smem, stream>>>(inp, wp, outp, g, is, os, ep,
                                                             static_cast<int>(tasks),
                                                             static_cast<int>(wblocks));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const uint64_t key = dw_tune_key(p.out, op, kRowsPath, p.out.numel(), g.Cout,
                                   k_idx * 8 + static_cast<int>(std::min<int64_t>(p.KH, 7)),
                                   dw_stride_code(p));
  launch(pick_variant(key, 2, /*fallback=*/1, launch));
  return true;
}

}  // namespace
}  // namespace dw

bool launch_dw_rows(const DwConv& p, int op) {
  using namespace dw;
  const int64_t esize = p.in.element_size();
  const int64_t vec = kPackBytes / esize;
  if (p.in.size(1) != p.out.size(1)) return false;  // m == 1 only
  if (p.in.stride(1) != 1 || p.out.stride(1) != 1 || p.out.size(1) % vec != 0) return false;
  if (needs_wide_index({&p.in, &p.out, &p.weight})) return false;
  for (const at::Tensor* t : {&p.in, &p.out}) {
    if (!is_aligned(t->const_data_ptr(), kPackBytes)) return false;
    for (int d : {0, 2, 3}) {
      if (t->size(d) > 1 && t->stride(d) % vec != 0) return false;
    }
  }
  bool launched = false;
  dispatch_dtype_index(p.in.scalar_type(), /*wide=*/false, [&](auto t, auto i) {
    if constexpr (std::is_same_v<decltype(i), int32_t>) launched = rows_typed<decltype(t)>(p, op);
  });
  return launched;
}

}  // namespace fastconv
