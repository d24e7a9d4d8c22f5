// Registers the CUDA kernels (csrc/cuda/*.cu) for the LESS ops' CUDA dispatch key. This is the only CUDA file that
// includes torch: it validates arguments with the shared checks (csrc/checks.h), allocates outputs and the
// split-KV workspace through torch's caching allocator, and launches on the current stream of the tensors' device.
// Nothing here waits for the GPU, so the ops can be captured in CUDA graphs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <climits>
#include <mutex>
#include <unordered_map>

#include "checks.h"
#include "cuda/kernels.h"

namespace less_cuda {
namespace {

cuda::ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cuda::ScalarKind::kFloat16;
    case at::kBFloat16: return cuda::ScalarKind::kBFloat16;
    default: return cuda::ScalarKind::kFloat32;  // the checks admit only these three
  }
}

// The split-KV heuristic needs the device's SM count; asked once per device (an attribute query, no sync).
int sm_count(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::unordered_map<int, int> counts;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = counts.find(device);
  if (found != counts.end()) return found->second;
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  counts[device] = count;
  return count;
}

const float* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

int clamp_to_int(int64_t x) { return static_cast<int>(std::min<int64_t>(x, INT_MAX)); }

// Workspace through torch's caching allocator (no synchronisation, graph-capturable).
at::Tensor workspace_for(size_t bytes, const at::Tensor& like) {
  return bytes > 0 ? at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte)) : at::Tensor();
}

void check_launch_shape(const DecodeSizes& s, const cuda::DecodePlan& plan, const char* op) {
  TORCH_CHECK(s.B * s.Hkv * plan.head_tiles <= INT_MAX && plan.chunks <= 65535 && s.S <= INT_MAX &&
                  s.B * s.Hq + s.B * s.Hkv * s.S <= INT_MAX,
              "less_cuda: ", op, " shape too large for one launch: B=", s.B, ", Hkv=", s.Hkv, ", S=", s.S);
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const at::Tensor& pos, const std::optional<at::Tensor>& phi_q,
                                                         const std::optional<at::Tensor>& H,
                                                         const std::optional<at::Tensor>& z, double scale) {
  const DecodeSizes s = check_decode_attention(q, k, v, pos, phi_q, H, z);
  // 64, 128 and 256 with 16-byte aligned K and V take the vectorised kernels; any other head_dim up to 256 (or
  // unaligned K, V) the generic instance.
  TORCH_CHECK(cuda::decode_attention_supports_head_dim(s.D),
              "less_cuda: the CUDA decode_attention supports head_dim 1 to 256, got ", s.D);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);
  at::Tensor probs = at::empty({s.B, s.Hkv, s.S}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, probs.zero_()};  // no query head: no probability mass
  const cuda::DecodeAttentionArgs args{q.data_ptr(), k.data_ptr(), v.data_ptr(), pos.data_ptr<int32_t>(),
                                       optional_ptr(phi_q), optional_ptr(H), optional_ptr(z), out.data_ptr(),
                                       probs.data_ptr<float>(), s.B, s.Hq, s.Hkv, s.S, s.D, s.R,
                                       scalar_kind(q.scalar_type()), static_cast<float>(scale)};
  const cuda::DecodePlan plan = cuda::plan_decode_attention(args, sm_count(q.device().index()), 0, 0);
  check_launch_shape(s, plan, "decode_attention");
  at::Tensor workspace = workspace_for(cuda::decode_attention_workspace_bytes(args, plan), q);
  C10_CUDA_CHECK(cuda::launch_decode_attention(args, plan, workspace.defined() ? workspace.data_ptr() : nullptr,
                                               c10::cuda::getCurrentCUDAStream()));
  return {out, probs};
}

