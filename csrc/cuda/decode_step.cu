// decode_step_: one layer's decode step for T new tokens in turn, in place on its slots (reference.decode_step per
// token). For token t, per (batch b, KV head):
//   1. insert: slot = the lowest free slot (0 if none is free); k_slots, v_slots, psi_slots [slot] = k, v, psi_k;
//      pos[slot] = the token's position, next_position[b] plus the real tokens before it in the call, or -1 for a
//      pad token (valid false: the slot stays free); scores[slot] = 0;
//   2. attend over the occupied slots (the new token included unless it is a pad) and the low-rank state (H, z
//      before this token's fold): out = merge(sparse softmax state, (phi(q)H / phi(q)z, log phi(q)z)), q's dtype;
//   3. probs[j] = sum over the G query heads of the sparse softmax probability of slot j (none for a pad token);
//   4. H2O: scores += probs on occupied slots; if more than `budget` slots are occupied, evict the smallest
//      (eviction_key, slot): pos = -1, score = 0 (slot_row::score_and_evict, as score_and_evict.cu);
//   5. fold the victim: H[r, :] += psi_slots[victim, r] * v_slots[victim, :], z[r] += psi_slots[victim, r].
// After the last token next_position[b] has advanced by the call's real tokens.
// Layout: q, out [B, Hq, T, D]; k, v [B, Hkv, T, D]; phi_q [B, Hq, T, R], psi_k [B, Hkv, T, R] fp32 (R may be 0);
// valid [B, T] bool or none; all contiguous. The state, batch row b's at row r = state.row(b) of each tensor (rows a
// per-tensor stride apart, contiguous inside: state_rows.h; a row outside [0, N) traps, see token_position):
// k_slots, v_slots [N, Hkv, S, D] (fp32 / fp16 / bf16; D 64/128/256 vectorised, any other D up to 256 generic);
// psi_slots [N, Hkv, S, R], scores [N, Hkv, S], H [N, Hkv, R, D], z [N, Hkv, R] fp32; pos [N, Hkv, S],
// next_position [N] int32. Above, "row b" of a state tensor means its row r.
//
// How the attention is split so that it can be spread over blocks: the chunk pass (attention::attend_chunk) attends
// over the slots occupied BEFORE the insert, leaving out slot 0 (the one slot the new token may overwrite, when no
// slot is free). The finishing block then merges in two single-slot states, slot 0 (unless the token takes it) and
// the new token (q . k computed from the input k), writes the token into its slot, builds probs (each single slot's
// probability lands in its slot), scores, evicts and folds. Nothing a block reads is written by another block of
// the same launch, except next_position (see token_position).
//
// Thread mapping and launches per layer and token (T tokens: T times these, stream-ordered):
//   - plan not split (B * Hkv blocks fill the GPU, G <= 8): ONE launch, decode_step_kernel: a block of 4 warps per
//     (b, KV head) runs attend_chunk over all S slots (tiles with an online softmax, p in shared memory when S fits
//     one tile), then finish_step on the same block.
//   - split: TWO launches. decode_attention's chunk kernel (launch_decode_attention_partials, shared, slot 0 left
//     out) writes each chunk's partial state and p; decode_step_finish_kernel, one block of 512 threads per
//     (b, KV head), merges the chunks (per-(head, chunk) and per-(head, tile) weights computed once, in place in
//     the workspace) and runs finish_step.
// finish_step: warps over heads (final_head_states: final state, weights, phi(q) . z), threads over G x D
// (write_out), over slots (build_probs; slot_row::score_and_evict's two passes, both reductions lanes then warps),
// over R x D (fold_victim: one writer per element).
//
// Bytes per token: K and V once (2 * B * Hkv * S * D * sizeof(T)); pos (4 * B * Hkv * S, read three times: the
// free slot and two eviction passes, the last two from L1/L2), scores read and written (8 * B * Hkv * S); q, out,
// the new token (k, v, psi) and its slot's row; phi_q, z, H read once per group; on eviction the victim's v and psi
// and H, z read and written (8 * B * Hkv * R * (D + 1)). With more than one tile per row, p goes through the
// workspace (8 * B * Hq * S written and read back); split-KV adds the partial states (4 * B * Hq * chunks * (D + 2)).
#include <cstdio>

