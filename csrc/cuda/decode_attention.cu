// (c) decode_attention: one decode step of LESS attention for every query head (reference.decode_attention).
//   out[b, h]  = merge of the softmax state over the occupied slots of KV head h / G and the low-rank state
//                (phi(q)H / phi(q)z, log phi(q)z), in q's dtype
//   probs[b, j] = sum over the G query heads of the group of exp(s_j - lse_sparse), fp32 (low rank not included)
// Layout: q, out [B, Hq, D]; k, v [B, Hkv, S, D] (fp32 / fp16 / bf16; D 64/128/256 vectorised, any other D up to
// 256 generic); pos, probs [B, Hkv, S]; phi_q [B, Hq, R], H [B, Hkv, R, D], z [B, Hkv, R] fp32 (optional). The
// chunk kernel, shared with decode_step, finds batch row b's k, v, pos at a state row (StateRows): row b here.
//
// Thread mapping. decode_chunk_kernel: a block of 4 warps handles one (batch, KV head, up to H = 4 or 8 query heads
// of its group, chunk of slots) with attention::attend_chunk (attention_block.cuh): tiles of slots whose logits fit
// shared memory, each with a K pass (logits), per-head statistics (one warp per head) and a V pass, and an online
// softmax across tiles, so each K/V byte is read once for the whole group however long the chunk. With one chunk
// and one head tile the block finishes the row: out = merge(sparse, low rank), probs = sum_g p_g * w_g(tile).
// Otherwise (split-KV: too few (batch, KV head) rows to fill the GPU, or G > 8) each block writes its partial
// state (o, m, l) and its p to a workspace and decode_combine_kernel merges them, parallel over heads x D for out
// (one block per query head: per-chunk weights computed once, then a weighted sum per element) and over slot
// ranges for probs (per-(head, tile) weights computed once per block, then a weighted sum per slot).
//
// Bytes per call: K and V once (2 * B * Hkv * S * D * sizeof(T)), pos and probs (8 * B * Hkv * S), q and out,
// H, z, phi_q once per group; with more than one tile per row p goes through the workspace: 8 * B * Hq * S
// (written, read back); split-KV adds 4 * B * Hq * chunks * (D + 2) for the partial states.
// Launches per call: 1 without split, 2 with.
#include <algorithm>

#include "cuda/attention_block.cuh"

