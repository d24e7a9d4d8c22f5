#include "checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/FunctionRef.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <vector>

#include "less_numerics.h"

namespace less_cuda {
namespace {

// Positions stay below 2^24: eviction compares them as floats (less_numerics.h eviction_key). The CUDA decode step
// checks its next_position on the device instead (csrc/cuda/decode_step.cu).
constexpr int64_t kMaxPosition = int64_t{1} << 24;

bool is_kv_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// An argument and its name in the schema, for messages that name both sides of a disagreement.
struct Named {
  const at::Tensor* t;  // null: an optional argument that was not given
  const char* name;
};

Named named(const at::Tensor& t, const char* name) { return {&t, name}; }
Named named(const std::optional<at::Tensor>& t, const char* name) { return {t.has_value() ? &*t : nullptr, name}; }

// `on`: the call's first tensor, whose device every other argument must share.
void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const Named& on) {
  TORCH_CHECK(t.defined(), "less_cuda: ", name, " must be a tensor, got None");
  TORCH_CHECK(t.dim() == dim, "less_cuda: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.device() == on.t->device(), "less_cuda: ", name, " is on ", t.device(), " but ", on.name, " is on ",
              on.t->device());
  // The kernels index raw pointers with the contiguous layout: any other strides would read the wrong elements.
  TORCH_CHECK(t.is_contiguous(), "less_cuda: ", name, " must be contiguous, got strides ", t.strides(),
              " for shape ", t.sizes());
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, "less_cuda: ", name, " must be ", want, ", got ", t.scalar_type());
}

void check_kv_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_kv_dtype(t.scalar_type()), "less_cuda: ", name, " must be float32, bfloat16 or float16, got ",
              t.scalar_type());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, "less_cuda: ", name, " must have shape ", want, ", got ", t.sizes());
}

void check_arg(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape, const Named& on) {
  check_tensor(t, name, static_cast<int64_t>(shape.size()), on);
  check_dtype(t, name, dtype);
  check_shape(t, name, shape);
}

void check_heads(const DecodeSizes& s, const at::Tensor& q) {
  TORCH_CHECK(s.D > 0, "less_cuda: head_dim must be positive, got q of shape ", q.sizes());
  TORCH_CHECK(s.Hkv > 0 && s.Hq % s.Hkv == 0, "less_cuda: query heads (", s.Hq, ") must be a multiple of KV heads (",
              s.Hkv, ")");
}

// Each policy protects its own tokens (H2O the `recent` newest, Λ the `sinks` first) and must keep room for at least
// one other, so that count is below the budget. The count a policy does not use is ignored by the kernels but still
// range-checked, so that a swapped or misplaced argument is an error: sinks < budget for both policies; recent
// <= budget for Λ, which keeps budget - sinks newest tokens and is handed that (ResolvedPolicy.as_args).
void check_policy(int64_t policy, int64_t budget, int64_t recent, int64_t sinks) {
  TORCH_CHECK(policy == kPolicyH2O || policy == kPolicyLambda, "less_cuda: unknown policy id ", policy,
              " (0 = H2O, 1 = Lambda)");
  TORCH_CHECK(budget >= 1 && budget <= INT32_MAX, "less_cuda: budget must be in [1, 2^31), got ", budget);
  TORCH_CHECK(recent >= 0 && sinks >= 0, "less_cuda: recent and sinks must be >= 0, got ", recent, " and ", sinks);
  TORCH_CHECK(sinks < budget, "less_cuda: budget (", budget, ") must exceed sinks (", sinks, ")",
              policy == kPolicyH2O ? "; H2O keeps no sinks: pass sinks=0" : "");
  if (policy == kPolicyH2O) {
    TORCH_CHECK(recent < budget, "less_cuda: budget (", budget, ") must exceed recent (", recent, ")");
  } else {
    TORCH_CHECK(recent <= budget, "less_cuda: recent (", recent, ") must not exceed budget (", budget,
                "); Lambda ignores it: its recent window is budget - sinks");
  }
}

