// The CUDA kernels' host interface: raw pointers, sizes and a stream, nothing from torch. bindings.cpp (the only
// file that includes torch) validates tensors and calls these; the CPU harness (csrc/testing) calls the same
// functions on host memory. Every launch is asynchronous on `stream` (no host synchronisation, so the ops can be
// captured in CUDA graphs) and returns the launch's cudaError_t.
// Shapes and semantics: less_cuda/core/reference.py. All tensors are contiguous, except decode_step's state, whose
// rows may be a stride apart (StateRows).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "state_rows.h"

namespace less_cuda {
namespace cuda {

// Element type of q, k, v (and out) in decode_attention and decode_step, of v in state_fold.
enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
inline int64_t element_bytes(ScalarKind kind) { return kind == ScalarKind::kFloat32 ? 4 : 2; }

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

// How the slots of one (batch, KV head) are split between blocks (decode_attention and decode_step). A block
// attends over a chunk of slots for up to 8 query heads of a group (kernel instances for 4 and for 8), walking the chunk in tiles whose logits fit
// shared memory (an online softmax across tiles), so a chunk's length is not bounded by shared memory. One chunk
// and one head tile: the block finishes everything itself. Several (split-KV): every block writes a partial state
// and a second kernel merges them. The heuristic is described in docs/cuda_design.md.
struct DecodePlan {
  int64_t heads_per_block;  // query heads of a group handled by one block (<= 8)
  int64_t head_tiles;       // blocks across one group: ceil(G / heads_per_block)
  int64_t tile;             // slots per shared-memory tile
  int64_t tiles;            // ceil(S / tile), at least 1
  int64_t chunk;            // slots per block, a multiple of tile
  int64_t chunks;           // ceil(S / chunk), at least 1
  bool split;               // chunks > 1 || head_tiles > 1: partial states merged by a second kernel
  bool p_in_workspace;      // split || S > tile: per-slot p and tile maxima go through the workspace
  bool vectorized;          // 16-byte row loads (rows of whole 16-byte vectors, aligned K and V); else the generic path
};

// Any head_dim from 1 to 256: rows of whole 16-byte vectors (head_dim a multiple of 8 halves or 4 floats, 16-byte
// aligned K, V) take the vectorised kernels, the others a generic instance with element loads.
bool decode_attention_supports_head_dim(int64_t D);
// `chunk` / `tile` > 0 force those lengths (tests use them to reach the split and multi-tile paths with small
// shapes); 0 lets the heuristic choose from the shape, the device's SM count and how many blocks of the chunk
// kernel an SM holds (cudaOccupancyMaxActiveBlocksPerMultiprocessor, on the current device).
DecodePlan plan_decode_attention(const DecodeAttentionArgs& args, int num_sms, int64_t chunk, int64_t tile);
size_t decode_attention_workspace_bytes(const DecodeAttentionArgs& args, const DecodePlan& plan);
// `workspace`: decode_attention_workspace_bytes of device memory (none when the plan needs none).
// Launches: 1 (one chunk per row), 2 (split-KV: chunk kernel + combine kernel).
cudaError_t launch_decode_attention(const DecodeAttentionArgs& args, const DecodePlan& plan, void* workspace,
                                    cudaStream_t stream);
// The first kernel of the split form alone, shared with decode_step: each block writes its chunk's partial state
// (o, m, l) and p to the workspace. `exclude`: a slot never attended (-1: none); `q_stride`: elements between
// the rows of consecutive query heads in args.q (D when q is [B, Hq, D]). Batch row b's slots are row
// state.row(b) of args.k, v, pos, pools of N rows (only state's rows, k_slots, v_slots and pos are read; a row
// outside [0, N) reads row 0: the caller checks the rows). Needs plan.split; out, probs, phi_q, H and z of `args`
// are not used.
cudaError_t launch_decode_attention_partials(const DecodeAttentionArgs& args, const StateRows& state, int64_t N,
                                             const DecodePlan& plan, void* workspace, int64_t exclude,
                                             int64_t q_stride, cudaStream_t stream);
// plan_decode_attention for slots whose rows need not start 16-byte aligned (decode_step's pool): `aligned` says
// whether every row of K and V does, which the vectorised kernels need.
DecodePlan plan_decode_slots(const DecodeAttentionArgs& args, bool aligned, int num_sms, int64_t chunk, int64_t tile);

// ---------------------------------------------------------------------------------------------------------------
// The fused decode step: decode_step_
// ---------------------------------------------------------------------------------------------------------------
// The state (k_slots to next_position) is a pool of N rows: batch row b updates row state.row(b) of each tensor,
// rows state.<tensor> elements apart and contiguous inside (state_rows.h). The rows must be distinct; one outside
// [0, N) stops the kernel with __trap().
struct DecodeStepArgs {
  void* k_slots;            // [N, Hkv, S, D], q's type, in place
  void* v_slots;            // [N, Hkv, S, D], in place
  float* psi_slots;         // [N, Hkv, S, R], in place
  int32_t* pos;             // [N, Hkv, S], in place; < 0 for a free slot
  float* scores;            // [N, Hkv, S], in place
  float* H;                 // [N, Hkv, R, D], in place
  float* z;                 // [N, Hkv, R], in place
  int32_t* next_position;   // [N], in place: the position the next real token gets; advanced by the real tokens
  const void* q;            // [B, Hq, T, D]: T new tokens, stepped in turn
  const void* k;            // [B, Hkv, T, D]
  const void* v;            // [B, Hkv, T, D]
  const float* phi_q;       // [B, Hq, T, R], null when R = 0
  const float* psi_k;       // [B, Hkv, T, R], null when R = 0
  const bool* valid;        // [B, T]: false for a pad token; null when every token is real
  void* out;                // [B, Hq, T, D], q's type
  int64_t B, Hq, Hkv, S, D, R, T;  // R may be 0 (sparse policy only: phi_q, psi_k, psi_slots, H, z unused)
  ScalarKind dtype;
  float scale;
  int policy, budget, recent, sinks;
  StateRows state;          // where batch row b's state is
  int64_t N;                // rows of each state tensor (B when state.rows is null)
};

constexpr int64_t kMaxStepKvHeads = 128;  // decode_step's limit (next_position's tickets, decode_step.cu)

// decode_attention's plan for the same slots (same chunk / tile overrides).
DecodePlan plan_decode_step(const DecodeStepArgs& args, int num_sms, int64_t chunk, int64_t tile);
size_t decode_step_workspace_bytes(const DecodeStepArgs& args, const DecodePlan& plan);
// Launches per token (T tokens: T times that): 1 when the plan does not split (one block per (batch, KV head) does
// everything), 2 otherwise (the shared chunk kernel, then one finishing block per (batch, KV head) that merges,
// inserts, scores, evicts, folds). Needs Hkv <= kMaxStepKvHeads and positions below 2^24 (decode_step.cu).
cudaError_t launch_decode_step(const DecodeStepArgs& args, const DecodePlan& plan, void* workspace,
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
