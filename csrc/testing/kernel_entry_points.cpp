// C entry points through which the tests (ctypes) run the CUDA kernels' launch functions on host memory in the
// harness: flat arguments in, the launch's error code out (message: less_harness_last_error). Workspaces are
// allocated here, filled with NaN bytes so that reading an unwritten element shows up.
#include <cstdint>
#include <vector>

#include "cuda/kernels.h"

using namespace less_cuda::cuda;

#define LESS_HARNESS_EXPORT extern "C" __attribute__((visibility("default")))

// chunk: 0 for the heuristic (with `num_sms` standing for the device), > 0 to force a chunk length.
// Writes the plan's chunk count and head tiles to plan_out[0..1].
LESS_HARNESS_EXPORT int less_harness_decode_attention(const void* q, const void* k, const void* v, const int32_t* pos,
                                                      const float* phi_q, const float* H, const float* z, void* out,
                                                      float* probs, int64_t B, int64_t Hq, int64_t Hkv, int64_t S,
                                                      int64_t D, int64_t R, int dtype, float scale, int num_sms,
                                                      int64_t chunk, int64_t* plan_out) {
  const DecodeAttentionArgs args{q, k, v, pos, phi_q, H, z, out, probs, B, Hq, Hkv, S, D, R,
                                 static_cast<ScalarKind>(dtype), scale};
  const DecodePlan plan = plan_decode_attention(args, num_sms, chunk);
  plan_out[0] = plan.chunks;
  plan_out[1] = plan.head_tiles;
  std::vector<unsigned char> workspace(decode_attention_workspace_bytes(args, plan), 0xff);
  return launch_decode_attention(args, plan, workspace.data(), nullptr);
}

LESS_HARNESS_EXPORT int less_harness_score_and_evict(float* scores, int32_t* pos, const float* probs, int64_t* victim,
                                                     int64_t rows, int64_t S, int policy, int budget, int recent,
                                                     int sinks) {
  return launch_score_and_evict({scores, pos, probs, victim, rows, S, policy, budget, recent, sinks}, nullptr);
}

LESS_HARNESS_EXPORT int less_harness_state_fold(const float* psi, const void* v, const bool* mask, float* H, float* z,
                                                int64_t rows, int64_t N, int64_t R, int64_t D, int dtype,
                                                int accumulate) {
  return launch_state_fold({psi, v, mask, H, z, rows, N, R, D, static_cast<ScalarKind>(dtype), accumulate != 0},
                           nullptr);
}
