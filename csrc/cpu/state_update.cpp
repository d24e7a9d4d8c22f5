// less_cuda::state_fold and less_cuda::state_update_ on CPU: what N tokens add to the rank-R state,
// dH = sum_n mask_n psi_n^T v_n and dz = sum_n mask_n psi_n (reference.state_fold). state_fold returns them,
// zero-initialised; state_update_ adds them into H, z in place. Both run the same accumulate kernel.
//
// Layout, all contiguous: psi [B,Hkv,N,R] fp32, v [B,Hkv,N,D] in T (fp32, bf16 or fp16), mask [B,Hkv,N] bool or
// none; H [B,Hkv,R,D] fp32, z [B,Hkv,R] fp32.
//
// Parallel mapping: at::parallel_for over the B*Hkv rows; one thread owns a row's H and z and adds its tokens in
// order n = 0..N-1, so each element has one writer and the sum does not depend on the thread count. The inner
// loop is an axpy over contiguous D into the row of H, which stays in cache (R*D*4 bytes).
//
// Bytes per call: reads B*Hkv*N*(4R + D*sizeof(T) + 1); reads and writes 4*B*Hkv*R*(D+1) of H, z.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu/simd.h"
#include "cpu/slot_row.h"

namespace less_cuda {
namespace {

template <typename T>
void accumulate_rows(const FoldSizes& s, const float* psi, const T* v, const bool* mask, float* H, float* z) {
  const int64_t N = s.N, R = s.R, D = s.D;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, N * R * D));
  at::parallel_for(0, s.B * s.Hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> v_n(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      float* H_row = H + bh * R * D;
      float* z_row = z + bh * R;
      for (int64_t n = bh * N; n < (bh + 1) * N; ++n) {
        if (mask && !mask[n]) continue;
        simd::to_float(v + n * D, v_n.data(), D);
        fold_token(H_row, z_row, psi + n * R, v_n.data(), R, D);
      }
    }
  });
}

void accumulate(const FoldSizes& s, const at::Tensor& psi, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                at::Tensor& H, at::Tensor& z) {
  const bool* mask_ptr = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  LESS_DISPATCH_KV_TYPES(v.scalar_type(), "less_cuda::state_update", [&] {
    accumulate_rows<scalar_t>(s, psi.data_ptr<float>(), v.data_ptr<scalar_t>(), mask_ptr, H.data_ptr<float>(),
                              z.data_ptr<float>());
  });
}

std::tuple<at::Tensor, at::Tensor> state_fold_cpu(const at::Tensor& psi, const at::Tensor& v,
                                                  const std::optional<at::Tensor>& mask) {
  const FoldSizes s = check_state_fold(psi, v, mask);
  at::Tensor dH = at::zeros({s.B, s.Hkv, s.R, s.D}, psi.options());
  at::Tensor dz = at::zeros({s.B, s.Hkv, s.R}, psi.options());
  accumulate(s, psi, v, mask, dH, dz);
  return {dH, dz};
}

void state_update_cpu(at::Tensor& H, at::Tensor& z, const at::Tensor& psi, const at::Tensor& v,
                      const std::optional<at::Tensor>& mask) {
  const FoldSizes s = check_state_update(H, z, psi, v, mask);
  accumulate(s, psi, v, mask, H, z);
}

}  // namespace
}  // namespace less_cuda

TORCH_LIBRARY_IMPL(less_cuda, CPU, m) {
  m.impl("state_fold", &less_cuda::state_fold_cpu);
  m.impl("state_update_", &less_cuda::state_update_cpu);
}
