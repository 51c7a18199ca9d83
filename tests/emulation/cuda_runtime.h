// The CUDA names fastconv's kernels and launches use, for a CPU build of the extension
// (tests/cuda_emulation.py). A launch runs its CTAs one after another, each CTA as its threads
// on concurrent std::threads: threadIdx, blockIdx, blockDim and gridDim are thread-locals,
// __syncthreads is a barrier over the CTA's threads, the warp intrinsics meet at a barrier
// over the warp's, static __shared__ arrays are function statics (one CTA runs at a time) and
// dynamic shared memory one NaN-poisoned buffer. Streams and events are inert. The autotuner
// (csrc/autotune.h) sees every stream capturing, so it launches each key's default variant,
// unless FASTCONV_EMULATION_VARIANT=v is set: then nothing captures, and the timings make
// variant v the fastest, so that a key's first call runs every variant and keeps v.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

namespace emulation {

// One warp's meeting point for the intrinsics that exchange registers.
struct Warp {
  explicit Warp(int lanes) : meet(lanes) {}
  std::barrier<> meet;
  alignas(16) unsigned char value[32][16];  // what each lane publishes to a shuffle
  uint32_t registers[32][8];                // to an MMA (mma_instructions.cuh)
  const void* address[32];                  // to ldmatrix
};

struct Cta {
  std::unique_ptr<std::barrier<>> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local dim3 thread_index{0, 0, 0}, block_index{0, 0, 0}, block_dim, grid_dim;
inline thread_local int lane_id = 0;
inline thread_local Warp* warp = nullptr;
inline Cta* cta = nullptr;                       // the running CTA
inline std::vector<unsigned char> dynamic_shared;  // its dynamic shared memory

// Exchanges one value among the warp's lanes: each lane publishes `v` and reads lane `from`'s.
template <typename T>
T exchange(T v, int from) {
  static_assert(sizeof(T) <= 16, "one register's worth");
  std::memcpy(warp->value[lane_id], &v, sizeof(T));
  warp->meet.arrive_and_wait();
  T r;
  std::memcpy(&r, warp->value[from], sizeof(T));
  warp->meet.arrive_and_wait();  // nobody republishes before all have read
  return r;
}

// kernel<<<grid, block, shared, stream>>>(args...) becomes
// Launch(grid, block, shared, stream).run(kernel, args...): the grid's CTAs one after another,
// on one pool of threads (one a CUDA thread) that meets at a gate between CTAs. A thread that
// returns leaves its CTA's and warp's barriers (arrive_and_drop), as an exited thread stops
// counting at a hardware barrier.
struct Launch {
  dim3 grid, block;
  size_t shared;
  Launch(dim3 g, dim3 b, size_t s = 0, const void* /*stream*/ = nullptr) : grid(g), block(b), shared(s) {}

  template <typename Kernel, typename... Args>
  void run(Kernel kernel, Args... args) const {
    const int threads = static_cast<int>(block.x * block.y * block.z);
    const unsigned ctas = grid.x * grid.y * grid.z;
    if (threads == 0 || ctas == 0) return;
    std::barrier<> gate(threads + 1);
    Cta state;
    unsigned current = 0;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        thread_index = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
        block_dim = block;
        grid_dim = grid;
        lane_id = t % 32;
        for (unsigned i = 0; i < ctas; ++i) {
          gate.arrive_and_wait();  // the CTA is set up
          block_index = dim3(current % grid.x, current / grid.x % grid.y, current / (grid.x * grid.y));
          warp = state.warps[t / 32].get();
          kernel(args...);
          state.barrier->arrive_and_drop();
          warp->meet.arrive_and_drop();
          gate.arrive_and_wait();  // every thread of the CTA is done
        }
      });
    }
    for (unsigned i = 0; i < ctas; ++i) {
      dynamic_shared.assign(shared + 16, 0xff);  // NaN in every float format
      state.barrier = std::make_unique<std::barrier<>>(threads);
      state.warps.clear();
      for (int w = 0; w * 32 < threads; ++w) state.warps.push_back(std::make_unique<Warp>(std::min(32, threads - w * 32)));
      cta = &state;
      current = i;
      gate.arrive_and_wait();
      gate.arrive_and_wait();
    }
    for (auto& thread : pool) thread.join();
    cta = nullptr;
  }
};

}  // namespace emulation

#define threadIdx (::emulation::thread_index)
#define blockIdx (::emulation::block_index)
#define blockDim (::emulation::block_dim)
#define gridDim (::emulation::grid_dim)

#define FASTCONV_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::emulation::dynamic_shared.data())

inline void __syncthreads() { emulation::cta->barrier->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask, int width = 32) {
  const int lane = emulation::lane_id;
  const int from = (lane & ~(width - 1)) | ((lane ^ lane_mask) & (width - 1));
  return emulation::exchange(v, from);
}

template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T v, unsigned delta, int width = 32) {
  const int lane = emulation::lane_id, base = lane & ~(width - 1);
  const int from = (lane - base) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return emulation::exchange(v, from);
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fadd_rn(float a, float b) { return a + b; }

// CUDA's integer min and max (device code calls them unqualified).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }

// The runtime API, inert.
using cudaStream_t = void*;
using cudaEvent_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorStreamCaptureImplicit = 906 };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal = 0, cudaStreamCaptureModeThreadLocal = 1,
                             cudaStreamCaptureModeRelaxed = 2 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
// FASTCONV_EMULATION_VARIANT's value, or -1.
inline int forced_variant() {
  const char* v = std::getenv("FASTCONV_EMULATION_VARIANT");
  return v != nullptr && v[0] != '\0' ? std::atoi(v) : -1;
}
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = forced_variant() >= 0 ? cudaStreamCaptureStatusNone : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}
inline cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode*) { return cudaSuccess; }
namespace emulation {
inline thread_local int timed_variant = 0;  // autotune.h times variants 0, 1, ... in order
}  // namespace emulation
inline cudaError_t cudaEventCreate(cudaEvent_t*) {
  emulation::timed_variant = 0;  // a new timing: autotune.h makes its two events first
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) {
  const int v = emulation::timed_variant++;
  *ms = v == forced_variant() ? 0.f : 1.f + static_cast<float>(v);
  return cudaSuccess;
}
