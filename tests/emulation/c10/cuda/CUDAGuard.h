// tests/emulation: the device guard, inert.
#pragma once

#include <c10/core/Device.h>

#include "c10/cuda/CUDAStream.h"

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(int) {}
};

}  // namespace cuda
}  // namespace c10
