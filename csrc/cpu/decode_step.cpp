// less_cuda::decode_step_ on CPU: one layer's whole decode step (reference.decode_step), in place on its slots.
// Per (batch row b, KV head h): write the new token into the lowest free slot, attend over the occupied slots plus
// the low-rank state, add the group-summed probabilities to the H2O scores (not for a pad token), evict at most
// one token when more than `budget` are held, and fold the victim's psi, v into H, z.
//
// T new tokens are stepped in turn (one parallel pass each); a pad token (valid false) is written into the free
// slot as a free slot (pos -1), adds no score and evicts nothing; next_position advances by the real tokens.
//
// Layout: q [B,Hq,T,D], k, v [B,Hkv,T,D] in T (fp32, bf16, fp16); phi_q [B,Hq,T,R], psi_k [B,Hkv,T,R] fp32 or none
// when R = 0; valid [B,T] bool or none; all contiguous. The state, row b's at row state.row(b) of each tensor (rows
// a stride apart, contiguous inside: state_rows.h): k_slots, v_slots [N,Hkv,S,D] in T; psi_slots [N,Hkv,S,R],
// scores [N,Hkv,S], H [N,Hkv,R,D], z [N,Hkv,R] fp32; pos [N,Hkv,S], next_position [N] int32. Returns out
// [B,Hq,T,D].
//
// Parallel mapping: one at::parallel_for over the B*Hkv rows; a thread owns a row and all G of its query heads, so
// each K/V slot is read once and every written element has one writer (results do not depend on the thread
// count). Within a row (step_row): insert_token; the K pass (k_pass) computes the logits of two occupied slots for
// four query heads per sweep over D (eight independent FMA chains) and a vectorised exp turns them into
// probabilities; the V pass (v_pass) accumulates p * v four slots at a time, loading each V block once for the
// group; write_out merges with the low-rank state; scores, eviction and the fold (fold_victim) follow from the
// same buffers. Scratch lives in thread-local buffers that only grow: no allocation after the first call.
//
// Bytes per call: reads 2*B*Hkv*S_occupied*D*sizeof(T) of K/V (the bulk) and 12*B*Hkv*S of pos, scores; writes
// one slot per row, scores, out; H, z read and written once per row with a state.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "checks.h"
#include "cpu/simd.h"
#include "cpu/slot_row.h"
#include "less_numerics.h"

