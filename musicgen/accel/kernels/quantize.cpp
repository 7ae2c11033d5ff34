// Weight quantisers and the int4 dequantiser, at AVX2 (one path at every level: they run once per weight, at
// load, or for prefill's few large products).
//
// int8_quantize / int4_quantize: bitwise the same as quant.py's Python references (float32 divisions, round half
// to even, the same clamps), native because quantising at load was most of a quantised load.
// int4_dequant: 4-bit weights (N, K / 2) with float16 group scales (N, K / 32) to float32 or bfloat16 (N, K), for
// products with many rows (prefill), which go to BLAS. Weight j of a 64-weight block sits in byte j % 32, low
// nibble for the first group of 32 and high nibble for the second; value (code - 8) * scale. bfloat16 is rounded
// to nearest even, as torch's own conversion does.
#include "kernels.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

using musicgen::hmax_abs;
using musicgen::pack32;

inline __m256 dequant8(__m128i bytes8, __m256 scale) {       // 8 codes (low 8 bytes) -> 8 floats
  const __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes8), _mm256_set1_epi32(8));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(v), scale);
}

inline __m128i to_bf16(__m256 f) {                            // 8 floats -> 8 bfloat16, nearest even
  __m256i b = _mm256_castps_si256(f);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i packed = _mm256_packus_epi32(b, b);           // lanes: a0..3 a0..3 | a4..7 a4..7
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

inline __m256i codes8(const float* v, __m256 scale, float lo, float hi) {   // round(v / scale) clamped, as int32
  __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(v), scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm256_min_ps(_mm256_max_ps(q, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
  return _mm256_cvtps_epi32(q);
}

}  // namespace

torch::Tensor int4_dequant(torch::Tensor qw, torch::Tensor scales, bool bf16) {
  TORCH_CHECK(qw.dim() == 2 && qw.scalar_type() == torch::kUInt8 && qw.is_contiguous() && qw.size(1) % 32 == 0,
              "int4_dequant: contiguous packed uint8 weights (N, K / 2) with K a multiple of 64 expected");
  const int64_t N = qw.size(0), K = 2 * qw.size(1), G = K / 32;
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous() && scales.size(0) == N &&
              scales.size(1) == G, "int4_dequant: float16 scales (N, K / 32) expected");
  auto out = torch::empty({N, K}, qw.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  const uint8_t* w = qw.data_ptr<uint8_t>();
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* ob = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t b = 0; b < K / 64; ++b) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * (K / 2) + b * 32));
        const __m256i lo = _mm256_and_si256(bytes, _mm256_set1_epi8(15));
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(15));
        for (int half = 0; half < 2; ++half) {
          const __m256i codes = half ? hi : lo;
          const __m256 s = _mm256_set1_ps(_cvtsh_ss(sc[n * G + 2 * b + half]));
          const __m128i c0 = _mm256_castsi256_si128(codes), c1 = _mm256_extracti128_si256(codes, 1);
          const __m256 f[4] = {dequant8(c0, s), dequant8(_mm_srli_si128(c0, 8), s), dequant8(c1, s),
                               dequant8(_mm_srli_si128(c1, 8), s)};
          const int64_t at = n * K + b * 64 + half * 32;
          for (int i = 0; i < 4; ++i) {
            if (bf16) _mm_storeu_si128(reinterpret_cast<__m128i*>(ob + at + 8 * i), to_bf16(f[i]));
            else _mm256_storeu_ps(of + at + 8 * i, f[i]);
          }
        }
      }
    }
  });
  return out;
}

std::vector<torch::Tensor> int4_quantize(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.size(1) % 64 == 0,
              "int4_quantize: float32 weights (N, K) with K a multiple of 64 expected");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), G = K / 32;
  auto packed = torch::empty({N, K / 2}, w.options().dtype(torch::kUInt8));
  auto scales = torch::empty({N, G}, w.options().dtype(torch::kFloat16));
  const float* wp = w.data_ptr<float>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  uint16_t* sp = reinterpret_cast<uint16_t*>(scales.data_ptr<at::Half>());
  const float tiny = 6.103515625e-05f;                        // float16's smallest normal
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t b = 0; b < K / 64; ++b) {
        __m256i half[2];
        for (int h = 0; h < 2; ++h) {
          const float* v = wp + n * K + 64 * b + 32 * h;
          const uint16_t sh = _cvtss_sh(hmax_abs(v, 32) / 7.0f, _MM_FROUND_TO_NEAREST_INT);
          sp[n * G + 2 * b + h] = sh;
          const __m256 s = _mm256_set1_ps(std::max(_cvtsh_ss(sh), tiny));
          __m256i c[4];
          for (int u = 0; u < 4; ++u) c[u] = _mm256_add_epi32(codes8(v + 8 * u, s, -7.f, 7.f), _mm256_set1_epi32(8));
          half[h] = pack32(c);
        }
        // codes are 1..15: the high group's shift by 4 stays inside each byte
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pp + n * (K / 2) + 32 * b),
                            _mm256_or_si256(half[0], _mm256_slli_epi16(half[1], 4)));
      }
    }
  });
  return {packed, scales};
}

std::vector<torch::Tensor> int8_quantize(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32, "int8_quantize: float32 weights (N, K) expected");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto q = torch::empty({N, K}, w.options().dtype(torch::kInt8));
  auto scales = torch::empty({N}, w.options());
  const float* wp = w.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) sp[n] = musicgen::int8_quantize_row(wp + n * K, K, qp + n * K);
  });
  return {q, scales};
}

float musicgen::int8_quantize_row(const float* v, int64_t K, int8_t* q) {
  const int64_t K8 = K / 8 * 8;
  float amax = hmax_abs(v, K8);
  for (int64_t k = K8; k < K; ++k) amax = std::max(amax, std::fabs(v[k]));
  const float scale = std::max(amax, 1e-12f) / 127.0f;
  const __m256 s = _mm256_set1_ps(scale);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i c[4];
    for (int u = 0; u < 4; ++u) c[u] = codes8(v + k + 8 * u, s, -127.f, 127.f);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), pack32(c));
  }
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(v[k] / scale))));
  return scale;
}