#include "cuda/attention_block.cuh"
#include "cuda/slot_row.cuh"

namespace less_cuda {
namespace cuda {
namespace {

using namespace attention;

// The finishing kernel runs only when the plan splits: mostly with fewer (batch, KV head) rows than SMs, one block
// per SM, so a block takes as many threads as fit 128 registers (1024 would spill), and its passes over the slots
// take half the dependent iterations of 256 threads. (Groups over 8 heads split with any number of rows; then 16
// warps per SM remain.)
constexpr int kFinishThreads = 512;
constexpr size_t kFinishSmemBudget = 48 * 1024;

// The sparse state of a row split over chunks (decode_step_finish_kernel): the chunks' partial states in the
// workspace. The weights against the final state overwrite the chunk and tile maxima in place: one block owns
// the row, and each value is read by the lane that overwrites it.
struct ChunksInWorkspace {
  float* chunk_ml;    // [G][chunks][2] of the row's first head
  const float* o;     // [G][chunks][dim]
  float* tile_m;      // [G][tiles]
  const float* p;     // [G][S]
  int64_t chunks, tiles, tile, S, dim;

  __device__ __forceinline__ OnlineSoftmax state(int64_t g) const {
    return reduce_chunk_states(chunk_ml + g * chunks * 2, chunks);
  }
  __device__ __forceinline__ void set_reference(int64_t g, float M, float L) {
    for (int64_t c = threadIdx.x % 32; c < chunks; c += 32) {
      float* m = chunk_ml + (g * chunks + c) * 2;
      *m = chunk_weight(*m, M);
    }
    for (int64_t t = threadIdx.x % 32; t < tiles; t += 32)
      tile_m[g * tiles + t] = tile_weight(tile_m[g * tiles + t], M, L);
  }
  __device__ __forceinline__ float o_sum(int64_t g, int64_t d) const {
    float sum = 0.f;
    for (int64_t c = 0; c < chunks; ++c) sum += o[(g * chunks + c) * dim + d] * chunk_ml[(g * chunks + c) * 2];
    return sum;
  }
  template <int kBlock>
  __device__ __forceinline__ void probs(int64_t heads, int64_t slots, float* out) const {
    row_probs<kBlock>(p, S, tile_m, tiles, 0, tile, heads, 0, slots, out);
  }
};

// The position of token t of batch row b: next_position[b] plus the real tokens before it in the call, or -1 for a
// pad token. Blocks of the call's last token also advance next_position[b] by the call's real tokens, without any
// block waiting for another: each of the row's Hkv blocks takes a ticket (adds kPositionTicket, above the position
// bits) and reads the position from the bits below; the block that arrives last writes the advanced value. So
// Hkv <= 128, and positions must stay below 2^24 (as eviction_key's float comparison needs): a next_position
// above 2^24 - T stops the kernel with __trap() (a launch failure the host sees at its next synchronisation),
// as the CPU op refuses it (checks.cpp). The tickets start at bit 25, so every next_position this check can meet
// while advancing (at most 2^24) is read back exactly instead of aliasing a ticket. The tickets count on batch
// rows having distinct state rows (the op's contract): a shared row would get 2 * Hkv tickets.
constexpr unsigned kPositionTicket = 1u << 25;
constexpr int kMaxPosition = 1 << 24;
static_assert(kMaxStepKvHeads * uint64_t{kPositionTicket} <= uint64_t{1} << 32, "tickets must fit 32 bits");

// token_position also checks batch row b's state row, which only the CPU op can check on the host: a row outside
// [0, N) stops the kernel here. Until then the block has read row 0 in its place (pool_row) and written no state:
// every thread passes a barrier after thread 0 runs this and before the block's first write to the state.
__device__ int token_position(const DecodeStepArgs& a, int64_t b, int64_t t) {
  const int64_t r = a.state.row(b);
  if (r < 0 || r >= a.N) {
    printf("less_cuda: decode_step_: state_rows[%lld] = %lld is outside the state's %lld rows\n",
           static_cast<long long>(b), static_cast<long long>(r), static_cast<long long>(a.N));
    __trap();
  }
  const bool* valid = a.valid != nullptr ? a.valid + b * a.T : nullptr;
  int before = 0, real_tokens = 0;
  for (int64_t i = 0; i < a.T; ++i) {
    const int real = valid == nullptr || valid[i] ? 1 : 0;
    before += i < t ? real : 0;
    real_tokens += real;
  }
  int32_t* const position = a.next_position + r * a.state.next_position;
  int base;
  if (t + 1 < a.T) {
    base = *position;  // nobody writes it before the last token's launch
  } else {
    unsigned* next = reinterpret_cast<unsigned*>(position);
    const unsigned ticket = atomicAdd(next, kPositionTicket);
    base = static_cast<int>(ticket % kPositionTicket);
    if (ticket / kPositionTicket == static_cast<unsigned>(a.Hkv - 1))
      atomicExch(next, static_cast<unsigned>(base + real_tokens));
  }
  if (base < 0 || base > kMaxPosition - a.T) {
    printf("less_cuda: decode_step_: next_position[%lld] = %d is outside [0, 2^24 - T] with T = %lld\n",
           static_cast<long long>(r), base, static_cast<long long>(a.T));
    __trap();
  }
  return valid == nullptr || valid[t] ? base + before : kEmptySlot;
}

// What token t's step touches in row bh (= b * Hkv + KV head): the KV head's slots, H and z in state row
// state.row(b), and the token's rows of q, out, phi_q [B, Hq, T, *] (the group's first head; heads T rows apart) and
// of k, v, psi_k [B, Hkv, T, *].
template <typename T>
struct StepRow {
  const DecodeStepArgs* a;
  int64_t b, h, G, S, dim, R;  // computed once for all the helpers (G is a 64-bit division)
  const T* q;
  T* out;
  const float* phi;      // null when R = 0
  const T* k_new;
  const T* v_new;
  const float* psi_new;  // null when R = 0

