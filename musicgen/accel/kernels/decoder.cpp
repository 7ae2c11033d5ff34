// All decoder layers of one decoding step (one new position per row) in a single call, for quantised models
// on x86 CPUs (AVX2 + FMA + F16C), and float32, bfloat16 or float16 models on AVX-512 CPUs (dense weights
// through dense_gemv_raw).
//
// With 4-bit weights a step of musicgen-small reads about 200 MB, which the kernels of gemv.cpp stream in about
// 11 ms on two cores; driven from Python the whole step took about 24 ms (at position 300), the rest being
// attention over the cache and some 30 small PyTorch operations per layer (norms, views, GELU, adds), each
// paying its dispatch. Here the layer loop,
// the norms, both attentions and the activation run in C++ on preallocated buffers, and the products call the
// kernels directly. What it computes is the eager path of musicgen/lm.py for T = 1:
//
//   x += out(attend(q, cache_k[:pos+1], cache_v[:pos+1]))   q, k, v = qkv(norm1(x)); k, v written at pos
//   x += cross_out(attend(cross_q(norm_cross(x)), text_k, text_v, text_bias))      (text models only)
//   x += fc2(act(fc1(norm2(x))))
//
// Attention keeps float32 arithmetic (scores, softmax and the weighted sum) whatever the cache dtype (float32,
// bfloat16 or float16), so it is at least as precise as PyTorch's SDPA on the same cache. exp and erf are vectorised
// polynomial approximations (relative error about 1e-7, float32 rounding).
#include "gemv.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace {

// e^x for x <= 88 (Cephes expf: range reduction by ln 2, degree-6 polynomial), exactly 0 below -87 (as a masked
// attention score must weigh: padded text positions then change nothing)
inline __m256 exp8(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), live);
}

// exact GELU 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7)
inline __m256 gelu8(__m256 x) {
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
  const __m256 sign = _mm256_and_ps(z, _mm256_set1_ps(-0.0f));
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(a, _mm256_set1_ps(0.3275911f), one));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 erf_a = _mm256_fnmadd_ps(p, exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), a), a)),
                                        _mm256_set1_ps(1.0f));
  const __m256 erf_z = _mm256_or_ps(erf_a, sign);
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), erf_z));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {   // bfloat16 is the top half of a float32
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const int8_t* p) {   // int8 cache codes (their row's scale applies after the sum)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

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

// Software prefetch of the cache stream (the idea of gemv.cpp's prefetch_weights): the row 16 rows ahead into
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
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(scores + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), m)));
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
// and one horizontal sum per key left it bound by arithmetic (about 17 GB/s of cache at 8 rows on two cores,
// against 22 for a bfloat16 cache). Here 16 codes widen per instruction and the scores of 16 keys are summed
// across lanes together (hsum16). Same sums up to float rounding; row results depend only on n, not on R.
#define MUSICGEN_AVX512_ATT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
constexpr int64_t PF_NEAR = 32, PF_FAR = 256;   // rows ahead (tried 16/128, 64/512, 32/1024: no better)

// lane i of the result: the sum of the 16 lanes of v[i]
MUSICGEN_AVX512_ATT inline __m512 hsum16(const __m512* v) {
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

// prefetch of an int8 cache stream: the row about 2 KB ahead into L1 and the one about 16 KB ahead into L2 (as
// prefetch_row does for bfloat16 rows; in rows, prefetch_row's distances were 4 times shorter here)
MUSICGEN_AVX512_ATT inline void prefetch_q8(const int8_t* row, int64_t stride) {
  _mm_prefetch(reinterpret_cast<const char*>(row + PF_NEAR * stride), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(row + PF_FAR * stride), _MM_HINT_T1);
}

// 16-lane partial sums of q . k_j over hd = 16 nc codes
MUSICGEN_AVX512_ATT inline __m512 dot_q8(const __m512* qv, int64_t nc, const int8_t* kj) {
  __m512 a = _mm512_mul_ps(qv[0], musicgen::widen16_i8(kj));
  for (int64_t c = 1; c < nc; ++c) a = _mm512_fmadd_ps(qv[c], musicgen::widen16_i8(kj + 16 * c), a);
  return a;
}

MUSICGEN_AVX512_ATT void attend_q8(const float* q, int64_t hd, const int8_t* k, int64_t ks, const int8_t* v,
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
    for (int64_t c = 0; c < nc; ++c) acc[c] = _mm512_fmadd_ps(p, musicgen::widen16_i8(vj + 16 * c), acc[c]);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / sum);
  for (int64_t c = 0; c < nc; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], inv));
}

