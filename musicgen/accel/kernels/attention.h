// The attention of one decoding step over a key/value cache (attention.cpp), for the fused decoder.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace musicgen {

// keys/values as (rows, heads, length, hd) with hd contiguous: element pointers and strides. An int8 cache (Q8)
// holds rows of hd codes and a float32 scale: (rows, heads, length, hd + 4) int8.
enum class Elem { F32, BF16, F16, Q8 };

struct KV {
  const void* k;
  const void* v;
  int64_t k_row, k_head, k_pos, v_row, v_head, v_pos;
  Elem type;
  int64_t length;
};

// The cache view of k and v for heads of hd elements; checks their shapes and dtype.
KV view_kv(const torch::Tensor& k, const torch::Tensor& v, int64_t hd);

// Row r's keys and values of this step (H heads of hd at k + r * ld and v + r * ld) into the cache at pos[r],
// rounded to the cache's element type as PyTorch's .to(dtype) rounds (int8 rows: int8_quantize_row).
void write_kv(const KV& c, const float* k, const float* v, int64_t ld, const std::vector<int64_t>& pos, int64_t R,
              int64_t H, int64_t hd);

// Every (row, head) query (q + r * ldq + h * hd) against the first n[r] keys/values of c:
// out (R, H * hd) = softmax(scale q.k_j + bias_j) . v_j, with bias (R, n[r]) additive or nullptr (the text,
// where every row has the same length). Float32 arithmetic whatever the cache's element type.
void attend_rows(const KV& c, const std::vector<int64_t>& n, const float* q, int64_t ldq, const float* bias,
                 float scale, int64_t R, int64_t H, int64_t hd, float* out);

}  // namespace musicgen
