// Kernels that check the harness itself (tests/test_harness.py), written as ordinary CUDA: each exercises one
// promise of harness.h and is small enough that its right answer is obvious in Python.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/portable.cuh"

#define LESS_HARNESS_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// Block sum: warp butterflies, then one partial per warp in static shared memory. Block (bx, by), any 2-D shape
// with a multiple of 32 threads.
__global__ void block_sum_kernel(const float* x, int n, float* out) {
  __shared__ float warp_sums[32];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int threads = blockDim.x * blockDim.y;
  float s = 0.f;
  for (int i = blockIdx.x * threads + tid; i < n; i += gridDim.x * threads) s += x[i];
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
  if (tid % 32 == 0) warp_sums[tid / 32] = s;
  __syncthreads();
  if (tid < 32) {
    s = tid < threads / 32 ? warp_sums[tid] : 0.f;
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
    if (tid == 0) out[blockIdx.x] = s;
  }
}

// Thread and block indices in a 3-D grid of 3-D blocks, and the warp each thread lands in (the first linear
// thread index of its warp, read with a shuffle from lane 0). out: [blocks][threads][7].
__global__ void indices_kernel(int* out) {
  const int linear = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const int block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  int* o = out + 7 * (block * blockDim.x * blockDim.y * blockDim.z + linear);
  o[0] = threadIdx.x;
  o[1] = threadIdx.y;
  o[2] = threadIdx.z;
  o[3] = blockIdx.x;
  o[4] = blockIdx.y;
  o[5] = blockIdx.z;
  o[6] = __shfl_sync(0xffffffffu, linear, 0);
}

// Histogram of x (values in [0, bins)) with shared-memory atomics, merged into global bins with atomicAdd; each
// block also claims the first free global slot with atomicCAS. bins <= 64.
__global__ void histogram_kernel(const int* x, int n, int bins, int* hist, int* claims) {
  __shared__ int local[64];
  for (int b = threadIdx.x; b < bins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) atomicAdd(&local[x[i]], 1);
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) atomicAdd(&hist[b], local[b]);
  if (threadIdx.x == 0) {
    int slot = 0;
    while (atomicCAS(&claims[slot], -1, static_cast<int>(blockIdx.x)) != -1) ++slot;
  }
}

// Every shuffle flavour with a sub-warp width in a 2-D block; value of thread t is t. out: [threads][5].
__global__ void shuffles_kernel(int width, int delta, int src, int* out) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  int v = tid;
  int* o = out + 5 * tid;
  o[0] = __shfl_xor_sync(0xffffffffu, v, delta, width);
  o[1] = __shfl_up_sync(0xffffffffu, v, delta, width);
  o[2] = __shfl_down_sync(0xffffffffu, v, delta, width);
  o[3] = __shfl_sync(0xffffffffu, v, src, width);
  // A sub-warp butterfly sum: each group of `width` lanes adds its thread indices.
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  o[4] = v;
}

// Ballot / any / all / sm_80 reductions on the predicate (x[t] > 0). out: [threads][5].
__global__ void votes_kernel(const int* x, unsigned* out) {
  const int tid = threadIdx.x;
  const int p = x[tid] > 0;
  unsigned* o = out + 5 * tid;
  o[0] = __ballot_sync(0xffffffffu, p);
  o[1] = __any_sync(0xffffffffu, p);
  o[2] = __all_sync(0xffffffffu, p);
  o[3] = __reduce_add_sync(0xffffffffu, static_cast<unsigned>(x[tid]));
  o[4] = static_cast<unsigned>(__reduce_min_sync(0xffffffffu, x[tid]));
}

// C = A B with 16 x 16 tiles in static shared memory; A [M, K], B [K, N] row-major, any sizes.
constexpr int kTile = 16;
__global__ void tiled_matmul_kernel(const float* A, const float* B, float* C, int M, int N, int K) {
  __shared__ float a_tile[kTile][kTile];
  __shared__ float b_tile[kTile][kTile];
  const int row = blockIdx.y * kTile + threadIdx.y, col = blockIdx.x * kTile + threadIdx.x;
  float acc = 0.f;
  for (int k0 = 0; k0 < K; k0 += kTile) {
    a_tile[threadIdx.y][threadIdx.x] = row < M && k0 + threadIdx.x < K ? A[row * K + k0 + threadIdx.x] : 0.f;
    b_tile[threadIdx.y][threadIdx.x] = col < N && k0 + threadIdx.y < K ? B[(k0 + threadIdx.y) * N + col] : 0.f;
    __syncthreads();
    for (int k = 0; k < kTile; ++k) acc += a_tile[threadIdx.y][k] * b_tile[k][threadIdx.x];
    __syncthreads();
  }
  if (row < M && col < N) C[row * N + col] = acc;
}

