// The CUDA kernels' host interface: raw pointers, sizes and a stream, nothing from torch. bindings.cpp (the only
// file that includes torch) validates tensors and calls these; the CPU harness (csrc/testing) calls the same
// functions on host memory. Every launch is asynchronous on `stream` (no host synchronisation, so the ops can be
// captured in CUDA graphs) and returns the launch's cudaError_t.
// Shapes and semantics: less_cuda/reference.py. All tensors are contiguous.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace less_cuda {
namespace cuda {

// Element type of q, k, v (and out) in decode_attention, of v in state_fold.
enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------------------------------------------------------
// (c) decode_attention
// ---------------------------------------------------------------------------------------------------------------
struct DecodeAttentionArgs {
  const void* q;         // [B, Hq, D]
  const void* k;         // [B, Hkv, S, D]
  const void* v;         // [B, Hkv, S, D]
  const int32_t* pos;    // [B, Hkv, S], < 0 for a free slot
  const float* phi_q;    // [B, Hq, R], or null together with H and z (sparse-only attention)
  const float* H;        // [B, Hkv, R, D]
  const float* z;        // [B, Hkv, R]
  void* out;             // [B, Hq, D], q's type
  float* probs;          // [B, Hkv, S]
  int64_t B, Hq, Hkv, S, D, R;  // R = 0 without a low-rank state
  ScalarKind dtype;
  float scale;
};

// How the slots of one (batch, KV head) are split between blocks. One chunk: the block finishes everything
// itself. Several (or query groups wider than one block handles): every block writes a partial state and a
// second kernel merges them (split-KV). The heuristic is described in docs/cuda_design.md.
struct DecodePlan {
  int64_t heads_per_block;  // query heads of a group handled by one block (<= 8)
  int64_t head_tiles;       // blocks across one group: ceil(G / heads_per_block)
  int64_t chunk;            // slots per block
  int64_t chunks;           // ceil(S / chunk), at least 1
  bool split;               // chunks > 1 || head_tiles > 1: partial states merged by a second kernel
};

bool decode_attention_supports_head_dim(int64_t D);  // 64, 128 or 256
// `chunk` > 0 forces that chunk length (tests use it to reach the split path with small shapes); 0 lets the
// heuristic choose from the shape and the device's SM count.
DecodePlan plan_decode_attention(const DecodeAttentionArgs& args, int num_sms, int64_t chunk);
size_t decode_attention_workspace_bytes(const DecodeAttentionArgs& args, const DecodePlan& plan);
// `workspace`: decode_attention_workspace_bytes of device memory (none when the plan does not split).
cudaError_t launch_decode_attention(const DecodeAttentionArgs& args, const DecodePlan& plan, void* workspace,
                                    cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------------
// (a) score_and_evict_
// ---------------------------------------------------------------------------------------------------------------
struct ScoreAndEvictArgs {
  float* scores;        // [B, Hkv, S], in place
  int32_t* pos;         // [B, Hkv, S], in place
  const float* probs;   // [B, Hkv, S]
  int64_t* victim;      // [B, Hkv]
  int64_t rows, S;      // rows = B * Hkv
  int policy, budget, recent, sinks;
};
cudaError_t launch_score_and_evict(const ScoreAndEvictArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------------
// (b) state_fold / state_update_
// ---------------------------------------------------------------------------------------------------------------
struct StateFoldArgs {
  const float* psi;     // [B, Hkv, N, R]
  const void* v;        // [B, Hkv, N, D]
  const bool* mask;     // [B, Hkv, N], or null: every token
  float* H;             // [B, Hkv, R, D]: dH, or H itself when accumulating
  float* z;             // [B, Hkv, R]
  int64_t rows, N, R, D;  // rows = B * Hkv
  ScalarKind dtype;     // of v
  bool accumulate;      // true: H += dH, z += dz (state_update_); false: H = dH, z = dz (state_fold)
};
cudaError_t launch_state_fold(const StateFoldArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace less_cuda
