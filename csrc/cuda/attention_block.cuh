// The attention machinery shared by decode_attention.cu and decode_step.cu (one implementation, two ops):
//   - attend_chunk: a block of 4 warps attends over a chunk of slots for up to H query heads of one group (H = 4
//     or 8, a template parameter, so that a group of up to 4 heads keeps half the registers of 8). The
//     chunk is walked in tiles whose logits fit shared memory, with an online softmax across tiles (running max
//     and sum per head, accumulators rescaled once per tile), so a chunk's length is not bounded by shared memory.
//     Per tile: tile_logits (K pass), tile_softmax (per head), rescale_accumulators and tile_values (V pass); then
//     reduce_lane_groups and reduce_warps sum the lanes' accumulators.
//   - the split-KV / multi-tile workspace: p = exp(s - m_tile) per (head, slot), the tile maxima, and each
//     chunk's partial state (o, m, l);
//   - the pieces that finish a row: per-(head, chunk) and per-(head, tile) weights against the final max (computed
//     once, never per slot), probs from the stored p, and the merge with the low-rank state (finish_output);
//   - the planner: head tiles, tile and chunk lengths, split or not (from the device's occupancy), vectorised or
//     generic row loads.
// Thread mapping of attend_chunk: see RowLayout and docs/cuda_design.md.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/common.cuh"