namespace less_cuda {
namespace cuda {
namespace {

using namespace attention;

constexpr int64_t kProbsSlots = 2 * kThreads;  // slots per probs block of the combine kernel
constexpr size_t kCombineSmemBudget = 40 * 1024;

template <typename T, int D, int H>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<D, H>)
    decode_chunk_kernel(DecodeAttentionArgs a, StateRows state, int64_t N, DecodePlan plan, Workspace ws,
                        int64_t exclude, int64_t q_stride) {
  const int64_t G = a.Hq / a.Hkv;
  const int64_t head_tile = blockIdx.x % plan.head_tiles;
  const int64_t bh = blockIdx.x / plan.head_tiles;  // b * Hkv + kv head
  const int64_t b = bh / a.Hkv, kvh = bh % a.Hkv;
  const int64_t c = blockIdx.y;
  const int64_t g0 = head_tile * plan.heads_per_block;  // first head of the group in this block
  const int heads = static_cast<int>(G - g0 < plan.heads_per_block ? G - g0 : plan.heads_per_block);
  const int64_t begin = c * plan.chunk;
  const int rows = static_cast<int>(a.S - begin < plan.chunk ? a.S - begin : plan.chunk);
  const int64_t dim = a.D;
  const int64_t head0 = b * a.Hq + kvh * G + g0;  // row of q / out / phi_q (and workspace row head) of head g0
  const int64_t r = pool_row(state, N, b);  // the state row of k, v, pos
  __shared__ float hs[H * kHeadScalars];
  LESS_DYNAMIC_SHARED(float, smem);

  ChunkView view{};
  view.q = static_cast<const T*>(a.q) + head0 * q_stride;
  view.q_stride = q_stride;
  view.k = static_cast<const T*>(a.k) + r * state.k_slots + (kvh * a.S + begin) * dim;
  view.v = static_cast<const T*>(a.v) + r * state.v_slots + (kvh * a.S + begin) * dim;
  view.pos = a.pos + r * state.pos + kvh * a.S + begin;
  view.heads = heads;
  view.rows = rows;
  view.dim = static_cast<int>(dim);
  view.exclude = exclude >= begin && exclude < begin + rows ? static_cast<int>(exclude - begin) : -1;
  view.tile = static_cast<int>(plan.tile);
  view.scale = a.scale;
  if (plan.p_in_workspace) {
    view.p_out = ws.p + head0 * a.S + begin;
    view.p_stride = a.S;
    view.tile_m_out = ws.tile_m + head0 * plan.tiles + begin / plan.tile;
    view.tile_m_stride = plan.tiles;
  }
  const float* o = attend_chunk<T, D, H>(view, hs, smem);

  if (plan.split) {
    for (int64_t idx = threadIdx.x; idx < heads * dim; idx += kThreads) {
      const int64_t g = idx / dim, d = idx % dim;
      ws.o[((head0 + g) * plan.chunks + c) * dim + d] = o[idx];
    }
    if (static_cast<int>(threadIdx.x) < heads) {
      float* ml = ws.chunk_ml + ((head0 + threadIdx.x) * plan.chunks + c) * 2;
      ml[0] = hs[threadIdx.x * kHeadScalars + kHeadM];
      ml[1] = hs[threadIdx.x * kHeadScalars + kHeadL];
    }
    return;
  }

  // One chunk, one head tile (heads == G): the chunk's state is final. Only decode_attention gets here, whose
  // state is contiguous (r == b), so H, z and probs are indexed by bh.
  const int warp = threadIdx.x / 32;
  ChunkInShared row{o, hs, plan.p_in_workspace ? ws.p + head0 * a.S : smem,
                    plan.p_in_workspace ? a.S : plan.tile,
                    plan.p_in_workspace ? ws.tile_m + head0 * plan.tiles : nullptr,
                    plan.tiles, plan.tile, dim};
  for (int g = warp; g < heads; g += kWarps) {
    const OnlineSoftmax st = row.state(g);
    const float den = a.R > 0 ? lowrank_den(a.phi_q + (head0 + g) * a.R, a.z + bh * a.R, a.R) : 0.f;
    row.set_reference(g, st.m, st.l);
    if (threadIdx.x % 32 == 0) hs[g * kHeadScalars + kHeadDen] = den;
  }
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < heads * dim; idx += kThreads) {
    const int64_t g = idx / dim, d = idx % dim;
    const float* h = hs + g * kHeadScalars;
    const float* phi_row = a.R > 0 ? a.phi_q + (head0 + g) * a.R : nullptr;
    const float* H_bh = a.R > 0 ? a.H + bh * a.R * dim : nullptr;
    static_cast<T*>(a.out)[(head0 + g) * dim + d] =
        from_float<T>(finish_output(row.o_sum(g, d), h[kHeadM], h[kHeadL], h[kHeadDen], phi_row, H_bh, d, a.R, dim));
  }
  row.probs<kThreads>(heads, a.S, a.probs + bh * a.S);
}

// Split-KV: merges the chunks. Blocks [0, B * Hq) finish one query head's output each; the others each write the
// probs of `piece` slots of one (batch, KV head). Every block first merges the (m, l) of the chunks it needs and
// computes each (head, chunk) or (head, tile) weight once into shared memory.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    decode_combine_kernel(DecodeAttentionArgs a, DecodePlan plan, Workspace ws, int64_t piece) {
  const int64_t G = a.Hq / a.Hkv;
  const int64_t dim = a.D, chunks = plan.chunks;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* __restrict__ chunk_ml = ws.chunk_ml;
  LESS_DYNAMIC_SHARED(float, smem);

