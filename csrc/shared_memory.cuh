// A kernel's dynamic shared memory, as an array `name` of `type`, 16-byte aligned. A macro so
// that tests/emulation, which runs the kernels on the CPU, can give it a buffer of its own.
#pragma once

#ifndef FASTCONV_DYNAMIC_SHARED
#define FASTCONV_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif
