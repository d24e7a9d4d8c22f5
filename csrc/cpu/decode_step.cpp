// less_cuda::decode_step_ on CPU: one layer's whole decode step (reference.decode_step), in place on its slots.
// Per (batch row b, KV head h): write the new token into the lowest free slot, attend over the occupied slots plus
// the low-rank state, add the group-summed probabilities to the H2O scores (not for a pad token), evict at most
// one token when more than `budget` are held, and fold the victim's psi, v into H, z.
//
// T new tokens are stepped in turn (one parallel pass each); a pad token (valid false) is written into the free
// slot as a free slot (pos -1), adds no score and evicts nothing; next_position advances by the real tokens.
//
// Layout, all contiguous: k_slots, v_slots [B,Hkv,S,D] and q [B,Hq,T,D], k, v [B,Hkv,T,D] in T (fp32, bf16,
// fp16); psi_slots [B,Hkv,S,R], scores [B,Hkv,S], H [B,Hkv,R,D], z [B,Hkv,R], phi_q [B,Hq,T,R], psi_k [B,Hkv,T,R]
// fp32 or none when R = 0; pos [B,Hkv,S], next_position [B] int32; valid [B,T] bool or none. Returns out
// [B,Hq,T,D].
//
// Parallel mapping: one at::parallel_for over the B*Hkv rows; a thread owns a row and all G of its query heads, so
// each K/V slot is read once and every written element has one writer (results do not depend on the thread
// count). Within a row: the K pass computes the logits of two occupied slots for four query heads per sweep over
// D (eight independent FMA chains); a vectorised exp turns them into probabilities; the V pass accumulates p * v
// four slots at a time, loading each V block once for the group; scores, eviction and the fold follow from the
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

