// The attention of one decoding step (one query per row and head) over a cache of float32, bfloat16, float16 or
// int8 rows. Scores, softmax and the weighted sum stay in float32 whatever the cache's element type, so it is at
// least as precise as PyTorch's SDPA on the same cache. The generic kernel is AVX2; int8 caches take an AVX-512
// one from level AVX512 (head size a multiple of 16).
#include "attention.h"

#include "kernels.h"
#include "simd.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

namespace {

using musicgen::Elem;
using musicgen::KV;

// 8 cache elements as float32; int8 codes before their row's scale, which applies after the sum
inline __m256 load8(const float* p) { return musicgen::widen8(p); }
inline __m256 load8(const c10::BFloat16* p) { return musicgen::widen8(reinterpret_cast<const uint16_t*>(p)); }
inline __m256 load8(const c10::Half* p) { return musicgen::widen8(reinterpret_cast<const musicgen::half_bits*>(p)); }
inline __m256 load8(const int8_t* p) { return musicgen::widen8(p); }

// The factor of a cache row of hd elements: 1 for float rows; an int8 row's float32 scale sits after its codes
// (musicgen/lm.py, kv_quantize).
template <typename T>
inline float row_scale(const T*, int64_t) { return 1.0f; }
inline float row_scale(const int8_t* row, int64_t hd) {
  float s;
  std::memcpy(&s, row + hd, sizeof(float));
  return s;
}

// x (hd floats) -> an int8 cache row: the codes and, after them, the float32 scale of the int8 weights' per-row
// quantiser (int8_quantize_row), which lm.kv_quantize also calls through int8_quantize
inline void quantize_row(const float* x, int64_t hd, int8_t* out) {
  const float s = musicgen::int8_quantize_row(x, hd, out);
  std::memcpy(out + hd, &s, sizeof(float));
}

// Software prefetch of the cache stream (the idea of simd.h's prefetch_weights): the row 16 rows ahead into
// L1, and the one 128 rows ahead into L2. Rows of one head are contiguous in the cache (stride == hd).
template <typename T>
inline void prefetch_row(const T* row, int64_t stride, int64_t hd) {
  const char* near = reinterpret_cast<const char*>(row + 16 * stride);
  const char* far = reinterpret_cast<const char*>(row + 128 * stride);
  for (int64_t b = 0; b < hd * static_cast<int64_t>(sizeof(T)); b += 64) {
    _mm_prefetch(near + b, _MM_HINT_T0);
    _mm_prefetch(far + b, _MM_HINT_T1);
  }
}

// scores[j] -> e^(scores[j] - best), the unnormalised softmax weights of attend() and attend_q8()
inline void exp_scores(float* scores, int64_t n, float best) {
  const __m256 m = _mm256_set1_ps(best);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(scores + j, musicgen::exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), m)));
  for (; j < n; ++j) scores[j] = scores[j] - best >= -87.0f ? std::exp(scores[j] - best) : 0.0f;
}

// One query against n keys/values of one head: out (hd) = softmax(scale q.k_j + bias_j) . v_j.
// k, v: row j at k + j * ks (hd contiguous, hd <= 256); bias: n floats or nullptr; scores: n floats of room.
template <typename TK, typename TV>
void attend(const float* q, int64_t hd, const TK* k, int64_t ks, const TV* v, int64_t vs, int64_t n,
            const float* bias, float scale, float* scores, float* out) {
  const int64_t hd8 = hd - hd % 8;
  float best = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const TK* kj = k + j * ks;
    prefetch_row(kj, ks, hd);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= hd8; d += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(kj + d), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load8(kj + d + 8), a1);
    }
    if (d < hd8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(kj + d), a0);
    float s = musicgen::hsum(_mm256_add_ps(a0, a1));
    for (d = hd8; d < hd; ++d) s += q[d] * static_cast<float>(kj[d]);
    s = s * row_scale(kj, hd) * scale + (bias ? bias[j] : 0.f);
    scores[j] = s;
    best = std::max(best, s);
  }
  if (best == -INFINITY) {   // every key masked with -inf: no weights at all, zeros out (as SDPA gives)
    std::fill(out, out + hd, 0.0f);
    return;
  }
  exp_scores(scores, n, best);
  // the weights are summed in key order, so keys of weight 0 at the end (padding) leave the result bitwise equal
  float sum = 0.0f;
  __m256 acc[32];   // hd <= 256
  float rest[8] = {};
  const int64_t nv = hd8 / 8;
  for (int64_t u = 0; u < nv; ++u) acc[u] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const TV* vj = v + j * vs;
    const float w = scores[j] * row_scale(vj, hd);   // (exactly scores[j] for float rows)
    const __m256 p = _mm256_set1_ps(w);
    prefetch_row(vj, vs, hd);
    sum += scores[j];
    for (int64_t u = 0; u < nv; ++u) acc[u] = _mm256_fmadd_ps(p, load8(vj + 8 * u), acc[u]);
    for (int64_t d = hd8; d < hd; ++d) rest[d - hd8] += w * static_cast<float>(vj[d]);
  }
  const float inv = 1.0f / sum;
  for (int64_t u = 0; u < nv; ++u) _mm256_storeu_ps(out + 8 * u, _mm256_mul_ps(acc[u], _mm256_set1_ps(inv)));
  for (int64_t d = hd8; d < hd; ++d) out[d] = rest[d - hd8] * inv;
}

