// Depthwise kernels that take any layout and either index width:
//   * dw_direct_kernel: forward fallback, one output element per thread (64-bit indexing,
//     multiplier > 1 in channels_last, weight tiles too large for shared memory).
//   * dw_gather_kernel: backward input in gather form (no atomics) for stride > 1 or
//     multiplier > 1 (the stride-1, m == 1 case runs the forward kernels on flipped taps).
//   * dw_wgrad_kernel + dw_wgrad_reduce_kernel: backward weight and bias, deterministic.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <ATen/ops/empty.h>

#include "depthwise_common.cuh"

namespace fastconv {
namespace dw {
namespace {

// Splits a flat output index into (n, c, h, w): channels innermost when `cl`, else w.
template <typename idx_t>
struct Coord {
  idx_t n;
  int c, h, w;
};

template <typename idx_t>
__device__ __forceinline__ Coord<idx_t> split_index(idx_t e, int C, int H, int W, bool cl) {
  Coord<idx_t> r;
  if (cl) {
    r.c = static_cast<int>(e % C);
    e /= C;
    r.w = static_cast<int>(e % W);
    e /= W;
    r.h = static_cast<int>(e % H);
    r.n = e / H;
  } else {
    r.w = static_cast<int>(e % W);
    e /= W;
    r.h = static_cast<int>(e % H);
    e /= H;
    r.c = static_cast<int>(e % C);
    r.n = e / C;
  }
  return r;
}

// Same accumulation order as dw_rows_kernel (rows outside the input skipped, padding
// columns add 0 * w), so the channels_last fallback matches the vectorised path bit for bit.
template <typename T, typename idx_t>
__global__ void __launch_bounds__(kBlockThreads) dw_direct_kernel(
    const T* __restrict__ in,   // (N, Cin, Hi, Wi), any strides
    const T* __restrict__ wt,   // (Cout, KH*KW) contiguous
    T* __restrict__ out,        // (N, Cout, Ho, Wo), any strides
    ConvGeom g,                 // geometry
    Strides<idx_t> is,          // in element strides
    Strides<idx_t> os,          // out element strides
    Epilogue ep,                // per-channel epilogue
    idx_t total,                // N * Cout * Ho * Wo
    bool out_cl) {              // walk outputs channels-innermost
  const idx_t KK = static_cast<idx_t>(g.KH) * g.KW;
  const idx_t step = static_cast<idx_t>(gridDim.x) * blockDim.x;
  for (idx_t e = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const Coord<idx_t> o = split_index(e, g.Cout, g.Ho, g.Wo, out_cl);
    const int oc = o.c;
    const T* src = in + o.n * is.n + static_cast<idx_t>(oc / g.m) * is.c;
    const T* wk = wt + oc * KK;
    float acc = 0.f;
    for (int a = 0; a < g.KH; ++a) {
      const int h = o.h * g.sh - g.pt + a * g.dh;
      if (h < 0 || h >= g.Hi) continue;
      const T* row = src + h * is.h;
      for (int b = 0; b < g.KW; ++b) {
        const int w = o.w * g.sw - g.pl + b * g.dw;
        const idx_t t = static_cast<idx_t>(a) * g.KW + b;
        const float xv = (w >= 0 && w < g.Wi) ? static_cast<float>(row[w * is.w]) : 0.f;
        acc = fmaf(xv, static_cast<float>(wk[g.flip ? KK - 1 - t : t]), acc);
      }
    }
    float z[1] = {(acc + load_param<T>(ep.bias, ep.bias_kind, oc, 0.f)) *
                      load_param<T>(ep.scale, ep.scale_kind, oc, 1.f) +
                  load_param<T>(ep.shift, ep.shift_kind, oc, 0.f)};
    activation_forward(ep.act, z);
    out[o.n * os.n + oc * os.c + o.h * os.h + o.w * os.w] = static_cast<T>(z[0]);
  }
}

// grad_x[n, c, h, w] = sum_{k < m} sum_{a, b} grad_c[n, c*m + k, i, j] * w[c*m + k, a, b]
// over h + pt - a*dh = i*sh, w + pl - b*dw = j*sw with 0 <= i < Ho, 0 <= j < Wo.
// Geometry is the forward one: (Hi, Wi) = x's, (Ho, Wo) = grad_c's.
template <typename T, typename idx_t>
__global__ void __launch_bounds__(kBlockThreads) dw_gather_kernel(
    const T* __restrict__ gc,   // grad_c (N, Cout, Ho, Wo), any strides
    const T* __restrict__ wt,   // (Cout, KH*KW) contiguous
    T* __restrict__ gx,         // grad_x (N, Cin, Hi, Wi), any strides
    ConvGeom g,                 // forward geometry
    Strides<idx_t> gs,          // grad_c element strides
    Strides<idx_t> xs,          // grad_x element strides
    idx_t total,                // N * Cin * Hi * Wi
    bool out_cl) {              // walk grad_x channels-innermost
  const int KK = g.KH * g.KW;
  const idx_t step = static_cast<idx_t>(gridDim.x) * blockDim.x;
  for (idx_t e = static_cast<idx_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const Coord<idx_t> o = split_index(e, g.Cin, g.Hi, g.Wi, out_cl);
    float acc = 0.f;
    for (int k = 0; k < g.m; ++k) {
      const int oc = o.c * g.m + k;
      const T* src = gc + o.n * gs.n + static_cast<idx_t>(oc) * gs.c;
      const T* wk = wt + static_cast<idx_t>(oc) * KK;
      for (int a = 0; a < g.KH; ++a) {
        const int th = o.h + g.pt - a * g.dh;
        if (th < 0 || th % g.sh != 0) continue;
        const int i = th / g.sh;
        if (i >= g.Ho) continue;
        const T* row = src + i * gs.h;
        for (int b = 0; b < g.KW; ++b) {
          const int tw = o.w + g.pl - b * g.dw;
          if (tw < 0 || tw % g.sw != 0) continue;
          const int j = tw / g.sw;
          if (j >= g.Wo) continue;
          acc = fmaf(static_cast<float>(row[j * gs.w]), static_cast<float>(wk[a * g.KW + b]), acc);
        }
      }
    }
    gx[o.n * xs.n + o.c * xs.c + o.h * xs.h + o.w * xs.w] = static_cast<T>(acc);
  }
}

// ---------------------------------------------------------------------------------------
// Backward weight.
//
// Stage 1: block (tx channel lanes, ty pixel lanes) x grid (channel blocks, pixel chunks,
// tap groups). Each thread owns VEC output channels and NT taps (all K*K taps when K > 0,
// else taps [z*NT, z*NT + NT) of tap group z) plus, in tap group 0, the bias sum; it walks
// pixels p = chunk_begin + ty, +blockDim.y, ... of the flattened (n, i, j) range in order.
// Sums are reduced over the pixel lanes by a fixed shuffle tree inside each warp and a
// fixed-order sum over warps, and written to workspace slot [chunk][tap][oc] (tap KK is the
// bias) by exactly one thread. Stage 2 sums the chunks of each slot in a fixed order.

constexpr int kGroupTaps = 8;          // taps per thread of the runtime-K variant
constexpr int kMaxWgradLanes = 16;     // channel lanes per block
constexpr int kReduceLanes = 16;       // stage 2: partial rows per block
constexpr int64_t kMinPixelsPerThread = 16;

struct WgradSplit {
  int64_t pixels;     // N * Ho * Wo
  int64_t chunk_len;  // pixels per chunk (last chunk may be shorter)
  int slots;          // KK + 1 (tap KK = bias)
};

template <typename T, typename idx_t, int VEC, int K>
__global__ void __launch_bounds__(kBlockThreads) dw_wgrad_kernel(
    const T* __restrict__ gc,   // grad_c (N, Cout, Ho, Wo), any strides
    const T* __restrict__ x,    // forward input (N, Cin, Hi, Wi), any strides
    ConvGeom g,                 // forward geometry
    Strides<idx_t> gs,          // grad_c element strides
    Strides<idx_t> xs,          // x element strides
    WgradSplit sp,              // pixel chunks
    float* __restrict__ ws) {   // [gridDim.y][KK + 1][Cout] partial sums
  constexpr int NT = K > 0 ? K * K : kGroupTaps;
  constexpr int S = NT + 1;  // slots per thread: NT taps + bias
  const int KK = g.KH * g.KW;
  const int tx = blockDim.x;
  const int CBv = tx * VEC;  // channels per block
  const int oc0 = blockIdx.x * CBv + threadIdx.x * VEC;
  const bool active = oc0 < g.Cout;  // inactive lanes still join the reductions
  const int t0 = K > 0 ? 0 : blockIdx.z * NT;
  const int nt = K > 0 ? NT : min(NT, KK - t0);
  const bool with_bias = blockIdx.z == 0;

  // Tap offsets (runtime-K variant): input row / column offsets of tap t0 + u.
  int tap_h[K > 0 ? 1 : NT], tap_w[K > 0 ? 1 : NT];
  if constexpr (K == 0) {
#pragma unroll
    for (int u = 0; u < NT; ++u) {
      const int tap = t0 + min(u, nt - 1);
      tap_h[u] = (tap / g.KW) * g.dh;
      tap_w[u] = (tap % g.KW) * g.dw;
    }
  }

  float acc[S][VEC];
#pragma unroll
  for (int u = 0; u < S; ++u) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[u][v] = 0.f;
  }

