// CPU execution harness for CUDA kernel source: g++ compiles the very .cu files that nvcc compiles, with
// -DLESS_HARNESS and `-include harness.h` (standing in for nvcc's implicit cuda_runtime.h), and this header gives
// them CUDA's execution model on the CPU:
//   - blocks run one after another; the threads of a block are fibers on one OS thread, so every thread has
//     its own stack and locals, and control changes hands only at __syncthreads and warp collectives;
//   - threadIdx/blockIdx/blockDim/gridDim, x fastest in the linear thread order (lane = linear % 32);
//   - __syncthreads is a real barrier, warp collectives (__shfl*_sync, __ballot_sync, ...) wait for every lane
//     named in the mask and follow PTX's lane arithmetic, sub-warp `width` included;
//   - `__shared__` is one copy per block (blocks run in turn), dynamic shared memory is poisoned with NaN bytes
//     at every block start, so reading what no thread wrote shows up in the results;
//   - half / bfloat16 conversions round to nearest even bit for bit like the hardware and torch;
//   - __trap() fails the launch (the GPU's sticky launch failure), with the calling thread in the message;
//   - with LESS_HARNESS_FAST_MATH (harness_build.py defines it when csrc/cuda_build.py's nvcc flags ask for
//     --use_fast_math), expf and logf are the approximate intrinsics and kernels run with subnormals flushed to
//     zero, as nvcc's fast-math code does.
// What it cannot show (races, timing, PTX, the memory model): README.md. Scheduler, barrier and collectives:
// harness_runtime.cpp.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>

// ---------------------------------------------------------------------------------------------------------------
// CUDA keywords
// ---------------------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __shared__ static  // one copy per process = one per block, since blocks run one at a time
#define __constant__ static
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// ---------------------------------------------------------------------------------------------------------------
// Vector types
// ---------------------------------------------------------------------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// ---------------------------------------------------------------------------------------------------------------
// Runtime API subset
// ---------------------------------------------------------------------------------------------------------------
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
cudaError_t cudaGetLastError();   // returns and clears the last launch error
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);
// The device's answer is a property of the compiled kernel (registers, shared memory): the harness has none, so
// it returns what the tests set (less_harness_set_occupancy; 2 by default).
int less_harness_occupancy();
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = less_harness_occupancy();
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------------------
// Built-in variables: set by the scheduler before it hands control to a thread
// ---------------------------------------------------------------------------------------------------------------
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

namespace less_harness {

// Scheduler entry points (harness_runtime.cpp).
void block_barrier();
[[noreturn]] void trap();  // fails the launch; the calling thread never resumes
int block_barrier_count(int predicate);  // __syncthreads_count
void* dynamic_shared_memory();

// A warp collective: every lane named in `mask` contributes `value` (bits of up to 8 bytes) and an argument;
// the call returns once they all have, with this lane's result computed by CUDA's rules for `op`.
enum class WarpOp { kSync, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kReduceAdd, kReduceMin,
                    kReduceMax };
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width);

struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_smem;
};
// Runs `body(ctx)` for every thread of every block; failures (bad configuration, deadlock, collective misuse)
// become the error that cudaGetLastError reports.
void run_kernel(const LaunchConfig& config, void (*body)(void*), void* ctx);

template <typename T>
uint64_t to_bits(T value) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "warp collectives move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// What `kernel<<<grid, block, smem, stream>>>(args...)` becomes (see csrc/cuda/portable.cuh): the arguments
// are converted to the parameter types once, as a launch copies them, and every thread gets its own copy.
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  LaunchConfig config;

  template <typename... A>
  void operator()(A&&... args) const {
    struct Call {
      void (*kernel)(P...);
      std::tuple<P...> params;
    } call{kernel, std::tuple<P...>(std::forward<A>(args)...)};
    run_kernel(config, [](void* c) { auto* call = static_cast<Call*>(c); std::apply(call->kernel, call->params); },
               &call);
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t) {
  return {kernel, {grid, block, dynamic_smem}};
}

template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_memory());
}

}  // namespace less_harness

// ---------------------------------------------------------------------------------------------------------------
// Synchronisation and warp intrinsics
// ---------------------------------------------------------------------------------------------------------------
inline void __syncthreads() { less_harness::block_barrier(); }
[[noreturn]] inline void __trap() { less_harness::trap(); }
inline int __syncthreads_count(int predicate) { return less_harness::block_barrier_count(predicate != 0); }
inline int __syncthreads_and(int predicate) {
  return less_harness::block_barrier_count(predicate != 0) == static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int predicate) { return less_harness::block_barrier_count(predicate != 0) > 0; }
