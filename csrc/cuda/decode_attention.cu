// (c) decode_attention: one decode step of LESS attention for every query head (reference.decode_attention).
//   out[b, h]  = merge of the softmax state over the occupied slots of KV head h / G and the low-rank state
//                (phi(q)H / phi(q)z, log phi(q)z), in q's dtype
//   probs[b, j] = sum over the G query heads of the group of exp(s_j - lse_sparse), fp32 (low rank not included)
// Layout: q, out [B, Hq, D]; k, v [B, Hkv, S, D] (fp32 / fp16 / bf16, D in {64, 128, 256}); pos, probs
// [B, Hkv, S]; phi_q [B, Hq, R], H [B, Hkv, R, D], z [B, Hkv, R] fp32 (optional).
//
// Thread mapping. A block of 4 warps handles one (batch, KV head, up to 8 query heads of its group, chunk of
// slots), so each K/V byte is read once for the whole group. A row of K or V (D elements) is split into 16-byte
// vectors spread over kLanes consecutive lanes (8 to 32, by dtype and D); a warp covers 32 / kLanes rows at once
// and every lane keeps kUnroll rows' loads in flight. The chunk is processed in three passes:
//   1. K pass: per row, each lane dots its slice with the G pre-scaled queries held in registers; a butterfly
//      over the row's lanes gives the logits, which go to shared memory ([G][chunk], -inf for free slots).
//   2. per head (one warp each): max m and l = sum exp(s - m) over the chunk; the logits become p = exp(s - m).
//   3. V pass: each lane accumulates sum_j p_gj v_j over its slice for the G heads (rows whose p are all zero,
//      i.e. free slots, are not loaded), then lanes and warps are reduced through shared memory.
// Because m is known before the V pass, nothing is rescaled per row; the shared-memory p are also what probs
// is built from, so K is read once. With one chunk the block finishes: out = merge(sparse, low rank), probs =
// sum_g p_g / l_g. With several (split-KV: when B * Hkv blocks cannot fill the GPU, or S exceeds what shared
// memory holds, or G > 8) each block writes its partial state (o, m, l) and its p to a workspace and
// decode_combine_kernel merges the chunks by log-sum-exp, rescaling every p by exp(m_chunk - lse) for probs.
//
// Bytes per call: K and V once (2 * B * Hkv * S * D * sizeof(T)), pos and probs (8 * B * Hkv * S), q and out,
// H, z, phi_q once per group; split-KV adds 8 * B * Hq * S for p written and read back, and
// 4 * B * Hq * chunks * (D + 2) for the partial states.
#include <algorithm>

#include "cuda/common.cuh"

