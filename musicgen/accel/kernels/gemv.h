// The matrix-vector kernels of gemv.cpp, on raw pointers: the tensor wrappers (int8_gemv,
// int4_gemv) and the fused decoder (decoder.cpp) both call these. Output channels are split across threads.
#pragma once

#include <immintrin.h>
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace musicgen {

// sum of the 8 lanes
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  s = _mm_add_ss(s, sh);
  return _mm_cvtss_f32(s);
}

// 16 int8 values widened exactly to float32 (AVX-512): int8 weights (gemv.cpp) and int8 cache rows (decoder.cpp)
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) inline __m512 widen16_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// y (M, N) = x (M, K) . q (N, K)^T * scale[n] + bias[n]; bias may be nullptr
void int8_gemv_raw(const float* x, int64_t M, int64_t K, const int8_t* q, const float* scale, const float* bias,
                   int64_t N, float* y);

// The int4 kernel quantises x to int8 per group of 32 first; it keeps that copy here between calls.
struct Int4Scratch {
  std::vector<int8_t> xq;
  std::vector<float> xs, xc;
};

// y (M, N) = x (M, K) . dequant(w (N, K / 2), scales (N, K / 32) float16 bits)^T + bias[n]; K % 64 == 0
void int4_gemv_raw(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scales,
                   const float* bias, int64_t N, float* y, Int4Scratch& scratch);

// The element type of a dense weight: float32, or bfloat16 / float16 bits (both widen exactly to float32).
enum class Dense { F32, BF16, F16 };

// y (M, N) = x (M, K) . w (N, K)^T + bias[n], w of element type t, widened exactly; bias may be nullptr.
// AVX-512 only (avx512_available).
void dense_gemv_raw(const float* x, int64_t M, int64_t K, const void* w, Dense t, const float* bias, int64_t N,
                    float* y);

// The Dense type of a weight dtype; none for other dtypes.
std::optional<Dense> dense_type(c10::ScalarType t);

// One row v (K floats) -> int8 codes round(v / s) (nearest even, within +-127) in q; returns the scale
// s = max(max|v|, 1e-12) / 127. int8_quantize's rows (weights) and the fused decoder's int8 cache rows.
float int8_quantize_row(const float* v, int64_t K, int8_t* q);

}  // namespace musicgen

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias);
torch::Tensor dense_gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
bool avx512_available();
bool amx_available(const std::string& kind);
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor qw, torch::Tensor scales, c10::optional<torch::Tensor> bias);
torch::Tensor int4_dequant(torch::Tensor qw, torch::Tensor scales, bool bf16);
std::vector<torch::Tensor> int4_quantize(torch::Tensor w);
std::vector<torch::Tensor> int8_quantize(torch::Tensor w);
