// int4_gemv: 4-bit weights in groups of 32 with a float16 scale each, activations quantised on the fly to int8 in
// groups of 32 (as llama.cpp's Q4_0 x Q8_0), so the group dot products run in integers: AVX2 (maddubs), AVX-512
// VNNI (level AVX512_VNNI), or from AMX_INT4_MIN_ROWS rows the int8 tiles (level AMX, amx.cpp).
//
// Weight layout (see musicgen/accel/quant.py): per output row, groups of 32 weights with one float16 scale each;
// 32 bytes hold two groups, byte j carrying weight j of the first group in its low nibble and weight j of the
// second in its high nibble, stored as w + 8 (0..15). With x quantised per group (xq int8, scale xs):
//   sum_j (u_j - 8) xq_j = maddubs(u, xq) - 8 sum_j xq_j
// so the unsigned nibbles go straight into maddubs and the offset becomes one precomputed term per group.
#include "kernels.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace {

using musicgen::hmax_abs;
using musicgen::hsum;
using musicgen::pack32;
using musicgen::prefetch_weights;

// 32 unsigned nibbles u times 32 int8 activations x: 8 int32 lanes of 4 products each (maddubs stays within int16:
// 15 x 127 x 2 < 32768)
inline __m256i dot32(__m256i u, const int8_t* x) {
  const __m256i pairs = _mm256_maddubs_epi16(u, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

// Rows are processed 8 groups (256 weights) at a time: the 8 float16 scales convert in one instruction; K must
// be a multiple of 64 (whole pairs of groups).
template <int MB>
inline void dot_rows_q4(const int8_t* xq, const float* xs, const float* xc, int64_t K, const uint8_t* w,
                        const uint16_t* ws, float bias, float* out, int64_t ldy) {
  const int64_t G = K / 32;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[MB], corr[MB];
  for (int m = 0; m < MB; ++m) acc[m] = corr[m] = _mm256_setzero_ps();
  alignas(32) float f[MB][8];
  int64_t g0 = 0;
  for (; g0 + 8 <= G; g0 += 8) {
    const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + g0)));
    for (int m = 0; m < MB; ++m) {
      _mm256_store_ps(f[m], _mm256_mul_ps(sw, _mm256_loadu_ps(xs + m * G + g0)));
      corr[m] = _mm256_fmadd_ps(sw, _mm256_loadu_ps(xc + m * G + g0), corr[m]);
    }
    const uint8_t* wb = w + 16 * g0;
    prefetch_weights(wb);
    for (int pair = 0; pair < 4; ++pair) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * pair));
      const __m256i u0 = _mm256_and_si256(raw, low4);
      const __m256i u1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      const int64_t g = g0 + 2 * pair;
      for (int m = 0; m < MB; ++m) {
        const int8_t* x = xq + m * K + 32 * g;
        const __m256i p0 = dot32(u0, x);
        const __m256i p1 = dot32(u1, x + 32);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(&f[m][2 * pair]), acc[m]);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_broadcast_ss(&f[m][2 * pair + 1]), acc[m]);
      }
    }
  }
  float tail[MB] = {};
  for (; g0 < G; g0 += 2) {   // groups left over when K is not a multiple of 256: a pair at a time
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * g0));
    const __m256i u0 = _mm256_and_si256(raw, low4);
    const __m256i u1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
    const float s0 = _cvtsh_ss(ws[g0]), s1 = _cvtsh_ss(ws[g0 + 1]);
    for (int m = 0; m < MB; ++m) {
      const int8_t* x = xq + m * K + 32 * g0;
      const __m256i p0 = dot32(u0, x);
      const __m256i p1 = dot32(u1, x + 32);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(s0 * xs[m * G + g0]), acc[m]);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(s1 * xs[m * G + g0 + 1]), acc[m]);
      tail[m] += s0 * xc[m * G + g0] + s1 * xc[m * G + g0 + 1];
    }
  }
  for (int m = 0; m < MB; ++m) out[m * ldy] = hsum(acc[m]) - hsum(corr[m]) - tail[m] + bias;
}

