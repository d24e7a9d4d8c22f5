#include "checks.h"

#include <c10/util/Exception.h>

#include "less_numerics.h"

namespace less_cuda {
namespace {

bool is_kv_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Device& device) {
  TORCH_CHECK(t.dim() == dim, "less_cuda: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.device() == device, "less_cuda: ", name, " is on ", t.device(), " but q is on ", device);
  TORCH_CHECK(t.is_contiguous(), "less_cuda: ", name, " must be contiguous");
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, "less_cuda: ", name, " must be ", want, ", got ", t.scalar_type());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, "less_cuda: ", name, " must have shape ", want, ", got ", t.sizes());
}

void check_policy(int64_t policy, int64_t budget, int64_t recent, int64_t sinks) {
  TORCH_CHECK(policy == kPolicyH2O || policy == kPolicyLambda, "less_cuda: unknown policy id ", policy,
              " (0 = H2O, 1 = Lambda)");
  TORCH_CHECK(budget >= 1 && budget <= INT32_MAX, "less_cuda: budget must be in [1, 2^31), got ", budget);
  TORCH_CHECK(recent <= INT32_MAX && sinks <= INT32_MAX, "less_cuda: recent and sinks must be below 2^31");
  TORCH_CHECK(recent >= 0 && sinks >= 0, "less_cuda: recent and sinks must be >= 0, got ", recent, " and ", sinks);
  const int64_t kept = policy == kPolicyH2O ? recent : sinks;
  TORCH_CHECK(kept < budget, "less_cuda: budget (", budget, ") must exceed ",
              policy == kPolicyH2O ? "recent" : "sinks", " (", kept, ")");
}

}  // namespace

DecodeSizes check_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& pos, const std::optional<at::Tensor>& phi_q,
                                   const std::optional<at::Tensor>& H, const std::optional<at::Tensor>& z) {
  const auto device = q.device();
  check_tensor(q, "q", 3, device);
  check_tensor(k, "k", 4, device);
  check_tensor(v, "v", 4, device);
  check_tensor(pos, "pos", 3, device);
  TORCH_CHECK(is_kv_dtype(q.scalar_type()), "less_cuda: q must be float32, bfloat16 or float16, got ",
              q.scalar_type());
  check_dtype(k, "k", q.scalar_type());
  check_dtype(v, "v", q.scalar_type());
  check_dtype(pos, "pos", at::kInt);
  DecodeSizes s{q.size(0), q.size(1), k.size(1), 0, k.size(2), q.size(2), 0};
  TORCH_CHECK(s.D > 0, "less_cuda: head_dim must be positive, got q of shape ", q.sizes());
  TORCH_CHECK(s.Hkv > 0 && s.Hq % s.Hkv == 0, "less_cuda: query heads (", s.Hq,
              ") must be a multiple of KV heads (", s.Hkv, ")");
  s.G = s.Hq / s.Hkv;
  check_shape(k, "k", {s.B, s.Hkv, s.S, s.D});
  check_shape(v, "v", {s.B, s.Hkv, s.S, s.D});
  check_shape(pos, "pos", {s.B, s.Hkv, s.S});
  const bool has_state = phi_q.has_value();
  TORCH_CHECK(has_state == H.has_value() && has_state == z.has_value(),
              "less_cuda: phi_q, H and z must be given together or all be None");
  if (has_state) {
    check_tensor(*phi_q, "phi_q", 3, device);
    check_tensor(*H, "H", 4, device);
    check_tensor(*z, "z", 3, device);
    check_dtype(*phi_q, "phi_q", at::kFloat);
    check_dtype(*H, "H", at::kFloat);
    check_dtype(*z, "z", at::kFloat);
    s.R = phi_q->size(2);
    check_shape(*phi_q, "phi_q", {s.B, s.Hq, s.R});
    check_shape(*H, "H", {s.B, s.Hkv, s.R, s.D});
    check_shape(*z, "z", {s.B, s.Hkv, s.R});
  }
  return s;
}

EvictSizes check_score_and_evict(const at::Tensor& scores, const at::Tensor& pos, const at::Tensor& probs,
                                 int64_t policy, int64_t budget, int64_t recent, int64_t sinks) {
  const auto device = scores.device();
  check_tensor(scores, "scores", 3, device);
  check_tensor(pos, "pos", 3, device);
  check_tensor(probs, "probs", 3, device);
  check_dtype(scores, "scores", at::kFloat);
  check_dtype(pos, "pos", at::kInt);
  check_dtype(probs, "probs", at::kFloat);
  EvictSizes s{scores.size(0), scores.size(1), scores.size(2)};
  check_shape(pos, "pos", scores.sizes());
  check_shape(probs, "probs", scores.sizes());
  check_policy(policy, budget, recent, sinks);
  return s;
}