// In-place ops: a written tensor that shares memory with another argument would be read after it was overwritten.
// Every tensor here has passed check_tensor, so it is contiguous and covers exactly the bytes [data, data + nbytes):
// two of them overlap when those ranges do (an empty one covers nothing).
void check_disjoint(std::initializer_list<Named> written, std::initializer_list<Named> read) {
  struct Span {
    uintptr_t begin, end;
    const char* name;
  };
  c10::SmallVector<Span, 16> spans;  // 14 at most (decode_step_): no allocation; written ones are never optional
  for (const auto* group : {&written, &read}) {
    for (const Named& n : *group) {
      if (n.t == nullptr) continue;
      const auto begin = reinterpret_cast<uintptr_t>(n.t->const_data_ptr());
      spans.push_back({begin, begin + n.t->nbytes(), n.name});
    }
  }
  for (size_t w = 0; w < written.size(); ++w) {
    for (size_t other = w + 1; other < spans.size(); ++other) {
      TORCH_CHECK(spans[w].end <= spans[other].begin || spans[other].end <= spans[w].begin, "less_cuda: ",
                  spans[w].name, " is updated in place and must not share memory with ", spans[other].name);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Value checks. They read the data on the host, so they run for CPU tensors only: on CUDA each would copy to the
// host and synchronise the stream on every call, which the ops never do (and which breaks CUDA-graph capture).
// They cover the small per-call inputs (phi, psi, z, a call's new tokens, probs), not the slots or H: a pass over
// those would cost as much as the op itself (docs/guarantees.md).
// ---------------------------------------------------------------------------------------------------------------
enum class Values { kFinite, kFiniteNonNegative };

// Whether a run of values passes, with no branch in the loop so that it vectorises: finiteness as an integer test on
// the bits (an all-ones exponent is inf or NaN; half types need no conversion), the sign as a float compare (-0
// passes, NaN fails).
template <typename Bits, Bits kExponent>
bool all_finite(const void* data, int64_t n) {
  const Bits* x = static_cast<const Bits*>(data);
  Bits bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<Bits>((x[i] & kExponent) == kExponent);
  return bad == 0;
}

bool all_finite_nonnegative(const void* data, int64_t n) {
  const float* x = static_cast<const float*>(data);
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !(x[i] >= 0.f) | (x[i] > FLT_MAX);
  return bad == 0;
}

bool passes(const at::Tensor& t, int64_t offset, int64_t n, Values want) {
  const void* data = static_cast<const char*>(t.const_data_ptr()) + offset * t.element_size();
  if (want == Values::kFiniteNonNegative) return all_finite_nonnegative(data, n);  // fp32 tensors only
  switch (t.scalar_type()) {
    case at::kFloat: return all_finite<uint32_t, 0x7F800000u>(data, n);
    case at::kHalf: return all_finite<uint16_t, 0x7C00u>(data, n);
    default: return all_finite<uint16_t, 0x7F80u>(data, n);  // bfloat16: the dtype checks admit nothing else
  }
}

// The error for the first failing element of row `row` (already known to fail): its value and index.
[[noreturn]] void fail_values(const at::Tensor& t, const char* name, int64_t row, int64_t len, Values want,
                              const char* why) {
  const at::Tensor x = t.reshape({-1}).narrow(0, row * len, len).to(at::kFloat);
  const at::Tensor bad = want == Values::kFiniteNonNegative ? ~(x.isfinite() & (x >= 0)) : ~x.isfinite();
  const int64_t j = bad.to(at::kByte).argmax().item<int64_t>();
  std::vector<int64_t> index(t.dim());
  for (int64_t d = t.dim() - 1, flat = row * len + j; d >= 0; --d) {
    index[d] = flat % t.size(d);
    flat /= t.size(d);
  }
  const char* expectation = want == Values::kFiniteNonNegative ? "finite and >= 0" : "finite";
  TORCH_CHECK(false, "less_cuda: ", name, " must be ", expectation, why, ", got ", x[j].item<float>(), " at index ",
              at::IntArrayRef(index));
}

// Checks the rows (runs of the last dimension) that the call reads into a result: `in_use(row)` is false for a pad
// token's rows, whose values nothing depends on. One pass over the whole tensor first: only when some value fails
// are the rows examined one by one, so that padding costs nothing unless it holds such values.
void check_values(const at::Tensor& t, const char* name, Values want, const char* why,
                  c10::function_ref<bool(int64_t)> in_use) {
  if (!t.is_cpu() || t.numel() == 0 || passes(t, 0, t.numel(), want)) return;
  const int64_t len = t.size(-1), rows = t.numel() / len;
  for (int64_t row = 0; row < rows; ++row) {
    if (in_use(row) && !passes(t, row * len, len, want)) fail_values(t, name, row, len, want, why);
  }
}

void check_values(const at::Tensor& t, const char* name, Values want, const char* why = "") {
  check_values(t, name, want, why, [](int64_t) { return true; });
}

constexpr const char* kDenominator = " (phi(q) z is part of the attention's denominator)";
constexpr const char* kFolded = " (psi(k) is folded into z, the state's part of the denominator)";

}  // namespace

DecodeSizes check_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& pos, const std::optional<at::Tensor>& phi_q,
                                   const std::optional<at::Tensor>& H, const std::optional<at::Tensor>& z) {
  const Named on = named(q, "q");
  check_tensor(q, "q", 3, on);
  check_tensor(k, "k", 4, on);
  check_tensor(v, "v", 4, on);
  check_tensor(pos, "pos", 3, on);
  check_kv_dtype(q, "q");
  check_dtype(k, "k", q.scalar_type());
  check_dtype(v, "v", q.scalar_type());
  check_dtype(pos, "pos", at::kInt);
  DecodeSizes s{q.size(0), q.size(1), k.size(1), 0, k.size(2), q.size(2), 0};
  check_heads(s, q);
  s.G = s.Hq / s.Hkv;
  check_shape(k, "k", {s.B, s.Hkv, s.S, s.D});
  check_shape(v, "v", {s.B, s.Hkv, s.S, s.D});
  check_shape(pos, "pos", {s.B, s.Hkv, s.S});
  const bool has_state = phi_q.has_value();
  TORCH_CHECK(has_state == H.has_value() && has_state == z.has_value(),
              "less_cuda: phi_q, H and z must be given together or all be None");
  check_values(q, "q", Values::kFinite);
  if (has_state) {
    check_tensor(*phi_q, "phi_q", 3, on);
    check_tensor(*H, "H", 4, on);
    check_tensor(*z, "z", 3, on);
    check_dtype(*phi_q, "phi_q", at::kFloat);
    check_dtype(*H, "H", at::kFloat);
    check_dtype(*z, "z", at::kFloat);
    s.R = phi_q->size(2);
    check_shape(*phi_q, "phi_q", {s.B, s.Hq, s.R});
    check_shape(*H, "H", {s.B, s.Hkv, s.R, s.D});
    check_shape(*z, "z", {s.B, s.Hkv, s.R});
    check_values(*phi_q, "phi_q", Values::kFiniteNonNegative, kDenominator);
    check_values(*z, "z", Values::kFiniteNonNegative, kDenominator);
  }
  return s;
}

EvictSizes check_score_and_evict(const at::Tensor& scores, const at::Tensor& pos, const at::Tensor& probs,
                                 int64_t policy, int64_t budget, int64_t recent, int64_t sinks) {
  const Named on = named(scores, "scores");
  check_tensor(scores, "scores", 3, on);
  check_tensor(pos, "pos", 3, on);
  check_tensor(probs, "probs", 3, on);
  check_dtype(scores, "scores", at::kFloat);
  check_dtype(pos, "pos", at::kInt);
  check_dtype(probs, "probs", at::kFloat);
  EvictSizes s{scores.size(0), scores.size(1), scores.size(2)};
  check_shape(pos, "pos", scores.sizes());
  check_shape(probs, "probs", scores.sizes());
  check_policy(policy, budget, recent, sinks);
  check_disjoint({named(scores, "scores"), named(pos, "pos")}, {named(probs, "probs")});
  check_values(probs, "probs", Values::kFiniteNonNegative, " (H2O adds them to the scores)");
  if (pos.is_cpu()) {
    const int32_t* p = pos.const_data_ptr<int32_t>();
    int32_t newest = kEmptySlot;
    for (int64_t i = 0; i < pos.numel(); ++i) newest = std::max(newest, p[i]);
    TORCH_CHECK(newest < kMaxPosition, "less_cuda: pos must be below 2^24 (eviction compares positions as floats), "
                "got ", newest);
  }
  return s;
}

FoldSizes check_state_fold(const at::Tensor& psi, const at::Tensor& v, const std::optional<at::Tensor>& mask) {
  const Named on = named(psi, "psi");
  check_tensor(psi, "psi", 4, on);
  check_tensor(v, "v", 4, on);
  check_dtype(psi, "psi", at::kFloat);
  check_kv_dtype(v, "v");
  FoldSizes s{psi.size(0), psi.size(1), psi.size(2), psi.size(3), v.size(3)};
  check_shape(v, "v", {s.B, s.Hkv, s.N, s.D});
  if (mask.has_value()) {
    check_tensor(*mask, "mask", 3, on);
    check_dtype(*mask, "mask", at::kBool);
    check_shape(*mask, "mask", {s.B, s.Hkv, s.N});
  }
  // Only the folded tokens: a masked-out one (padding, a kept token) adds nothing, whatever its values.
  const bool* folded = mask.has_value() && mask->is_cpu() ? mask->const_data_ptr<bool>() : nullptr;
  const auto in_use = [folded](int64_t token) { return folded == nullptr || folded[token]; };
  check_values(psi, "psi", Values::kFiniteNonNegative, kFolded, in_use);
  check_values(v, "v", Values::kFinite, " (v is folded into H)", in_use);
  return s;
}

FoldSizes check_state_update(const at::Tensor& H, const at::Tensor& z, const at::Tensor& psi, const at::Tensor& v,
                             const std::optional<at::Tensor>& mask) {
  const FoldSizes s = check_state_fold(psi, v, mask);
  const Named on = named(psi, "psi");
  check_tensor(H, "H", 4, on);
  check_tensor(z, "z", 3, on);
  check_dtype(H, "H", at::kFloat);
  check_dtype(z, "z", at::kFloat);
  check_shape(H, "H", {s.B, s.Hkv, s.R, s.D});
  check_shape(z, "z", {s.B, s.Hkv, s.R});
  check_disjoint({named(H, "H"), named(z, "z")}, {named(psi, "psi"), named(v, "v"), named(mask, "mask")});
  check_values(z, "z", Values::kFiniteNonNegative, kDenominator);
  return s;
}

namespace {

// A state tensor of decode_step_: [N, ...] with each row contiguous and rows at least a row apart (a vLLM page may
// hold other tensors between them). Returns the row stride in elements.
int64_t check_state_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                           const Named& on) {
  TORCH_CHECK(t.defined(), "less_cuda: ", name, " must be a tensor, got None");
  TORCH_CHECK(t.device() == on.t->device(), "less_cuda: ", name, " is on ", t.device(), " but ", on.name, " is on ",
              on.t->device());
  check_dtype(t, name, dtype);
  check_shape(t, name, shape);
  int64_t row = 1;  // elements of one row
  if (t.numel() == 0) return t.stride(0);  // nothing to address (R = 0: no low-rank state)
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    TORCH_CHECK(t.size(d) == 1 || t.stride(d) == row, "less_cuda: each row of ", name, " must be contiguous, got "
                "strides ", t.strides(), " for shape ", t.sizes());
    row *= t.size(d);
  }
  TORCH_CHECK(t.size(0) <= 1 || row == 0 || t.stride(0) >= row, "less_cuda: the rows of ", name, " overlap: stride ",
              t.stride(0), " for rows of ", row, " elements");
  return t.stride(0);
}

