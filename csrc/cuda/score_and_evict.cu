// (a) score_and_evict_: H2O score accumulation and one eviction per (batch, KV head), in place
// (reference.score_and_evict_).
//   scores += probs on occupied slots (H2O only); if more than `budget` slots are occupied, the slot with the
//   smallest (eviction_key, slot) among the evictable ones is freed (pos = -1, score = 0) and reported.
// Layout: scores, probs [B, Hkv, S] fp32; pos [B, Hkv, S] int32; victim [B, Hkv] int64 (-1: nothing evicted).
//
// Thread mapping: one block of 256 threads per (b, h) row, each thread striding over the slots. Pass 1 adds the
// probabilities and finds the newest position and the occupancy; pass 2 (which needs `newest` for H2O's recent
// window) takes the argmin of (key, slot) with less_numerics' evicts_before, lanes then warps, so ties go to the
// lowest slot exactly like torch.argmin, and the result does not depend on the thread count or schedule.
//
// Bytes per call: 12 * B * Hkv * S read (scores, pos, probs), 4 * B * Hkv * S written for H2O; the second pass
// re-reads scores and pos from L1/L2.
#include <climits>

#include "cuda/common.cuh"

namespace less_cuda {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct Candidate {
  float key;
  int slot;
};

__device__ __forceinline__ Candidate first_to_evict(Candidate a, Candidate b) {
  return evicts_before(b.key, b.slot, a.key, a.slot) ? b : a;
}

__device__ __forceinline__ Candidate warp_first_to_evict(Candidate c) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    c = first_to_evict(c, {__shfl_xor_sync(kFullMask, c.key, offset), __shfl_xor_sync(kFullMask, c.slot, offset)});
  return c;
}

__global__ void __launch_bounds__(kThreads) score_and_evict_kernel(ScoreAndEvictArgs a) {
  const int64_t row = blockIdx.x;
  float* scores = a.scores + row * a.S;
  int32_t* pos = a.pos + row * a.S;
  const float* probs = a.probs + row * a.S;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __shared__ int warp_newest[kWarps], warp_occupied[kWarps];
  __shared__ Candidate warp_best[kWarps];

  // Pass 1: accumulate, and the newest position (over all slots, as reference's pos.max) and occupancy.
  int newest = INT_MIN, occupied = 0;
  for (int64_t j = threadIdx.x; j < a.S; j += kThreads) {
    const int p = pos[j];
    newest = p > newest ? p : newest;
    if (p >= 0) {
      ++occupied;
      if (a.policy == kPolicyH2O) scores[j] += probs[j];
    }
  }
  newest = __reduce_max_sync(kFullMask, newest);
  occupied = __reduce_add_sync(kFullMask, occupied);
  if (lane == 0) {
    warp_newest[warp] = newest;
    warp_occupied[warp] = occupied;
  }
  __syncthreads();
  newest = INT_MIN;
  occupied = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    newest = warp_newest[w] > newest ? warp_newest[w] : newest;
    occupied += warp_occupied[w];
  }

  // Pass 2: the first slot to evict. Each thread reads back only the scores it wrote itself.
  Candidate best{INFINITY, INT_MAX};
  for (int64_t j = threadIdx.x; j < a.S; j += kThreads)
    best = first_to_evict(
        best, {eviction_key(a.policy, scores[j], pos[j], newest, a.recent, a.sinks), static_cast<int>(j)});
  best = warp_first_to_evict(best);
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (warp == 0) {
    best = warp_first_to_evict(lane < kWarps ? warp_best[lane] : Candidate{INFINITY, INT_MAX});
    if (lane == 0) {
      const bool evict = occupied > a.budget && isfinite(best.key);
      if (evict) {
        pos[best.slot] = kEmptySlot;
        scores[best.slot] = 0.f;
      }
      a.victim[row] = evict ? best.slot : -1;
    }
  }
}

}  // namespace

cudaError_t launch_score_and_evict(const ScoreAndEvictArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  LESS_LAUNCH(score_and_evict_kernel, static_cast<unsigned>(a.rows), kThreads, 0, stream)(a);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace less_cuda
