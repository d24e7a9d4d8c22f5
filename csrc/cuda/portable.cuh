// Everything in the kernel sources that must differ between nvcc and the CPU harness (csrc/testing), which
// compiles the same files with g++ -DLESS_HARNESS: how a kernel is launched and how dynamic shared memory is
// declared. Kernels use these two macros and otherwise plain CUDA C++ (no inline PTX), so what the harness runs
// is the code the GPU runs.
#pragma once

#include <cuda_runtime.h>

#ifdef LESS_HARNESS
#define LESS_LAUNCH(kernel, grid, block, smem, stream) ::less_harness::launch(kernel, grid, block, smem, stream)
#define LESS_DYNAMIC_SHARED(T, name) T* const name = ::less_harness::dynamic_shared<T>()
#else
// LESS_LAUNCH(kernel, grid, block, smem, stream)(args...): kernel may be a pointer to a template instance.
#define LESS_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
// Declared as bytes so that template instances with different element types share one extern array.
#define LESS_DYNAMIC_SHARED(T, name)                                \
  extern __shared__ __align__(16) unsigned char name##_bytes[];     \
  T* const name = reinterpret_cast<T*>(name##_bytes)
#endif