// attend() for an int8 cache on AVX-512, hd a multiple of 16 (at most 256): the generic kernel's 8-lane widening
// and one horizontal sum per key leave it bound by arithmetic. Here 16 codes widen per instruction and the scores
// of 16 keys are summed across lanes together (hsum16). The same sums up to float rounding; a row's result
// depends only on its own n.
constexpr int64_t PF_NEAR = 32, PF_FAR = 256;   // rows ahead for prefetch_q8

// lane i of the result: the sum of the 16 lanes of v[i]
MUSICGEN_AVX512 inline __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)   // per 128-bit block: (v2i, v2i+1, v2i, v2i+1) partial sums
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {   // per block: (v4i, v4i+1, v4i+2, v4i+3), each over the block's 4 lanes
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)     // blocks (b2i: 0+1, 2+3, b2i+1: 0+1, 2+3)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// prefetch of an int8 cache stream: the row about 2 KB ahead into L1 and the one about 16 KB ahead into L2, as
// prefetch_row does for 16-bit rows of 64 elements
MUSICGEN_AVX512 inline void prefetch_q8(const int8_t* row, int64_t stride) {
  _mm_prefetch(reinterpret_cast<const char*>(row + PF_NEAR * stride), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(row + PF_FAR * stride), _MM_HINT_T1);
}

// 16-lane partial sums of q . k_j over hd = 16 nc codes
MUSICGEN_AVX512 inline __m512 dot_q8(const __m512* qv, int64_t nc, const int8_t* kj) {
  __m512 a = _mm512_mul_ps(qv[0], musicgen::widen16(kj));
  for (int64_t c = 1; c < nc; ++c) a = _mm512_fmadd_ps(qv[c], musicgen::widen16(kj + 16 * c), a);
  return a;
}

MUSICGEN_AVX512 void attend_q8(const float* q, int64_t hd, const int8_t* k, int64_t ks, const int8_t* v,
                                   int64_t vs, int64_t n, const float* bias, float scale, float* scores, float* out) {
  const int64_t nc = hd / 16;
  __m512 qv[16];
  for (int64_t c = 0; c < nc; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  // byte offsets of the scales of 16 consecutive rows (gathered with scale 1)
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i at = _mm512_add_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(ks))),
                                      _mm512_set1_epi32(static_cast<int>(hd)));
  __m512 best16 = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) {
      const int8_t* kj = k + (j + i) * ks;
      prefetch_q8(kj, ks);
      acc[i] = dot_q8(qv, nc, kj);
    }
    const __m512 kscale = _mm512_i32gather_ps(at, k + j * ks, 1);
    __m512 sc = _mm512_mul_ps(_mm512_mul_ps(hsum16(acc), kscale), _mm512_set1_ps(scale));
    if (bias) sc = _mm512_add_ps(sc, _mm512_loadu_ps(bias + j));
    _mm512_storeu_ps(scores + j, sc);
    best16 = _mm512_max_ps(best16, sc);
  }
  float best = _mm512_reduce_max_ps(best16);
  for (; j < n; ++j) {
    const int8_t* kj = k + j * ks;
    const float s = _mm512_reduce_add_ps(dot_q8(qv, nc, kj)) * row_scale(kj, hd) * scale + (bias ? bias[j] : 0.f);
    scores[j] = s;
    best = std::max(best, s);
  }
  if (best == -INFINITY) {   // every key masked with -inf: zeros out (as SDPA gives)
    std::fill(out, out + hd, 0.0f);
    return;
  }
  exp_scores(scores, n, best);
  float sum = 0.0f;   // in key order, as attend()
  __m512 acc[16];
  for (int64_t c = 0; c < nc; ++c) acc[c] = _mm512_setzero_ps();
  for (j = 0; j < n; ++j) {
    const int8_t* vj = v + j * vs;
    prefetch_q8(vj, vs);
    sum += scores[j];
    const __m512 p = _mm512_set1_ps(scores[j] * row_scale(vj, hd));
    for (int64_t c = 0; c < nc; ++c) acc[c] = _mm512_fmadd_ps(p, musicgen::widen16(vj + 16 * c), acc[c]);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / sum);
  for (int64_t c = 0; c < nc; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], inv));
}

