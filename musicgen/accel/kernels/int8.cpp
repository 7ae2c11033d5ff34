// int8_gemv: weight-only int8 (a float32 scale per output channel), float32 activations: the exact products of
// the int8 weights. Decoding's few rows take a row kernel: AVX2 (below) or, from level AVX512, 16 lanes wide
// (rows.h); from AMX_INT8_MIN_ROWS rows at level AMX the bfloat16 tiles (amx.cpp), where the row kernels are bound
// by arithmetic.
#include "kernels.h"
#include "rows.h"

namespace {

// AVX2: rows x[0..MB) times weight row w over all of K, four accumulators per row at every row count (a row's
// sums must not depend on it); 32 weights widen at a time. The row driver of rows.h (dense weights) was up to 20 %
// slower here at 2-4 rows (docs/kernels.md), so int8 keeps this kernel.
template <int MB>
inline void dot_rows_avx2(const float* x, int64_t K, const int8_t* w, float scale, float bias, float* out,
                          int64_t ldy) {
  __m256 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    musicgen::prefetch_weights(reinterpret_cast<const uint8_t*>(w + k));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    const __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
    for (int m = 0; m < MB; ++m) {
      const float* xm = x + m * K + k;
      acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc[m][1]);
      acc[m][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), acc[m][2]);
      acc[m][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), acc[m][3]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    const __m256 a = _mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]));
    float s = musicgen::hsum(a);
    for (int64_t kk = k; kk < K; ++kk) s += static_cast<float>(w[kk]) * x[m * K + kk];
    out[m * ldy] = s * scale + bias;
  }
}

// AVX-512: the row kernel of rows.h with four accumulators per row at every row count. At one or two rows the
// widening of the weights, not the weight stream, is the limit, and 64 weights in four chains per iteration is
// what made this kernel faster than AVX2 there. Blocks of 8 rows run in two passes over each chunk (rows.h).
using Int8Avx512 = musicgen::Avx512Dot<int8_t, 4, 8>;

}  // namespace

void musicgen::int8_gemv_raw(const float* x, int64_t M, int64_t K, const int8_t* q, const float* scale,
                             const float* bias, int64_t N, float* y) {
  const Isa level = isa();
  if (level >= AMX && M >= AMX_INT8_MIN_ROWS && N % 16 == 0 && K % 32 == 0) {
    amx_bf16_gemv(x, M, K, q, scale, bias, N, y);
  } else if (level >= AVX512) {
    gemv_rows<Int8Avx512>(x, M, K, q, scale, bias, N, y);
  } else {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const float bn = bias ? bias[n] : 0.f;
        row_blocks<4>(M, [&](auto mb, int64_t m) {
          dot_rows_avx2<decltype(mb)::value>(x + m * K, K, q + n * K, scale[n], bn, y + m * N + n, N);
        });
      }
    });
  }
}

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "int8_gemv: x (M, K) and q (N, K) expected");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "int8_gemv: x must be float32");
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.is_contiguous(), "int8_gemv: q must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.numel() == q.size(0), "int8_gemv: float32 scales (N,)");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({M, N}, x.options());
  torch::Tensor b, s = scale.contiguous();
  const float* bp = musicgen::float_bias(bias, N, b, "int8_gemv");
  musicgen::int8_gemv_raw(x.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), s.data_ptr<float>(), bp, N,
                          y.data_ptr<float>());
  return y;
}