  const int64_t begin = static_cast<int64_t>(blockIdx.y) * sp.chunk_len;
  const int64_t end = min(sp.pixels, begin + sp.chunk_len);
  int64_t p = begin + threadIdx.y;
  if (active && p < end) {
    // Position of pixel p, then stepped incrementally by blockDim.y pixels.
    int j = static_cast<int>(p % g.Wo);
    int64_t r = p / g.Wo;
    int i = static_cast<int>(r % g.Ho);
    idx_t n = static_cast<idx_t>(r / g.Ho);
    const int dj = static_cast<int>(blockDim.y % g.Wo);
    const int di = static_cast<int>((blockDim.y / g.Wo) % g.Ho);
    const idx_t dn = static_cast<idx_t>((blockDim.y / g.Wo) / g.Ho);
    const T* gbase = gc + static_cast<idx_t>(oc0) * gs.c;
    const T* xbase = x + static_cast<idx_t>(oc0 / g.m) * xs.c;
    for (; p < end; p += blockDim.y) {
      const Pack<T, VEC> gpk = load_pack<VEC>(gbase + n * gs.n + i * gs.h + j * gs.w);
      float gv[VEC];
      unpack(gpk, gv);
      if (with_bias) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[NT][v] += gv[v];
      }
      const T* xn = xbase + n * xs.n;
      const int h0 = i * g.sh - g.pt;
      const int w0 = j * g.sw - g.pl;
      if constexpr (K > 0) {
#pragma unroll
        for (int a = 0; a < K; ++a) {
          const int h = h0 + a * g.dh;
          if (h < 0 || h >= g.Hi) continue;
          const T* row = xn + h * xs.h;
#pragma unroll
          for (int b = 0; b < K; ++b) {
            const int w = w0 + b * g.dw;
            if (w < 0 || w >= g.Wi) continue;
            float xv[VEC];
            unpack(load_pack<VEC>(row + w * xs.w), xv);
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[a * K + b][v] = fmaf(gv[v], xv[v], acc[a * K + b][v]);
          }
        }
      } else {
#pragma unroll
        for (int u = 0; u < NT; ++u) {
          const int h = h0 + tap_h[u];
          const int w = w0 + tap_w[u];
          if (u >= nt || h < 0 || h >= g.Hi || w < 0 || w >= g.Wi) continue;
          float xv[VEC];
          unpack(load_pack<VEC>(xn + h * xs.h + w * xs.w), xv);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[u][v] = fmaf(gv[v], xv[v], acc[u][v]);
        }
      }
      j += dj;
      i += di;
      n += dn;
      if (j >= g.Wo) {
        j -= g.Wo;
        ++i;
      }
      if (i >= g.Ho) {
        i -= g.Ho;
        ++n;
      }
    }
  }