namespace less_cuda {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxHeadsPerBlock = 8;
constexpr int kUnroll = 4;                   // rows per lane group with loads in flight
constexpr int64_t kMinChunk = 128;           // the split heuristic never gives a block fewer slots
constexpr size_t kSmemBudget = 40 * 1024;    // dynamic shared memory per block: below the 48 KiB default

template <typename T, int D>
struct RowLayout {
  static constexpr int kVec = kVecElems<T>;                             // elements per 16-byte load
  static constexpr int kVecsPerRow = D / kVec;
  static constexpr int kLanes = kVecsPerRow < 32 ? kVecsPerRow : 32;   // lanes sharing one row
  static constexpr int kVecsPerLane = kVecsPerRow / kLanes;
  static constexpr int kElems = kVecsPerLane * kVec;                   // a lane's slice of a row
  static constexpr int kRowsPerWarp = 32 / kLanes;
  static constexpr int kRowsPerPass = kRowsPerWarp * kWarps;
  // Vector v of lane l starts at element (v * kLanes + l) * kVec: each vector index is one contiguous,
  // coalesced kLanes * 16-byte segment of the row.
  static __device__ __forceinline__ int element(int v, int l) { return (v * kLanes + l) * kVec; }
};

// Split-KV partial results, per (batch, KV head, head of the group).
struct Workspace {
  float* p;      // [B, Hkv, G, S]: exp(s - m_chunk)
  float* stats;  // [B, Hkv, G, chunks, 2]: (m, l) of each chunk
  float* o;      // [B, Hkv, G, chunks, D]: sum over the chunk of exp(s - m_chunk) v
};

// Weight of a chunk with running max m_chunk in a softmax whose overall max is m (0 for an empty chunk).
__device__ __forceinline__ float chunk_weight(float m_chunk, float m) {
  return m_chunk > -INFINITY ? expf(m_chunk - m) : 0.f;
}

// phi(q) . z for one query head, reduced over a warp; every lane gets it.
__device__ __forceinline__ float lowrank_den(const float* phi_row, const float* z_bh, int64_t R) {
  float den = 0.f;
  for (int64_t r = threadIdx.x % 32; r < R; r += 32) den += phi_row[r] * z_bh[r];
  return group_sum(den);
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

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    decode_chunk_kernel(DecodeAttentionArgs a, DecodePlan plan, Workspace ws) {
  using L = RowLayout<T, D>;
  const int64_t G = a.Hq / a.Hkv;
  const int64_t tile = blockIdx.x % plan.head_tiles;
  const int64_t bh = blockIdx.x / plan.head_tiles;  // b * Hkv + kv head
  const int64_t b = bh / a.Hkv, kvh = bh % a.Hkv;
  const int64_t c = blockIdx.y;
  const int64_t g0 = tile * plan.heads_per_block;   // first head of the group in this block
  const int heads = static_cast<int>(G - g0 < plan.heads_per_block ? G - g0 : plan.heads_per_block);
  const int64_t begin = c * plan.chunk;
  const int rows = static_cast<int>(a.S - begin < plan.chunk ? a.S - begin : plan.chunk);
  const int chunk = static_cast<int>(plan.chunk);
  const T* k = static_cast<const T*>(a.k) + (bh * a.S + begin) * D;
  const T* v = static_cast<const T*>(a.v) + (bh * a.S + begin) * D;
  const int32_t* pos = a.pos + bh * a.S + begin;
  const int64_t head0 = b * a.Hq + kvh * G + g0;    // row of q / out / phi_q of the block's first head
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / L::kLanes, l = lane % L::kLanes;

  LESS_DYNAMIC_SHARED(float, p);  // [heads][chunk]: logits, then exp(s - m); reused for the output reduction
  __shared__ float head_m[kMaxHeadsPerBlock], head_l[kMaxHeadsPerBlock], head_den[kMaxHeadsPerBlock];

  // 1. K pass: logits. Loop bounds are warp-uniform so that every lane takes part in the butterflies.
  {
    float qs[kMaxHeadsPerBlock][L::kElems];
    const T* q = static_cast<const T*>(a.q) + head0 * D;
#pragma unroll
    for (int g = 0; g < kMaxHeadsPerBlock; ++g)
#pragma unroll
      for (int vi = 0; vi < L::kVecsPerLane; ++vi)
#pragma unroll
        for (int i = 0; i < L::kVec; ++i)
          qs[g][vi * L::kVec + i] = g < heads ? to_float(q[g * D + L::element(vi, l) + i]) * a.scale : 0.f;

    for (int base = warp * L::kRowsPerWarp; base < rows; base += L::kRowsPerPass * kUnroll) {
      uint4 raw[kUnroll][L::kVecsPerLane];
      bool occupied[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int r = base + group + u * L::kRowsPerPass;
        occupied[u] = r < rows && pos[r] >= 0;
#pragma unroll
        for (int vi = 0; vi < L::kVecsPerLane; ++vi)
          raw[u][vi] = r < rows ? load16(k + static_cast<int64_t>(r) * D + L::element(vi, l)) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int r = base + group + u * L::kRowsPerPass;
        float kf[L::kElems];
#pragma unroll
        for (int vi = 0; vi < L::kVecsPerLane; ++vi) unpack16(raw[u][vi], kf + vi * L::kVec, T{});
#pragma unroll
        for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
          if (g >= heads) break;
          float s = 0.f;
#pragma unroll
          for (int e = 0; e < L::kElems; ++e) s += qs[g][e] * kf[e];
          s = group_sum<L::kLanes>(s);
          if (l == 0 && r < rows) p[g * chunk + r] = occupied[u] ? s : -INFINITY;
        }
      }
    }
  }
  __syncthreads();

  // 2. Per head: chunk max and normaliser; logits become exp(s - m). Also phi(q) . z for the low-rank state.
  for (int g = warp; g < heads; g += kWarps) {
    float* pg = p + g * chunk;
    float m = -INFINITY;
    for (int r = lane; r < rows; r += 32) m = fmaxf(m, pg[r]);
    m = warp_max(m);
    float sum = 0.f;
    for (int r = lane; r < rows; r += 32) {
      const float e = m > -INFINITY ? expf(pg[r] - m) : 0.f;
      pg[r] = e;
      sum += e;
    }
    sum = group_sum(sum);
    const float den = a.R > 0 ? lowrank_den(a.phi_q + (head0 + g) * a.R, a.z + bh * a.R, a.R) : 0.f;
    if (lane == 0) {
      head_m[g] = m;
      head_l[g] = sum;
      head_den[g] = den;
    }
  }
  __syncthreads();

  // 3. V pass: this lane's slice of sum_j p_gj v_j.
  float acc[kMaxHeadsPerBlock][L::kElems] = {};
  for (int base = warp * L::kRowsPerWarp; base < rows; base += L::kRowsPerPass * kUnroll) {
    uint4 raw[kUnroll][L::kVecsPerLane];
    float w[kUnroll][kMaxHeadsPerBlock];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int r = base + group + u * L::kRowsPerPass;
      bool any = false;
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
        w[u][g] = g < heads && r < rows ? p[g * chunk + r] : 0.f;
        any |= w[u][g] != 0.f;
      }
#pragma unroll
      for (int vi = 0; vi < L::kVecsPerLane; ++vi)
        raw[u][vi] = any ? load16(v + static_cast<int64_t>(r) * D + L::element(vi, l)) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float vf[L::kElems];
#pragma unroll
      for (int vi = 0; vi < L::kVecsPerLane; ++vi) unpack16(raw[u][vi], vf + vi * L::kVec, T{});
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
        if (g >= heads) break;
#pragma unroll
        for (int e = 0; e < L::kElems; ++e) acc[g][e] += w[u][g] * vf[e];
      }
    }
  }

  // probs (one chunk: final) or this chunk's p (split: rescaled by the combine kernel).
  if (!plan.split) {
    float* probs = a.probs + bh * a.S + begin;
    for (int r = threadIdx.x; r < rows; r += kThreads) {
      float sum = 0.f;
      for (int g = 0; g < heads; ++g) sum += p[g * chunk + r] * normaliser_inv(head_l[g]);
      probs[r] = sum;
    }
  } else {
    for (int g = 0; g < heads; ++g) {
      float* out_p = ws.p + ((bh * G + g0 + g) * a.S) + begin;
      for (int r = threadIdx.x; r < rows; r += kThreads) out_p[r] = p[g * chunk + r];
    }
    if (static_cast<int>(threadIdx.x) < heads) {
      float* stats = ws.stats + ((bh * G + g0 + threadIdx.x) * plan.chunks + c) * 2;
      stats[0] = head_m[threadIdx.x];
      stats[1] = head_l[threadIdx.x];
    }
  }
  __syncthreads();  // p is free from here on: it becomes the [warp][head][D] reduction buffer

  // Reduce the lane groups of each warp, then the warps through shared memory.