// The same product with AVX-512 VNNI: vpdpbusd multiplies 64 unsigned nibbles by 64 int8 activations and sums
// each 4 into int32 in one instruction, two groups per register.
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl,fma,f16c")))
void dot_rows_q4_vnni(const int8_t* xq, const float* xs, const float* xc, int64_t K, const uint8_t* w,
                      const uint16_t* ws, float bias, float* out, int64_t ldy) {
  const int64_t G = K / 32;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m512 acc[MB];
  __m256 corr[MB];
  for (int m = 0; m < MB; ++m) { acc[m] = _mm512_setzero_ps(); corr[m] = _mm256_setzero_ps(); }
  // lanes 0-7 take group 2p's factor, lanes 8-15 group 2p + 1's
  const __m512i pick[4] = {_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                           _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2),
                           _mm512_set_epi32(5, 5, 5, 5, 5, 5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4),
                           _mm512_set_epi32(7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6)};
  int64_t g0 = 0;
  for (; g0 + 8 <= G; g0 += 8) {
    const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + g0)));
    __m512 f[MB];
    for (int m = 0; m < MB; ++m) {
      f[m] = _mm512_castps256_ps512(_mm256_mul_ps(sw, _mm256_loadu_ps(xs + m * G + g0)));
      corr[m] = _mm256_fmadd_ps(sw, _mm256_loadu_ps(xc + m * G + g0), corr[m]);
    }
    const uint8_t* wb = w + 16 * g0;
    prefetch_weights(wb);
    for (int pair = 0; pair < 4; ++pair) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * pair));
      const __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, low4)),
                                           _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), 1);
      const int64_t g = g0 + 2 * pair;
      for (int m = 0; m < MB; ++m) {
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512(xq + m * K + 32 * g));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(pick[pair], f[m]), acc[m]);
      }
    }
  }
  float tail[MB] = {};
  for (; g0 < G; g0 += 2) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * g0));
    const __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, low4)),
                                         _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), 1);
    const float s0 = _cvtsh_ss(ws[g0]), s1 = _cvtsh_ss(ws[g0 + 1]);
    for (int m = 0; m < MB; ++m) {
      const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512(xq + m * K + 32 * g0));
      const __m512 fs = _mm512_castps256_ps512(_mm256_set1_ps(s0 * xs[m * G + g0]));
      const __m512 f2 = _mm512_castpd_ps(_mm512_insertf64x4(
          _mm512_castps_pd(fs), _mm256_castps_pd(_mm256_set1_ps(s1 * xs[m * G + g0 + 1])), 1));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), f2, acc[m]);
      tail[m] += s0 * xc[m * G + g0] + s1 * xc[m * G + g0 + 1];
    }
  }
  for (int m = 0; m < MB; ++m) out[m * ldy] = _mm512_reduce_add_ps(acc[m]) - hsum(corr[m]) - tail[m] + bias;
}

// One group of 32 activations -> int8 codes round(v * 127 / max|v|) (nearest even, as the default rounding
// mode of cvtps), the scale max|v| / 127, and the offset term 8 * scale * sum(codes) of the kernels above.
inline void quantize_group(const float* v, int8_t* q, float* scale, float* offset) {
  const float mx = hmax_abs(v, 32);
  const __m256 inv = _mm256_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
  __m256i c[4], sum = _mm256_setzero_si256();
  for (int u = 0; u < 4; ++u) {
    c[u] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * u), inv));
    sum = _mm256_add_epi32(sum, c[u]);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), pack32(c));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  *scale = mx / 127.f;
  *offset = 8.f * *scale * static_cast<float>(_mm_cvtsi128_si32(s4));
}

}  // namespace

void musicgen::int4_gemv_raw(const float* xp, int64_t M, int64_t K, const uint8_t* qp, const uint16_t* sp,
                             const float* bp, int64_t N, float* yp, Int4Scratch& scratch) {
  const int64_t G = K / 32;
  // activations -> int8 per group of 32 (scale max|x| / 127, round to nearest), and each group's offset term
  scratch.xq.resize(M * K);
  scratch.xs.resize(M * G);
  scratch.xc.resize(M * G);
  int8_t* xq = scratch.xq.data();
  float *xs = scratch.xs.data(), *xc = scratch.xc.data();
  for (int64_t i = 0; i < M * G; ++i) quantize_group(xp + 32 * i, xq + 32 * i, xs + i, xc + i);
  const Isa level = isa();
  if (level >= AMX && M >= AMX_INT4_MIN_ROWS && N % 16 == 0) {
    amx_int4_gemv(xq, xs, M, K, qp, sp, bp, N, yp);
    return;
  }
  const bool vnni = level >= AVX512_VNNI;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = qp + n * (K / 2);
      const uint16_t* ws = sp + n * G;
      const float bn = bp ? bp[n] : 0.f;
      musicgen::row_blocks<4>(M, [&](auto mb, int64_t m) {
        constexpr int MB = decltype(mb)::value;
        if (vnni) dot_rows_q4_vnni<MB>(xq + m * K, xs + m * G, xc + m * G, K, w, ws, bn, yp + m * N + n, N);
        else dot_rows_q4<MB>(xq + m * K, xs + m * G, xc + m * G, K, w, ws, bn, yp + m * N + n, N);
      });
    }
  });
}

torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor qw, torch::Tensor scales, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && qw.dim() == 2 && x.size(1) == 2 * qw.size(1) && x.size(1) % 64 == 0,
              "int4_gemv: x (M, K) and packed weights (N, K / 2) with K a multiple of 64 expected");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "int4_gemv: x must be float32");
  TORCH_CHECK(qw.scalar_type() == torch::kUInt8 && qw.is_contiguous(), "int4_gemv: weights must be contiguous uint8");
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0), G = K / 32;
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous() && scales.size(0) == N &&
              scales.size(1) == G, "int4_gemv: float16 scales (N, K / 32) expected");
  x = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  torch::Tensor b;
  const float* bp = musicgen::float_bias(bias, N, b, "int4_gemv");
  thread_local musicgen::Int4Scratch scratch;
  musicgen::int4_gemv_raw(x.data_ptr<float>(), M, K, qw.data_ptr<uint8_t>(),
                          reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), bp, N, y.data_ptr<float>(),
                          scratch);
  return y;
}