  // Pixel lanes of one channel lane: lanes l, l + tx, l + 2tx, ... of a warp (tx is a power
  // of two <= 16, blockDim.x * blockDim.y == kBlockThreads), then warps in order.
  float* red = dyn_smem();  // [nwarps][S][CBv]
  const int tid = threadIdx.y * tx + threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int nwarps = (tx * blockDim.y) / kWarpSize;
#pragma unroll
  for (int u = 0; u < S; ++u) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      float s = acc[u][v];
      for (int off = kWarpSize / 2; off >= tx; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
      if (lane < tx) red[(warp * S + u) * CBv + lane * VEC + v] = s;
    }
  }
  __syncthreads();
  const int cbase = blockIdx.x * CBv;
  float* part = ws + static_cast<int64_t>(blockIdx.y) * sp.slots * g.Cout;
  for (int idx = tid; idx < S * CBv; idx += tx * blockDim.y) {
    const int u = idx / CBv;
    const int cl = idx - u * CBv;
    const int oc = cbase + cl;
    if (oc >= g.Cout) continue;
    float s = 0.f;
    for (int w = 0; w < nwarps; ++w) s += red[(w * S + u) * CBv + cl];
    if (u < nt) {
      part[static_cast<int64_t>(t0 + u) * g.Cout + oc] = s;
    } else if (u == NT && with_bias) {
      part[static_cast<int64_t>(KK) * g.Cout + oc] = s;
    }
  }
}