namespace less_cuda {
namespace {

using simd::f8;
constexpr int kHeadTile = 4;  // query heads per sweep over two K rows: eight independent FMA chains
constexpr int kVRows = 4;     // V rows per sweep of the V pass (8 runs out of vector registers)

struct StepPointers {
  void* k_slots;
  void* v_slots;
  float* psi_slots;
  int32_t* pos;
  float* scores;
  float* H;
  float* z;
  int32_t* next_position;
  const void* q;
  const void* k;
  const void* v;
  const float* phi_q;
  const float* psi_k;
  const bool* valid;  // [B, T], or null: every token is real
  StateRows state;    // where batch row b's state is
  void* out;
  DecodeSizes s;
  int64_t T, t;  // tokens of the call, and the one this pass steps
  float scale;
  int policy, budget, recent, sinks;
};

// Per-thread scratch, sized for the largest call seen.
struct Scratch {
  std::vector<float> q, row, logits, o, lse, weights, probs;
  std::vector<int32_t> occupied;
  void fit(int64_t G, int64_t S, int64_t D) {
    const int64_t padded_heads = (G + kHeadTile - 1) / kHeadTile * kHeadTile;
    if (static_cast<int64_t>(q.size()) < padded_heads * D) q.resize(padded_heads * D);
    if (static_cast<int64_t>(occupied.size()) < S) occupied.resize(S);
    if (static_cast<int64_t>(row.size()) < D) row.resize(D);
    if (static_cast<int64_t>(probs.size()) < S) probs.resize(S);
    if (static_cast<int64_t>(logits.size()) < G * S) logits.resize(G * S);
    if (static_cast<int64_t>(o.size()) < G * D) o.resize(G * D);
    if (static_cast<int64_t>(lse.size()) < G) lse.resize(G);
    if (static_cast<int64_t>(weights.size()) < kVRows * G) weights.resize(kVRows * G);
  }
};

// Logits of two K rows against kHeadTile query heads (q: pre-scaled fp32 rows of D in load16's order, zero past
// the group): eight independent FMA chains, reduced together. Returns [head t of k0 for t < 4, head t of k1].
template <typename T>
LESS_INLINE f8 logits_2x4(const float* q, const T* k0, const T* k1, int64_t D) {
  f8 acc[2 * kHeadTile] = {};
  int64_t d = 0;
  for (; d + simd::kBlock <= D; d += simd::kBlock) {
    f8 a_lo, a_hi, b_lo, b_hi;
    simd::load16(k0 + d, a_lo, a_hi);
    simd::load16(k1 + d, b_lo, b_hi);
#pragma GCC unroll 4
    for (int t = 0; t < kHeadTile; ++t) {
      const f8 q_lo = simd::load(q + t * D + d), q_hi = simd::load(q + t * D + d + simd::kWidth);
      acc[t] += q_lo * a_lo;  // one multiply-add per statement, so that each contracts to an FMA
      acc[t] += q_hi * a_hi;
      acc[kHeadTile + t] += q_lo * b_lo;
      acc[kHeadTile + t] += q_hi * b_hi;
    }
  }
  f8 r = simd::hsum8(acc);
  for (; d < D; ++d)  // head_dim not a multiple of 16: the tail is in natural order
    for (int t = 0; t < kHeadTile; ++t) {
      r[t] += q[t * D + d] * static_cast<float>(k0[d]);
      r[kHeadTile + t] += q[t * D + d] * static_cast<float>(k1[d]);
    }
  return r;
}

// o[g] += sum_u w[g * kVRows + u] * v_u for kVRows V rows and all G heads (o in load16's order): each V block is
// loaded once for the group, and each accumulator load and store is shared by kVRows multiply-adds.
template <typename T>
LESS_INLINE void accumulate_rows(const T* const* v, const float* w, float* o, int64_t G, int64_t D) {
  int64_t d = 0;
  for (; d + simd::kBlock <= D; d += simd::kBlock) {
    f8 lo[kVRows], hi[kVRows];
    for (int u = 0; u < kVRows; ++u) simd::load16(v[u] + d, lo[u], hi[u]);
    for (int64_t g = 0; g < G; ++g) {
      const float* wg = w + g * kVRows;
      float* og = o + g * D + d;
      f8 o_lo = simd::load(og), o_hi = simd::load(og + simd::kWidth);
      for (int u = 0; u < kVRows; ++u) {
        o_lo += wg[u] * lo[u];
        o_hi += wg[u] * hi[u];
      }
      simd::store(og, o_lo);
      simd::store(og + simd::kWidth, o_hi);
    }
  }
  for (; d < D; ++d)
    for (int64_t g = 0; g < G; ++g)
      for (int u = 0; u < kVRows; ++u) o[g * D + d] += w[g * kVRows + u] * static_cast<float>(v[u][d]);
}

// Rows are streamed once; a hardware prefetcher alone leaves one thread waiting on memory, so each pass asks for
// the row kPrefetchAhead occupied slots ahead.
constexpr int64_t kPrefetchAhead = 8;
template <typename T>
LESS_INLINE void prefetch_row(const T* row, int64_t D) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t offset = 0; offset < row_bytes; offset += 64) __builtin_prefetch(bytes + offset);
}


// Softmax of one head's logits over S slots in place (free slots hold -inf and get 0); returns the log-sum-exp,
// -inf when no slot is occupied. The exp matches the reference's exp(s - lse) to a few ulp.
LESS_INLINE float softmax_in_place(float* p, int64_t S) {
  f8 m8 = simd::splat(-INFINITY);
  int64_t j = 0;
  for (; j + simd::kWidth <= S; j += simd::kWidth) m8 = simd::max(m8, simd::load(p + j));
  float m = simd::hmax(m8);
  for (; j < S; ++j) m = std::max(m, p[j]);
  if (!(m > -INFINITY)) {
    std::fill(p, p + S, 0.f);
    return -INFINITY;
  }
  f8 sum8{};
  j = 0;
  for (; j + simd::kWidth <= S; j += simd::kWidth) {
    const f8 e = simd::exp(simd::load(p + j) - m);
    simd::store(p + j, e);
    sum8 += e;
  }
  float sum = simd::hsum(sum8);
  if (j < S) {
    float tail[simd::kWidth];
    std::fill(tail, tail + simd::kWidth, -INFINITY);
    std::copy(p + j, p + S, tail);
    const f8 e = simd::exp(simd::load(tail) - m);
    for (int64_t i = 0; j + i < S; ++i) {
      p[j + i] = e[i];
      sum += e[i];
    }
  }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < S; ++i) p[i] *= inv;
  return m + std::log(sum);
}

