// Device helpers shared by the LESS kernels: element conversions, 16-byte vector unpacking, warp reductions and
// the dtype dispatch macro (the head_dim dispatch is attention_block.cuh's LESS_DISPATCH_ROW_LAYOUT). The attention
// numerics themselves (online softmax, state merge, eviction order) are in csrc/less_numerics.h, shared with the
// CPU kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/kernels.h"
#include "cuda/portable.cuh"
#include "less_numerics.h"

namespace less_cuda {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// One 16-byte load holds 16 / sizeof(T) elements; unpack16 widens them to fp32.
template <typename T>
constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ uint4 load16(const void* p) { return *reinterpret_cast<const uint4*>(p); }

__device__ __forceinline__ void unpack16(const uint4& raw, float* out, float) {
  out[0] = __uint_as_float(raw.x);
  out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z);
  out[3] = __uint_as_float(raw.w);
}
__device__ __forceinline__ void unpack16(const uint4& raw, float* out, __half) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void unpack16(const uint4& raw, float* out, __nv_bfloat16) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Sums / maxima over groups of `width` consecutive lanes (a power of two); every lane gets the result.
template <int width = 32>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset, width);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

// Batch row b's row in a state pool of N rows (decode_step's state_rows), for addressing: a row outside [0, N)
// addresses row 0 instead, so that no block reads outside the pool; decode_step's token_position stops the kernel
// on such a row before any block writes the state.
__device__ __forceinline__ int64_t pool_row(const StateRows& state, int64_t N, int64_t b) {
  const int64_t r = state.row(b);
  return r >= 0 && r < N ? r : 0;
}

}  // namespace cuda
}  // namespace less_cuda

// Instantiates the body, which must return, once per element type, with `T` naming it.
#define LESS_DISPATCH_SCALAR(kind, T, ...)                                   \
  switch (kind) {                                                            \
    case ::less_cuda::cuda::ScalarKind::kFloat32: {                          \
      using T = float;                                                       \
      __VA_ARGS__;                                                           \
    }                                                                        \
    case ::less_cuda::cuda::ScalarKind::kFloat16: {                          \
      using T = __half;                                                      \
      __VA_ARGS__;                                                           \
    }                                                                        \
    case ::less_cuda::cuda::ScalarKind::kBFloat16: {                         \
      using T = __nv_bfloat16;                                               \
      __VA_ARGS__;                                                           \
    }                                                                        \
  }                                                                          \
  return cudaErrorInvalidValue
