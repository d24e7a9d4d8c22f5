// (b) state_fold / state_update_: what N tokens add to the low-rank state (reference.state_fold),
//   dH[b, h, r, d] = sum_n mask_n psi[n, r] v[n, d],   dz[b, h, r] = sum_n mask_n psi[n, r]
// written as H = dH (state_fold) or added in place, H += dH (state_update_, the decode path).
// Layout: psi [B, Hkv, N, R] fp32; v [B, Hkv, N, D] fp32 / fp16 / bf16; mask [B, Hkv, N] bool or none;
// H [B, Hkv, R, D], z [B, Hkv, R] fp32.
//
// Thread mapping: a block of 32 x 8 threads owns a tile of 8 ranks x 64 columns of one (b, h): thread (x, y)
// owns H[r = tile_r + y][d = tile_d + x] and [d + 32], and the x == 0 threads of the first column tile own
// z[r]. Every output element has exactly one writer, so no atomics and a deterministic summation order (token
// order). Tokens stream through shared memory 32 at a time (psi [32][8], v [32][64]); masked-out tokens are
// neither loaded nor added. For decode (N = 1) this is one tile load and one fused multiply-add per element.
//
// Bytes per call: H and z written (and read when accumulating): 4 * B * Hkv * R * (D + 1) (x2); v read
// ceil(R / 8) times and psi ceil(D / 64) times (mostly from L2): B * Hkv * N * (D * sizeof(T) + 4 * R).
#include "cuda/common.cuh"

namespace less_cuda {
namespace cuda {
namespace {

constexpr int kTokens = 32;  // tokens per shared-memory tile
constexpr int kRanks = 8;    // ranks per block (threadIdx.y)
constexpr int kCols = 64;    // columns per block (two per thread)

template <typename T>
__global__ void __launch_bounds__(32 * kRanks) state_fold_kernel(StateFoldArgs a) {
  const int64_t row = blockIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRanks, d0 = static_cast<int64_t>(blockIdx.z) * kCols;
  const int tid = threadIdx.y * 32 + threadIdx.x;
  const float* psi = a.psi + row * a.N * a.R;
  const T* v = static_cast<const T*>(a.v) + row * a.N * a.D;
  const bool* mask = a.mask != nullptr ? a.mask + row * a.N : nullptr;
  __shared__ float psi_tile[kTokens][kRanks];
  __shared__ float v_tile[kTokens][kCols];

  float h_lo = 0.f, h_hi = 0.f, z_acc = 0.f;
  for (int64_t n0 = 0; n0 < a.N; n0 += kTokens) {
    {
      const int t = tid / kRanks, i = tid % kRanks;  // one psi element per thread
      const int64_t n = n0 + t, r = r0 + i;
      const bool live = n < a.N && r < a.R && (mask == nullptr || mask[n]);
      psi_tile[t][i] = live ? psi[n * a.R + r] : 0.f;
    }
    for (int idx = tid; idx < kTokens * kCols; idx += 32 * kRanks) {
      const int t = idx / kCols, i = idx % kCols;
      const int64_t n = n0 + t, d = d0 + i;
      const bool live = n < a.N && d < a.D && (mask == nullptr || mask[n]);
      v_tile[t][i] = live ? to_float(v[n * a.D + d]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int t = 0; t < kTokens; ++t) {
      const float w = psi_tile[t][threadIdx.y];
      h_lo += w * v_tile[t][threadIdx.x];
      h_hi += w * v_tile[t][threadIdx.x + 32];
      z_acc += w;
    }
    __syncthreads();
  }

  const int64_t r = r0 + threadIdx.y;
  if (r >= a.R) return;
  float* H = a.H + (row * a.R + r) * a.D;
  const int64_t d_lo = d0 + threadIdx.x, d_hi = d_lo + 32;
  if (d_lo < a.D) H[d_lo] = a.accumulate ? H[d_lo] + h_lo : h_lo;
  if (d_hi < a.D) H[d_hi] = a.accumulate ? H[d_hi] + h_hi : h_hi;
  if (blockIdx.z == 0 && threadIdx.x == 0) {
    float& z = a.z[row * a.R + r];
    z = a.accumulate ? z + z_acc : z_acc;
  }
}

template <typename T>
cudaError_t launch_typed(const StateFoldArgs& a, cudaStream_t stream) {
  // At least one column tile, so that z is written even when D == 0.
  const dim3 grid(static_cast<unsigned>(a.rows), static_cast<unsigned>((a.R + kRanks - 1) / kRanks),
                  static_cast<unsigned>(a.D > 0 ? (a.D + kCols - 1) / kCols : 1));
  LESS_LAUNCH(state_fold_kernel<T>, grid, dim3(32, kRanks), 0, stream)(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_state_fold(const StateFoldArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.R == 0) return cudaSuccess;
  LESS_DISPATCH_SCALAR(a.dtype, T, return launch_typed<T>(a, stream));
}

}  // namespace cuda
}  // namespace less_cuda