  if (blockIdx.x < a.B * a.Hq) {
    // Output of query head `head` (= workspace row head): out[d] = sum_c o_c[d] * exp(m_c - m), merged with low rank.
    const int64_t head = blockIdx.x;
    const int64_t bh = head / a.Hq * a.Hkv + head % a.Hq / G;
    const float* __restrict__ ml = chunk_ml + head * chunks * 2;
    const float* __restrict__ o_chunks = ws.o + head * chunks * dim;
    __shared__ float stats[3];  // m, l, den
    if (warp == 0) {
      const OnlineSoftmax total = reduce_chunk_states(ml, chunks);
      const float den = a.R > 0 ? lowrank_den(a.phi_q + head * a.R, a.z + bh * a.R, a.R) : 0.f;
      if (lane == 0) {
        stats[0] = total.m;
        stats[1] = total.l;
        stats[2] = den;
      }
    }
    __syncthreads();
    constexpr int kPerThread = kMaxHeadDim / kThreads;
    float o[kPerThread] = {};
    float* w = smem;  // [kThreads]: the weights of one segment of chunks
    for (int64_t c0 = 0; c0 < chunks; c0 += kThreads) {
      if (c0 + threadIdx.x < chunks) w[threadIdx.x] = chunk_weight(ml[2 * (c0 + threadIdx.x)], stats[0]);
      __syncthreads();
      const int64_t n = chunks - c0 < kThreads ? chunks - c0 : kThreads;
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int64_t d = threadIdx.x + i * kThreads;
        if (d < dim)
          for (int64_t c = 0; c < n; ++c) o[i] += o_chunks[(c0 + c) * dim + d] * w[c];
      }
      __syncthreads();
    }
    const float* phi_row = a.R > 0 ? a.phi_q + head * a.R : nullptr;
    const float* H_bh = a.R > 0 ? a.H + bh * a.R * dim : nullptr;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t d = threadIdx.x + i * kThreads;
      if (d < dim)
        static_cast<T*>(a.out)[head * dim + d] =
            from_float<T>(finish_output(o[i], stats[0], stats[1], stats[2], phi_row, H_bh, d, a.R, dim));
    }
    return;
  }

  // probs of slots [j0, j1) of row bh: sum_g p_gj * exp(m_tile - m_g) / l_g.
  const int64_t pieces = ceil_div(a.S, piece);
  const int64_t idx = blockIdx.x - a.B * a.Hq;
  const int64_t bh = idx / pieces;
  const int64_t j0 = idx % pieces * piece, j1 = j0 + piece < a.S ? j0 + piece : a.S;
  const int64_t t0 = j0 / plan.tile, nt = (j1 - 1) / plan.tile - t0 + 1;
  float* head_m = smem;           // [G]
  float* head_l = smem + G;       // [G]
  float* w = smem + 2 * G;        // [G][nt]
  for (int64_t g = warp; g < G; g += kWarps) {
    const OnlineSoftmax total = reduce_chunk_states(chunk_ml + (bh * G + g) * chunks * 2, chunks);
    if (lane == 0) {
      head_m[g] = total.m;
      head_l[g] = total.l;
    }
  }
  __syncthreads();
  const float* __restrict__ tile_m = ws.tile_m + bh * G * plan.tiles;
  for (int64_t i = threadIdx.x; i < G * nt; i += kThreads) {
    const int64_t g = i / nt, t = i % nt;
    w[i] = tile_weight(tile_m[g * plan.tiles + t0 + t], head_m[g], head_l[g]);
  }
  __syncthreads();
  row_probs<kThreads>(ws.p + bh * G * a.S, a.S, w, nt, t0, plan.tile, G, j0, j1, a.probs + bh * a.S);
}

template <typename T, int D, int H>
cudaError_t launch_chunks(const DecodeAttentionArgs& a, const StateRows& state, int64_t N, const DecodePlan& plan,
                          const Workspace& ws, int64_t exclude, int64_t q_stride, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.B * a.Hkv * plan.head_tiles), static_cast<unsigned>(plan.chunks));
  const auto chunk_kernel = decode_chunk_kernel<T, D, H>;
  LESS_LAUNCH(chunk_kernel, grid, kThreads, chunk_smem_bytes(plan, a.D), stream)(a, state, N, plan, ws, exclude,
                                                                                 q_stride);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_chunks_for_type(const DecodeAttentionArgs& a, const StateRows& state, int64_t N,
                                   const DecodePlan& plan, const Workspace& ws, int64_t exclude, int64_t q_stride,
                                   cudaStream_t stream) {
  LESS_DISPATCH_ROW_LAYOUT(plan.vectorized, a.D, D,
                           LESS_DISPATCH_BLOCK_HEADS(plan, H,
                                                     return launch_chunks<T, D, H>(a, state, N, plan, ws, exclude,
                                                                                   q_stride, stream)));
}

// Blocks of the chunk kernel instance `plan` selects that one SM holds, by the occupancy API (registers, static
// and the planner's largest dynamic shared memory).
template <typename T>
cudaError_t chunk_occupancy(const DecodePlan& plan, int64_t dim, int* blocks) {
  LESS_DISPATCH_ROW_LAYOUT(plan.vectorized, dim, D,
                           LESS_DISPATCH_BLOCK_HEADS(plan, H,
                                                     return cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                                                         blocks, decode_chunk_kernel<T, D, H>, kThreads,
                                                         kSmemBudget)));
}

