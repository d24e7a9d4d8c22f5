// Block-level bookkeeping of one (batch, KV head) row of slots, shared by score_and_evict.cu and decode_step.cu:
// the first free slot, and H2O score accumulation with one eviction (reference.score_and_evict_). A block of
// kBlock threads owns the row; threads stride over the slots; reductions go lanes, then warps, in a fixed order,
// so the results do not depend on the thread count or the schedule. Every function must be called by all threads
// of the block, returns its result to all of them, and ends with a barrier.
#pragma once

#include <climits>

#include "cuda/common.cuh"

namespace less_cuda {
namespace cuda {
namespace slot_row {

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

// The lowest j with pos[j] < 0, or 0 when no slot is free (reference.insert_token's rule).
template <int kBlock>
__device__ int first_free_slot(const int32_t* pos, int64_t S) {
  constexpr int kWarps = kBlock / 32;
  __shared__ int warp_first[kWarps];
  int first = INT_MAX;
  for (int64_t j = threadIdx.x; j < S; j += kBlock)
    if (pos[j] < 0) {
      first = static_cast<int>(j);  // a thread's slots ascend: its first free one is its lowest
      break;
    }
  first = __reduce_min_sync(kFullMask, first);
  if (threadIdx.x % 32 == 0) warp_first[threadIdx.x / 32] = first;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) first = warp_first[w] < first ? warp_first[w] : first;
  __syncthreads();  // warp_first may be reused
  return first == INT_MAX ? 0 : first;
}

// scores += probs on occupied slots (H2O only; probs may be null: adds nothing); if more than `budget` slots are
// occupied, frees the slot with the smallest (eviction_key, slot) among the evictable ones (pos = -1, score = 0).
// Returns that slot, or -1.
template <int kBlock>
__device__ int score_and_evict(float* scores, int32_t* pos, const float* probs, int64_t S, int policy, int budget,
                               int recent, int sinks) {
  constexpr int kWarps = kBlock / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __shared__ int warp_newest[kWarps], warp_occupied[kWarps];
  __shared__ Candidate warp_best[kWarps];
  __shared__ int victim;

  // Pass 1: accumulate, and the newest position (over all slots, as reference's pos.max) and occupancy.
  int newest = INT_MIN, occupied = 0;
  for (int64_t j = threadIdx.x; j < S; j += kBlock) {
    const int p = pos[j];
    newest = p > newest ? p : newest;
    if (p >= 0) {
      ++occupied;
      if (policy == kPolicyH2O && probs != nullptr) scores[j] += probs[j];
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
  for (int64_t j = threadIdx.x; j < S; j += kBlock)
    best = first_to_evict(best, {eviction_key(policy, scores[j], pos[j], newest, recent, sinks), static_cast<int>(j)});
  best = warp_first_to_evict(best);
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (warp == 0) {
    best = warp_first_to_evict(lane < kWarps ? warp_best[lane] : Candidate{INFINITY, INT_MAX});
    if (lane == 0) {
      const bool evict = occupied > budget && isfinite(best.key);
      if (evict) {
        pos[best.slot] = kEmptySlot;
        scores[best.slot] = 0.f;
      }
      victim = evict ? best.slot : -1;
    }
  }
  __syncthreads();
  const int result = victim;
  __syncthreads();  // the shared arrays may be reused
  return result;
}

}  // namespace slot_row
}  // namespace cuda
}  // namespace less_cuda
