// less_cuda::feature_maps on CPU: phi(q) and psi(k) of one layer in one call (LayerFeatureMaps.phi / .psi in
// less_cuda/core/feature_maps.py, which stays the differentiable form that training uses). At decode the feature maps run
// once per layer and token on a few rows, where a chain of small torch ops costs more than their arithmetic.
//
// Per row x [D] of head h: y = gelu(gelu(x W1[h]) W2[h]) (exact, erf-based GELU), W1 [D,E], W2 [E,R];
//   phi = |y|;   psi = |a + (a I[h]) * s2[h]| with a = |s1[h]| * y, I [R,R], s1, s2 [R].
// Layout, contiguous: q [B,Hq,T,D], k [B,Hkv,T,D] (fp32, bf16 or fp16); weights fp32: phi_w1 [Hq,D,E],
// phi_w2 [Hq,E,R], psi_w1 [Hkv,D,E], psi_w2 [Hkv,E,R], psi_scale [Hkv,1,R], psi_interaction [Hkv,R,R],
// psi_interaction_scale [Hkv,1,R]. Returns phi [B,Hq,T,R], psi [B,Hkv,T,R] fp32.
//
// Parallel mapping: at::parallel_for over the B*(Hq+Hkv)*T rows (phi rows first); a row is D axpys of length E
// and E axpys of length R into thread-local buffers, so each output element has one writer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu/simd.h"

namespace less_cuda {
namespace {

float gelu(float x) { return 0.5f * x * (1.f + std::erf(x * static_cast<float>(M_SQRT1_2))); }

// out [R] = gelu(gelu(x W1) W2) for one row x [D].
void head_mlp_row(const float* x, const float* w1, const float* w2, int64_t D, int64_t E, int64_t R, float* hidden,
                  float* out) {
  std::fill(hidden, hidden + E, 0.f);
  for (int64_t d = 0; d < D; ++d) simd::axpy(x[d], w1 + d * E, hidden, E);
  std::fill(out, out + R, 0.f);
  for (int64_t e = 0; e < E; ++e) simd::axpy(gelu(hidden[e]), w2 + e * R, out, R);
  for (int64_t r = 0; r < R; ++r) out[r] = gelu(out[r]);
}

std::tuple<at::Tensor, at::Tensor> feature_maps_cpu(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& phi_w1, const at::Tensor& phi_w2,
                                                    const at::Tensor& psi_w1, const at::Tensor& psi_w2,
                                                    const at::Tensor& psi_scale, const at::Tensor& psi_interaction,
                                                    const at::Tensor& psi_interaction_scale) {
  const FeatureMapSizes s = check_feature_maps(q, k, phi_w1, phi_w2, psi_w1, psi_w2, psi_scale, psi_interaction,
                                               psi_interaction_scale);
  const int64_t B = s.B, Hq = s.Hq, Hkv = s.Hkv, T = s.T, D = s.D, E = s.E, R = s.R;
  const at::Tensor qf = q.to(at::kFloat).contiguous(), kf = k.to(at::kFloat).contiguous();
  at::Tensor phi = at::empty({B, Hq, T, R}, qf.options());
  at::Tensor psi = at::empty({B, Hkv, T, R}, qf.options());
  const int64_t phi_rows = B * Hq * T, rows = phi_rows + B * Hkv * T;
  const float *q_ptr = qf.data_ptr<float>(), *k_ptr = kf.data_ptr<float>();
  float *phi_ptr = phi.data_ptr<float>(), *psi_ptr = psi.data_ptr<float>();
  const float *phi_first = phi_w1.data_ptr<float>(), *phi_second = phi_w2.data_ptr<float>();
  const float *psi_first = psi_w1.data_ptr<float>(), *psi_second = psi_w2.data_ptr<float>();
  const float *scale = psi_scale.data_ptr<float>(), *inter = psi_interaction.data_ptr<float>(),
              *inter_scale = psi_interaction_scale.data_ptr<float>();
  // Threads only pay off past a few hundred thousand multiply-adds: a decode call (a dozen rows) stays on one.
  const int64_t grain = std::max<int64_t>(1, 8 * at::internal::GRAIN_SIZE / std::max<int64_t>(1, D * E + E * R));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> hidden(E), a(R);
    for (const auto row : c10::irange(begin, end)) {
      if (row < phi_rows) {
        const int64_t h = row / T % Hq;
        float* out = phi_ptr + row * R;
        head_mlp_row(q_ptr + row * D, phi_first + h * D * E, phi_second + h * E * R, D, E, R, hidden.data(), out);
        for (int64_t r = 0; r < R; ++r) out[r] = std::abs(out[r]);
        continue;
      }
      const int64_t krow = row - phi_rows, h = krow / T % Hkv;
      head_mlp_row(k_ptr + krow * D, psi_first + h * D * E, psi_second + h * E * R, D, E, R, hidden.data(),
                   a.data());
      for (int64_t r = 0; r < R; ++r) a[r] *= std::abs(scale[h * R + r]);
      float* out = psi_ptr + krow * R;
      for (int64_t s = 0; s < R; ++s) {
        float mixed = 0.f;
        for (int64_t r = 0; r < R; ++r) mixed += a[r] * inter[(h * R + r) * R + s];
        out[s] = std::abs(a[s] + mixed * inter_scale[h * R + s]);
      }
    }
  });
  return {phi, psi};
}

}  // namespace
}  // namespace less_cuda

TORCH_LIBRARY_IMPL(less_cuda, CPU, m) { m.impl("feature_maps", &less_cuda::feature_maps_cpu); }
