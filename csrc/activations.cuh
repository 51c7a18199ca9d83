// Device-side activations and their derivatives, evaluated in fp32.
//
// Forward formulas and derivative boundary conventions mirror PyTorch's CUDA kernels so
// results match eager mode (e.g. relu6' is 0 at exactly 0 and 6, like hardtanh_backward;
// hardswish' is 0 at exactly -3 and 1 at exactly 3, like torch 2.14's hardswish_backward).
// NaN inputs propagate
// like PyTorch's (comparisons are written so NaN takes the pass-through branch).
#pragma once

#include <cuda_runtime.h>

#include "activation_codes.h"

namespace fastconv {

struct ActNone {
  static __device__ __forceinline__ float forward(float z) { return z; }
  static __device__ __forceinline__ float grad(float) { return 1.f; }
};

struct ActReLU {
  static __device__ __forceinline__ float forward(float z) { return z <= 0.f ? 0.f : z; }
  static __device__ __forceinline__ float grad(float z) { return z <= 0.f ? 0.f : 1.f; }
};

struct ActReLU6 {
  static __device__ __forceinline__ float forward(float z) {
    return z <= 0.f ? 0.f : (z >= 6.f ? 6.f : z);
  }
  static __device__ __forceinline__ float grad(float z) {
    return (z <= 0.f || z >= 6.f) ? 0.f : 1.f;
  }
};

struct ActSiLU {
  // expf, not __expf: the fast intrinsic is off by several ulp and breaks parity.
  static __device__ __forceinline__ float forward(float z) { return z / (1.f + expf(-z)); }
  static __device__ __forceinline__ float grad(float z) {
    const float s = 1.f / (1.f + expf(-z));
    return s * (1.f + z * (1.f - s));
  }
};

struct ActHardSwish {
  static __device__ __forceinline__ float forward(float z) {
    return z * fminf(fmaxf(z + 3.f, 0.f), 6.f) * (1.f / 6.f);
  }
  static __device__ __forceinline__ float grad(float z) {
    return z <= -3.f ? 0.f : (z < 3.f ? z / 3.f + 0.5f : 1.f);
  }
};

// The activation is a runtime argument rather than a template parameter to keep the
// number of kernel instantiations (and build time) down. The switch is taken once per
// N-element pack, is uniform across the warp, and costs nothing next to the memory traffic.
template <class Act, int N>
__device__ __forceinline__ void forward_pack(float (&z)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) z[i] = Act::forward(z[i]);
}

template <class Act, int N>
__device__ __forceinline__ void grad_pack(const float (&z)[N], float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) d[i] = Act::grad(z[i]);
}

// z[i] <- act(z[i])
template <int N>
__device__ __forceinline__ void activation_forward(int act, float (&z)[N]) {
  switch (act) {
    case kActReLU: forward_pack<ActReLU>(z); break;
    case kActReLU6: forward_pack<ActReLU6>(z); break;
    case kActSiLU: forward_pack<ActSiLU>(z); break;
    case kActHardSwish: forward_pack<ActHardSwish>(z); break;
    default: break;  // kActNone; other codes are rejected on the host
  }
}

// d[i] <- act'(z[i])
template <int N>
__device__ __forceinline__ void activation_grad(int act, const float (&z)[N], float (&d)[N]) {
  switch (act) {
    case kActReLU: grad_pack<ActReLU>(z, d); break;
    case kActReLU6: grad_pack<ActReLU6>(z, d); break;
    case kActSiLU: grad_pack<ActSiLU>(z, d); break;
    case kActHardSwish: grad_pack<ActHardSwish>(z, d); break;
    default: grad_pack<ActNone>(z, d); break;
  }
}

}  // namespace fastconv
