// Portable SIMD for the CPU kernels: GCC/Clang vector extensions (8 floats), which compile to AVX2 + FMA inside
// the kernels' AVX2 clones and to SSE pairs in their baseline clones, plus the element conversions and a
// vectorisable exp. Everything here is always-inline, so each clone gets it compiled for its own ISA.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

// The CPU kernels are compiled twice, for AVX2 + FMA (x86-64-v3) and for the baseline ISA, and the loader picks
// the clone the machine runs (GCC / Clang function multi-versioning). Elsewhere there is one version.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LESS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LESS_CPU_CLONES
#endif
#define LESS_INLINE inline __attribute__((always_inline))
// Every function taking or returning a vector is always inlined, so no call crosses the ABI that GCC warns about.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace less_cuda {
namespace simd {

constexpr int kWidth = 8;
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef float f8u __attribute__((vector_size(32), aligned(4)));  // for loads and stores at any float address

LESS_INLINE f8 load(const float* p) { return *reinterpret_cast<const f8u*>(p); }
LESS_INLINE void store(float* p, f8 x) { *reinterpret_cast<f8u*>(p) = x; }
LESS_INLINE f8 splat(float x) { return f8{} + x; }
LESS_INLINE f8 max(f8 a, f8 b) { return a > b ? a : b; }
LESS_INLINE float hmax(f8 x) {
  float m = x[0];
  for (int i = 1; i < kWidth; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
LESS_INLINE float hsum(f8 x) {
  const f8 a = x + __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
  const f8 b = a + __builtin_shufflevector(a, a, 2, 3, 0, 1, 6, 7, 4, 5);
  return b[0] + b[1];
}
// The horizontal sums of eight vectors at once: result[i] = hsum(x[i]), by three rounds of pairwise shuffles.
LESS_INLINE f8 hsum8(const f8* x) {
  f8 pairs[4], quads[2];
  for (int i = 0; i < 4; ++i)
    pairs[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
               __builtin_shufflevector(x[2 * i], x[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int i = 0; i < 2; ++i)
    quads[i] = __builtin_shufflevector(pairs[2 * i], pairs[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(pairs[2 * i], pairs[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(quads[0], quads[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(quads[0], quads[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// exp(x) to about 2 ulp for x in [-87, 88] and exactly 0 below (x = -inf included), 8 lanes at a time without
// branches: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, 2^n built in the exponent bits.
LESS_INLINE f8 exp(f8 x) {
  const f8 lo = splat(-87.0f), hi = splat(88.0f);
  const f8 xc = x < lo ? lo : (x > hi ? hi : x);
  const f8 shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const f8 n = (xc * 1.44269504088896341f + shifter) - shifter;
  f8 r = xc - n * 0.693359375f;   // ln2 split in two so that n * ln2 stays exact
  r = r + n * 2.12194440e-4f;
  f8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const f8 y = p * r * r + r + 1.0f;
  const i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;
  f8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? f8{} : y * scale;
}

// Sixteen elements widened to fp32 straight from K/V memory, as two vectors (lo, hi). bf16 comes de-interleaved
// (lo: elements 0, 2, ..., 14; hi: 1, 3, ..., 15): one 32-byte load, a shift and a mask, where widening in order
// takes two zero-extends and a lane insert per eight. Operands that meet K or V (q rows, the output accumulators)
// use the same order within each 16-element block: see permute16.
constexpr int kBlock = 2 * kWidth;
template <typename T>
constexpr bool kDeinterleaved = false;
template <>
constexpr bool kDeinterleaved<c10::BFloat16> = true;

LESS_INLINE void load16(const float* p, f8& lo, f8& hi) {
  lo = load(p);
  hi = load(p + kWidth);
}
LESS_INLINE void load16(const c10::BFloat16* p, f8& lo, f8& hi) {
  typedef uint32_t u32x8 __attribute__((vector_size(32), aligned(2)));
  const u32x8 words = *reinterpret_cast<const u32x8*>(p);  // word i = element 2i (low half) | element 2i+1 (high)
  const u32x8 even = words << 16, odd = words & 0xffff0000u;
  std::memcpy(&lo, &even, sizeof(lo));
  std::memcpy(&hi, &odd, sizeof(hi));
}
LESS_INLINE void load16(const c10::Half* p, f8& lo, f8& hi) {
  for (int i = 0; i < kWidth; ++i) {
    lo[i] = static_cast<float>(p[i]);
    hi[i] = static_cast<float>(p[kWidth + i]);
  }
}

// Puts the whole 16-element blocks of x [n] into (or, with inverse, back from) load16's order for T.
template <typename T>
LESS_INLINE void permute16(float* x, int64_t n, bool inverse) {
  if (!kDeinterleaved<T>) return;
  float block[kBlock];
  for (int64_t b = 0; b + kBlock <= n; b += kBlock) {
    std::memcpy(block, x + b, sizeof(block));
    for (int i = 0; i < kWidth; ++i) {
      if (inverse) {
        x[b + 2 * i] = block[i];
        x[b + 2 * i + 1] = block[kWidth + i];
      } else {
        x[b + i] = block[2 * i];
        x[b + kWidth + i] = block[2 * i + 1];
      }
    }
  }
}

// y += a * x over n elements.
LESS_INLINE void axpy(float a, const float* x, float* y, int64_t n) {
  int64_t i = 0;
  const f8 av = splat(a);
  for (; i + kWidth <= n; i += kWidth) store(y + i, load(y + i) + av * load(x + i));
  for (; i < n; ++i) y[i] += a * x[i];
}

// Widen n elements to fp32 / narrow them back (round to nearest even, as torch does).
LESS_INLINE void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
LESS_INLINE void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(dst + i, &u, sizeof(float));
  }
}
LESS_INLINE void to_float(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T>
LESS_INLINE void from_float(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

}  // namespace simd
}  // namespace less_cuda