// One state tensor's place in memory: row r spans [begin + r * stride, + row) bytes.
struct RowSpan {
  uintptr_t begin;
  int64_t row, stride, rows;
  const char* name;
  uintptr_t end() const { return begin + static_cast<uintptr_t>(rows > 0 ? (rows - 1) * stride + row : 0); }
};

RowSpan row_span(const at::Tensor& t, const char* name) {
  const int64_t size = t.element_size(), rows = t.dim() > 0 ? t.size(0) : 1;
  const int64_t row = rows > 0 ? t.numel() / rows * size : 0;
  return {reinterpret_cast<uintptr_t>(t.const_data_ptr()), row, t.dim() > 0 ? t.stride(0) * size : row, rows, name};
}

bool overlap(uintptr_t a0, uintptr_t a1, uintptr_t b0, uintptr_t b1) { return a0 < b1 && b0 < a1; }

// The step writes every state tensor, so no two may share an element, nor any state tensor an input. Separate
// tensors (whole extents apart) pass, and so do tensors interleaved in pages of one byte stride P whose first rows
// are apart and fit in P bytes together (vLLM's layout): then no row of one meets any row of another.
void check_state_disjoint(const c10::SmallVector<RowSpan, 8>& state, std::initializer_list<Named> read) {
  uintptr_t low = UINTPTR_MAX, high = 0;
  bool paged = true;
  for (const RowSpan& s : state) {
    if (s.row == 0) continue;
    paged &= s.rows <= 1 || s.stride == state[0].stride;
    low = std::min(low, s.begin);
    high = std::max(high, s.begin + static_cast<uintptr_t>(s.row));
  }
  paged &= state[0].rows <= 1 || high - low <= static_cast<uintptr_t>(state[0].stride);
  for (size_t i = 0; i < state.size(); ++i) {
    for (size_t j = i + 1; j < state.size(); ++j) {
      const RowSpan &a = state[i], &b = state[j];
      if (a.row == 0 || b.row == 0) continue;
      const bool apart = paged ? !overlap(a.begin, a.begin + a.row, b.begin, b.begin + b.row)
                               : !overlap(a.begin, a.end(), b.begin, b.end());
      TORCH_CHECK(apart, "less_cuda: ", a.name, " is updated in place and must not share memory with ", b.name);
    }
  }
  for (const RowSpan& s : state) {
    for (const Named& n : read) {
      if (n.t == nullptr || s.row == 0) continue;
      const auto begin = reinterpret_cast<uintptr_t>(n.t->const_data_ptr());
      TORCH_CHECK(!overlap(s.begin, s.end(), begin, begin + n.t->nbytes()), "less_cuda: ", s.name,
                  " is updated in place and must not share memory with ", n.name);
    }
  }
}

