// int8_gemv: weight-only int8 (a float32 scale per output channel), float32 activations: the exact products of
// the int8 weights. Decoding's few rows take the row kernels (rows.h), 16 lanes wide from level AVX512; from
// AMX_INT8_MIN_ROWS rows at level AMX the bfloat16 tiles (amx.cpp), where the row kernels are bound by arithmetic.
#include "kernels.h"
#include "rows.h"

namespace {

// Four accumulators per row at every row count (a row's sums must not depend on it): at one or two rows the
// widening of the weights, not the weight stream, is the limit, and 64 weights per iteration in four chains is
// what the AVX-512 kernel was measured with there (docs/kernels.md). At AVX-512 a block holds up to 6 rows: 24
// accumulators and 4 widened vectors take 28 of the 32 registers (blocks of 8 spilled, blocks of 4 widened each
// weight twice for 8 rows). At AVX2, blocks of 4 rows, as the kernel was before.
using Int8Avx2 = musicgen::Avx2Dot<int8_t, 4, 4>;
using Int8Avx512 = musicgen::Avx512Dot<int8_t, 4, 6>;

}  // namespace

void musicgen::int8_gemv_raw(const float* x, int64_t M, int64_t K, const int8_t* q, const float* scale,
                             const float* bias, int64_t N, float* y) {
  const Isa level = isa();
  if (level >= AMX && M >= AMX_INT8_MIN_ROWS && N % 16 == 0 && K % 32 == 0)
    amx_bf16_gemv(x, M, K, q, scale, bias, N, y);
  else if (level >= AVX512)
    gemv_rows<Int8Avx512>(x, M, K, q, scale, bias, N, y);
  else
    gemv_rows<Int8Avx2>(x, M, K, q, scale, bias, N, y);
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
