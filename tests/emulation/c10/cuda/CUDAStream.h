// tests/emulation: the current stream, a null handle.
#pragma once

#include <cuda_runtime.h>

namespace c10 {
namespace cuda {

class CUDAStream {
 public:
  cudaStream_t stream() const { return nullptr; }
  int64_t id() const { return 0; }
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(int /*device*/ = -1) { return {}; }

}  // namespace cuda
}  // namespace c10