// The state of row bh (bh = b * Hkv + KV head): its slots and its H, z.
template <typename T>
struct RowSlots {
  T* k;           // [S, D]
  T* v;           // [S, D]
  float* psi;     // [S, R]
  int32_t* pos;   // [S]
  float* scores;  // [S]
  float* H;       // [R, D]
  float* z;       // [R]
};

template <typename T>
LESS_INLINE RowSlots<T> row_slots(const StepPointers& a, int64_t bh) {
  const int64_t S = a.s.S, D = a.s.D, R = a.s.R, h = bh % a.s.Hkv;
  const StateRows& st = a.state;
  const int64_t r = st.row(bh / a.s.Hkv);
  const bool lowrank = R > 0;  // without a state psi, H and z may be null: no offset may be added to them
  return {static_cast<T*>(a.k_slots) + r * st.k_slots + h * S * D,
          static_cast<T*>(a.v_slots) + r * st.v_slots + h * S * D,
          lowrank ? a.psi_slots + r * st.psi_slots + h * S * R : a.psi_slots,
          a.pos + r * st.pos + h * S,
          a.scores + r * st.scores + h * S,
          lowrank ? a.H + r * st.H + h * R * D : a.H,
          lowrank ? a.z + r * st.z + h * R : a.z};
}

// Writes token a.t into the lowest free slot (slot 0 if none is free, as the reference's argmax) with a zero score.
template <typename T>
LESS_INLINE void insert_token(const StepPointers& a, int64_t bh, const RowSlots<T>& slots, int32_t position) {
  const int64_t S = a.s.S, D = a.s.D, R = a.s.R;
  const int64_t token = bh * a.T + a.t;  // row of k, v, psi_k [B, Hkv, T, *]
  int64_t slot = 0;
  while (slot < S && slots.pos[slot] >= 0) ++slot;
  if (slot == S) slot = 0;
  std::copy_n(static_cast<const T*>(a.k) + token * D, D, slots.k + slot * D);
  std::copy_n(static_cast<const T*>(a.v) + token * D, D, slots.v + slot * D);
  std::copy_n(a.psi_k + token * R, R, slots.psi + slot * R);
  slots.pos[slot] = position;
  slots.scores[slot] = 0.f;
}

// Token a.t's G query rows as fp32, pre-scaled, in load16's order (as logits_2x4 reads K); zero-padded to whole
// head tiles, since logits_2x4 reads kHeadTile heads at a time (the padding heads' logits are dropped).
template <typename T>
LESS_INLINE void load_scaled_q(const StepPointers& a, int64_t bh, float* q) {
  const int64_t G = a.s.G, D = a.s.D;
  const int64_t padded_heads = (G + kHeadTile - 1) / kHeadTile * kHeadTile;
  for (int64_t g = 0; g < G; ++g)
    simd::to_float(static_cast<const T*>(a.q) + ((bh * G + g) * a.T + a.t) * D, q + g * D, D);
  for (int64_t g = 0; g < G; ++g) simd::permute16<T>(q + g * D, D, /*inverse=*/false);
  for (int64_t i = 0; i < G * D; ++i) q[i] *= a.scale;
  std::fill(q + G * D, q + padded_heads * D, 0.f);
}

// The occupied slots in slot order, so that the K and V passes skip free slots without testing pos; returns how many.
LESS_INLINE int64_t occupied_slots(const int32_t* pos, int64_t S, int32_t* occupied) {
  int64_t n = 0;
  for (int64_t j = 0; j < S; ++j)
    if (pos[j] >= 0) occupied[n++] = static_cast<int32_t>(j);
  return n;
}