  static __device__ __forceinline__ StepRow at(const DecodeStepArgs& a, int64_t bh, int64_t t) {
    const int64_t G = a.Hq / a.Hkv, S = a.S, dim = a.D, R = a.R;
    const int64_t head0 = bh * G;  // b * Hq + kv head * G
    StepRow row;
    row.a = &a;
    row.b = bh / a.Hkv;
    row.h = bh % a.Hkv;
    row.G = G;
    row.S = S;
    row.dim = dim;
    row.R = R;
    row.q = static_cast<const T*>(a.q) + (head0 * a.T + t) * dim;
    row.out = static_cast<T*>(a.out) + (head0 * a.T + t) * dim;
    row.phi = R > 0 ? a.phi_q + (head0 * a.T + t) * R : nullptr;
    row.k_new = static_cast<const T*>(a.k) + (bh * a.T + t) * dim;
    row.v_new = static_cast<const T*>(a.v) + (bh * a.T + t) * dim;
    row.psi_new = R > 0 ? a.psi_k + (bh * a.T + t) * R : nullptr;
    return row;
  }

  // The KV head's state in row state.row(b) (psi_slots, H, z only when R > 0: else they are empty, their strides
  // meaningless). Each phase of the step reads the row from state_rows again (its barriers make the compiler reload
  // it): a loaded row is not uniform to the compiler, as one derived from blockIdx is, and seven pointers held in
  // registers through the step made the 4-head kernels spill.
  __device__ __forceinline__ int64_t row_offset(int64_t stride) const { return pool_row(a->state, a->N, b) * stride; }
  __device__ __forceinline__ T* k_slots() const {
    return static_cast<T*>(a->k_slots) + row_offset(a->state.k_slots) + h * S * dim;
  }
  __device__ __forceinline__ T* v_slots() const {
    return static_cast<T*>(a->v_slots) + row_offset(a->state.v_slots) + h * S * dim;
  }
  __device__ __forceinline__ float* psi_slots() const {
    return a->psi_slots + row_offset(a->state.psi_slots) + h * S * R;
  }
  __device__ __forceinline__ int32_t* pos() const { return a->pos + row_offset(a->state.pos) + h * S; }
  __device__ __forceinline__ float* scores() const { return a->scores + row_offset(a->state.scores) + h * S; }
  __device__ __forceinline__ float* H() const { return a->H + row_offset(a->state.H) + h * R * dim; }
  __device__ __forceinline__ float* z() const { return a->z + row_offset(a->state.z) + h * R; }
};

// Per head (warps over heads): the final softmax state, the chunk state with the single slots merged in (slot 0 when
// `slot0`, the new token when `fresh`), and phi(q) . z, into hs; `sparse` computes its weights against that state.
template <typename T, int kBlock, typename Sparse>
__device__ __forceinline__ void final_head_states(const DecodeStepArgs& a, const StepRow<T>& row, bool slot0,
                                                  bool fresh, Sparse& sparse, float* hs) {
  constexpr int kBlockWarps = kBlock / 32;
  const int64_t G = row.G, dim = row.dim, R = row.R;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t g = warp; g < G; g += kBlockWarps) {
    OnlineSoftmax st = sparse.state(g);
    const T* q = row.q + g * a.T * dim;
    const float s0 = slot0 ? warp_logit(q, row.k_slots(), dim, a.scale) : -INFINITY;
    const float sn = fresh ? warp_logit(q, row.k_new, dim, a.scale) : -INFINITY;
    if (slot0) st.combine(OnlineSoftmax{s0, 1.f});
    if (fresh) st.combine(OnlineSoftmax{sn, 1.f});
    const float den = R > 0 ? lowrank_den(row.phi + g * a.T * R, row.z(), R) : 0.f;
    sparse.set_reference(g, st.m, st.l);
    if (lane == 0) {
      float* h = hs + g * kHeadScalars;
      h[kHeadTotalM] = st.m;
      h[kHeadTotalL] = st.l;
      h[kHeadDen] = den;
      h[kHeadLogit0] = s0;
      h[kHeadLogitNew] = sn;
    }
  }
}

// out (threads over G x dim): the final sparse state merged with the low-rank state, H and z as they were before
// this step's fold. Needs final_head_states' hs and weights (after a barrier).
template <typename T, int kBlock, typename Sparse>
__device__ __forceinline__ void write_out(const DecodeStepArgs& a, const StepRow<T>& row, bool slot0, bool fresh,
                                          const Sparse& sparse, const float* hs) {
  const int64_t G = row.G, dim = row.dim, R = row.R;
  for (int64_t idx = threadIdx.x; idx < G * dim; idx += kBlock) {
    const int64_t g = idx / dim, d = idx % dim;
    const float* h = hs + g * kHeadScalars;
    const float M = h[kHeadTotalM];
    float o = sparse.o_sum(g, d);
    if (slot0) o += chunk_weight(h[kHeadLogit0], M) * to_float(row.v_slots()[d]);
    if (fresh) o += chunk_weight(h[kHeadLogitNew], M) * to_float(row.v_new[d]);
    const float* phi_row = R > 0 ? row.phi + g * a.T * R : nullptr;
    row.out[g * a.T * dim + d] =
        from_float<T>(finish_output(o, M, h[kHeadTotalL], h[kHeadDen], phi_row, R > 0 ? row.H() : nullptr, d, R,
                                    dim));
  }
}

// The row's probs (group-summed over G heads) from the chunk's p, then the single slots' own: the new token's lands
// in `slot`, slot 0's (when `slot0`) in slot 0. All threads of the block or none must call it (it has a barrier).
template <int kBlock, typename Sparse>
__device__ __forceinline__ void build_probs(int64_t G, int64_t S, int slot, bool slot0, const Sparse& sparse,
                                            const float* hs, float* probs) {
  sparse.template probs<kBlock>(G, S, probs);
  __syncthreads();
  if (threadIdx.x == 0) {
    float p_new = 0.f, p0 = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const float* h = hs + g * kHeadScalars;
      p_new += tile_weight(h[kHeadLogitNew], h[kHeadTotalM], h[kHeadTotalL]);
      p0 += tile_weight(h[kHeadLogit0], h[kHeadTotalM], h[kHeadTotalL]);
    }
    probs[slot] = p_new;
    if (slot0) probs[0] = p0;
  }
}

// Writes the token into `slot` with a zero score; a pad token (position -1) leaves the slot free.
template <typename T, int kBlock>
__device__ __forceinline__ void insert_token(const StepRow<T>& row, int slot, int position) {
  const int64_t dim = row.dim, R = row.R;
  for (int64_t d = threadIdx.x; d < dim; d += kBlock) {
    row.k_slots()[slot * dim + d] = row.k_new[d];
    row.v_slots()[slot * dim + d] = row.v_new[d];
  }
  for (int64_t r = threadIdx.x; r < R; r += kBlock) row.psi_slots()[slot * R + r] = row.psi_new[r];
  if (threadIdx.x == 0) {
    row.pos()[slot] = position;
    row.scores()[slot] = 0.f;
  }
}

// Folds the victim into H, z: its row is intact, since eviction only marks the slot free. One writer per element.
template <typename T, int kBlock>
__device__ __forceinline__ void fold_victim(const StepRow<T>& row, int victim) {
  const int64_t dim = row.dim, R = row.R;
  const float* psi = row.psi_slots() + victim * R;
  const T* v_victim = row.v_slots() + victim * dim;
  for (int64_t idx = threadIdx.x; idx < R * dim; idx += kBlock)
    row.H()[idx] += psi[idx / dim] * to_float(v_victim[idx % dim]);
  for (int64_t r = threadIdx.x; r < R; r += kBlock) row.z()[r] += psi[r];
}

// Steps 1-5 of token t for row bh, once the chunk pass is done. `sparse`: the row's chunk state (ChunkInShared or
// ChunksInWorkspace); hs: [G][kHeadScalars] shared memory; probs: where the row's probs are built (p's head-0 row,
// overwritten). Every thread of the block calls it.
template <typename T, int kBlock, typename Sparse>
__device__ void finish_step(const DecodeStepArgs& a, int64_t bh, int64_t t, Sparse& sparse, float* hs, float* probs) {
  const int64_t b = bh / a.Hkv;
  const StepRow<T> row = StepRow<T>::at(a, bh, t);
  __shared__ int position_shared;
  if (threadIdx.x == 0) position_shared = token_position(a, b, t);

  // Where the token goes; which single slots join the chunk state: slot 0 unless the token takes it (the chunk
  // pass left it out), and the token itself unless it is a pad.
  const int slot = slot_row::first_free_slot<kBlock>(row.pos(), row.S);  // its barriers also publish position_shared
  const int position = position_shared;
  const bool slot0 = slot != 0;  // then slot 0 is occupied: a free slot 0 would have been the first free one
  const bool fresh = position >= 0;

  final_head_states<T, kBlock>(a, row, slot0, fresh, sparse, hs);
  __syncthreads();
  write_out<T, kBlock>(a, row, slot0, fresh, sparse, hs);
  // A pad token's attention is no evidence: then no probs are built and no score changes.
  if (fresh) build_probs<kBlock>(row.G, row.S, slot, slot0, sparse, hs, probs);
  // Slot 0's row, read by write_out, is overwritten here only when the token takes slot 0 (and then was not read).
  insert_token<T, kBlock>(row, slot, position);
  __syncthreads();

  const int victim = slot_row::score_and_evict<kBlock>(row.scores(), row.pos(), fresh ? probs : nullptr, row.S,
                                                       a.policy, a.budget, a.recent, a.sinks);
  if (victim >= 0 && row.R > 0) fold_victim<T, kBlock>(row, victim);
}

// One launch for token t's whole step: a block per (b, KV head) attends over all its slots, then finishes.
template <typename T, int D, int H>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<D, H>)
    decode_step_kernel(DecodeStepArgs a, DecodePlan plan, Workspace ws, int64_t t) {
  const int64_t G = a.Hq / a.Hkv, S = a.S, dim = a.D;
  const int64_t bh = blockIdx.x;
  const int64_t head0 = bh * G;
  const int64_t h = bh % a.Hkv, r = pool_row(a.state, a.N, bh / a.Hkv);  // checked before any write: token_position
  __shared__ float hs[H * kHeadScalars];
  LESS_DYNAMIC_SHARED(float, smem);

  ChunkView view{};
  view.q = static_cast<const T*>(a.q) + (head0 * a.T + t) * dim;
  view.q_stride = a.T * dim;
  view.k = static_cast<const T*>(a.k_slots) + r * a.state.k_slots + h * S * dim;
  view.v = static_cast<const T*>(a.v_slots) + r * a.state.v_slots + h * S * dim;
  view.pos = a.pos + r * a.state.pos + h * S;
  view.heads = static_cast<int>(G);
  view.rows = static_cast<int>(S);
  view.dim = static_cast<int>(dim);
  view.exclude = 0;
  view.tile = static_cast<int>(plan.tile);
  view.scale = a.scale;
  if (plan.p_in_workspace) {
    view.p_out = ws.p + head0 * S;
    view.p_stride = S;
    view.tile_m_out = ws.tile_m + head0 * plan.tiles;
    view.tile_m_stride = plan.tiles;
  }
  const float* o = attend_chunk<T, D, H>(view, hs, smem);
  float* p = plan.p_in_workspace ? ws.p + head0 * S : smem;
  ChunkInShared sparse{o, hs, p, plan.p_in_workspace ? S : plan.tile,
                       plan.p_in_workspace ? ws.tile_m + head0 * plan.tiles : nullptr, plan.tiles, plan.tile, dim};
  finish_step<T, kThreads>(a, bh, t, sparse, hs, p);
}

