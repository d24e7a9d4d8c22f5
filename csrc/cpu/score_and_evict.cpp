// less_cuda::score_and_evict_ on CPU: H2O score accumulation, then at most one eviction per (batch, KV head) row
// when more than `budget` slots are held (reference.score_and_evict_). In place on scores and pos.
//
// Layout, all contiguous: scores [B,Hkv,S] fp32, pos [B,Hkv,S] int32 (< 0: free slot), probs [B,Hkv,S] fp32.
// Returns victim [B,Hkv] int64: the freed slot (now pos = -1, score 0), or -1.
//
// Parallel mapping: at::parallel_for over the B*Hkv rows; one thread scans a row twice (accumulate and find the
// newest position, then the argmin of eviction_key under evicts_before), so a row's victim is the same for any
// thread count and equals torch.argmin's first-index choice.
//
// Bytes per call: reads 12*B*Hkv*S (scores, pos, probs), writes 4*B*Hkv*S of scores (H2O) and 8*B*Hkv.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "checks.h"
#include "less_numerics.h"

namespace less_cuda {
namespace {

at::Tensor score_and_evict_cpu(at::Tensor& scores, at::Tensor& pos, const at::Tensor& probs, int64_t policy,
                               int64_t budget, int64_t recent, int64_t sinks) {
  const EvictSizes s = check_score_and_evict(scores, pos, probs, policy, budget, recent, sinks);
  at::Tensor victim = at::empty({s.B, s.Hkv}, scores.options().dtype(at::kLong));
  float* score_ptr = scores.data_ptr<float>();
  int32_t* pos_ptr = pos.data_ptr<int32_t>();
  const float* probs_ptr = probs.data_ptr<float>();
  int64_t* victim_ptr = victim.data_ptr<int64_t>();
  const int64_t S = s.S;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, S));
  at::parallel_for(0, s.B * s.Hkv, grain, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      float* score = score_ptr + bh * S;
      int32_t* slot_pos = pos_ptr + bh * S;
      const float* p = probs_ptr + bh * S;
      // newest is the max over every slot, free ones included, as in the reference.
      int newest = INT_MIN;
      int64_t held = 0;
      for (int64_t j = 0; j < S; ++j) {
        newest = std::max(newest, slot_pos[j]);
        if (slot_pos[j] < 0) continue;
        ++held;
        if (policy == kPolicyH2O) score[j] += p[j];
      }
      int best = 0;
      float best_key = INFINITY;
      for (int64_t j = 0; j < S; ++j) {
        const float key = eviction_key(static_cast<int>(policy), score[j], slot_pos[j], newest,
                                       static_cast<int>(recent), static_cast<int>(sinks));
        if (evicts_before(key, static_cast<int>(j), best_key, best)) {
          best_key = key;
          best = static_cast<int>(j);
        }
      }
      const bool evict = held > budget && std::isfinite(best_key);
      if (evict) {
        slot_pos[best] = kEmptySlot;
        score[best] = 0.f;
      }
      victim_ptr[bh] = evict ? best : -1;
    }
  });
  return victim;
}

}  // namespace
}  // namespace less_cuda

TORCH_LIBRARY_IMPL(less_cuda, CPU, m) { m.impl("score_and_evict_", &less_cuda::score_and_evict_cpu); }
