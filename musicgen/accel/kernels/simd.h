// Vector helpers the kernel families share: sums and maxima across lanes, widening of weight types to float32,
// software prefetch of a weight stream, the blocking of activation rows, and exp.
// Plain functions use the build's baseline (AVX2, FMA, F16C); AVX-512 ones carry a target attribute and may be
// called only from code that checked isa() >= AVX512.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#define MUSICGEN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

namespace musicgen {

inline float hsum(__m256 v) {   // the sum of the 8 lanes
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  s = _mm_add_ss(s, sh);
  return _mm_cvtss_f32(s);
}

inline float hmax_abs(const float* v, int64_t n) {   // max |v| over n (a multiple of 8) floats
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

inline __m256i pack32(const __m256i c[4]) {   // 4 x 8 int32 (within int8) -> 32 bytes in order
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// e^x for x <= 88 (Cephes expf: range reduction by ln 2, degree-6 polynomial; relative error about 1e-7),
// exactly 0 below -87, as a masked attention score must weigh: padded text positions then change nothing.
inline __m256 exp8(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), live);
}

// Software prefetch of a weight stream, called once per 128 bytes read: 2 KB ahead into L1 and 16 KB ahead into
// L2. One core's demand loads and L1 prefetches are limited by its line-fill buffers; the far L2 prefetches keep
// more lines in flight. Prefetching past the end of the weights is harmless (prefetches never fault).
inline void prefetch_weights(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p + 2048), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + 2048 + 64), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + 16384), _MM_HINT_T1);
  _mm_prefetch(reinterpret_cast<const char*>(p + 16384 + 64), _MM_HINT_T1);
}

// The activation rows in blocks of Max (8, 6 or 4), then 4, 2 and 1: fn(std::integral_constant<int, MB>, first
// row), so that each kernel is instantiated for those block sizes (MB accumulators per weight row).
template <int Max, typename Fn>
inline void row_blocks(int64_t M, Fn&& fn) {
  static_assert(Max == 4 || Max == 6 || Max == 8, "row blocks of at most 4, 6 or 8 rows");
  int64_t m = 0;
  if constexpr (Max > 4)
    for (; m + Max <= M; m += Max) fn(std::integral_constant<int, Max>{}, m);
  for (; m + 4 <= M; m += 4) fn(std::integral_constant<int, 4>{}, m);
  for (; m + 2 <= M; m += 2) fn(std::integral_constant<int, 2>{}, m);
  for (; m < M; ++m) fn(std::integral_constant<int, 1>{}, m);
}

// float16 weights: a type of their own, so that they do not widen as bfloat16 bits (uint16_t)
struct half_bits {
  uint16_t bits;
};

// Weights widened exactly to float32: int8 (times a per-row scale after the sum), float32, bfloat16 (uint16_t
// bits: a float32's high half) or float16. 8 at a time (AVX2), 16 (AVX-512), or one.
inline __m256 widen8(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}
inline __m256 widen8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 widen8(const uint16_t* w) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
inline __m256 widen8(const half_bits* w) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
}

MUSICGEN_AVX512 inline __m512 widen16(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}
MUSICGEN_AVX512 inline __m512 widen16(const float* w) { return _mm512_loadu_ps(w); }
MUSICGEN_AVX512 inline __m512 widen16(const uint16_t* w) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
MUSICGEN_AVX512 inline __m512 widen16(const half_bits* w) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}

inline float widen1(int8_t w) { return static_cast<float>(w); }
inline float widen1(float w) { return w; }
inline float widen1(half_bits w) { return _cvtsh_ss(w.bits); }
inline float widen1(uint16_t w) {
  const uint32_t u = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace musicgen