// The combine's probs blocks hold G + G + G * (tiles a piece touches) floats; a piece shrinks until they fit.
int64_t probs_piece(const DecodeAttentionArgs& a, const DecodePlan& plan, size_t* smem) {
  const int64_t G = a.Hq / a.Hkv;
  int64_t piece = kProbsSlots;
  const auto bytes = [&](int64_t n) { return sizeof(float) * static_cast<size_t>(G * (2 + (n - 1) / plan.tile + 2)); };
  while (piece > 1 && bytes(piece) > kCombineSmemBudget) piece = ceil_div(piece, 2);
  *smem = std::max(bytes(piece), sizeof(float) * kThreads);
  return piece;
}

template <typename T>
cudaError_t launch_for_type(const DecodeAttentionArgs& a, const DecodePlan& plan, void* workspace,
                            cudaStream_t stream) {
  const Workspace ws = carve_workspace(workspace, a.B, a.Hq, a.S, a.D, plan);
  StateRows contiguous{};  // row b of k, v, pos [B, Hkv, S, *]
  contiguous.k_slots = contiguous.v_slots = a.Hkv * a.S * a.D;
  contiguous.pos = a.Hkv * a.S;
  const cudaError_t error = launch_chunks_for_type<T>(a, contiguous, a.B, plan, ws, -1, a.D, stream);
  if (error != cudaSuccess || !plan.split) return error;
  size_t smem = 0;
  const int64_t piece = probs_piece(a, plan, &smem);
  if (smem > kCombineSmemBudget) return cudaErrorInvalidValue;  // G beyond any model's (thousands of heads)
  const int64_t blocks = a.B * a.Hq + a.B * a.Hkv * ceil_div(a.S, piece);
  LESS_LAUNCH(decode_combine_kernel<T>, static_cast<unsigned>(blocks), kThreads, smem, stream)(a, plan, ws, piece);
  return cudaGetLastError();
}

}  // namespace

bool decode_attention_supports_head_dim(int64_t D) { return D >= 1 && D <= kMaxHeadDim; }

DecodePlan plan_decode_attention(const DecodeAttentionArgs& a, int num_sms, int64_t chunk, int64_t tile) {
  return plan_decode_slots(a, is_aligned16(a.k) && is_aligned16(a.v), num_sms, chunk, tile);
}

DecodePlan plan_decode_slots(const DecodeAttentionArgs& a, bool aligned, int num_sms, int64_t chunk, int64_t tile) {
  const DecodePlan block = plan_block(a.Hq, a.Hkv, a.D, element_bytes(a.dtype), aligned);
  int blocks_per_sm = 1;
  auto occupancy = [&]() -> cudaError_t {
    LESS_DISPATCH_SCALAR(a.dtype, T, return chunk_occupancy<T>(block, a.D, &blocks_per_sm));
  };
  if (occupancy() != cudaSuccess) blocks_per_sm = 1;  // the query fails only for a kernel that cannot launch
  return plan_slots(block, a.B, a.Hkv, a.S, a.D, num_sms, int64_t{num_sms} * std::max(blocks_per_sm, 1), chunk,
                    tile);
}

size_t decode_attention_workspace_bytes(const DecodeAttentionArgs& a, const DecodePlan& plan) {
  return sizeof(float) * workspace_layout(a.B, a.Hq, a.S, a.D, plan, nullptr, nullptr);
}

cudaError_t launch_decode_attention(const DecodeAttentionArgs& a, const DecodePlan& plan, void* workspace,
                                    cudaStream_t stream) {
  if (a.B == 0 || a.Hkv == 0 || a.Hq == 0) return cudaSuccess;
  if (!decode_attention_supports_head_dim(a.D)) return cudaErrorInvalidValue;
  LESS_DISPATCH_SCALAR(a.dtype, T, return launch_for_type<T>(a, plan, workspace, stream));
}

cudaError_t launch_decode_attention_partials(const DecodeAttentionArgs& a, const StateRows& state, int64_t N,
                                             const DecodePlan& plan, void* workspace, int64_t exclude,
                                             int64_t q_stride, cudaStream_t stream) {
  if (a.B == 0 || a.Hkv == 0 || a.Hq == 0) return cudaSuccess;
  if (!plan.split || !decode_attention_supports_head_dim(a.D)) return cudaErrorInvalidValue;
  const Workspace ws = carve_workspace(workspace, a.B, a.Hq, a.S, a.D, plan);
  LESS_DISPATCH_SCALAR(a.dtype, T,
                       return launch_chunks_for_type<T>(a, state, N, plan, ws, exclude, q_stride, stream));
}

}  // namespace cuda
}  // namespace less_cuda
