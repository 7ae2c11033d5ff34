// Weight-only int8 matrix-vector product for decoding on x86 CPUs with AVX2 + FMA.
//
//   y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] + bias[n]      x float32 (M, K), q int8 (N, K)
//
// Decoding feeds a handful of rows (the conditional and unconditional row of each request), so the work is
// one pass over the weight; the kernel widens 32 int8 weights at a time to float32 and multiplies them into
// up to four activation rows with four independent accumulators each (FMA latency, not throughput, is the
// limit with one). Output channels are split across threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  s = _mm_add_ss(s, sh);
  return _mm_cvtss_f32(s);
}

// rows x[0..MB) (leading dimension K) times weight row w -> out[m * ldy]
template <int MB>
inline void dot_rows(const float* x, int64_t K, const int8_t* w, float scale, float bias, float* out, int64_t ldy) {
  __m256 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + 2048), _MM_HINT_T0);   // measured: +5-25 %
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
    for (int m = 0; m < MB; ++m) {
      const float* xm = x + m * K + k;
      acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc[m][1]);
      acc[m][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), acc[m][2]);
      acc[m][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), acc[m][3]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    __m256 a = _mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]));
    float s = hsum(a);
    for (int64_t kk = k; kk < K; ++kk) s += static_cast<float>(w[kk]) * x[m * K + kk];
    out[m * ldy] = s * scale + bias;
  }
}

}  // namespace

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "int8_gemv: x (M, K) and q (N, K) expected");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "int8_gemv: x must be float32");
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.is_contiguous(), "int8_gemv: q must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.numel() == q.size(0), "int8_gemv: float32 scales (N,)");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({M, N}, x.options());
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias->to(torch::kFloat32).contiguous();
    TORCH_CHECK(b.numel() == N, "int8_gemv: bias must be (N,)");
  }
  const float* bp = bias.has_value() ? b.data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.contiguous().data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* w = qp + n * K;
      const float bn = bp ? bp[n] : 0.f;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) dot_rows<4>(xp + m * K, K, w, sp[n], bn, yp + m * N + n, N);
      for (; m + 2 <= M; m += 2) dot_rows<2>(xp + m * K, K, w, sp[n], bn, yp + m * N + n, N);
      for (; m < M; ++m) dot_rows<1>(xp + m * K, K, w, sp[n], bn, yp + m * N + n, N);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_gemv", &int8_gemv, "weight-only int8 matrix-vector product (AVX2 + FMA)");
}