// keys/values as (rows, heads, length, hd) with hd contiguous: element pointers and strides. An int8 cache
// (Q8) holds rows of hd codes and a float32 scale: (rows, heads, length, hd + 4) int8.
enum class Elem { F32, BF16, F16, Q8 };

struct KV {
  const void* k;
  const void* v;
  int64_t k_row, k_head, k_pos, v_row, v_head, v_pos;
  Elem type;
  int64_t length;
};

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

// hd: the head size; an int8 cache's rows are 4 bytes longer
KV view_kv(const torch::Tensor& k, const torch::Tensor& v, int64_t hd) {
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

struct Linear {
  enum Kind { INT4, INT8, DENSE } kind = INT4;
  // int4: packed uint8 + float16 group scales; int8: int8 + float32 scales; dense: float32, bfloat16 or float16,
  // no scales.
  // Bias: float32 or {}.
  torch::Tensor w, s, b;
  int64_t N = 0, K = 0;

  void operator()(const float* x, int64_t M, float* y, musicgen::Int4Scratch& scratch) const {
    const float* bias = b.defined() ? b.data_ptr<float>() : nullptr;
    if (kind == INT4)
      musicgen::int4_gemv_raw(x, M, K, w.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>()),
                              bias, N, y, scratch);
    else if (kind == INT8)
      musicgen::int8_gemv_raw(x, M, K, w.data_ptr<int8_t>(), s.data_ptr<float>(), bias, N, y);
    else
      musicgen::dense_gemv_raw(x, M, K, w.data_ptr(), *musicgen::dense_type(w.scalar_type()), bias, N, y);
  }
};

struct Layer {
  torch::Tensor norm1_w, norm1_b, norm_cross_w, norm_cross_b, norm2_w, norm2_b;   // float32 (D,)
  Linear qkv, out, cross_q, cross_out, fc1, fc2;
  bool cross = false;
};

Linear make_linear(const std::string& kind, torch::Tensor w, c10::optional<torch::Tensor> s,
                   c10::optional<torch::Tensor> b, int64_t in_features) {
  Linear l;
  TORCH_CHECK(kind == "int4" || kind == "int8" || kind == "dense",
              "fused decoder: linear kind must be int4, int8 or dense");
  l.kind = kind == "int4" ? Linear::INT4 : kind == "int8" ? Linear::INT8 : Linear::DENSE;
  l.N = w.size(0);
  l.K = in_features;
  TORCH_CHECK(l.kind == Linear::DENSE || s.has_value(), "fused decoder: quantised weights need their scales");
  if (l.kind == Linear::INT4) {
    TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.is_contiguous() && w.size(1) * 2 == in_features &&
                in_features % 64 == 0, "fused decoder: int4 weights (N, K / 2) uint8 with K % 64 == 0");
    TORCH_CHECK(s->scalar_type() == torch::kFloat16 && s->is_contiguous() && s->numel() == l.N * (in_features / 32),
                "fused decoder: int4 scales (N, K / 32) float16");
  } else if (l.kind == Linear::INT8) {
    TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.is_contiguous() && w.size(1) == in_features,
                "fused decoder: int8 weights (N, K)");
    TORCH_CHECK(s->scalar_type() == torch::kFloat32 && s->is_contiguous() && s->numel() == l.N,
                "fused decoder: int8 scales (N,) float32");
  } else {
    TORCH_CHECK(avx512_available(), "fused decoder: dense weights need AVX-512");
    TORCH_CHECK(musicgen::dense_type(w.scalar_type()).has_value() && w.is_contiguous() && w.size(1) == in_features,
                "fused decoder: dense weights (N, K) float32, bfloat16 or float16, contiguous");
  }
  if (s.has_value()) l.s = *s;
  l.w = w;
  if (b.has_value()) {
    l.b = b->to(torch::kFloat32).contiguous();
    TORCH_CHECK(l.b.numel() == l.N, "fused decoder: bias must be (N,)");
  }
  return l;
}

}  // namespace