#pragma unroll
  for (int offset = L::kLanes; offset < 32; offset *= 2)
#pragma unroll
    for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
      if (g >= heads) break;
#pragma unroll
      for (int e = 0; e < L::kElems; ++e) acc[g][e] += __shfl_xor_sync(kFullMask, acc[g][e], offset);
    }
  float* partial = p;
  if (group == 0) {
#pragma unroll
    for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
      if (g >= heads) break;
#pragma unroll
      for (int vi = 0; vi < L::kVecsPerLane; ++vi)
#pragma unroll
        for (int i = 0; i < L::kVec; ++i)
          partial[(warp * heads + g) * D + L::element(vi, l) + i] = acc[g][vi * L::kVec + i];
    }
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < heads * D; idx += kThreads) {
    const int g = idx / D, d = idx % D;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += partial[(w * heads + g) * D + d];
    if (plan.split) {
      ws.o[((bh * G + g0 + g) * plan.chunks + c) * D + d] = o;
    } else {
      const float* phi_row = a.R > 0 ? a.phi_q + (head0 + g) * a.R : nullptr;
      const float* H_bh = a.R > 0 ? a.H + bh * a.R * D : nullptr;
      static_cast<T*>(a.out)[(head0 + g) * D + d] =
          from_float<T>(finish_output(o, head_m[g], head_l[g], head_den[g], phi_row, H_bh, d, a.R, D));
    }
  }
}