// Fibers switch only at barriers and collectives, so every write is already visible to the next reader.
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  less_harness::warp_collective(less_harness::WarpOp::kSync, mask, 0, 0, 32);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  using namespace less_harness;
  return from_bits<T>(warp_collective(WarpOp::kShflIdx, mask, to_bits(var), src_lane, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using namespace less_harness;
  return from_bits<T>(warp_collective(WarpOp::kShflUp, mask, to_bits(var), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using namespace less_harness;
  return from_bits<T>(warp_collective(WarpOp::kShflDown, mask, to_bits(var), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  using namespace less_harness;
  return from_bits<T>(warp_collective(WarpOp::kShflXor, mask, to_bits(var), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(
      less_harness::warp_collective(less_harness::WarpOp::kBallot, mask, predicate != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(less_harness::warp_collective(less_harness::WarpOp::kAny, mask, predicate != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int predicate) {
  return static_cast<int>(less_harness::warp_collective(less_harness::WarpOp::kAll, mask, predicate != 0, 0, 32));
}
// sm_80 integer warp reductions (the value is reinterpreted as signed for the int overloads' min/max).
inline unsigned __reduce_add_sync(unsigned mask, unsigned value) {
  return static_cast<unsigned>(less_harness::warp_collective(less_harness::WarpOp::kReduceAdd, mask, value, 0, 32));
}
inline int __reduce_add_sync(unsigned mask, int value) {
  return static_cast<int>(__reduce_add_sync(mask, static_cast<unsigned>(value)));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned value) {
  return static_cast<unsigned>(less_harness::warp_collective(less_harness::WarpOp::kReduceMin, mask, value, 0, 32));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned value) {
  return static_cast<unsigned>(less_harness::warp_collective(less_harness::WarpOp::kReduceMax, mask, value, 0, 32));
}
inline int __reduce_min_sync(unsigned mask, int value) {
  return static_cast<int>(less_harness::warp_collective(less_harness::WarpOp::kReduceMin, mask,
                                                        static_cast<uint32_t>(value), 1, 32));
}
inline int __reduce_max_sync(unsigned mask, int value) {
  return static_cast<int>(less_harness::warp_collective(less_harness::WarpOp::kReduceMax, mask,
                                                        static_cast<uint32_t>(value), 1, 32));
}

// ---------------------------------------------------------------------------------------------------------------
// Atomics: a fiber is never interrupted between a load and a store, so plain read-modify-write is atomic
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomicSub(T* address, T value) {
  const T old = *address;
  *address = old - value;
  return old;
}
template <typename T>
T atomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  const T old = *address;
  *address = value < old ? value : old;
  return old;
}
template <typename T>
T atomicMax(T* address, T value) {
  const T old = *address;
  *address = value > old ? value : old;
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}
template <typename T>
T atomicAnd(T* address, T value) {
  const T old = *address;
  *address = old & value;
  return old;
}
template <typename T>
T atomicOr(T* address, T value) {
  const T old = *address;
  *address = old | value;
  return old;
}
template <typename T>
T atomicXor(T* address, T value) {
  const T old = *address;
  *address = old ^ value;
  return old;
}

// ---------------------------------------------------------------------------------------------------------------
// Math and bit intrinsics: the fast-math forms are computed exactly (the GPU's are a few ulp off)
// ---------------------------------------------------------------------------------------------------------------
// CUDA's device code has these in the global namespace.
using std::isfinite;
using std::isinf;
using std::isnan;
#ifdef LESS_HARNESS_FAST_MATH
// The hardware's ex2.approx of x * log2(e): the rounding of the product is its main error, and what this keeps.
inline float __expf(float x) { return exp2f(x * 1.44269504f); }
#else
inline float __expf(float x) { return expf(x); }
#endif
inline float __exp10f(float x) { return powf(10.f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : (x == x ? x : 0.f)); }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __int_as_float(int x) { return less_harness::from_bits<float>(static_cast<uint32_t>(x)); }
inline int __float_as_int(float x) { return static_cast<int>(less_harness::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return less_harness::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return static_cast<unsigned>(less_harness::to_bits(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
template <typename T>
T __ldg(const T* p) {
  return *p;
}

#include "harness_half.h"

#ifdef LESS_HARNESS_FAST_MATH
// nvcc --use_fast_math compiles these library calls to the intrinsics.
#define expf(x) __expf(x)
#define logf(x) __logf(x)
#endif
