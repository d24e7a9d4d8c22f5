// less_cuda::decode_attention on CPU: one LESS decode step for every query head (reference.decode_attention).
//
// Layout, all contiguous: q [B,Hq,D], k, v [B,Hkv,S,D] in T (fp32, bf16 or fp16); pos [B,Hkv,S] int32, < 0 for a
// free slot; phi_q [B,Hq,R], H [B,Hkv,R,D], z [B,Hkv,R] fp32, or none. Returns out [B,Hq,D] in T and probs
// [B,Hkv,S] fp32. Query head h reads KV head h / G, so a KV head's G query heads are the contiguous rows
// q[b, h*G : (h+1)*G].
//
// Parallel mapping: at::parallel_for over the B*Hkv (batch, KV head) rows. One thread owns a row and all G of its
// query heads, so each K/V slot is read once (not G times), every output element has one writer and the result
// does not depend on the thread count. Within a row, pass 1 writes the logits of the occupied slots for the G
// heads into an fp32 buffer [G,S] and turns them into probabilities; pass 2 accumulates p * v over contiguous D.
//
// Bytes per call: reads 2*B*Hkv*S_occupied*D*sizeof(T) of K/V (the bulk), B*Hq*D*sizeof(T) of q, 4*B*Hkv*S of pos
// and, with a state, 4*(B*Hq*R + B*Hkv*R*(D+1)); writes B*Hq*D*sizeof(T) + 4*B*Hkv*S.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu/simd.h"
#include "less_numerics.h"

namespace less_cuda {
namespace {

float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
  // The simd reduction lets the compiler vectorise a float sum; its order is fixed at compile time.
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename T>
void decode_rows(const DecodeSizes& s, float scale, const T* q, const T* k, const T* v, const int32_t* pos,
                 const float* phi_q, const float* H, const float* z, T* out, float* probs) {
  const int64_t G = s.G, S = s.S, D = s.D, R = s.R;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, G * S * D));
  at::parallel_for(0, s.B * s.Hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), row(D), p(G * S), o(G * D), lse(G);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int32_t* slot_pos = pos + bh * S;
      const T* k_row = k + bh * S * D;
      const T* v_row = v + bh * S * D;
      simd::to_float(q + bh * G * D, qf.data(), G * D);

      for (int64_t j = 0; j < S; ++j) {
        if (slot_pos[j] < 0) continue;  // free slots are never read: their K/V may be stale
        simd::to_float(k_row + j * D, row.data(), D);
        for (int64_t g = 0; g < G; ++g) p[g * S + j] = scale * dot(qf.data() + g * D, row.data(), D);
      }
      // Softmax per query head, in the reference's form p = exp(s - lse); a row with no slot keeps lse = -inf.
      for (int64_t g = 0; g < G; ++g) {
        float* pg = p.data() + g * S;
        float m = -INFINITY;
        for (int64_t j = 0; j < S; ++j)
          if (slot_pos[j] >= 0) m = std::max(m, pg[j]);
        float l = 0.f;
        for (int64_t j = 0; j < S; ++j)
          if (slot_pos[j] >= 0) l += std::exp(pg[j] - m);
        lse[g] = l > 0.f ? m + std::log(l) : -INFINITY;
        for (int64_t j = 0; j < S; ++j)
          if (slot_pos[j] >= 0) pg[j] = std::exp(pg[j] - lse[g]);
      }
      float* probs_row = probs + bh * S;
      for (int64_t j = 0; j < S; ++j) {
        float sum = 0.f;
        if (slot_pos[j] >= 0)
          for (int64_t g = 0; g < G; ++g) sum += p[g * S + j];
        probs_row[j] = sum;
      }

      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t j = 0; j < S; ++j) {
        if (slot_pos[j] < 0) continue;
        simd::to_float(v_row + j * D, row.data(), D);
        for (int64_t g = 0; g < G; ++g) simd::axpy(p[g * S + j], row.data(), o.data() + g * D, D);
      }

      T* out_row = out + bh * G * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* og = o.data() + g * D;
        if (R == 0) {
          for (int64_t d = 0; d < D; ++d) out_row[g * D + d] = static_cast<T>(og[d]);
          continue;
        }
        // The low-rank term is one more attention state (phi H / phi z, log phi z), merged in log space.
        const float* phi = phi_q + (bh * G + g) * R;
        const float den = dot(phi, z + bh * R, R);
        std::fill(row.begin(), row.end(), 0.f);
        for (int64_t r = 0; r < R; ++r) simd::axpy(phi[r], H + (bh * R + r) * D, row.data(), D);
        const MergeWeights w = merge_weights(lse[g], normaliser_lse(den));
        const float lr_scale = w.b * normaliser_inv(den);
        for (int64_t d = 0; d < D; ++d) out_row[g * D + d] = static_cast<T>(w.a * og[d] + lr_scale * row[d]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& pos,
                                                        const std::optional<at::Tensor>& phi_q,
                                                        const std::optional<at::Tensor>& H,
                                                        const std::optional<at::Tensor>& z, double scale) {
  const DecodeSizes s = check_decode_attention(q, k, v, pos, phi_q, H, z);
  at::Tensor out = at::empty_like(q);
  at::Tensor probs = at::empty({s.B, s.Hkv, s.S}, q.options().dtype(at::kFloat));
  const float* phi_ptr = s.R ? phi_q->data_ptr<float>() : nullptr;
  const float* H_ptr = s.R ? H->data_ptr<float>() : nullptr;
  const float* z_ptr = s.R ? z->data_ptr<float>() : nullptr;
  LESS_DISPATCH_KV_TYPES(q.scalar_type(), "less_cuda::decode_attention", [&] {
    decode_rows<scalar_t>(s, static_cast<float>(scale), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                          v.data_ptr<scalar_t>(), pos.data_ptr<int32_t>(), phi_ptr, H_ptr, z_ptr,
                          out.data_ptr<scalar_t>(), probs.data_ptr<float>());
  });
  return {out, probs};
}

}  // namespace
}  // namespace less_cuda

TORCH_LIBRARY_IMPL(less_cuda, CPU, m) { m.impl("decode_attention", &less_cuda::decode_attention_cpu); }