// f(static_cast<T*>(nullptr)) with T the cache's element type: float, c10::BFloat16, c10::Half or int8_t
template <typename F>
void with_element(Elem type, F&& f) {
  if (type == Elem::BF16)
    f(static_cast<c10::BFloat16*>(nullptr));
  else if (type == Elem::F16)
    f(static_cast<c10::Half*>(nullptr));
  else if (type == Elem::Q8)
    f(static_cast<int8_t*>(nullptr));
  else
    f(static_cast<float*>(nullptr));
}

}  // namespace

KV musicgen::view_kv(const torch::Tensor& k, const torch::Tensor& v, int64_t hd) {
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.stride(3) == 1 && v.stride(3) == 1 && k.sizes() == v.sizes() &&
              k.scalar_type() == v.scalar_type(), "fused decoder: keys/values (rows, heads, length, hd) expected");
  const auto st = k.scalar_type();
  TORCH_CHECK(st == torch::kFloat32 || st == torch::kBFloat16 || st == torch::kFloat16 || st == torch::kInt8,
              "fused decoder: keys/values must be float32, bfloat16, float16 or int8 rows with scales");
  const Elem type = st == torch::kBFloat16 ? Elem::BF16 : st == torch::kFloat16 ? Elem::F16
                    : st == torch::kInt8   ? Elem::Q8   : Elem::F32;
  TORCH_CHECK(k.size(3) == hd + (type == Elem::Q8 ? 4 : 0),
              "fused decoder: keys/values of head_dim elements (int8: head_dim codes and a float32 scale)");
  return KV{k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
            v.stride(2), type, k.size(2)};
}

void musicgen::write_kv(const KV& c, const float* k, const float* v, int64_t ld, const std::vector<int64_t>& pos,
                        int64_t R, int64_t H, int64_t hd) {
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t h = 0; h < H; ++h) {
      const float* kr = k + r * ld + h * hd;
      const float* vr = v + r * ld + h * hd;
      const int64_t ko = r * c.k_row + h * c.k_head + pos[r] * c.k_pos;
      const int64_t vo = r * c.v_row + h * c.v_head + pos[r] * c.v_pos;
      with_element(c.type, [&](auto* none) {
        using T = std::remove_pointer_t<decltype(none)>;
        T* kd = static_cast<T*>(const_cast<void*>(c.k)) + ko;
        T* vd = static_cast<T*>(const_cast<void*>(c.v)) + vo;
        if constexpr (std::is_same_v<T, int8_t>) {
          quantize_row(kr, hd, kd);
          quantize_row(vr, hd, vd);
        } else {
          for (int64_t d = 0; d < hd; ++d) kd[d] = T(kr[d]), vd[d] = T(vr[d]);
        }
      });
    }
  }
}

void musicgen::attend_rows(const KV& c, const std::vector<int64_t>& n_rows, const float* q, int64_t ldq,
                           const float* bias, float scale, int64_t R, int64_t H, int64_t hd, float* out) {
  const bool q8_avx512 = c.type == Elem::Q8 && hd % 16 == 0 && isa() >= AVX512;
  at::parallel_for(0, R * H, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> scores;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / H, h = t % H, n = n_rows[r];
      if (static_cast<int64_t>(scores.size()) < n) scores.resize(n);
      const float* qp = q + r * ldq + h * hd;
      const float* bp = bias ? bias + r * n : nullptr;
      float* o = out + r * H * hd + h * hd;
      const int64_t ko = r * c.k_row + h * c.k_head, vo = r * c.v_row + h * c.v_head;
      if (q8_avx512) {
        attend_q8(qp, hd, static_cast<const int8_t*>(c.k) + ko, c.k_pos, static_cast<const int8_t*>(c.v) + vo,
                  c.v_pos, n, bp, scale, scores.data(), o);
        continue;
      }
      with_element(c.type, [&](auto* none) {
        using T = std::remove_pointer_t<decltype(none)>;
        attend(qp, hd, static_cast<const T*>(c.k) + ko, c.k_pos, static_cast<const T*>(c.v) + vo, c.v_pos, n, bp,
               scale, scores.data(), o);
      });
    }
  });
}