// Stage 2: out slot q = tap * Cout + oc: sum over chunks p of ws[p][q]; lane ty sums
// p = ty, ty + kReduceLanes, ... in order, then a fixed tree over the lanes.
template <typename T>
__global__ void __launch_bounds__(kWarpSize * kReduceLanes) dw_wgrad_reduce_kernel(
    const float* __restrict__ ws,   // [parts][KK + 1][Cout]
    int64_t parts,                  // chunks
    int KK,                         // taps
    int Cout,                       // output channels
    T* __restrict__ grad_w,         // (Cout, KK) contiguous
    T* __restrict__ grad_b) {       // (Cout,)
  __shared__ float sums[kReduceLanes][kWarpSize];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t Q = static_cast<int64_t>(KK + 1) * Cout;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kWarpSize + tx;
  float s = 0.f;
  if (q < Q) {
    for (int64_t p = ty; p < parts; p += kReduceLanes) s += ws[p * Q + q];
  }
  sums[ty][tx] = s;
  __syncthreads();
  for (int half = kReduceLanes / 2; half > 0; half /= 2) {
    if (ty < half) sums[ty][tx] += sums[ty + half][tx];
    __syncthreads();
  }
  if (ty == 0 && q < Q) {
    const int tap = static_cast<int>(q / Cout);
    const int oc = static_cast<int>(q - static_cast<int64_t>(tap) * Cout);
    if (tap < KK) {
      grad_w[static_cast<int64_t>(oc) * KK + tap] = static_cast<T>(sums[0][tx]);
    } else {
      grad_b[oc] = static_cast<T>(sums[0][tx]);
    }
  }
}

int64_t grid_1d(int64_t total) {
  const int64_t wave = int64_t{sm_count()} * (2048 / kBlockThreads);
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, kBlockThreads), 4 * wave));
}

// True when t's channel stride is 1 (and C > 1): walk the outputs channels-innermost.
bool channels_inner(const at::Tensor& t) { return t.size(1) > 1 && t.stride(1) == 1; }

}  // namespace
}  // namespace dw

