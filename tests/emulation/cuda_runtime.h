// The CUDA names the fused block's tensor-core kernel uses, for a CPU build of it
// (tests/cuda_emulation.py). A CTA runs as kThreads std::threads, one CTA at a time: threadIdx
// and blockIdx are thread-locals, __syncthreads a barrier over the CTA's threads, shared memory
// one static buffer (the driver's), and __ldg a plain load.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)

namespace emulation {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local Dim3 thread_index, block_index;
inline std::barrier<>* block_barrier = nullptr;  // the running CTA's

}  // namespace emulation

#define threadIdx (::emulation::thread_index)
#define blockIdx (::emulation::block_index)

inline void __syncthreads() { emulation::block_barrier->arrive_and_wait(); }

inline unsigned int __ldg(const unsigned int* p) { return *p; }

// CUDA's integer min and max.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
