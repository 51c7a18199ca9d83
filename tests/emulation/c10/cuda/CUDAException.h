// tests/emulation: CUDA error checks, inert (nothing can fail on the CPU).
#pragma once

#include <cuda_runtime.h>

#define C10_CUDA_CHECK(expression) ((void)(expression))
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