// Value checks of the state rows a call uses (a pool's other rows may hold anything): `len` values from the start of
// each used row.
void check_state_values(const at::Tensor& t, const char* name, const StateRows& state, int64_t B, int64_t len,
                        Values want, const char* why) {
  if (!t.is_cpu() || len == 0) return;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = state.row(b);
    if (!passes(t, r * t.stride(0), len, want)) fail_values(t, name, r, len, want, why);  // index [r, ...]
  }
}

}  // namespace

StepSizes check_decode_step(const StepTensors& t, int64_t policy, int64_t budget, int64_t recent, int64_t sinks) {
  const Named on = named(t.q, "q");
  check_tensor(t.q, "q", 4, on);
  check_kv_dtype(t.q, "q");
  TORCH_CHECK(t.k_slots.defined() && t.k_slots.dim() == 4, "less_cuda: k_slots must be [B, Hkv, S, D]");
  TORCH_CHECK(t.psi_slots.defined() && t.psi_slots.dim() == 4, "less_cuda: psi_slots must be [B, Hkv, S, R]");
  DecodeSizes s{t.q.size(0), t.q.size(1), t.k_slots.size(1), 0, t.k_slots.size(2), t.q.size(3), t.psi_slots.size(3)};
  const int64_t T = t.q.size(2);
  check_heads(s, t.q);
  s.G = s.Hq / s.Hkv;
  const auto expect = [&](const at::Tensor& x, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
    check_arg(x, name, dtype, shape, on);
  };
  const int64_t N = t.state_rows.has_value() ? t.k_slots.size(0) : s.B;
  const int64_t* rows = nullptr;
  if (t.state_rows.has_value()) {
    expect(*t.state_rows, "state_rows", at::kLong, {s.B});
    rows = t.state_rows->const_data_ptr<int64_t>();
  }
  const auto kv = t.q.scalar_type();
  const auto state = [&](const at::Tensor& x, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
    return check_state_tensor(x, name, dtype, shape, on);
  };
  const StateRows layout{rows,
                         state(t.k_slots, "k_slots", kv, {N, s.Hkv, s.S, s.D}),
                         state(t.v_slots, "v_slots", kv, {N, s.Hkv, s.S, s.D}),
                         state(t.psi_slots, "psi_slots", at::kFloat, {N, s.Hkv, s.S, s.R}),
                         state(t.pos, "pos", at::kInt, {N, s.Hkv, s.S}),
                         state(t.scores, "scores", at::kFloat, {N, s.Hkv, s.S}),
                         state(t.H, "H", at::kFloat, {N, s.Hkv, s.R, s.D}),
                         state(t.z, "z", at::kFloat, {N, s.Hkv, s.R}),
                         state(t.next_position, "next_position", at::kInt, {N})};
  expect(t.k, "k", kv, {s.B, s.Hkv, T, s.D});
  expect(t.v, "v", kv, {s.B, s.Hkv, T, s.D});
  TORCH_CHECK(t.phi_q.has_value() == t.psi_k.has_value(), "less_cuda: phi_q and psi_k must be given together");
  TORCH_CHECK(t.phi_q.has_value() || s.R == 0, "less_cuda: phi_q and psi_k are needed for a rank-", s.R, " state");
  if (t.phi_q.has_value()) {
    expect(*t.psi_k, "psi_k", at::kFloat, {s.B, s.Hkv, T, s.R});
    expect(*t.phi_q, "phi_q", at::kFloat, {s.B, s.Hq, T, s.R});
  }
  if (t.valid.has_value()) expect(*t.valid, "valid", at::kBool, {s.B, T});
  check_policy(policy, budget, recent, sinks);
  TORCH_CHECK(budget < s.S, "less_cuda: ", s.S, " slots cannot hold the budget (", budget,
              ") plus the incoming token");
  check_state_disjoint({row_span(t.k_slots, "k_slots"), row_span(t.v_slots, "v_slots"),
                        row_span(t.psi_slots, "psi_slots"), row_span(t.pos, "pos"), row_span(t.scores, "scores"),
                        row_span(t.H, "H"), row_span(t.z, "z"), row_span(t.next_position, "next_position")},
                       {named(t.q, "q"), named(t.k, "k"), named(t.v, "v"), named(t.phi_q, "phi_q"),
                        named(t.psi_k, "psi_k"), named(t.valid, "valid"), named(t.state_rows, "state_rows")});
  const StepSizes sizes{s, T, N, layout};
  if (!t.q.is_cpu()) return sizes;  // the rest reads values (see "Value checks")

  if (rows != nullptr) {  // two batch rows on one state row would race for it
    std::vector<bool> taken(N);
    for (int64_t b = 0; b < s.B; ++b) {
      TORCH_CHECK(rows[b] >= 0 && rows[b] < N, "less_cuda: state_rows[", b, "] = ", rows[b],
                  " is outside the state's ", N, " rows");
      TORCH_CHECK(!taken[rows[b]], "less_cuda: state_rows holds row ", rows[b], " twice");
      taken[rows[b]] = true;
    }
  }
  // A pad token's q, k, v, phi and psi are never read into a result (its slot stays free, its output is discarded).
  const bool* valid = t.valid.has_value() ? t.valid->const_data_ptr<bool>() : nullptr;
  const auto real = [valid, T](int64_t heads) {
    return [valid, T, heads](int64_t row) { return valid == nullptr || valid[row / (heads * T) * T + row % T]; };
  };
  check_values(t.q, "q", Values::kFinite, "", real(s.Hq));
  check_values(t.k, "k", Values::kFinite, " (k is written into a slot)", real(s.Hkv));
  check_values(t.v, "v", Values::kFinite, " (v is written into a slot)", real(s.Hkv));
  if (t.phi_q.has_value()) {
    check_values(*t.phi_q, "phi_q", Values::kFiniteNonNegative, kDenominator, real(s.Hq));
    check_values(*t.psi_k, "psi_k", Values::kFiniteNonNegative, kFolded, real(s.Hkv));
  }
  check_state_values(t.z, "z", layout, s.B, s.Hkv * s.R, Values::kFiniteNonNegative, kDenominator);
  // Positions come from next_position, so bounding it bounds every position the call hands out.
  const int32_t* next = t.next_position.const_data_ptr<int32_t>();
  const int32_t* pos = t.pos.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t r = layout.row(b);
    const int32_t n = next[r * layout.next_position];
    TORCH_CHECK(n >= 0 && n + T <= kMaxPosition, "less_cuda: next_position must be in [0, 2^24 - T] (",
                "positions stay below 2^24: eviction compares them as floats), got ", n, " for batch row ", b,
                " with T = ", T);
    // Between steps a stream holds at most `budget` tokens; more would leave the new token no free slot, and it
    // would overwrite slot 0 (a cache filled under a larger budget, or slots filled by hand).
    for (int64_t h = 0; h < s.Hkv; ++h) {
      const int32_t* row = pos + r * layout.pos + h * s.S;
      int64_t held = 0;
      for (int64_t j = 0; j < s.S; ++j) held += row[j] >= 0;
      TORCH_CHECK(held <= budget, "less_cuda: pos holds ", held, " tokens in row [", b, ", ", h, "], more than the "
                  "budget (", budget, "): a stream keeps at most budget tokens between steps");
    }
  }
  return sizes;
}

