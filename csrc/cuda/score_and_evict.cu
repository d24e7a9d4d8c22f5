// (a) score_and_evict_: H2O score accumulation and one eviction per (batch, KV head), in place
// (reference.score_and_evict_).
//   scores += probs on occupied slots (H2O only); if more than `budget` slots are occupied, the slot with the
//   smallest (eviction_key, slot) among the evictable ones is freed (pos = -1, score = 0) and reported.
// Layout: scores, probs [B, Hkv, S] fp32; pos [B, Hkv, S] int32; victim [B, Hkv] int64 (-1: nothing evicted).
//
// Thread mapping: one block of 256 threads per (b, h) row, each thread striding over the slots
// (slot_row::score_and_evict, shared with decode_step). Pass 1 adds the probabilities and finds the newest position
// and the occupancy; pass 2 (which needs `newest` for H2O's recent window) takes the argmin of (key, slot) with
// less_numerics' evicts_before, lanes then warps, so ties go to the lowest slot exactly like torch.argmin, and the
// result does not depend on the thread count or schedule. One launch per call.
//
// Bytes per call: 12 * B * Hkv * S read (scores, pos, probs), 4 * B * Hkv * S written for H2O; the second pass
// re-reads scores and pos from L1/L2.
#include "cuda/slot_row.cuh"

namespace less_cuda {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) score_and_evict_kernel(ScoreAndEvictArgs a) {
  const int64_t row = blockIdx.x;
  const int victim = slot_row::score_and_evict<kThreads>(a.scores + row * a.S, a.pos + row * a.S,
                                                         a.probs + row * a.S, a.S, a.policy, a.budget, a.recent,
                                                         a.sinks);
  if (threadIdx.x == 0) a.victim[row] = victim;
}

}  // namespace

cudaError_t launch_score_and_evict(const ScoreAndEvictArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  LESS_LAUNCH(score_and_evict_kernel, static_cast<unsigned>(a.rows), kThreads, 0, stream)(a);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace less_cuda