at::Tensor decode_step_cuda(at::Tensor& k_slots, at::Tensor& v_slots, at::Tensor& psi_slots, at::Tensor& pos,
                            at::Tensor& scores, at::Tensor& H, at::Tensor& z, at::Tensor& next_position,
                            const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& phi_q, const std::optional<at::Tensor>& psi_k,
                            const std::optional<at::Tensor>& valid, double scale, int64_t policy, int64_t budget,
                            int64_t recent, int64_t sinks, const std::optional<at::Tensor>& state_rows) {
  const StepSizes sizes = check_decode_step(
      {k_slots, v_slots, psi_slots, pos, scores, H, z, next_position, q, k, v, phi_q, psi_k, valid, state_rows},
      policy, budget, recent, sinks);
  const DecodeSizes& s = sizes.d;
  TORCH_CHECK(cuda::decode_attention_supports_head_dim(s.D),
              "less_cuda: the CUDA decode_step_ supports head_dim 1 to 256, got ", s.D);
  TORCH_CHECK(s.G <= 1024, "less_cuda: the CUDA decode_step_ supports up to 1024 query heads per KV head, got ", s.G);
  // next_position is advanced on the device by tickets above its low 25 bits (csrc/cuda/decode_step.cu); a value
  // above 2^24 - T, which only the CPU op can check on the host, stops the kernel with a launch failure, as does a
  // state row outside the pool. state_rows stays on the device: its rows' distinctness is the caller's promise.
  TORCH_CHECK(s.Hkv <= cuda::kMaxStepKvHeads, "less_cuda: the CUDA decode_step_ supports up to ",
              cuda::kMaxStepKvHeads, " KV heads, got ", s.Hkv);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);
  if (q.numel() == 0) return out;
  TORCH_CHECK(sizes.N > 0, "less_cuda: state_rows index a state of 0 rows");
  const cuda::DecodeStepArgs args{k_slots.data_ptr(), v_slots.data_ptr(), psi_slots.data_ptr<float>(),
                                  pos.data_ptr<int32_t>(), scores.data_ptr<float>(), H.data_ptr<float>(),
                                  z.data_ptr<float>(), next_position.data_ptr<int32_t>(), q.data_ptr(), k.data_ptr(),
                                  v.data_ptr(), optional_ptr(phi_q), optional_ptr(psi_k),
                                  valid.has_value() ? valid->data_ptr<bool>() : nullptr, out.data_ptr(), s.B, s.Hq,
                                  s.Hkv, s.S, s.D, s.R, sizes.T, scalar_kind(q.scalar_type()),
                                  static_cast<float>(scale), static_cast<int>(policy), clamp_to_int(budget),
                                  clamp_to_int(recent), clamp_to_int(sinks), sizes.state, sizes.N};
  const cuda::DecodePlan plan = cuda::plan_decode_step(args, sm_count(q.device().index()), 0, 0);
  check_launch_shape(s, plan, "decode_step_");
  at::Tensor workspace = workspace_for(cuda::decode_step_workspace_bytes(args, plan), q);
  C10_CUDA_CHECK(cuda::launch_decode_step(args, plan, workspace.defined() ? workspace.data_ptr() : nullptr,
                                          c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor score_and_evict_cuda(at::Tensor& scores, at::Tensor& pos, const at::Tensor& probs, int64_t policy,
                                int64_t budget, int64_t recent, int64_t sinks) {
  const EvictSizes s = check_score_and_evict(scores, pos, probs, policy, budget, recent, sinks);
  TORCH_CHECK(s.B * s.Hkv <= INT_MAX, "less_cuda: score_and_evict_ has too many rows for one launch");
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor victim = at::empty({s.B, s.Hkv}, scores.options().dtype(at::kLong));
  // Positions are int32, so limits beyond INT_MAX behave as INT_MAX.
  const cuda::ScoreAndEvictArgs args{scores.data_ptr<float>(), pos.data_ptr<int32_t>(), probs.data_ptr<float>(),
                                     victim.data_ptr<int64_t>(), s.B * s.Hkv, s.S, static_cast<int>(policy),
                                     clamp_to_int(budget), clamp_to_int(recent), clamp_to_int(sinks)};
  C10_CUDA_CHECK(cuda::launch_score_and_evict(args, c10::cuda::getCurrentCUDAStream()));
  return victim;
}

void fold(const at::Tensor& H, const at::Tensor& z, const at::Tensor& psi, const at::Tensor& v,
          const std::optional<at::Tensor>& mask, const FoldSizes& s, bool accumulate) {
  TORCH_CHECK(s.B * s.Hkv <= INT_MAX, "less_cuda: state_fold has too many rows for one launch");
  const c10::cuda::CUDAGuard guard(v.device());
  const bool* mask_ptr = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  const cuda::StateFoldArgs args{psi.data_ptr<float>(), v.data_ptr(), mask_ptr, H.data_ptr<float>(),
                                 z.data_ptr<float>(), s.B * s.Hkv, s.N, s.R, s.D, scalar_kind(v.scalar_type()),
                                 accumulate};
  C10_CUDA_CHECK(cuda::launch_state_fold(args, c10::cuda::getCurrentCUDAStream()));
}

std::tuple<at::Tensor, at::Tensor> state_fold_cuda(const at::Tensor& psi, const at::Tensor& v,
                                                   const std::optional<at::Tensor>& mask) {
  const FoldSizes s = check_state_fold(psi, v, mask);
  at::Tensor dH = at::empty({s.B, s.Hkv, s.R, s.D}, psi.options());
  at::Tensor dz = at::empty({s.B, s.Hkv, s.R}, psi.options());
  fold(dH, dz, psi, v, mask, s, /*accumulate=*/false);
  return {dH, dz};
}

void state_update_cuda(at::Tensor& H, at::Tensor& z, const at::Tensor& psi, const at::Tensor& v,
                       const std::optional<at::Tensor>& mask) {
  fold(H, z, psi, v, mask, check_state_update(H, z, psi, v, mask), /*accumulate=*/true);
}

}  // namespace
}  // namespace less_cuda

TORCH_LIBRARY_IMPL(less_cuda, CUDA, m) {
  m.impl("decode_attention", &less_cuda::decode_attention_cuda);
  m.impl("score_and_evict_", &less_cuda::score_and_evict_cuda);
  m.impl("state_fold", &less_cuda::state_fold_cuda);
  m.impl("state_update_", &less_cuda::state_update_cuda);
  m.impl("decode_step_", &less_cuda::decode_step_cuda);
}