template <typename T>
LESS_INLINE void step_row(const StepPointers& a, int64_t bh, Scratch& w) {
  const int64_t G = a.s.G, S = a.s.S, D = a.s.D, R = a.s.R, Hkv = a.s.Hkv;
  const int64_t b = bh / Hkv;
  T* k_slots = static_cast<T*>(a.k_slots) + bh * S * D;
  T* v_slots = static_cast<T*>(a.v_slots) + bh * S * D;
  float* psi_slots = a.psi_slots + bh * S * R;
  int32_t* pos = a.pos + bh * S;
  float* scores = a.scores + bh * S;
  const int64_t tokens = a.T, t = a.t;
  const bool real = a.valid == nullptr || a.valid[b * tokens + t];
  const int32_t position = real ? a.next_position[b] : kEmptySlot;  // a pad token is written as a free slot

  // 1. Insert into the lowest free slot (slot 0 if none is free, as the reference's argmax).
  int64_t slot = 0;
  while (slot < S && pos[slot] >= 0) ++slot;
  if (slot == S) slot = 0;
  std::copy_n(static_cast<const T*>(a.k) + (bh * tokens + t) * D, D, k_slots + slot * D);
  std::copy_n(static_cast<const T*>(a.v) + (bh * tokens + t) * D, D, v_slots + slot * D);
  std::copy_n(a.psi_k + (bh * tokens + t) * R, R, psi_slots + slot * R);
  pos[slot] = position;
  scores[slot] = 0.f;

  // 2. K pass: scaled logits of the occupied slots for the G heads, -inf for free slots; two slots at a time.
  const int64_t padded_heads = (G + kHeadTile - 1) / kHeadTile * kHeadTile;
  float* q = w.q.data();
  for (int64_t g = 0; g < G; ++g)
    simd::to_float(static_cast<const T*>(a.q) + ((bh * G + g) * tokens + t) * D, q + g * D, D);
  for (int64_t g = 0; g < G; ++g) simd::permute16<T>(q + g * D, D, /*inverse=*/false);
  for (int64_t i = 0; i < G * D; ++i) q[i] *= a.scale;
  std::fill(q + G * D, q + padded_heads * D, 0.f);
  int32_t* occupied = w.occupied.data();
  int64_t n = 0;
  for (int64_t j = 0; j < S; ++j)
    if (pos[j] >= 0) occupied[n++] = static_cast<int32_t>(j);
  float* logits = w.logits.data();
  std::fill(logits, logits + G * S, -INFINITY);
  for (int64_t i = 0; i < n; i += 2) {
    const int64_t j0 = occupied[i], j1 = i + 1 < n ? occupied[i + 1] : j0;
    for (int64_t u = i + kPrefetchAhead; u < std::min(n, i + kPrefetchAhead + 2); ++u)
      prefetch_row(k_slots + occupied[u] * D, D);
    for (int64_t g0 = 0; g0 < G; g0 += kHeadTile) {
      const f8 r = logits_2x4(q + g0 * D, k_slots + j0 * D, k_slots + j1 * D, D);
      for (int64_t t = 0; t < kHeadTile && g0 + t < G; ++t) {
        logits[(g0 + t) * S + j0] = r[t];
        logits[(g0 + t) * S + j1] = r[kHeadTile + t];
      }
    }
  }
  float* lse = w.lse.data();
  for (int64_t g = 0; g < G; ++g) lse[g] = softmax_in_place(logits + g * S, S);

  // 3. V pass: o_g = sum_j p_gj v_j (normalised sparse state), kVRows slots at a time.
  float* o = w.o.data();
  float* weights = w.weights.data();
  std::fill(o, o + G * D, 0.f);
  for (int64_t i = 0; i < n; i += kVRows) {
    const T* v_rows[kVRows];
    for (int64_t u = i + kPrefetchAhead; u < std::min(n, i + kPrefetchAhead + kVRows); ++u)
      prefetch_row(v_slots + occupied[u] * D, D);
    for (int u = 0; u < kVRows; ++u) {
      const bool live = i + u < n;  // past the end: weight 0 on a real row, so nothing stale is read
      const int64_t j = occupied[live ? i + u : i];
      v_rows[u] = v_slots + j * D;
      for (int64_t g = 0; g < G; ++g) weights[g * kVRows + u] = live ? logits[g * S + j] : 0.f;
    }
    accumulate_rows(v_rows, weights, o, G, D);
  }
  float* row = w.row.data();

  // 4. Merge with the low-rank state (H, z before this step's fold) and write out.
  T* out = static_cast<T*>(a.out);
  const float* H = a.H + bh * R * D;
  const float* z = a.z + bh * R;
  for (int64_t g = 0; g < G; ++g) {
    float* og = o + g * D;
    simd::permute16<T>(og, D, /*inverse=*/true);
    if (R > 0) {
      const float* phi = a.phi_q + ((bh * G + g) * tokens + t) * R;
      float den = 0.f;
      for (int64_t r = 0; r < R; ++r) den += phi[r] * z[r];
      const MergeWeights mw = merge_weights(lse[g], normaliser_lse(den));
      const float lr_scale = mw.b * normaliser_inv(den);
      for (int64_t d = 0; d < D; ++d) og[d] *= mw.a;
      for (int64_t r = 0; r < R; ++r) simd::axpy(lr_scale * phi[r], H + r * D, og, D);
    }
    simd::from_float(og, out + ((bh * G + g) * tokens + t) * D, D);
  }

  // 5. Scores (not for a pad token: its attention is no evidence), then at most one eviction.
  float* probs = nullptr;  // Λ and pad tokens add no score
  if (a.policy == kPolicyH2O && real) {
    probs = w.probs.data();
    std::fill(probs, probs + S, 0.f);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < S; ++j) probs[j] += logits[g * S + j];
  }
  const int64_t best = score_and_evict_row(scores, pos, probs, S, a.policy, a.budget, a.recent, a.sinks);
  if (best < 0) return;

  // 6. Fold the victim (its psi and v are still in the freed slot).
  if (R == 0) return;
  simd::to_float(v_slots + best * D, row, D);
  fold_token(a.H + bh * R * D, a.z + bh * R, psi_slots + best * R, row, R, D);
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
                           int64_t policy, int64_t budget, int64_t recent, int64_t sinks) {
  const StepSizes sizes = check_decode_step(
      {k_slots, v_slots, psi_slots, pos, scores, H, z, next_position, q, k, v, phi_q, psi_k, valid}, policy, budget,
      recent, sinks);
  const DecodeSizes& s = sizes.d;
  at::Tensor out = at::empty_like(q);
  const auto clamp = [](int64_t x) { return static_cast<int>(std::min<int64_t>(x, INT_MAX)); };
  StepPointers a{k_slots.data_ptr(), v_slots.data_ptr(), psi_slots.data_ptr<float>(), pos.data_ptr<int32_t>(),
                 scores.data_ptr<float>(), H.data_ptr<float>(), z.data_ptr<float>(),
                 next_position.data_ptr<int32_t>(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                 phi_q.has_value() ? phi_q->data_ptr<float>() : nullptr,
                 psi_k.has_value() ? psi_k->data_ptr<float>() : nullptr,
                 valid.has_value() ? valid->data_ptr<bool>() : nullptr, out.data_ptr(), s, sizes.T, 0,
                 static_cast<float>(scale), static_cast<int>(policy), clamp(budget), clamp(recent), clamp(sinks)};
  auto* rows = q.scalar_type() == at::kBFloat16 ? step_rows_bf16
               : q.scalar_type() == at::kHalf   ? step_rows_f16
                                                : step_rows_f32;
  // A row is O(G S D) work: hand each thread at least GRAIN_SIZE element operations.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, s.G * s.S * s.D));
  for (a.t = 0; a.t < sizes.T; ++a.t) {  // tokens in turn: each step sees the evictions of the one before
    at::parallel_for(0, s.B * s.Hkv, grain, [&](int64_t begin, int64_t end) { rows(a, begin, end); });
    for (int64_t b = 0; b < s.B; ++b) a.next_position[b] += a.valid == nullptr || a.valid[b * sizes.T + a.t];
  }
  return out;
}

}  // namespace
}  // namespace less_cuda

TORCH_LIBRARY_IMPL(less_cuda, CPU, m) { m.impl("decode_step_", &less_cuda::decode_step_cpu); }