// Reverses each block's segment through dynamic shared memory (blockDim.x floats).
__global__ void reverse_kernel(const float* x, float* y) {
  LESS_DYNAMIC_SHARED(float, buf);
  const int base = blockIdx.x * blockDim.x;
  buf[threadIdx.x] = x[base + threadIdx.x];
  __syncthreads();
  y[base + threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

// Reads dynamic shared memory that no thread has written (the harness poisons it with NaN bytes).
__global__ void read_unwritten_kernel(float* y) {
  LESS_DYNAMIC_SHARED(float, buf);
  y[threadIdx.x] = buf[threadIdx.x];
}

// Barrier ordering: in each round every thread writes its slot, then (after the barrier) reads its right
// neighbour's, then (after another) overwrites its own with it. Without the barriers the rotation would mix
// rounds. Result: after `rounds` rounds y[t] = x[(t + rounds) % n]; `with_barriers` = 0 drops them.
__global__ void rotate_kernel(const float* x, float* y, int rounds, int with_barriers) {
  __shared__ float ring[1024];
  const int t = threadIdx.x, n = blockDim.x;
  ring[t] = x[t];
  if (with_barriers) __syncthreads();
  for (int r = 0; r < rounds; ++r) {
    const float next = ring[(t + 1) % n];
    if (with_barriers) __syncthreads();
    ring[t] = next;
    if (with_barriers) __syncthreads();
  }
  y[t] = ring[t];
}

// __syncthreads_count / _and / _or of (x[t] > 0). out: [3].
__global__ void barrier_votes_kernel(const int* x, int* out) {
  const int p = x[threadIdx.x] > 0;
  const int count = __syncthreads_count(p), all = __syncthreads_and(p), any = __syncthreads_or(p);
  if (threadIdx.x == 0) {
    out[0] = count;
    out[1] = all;
    out[2] = any;
  }
}

// Misuse the harness must report instead of hanging: 0 = a barrier only half the block reaches, 1 = a
// shuffle whose mask leaves out the calling lane, 2 = lanes waiting for a lane that has exited; and 3 = a thread
// that calls __trap() while the others wait at a barrier, which fails the launch as on a GPU.
__global__ void misuse_kernel(int kind, float* out) {
  float v = threadIdx.x;
  if (kind == 3 && threadIdx.x == 5) __trap();
  if (kind == 3) __syncthreads();
  if (kind == 0 && threadIdx.x < 16) __syncthreads();
  if (kind == 1) v = __shfl_xor_sync(0x0000ffffu, v, 1);
  if (kind == 2) {
    if (threadIdx.x == 31) return;
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// Bugs the sanitizer build must report (tests/test_sanitizers.py): 0 = a write one past the end of a heap buffer,
// 1 = a signed overflow, 2 = a write past a local array on a thread's (fiber's) stack, 3 = a write past the end
// of the launch's dynamic shared memory.
__global__ void sanitizer_bug_kernel(int kind, int* out, int n) {
  LESS_DYNAMIC_SHARED(int, smem);
  volatile int past = n;  // volatile: the compiler must not see (and fold) the bug
  int local[4] = {0, 0, 0, 0};
  if (kind == 0 && threadIdx.x == 0) out[past] = 1;
  if (kind == 1) out[threadIdx.x] = 0x7fffffff - 1 + past;
  if (kind == 2) {
    int* volatile through = local;  // through a pointer, so that ASan, not UBSan's bounds check, sees it
    through[past] = 1;
    out[threadIdx.x] = local[threadIdx.x % 4];
  }
  if (kind == 3 && threadIdx.x == 0) smem[past] = 1;
}

// fp32 -> fp16 / bf16 bits and back, as the kernels convert.
__global__ void convert_kernel(const float* x, int n, uint16_t* half_bits, uint16_t* bf16_bits, float* half_back,
                               float* bf16_back) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const __half h = __float2half_rn(x[i]);
    const __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
    half_bits[i] = *reinterpret_cast<const uint16_t*>(&h);
    bf16_bits[i] = *reinterpret_cast<const uint16_t*>(&b);
    half_back[i] = __half2float(h);
    bf16_back[i] = __bfloat162float(b);
  }
}

}  // namespace

LESS_HARNESS_EXPORT int selftest_block_sum(const float* x, int n, float* out, int blocks, int bx, int by) {
  LESS_LAUNCH(block_sum_kernel, blocks, dim3(bx, by), 0, nullptr)(x, n, out);
  return cudaGetLastError();
}

LESS_HARNESS_EXPORT int selftest_indices(int* out, int gx, int gy, int gz, int bx, int by, int bz) {
  LESS_LAUNCH(indices_kernel, dim3(gx, gy, gz), dim3(bx, by, bz), 0, nullptr)(out);
  return cudaGetLastError();
}

LESS_HARNESS_EXPORT int selftest_histogram(const int* x, int n, int bins, int* hist, int* claims, int blocks) {
  LESS_LAUNCH(histogram_kernel, blocks, 96, 0, nullptr)(x, n, bins, hist, claims);
  return cudaGetLastError();
}

LESS_HARNESS_EXPORT int selftest_shuffles(int bx, int by, int width, int delta, int src, int* out) {
  LESS_LAUNCH(shuffles_kernel, 1, dim3(bx, by), 0, nullptr)(width, delta, src, out);
  return cudaGetLastError();
}

LESS_HARNESS_EXPORT int selftest_votes(const int* x, int threads, unsigned* out) {
  LESS_LAUNCH(votes_kernel, 1, threads, 0, nullptr)(x, out);
  return cudaGetLastError();
}

LESS_HARNESS_EXPORT int selftest_tiled_matmul(const float* A, const float* B, float* C, int M, int N, int K) {
  const dim3 grid((N + kTile - 1) / kTile, (M + kTile - 1) / kTile);
  LESS_LAUNCH(tiled_matmul_kernel, grid, dim3(kTile, kTile), 0, nullptr)(A, B, C, M, N, K);
  return cudaGetLastError();
}

LESS_HARNESS_EXPORT int selftest_reverse(const float* x, float* y, int blocks, int threads, int smem_bytes) {
  LESS_LAUNCH(reverse_kernel, blocks, threads, smem_bytes, nullptr)(x, y);
  return cudaGetLastError();
}

LESS_HARNESS_EXPORT int selftest_read_unwritten(float* y, int threads) {
  LESS_LAUNCH(read_unwritten_kernel, 1, threads, threads * sizeof(float), nullptr)(y);
  return cudaGetLastError();
}

LESS_HARNESS_EXPORT int selftest_rotate(const float* x, float* y, int threads, int rounds, int with_barriers) {
  LESS_LAUNCH(rotate_kernel, 1, threads, 0, nullptr)(x, y, rounds, with_barriers);
  return cudaGetLastError();
}

LESS_HARNESS_EXPORT int selftest_barrier_votes(const int* x, int threads, int* out) {
  LESS_LAUNCH(barrier_votes_kernel, 1, threads, 0, nullptr)(x, out);
  return cudaGetLastError();
}

LESS_HARNESS_EXPORT int selftest_misuse(int kind, float* out) {
  LESS_LAUNCH(misuse_kernel, 1, 32, 0, nullptr)(kind, out);
  return cudaGetLastError();
}

LESS_HARNESS_EXPORT int selftest_convert(const float* x, int n, uint16_t* half_bits, uint16_t* bf16_bits,
                                         float* half_back, float* bf16_back) {
  LESS_LAUNCH(convert_kernel, 1, 128, 0, nullptr)(x, n, half_bits, bf16_bits, half_back, bf16_back);
  return cudaGetLastError();
}

LESS_HARNESS_EXPORT int selftest_sanitizer_bug(int kind) {
  const int n = 32;
  int* out = new int[n];
  const int past = kind == 1 ? 2 : kind == 2 ? 4 : n;
  LESS_LAUNCH(sanitizer_bug_kernel, 1, n, n * sizeof(int), nullptr)(kind, out, past);
  delete[] out;
  return cudaGetLastError();
}