class FusedDecoder {
 public:
  FusedDecoder(int64_t dim, int64_t heads, int64_t ffn, double eps, std::string activation)
      : D_(dim), H_(heads), hd_(dim / heads), F_(ffn), eps_(static_cast<float>(eps)), gelu_(activation == "gelu") {
    TORCH_CHECK(dim % heads == 0 && hd_ <= 256, "fused decoder: heads must divide dim, head_dim <= 256");
    TORCH_CHECK(dim % 8 == 0 && ffn % 8 == 0, "fused decoder: dim and ffn_dim must be multiples of 8");
    TORCH_CHECK(activation == "gelu" || activation == "relu", "fused decoder: activation must be gelu or relu");
  }

  // norms: [norm1_w, norm1_b, norm2_w, norm2_b(, norm_cross_w, norm_cross_b)];
  // linears: qkv, out, fc1, fc2(, cross_q, cross_out) as (kind, weight, scales or None (dense), bias or None)
  void add_layer(std::vector<torch::Tensor> norms, std::vector<std::string> kinds, std::vector<torch::Tensor> weights,
                 std::vector<c10::optional<torch::Tensor>> scales, std::vector<c10::optional<torch::Tensor>> biases) {
    const bool cross = norms.size() == 6;
    TORCH_CHECK((norms.size() == 4 || cross) && kinds.size() == norms.size() && weights.size() == kinds.size() &&
                scales.size() == kinds.size() && biases.size() == kinds.size(),
                "fused decoder: 4 norm tensors and 4 linears per layer, 6 and 6 with cross-attention");
    for (auto& t : norms) {
      TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.numel() == D_, "fused decoder: float32 (dim,) norms");
      t = t.contiguous();
    }
    const int64_t in[6] = {D_, D_, D_, F_, D_, D_};
    const int64_t outs[6] = {3 * D_, D_, F_, D_, D_, D_};
    std::vector<Linear> lin;
    for (size_t i = 0; i < kinds.size(); ++i) {
      lin.push_back(make_linear(kinds[i], weights[i], scales[i], biases[i], in[i]));
      TORCH_CHECK(lin.back().N == outs[i], "fused decoder: linear ", i, " has ", lin.back().N, " outputs, expected ",
                  outs[i]);
    }
    Layer l;
    l.norm1_w = norms[0], l.norm1_b = norms[1], l.norm2_w = norms[2], l.norm2_b = norms[3];
    l.qkv = lin[0], l.out = lin[1], l.fc1 = lin[2], l.fc2 = lin[3];
    if (cross) {
      l.cross = true;
      l.norm_cross_w = norms[4], l.norm_cross_b = norms[5];
      l.cross_q = lin[4], l.cross_out = lin[5];
    }
    layers_.push_back(std::move(l));
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x (R, D) float32, row r at position positions[r] (one entry: every row) -> (R, D) after every layer.
  // Writes each row's keys/values at its position into the caches (each (>= R, H, max_len, hd)), and row r
  // attends to its positions 0..positions[r]; cross_k/v per layer (>= R, H, S, hd) and bias (R, S) additive,
  // for text models. Rows past R in the caches are left alone (the service's slots).
  torch::Tensor step(torch::Tensor x, std::vector<int64_t> positions, std::vector<torch::Tensor> cache_k,
                     std::vector<torch::Tensor> cache_v, std::vector<torch::Tensor> cross_k,
                     std::vector<torch::Tensor> cross_v, c10::optional<torch::Tensor> cross_bias) {
    const int64_t L = num_layers();
    TORCH_CHECK(x.dim() == 2 && x.size(1) == D_ && x.scalar_type() == torch::kFloat32,
                "fused decoder: x (R, D) float32");
    TORCH_CHECK(static_cast<int64_t>(cache_k.size()) == L && static_cast<int64_t>(cache_v.size()) == L,
                "fused decoder: one cache per layer");
    const bool text = L > 0 && layers_[0].cross;
    TORCH_CHECK(!text || (static_cast<int64_t>(cross_k.size()) == L && static_cast<int64_t>(cross_v.size()) == L),
                "fused decoder: text keys/values for every layer");
    const int64_t R = x.size(0);
    TORCH_CHECK(positions.size() == 1 || static_cast<int64_t>(positions.size()) == R,
                "fused decoder: one position, or one per row");
    std::vector<int64_t> pos(R, positions[0]), seen(R);
    for (int64_t r = 0; r < R; ++r) {
      if (positions.size() > 1) pos[r] = positions[r];
      TORCH_CHECK(pos[r] >= 0, "fused decoder: negative position");
      seen[r] = pos[r] + 1;
    }
    const int64_t last = *std::max_element(pos.begin(), pos.end());
    std::lock_guard<std::mutex> lock(busy_);   // the buffers below are shared: one step at a time per decoder
    torch::Tensor y = x.contiguous().clone();
    torch::Tensor bias;
    if (text && cross_bias.has_value()) {
      bias = cross_bias->to(torch::kFloat32).reshape({R, -1}).contiguous();
    }
    h_.resize(R * std::max(D_, F_));
    big_.resize(R * std::max(3 * D_, F_));
    att_.resize(R * D_);
    float* xp = y.data_ptr<float>();
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd_));
    for (int64_t i = 0; i < L; ++i) {
      const Layer& l = layers_[i];
      // self-attention over positions 0..pos
      KV self = view_kv(cache_k[i], cache_v[i], hd_);
      TORCH_CHECK(cache_k[i].size(0) >= R && cache_k[i].size(1) == H_ && last < self.length,
                  "fused decoder: caches (R, H, max_len, hd) with every position < max_len");
      norm(xp, R, l.norm1_w, l.norm1_b, h_.data());
      l.qkv(h_.data(), R, big_.data(), scratch_);
      write_kv(self, pos, R);
      attention(self, seen, big_.data(), 3 * D_, nullptr, scale, R);
      l.out(att_.data(), R, h_.data(), scratch_);
      add(xp, h_.data(), R * D_);
      if (l.cross) {   // cross-attention to the text
        KV txt = view_kv(cross_k[i], cross_v[i], hd_);
        TORCH_CHECK(cross_k[i].size(0) >= R && cross_k[i].size(1) == H_,
                    "fused decoder: text keys/values (R, H, S, hd)");
        TORCH_CHECK(!bias.defined() || bias.size(1) == txt.length, "fused decoder: text bias (R, S)");
        norm(xp, R, l.norm_cross_w, l.norm_cross_b, h_.data());
        l.cross_q(h_.data(), R, big_.data(), scratch_);
        attention(txt, std::vector<int64_t>(R, txt.length), big_.data(), D_,
                  bias.defined() ? bias.data_ptr<float>() : nullptr, scale, R);
        l.cross_out(att_.data(), R, h_.data(), scratch_);
        add(xp, h_.data(), R * D_);
      }
      norm(xp, R, l.norm2_w, l.norm2_b, h_.data());   // feed-forward
      l.fc1(h_.data(), R, big_.data(), scratch_);
      activate(big_.data(), R * F_);
      l.fc2(big_.data(), R, h_.data(), scratch_);
      add(xp, h_.data(), R * D_);
    }
    return y;
  }

 private:
  void norm(const float* x, int64_t R, const torch::Tensor& w, const torch::Tensor& b, float* out) const {
    const float* wp = w.data_ptr<float>();
    const float* bp = b.data_ptr<float>();
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * D_;
      float* o = out + r * D_;
      __m256 s = _mm256_setzero_ps();
      for (int64_t d = 0; d < D_; d += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(xr + d));
      const float mean = musicgen::hsum(s) / D_;
      const __m256 m = _mm256_set1_ps(mean);
      __m256 v = _mm256_setzero_ps();
      for (int64_t d = 0; d < D_; d += 8) {
        const __m256 c = _mm256_sub_ps(_mm256_loadu_ps(xr + d), m);
        v = _mm256_fmadd_ps(c, c, v);
      }
      const __m256 inv = _mm256_set1_ps(1.0f / std::sqrt(musicgen::hsum(v) / D_ + eps_));
      for (int64_t d = 0; d < D_; d += 8) {
        const __m256 c = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + d), m), inv);
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(c, _mm256_loadu_ps(wp + d), _mm256_loadu_ps(bp + d)));
      }
    }
  }

  static void add(float* x, const float* y, int64_t n) {
    for (int64_t i = 0; i < n; i += 8)
      _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }

  void activate(float* x, int64_t n) const {
    if (gelu_) {
      for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, gelu8(_mm256_loadu_ps(x + i)));
    } else {
      for (int64_t i = 0; i < n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_max_ps(_mm256_loadu_ps(x + i), _mm256_setzero_ps()));
    }
  }

  // keys and values of this step (in the qkv output, (R, 3, H, hd) per row) into the cache at each row's position
  void write_kv(const KV& c, const std::vector<int64_t>& pos, int64_t R) const {
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t h = 0; h < H_; ++h) {
        const float* k = big_.data() + r * 3 * D_ + D_ + h * hd_;
        const float* v = k + D_;
        const int64_t ko = r * c.k_row + h * c.k_head + pos[r] * c.k_pos;
        const int64_t vo = r * c.v_row + h * c.v_head + pos[r] * c.v_pos;
        with_element(c.type, [&](auto* none) {   // rounded to nearest even, as PyTorch's .to(dtype)
          using T = std::remove_pointer_t<decltype(none)>;
          T* kd = static_cast<T*>(const_cast<void*>(c.k)) + ko;
          T* vd = static_cast<T*>(const_cast<void*>(c.v)) + vo;
          if constexpr (std::is_same_v<T, int8_t>) {
            quantize_row(k, hd_, kd);
            quantize_row(v, hd_, vd);
          } else {
            for (int64_t d = 0; d < hd_; ++d) kd[d] = T(k[d]), vd[d] = T(v[d]);
          }
        });
      }
    }
  }

  // every (row, head) query (q at big_ + r * ldq + h * hd) against the first n[r] keys of c -> att_ (R, D);
  // bias: (R, n[r]) when given (the text, where every row has the same length)
  void attention(const KV& c, const std::vector<int64_t>& n_rows, const float* q, int64_t ldq, const float* bias,
                 float scale, int64_t R) {
    const bool q8_avx512 = c.type == Elem::Q8 && hd_ % 16 == 0 && avx512_available();
    at::parallel_for(0, R * H_, 1, [&](int64_t t0, int64_t t1) {
      thread_local std::vector<float> scores;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r = t / H_, h = t % H_, n = n_rows[r];
        if (static_cast<int64_t>(scores.size()) < n) scores.resize(n);
        const float* qp = q + r * ldq + h * hd_;
        const float* bp = bias ? bias + r * n : nullptr;
        float* out = att_.data() + r * D_ + h * hd_;
        const int64_t ko = r * c.k_row + h * c.k_head, vo = r * c.v_row + h * c.v_head;
        if (q8_avx512) {
          attend_q8(qp, hd_, static_cast<const int8_t*>(c.k) + ko, c.k_pos, static_cast<const int8_t*>(c.v) + vo,
                    c.v_pos, n, bp, scale, scores.data(), out);
          continue;
        }
        with_element(c.type, [&](auto* none) {
          using T = std::remove_pointer_t<decltype(none)>;
          attend(qp, hd_, static_cast<const T*>(c.k) + ko, c.k_pos, static_cast<const T*>(c.v) + vo, c.v_pos, n, bp,
                 scale, scores.data(), out);
        });
      }
    });
  }

  int64_t D_, H_, hd_, F_;
  float eps_;
  bool gelu_;
  std::vector<Layer> layers_;
  std::mutex busy_;
  std::vector<float> h_, big_, att_;
  musicgen::Int4Scratch scratch_;
};