namespace less_cuda {
namespace cuda {
namespace attention {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxHeads = 8;                // query heads of a group per block (instances for 4 and 8)
constexpr int kUnroll = 4;                  // rows per lane group with loads in flight
constexpr int kGenericD = 0;                // RowLayout for any head_dim up to kMaxHeadDim, element loads
constexpr int kMaxHeadDim = 256;
constexpr int64_t kMinChunk = 128;          // the split heuristic never gives a block fewer slots
// Dynamic shared memory per block: with the static part and the 1 KiB the runtime reserves, 4 blocks fit an A100
// SM (164 KiB) and 5 an H100's (228 KiB), so shared memory never limits occupancy below what registers allow.
constexpr size_t kSmemBudget = 39 * 1024;
static_assert(kWarps == 4, "attend_chunk's warp reduction is written for 4 warps");

// How the lanes of a warp share rows of K or V. Vectorised (rows of whole 16-byte vectors, 16-byte aligned, up to
// D = 64, 128 or 256 elements: head_dim 80, 96, 112 take the D = 128 instance, 160 and 192 the 256 one): a row is
// split into 16-byte vectors over kLanes consecutive lanes; vector v of lane l starts at element
// (v * kLanes + l) * kVec, so each vector index is one coalesced kLanes * 16-byte segment of the row. Vectors past
// a shorter row's `dim` read nothing and count as zero.
template <typename T, int D>
struct RowLayout {
  static_assert(D > 0 && D * sizeof(T) % 16 == 0, "vectorised rows are whole 16-byte vectors");
  static constexpr int kVec = kVecElems<T>;
  static constexpr int kVecsPerRow = D / kVec;
  static constexpr int kLanes = kVecsPerRow < 32 ? kVecsPerRow : 32;  // lanes sharing one row
  static constexpr int kVecsPerLane = kVecsPerRow / kLanes;
  static constexpr int kElems = kVecsPerLane * kVec;                  // a lane's slice of a row
  static constexpr int kRowsPerWarp = 32 / kLanes;
  struct Raw {
    uint4 v[kVecsPerLane];
  };
  static __device__ __forceinline__ int column(int e, int l, int) {
    return ((e / kVec) * kLanes + l) * kVec + e % kVec;
  }
  // dim is a multiple of kVec: a vector is wholly in the row or wholly past it.
  static __device__ __forceinline__ bool valid(int e, int l, int dim) { return column(e, l, dim) < dim; }
  static __device__ __forceinline__ void load(Raw& raw, const T* row, int l, int dim) {
#pragma unroll
    for (int vi = 0; vi < kVecsPerLane; ++vi) {
      const int c = (vi * kLanes + l) * kVec;
      raw.v[vi] = c < dim ? load16(row + c) : make_uint4(0, 0, 0, 0);
    }
  }
  static __device__ __forceinline__ void clear(Raw& raw) {
#pragma unroll
    for (int vi = 0; vi < kVecsPerLane; ++vi) raw.v[vi] = make_uint4(0, 0, 0, 0);
  }
  static __device__ __forceinline__ void unpack(const Raw& raw, float* out) {
#pragma unroll
    for (int vi = 0; vi < kVecsPerLane; ++vi) unpack16(raw.v[vi], out + vi * kVec, T{});
  }
};

// Generic head_dim (rows that are not whole 16-byte vectors, such as 100 halves, or not 16-byte aligned, any
// D <= 256): a whole warp per row, element d on
// lane d % 32, so loads stay coalesced; columns past D read nothing and count as zero.
template <typename T>
struct RowLayout<T, kGenericD> {
  static constexpr int kLanes = 32;
  static constexpr int kElems = kMaxHeadDim / 32;
  static constexpr int kRowsPerWarp = 1;
  struct Raw {
    float v[kElems];
  };
  static __device__ __forceinline__ int column(int e, int l, int) { return e * 32 + l; }
  static __device__ __forceinline__ bool valid(int e, int l, int dim) { return e * 32 + l < dim; }
  static __device__ __forceinline__ void load(Raw& raw, const T* row, int l, int dim) {
#pragma unroll
    for (int e = 0; e < kElems; ++e) raw.v[e] = e * 32 + l < dim ? to_float(row[e * 32 + l]) : 0.f;
  }
  static __device__ __forceinline__ void clear(Raw& raw) {
#pragma unroll
    for (int e = 0; e < kElems; ++e) raw.v[e] = 0.f;
  }
  static __device__ __forceinline__ void unpack(const Raw& raw, float* out) {
#pragma unroll
    for (int e = 0; e < kElems; ++e) out[e] = raw.v[e];
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Planner and workspace (host)
// ---------------------------------------------------------------------------------------------------------------
LESS_HD inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The block shape of a (G, D, dtype) row: heads per block and row layout, which pick the kernel instance.
inline DecodePlan plan_block(int64_t Hq, int64_t Hkv, int64_t D, int64_t elem_bytes, bool aligned) {
  DecodePlan plan{};
  const int64_t G = Hkv > 0 ? Hq / Hkv : 0;
  plan.heads_per_block = std::max<int64_t>(1, std::min<int64_t>(G, kMaxHeads));
  plan.head_tiles = std::max<int64_t>(1, ceil_div(G, plan.heads_per_block));
  plan.vectorized = aligned && D * elem_bytes % 16 == 0;
  return plan;
}

// The instance's query heads per block: 4 for groups of up to 4, else 8.
inline int block_heads(const DecodePlan& plan) { return plan.heads_per_block <= 4 ? 4 : kMaxHeads; }

// The blocks per SM an attend_chunk kernel instance asks of ptxas (__launch_bounds__' second argument). Blocks of 4
// heads with vectorised rows up to D = 128 fit in 128 registers without spilling: 4 blocks (16 warps) per SM. The
// others get 1, which lets ptxas use the registers they need: left to itself, ptxas squeezes a kernel that needs a
// few more than 128 into 128 and spills.
template <int D, int H>
constexpr int kMinBlocksPerSm = H <= 4 && D != kGenericD && D <= 128 ? 4 : 1;

// Where the reduction [2][heads][dim] starts in a block's dynamic shared memory, after the logits [heads][tile]:
// on a 16-byte boundary, for reduce_warps' vector stores.
LESS_HD inline int64_t reduction_offset(int64_t heads, int64_t tile) { return (heads * tile + 3) / 4 * 4; }

// Completes plan_block's plan. `chunk` / `tile` > 0 force those lengths (tests reach every path with small
// shapes); 0 lets the heuristic choose. `resident`: the blocks of the row kernel the device holds at once (SMs x
// the occupancy API's blocks per SM).
inline DecodePlan plan_slots(DecodePlan plan, int64_t B, int64_t Hkv, int64_t S, int64_t D, int num_sms,
                             int64_t resident, int64_t chunk, int64_t tile) {
  // A tile's logits [heads][tile] share the block's shared memory with the output reduction [2][heads][D].
  const int64_t floats = static_cast<int64_t>(kSmemBudget / sizeof(float));
  const int64_t max_tile = std::max<int64_t>(1, (floats - 3 - 2 * plan.heads_per_block * D) / plan.heads_per_block);
  if (chunk <= 0) {
    // Split-KV only when one block per (batch, KV head, head tile) leaves SMs idle: then aim for as many blocks as
    // the device holds at once, but give no block fewer than kMinChunk slots (the combine's extra traffic must
    // stay small against a chunk).
    const int64_t blocks = B * Hkv * plan.head_tiles;
    int64_t chunks = 1;
    if (blocks > 0 && blocks < num_sms) chunks = std::min(ceil_div(resident, blocks), ceil_div(S, kMinChunk));
    chunk = ceil_div(S, std::max<int64_t>(chunks, 1));
  }
  chunk = std::max<int64_t>(chunk, 1);
  const bool forced_tile = tile > 0;
  tile = std::min(forced_tile ? std::min(tile, max_tile) : max_tile, chunk);
  const int64_t tiles_per_chunk = ceil_div(chunk, tile);
  if (!forced_tile) tile = ceil_div(chunk, tiles_per_chunk);  // balanced tiles
  plan.tile = tile;
  plan.chunk = tiles_per_chunk * tile;  // chunks start on tile boundaries
  plan.chunks = std::max<int64_t>(1, ceil_div(S, plan.chunk));
  plan.tiles = std::max<int64_t>(1, ceil_div(S, plan.tile));
  plan.split = plan.chunks > 1 || plan.head_tiles > 1;
  plan.p_in_workspace = plan.split || S > plan.tile;
  return plan;
}

// Per (batch, KV head, head g of the group): "row head" rh = (b * Hkv + kv head) * G + g = b * Hq + query head.
struct Workspace {
  float* p;         // [B, Hq, S]: exp(s - m_tile), 0 for slots not attended
  float* tile_m;    // [B, Hq, tiles]: each tile's max; a row's finishing block may turn it into the tile's weight
  float* chunk_ml;  // [B, Hq, chunks, 2]: (m, l) of each chunk's softmax; or m -> the chunk's weight, likewise
  float* o;         // [B, Hq, chunks, D]: sum over the chunk of exp(s - m_chunk) v
};

// Floats of workspace the plan needs; with `base`, also where each array starts (*ws).
inline size_t workspace_layout(int64_t B, int64_t Hq, int64_t S, int64_t D, const DecodePlan& plan, float* base,
                               Workspace* ws) {
  const int64_t heads = B * Hq;
  const int64_t p = plan.p_in_workspace ? heads * (S + plan.tiles) : 0;
  const int64_t partials = plan.split ? heads * plan.chunks * (2 + D) : 0;
  if (ws != nullptr) {
    *ws = {nullptr, nullptr, nullptr, nullptr};
    if (plan.p_in_workspace) {
      ws->p = base;
      ws->tile_m = base + heads * S;
    }
    if (plan.split) {
      ws->chunk_ml = base + p;
      ws->o = base + p + heads * plan.chunks * 2;
    }
  }
  return static_cast<size_t>(p + partials);
}

inline Workspace carve_workspace(void* workspace, int64_t B, int64_t Hq, int64_t S, int64_t D,
                                 const DecodePlan& plan) {
  Workspace ws;
  workspace_layout(B, Hq, S, D, plan, static_cast<float*>(workspace), &ws);
  return ws;
}

// ---------------------------------------------------------------------------------------------------------------
// Weights and the low-rank merge
// ---------------------------------------------------------------------------------------------------------------
// Weight of a chunk (or tile) with max m_part in a softmax whose overall max is m (0 for an empty part).
__device__ __forceinline__ float chunk_weight(float m_part, float m) {
  return m_part > -INFINITY ? expf(m_part - m) : 0.f;
}
// What turns a stored p = exp(s - m_tile) into the slot's probability in the softmax with max m and sum l.
__device__ __forceinline__ float tile_weight(float m_tile, float m, float l) {
  return chunk_weight(m_tile, m) * normaliser_inv(l);
}

// phi(q) . z for one query head, reduced over a warp; every lane gets it.
__device__ __forceinline__ float lowrank_den(const float* phi_row, const float* z_bh, int64_t R) {
  float den = 0.f;
  for (int64_t r = threadIdx.x % 32; r < R; r += 32) den += phi_row[r] * z_bh[r];
  return group_sum(den);
}

// scale * q . k for one query head and one key row, reduced over a warp (q scaled first, as in the K pass).
template <typename T>
__device__ __forceinline__ float warp_logit(const T* q, const T* k, int64_t dim, float scale) {
  float s = 0.f;
  for (int64_t d = threadIdx.x % 32; d < dim; d += 32) s += to_float(q[d]) * scale * to_float(k[d]);
  return group_sum(s);
}

// The softmax state (m, l) of one head over all chunks, merged across a warp; every lane gets it.
__device__ __forceinline__ OnlineSoftmax reduce_chunk_states(const float* chunk_ml, int64_t chunks) {
  OnlineSoftmax total;
  for (int64_t c = threadIdx.x % 32; c < chunks; c += 32)
    total.combine(OnlineSoftmax{chunk_ml[2 * c], chunk_ml[2 * c + 1]});
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    total.combine(
        OnlineSoftmax{__shfl_xor_sync(kFullMask, total.m, offset), __shfl_xor_sync(kFullMask, total.l, offset)});
  return total;
}

// Element d of one head's output: the sparse state (o_unnorm / l, lse = m + log l) merged with the low-rank
// state (phi(q) H[:, d] / den, log den) when there is one.
__device__ __forceinline__ float finish_output(float o_unnorm, float m, float l, float den, const float* phi_row,
                                               const float* H_bh, int64_t d, int64_t R, int64_t D) {
  const float o_sparse = o_unnorm * normaliser_inv(l);
  if (R == 0) return o_sparse;
  float num = 0.f;
  for (int64_t r = 0; r < R; ++r) num += phi_row[r] * H_bh[r * D + d];
  const MergeWeights w = merge_weights(OnlineSoftmax{m, l}.lse(), normaliser_lse(den));
  return w.a * o_sparse + w.b * num * normaliser_inv(den);
}

// probs[j] = sum_g p[g * p_stride + j] * w[g * w_stride + j / tile - t0] for j in [j0, j1): the group-summed
// softmax probabilities from the stored p and precomputed per-(head, tile) weights. `out` may be p's head-0 row
// (each thread reads a slot's p before it overwrites that slot); the caller synchronises afterwards.
template <int kBlock>
__device__ __forceinline__ void row_probs(const float* p, int64_t p_stride, const float* w, int64_t w_stride,
                                          int64_t t0, int64_t tile, int64_t heads, int64_t j0, int64_t j1,
                                          float* out) {
  for (int64_t j = j0 + threadIdx.x; j < j1; j += kBlock) {
    const int64_t t = j / tile - t0;
    float sum = 0.f;
    for (int64_t g = 0; g < heads; ++g) sum += p[g * p_stride + j] * w[g * w_stride + t];
    out[j] = sum;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// attend_chunk: one block, one chunk of slots, up to H query heads
// ---------------------------------------------------------------------------------------------------------------
// Per-head scalars of a block, in shared memory, [head][kHeadScalars]. After attend_chunk: kHeadM, kHeadL = the
// chunk's softmax state (max, sum). The others are working values of attend_chunk and of the finishing code.
enum HeadScalar {
  kHeadM, kHeadL,                      // the chunk's state
  kHeadRescale,                        // attend_chunk: per-tile rescale of the accumulators (tile_softmax)
  kHeadTotalM, kHeadTotalL,            // decode_step: the state with slot 0 and the new token merged in
  kHeadDen,                            // phi(q) . z
  kHeadWeightO, kHeadWeightP,          // the chunk's o and p weights against the final state
  kHeadLogit0, kHeadLogitNew,          // decode_step: logits of slot 0 and of the new token (-inf: not attended)
  kHeadScalars
};

struct ChunkView {
  const void* q;         // the block's first query head's row; heads q_stride elements apart
  int64_t q_stride;
  const void* k;         // [rows, dim]: the chunk's first slot
  const void* v;
  const int32_t* pos;    // [rows]
  int heads, rows, dim;
  int exclude;           // chunk-relative slot never attended (decode_step's slot 0), -1 for none
  int tile;
  float scale;
  float* p_out;          // workspace p of the first head at the chunk's first slot, or null: p stays in smem
  int64_t p_stride;      // between heads
  float* tile_m_out;     // workspace tile maxima of the first head at the chunk's first tile (with p_out)
  int64_t tile_m_stride;
};

// Dynamic shared memory of a block that runs attend_chunk: p [heads][tile], then the reduction [2][heads][dim].
inline size_t chunk_smem_bytes(const DecodePlan& plan, int64_t D) {
  return sizeof(float) *
         static_cast<size_t>(reduction_offset(plan.heads_per_block, plan.tile) + 2 * plan.heads_per_block * D);
}

// A lane's slices (RowLayout<T, D>::column) of one row per head, for the block's H heads: the scaled q and the V
// accumulators of attend_chunk. The helpers below take them by reference and are force-inlined, so that they stay
// in registers; H is a template parameter so that a block of 4 heads does not hold registers for 8.
template <typename T, int D, int H>
using HeadSlices = float[H][RowLayout<T, D>::kElems];

// The chunk's q, scaled once here rather than per logit (warp_logit scales q first too, so that both round alike);
// 0 for heads past c.heads.
template <typename T, int D, int H>
__device__ __forceinline__ void load_scaled_q(const ChunkView& c, HeadSlices<T, D, H>& qs) {
  using L = RowLayout<T, D>;
  const int lane = threadIdx.x % 32, l = lane % L::kLanes;
  const int heads = c.heads, dim = c.dim;
  const T* q = static_cast<const T*>(c.q);
#pragma unroll
  for (int g = 0; g < H; ++g)
#pragma unroll
    for (int e = 0; e < L::kElems; ++e)
      qs[g][e] =
          g < heads && L::valid(e, l, dim) ? to_float(q[g * c.q_stride + L::column(e, l, dim)]) * c.scale : 0.f;
}

// K pass over the tile of trows slots from t0: p[g * tile + r] = the logit of head g and slot r, -inf where the
// slot is not attended. Loop bounds are warp-uniform so that every lane takes part in the butterflies.
template <typename T, int D, int H>
__device__ __forceinline__ void tile_logits(const ChunkView& c, int t0, int trows, const HeadSlices<T, D, H>& qs,
                                            float* p) {
  using L = RowLayout<T, D>;
  constexpr int kRowsPerPass = L::kRowsPerWarp * kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / L::kLanes, l = lane % L::kLanes;
  const int heads = c.heads, dim = c.dim, tile = c.tile;
  const T* kt = static_cast<const T*>(c.k) + static_cast<int64_t>(t0) * dim;
  const int32_t* post = c.pos + t0;
  for (int base = warp * L::kRowsPerWarp; base < trows; base += kRowsPerPass * kUnroll) {
    typename L::Raw raw[kUnroll];
    bool attended[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int r = base + group + u * kRowsPerPass;
      attended[u] = r < trows && post[r] >= 0 && t0 + r != c.exclude;
      if (r < trows)
        L::load(raw[u], kt + static_cast<int64_t>(r) * dim, l, dim);
      else
        L::clear(raw[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int r = base + group + u * kRowsPerPass;
      float kf[L::kElems];
      L::unpack(raw[u], kf);
#pragma unroll
      for (int g = 0; g < H; ++g) {
        if (g >= heads) break;
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < L::kElems; ++e) s += qs[g][e] * kf[e];
        s = group_sum<L::kLanes>(s);
        if (l == 0 && r < trows) p[g * tile + r] = attended[u] ? s : -INFINITY;
      }
    }
  }
}

// Per head (one warp each): the tile's max m_t and sum; the running state (m, l) absorbs the tile, and
// hs[kHeadRescale] gets the factor that brings the accumulators to the new max. The workspace gets p = exp(s - m_t)
// (probs are built from it); shared memory gets p * exp(m_t - m_new), the V pass's weights in the running max's
// scale (with one tile the factor is exactly 1).
__device__ __forceinline__ void tile_softmax(const ChunkView& c, int t0, int trows, float* p, float* hs) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tile = c.tile;
  for (int g = warp; g < c.heads; g += kWarps) {
    float* pg = p + g * tile;
    float* h = hs + g * kHeadScalars;
    OnlineSoftmax running{h[kHeadM], h[kHeadL]};  // every lane reads it; lane 0 rewrites it below
    float m = -INFINITY;
    for (int r = lane; r < trows; r += 32) m = fmaxf(m, pg[r]);
    m = warp_max(m);
    const float to_running = chunk_weight(m, fmaxf(running.m, m));
    float sum = 0.f;
    for (int r = lane; r < trows; r += 32) {
      const float e = m > -INFINITY ? expf(pg[r] - m) : 0.f;
      pg[r] = e * to_running;
      if (c.p_out != nullptr) c.p_out[g * c.p_stride + t0 + r] = e;
      sum += e;
    }
    sum = group_sum(sum);
    __syncwarp();  // the other lanes' reads of h happen before lane 0's writes (a shuffle orders no memory)
    if (lane == 0) {
      if (c.tile_m_out != nullptr) c.tile_m_out[g * c.tile_m_stride + t0 / tile] = m;
      h[kHeadRescale] = running.combine(OnlineSoftmax{m, sum}).a;
      h[kHeadM] = running.m;
      h[kHeadL] = running.l;
    }
  }
}

// Brings the accumulators to the running max that tile_softmax has just moved.
template <typename T, int D, int H>
__device__ __forceinline__ void rescale_accumulators(int heads, const float* hs, HeadSlices<T, D, H>& acc) {
#pragma unroll
  for (int g = 0; g < H; ++g) {
    if (g >= heads) break;
    const float rescale = hs[g * kHeadScalars + kHeadRescale];
#pragma unroll
    for (int e = 0; e < RowLayout<T, D>::kElems; ++e) acc[g][e] *= rescale;
  }
}

// V pass over the tile: acc[g] += this lane's slice of sum_r p_gr v_r, in the running max's scale. Rows whose
// weights are all zero (free slots) are not loaded. The weights are read from shared memory again when they are
// used rather than held in registers across the loads (kUnroll x H registers fewer).
template <typename T, int D, int H>
__device__ __forceinline__ void tile_values(const ChunkView& c, int t0, int trows, const float* p,
                                            HeadSlices<T, D, H>& acc) {
  using L = RowLayout<T, D>;
  constexpr int kRowsPerPass = L::kRowsPerWarp * kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / L::kLanes, l = lane % L::kLanes;
  const int heads = c.heads, dim = c.dim, tile = c.tile;
  const T* vt = static_cast<const T*>(c.v) + static_cast<int64_t>(t0) * dim;
  for (int base = warp * L::kRowsPerWarp; base < trows; base += kRowsPerPass * kUnroll) {
    typename L::Raw raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int r = base + group + u * kRowsPerPass;
      bool any = false;
#pragma unroll
      for (int g = 0; g < H; ++g) any |= g < heads && r < trows && p[g * tile + r] != 0.f;
      if (any)
        L::load(raw[u], vt + static_cast<int64_t>(r) * dim, l, dim);
      else
        L::clear(raw[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int r = base + group + u * kRowsPerPass;
      if (r >= trows) break;  // warp-uniform per lane group; later rows are further past the tile
      float vf[L::kElems];
      L::unpack(raw[u], vf);
#pragma unroll
      for (int g = 0; g < H; ++g) {
        if (g >= heads) break;
        const float w = p[g * tile + r];
#pragma unroll
        for (int e = 0; e < L::kElems; ++e) acc[g][e] += w * vf[e];
      }
    }
  }
}

// Sums the accumulators of the lane groups of a warp (the rows it held) with shuffles; every lane group gets them.
template <typename T, int D, int H>
__device__ __forceinline__ void reduce_lane_groups(int heads, HeadSlices<T, D, H>& acc) {
  using L = RowLayout<T, D>;
#pragma unroll
  for (int offset = L::kLanes; offset < 32; offset *= 2)
#pragma unroll
    for (int g = 0; g < H; ++g) {
      if (g >= heads) break;
#pragma unroll
      for (int e = 0; e < L::kElems; ++e) acc[g][e] += __shfl_xor_sync(kFullMask, acc[g][e], offset);
    }
}

// red [heads][dim] = the 4 warps' sums, added in a fixed order through shared memory, (w0 + w2) + (w1 + w3), so
// that the result does not depend on scheduling; red's second half [heads][dim] is scratch. Every thread of the
// block must call it; it ends with a barrier. A vectorised lane holds whole 16-byte vectors of columns, which it
// stores as float4: consecutive lanes then fill consecutive banks (element-wise stores kVec floats apart would
// meet 4 to a bank).
template <typename T, int D, int H>
__device__ __forceinline__ void reduce_warps(const ChunkView& c, const HeadSlices<T, D, H>& acc, float* red) {
  using L = RowLayout<T, D>;
  constexpr int kStep = D == kGenericD ? 1 : 4;  // floats per shared-memory access
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / L::kLanes, l = lane % L::kLanes;
  const int heads = c.heads, dim = c.dim;
  for (int half = 1; half >= 0; --half) {  // warps 2, 3 store; then warps 0, 1 add theirs
    if (group == 0 && warp / 2 == half) {
      float* dst = red + (warp % 2) * heads * dim;
#pragma unroll
      for (int g = 0; g < H; ++g) {
        if (g >= heads) break;
#pragma unroll
        for (int e = 0; e < L::kElems; e += kStep) {
          if (!L::valid(e, l, dim)) continue;
          float* slot = dst + g * dim + L::column(e, l, dim);
          if constexpr (kStep == 4) {
            float4 sum = make_float4(acc[g][e], acc[g][e + 1], acc[g][e + 2], acc[g][e + 3]);
            if (half == 0) {
              const float4 other = *reinterpret_cast<const float4*>(slot);
              sum = make_float4(sum.x + other.x, sum.y + other.y, sum.z + other.z, sum.w + other.w);
            }
            *reinterpret_cast<float4*>(slot) = sum;
          } else {
            *slot = half == 1 ? acc[g][e] : acc[g][e] + *slot;
          }
        }
      }
    }
    __syncthreads();
  }
  for (int idx = threadIdx.x; idx < heads * dim; idx += kThreads) red[idx] += red[heads * dim + idx];
  __syncthreads();
}

// Attends over the chunk. Returns the reduced output sums o [heads][dim] (shared memory, relative to the chunk
// max); hs[g * kHeadScalars + kHeadM / kHeadL] hold each head's (m, l). When the chunk is a single tile, smem's
// first heads * tile floats hold its p = exp(s - m) (heads `tile` apart); otherwise p and the tile maxima are in the
// workspace (c.p_out, c.tile_m_out). Every thread of the block must call it; it ends with a barrier.
template <typename T, int D, int H>
__device__ float* attend_chunk(const ChunkView& c, float* hs, float* smem) {
  float* p = smem;                                         // [heads][tile]: logits, then exp(s - m_tile)
  float* red = smem + reduction_offset(c.heads, c.tile);  // [2][heads][dim]
  if (static_cast<int>(threadIdx.x) < c.heads) {
    hs[threadIdx.x * kHeadScalars + kHeadM] = -INFINITY;
    hs[threadIdx.x * kHeadScalars + kHeadL] = 0.f;
  }
  HeadSlices<T, D, H> qs;
  load_scaled_q<T, D, H>(c, qs);
  HeadSlices<T, D, H> acc = {};

  for (int t0 = 0; t0 < c.rows; t0 += c.tile) {
    const int trows = c.rows - t0 < c.tile ? c.rows - t0 : c.tile;
    __syncthreads();  // the previous tile's p has been consumed (and hs is initialised)
    tile_logits<T, D, H>(c, t0, trows, qs, p);
    __syncthreads();
    tile_softmax(c, t0, trows, p, hs);
    __syncthreads();
    rescale_accumulators<T, D, H>(c.heads, hs, acc);
    tile_values<T, D, H>(c, t0, trows, p, acc);
  }
  reduce_lane_groups<T, D, H>(c.heads, acc);
  reduce_warps<T, D, H>(c, acc, red);
  return red;
}

// ---------------------------------------------------------------------------------------------------------------
// A row finished by the block that attended its only chunk (decode_attention without split, decode_step's single
// kernel): the sparse state is the chunk's, in shared memory; p is in shared memory (one tile) or the workspace.
// ---------------------------------------------------------------------------------------------------------------
struct ChunkInShared {
  const float* o;      // [G][dim] from attend_chunk
  float* hs;           // [G][kHeadScalars]
  const float* p;      // p of head 0 (smem or workspace), heads p_stride apart
  int64_t p_stride;
  float* tile_m;       // workspace tile maxima of head 0 when p is in the workspace, heads `tiles` apart
  int64_t tiles, tile, dim;

  __device__ __forceinline__ OnlineSoftmax state(int64_t g) const {
    return {hs[g * kHeadScalars + kHeadM], hs[g * kHeadScalars + kHeadL]};
  }
  // Called by one warp per head once the head's final max M and sum L are known: the weights of the chunk's o and
  // of its p, each computed once (in place over the workspace's tile maxima when p is there).
  __device__ __forceinline__ void set_reference(int64_t g, float M, float L) {
    float* h = hs + g * kHeadScalars;
    const float m = h[kHeadM];
    if (tile_m != nullptr)
      for (int64_t t = threadIdx.x % 32; t < tiles; t += 32)
        tile_m[g * tiles + t] = tile_weight(tile_m[g * tiles + t], M, L);
    if (threadIdx.x % 32 == 0) {
      h[kHeadWeightO] = chunk_weight(m, M);
      h[kHeadWeightP] = tile_weight(m, M, L);
    }
  }
  __device__ __forceinline__ float o_sum(int64_t g, int64_t d) const {
    return o[g * dim + d] * hs[g * kHeadScalars + kHeadWeightO];
  }
  // probs of slots [0, S) into out (may be p's head-0 row), after set_reference for every head and a barrier.
  template <int kBlock>
  __device__ __forceinline__ void probs(int64_t heads, int64_t S, float* out) const {
    if (tile_m != nullptr)
      row_probs<kBlock>(p, p_stride, tile_m, tiles, 0, tile, heads, 0, S, out);
    else
      row_probs<kBlock>(p, p_stride, hs + kHeadWeightP, kHeadScalars, 0, tile, heads, 0, S, out);
  }
};

}  // namespace attention
}  // namespace cuda
}  // namespace less_cuda

// Instantiates the body, which must return, once per row layout: `D` is 64, 128 or 256 when `vectorized`
// (16-byte loads; the smallest that holds `dim`), else kGenericD (any head_dim up to kMaxHeadDim).
#define LESS_DISPATCH_ROW_LAYOUT(vectorized, dim, D, ...)          \
  if (vectorized) {                                                \
    if ((dim) <= 64) {                                             \
      constexpr int D = 64;                                        \
      __VA_ARGS__;                                                 \
    }                                                              \
    if ((dim) <= 128) {                                            \
      constexpr int D = 128;                                       \
      __VA_ARGS__;                                                 \
    }                                                              \
    if ((dim) <= 256) {                                            \
      constexpr int D = 256;                                       \
      __VA_ARGS__;                                                 \
    }                                                              \
  }                                                                \
  {                                                                \
    constexpr int D = ::less_cuda::cuda::attention::kGenericD;     \
    __VA_ARGS__;                                                   \
  }

// Instantiates the body, which must return, once per block head count `H` (4 or 8, block_heads of the plan).
#define LESS_DISPATCH_BLOCK_HEADS(plan, H, ...)                    \
  if (::less_cuda::cuda::attention::block_heads(plan) == 4) {      \
    constexpr int H = 4;                                           \
    __VA_ARGS__;                                                   \
  }                                                                \
  {                                                                \
    constexpr int H = ::less_cuda::cuda::attention::kMaxHeads;     \
    __VA_ARGS__;                                                   \
  }
