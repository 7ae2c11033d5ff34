// One LSTM layer over time (EnCodec's bottleneck: 2 layers of 1024 units at 50 frames/s), PyTorch's gate order
// i, f, g, o. xw (T, B, 4H): the input projections x W_ih^T + b_ih + b_hh of every step, computed beforehand in
// one product; each step adds h W_hh^T with the dense row kernel (one pass over W_hh, 16 MB, for all B rows,
// where PyTorch's LSTM reads it once per row), then the gates in float32 (sigmoid and tanh from exp8, relative
// error about 1e-7). Returns y (T, B, H) and the last (h, c).
#include "kernels.h"
#include "simd.h"

namespace {

inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, musicgen::exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

inline __m256 tanh8(__m256 x) {   // 2 sigmoid(2x) - 1
  return _mm256_fmsub_ps(_mm256_set1_ps(2.0f), sigmoid8(_mm256_add_ps(x, x)), _mm256_set1_ps(1.0f));
}

}  // namespace

std::vector<torch::Tensor> lstm_layer(torch::Tensor xw, torch::Tensor w_hh, torch::Tensor h0, torch::Tensor c0) {
  TORCH_CHECK(xw.dim() == 3 && w_hh.dim() == 2 && xw.scalar_type() == torch::kFloat32 &&
              w_hh.scalar_type() == torch::kFloat32, "lstm_layer: float32 xw (T, B, 4H) and w_hh (4H, H)");
  const int64_t T = xw.size(0), B = xw.size(1), H = w_hh.size(1);
  TORCH_CHECK(w_hh.size(0) == 4 * H && xw.size(2) == 4 * H && H % 8 == 0, "lstm_layer: shapes, H % 8 == 0");
  TORCH_CHECK(h0.sizes() == c0.sizes() && h0.numel() == B * H && h0.scalar_type() == torch::kFloat32 &&
              c0.scalar_type() == torch::kFloat32, "lstm_layer: float32 h0, c0 (B, H)");
  xw = xw.contiguous();
  w_hh = w_hh.contiguous();
  torch::Tensor h = h0.reshape({B, H}).contiguous().clone(), c = c0.reshape({B, H}).contiguous().clone();
  torch::Tensor y = torch::empty({T, B, H}, xw.options());
  std::vector<float> g(B * 4 * H);
  const float* xp = xw.data_ptr<float>();
  const float* wp = w_hh.data_ptr<float>();
  float *hp = h.data_ptr<float>(), *cp = c.data_ptr<float>(), *yp = y.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    musicgen::dense_gemv_raw(hp, B, H, wp, musicgen::Dense::F32, nullptr, 4 * H, g.data());
    for (int64_t b = 0; b < B; ++b) {
      const float* gb = g.data() + b * 4 * H;
      const float* xb = xp + (t * B + b) * 4 * H;
      for (int64_t j = 0; j < H; j += 8) {
        auto gate = [&](int k) {
          return _mm256_add_ps(_mm256_loadu_ps(gb + k * H + j), _mm256_loadu_ps(xb + k * H + j));
        };
        const __m256 i = sigmoid8(gate(0)), f = sigmoid8(gate(1)), gg = tanh8(gate(2)), o = sigmoid8(gate(3));
        const __m256 cn = _mm256_fmadd_ps(f, _mm256_loadu_ps(cp + b * H + j), _mm256_mul_ps(i, gg));
        const __m256 hn = _mm256_mul_ps(o, tanh8(cn));
        _mm256_storeu_ps(cp + b * H + j, cn);
        _mm256_storeu_ps(hp + b * H + j, hn);
        _mm256_storeu_ps(yp + (t * B + b) * H + j, hn);
      }
    }
  }
  return {y, h, c};
}