// Split form, second launch: one block per (b, KV head) merges the chunk partials and finishes token t's step.
template <typename T>
__global__ void __launch_bounds__(kFinishThreads, 1)  // 1: ptxas would otherwise spill to fit 2 blocks per SM
    decode_step_finish_kernel(DecodeStepArgs a, DecodePlan plan, Workspace ws, int64_t t) {
  const int64_t G = a.Hq / a.Hkv, S = a.S, dim = a.D;
  const int64_t bh = blockIdx.x;
  const int64_t head0 = bh * G;
  LESS_DYNAMIC_SHARED(float, hs);  // [G][kHeadScalars]
  ChunksInWorkspace sparse{ws.chunk_ml + head0 * plan.chunks * 2, ws.o + head0 * plan.chunks * dim,
                           ws.tile_m + head0 * plan.tiles, ws.p + head0 * S, plan.chunks, plan.tiles, plan.tile,
                           S, dim};
  finish_step<T, kFinishThreads>(a, bh, t, sparse, hs, ws.p + head0 * S);
}

template <typename T, int D, int H>
cudaError_t launch_single(const DecodeStepArgs& a, const DecodePlan& plan, const Workspace& ws, cudaStream_t stream) {
  const auto kernel = decode_step_kernel<T, D, H>;
  const size_t smem = chunk_smem_bytes(plan, a.D);
  for (int64_t t = 0; t < a.T; ++t) {
    LESS_LAUNCH(kernel, static_cast<unsigned>(a.B * a.Hkv), kThreads, smem, stream)(a, plan, ws, t);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_split(const DecodeStepArgs& a, const DecodePlan& plan, void* workspace, cudaStream_t stream) {
  const Workspace ws = carve_workspace(workspace, a.B, a.Hq, a.S, a.D, plan);
  const size_t smem = sizeof(float) * kHeadScalars * static_cast<size_t>(a.Hq / a.Hkv);
  if (smem > kFinishSmemBudget) return cudaErrorInvalidValue;  // G beyond any model's (over a thousand)
  const auto kernel = decode_step_finish_kernel<T>;
  for (int64_t t = 0; t < a.T; ++t) {
    // Token t's queries: rows T * D apart in q [B, Hq, T, D].
    const DecodeAttentionArgs chunks{static_cast<const T*>(a.q) + t * a.D, a.k_slots, a.v_slots, a.pos, nullptr,
                                     nullptr, nullptr, nullptr, nullptr, a.B, a.Hq, a.Hkv, a.S, a.D, 0, a.dtype,
                                     a.scale};
    cudaError_t error =
        launch_decode_attention_partials(chunks, a.state, a.N, plan, workspace, /*exclude=*/0, a.T * a.D, stream);
    if (error != cudaSuccess) return error;
    LESS_LAUNCH(kernel, static_cast<unsigned>(a.B * a.Hkv), kFinishThreads, smem, stream)(a, plan, ws, t);
    error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_for_type(const DecodeStepArgs& a, const DecodePlan& plan, void* workspace, cudaStream_t stream) {
  if (plan.split) return launch_split<T>(a, plan, workspace, stream);
  const Workspace ws = carve_workspace(workspace, a.B, a.Hq, a.S, a.D, plan);
  LESS_DISPATCH_ROW_LAYOUT(plan.vectorized, a.D, D,
                           LESS_DISPATCH_BLOCK_HEADS(plan, H, return launch_single<T, D, H>(a, plan, ws, stream)));
}

}  // namespace

// The occupancy that sizes a split is the chunk kernel's, which is what runs when the plan splits. The vectorised
// kernels need every K and V row 16-byte aligned: a pool's row strides must keep the base pointers' alignment.
DecodePlan plan_decode_step(const DecodeStepArgs& a, int num_sms, int64_t chunk, int64_t tile) {
  DecodeAttentionArgs slots{};
  slots.k = a.k_slots;
  slots.v = a.v_slots;
  slots.B = a.B;
  slots.Hq = a.Hq;
  slots.Hkv = a.Hkv;
  slots.S = a.S;
  slots.D = a.D;
  slots.dtype = a.dtype;
  const int64_t bytes = element_bytes(a.dtype);
  const bool aligned = is_aligned16(a.k_slots) && is_aligned16(a.v_slots) && a.state.k_slots * bytes % 16 == 0 &&
                       a.state.v_slots * bytes % 16 == 0;
  return plan_decode_slots(slots, aligned, num_sms, chunk, tile);
}

size_t decode_step_workspace_bytes(const DecodeStepArgs& a, const DecodePlan& plan) {
  return sizeof(float) * workspace_layout(a.B, a.Hq, a.S, a.D, plan, nullptr, nullptr);
}

cudaError_t launch_decode_step(const DecodeStepArgs& a, const DecodePlan& plan, void* workspace,
                               cudaStream_t stream) {
  if (a.B == 0 || a.Hkv == 0 || a.Hq == 0 || a.T == 0) return cudaSuccess;
  // N >= 1: pool_row's stand-in row 0 must exist.
  if (!decode_attention_supports_head_dim(a.D) || a.S < 1 || a.Hkv > kMaxStepKvHeads || a.N < 1)
    return cudaErrorInvalidValue;
  LESS_DISPATCH_SCALAR(a.dtype, T, return launch_for_type<T>(a, plan, workspace, stream));
}

}  // namespace cuda
}  // namespace less_cuda
