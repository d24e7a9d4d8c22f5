// Row operations of the CPU kernels on one (batch, KV head): folding a token into the rank-R state (shared by
// state_fold / state_update_ and decode_step_), and H2O score accumulation with eviction (shared by
// score_and_evict_ and decode_step_).
//
// score_and_evict_row (reference.score_and_evict_): add probs to the occupied slots' scores (H2O), then, when more
// than `budget` slots are held, free the first slot in (eviction_key, slot) order. Deterministic: a row's victim
// is torch.argmin's first-index choice whatever the thread count.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "cpu/simd.h"
#include "less_numerics.h"

namespace less_cuda {

// H [R, D] += psi^T v and z [R] += psi for one token: psi [R], v [D] already widened to fp32.
LESS_INLINE void fold_token(float* H, float* z, const float* psi, const float* v, int64_t R, int64_t D) {
  for (int64_t r = 0; r < R; ++r) {
    z[r] += psi[r];
    simd::axpy(psi[r], v, H + r * D, D);
  }
}

// scores, pos: one row of S slots, updated in place; probs: the step's probabilities per slot, or null to add
// nothing (Λ, or a pad token's step). Returns the freed slot (now pos -1, score 0), or -1.
inline int64_t score_and_evict_row(float* scores, int32_t* pos, const float* probs, int64_t S, int policy,
                                   int64_t budget, int recent, int sinks) {
  int newest = INT_MIN;  // over every slot, free ones included, as the reference's pos.max
  int64_t held = 0;
  for (int64_t j = 0; j < S; ++j) {
    newest = std::max(newest, pos[j]);
    if (pos[j] < 0) continue;
    ++held;
    if (probs != nullptr && policy == kPolicyH2O) scores[j] += probs[j];
  }
  if (held <= budget) return -1;
  int best = 0;
  float best_key = INFINITY;
  for (int64_t j = 0; j < S; ++j) {
    const float key = eviction_key(policy, scores[j], pos[j], newest, recent, sinks);
    if (evicts_before(key, static_cast<int>(j), best_key, best)) {
      best_key = key;
      best = static_cast<int>(j);
    }
  }
  if (!std::isfinite(best_key)) return -1;
  pos[best] = kEmptySlot;
  scores[best] = 0.f;
  return best;
}

}  // namespace less_cuda