FoldSizes check_state_fold(const at::Tensor& psi, const at::Tensor& v, const std::optional<at::Tensor>& mask) {
  const auto device = v.device();
  check_tensor(psi, "psi", 4, device);
  check_tensor(v, "v", 4, device);
  check_dtype(psi, "psi", at::kFloat);
  TORCH_CHECK(is_kv_dtype(v.scalar_type()), "less_cuda: v must be float32, bfloat16 or float16, got ",
              v.scalar_type());
  FoldSizes s{psi.size(0), psi.size(1), psi.size(2), psi.size(3), v.size(3)};
  check_shape(v, "v", {s.B, s.Hkv, s.N, s.D});
  if (mask.has_value()) {
    check_tensor(*mask, "mask", 3, device);
    check_dtype(*mask, "mask", at::kBool);
    check_shape(*mask, "mask", {s.B, s.Hkv, s.N});
  }
  return s;
}

FoldSizes check_state_update(const at::Tensor& H, const at::Tensor& z, const at::Tensor& psi, const at::Tensor& v,
                             const std::optional<at::Tensor>& mask) {
  const FoldSizes s = check_state_fold(psi, v, mask);
  check_tensor(H, "H", 4, v.device());
  check_tensor(z, "z", 3, v.device());
  check_dtype(H, "H", at::kFloat);
  check_dtype(z, "z", at::kFloat);
  check_shape(H, "H", {s.B, s.Hkv, s.R, s.D});
  check_shape(z, "z", {s.B, s.Hkv, s.R});
  return s;
}

StepSizes check_decode_step(const StepTensors& t, int64_t policy, int64_t budget, int64_t recent, int64_t sinks) {
  const auto device = t.q.device();
  check_tensor(t.q, "q", 4, device);
  TORCH_CHECK(is_kv_dtype(t.q.scalar_type()), "less_cuda: q must be float32, bfloat16 or float16, got ",
              t.q.scalar_type());
  check_tensor(t.k_slots, "k_slots", 4, device);
  check_tensor(t.psi_slots, "psi_slots", 4, device);
  DecodeSizes s{t.q.size(0), t.q.size(1), t.k_slots.size(1), 0, t.k_slots.size(2), t.q.size(3), t.psi_slots.size(3)};
  const int64_t T = t.q.size(2);
  TORCH_CHECK(s.D > 0, "less_cuda: head_dim must be positive, got q of shape ", t.q.sizes());
  TORCH_CHECK(s.Hkv > 0 && s.Hq % s.Hkv == 0, "less_cuda: query heads (", s.Hq,
              ") must be a multiple of KV heads (", s.Hkv, ")");
  s.G = s.Hq / s.Hkv;
  const auto expect = [&](const at::Tensor& x, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
    check_tensor(x, name, static_cast<int64_t>(shape.size()), device);
    check_dtype(x, name, dtype);
    check_shape(x, name, shape);
  };
  const auto kv = t.q.scalar_type();
  expect(t.k_slots, "k_slots", kv, {s.B, s.Hkv, s.S, s.D});
  expect(t.v_slots, "v_slots", kv, {s.B, s.Hkv, s.S, s.D});
  expect(t.k, "k", kv, {s.B, s.Hkv, T, s.D});
  expect(t.v, "v", kv, {s.B, s.Hkv, T, s.D});
  TORCH_CHECK(t.phi_q.has_value() == t.psi_k.has_value(), "less_cuda: phi_q and psi_k must be given together");
  TORCH_CHECK(t.phi_q.has_value() || s.R == 0, "less_cuda: phi_q and psi_k are needed for a rank-", s.R, " state");
  if (t.phi_q.has_value()) {
    expect(*t.psi_k, "psi_k", at::kFloat, {s.B, s.Hkv, T, s.R});
    expect(*t.phi_q, "phi_q", at::kFloat, {s.B, s.Hq, T, s.R});
  }
  expect(t.psi_slots, "psi_slots", at::kFloat, {s.B, s.Hkv, s.S, s.R});
  expect(t.scores, "scores", at::kFloat, {s.B, s.Hkv, s.S});
  expect(t.H, "H", at::kFloat, {s.B, s.Hkv, s.R, s.D});
  expect(t.z, "z", at::kFloat, {s.B, s.Hkv, s.R});
  expect(t.pos, "pos", at::kInt, {s.B, s.Hkv, s.S});
  expect(t.next_position, "next_position", at::kInt, {s.B});
  if (t.valid.has_value()) expect(*t.valid, "valid", at::kBool, {s.B, T});
  check_policy(policy, budget, recent, sinks);
  TORCH_CHECK(budget < s.S, "less_cuda: ", s.S, " slots cannot hold the budget (", budget,
              ") plus the incoming token");
  return {s, T};
}

}  // namespace less_cuda