// Split-KV: merges the chunks of one (batch, KV head) for all G heads of its group, then writes out and probs.
// Grid B * Hkv; shared memory [G][3] for each head's (max, normaliser, phi(q) . z).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    decode_combine_kernel(DecodeAttentionArgs a, DecodePlan plan, Workspace ws) {
  const int64_t G = a.Hq / a.Hkv;
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / a.Hkv, kvh = bh % a.Hkv;
  const int64_t head0 = b * a.Hq + kvh * G;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  LESS_DYNAMIC_SHARED(float, head);  // [G][3]: m, l, den

  for (int64_t g = warp; g < G; g += kWarps) {
    const float* stats = ws.stats + (bh * G + g) * plan.chunks * 2;
    OnlineSoftmax total;
    for (int64_t c = lane; c < plan.chunks; c += 32) total.combine(OnlineSoftmax{stats[2 * c], stats[2 * c + 1]});
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
      total.combine(
          OnlineSoftmax{__shfl_xor_sync(kFullMask, total.m, offset), __shfl_xor_sync(kFullMask, total.l, offset)});
    const float den = a.R > 0 ? lowrank_den(a.phi_q + (head0 + g) * a.R, a.z + bh * a.R, a.R) : 0.f;
    if (lane == 0) {
      head[3 * g] = total.m;
      head[3 * g + 1] = total.l;
      head[3 * g + 2] = den;
    }
  }
  __syncthreads();

  const int64_t D = a.D;
  for (int64_t idx = threadIdx.x; idx < G * D; idx += kThreads) {
    const int64_t g = idx / D, d = idx % D;
    const float* stats = ws.stats + (bh * G + g) * plan.chunks * 2;
    const float* o_chunks = ws.o + (bh * G + g) * plan.chunks * D + d;
    float o = 0.f;
    for (int64_t c = 0; c < plan.chunks; ++c) o += o_chunks[c * D] * chunk_weight(stats[2 * c], head[3 * g]);
    const float* phi_row = a.R > 0 ? a.phi_q + (head0 + g) * a.R : nullptr;
    const float* H_bh = a.R > 0 ? a.H + bh * a.R * D : nullptr;
    static_cast<T*>(a.out)[(head0 + g) * D + d] =
        from_float<T>(finish_output(o, head[3 * g], head[3 * g + 1], head[3 * g + 2], phi_row, H_bh, d, a.R, D));
  }

  for (int64_t j = threadIdx.x; j < a.S; j += kThreads) {
    const int64_t c = j / plan.chunk;
    float sum = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const float m_chunk = ws.stats[((bh * G + g) * plan.chunks + c) * 2];
      sum += ws.p[(bh * G + g) * a.S + j] * chunk_weight(m_chunk, head[3 * g]) * normaliser_inv(head[3 * g + 1]);
    }
    a.probs[bh * a.S + j] = sum;
  }
}

