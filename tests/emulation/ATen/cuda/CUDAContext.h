// tests/emulation: the device's properties (a GPU of a few SMs, so that grids sized by the SM
// count stay small and their grid-stride loops take several turns) and the current stream.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace at {
namespace cuda {

struct DeviceProperties {
  int multiProcessorCount = 3;
  int warpSize = 32;
  size_t sharedMemPerBlockOptin = 227 * 1024;
};

inline const DeviceProperties* getCurrentDeviceProperties() {
  static const DeviceProperties properties;
  return &properties;
}

using c10::cuda::getCurrentCUDAStream;

}  // namespace cuda
}  // namespace at
