// less_cuda::score_and_evict_ on CPU: H2O score accumulation, then at most one eviction per (batch, KV head) row
// when more than `budget` slots are held (reference.score_and_evict_). In place on scores and pos.
//
// Layout, all contiguous: scores [B,Hkv,S] fp32, pos [B,Hkv,S] int32 (< 0: free slot), probs [B,Hkv,S] fp32.
// Returns victim [B,Hkv] int64: the freed slot (now pos = -1, score 0), or -1.
//
// Parallel mapping: at::parallel_for over the B*Hkv rows; one thread scans a row twice (cpu/slot_row.h: accumulate
// and find the newest position, then the argmin of eviction_key under evicts_before), so a row's victim is the same
// for any thread count and equals torch.argmin's first-index choice.
//
// Bytes per call: reads 12*B*Hkv*S (scores, pos, probs), writes 4*B*Hkv*S of scores (H2O) and 8*B*Hkv.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cpu/slot_row.h"

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
      victim_ptr[bh] = score_and_evict_row(score_ptr + bh * S, pos_ptr + bh * S, probs_ptr + bh * S, S,
                                           static_cast<int>(policy), budget, static_cast<int>(recent),
                                           static_cast<int>(sinks));
    }
  });
  return victim;
}

}  // namespace
}  // namespace less_cuda

TORCH_LIBRARY_IMPL(less_cuda, CPU, m) { m.impl("score_and_evict_", &less_cuda::score_and_evict_cpu); }