void launch_dw_direct(const DwConv& p) {
  using namespace dw;
  const bool wide = needs_wide_index({&p.in, &p.out, &p.weight});
  const ConvGeom g = make_geom(p);
  const Epilogue ep = make_epilogue(p);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t total = p.out.numel();
  const bool out_cl = channels_inner(p.out);
  dispatch_dtype_index(p.in.scalar_type(), wide, [&](auto t, auto i) {
    using T = decltype(t);
    using idx_t = decltype(i);
    dw_direct_kernel<T, idx_t><<<static_cast<unsigned>(grid_1d(total)), kBlockThreads, 0, stream>>>(
        p.in.const_data_ptr<T>(), p.weight.const_data_ptr<T>(), p.out.mutable_data_ptr<T>(), g,
        strides4<idx_t>(p.in), strides4<idx_t>(p.out), ep, static_cast<idx_t>(total), out_cl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_dw_gather(const at::Tensor& grad_c, const at::Tensor& weight,
                      const at::Tensor& grad_x, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                      int64_t dh, int64_t dw) {
  using namespace dw;
  DwConv p;
  p.in = grad_x;  // forward geometry: in = x's shape, out = grad_c's shape
  p.out = grad_c;
  p.weight = weight;
  p.KH = weight.size(2);
  p.KW = weight.size(3);
  p.sh = sh, p.sw = sw, p.pt = pt, p.pl = pl, p.dh = dh, p.dw = dw;
  const ConvGeom g = make_geom(p);
  const bool wide = needs_wide_index({&grad_c, &grad_x, &weight});
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t total = grad_x.numel();
  const bool out_cl = channels_inner(grad_x);
  dispatch_dtype_index(grad_x.scalar_type(), wide, [&](auto t, auto i) {
    using T = decltype(t);
    using idx_t = decltype(i);
    dw_gather_kernel<T, idx_t><<<static_cast<unsigned>(grid_1d(total)), kBlockThreads, 0, stream>>>(
        grad_c.const_data_ptr<T>(), weight.const_data_ptr<T>(), grad_x.mutable_data_ptr<T>(), g,
        strides4<idx_t>(grad_c), strides4<idx_t>(grad_x), static_cast<idx_t>(total), out_cl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_dw_wgrad(const at::Tensor& grad_c, const at::Tensor& x, int64_t KH, int64_t KW,
                     int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh, int64_t dw,
                     const at::Tensor& grad_weight, const at::Tensor& grad_bias) {
  using namespace dw;
  DwConv p;
  p.in = x;
  p.out = grad_c;
  p.weight = grad_weight;
  p.KH = KH, p.KW = KW, p.sh = sh, p.sw = sw, p.pt = pt, p.pl = pl, p.dh = dh, p.dw = dw;
  const ConvGeom g = make_geom(p);
  const bool wide = needs_wide_index({&grad_c, &x});
  const int64_t KK = KH * KW;
  const int64_t Cout = g.Cout;

  // Kernel: K in {3, 5, 7} square keeps all taps in registers; else tap groups of 8.
  const bool spec_k = KH == KW && (KH == 3 || KH == 5 || KH == 7);
  const int K = spec_k ? static_cast<int>(KH) : 0;
  const int NT = spec_k ? static_cast<int>(KK) : kGroupTaps;
  const int64_t groups = spec_k ? 1 : ceil_div(KK, kGroupTaps);
  // 4-channel packs: channels innermost in both tensors, m == 1, 3x3, aligned.
  const int64_t esize = x.element_size();
  bool vec4 = K == 3 && g.m == 1 && Cout % 4 == 0 && grad_c.stride(1) == 1 && x.stride(1) == 1;
  for (const at::Tensor* t : {&grad_c, &x}) {
    vec4 = vec4 && is_aligned(t->const_data_ptr(), 4 * esize);
    for (int d : {0, 2, 3}) vec4 = vec4 && (t->size(d) == 1 || t->stride(d) % 4 == 0);
  }
  const int VEC = vec4 ? 4 : 1;
  const int64_t lanes = ceil_div(Cout, VEC);
  // Channel lanes: adjacent channels are adjacent in memory only when channels are innermost.
  int64_t tx = 1;
  if (channels_inner(grad_c)) {
    while (tx < kMaxWgradLanes && tx < lanes) tx *= 2;
  }
  const int64_t ty = kBlockThreads / tx;
  const int64_t cblocks = ceil_div(lanes, tx);
  const size_t smem = sizeof(float) * (kBlockThreads / kWarpSize) * (NT + 1) * tx * VEC;

  // Pixel chunks: about two waves of blocks, at least kMinPixelsPerThread pixels per thread.
  WgradSplit sp;
  sp.pixels = int64_t{g.N} * g.Ho * g.Wo;
  sp.slots = static_cast<int>(KK + 1);
  const int64_t target = 2 * int64_t{sm_count()} * (2048 / kBlockThreads);
  int64_t chunks = std::max<int64_t>(1, ceil_div(target, cblocks * groups));
  chunks = std::min<int64_t>({chunks, std::max<int64_t>(1, sp.pixels / (ty * kMinPixelsPerThread)), 65535});
  sp.chunk_len = ceil_div(sp.pixels, chunks);
  chunks = ceil_div(sp.pixels, sp.chunk_len);

  at::Tensor ws = at::empty({chunks, KK + 1, Cout}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(cblocks), static_cast<unsigned>(chunks),
                  static_cast<unsigned>(groups));
  const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  TORCH_CHECK(cblocks <= std::numeric_limits<int>::max() && groups <= 65535,
              "fastconv_cuda::depthwise_backward_weight: too many channels or taps (", Cout, ", ", KK, ")");

  dispatch_dtype_index(x.scalar_type(), wide, [&](auto t, auto i) {
    using T = decltype(t);
    using idx_t = decltype(i);
    using Kernel = decltype(&dw_wgrad_kernel<T, idx_t, 1, 0>);
    Kernel kernel = dw_wgrad_kernel<T, idx_t, 1, 0>;
    if (vec4) {
      kernel = dw_wgrad_kernel<T, idx_t, 4, 3>;
    } else if (K == 3) {
      kernel = dw_wgrad_kernel<T, idx_t, 1, 3>;
    } else if (K == 5) {
      kernel = dw_wgrad_kernel<T, idx_t, 1, 5>;
    } else if (K == 7) {
      kernel = dw_wgrad_kernel<T, idx_t, 1, 7>;
    }
    kernel<<<grid, block, smem, stream>>>(grad_c.const_data_ptr<T>(), x.const_data_ptr<T>(), g,
                                          strides4<idx_t>(grad_c), strides4<idx_t>(x), sp,
                                          ws.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t Q = (KK + 1) * Cout;
    dw_wgrad_reduce_kernel<T><<<static_cast<unsigned>(ceil_div(Q, kWarpSize)),
                                dim3(kWarpSize, kReduceLanes), 0, stream>>>(
        ws.const_data_ptr<float>(), chunks, static_cast<int>(KK), static_cast<int>(Cout),
        grad_weight.mutable_data_ptr<T>(), grad_bias.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastconv
