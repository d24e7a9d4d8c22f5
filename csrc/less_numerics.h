// Numerics shared by the CPU and CUDA kernels (and the CPU harness that runs the CUDA source).
// Torch-free on purpose: nvcc compiles it fast and the harness compiles it with g++.
//
// An attention partial result is a state (o, lse). LESS's low-rank term is one more state,
// (phi(q)H / phi(q)z, log phi(q)z); the final output is the merge of the sparse state and that one.
// The same formulas live in less_cuda/core/reference.py (merge_states, normalise) and core/ranking.py (eviction_key).
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(LESS_HARNESS)
#define LESS_HD __host__ __device__
#else
#define LESS_HD
#endif

namespace less_cuda {

constexpr int kPolicyH2O = 0;     // heavy hitters + recent window
constexpr int kPolicyLambda = 1;  // sinks + recent window
constexpr int kEmptySlot = -1;    // pos value of a free slot

// Weights (w_a, w_b), summing to 1, that merge two states: o = w_a * o_a + w_b * o_b.
// An empty state has lse = -inf and weight 0; two empty states give (0, 0), i.e. o = 0.
struct MergeWeights {
  float a;
  float b;
};

LESS_HD inline MergeWeights merge_weights(float lse_a, float lse_b) {
  const float m = fmaxf(lse_a, lse_b);
  if (!(m > -INFINITY)) return {0.f, 0.f};
  const float wa = expf(lse_a - m);
  const float wb = expf(lse_b - m);
  const float inv = 1.f / (wa + wb);
  return {wa * inv, wb * inv};
}

// The low-rank state from its unnormalised sums: o = num * normaliser_inv(den), lse = normaliser_lse(den).
// den == 0 (nothing folded yet) is the empty state, so an all-zero H, z gives exactly softmax attention.
LESS_HD inline float normaliser_inv(float den) { return den > 0.f ? 1.f / den : 0.f; }
LESS_HD inline float normaliser_lse(float den) { return den > 0.f ? logf(den) : -INFINITY; }

// Running softmax over a stream of logits: max m and sum l of exp(s - m). lse = m + log(l).
struct OnlineSoftmax {
  float m = -INFINITY;
  float l = 0.f;

  // Accounts for logit s; returns the factor by which earlier accumulations must be rescaled.
  LESS_HD inline float push(float s, float* p) {
    const float m_new = fmaxf(m, s);
    const float rescale = expf(m - m_new);  // exp(-inf) = 0 on the first push
    *p = expf(s - m_new);
    l = l * rescale + *p;
    m = m_new;
    return rescale;
  }
  // Merges another running softmax (split-KV, warp reductions); returns the rescale factors of (this, other).
  LESS_HD inline MergeWeights combine(const OnlineSoftmax& o) {
    const float m_new = fmaxf(m, o.m);
    if (!(m_new > -INFINITY)) return {1.f, 1.f};
    const float ra = expf(m - m_new), rb = expf(o.m - m_new);
    l = l * ra + o.l * rb;
    m = m_new;
    return {ra, rb};
  }
  LESS_HD inline float lse() const { return l > 0.f ? m + logf(l) : -INFINITY; }
};

// Eviction priority: smaller goes first, +inf is never evicted (see reference.eviction_key).
// H2O: the slot's score if its position is outside the `recent` newest; Λ: its position if it is not a sink.
// Positions are compared as floats, exact below 2^24 tokens.
LESS_HD inline float eviction_key(int policy, float score, int pos, int newest, int recent, int sinks) {
  if (pos < 0) return INFINITY;
  if (policy == kPolicyH2O) return pos <= newest - recent ? score : INFINITY;
  return pos >= sinks ? static_cast<float>(pos) : INFINITY;
}

// Deterministic argmin order: lower key first, ties to the lower slot index (torch.argmin's rule).
LESS_HD inline bool evicts_before(float key_a, int slot_a, float key_b, int slot_b) {
  return key_a < key_b || (key_a == key_b && slot_a < slot_b);
}

}  // namespace less_cuda