Workspace carve(const DecodeAttentionArgs& a, const DecodePlan& plan, void* workspace) {
  if (!plan.split) return {nullptr, nullptr, nullptr};
  float* base = static_cast<float*>(workspace);
  const int64_t heads = a.B * a.Hq;
  return {base, base + heads * a.S, base + heads * (a.S + 2 * plan.chunks)};
}

template <typename T, int D>
cudaError_t launch_typed(const DecodeAttentionArgs& a, const DecodePlan& plan, void* workspace, cudaStream_t stream) {
  const Workspace ws = carve(a, plan, workspace);
  const size_t smem = sizeof(float) * std::max(plan.heads_per_block * plan.chunk, kWarps * plan.heads_per_block * D);
  const dim3 grid(static_cast<unsigned>(a.B * a.Hkv * plan.head_tiles), static_cast<unsigned>(plan.chunks));
  const auto chunk_kernel = decode_chunk_kernel<T, D>;
  LESS_LAUNCH(chunk_kernel, grid, kThreads, smem, stream)(a, plan, ws);
  if (plan.split) {
    const auto combine_kernel = decode_combine_kernel<T>;
    const size_t combine_smem = sizeof(float) * 3 * (a.Hq / a.Hkv);
    LESS_LAUNCH(combine_kernel, static_cast<unsigned>(a.B * a.Hkv), kThreads, combine_smem, stream)(a, plan, ws);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_type(const DecodeAttentionArgs& a, const DecodePlan& plan, void* workspace,
                            cudaStream_t stream) {
  LESS_DISPATCH_HEAD_DIM(a.D, D, return launch_typed<T, D>(a, plan, workspace, stream));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

bool decode_attention_supports_head_dim(int64_t D) { return D == 64 || D == 128 || D == 256; }

DecodePlan plan_decode_attention(const DecodeAttentionArgs& a, int num_sms, int64_t chunk) {
  DecodePlan plan{};
  const int64_t G = a.Hkv > 0 ? a.Hq / a.Hkv : 0;
  plan.heads_per_block = std::max<int64_t>(1, std::min<int64_t>(G, kMaxHeadsPerBlock));
  plan.head_tiles = std::max<int64_t>(1, ceil_div(G, plan.heads_per_block));
  // The chunk's logits must fit the shared-memory budget.
  const int64_t max_chunk = static_cast<int64_t>(kSmemBudget / sizeof(float)) / plan.heads_per_block;
  if (chunk <= 0) {
    // Split-KV when one block per (batch, KV head, head tile) leaves SMs idle: aim for two blocks per SM, but
    // give no block fewer than kMinChunk slots (the combine's extra traffic must stay small against the chunk).
    const int64_t blocks = a.B * a.Hkv * plan.head_tiles;
    int64_t chunks = ceil_div(a.S, max_chunk);
    if (blocks > 0 && blocks < num_sms)
      chunks = std::max(chunks, std::min(ceil_div(2 * num_sms, blocks), ceil_div(a.S, kMinChunk)));
    chunk = ceil_div(a.S, std::max<int64_t>(chunks, 1));
  }
  plan.chunk = std::min(std::max<int64_t>(chunk, 1), max_chunk);
  plan.chunks = std::max<int64_t>(1, ceil_div(a.S, plan.chunk));
  plan.split = plan.chunks > 1 || plan.head_tiles > 1;
  return plan;
}

size_t decode_attention_workspace_bytes(const DecodeAttentionArgs& a, const DecodePlan& plan) {
  if (!plan.split) return 0;
  return sizeof(float) * static_cast<size_t>(a.B * a.Hq * (a.S + plan.chunks * (2 + a.D)));
}

cudaError_t launch_decode_attention(const DecodeAttentionArgs& a, const DecodePlan& plan, void* workspace,
                                    cudaStream_t stream) {
  if (a.B == 0 || a.Hkv == 0 || a.Hq == 0) return cudaSuccess;
  LESS_DISPATCH_SCALAR(a.dtype, T, return launch_for_type<T>(a, plan, workspace, stream));
}

}  // namespace cuda
}  // namespace less_cuda
