// Argument validation shared by every backend's bindings: one clear TORCH_CHECK per mistake, so that bad input
// is an error message and never a crash or silently wrong numbers. Returns the sizes the kernels need.
// What is checked, and what is not and why: docs/guarantees.md.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "state_rows.h"

// Instantiates the body once per K/V element type the checks admit (fp32, bf16, fp16), with `scalar_t` naming it.
#define LESS_DISPATCH_KV_TYPES(type, name, ...)                 \
  AT_DISPATCH_SWITCH(type, name, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace less_cuda {

struct DecodeSizes {
  int64_t B, Hq, Hkv, G, S, D, R;  // R = 0 when there is no low-rank state
};
DecodeSizes check_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& pos, const std::optional<at::Tensor>& phi_q,
                                   const std::optional<at::Tensor>& H, const std::optional<at::Tensor>& z);

struct EvictSizes {
  int64_t B, Hkv, S;
};
EvictSizes check_score_and_evict(const at::Tensor& scores, const at::Tensor& pos, const at::Tensor& probs,
                                 int64_t policy, int64_t budget, int64_t recent, int64_t sinks);

struct FoldSizes {
  int64_t B, Hkv, N, R, D;
};
FoldSizes check_state_fold(const at::Tensor& psi, const at::Tensor& v, const std::optional<at::Tensor>& mask);
FoldSizes check_state_update(const at::Tensor& H, const at::Tensor& z, const at::Tensor& psi, const at::Tensor& v,
                             const std::optional<at::Tensor>& mask);

// The fused decode step (decode_step_): every tensor of one layer's slots, the new token and the policy.
struct StepTensors {
  const at::Tensor& k_slots;
  const at::Tensor& v_slots;
  const at::Tensor& psi_slots;
  const at::Tensor& pos;
  const at::Tensor& scores;
  const at::Tensor& H;
  const at::Tensor& z;
  const at::Tensor& next_position;
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const std::optional<at::Tensor>& phi_q;  // both given, or both none when R = 0
  const std::optional<at::Tensor>& psi_k;
  const std::optional<at::Tensor>& valid;
  const std::optional<at::Tensor>& state_rows;  // [B] int64, or none: the state tensors are the call's batch
};
struct StepSizes {
  DecodeSizes d;
  int64_t T;        // new tokens
  int64_t N;        // rows of each state tensor: B, or the pool's rows with state_rows
  StateRows state;  // where row b's state is (state_rows' pointer and each state tensor's row stride)
};
// R may be 0 (sparse policy only); S must exceed budget (the budget plus the incoming token's slot). The state
// tensors may have rows a stride apart (contiguous inside); with state_rows they are a pool of N rows, and row b of
// the call updates row state_rows[b] (distinct rows in [0, N), checked on the host for CPU tensors).
StepSizes check_decode_step(const StepTensors& t, int64_t policy, int64_t budget, int64_t recent, int64_t sinks);

// feature_maps (CPU only): q [B,Hq,T,D], k [B,Hkv,T,D] and the fp32 weights of one layer (ops.cpp's schema).
struct FeatureMapSizes {
  int64_t B, Hq, Hkv, T, D, E, R;  // E: the MLPs' hidden width
};
FeatureMapSizes check_feature_maps(const at::Tensor& q, const at::Tensor& k, const at::Tensor& phi_w1,
                                   const at::Tensor& phi_w2, const at::Tensor& psi_w1, const at::Tensor& psi_w2,
                                   const at::Tensor& psi_scale, const at::Tensor& psi_interaction,
                                   const at::Tensor& psi_interaction_scale);

}  // namespace less_cuda