// K pass: p [G][S] = softmax of the scaled logits over the n occupied slots (0 for free slots) and lse [G], two
// slots per sweep over D.
template <typename T>
LESS_INLINE void k_pass(const DecodeSizes& s, const float* q, const T* k_slots, const int32_t* occupied, int64_t n,
                        float* p, float* lse) {
  const int64_t G = s.G, S = s.S, D = s.D;
  std::fill(p, p + G * S, -INFINITY);
  for (int64_t i = 0; i < n; i += 2) {
    const int64_t j0 = occupied[i], j1 = i + 1 < n ? occupied[i + 1] : j0;  // an odd last slot pairs with itself
    for (int64_t u = i + kPrefetchAhead; u < std::min(n, i + kPrefetchAhead + 2); ++u)
      prefetch_row(k_slots + occupied[u] * D, D);
    for (int64_t g0 = 0; g0 < G; g0 += kHeadTile) {
      const f8 r = logits_2x4(q + g0 * D, k_slots + j0 * D, k_slots + j1 * D, D);
      for (int64_t t = 0; t < kHeadTile && g0 + t < G; ++t) {
        p[(g0 + t) * S + j0] = r[t];
        p[(g0 + t) * S + j1] = r[kHeadTile + t];
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) lse[g] = softmax_in_place(p + g * S, S);
}

// V pass: o [G][D] = sum_j p_gj v_j (the normalised sparse state, in load16's order), kVRows slots at a time;
// weights: kVRows * G floats of scratch.
template <typename T>
LESS_INLINE void v_pass(const DecodeSizes& s, const float* p, const T* v_slots, const int32_t* occupied, int64_t n,
                        float* weights, float* o) {
  const int64_t G = s.G, S = s.S, D = s.D;
  std::fill(o, o + G * D, 0.f);
  for (int64_t i = 0; i < n; i += kVRows) {
    const T* v_rows[kVRows];
    for (int64_t u = i + kPrefetchAhead; u < std::min(n, i + kPrefetchAhead + kVRows); ++u)
      prefetch_row(v_slots + occupied[u] * D, D);
    for (int u = 0; u < kVRows; ++u) {
      const bool live = i + u < n;  // past the end: weight 0 on a real row, so nothing stale is read
      const int64_t j = occupied[live ? i + u : i];
      v_rows[u] = v_slots + j * D;
      for (int64_t g = 0; g < G; ++g) weights[g * kVRows + u] = live ? p[g * S + j] : 0.f;
    }
    accumulate_rows(v_rows, weights, o, G, D);
  }
}

// Merges each head's sparse state (o, lse) with the low-rank state (H, z before this step's fold) and writes token
// a.t's out rows; o is permuted back to natural order in place.
template <typename T>
LESS_INLINE void write_out(const StepPointers& a, int64_t bh, const RowSlots<T>& slots, float* o, const float* lse) {
  const int64_t G = a.s.G, D = a.s.D, R = a.s.R;
  T* out = static_cast<T*>(a.out);
  const float* H = slots.H;
  const float* z = slots.z;
  for (int64_t g = 0; g < G; ++g) {
    float* og = o + g * D;
    simd::permute16<T>(og, D, /*inverse=*/true);
    if (R > 0) {
      const float* phi = a.phi_q + ((bh * G + g) * a.T + a.t) * R;
      float den = 0.f;
      for (int64_t r = 0; r < R; ++r) den += phi[r] * z[r];
      const MergeWeights mw = merge_weights(lse[g], normaliser_lse(den));
      const float lr_scale = mw.b * normaliser_inv(den);
      for (int64_t d = 0; d < D; ++d) og[d] *= mw.a;
      for (int64_t r = 0; r < R; ++r) simd::axpy(lr_scale * phi[r], H + r * D, og, D);
    }
    simd::from_float(og, out + ((bh * G + g) * a.T + a.t) * D, D);
  }
}

// H2O's evidence for the scores: probs[j] = sum over the G heads of p_gj.
LESS_INLINE void group_probs(const float* p, int64_t G, int64_t S, float* probs) {
  std::fill(probs, probs + S, 0.f);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < S; ++j) probs[j] += p[g * S + j];
}

// Folds the evicted slot's psi, v into H, z (eviction only marks the slot free, so its row is intact); row: D floats
// of scratch.
template <typename T>
LESS_INLINE void fold_victim(const StepPointers& a, const RowSlots<T>& slots, int64_t victim, float* row) {
  const int64_t D = a.s.D, R = a.s.R;
  simd::to_float(slots.v + victim * D, row, D);
  fold_token(slots.H, slots.z, slots.psi + victim * R, row, R, D);
}

// Token a.t's whole step for row bh (see the file comment).
template <typename T>
LESS_INLINE void step_row(const StepPointers& a, int64_t bh, Scratch& w) {
  const DecodeSizes& s = a.s;
  const RowSlots<T> slots = row_slots<T>(a, bh);
  const int64_t b = bh / s.Hkv;
  const bool real = a.valid == nullptr || a.valid[b * a.T + a.t];
  insert_token(a, bh, slots, real ? a.next_position[a.state.row(b) * a.state.next_position] : kEmptySlot);  // a pad token is written as a free slot

  float* q = w.q.data();
  load_scaled_q<T>(a, bh, q);
  int32_t* occupied = w.occupied.data();
  const int64_t n = occupied_slots(slots.pos, s.S, occupied);
  float* p = w.logits.data();  // the logits, then the probabilities
  float* lse = w.lse.data();
  k_pass(s, q, slots.k, occupied, n, p, lse);
  float* o = w.o.data();
  v_pass(s, p, slots.v, occupied, n, w.weights.data(), o);
  write_out<T>(a, bh, slots, o, lse);

  float* probs = nullptr;  // Λ and pad tokens (whose attention is no evidence) add no score
  if (a.policy == kPolicyH2O && real) {
    probs = w.probs.data();
    group_probs(p, s.G, s.S, probs);
  }
  const int64_t victim =
      score_and_evict_row(slots.scores, slots.pos, probs, s.S, a.policy, a.budget, a.recent, a.sinks);
  if (victim >= 0 && s.R > 0) fold_victim(a, slots, victim, w.row.data());
}

template <typename T>
LESS_INLINE void step_rows(const StepPointers& a, int64_t begin, int64_t end) {
  thread_local Scratch scratch;
  scratch.fit(a.s.G, a.s.S, a.s.D);
  for (int64_t bh = begin; bh < end; ++bh) step_row<T>(a, bh, scratch);
}

// One multi-versioned entry per element type (function multi-versioning does not apply to templates).
LESS_CPU_CLONES void step_rows_f32(const StepPointers& a, int64_t begin, int64_t end) {
  step_rows<float>(a, begin, end);
}
LESS_CPU_CLONES void step_rows_bf16(const StepPointers& a, int64_t begin, int64_t end) {
  step_rows<c10::BFloat16>(a, begin, end);
}
LESS_CPU_CLONES void step_rows_f16(const StepPointers& a, int64_t begin, int64_t end) {
  step_rows<c10::Half>(a, begin, end);
}

at::Tensor decode_step_cpu(at::Tensor& k_slots, at::Tensor& v_slots, at::Tensor& psi_slots, at::Tensor& pos,
                           at::Tensor& scores, at::Tensor& H, at::Tensor& z, at::Tensor& next_position,
                           const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& phi_q, const std::optional<at::Tensor>& psi_k,
                           const std::optional<at::Tensor>& valid, double scale,
                           int64_t policy, int64_t budget, int64_t recent, int64_t sinks,
                           const std::optional<at::Tensor>& state_rows) {
  const StepSizes sizes = check_decode_step(
      {k_slots, v_slots, psi_slots, pos, scores, H, z, next_position, q, k, v, phi_q, psi_k, valid, state_rows},
      policy, budget, recent, sinks);
  const DecodeSizes& s = sizes.d;
  at::Tensor out = at::empty_like(q);
  const auto clamp = [](int64_t x) { return static_cast<int>(std::min<int64_t>(x, INT_MAX)); };
  StepPointers a{k_slots.data_ptr(), v_slots.data_ptr(), psi_slots.data_ptr<float>(), pos.data_ptr<int32_t>(),
                 scores.data_ptr<float>(), H.data_ptr<float>(), z.data_ptr<float>(),
                 next_position.data_ptr<int32_t>(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                 phi_q.has_value() ? phi_q->data_ptr<float>() : nullptr,
                 psi_k.has_value() ? psi_k->data_ptr<float>() : nullptr,
                 valid.has_value() ? valid->data_ptr<bool>() : nullptr, sizes.state, out.data_ptr(), s, sizes.T, 0,
                 static_cast<float>(scale), static_cast<int>(policy), clamp(budget), clamp(recent), clamp(sinks)};
  auto* rows = q.scalar_type() == at::kBFloat16 ? step_rows_bf16
               : q.scalar_type() == at::kHalf   ? step_rows_f16
                                                : step_rows_f32;
  // A row is O(G S D) work: hand each thread at least GRAIN_SIZE element operations.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, s.G * s.S * s.D));
  for (a.t = 0; a.t < sizes.T; ++a.t) {  // tokens in turn: each step sees the evictions of the one before
    at::parallel_for(0, s.B * s.Hkv, grain, [&](int64_t begin, int64_t end) { rows(a, begin, end); });
    for (int64_t b = 0; b < s.B; ++b)
      a.next_position[a.state.row(b) * a.state.next_position] += a.valid == nullptr || a.valid[b * sizes.T + a.t];
  }
  return out;
}

}  // namespace
}  // namespace less_cuda

TORCH_LIBRARY_IMPL(less_cuda, CPU, m) { m.impl("decode_step_", &less_cuda::decode_step_cpu); }