// One LSTM layer over time (EnCodec's bottleneck: 2 layers of 1024 units at 50 frames/s), PyTorch's gate order
// i, f, g, o. xw (T, B, 4H): the input projections x W_ih^T + b_ih + b_hh of every step, computed beforehand in
// one product; each step adds h W_hh^T (the AVX-512 row kernel: one pass over W_hh, 16 MB, for all B rows, where
// PyTorch's LSTM took 1.8x as long for B = 2 as for 1), then the gates in float32 (sigmoid and tanh from exp8,
// relative error about 1e-7). Returns y (T, B, H) and the last (h, c).
namespace {
inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}
inline __m256 tanh8(__m256 x) {   // 2 sigmoid(2x) - 1
  return _mm256_fmsub_ps(_mm256_set1_ps(2.0f), sigmoid8(_mm256_add_ps(x, x)), _mm256_set1_ps(1.0f));
}
}  // namespace

std::vector<torch::Tensor> lstm_layer(torch::Tensor xw, torch::Tensor w_hh, torch::Tensor h0, torch::Tensor c0) {
  TORCH_CHECK(avx512_available(), "lstm_layer: needs AVX-512 (see avx512_available)");
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_gemv", &int8_gemv, "weight-only int8 matrix-vector product (AVX2 + FMA)");
  m.def("dense_gemv", &dense_gemv, "float32 / bfloat16 / float16 weights times few float32 rows (AVX-512)");
  m.def("avx512_available", &avx512_available, "whether dense_gemv and lstm_layer may be called on this CPU");
  m.def("lstm_layer", &lstm_layer, "one float32 LSTM layer over precomputed input projections (AVX-512)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("amx_available", &amx_available, "whether AMX tiles of a kind (\"int8\": int4_gemv from 4 rows, \"bf16\": "
        "int8_gemv and bfloat16 dense_gemv from 6 rows) are used (MUSICGEN_NO_AMX unset)");
  m.def("int4_gemv", &int4_gemv, "4-bit grouped weights times int8-quantised activations (AVX2 + FMA + F16C)");
  m.def("int4_dequant", &int4_dequant, "4-bit grouped weights to float32 or bfloat16 (AVX2 + F16C)");
  m.def("int4_quantize", &int4_quantize, "float32 (N, K) -> 4-bit packed weights and float16 group scales");
  m.def("int8_quantize", &int8_quantize, "float32 (N, K) -> int8 weights and per-row float32 scales");
  pybind11::class_<FusedDecoder>(m, "FusedDecoder")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, std::string>())
      .def("add_layer", &FusedDecoder::add_layer)
      // other Python threads run during a step
      .def("step", &FusedDecoder::step, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_property_readonly("num_layers", &FusedDecoder::num_layers);
}
