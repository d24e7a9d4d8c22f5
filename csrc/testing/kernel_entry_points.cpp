// C entry points through which the tests (ctypes) run the CUDA kernels' launch functions on host memory in the
// harness: flat arguments in, the launch's error code out (message: less_harness_last_error). Workspaces are
// allocated here, filled with NaN bytes so that reading an unwritten element shows up.
#include <cstdint>
#include <vector>

#include "cuda/kernels.h"

using namespace less_cuda::cuda;

#define LESS_HARNESS_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// What the tests check about a plan: plan_out[0..6] = chunks, head tiles, tile, tiles, split, p in workspace,
// vectorised.
void report(const DecodePlan& plan, int64_t* plan_out) {
  const int64_t values[] = {plan.chunks, plan.head_tiles, plan.tile, plan.tiles, plan.split, plan.p_in_workspace,
                            plan.vectorized};
  for (int i = 0; i < 7; ++i) plan_out[i] = values[i];
}

}  // namespace

// chunk, tile: 0 for the heuristic (with `num_sms` standing for the device), > 0 to force a length.
LESS_HARNESS_EXPORT int less_harness_decode_attention(const void* q, const void* k, const void* v, const int32_t* pos,
                                                      const float* phi_q, const float* H, const float* z, void* out,
                                                      float* probs, int64_t B, int64_t Hq, int64_t Hkv, int64_t S,
                                                      int64_t D, int64_t R, int dtype, float scale, int num_sms,
                                                      int64_t chunk, int64_t tile, int64_t* plan_out) {
  const DecodeAttentionArgs args{q, k, v, pos, phi_q, H, z, out, probs, B, Hq, Hkv, S, D, R,
                                 static_cast<ScalarKind>(dtype), scale};
  const DecodePlan plan = plan_decode_attention(args, num_sms, chunk, tile);
  report(plan, plan_out);
  std::vector<unsigned char> workspace(decode_attention_workspace_bytes(args, plan), 0xff);
  return launch_decode_attention(args, plan, workspace.data(), nullptr);
}

// In place on the slot tensors (and next_position), like the op; q [B, Hq, T, D] etc. The state tensors are a pool
// of N rows: batch row b updates row state_rows[b] (row b when state_rows is null), row_strides[8] the elements
// between rows of k_slots, v_slots, psi_slots, pos, scores, H, z, next_position.
LESS_HARNESS_EXPORT int less_harness_decode_step(void* k_slots, void* v_slots, float* psi_slots, int32_t* pos,
                                                 float* scores, float* H, float* z, int32_t* next_position,
                                                 const void* q, const void* k, const void* v, const float* phi_q,
                                                 const float* psi_k, const bool* valid, void* out, int64_t B,
                                                 int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int64_t R, int64_t T,
                                                 int dtype, float scale, int policy, int budget, int recent, int sinks,
                                                 const int64_t* state_rows, int64_t N, const int64_t* row_strides,
                                                 int num_sms, int64_t chunk, int64_t tile, int64_t* plan_out) {
  const int64_t* st = row_strides;
  const less_cuda::StateRows state{state_rows, st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7]};
  const DecodeStepArgs args{k_slots, v_slots, psi_slots, pos, scores, H, z, next_position, q, k, v, phi_q, psi_k,
                            valid, out, B, Hq, Hkv, S, D, R, T, static_cast<ScalarKind>(dtype), scale, policy, budget,
                            recent, sinks, state, N};
  const DecodePlan plan = plan_decode_step(args, num_sms, chunk, tile);
  report(plan, plan_out);
  std::vector<unsigned char> workspace(decode_step_workspace_bytes(args, plan), 0xff);
  return launch_decode_step(args, plan, workspace.data(), nullptr);
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
