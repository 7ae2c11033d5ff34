// What the kernel sources share: the instruction-set levels they dispatch on, and the raw (pointer) entry points
// of each kernel family, which the tensor wrappers, the fused decoder and the LSTM call. How the kernels work and
// what they measured: docs/kernels.md.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace musicgen {

// Instruction-set levels, each including the ones before it. Every kernel has a path at AVX2 (the build's
// baseline: AVX2, FMA, F16C); the higher paths are compiled through target attributes and taken at run time, by
// what the CPU and the OS report, never by a timing.
enum Isa : int {
  AVX2 = 0,
  AVX512 = 1,        // + AVX-512 F/BW/VL/DQ: 16-lane row kernels (int8, dense), the int8-cache attention
  AVX512_VNNI = 2,   // + VNNI: the int4 group dot products in one instruction
  AMX = 3,           // + AMX tiles (int8, bfloat16), AVX512-BF16, and Linux's grant of the tile state
};

Isa host_isa();                  // the best level this CPU and OS allow (isa.cpp)
Isa isa();                       // the level the kernels take now: host_isa(), capped by set_isa_limit
void set_isa_limit(int level);   // process-wide (tests run every path the host can run; see __init__.py)

// The row counts from which products go to the AMX tiles (at level AMX, with N % 16 == 0, and K % 32 == 0 for
// the bfloat16 tiles). With fewer rows a product is bound by the weight stream, where the row kernels are as fast.
constexpr int64_t AMX_INT8_MIN_ROWS = 6, AMX_DENSE_MIN_ROWS = 6, AMX_INT4_MIN_ROWS = 4;

// int8.cpp. y (M, N) = x (M, K) . q (N, K)^T * scale[n] + bias[n]; bias may be nullptr.
void int8_gemv_raw(const float* x, int64_t M, int64_t K, const int8_t* q, const float* scale, const float* bias,
                   int64_t N, float* y);

// The int4 kernel quantises x to int8 per group of 32 first; it keeps that copy here between calls.
struct Int4Scratch {
  std::vector<int8_t> xq;
  std::vector<float> xs, xc;
};

// int4.cpp. y (M, N) = quant8(x) (M, K) . dequant(w (N, K / 2), scales (N, K / 32) float16 bits)^T + bias[n];
// K % 64 == 0.
void int4_gemv_raw(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scales,
                   const float* bias, int64_t N, float* y, Int4Scratch& scratch);

// The element type of a dense weight: float32, or bfloat16 / float16 bits (both widen exactly to float32).
enum class Dense { F32, BF16, F16 };
std::optional<Dense> dense_type(c10::ScalarType t);   // none for other dtypes

// dense.cpp. y (M, N) = x (M, K) . w (N, K)^T + bias[n], w of element type t widened exactly; bias may be nullptr.
void dense_gemv_raw(const float* x, int64_t M, int64_t K, const void* w, Dense t, const float* bias, int64_t N,
                    float* y);

// amx.cpp (level AMX only). y (M, N) = x (M, K) . w (N, K)^T (* scale[n]) + bias[n] on the bfloat16 tiles, w int8
// with per-row scales or bfloat16 bits; N % 16 == 0, K % 32 == 0.
void amx_bf16_gemv(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, const float* bias,
                   int64_t N, float* y);
void amx_bf16_gemv(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias, int64_t N, float* y);
// The int4 product on the int8 tiles, from activations already quantised per group of 32 (codes xq (M, K),
// scales xs (M, K / 32)); N % 16 == 0.
void amx_int4_gemv(const int8_t* xq, const float* xs, int64_t M, int64_t K, const uint8_t* w, const uint16_t* ws,
                   const float* bias, int64_t N, float* y);

// quantize.cpp. One row v (K floats) -> int8 codes round(v / s) (nearest even, within +-127) in q; returns the
// scale s = max(max|v|, 1e-12) / 127. int8_quantize's rows (weights) and the fused decoder's int8 cache rows.
float int8_quantize_row(const float* v, int64_t K, int8_t* q);

// An optional (N,) bias as contiguous float32 (kept alive in `keep`); nullptr without one.
inline const float* float_bias(const c10::optional<torch::Tensor>& bias, int64_t N, torch::Tensor& keep,
                               const char* who) {
  if (!bias.has_value()) return nullptr;
  keep = bias->to(torch::kFloat32).contiguous();
  TORCH_CHECK(keep.numel() == N, who, ": bias must be (N,)");
  return keep.data_ptr<float>();
}

}  // namespace musicgen

// The tensor functions of the Python module (bindings.cpp).
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias);
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor qw, torch::Tensor scales, c10::optional<torch::Tensor> bias);
torch::Tensor dense_gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
torch::Tensor int4_dequant(torch::Tensor qw, torch::Tensor scales, bool bf16);
std::vector<torch::Tensor> int4_quantize(torch::Tensor w);
std::vector<torch::Tensor> int8_quantize(torch::Tensor w);
std::vector<torch::Tensor> lstm_layer(torch::Tensor xw, torch::Tensor w_hh, torch::Tensor h0, torch::Tensor c0);
void bind_fused_decoder(pybind11::module_& m);
