// dense_gemv: float32, bfloat16 or float16 weights times float32 activations, for the few-row products of
// unquantised layers (decoding), where BLAS reads 16-bit weights slowly. The weights are widened exactly to
// float32 and the sums are float32: the row kernels of rows.h at every level, and from AMX_DENSE_MIN_ROWS rows
// at level AMX the bfloat16 tiles for bfloat16 weights (float16 weights do not widen exactly to bfloat16).
#include "kernels.h"
#include "rows.h"

namespace {

// Two accumulators per row are enough for the weight stream; blocks of up to 8 rows (16 lanes) or 4 (8 lanes)
// fill the registers without spilling.
template <typename W>
using DenseAvx2 = musicgen::Avx2Dot<W, 2, 4>;
template <typename W>
using DenseAvx512 = musicgen::Avx512Dot<W, 2, 8>;

template <typename W>
void dense_rows(musicgen::Isa level, const float* x, int64_t M, int64_t K, const W* w, const float* bias, int64_t N,
                float* y) {
  if (level >= musicgen::AVX512)
    musicgen::gemv_rows<DenseAvx512<W>>(x, M, K, w, nullptr, bias, N, y);
  else
    musicgen::gemv_rows<DenseAvx2<W>>(x, M, K, w, nullptr, bias, N, y);
}

}  // namespace

std::optional<musicgen::Dense> musicgen::dense_type(c10::ScalarType t) {
  if (t == torch::kFloat32) return Dense::F32;
  if (t == torch::kBFloat16) return Dense::BF16;
  if (t == torch::kFloat16) return Dense::F16;
  return std::nullopt;
}

void musicgen::dense_gemv_raw(const float* x, int64_t M, int64_t K, const void* w, Dense t, const float* bias,
                              int64_t N, float* y) {
  const Isa level = isa();
  if (t == Dense::BF16 && level >= AMX && M >= AMX_DENSE_MIN_ROWS && N % 16 == 0 && K % 32 == 0)
    amx_bf16_gemv(x, M, K, static_cast<const uint16_t*>(w), bias, N, y);
  else if (t == Dense::BF16)
    dense_rows(level, x, M, K, static_cast<const uint16_t*>(w), bias, N, y);
  else if (t == Dense::F16)
    dense_rows(level, x, M, K, static_cast<const half_bits*>(w), bias, N, y);
  else
    dense_rows(level, x, M, K, static_cast<const float*>(w), bias, N, y);
}

torch::Tensor dense_gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "dense_gemv: x (M, K) and w (N, K) expected");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "dense_gemv: x must be float32");
  const auto type = musicgen::dense_type(w.scalar_type());
  TORCH_CHECK(type.has_value() && w.is_contiguous(), "dense_gemv: w must be contiguous float32, bfloat16 or float16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  x = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  torch::Tensor b;
  const float* bp = musicgen::float_bias(bias, N, b, "dense_gemv");
  musicgen::dense_gemv_raw(x.data_ptr<float>(), M, K, w.data_ptr(), *type, bp, N, y.data_ptr<float>());
  return y;
}