FeatureMapSizes check_feature_maps(const at::Tensor& q, const at::Tensor& k, const at::Tensor& phi_w1,
                                   const at::Tensor& phi_w2, const at::Tensor& psi_w1, const at::Tensor& psi_w2,
                                   const at::Tensor& psi_scale, const at::Tensor& psi_interaction,
                                   const at::Tensor& psi_interaction_scale) {
  const Named on = named(q, "q");
  // q and k may have any strides: the kernel reads them through a contiguous fp32 copy.
  TORCH_CHECK(q.defined() && k.defined(), "less_cuda: q and k must be tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "less_cuda: q and k must be [B, heads, T, D], got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(k.device() == q.device(), "less_cuda: k is on ", k.device(), " but q is on ", q.device());
  check_kv_dtype(q, "q");
  check_dtype(k, "k", q.scalar_type());
  TORCH_CHECK(phi_w1.defined() && phi_w2.defined() && phi_w1.dim() == 3 && phi_w2.dim() == 3,
              "less_cuda: phi_w1 and phi_w2 must be 3-dimensional tensors");
  FeatureMapSizes s{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3), phi_w1.size(2), phi_w2.size(2)};
  TORCH_CHECK(s.D > 0, "less_cuda: head_dim must be positive, got q of shape ", q.sizes());
  check_shape(k, "k", {s.B, s.Hkv, s.T, s.D});
  const auto weight = [&](const at::Tensor& w, const char* name, at::IntArrayRef shape) {
    check_arg(w, name, at::kFloat, shape, on);
  };
  weight(phi_w1, "phi_w1", {s.Hq, s.D, s.E});
  weight(phi_w2, "phi_w2", {s.Hq, s.E, s.R});
  weight(psi_w1, "psi_w1", {s.Hkv, s.D, s.E});
  weight(psi_w2, "psi_w2", {s.Hkv, s.E, s.R});
  weight(psi_scale, "psi_scale", {s.Hkv, 1, s.R});
  weight(psi_interaction, "psi_interaction", {s.Hkv, s.R, s.R});
  weight(psi_interaction_scale, "psi_interaction_scale", {s.Hkv, 1, s.R});
  return s;
}

}  // namespace less_cuda
