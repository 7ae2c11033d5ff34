// Matrix-vector products with quantised weights for decoding on x86 CPUs with AVX2 + FMA (+ F16C).
//
// int8_gemv: weight-only int8, float32 activations (exact products of the int8 weights).
// int4_gemv: 4-bit weights in groups of 32 with a float16 scale each, activations quantised on the fly to int8
//            in groups of 32 (as llama.cpp's Q4_0 x Q8_0): the group dot products run in integers (AVX2,
//            AVX-512 VNNI, or from 4 rows on AMX tiles).
// dense_gemv: float32, bfloat16 or float16 weights, float32 activations, AVX-512 (unquantised layers, few rows;
//            bfloat16 from 6 rows on AMX tiles).
//
//   y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] + bias[n]      x float32 (M, K), q int8 (N, K)
//
// Decoding feeds a handful of rows (the conditional and unconditional row of each request), so the work is
// one pass over the weight; the kernel widens 32 int8 weights at a time to float32 and multiplies them into
// up to four activation rows with four independent accumulators each (FMA latency, not throughput, is the
// limit with one). Output channels are split across threads.
#include "gemv.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// The activation rows in blocks of 4 (or first 8, with Max = 8), then 2, then 1:
// fn(std::integral_constant<int, MB>, first row), so each kernel is instantiated for those block sizes (MB
// accumulators per weight row).
template <int Max = 4, typename Fn>
inline void row_blocks(int64_t M, Fn&& fn) {
  static_assert(Max == 4 || Max == 8, "row blocks of at most 4 or 8 rows");
  int64_t m = 0;
  if constexpr (Max == 8)
    for (; m + 8 <= M; m += 8) fn(std::integral_constant<int, 8>{}, m);
  for (; m + 4 <= M; m += 4) fn(std::integral_constant<int, 4>{}, m);
  for (; m + 2 <= M; m += 2) fn(std::integral_constant<int, 2>{}, m);
  for (; m < M; ++m) fn(std::integral_constant<int, 1>{}, m);
}

// An optional (N,) bias as contiguous float32 (kept alive in `keep`); nullptr without one.
inline const float* float_bias(const c10::optional<torch::Tensor>& bias, int64_t N, torch::Tensor& keep,
                               const char* who) {
  if (!bias.has_value()) return nullptr;
  keep = bias->to(torch::kFloat32).contiguous();
  TORCH_CHECK(keep.numel() == N, who, ": bias must be (N,)");
  return keep.data_ptr<float>();
}

// Software prefetch of the weight stream, called once per 128 bytes read (the int8 kernel: per 32): 2 KB ahead
// into L1 and 16 KB ahead into L2. One core's demand loads and L1 prefetches are limited by its line-fill
// buffers (a plain read reaches about 14 GB/s on one core of the 2-core Xeon); the far L2 prefetches keep more
// lines in flight. Measured on the musicgen-small layer set, int4 VNNI kernel: 10.4 -> 12.3 GB/s on one core,
// 20.4 -> 26 GB/s on two (1 KB into L1 only, the earlier scheme, is the first figure). Prefetching past the end
// of the weights is harmless (prefetches never fault).
inline void prefetch_weights(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p + 2048), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + 2048 + 64), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + 16384), _MM_HINT_T1);
  _mm_prefetch(reinterpret_cast<const char*>(p + 16384 + 64), _MM_HINT_T1);
}

// rows x[0..MB) (leading dimension K) times weight row w -> out[m * ldy]
template <int MB>
inline void dot_rows(const float* x, int64_t K, const int8_t* w, float scale, float bias, float* out, int64_t ldy) {
  __m256 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    prefetch_weights(reinterpret_cast<const uint8_t*>(w + k));
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
    float s = musicgen::hsum(a);
    for (int64_t kk = k; kk < K; ++kk) s += static_cast<float>(w[kk]) * x[m * K + kk];
    out[m * ldy] = s * scale + bias;
  }
}

// The same product for many rows (batched decoding: two per request under guidance), with AVX-512. From four
// rows on the AVX2 kernel is bound by arithmetic, not by the weight stream: 8 rows took 2.7x as long as 2 on the
// musicgen-small layer set. Here one widening of 32 weights feeds up to 8 rows of 16-lane FMAs, and the
// activation rows are walked in chunks of at most 32 KB (rows x chunk) that stay in L1 across a block of 16
// weight rows, instead of streaming every row's whole K (16 KB each for fc2) from L2 once per weight row.
// The chunk is the same for every M, and each row has its own accumulators whatever block of rows it is in, so a
// row's result here does not depend on how many rows share the call (the service batches requests and promises
// each its solo codes; where a row count switches to AMX tiles the sums still agree to float32 rounding); 1- and
// 2-row calls lost nothing to the shorter chunk (bfloat16 layer set of musicgen-small).
// The weights are int8 (times a per-row scale after the sum) or, for dense_gemv, float32, bfloat16 (uint16_t
// bits) or float16 (half_bits): widened exactly to float32 in every case.
template <typename W>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) inline __m512 widen16(const W* w);

template <>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) inline __m512 widen16(const int8_t* w) {
  return musicgen::widen16_i8(w);
}

template <>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) inline __m512 widen16(const uint16_t* w) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));        // bfloat16 bits are a float32's high half
}

template <>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) inline __m512 widen16(const float* w) {
  return _mm512_loadu_ps(w);
}

struct half_bits {   // float16 weights: a type of their own, so that they do not widen as bfloat16 bits
  uint16_t bits;
};

template <>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) inline __m512 widen16(const half_bits* w) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}

inline float widen1(int8_t w) { return static_cast<float>(w); }
inline float widen1(float w) { return w; }
inline float widen1(half_bits w) { return _cvtsh_ss(w.bits); }
inline float widen1(uint16_t w) {
  const uint32_t u = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Adds rows x[0..MB) (leading dimension ldx) times w over K (a chunk) into acc[m * ld_acc]; prefetches the
// weights read ahead_l1 / ahead_l2 bytes later in reading order.
template <typename W, int MB, int A = 2>
__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
void dot_rows_avx512(const float* x, int64_t ldx, int64_t K, const W* w, float* acc_out, int64_t ld_acc,
                     int64_t ahead_l1, int64_t ahead_l2) {
  __m512 acc[MB][A];
  for (int m = 0; m < MB; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
  const char* wb = reinterpret_cast<const char*>(w);
  int64_t k = 0;
  for (; k + 16 * A <= K; k += 16 * A) {
    for (int64_t line = (64 - (k * sizeof(W)) % 64) % 64; line < 16 * A * int64_t(sizeof(W)); line += 64) {
      _mm_prefetch(wb + k * sizeof(W) + line + ahead_l1, _MM_HINT_T0);   // each 64-byte line once
      _mm_prefetch(wb + k * sizeof(W) + line + ahead_l2, _MM_HINT_T1);
    }
    __m512 wv[A];
    for (int a = 0; a < A; ++a) wv[a] = widen16(w + k + 16 * a);
    for (int m = 0; m < MB; ++m)
      for (int a = 0; a < A; ++a)
        acc[m][a] = _mm512_fmadd_ps(wv[a], _mm512_loadu_ps(x + m * ldx + k + 16 * a), acc[m][a]);
  }
  for (; k + 16 <= K; k += 16) {
    const __m512 wv = widen16(w + k);
    for (int m = 0; m < MB; ++m) acc[m][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * ldx + k), acc[m][0]);
  }
  for (int m = 0; m < MB; ++m) {
    __m512 t = acc[m][0];
    for (int a = 1; a < A; ++a) t = _mm512_add_ps(t, acc[m][a]);
    float s = _mm512_reduce_add_ps(t);
    for (int64_t kk = k; kk < K; ++kk) s += widen1(w[kk]) * x[m * ldx + kk];
    acc_out[m * ld_acc] += s;
  }
}

bool has_avx512();

// y (M, N) = x (M, K) . w (N, K)^T (* scale[n] where scale) + bias[n]. A: accumulators per row in blocks of 1
// or 2 rows. int8 weights at 1-2 rows (decoding with guidance) were bound by the widening arithmetic, not the
// weight stream (one core: 7.9 GB/s, against 11.6 for bfloat16 weights); with 4 accumulators and 64 weights per
// iteration the small layer set took 18.8-19.9 ms at 2 rows, against 23.4-24.3 for the AVX2 kernel (3 runs each,
// interleaved). The dense kernel keeps 2, so that its rows' sums stay the same in every block (see above).
template <typename W, int A = 2>
void rows_avx512(const float* xp, int64_t M, int64_t K, const W* wp, const float* sp, const float* bp, int64_t N,
                 float* yp) {
  constexpr int64_t NB = 16;                                       // weight rows sharing one activation chunk
  constexpr int64_t KC = 1024;   // 8 rows x KC floats = 32 KB; the same chunks whatever M (see above)
  at::parallel_for(0, N, NB, [&](int64_t n0, int64_t n1) {
    std::vector<float> part(NB * M);                               // part[m * NB + n - nb]
    for (int64_t nb = n0; nb < n1; nb += NB) {
      const int64_t ne = std::min(nb + NB, n1);
      std::fill(part.begin(), part.end(), 0.f);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        // weight rows are read kc at a time, K apart: "2 KB / 16 KB ahead" in reading order is rows ahead
        const int64_t row = K * int64_t(sizeof(W)), chunk = kc * int64_t(sizeof(W));
        const int64_t l1 = row * std::max<int64_t>(1, 2048 / chunk), l2 = row * std::max<int64_t>(1, 16384 / chunk);
        for (int64_t n = nb; n < ne; ++n) {
          const W* w = wp + n * K + k0;
          float* acc = &part[n - nb];
          row_blocks<8>(M, [&](auto mb, int64_t m) {
            constexpr int MBv = decltype(mb)::value;
            dot_rows_avx512<W, MBv, (MBv <= 2 ? A : 2)>(xp + m * K + k0, K, kc, w, acc + m * NB, NB, l1, l2);
          });
        }
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = nb; n < ne; ++n)
          yp[m * N + n] = part[m * NB + n - nb] * (sp ? sp[n] : 1.f) + (bp ? bp[n] : 0.f);
    }
  });
}

// AMX (Intel Sapphire Rapids and later): tile registers of up to 16 rows x 64 bytes and a unit that multiplies
// them. Used from several rows on, where the kernels above are bound by arithmetic rather than by the weight
// stream. Linux hands a process the (8 KB) tile state only when asked, once, before its first tile instruction
// (Linux >= 5.16). MUSICGEN_NO_AMX=1 (or MUSICGEN_NO_AVX512=1) selects the AVX-512 / AVX2 kernels instead.
enum AmxKind { AMX_INT8, AMX_BF16 };

bool avx512_allowed();

bool amx_usable(AmxKind kind) {
  static const bool granted = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vl") &&
                              syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  static const bool int8 = granted && __builtin_cpu_supports("amx-int8");
  static const bool bf16 = granted && __builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("avx512bf16");
  const char* off = std::getenv("MUSICGEN_NO_AMX");
  return (kind == AMX_INT8 ? int8 : bf16) && (off == nullptr || off[0] == '\0' || off[0] == '0') && avx512_allowed();
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// int8 or bfloat16 weights times many rows on the bfloat16 tile unit: tdpbf16ps multiplies 16 weight rows of 32
// bfloat16 by up to 16 activation rows and accumulates in float32 across all of K inside the tile. bfloat16
// weights are a tile as they lie in memory; 32 int8 weights of a row widen exactly to bfloat16 (at most 8
// significant bits) first.
// The float32 activations are kept: each is split once per call into three bfloat16 parts, x = hi + mid + lo
// exactly (8 significant bits each, 24 in all), and the tile unit runs one product per part. Every product of a
// part and an int8 weight is exact in float32, so the result differs from the AVX-512 kernel's only in the order
// of the float32 sums, and a request's codes do not depend on which other requests share its batch.
#define MUSICGEN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))

MUSICGEN_AVX512_BF16 inline __m512i row_bf16(const int8_t* w) {   // 32 weights of one row as bfloat16
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16))));
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

// 16 x 16 dwords (rows of 64 bytes, contiguous) -> transposed: row r of b holds dword r of rows 0..15
MUSICGEN_AVX512_BF16 inline void transpose16(const uint16_t* src, uint16_t* b) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(src + 32 * i);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {   // r[4i + j], 128-bit lane q: rows 4i..4i+3, dword 4q + j
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // t[8i + j]: lanes (rows 8i..+3 @ dword j, @ 8 + j, rows 8i+4..+7 @ j, @ 8 + j); t[8i + 4 + j]: dwords 4 + j, 12 + j
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    _mm512_storeu_si512(b + 32 * j, _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88));         // dword j, rows 0..15
    _mm512_storeu_si512(b + 32 * (8 + j), _mm512_shuffle_i32x4(t[j], t[8 + j], 0xDD));   // dword 8 + j
  }
}

// 16 int8 weight rows (leading dimension ld) x 32 -> 16 tile rows of 32 bfloat16
MUSICGEN_AVX512_BF16 inline void widen_tile(const int8_t* w, int64_t ld, uint16_t* b) {
  for (int i = 0; i < 16; ++i) _mm512_store_si512(b + 32 * i, row_bf16(w + i * ld));
}

#define MUSICGEN_AMX_BF16 __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,fma")))

// NBK (1 or 2) blocks of 16 weight rows from wn on (leading dimension K) times one packed block of rows a -> c
// (NBK x 16 weight rows x 16 float32 columns, one per activation row); tiles configured by rows_amx_bf16. The
// two blocks share each chunk's loads of the activation parts. The next rows' weights are prefetched into L2, a
// little per chunk (into L1, the line-fill buffers were the limit).
template <typename W, int NBK>
MUSICGEN_AMX_BF16 inline void amx_blocks(const uint16_t* a, int64_t K, const W* wn, uint16_t (*b)[2][512],
                                         float* c) {
  constexpr bool direct = std::is_same<W, uint16_t>::value;
  const int64_t chunks = K / 32, ahead = NBK * 16 * K * int64_t(sizeof(W)) / chunks;   // next rows' bytes
  _tile_zero(0);
  if constexpr (NBK == 2) _tile_zero(6);
  if constexpr (!direct) {
    widen_tile(wn, K, b[0][0]);
    if constexpr (NBK == 2) widen_tile(wn + 16 * K, K, b[0][1]);
  }
  for (int64_t kc = 0; kc < chunks; ++kc) {
    const char* next = reinterpret_cast<const char*>(wn + NBK * 16 * K) + ahead * kc;
    for (int64_t l = 0; l < ahead; l += 64) _mm_prefetch(next + l, _MM_HINT_T1);
    if constexpr (!direct) {
      if (kc + 1 < chunks) {
        widen_tile(wn + 32 * (kc + 1), K, b[(kc + 1) & 1][0]);
        if constexpr (NBK == 2) widen_tile(wn + 16 * K + 32 * (kc + 1), K, b[(kc + 1) & 1][1]);
      }
    }
    const uint16_t* parts = a + kc * 3 * 512;
    _tile_loadd(2, parts, 64);
    _tile_loadd(3, parts + 512, 64);
    _tile_loadd(4, parts + 1024, 64);
    if constexpr (direct) _tile_loadd(1, wn + 32 * kc, 2 * K);
    else _tile_loadd(1, b[kc & 1][0], 64);
    _tile_dpbf16ps(0, 1, 4);   // the small parts first
    _tile_dpbf16ps(0, 1, 3);
    _tile_dpbf16ps(0, 1, 2);
    if constexpr (NBK == 2) {
      if constexpr (direct) _tile_loadd(5, wn + 16 * K + 32 * kc, 2 * K);
      else _tile_loadd(5, b[kc & 1][1], 64);
      _tile_dpbf16ps(6, 5, 4);
      _tile_dpbf16ps(6, 5, 3);
      _tile_dpbf16ps(6, 5, 2);
    }
  }
  _tile_stored(0, c, 64);
  if constexpr (NBK == 2) _tile_stored(6, c + 256, 64);
}

// y = x . w^T (* scale) + bias for channels [n0, n1), with the weights as the tiles' A operand: 16 weight rows x
// 32 k are one tile as they lie in memory (bfloat16, loaded straight from the weight), or after a widening of each
// row (int8), with no transpose. The activations are the B operand, given packed by pack_bf16 (per block of 16
// rows, per chunk of 32 and per bfloat16 part, tile row r holding the pair k = 2r, 2r + 1 of each activation row).
// The sums come out as (weight row, activation row) and are transposed into y. Blocks of more than 16 rows take
// turns on the same two blocks of weight rows, which they then read from L2. w int8 (with per-row scales) or
// bfloat16 (scale nullptr); a bfloat16 weight times a part has at most 16 significant bits: exact in float32 too.
template <typename W>
MUSICGEN_AMX_BF16 void rows_amx_bf16(const uint16_t* a, int64_t M, int64_t K, const W* w, const float* scale,
                                     const float* bias, int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t block = K / 32 * 3 * 512;   // one block of 16 rows in a
  alignas(64) uint16_t b[2][2][512];   // int8: the next chunk's widened weights are built while this one is used
  alignas(64) float c[2 * 16 * 16];
  const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
  int configured = 0;
  for (int64_t nb = n0; nb < n1;) {
    const int nbk = n1 - nb >= 32 ? 2 : 1;
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      const int mb = static_cast<int>(std::min<int64_t>(16, M - m0));
      if (mb != configured) {
        TileConfig cfg;   // 0, 6: sums (16 weight rows x mb float32); 1, 5: weights (16 x 32 bf16); 2-4: parts
        for (int t : {0, 2, 3, 4, 6}) cfg.rows[t] = 16, cfg.colsb[t] = static_cast<uint16_t>(4 * mb);
        for (int t : {1, 5}) cfg.rows[t] = 16, cfg.colsb[t] = 64;
        _tile_loadconfig(&cfg);
        configured = mb;
      }
      if (nbk == 2) amx_blocks<W, 2>(a + m0 / 16 * block, K, w + nb * K, b, c);
      else amx_blocks<W, 1>(a + m0 / 16 * block, K, w + nb * K, b, c);
      for (int blk = 0; blk < nbk; ++blk) {
        const int64_t n = nb + 16 * blk;
        const __m512 sv = scale ? _mm512_loadu_ps(scale + n) : _mm512_set1_ps(1.0f);
        const __m512 bv = bias ? _mm512_loadu_ps(bias + n) : _mm512_setzero_ps();
        for (int m = 0; m < mb; ++m)   // c[blk][n][m] -> y[m0 + m, n]
          _mm512_storeu_ps(y + (m0 + m) * N + n,
                           _mm512_fmadd_ps(_mm512_i32gather_ps(column, c + 256 * blk + m, 4), sv, bv));
      }
    }
    nb += 16 * nbk;
  }
  _tile_release();
}

// x (M, K), K % 32 == 0 -> the B operands of rows_amx_bf16: block of 16 rows b, chunk kc of 32, part p (x = hi +
// mid + lo, each bfloat16 rounded to nearest: exactly, since the two remainders are exact in float32 and 3 x 8
// significant bits hold float32's 24; parts below float32's normal range, 1e-38, are flushed to zero, as the tile
// unit would flush them anyway) at a + ((b * K / 32 + kc) * 3 + p) * 512, whose tile row r (32 bfloat16) holds
// the pair k = 2r, 2r + 1 of rows 16 b + 0..15.
MUSICGEN_AVX512_BF16 void pack_bf16(const float* x, int64_t M, int64_t K, uint16_t* a) {
  const int64_t chunks = K / 32;
  alignas(64) uint16_t parts[3][16 * 32];   // one chunk of one block of rows: each row's three parts
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    const int64_t mb = std::min<int64_t>(16, M - m0);
    for (int64_t kc = 0; kc < chunks; ++kc) {
      for (int64_t i = 0; i < 16; ++i) {
        if (i >= mb) {   // rows past M: zeros (the tiles are configured for mb columns and never use them)
          for (auto& part : parts) _mm512_store_si512(part + 32 * i, _mm512_setzero_si512());
          continue;
        }
        const float* xr = x + (m0 + i) * K + 32 * kc;
        __m512 lo = _mm512_loadu_ps(xr), hi = _mm512_loadu_ps(xr + 16);
        for (auto& part : parts) {
          const __m512i p = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));   // k order: dword r = pair r
          _mm512_store_si512(part + 32 * i, p);
          lo = _mm512_sub_ps(lo, _mm512_cvtpbh_ps(reinterpret_cast<__m256bh>(_mm512_castsi512_si256(p))));
          hi = _mm512_sub_ps(hi, _mm512_cvtpbh_ps(reinterpret_cast<__m256bh>(_mm512_extracti64x4_epi64(p, 1))));
        }
      }
      for (int part = 0; part < 3; ++part) transpose16(parts[part], a + ((m0 / 16 * chunks + kc) * 3 + part) * 512);
    }
  }
}

// Where the tiles start. Small layer set (24 x musicgen-small's six products), 2 threads, AVX-512 kernel against
// tiles: int8 at 4 rows 23.5 against 31.0 ms, 6 rows 33.5 / 31.3, 8 rows 33.4 / 31.2, 16 rows 76 / 30, 32 rows
// 162 / 57; bfloat16 at 4 rows 33.5 / 36.2, 6 rows 41.3 / 35.9, 16 rows 89 / 39 (PyTorch's bfloat16 linear, which
// rounds the activations: 56). With the activation parts as the A operand and the weights transposed into B
// tiles, as first written, int8 took 65 ms at 16 rows: loading the parts, 48 lines 2 KB apart, and the transposes
// were the limit, not the tile unit.
constexpr int64_t AMX_INT8_MIN_ROWS = 6;
constexpr int64_t AMX_DENSE_MIN_ROWS = 6;

// y (M, N) = x (M, K) . w (N, K)^T (* scale) + bias on the tile unit (the caller checks N % 16, K % 32, AMX)
template <typename W>
void gemv_amx_bf16(const float* xp, int64_t M, int64_t K, const W* wp, const float* sp, const float* bp, int64_t N,
                   float* yp) {
  thread_local std::vector<uint16_t> scratch;   // (a worker thread has its own: pass pointers, not the name)
  const int64_t block = K / 32 * 3 * 512;       // one block of 16 rows, packed
  scratch.resize((M + 15) / 16 * block);
  uint16_t* a = scratch.data();
  pack_bf16(xp, M, K, a);
  at::parallel_for(0, N / 16, 4, [&](int64_t b0, int64_t b1) {
    rows_amx_bf16(a, M, K, wp, sp, bp, 16 * b0, 16 * b1, yp, N);
  });
}

}  // namespace

void musicgen::int8_gemv_raw(const float* xp, int64_t M, int64_t K, const int8_t* qp, const float* sp,
                             const float* bp, int64_t N, float* yp) {
  if (M >= AMX_INT8_MIN_ROWS && N % 16 == 0 && K % 32 == 0 && amx_usable(AMX_BF16)) {
    gemv_amx_bf16(xp, M, K, qp, sp, bp, N, yp);
    return;
  }
  if (has_avx512()) {   // decoding's 1-3 rows with four accumulators per row (see rows_avx512)
    if (M < 4)
      rows_avx512<int8_t, 4>(xp, M, K, qp, sp, bp, N, yp);
    else
      rows_avx512(xp, M, K, qp, sp, bp, N, yp);
    return;
  }
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* w = qp + n * K;
      const float bn = bp ? bp[n] : 0.f;
      row_blocks(M, [&](auto mb, int64_t m) {
        dot_rows<decltype(mb)::value>(xp + m * K, K, w, sp[n], bn, yp + m * N + n, N);
      });
    }
  });
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
  const float* bp = float_bias(bias, N, b, "int8_gemv");
  musicgen::int8_gemv_raw(x.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), s.data_ptr<float>(), bp, N,
                          y.data_ptr<float>());
  return y;
}

// dense_gemv: float32, bfloat16 or float16 weights, float32 activations, for few-row products of unquantised layers
// (BLAS reads a bfloat16 weight at about 13 GB/s for two rows here, float32 at about 22, and a float32 one
// at 11 for eight rows). AVX-512 only: avx512_available() says whether it may be called.
torch::Tensor dense_gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(has_avx512(), "dense_gemv: needs AVX-512 (see avx512_available)");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "dense_gemv: x (M, K) and w (N, K) expected");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "dense_gemv: x must be float32");
  const auto type = musicgen::dense_type(w.scalar_type());
  TORCH_CHECK(type.has_value() && w.is_contiguous(), "dense_gemv: w must be contiguous float32, bfloat16 or float16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  x = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  torch::Tensor b;
  const float* bp = float_bias(bias, N, b, "dense_gemv");
  musicgen::dense_gemv_raw(x.data_ptr<float>(), M, K, w.data_ptr(), *type, bp, N, y.data_ptr<float>());
  return y;
}

bool avx512_available() { return has_avx512(); }

std::optional<musicgen::Dense> musicgen::dense_type(c10::ScalarType t) {
  if (t == torch::kFloat32) return Dense::F32;
  if (t == torch::kBFloat16) return Dense::BF16;
  if (t == torch::kFloat16) return Dense::F16;
  return std::nullopt;
}

// float16 weights stay on the row kernel at every row count: they do not widen exactly to the tiles' bfloat16.
void musicgen::dense_gemv_raw(const float* x, int64_t M, int64_t K, const void* w, Dense t, const float* bias,
                              int64_t N, float* y) {
  if (t == Dense::BF16 && M >= AMX_DENSE_MIN_ROWS && N % 16 == 0 && K % 32 == 0 && amx_usable(AMX_BF16))
    gemv_amx_bf16(x, M, K, static_cast<const uint16_t*>(w), nullptr, bias, N, y);
  else if (t == Dense::BF16)
    rows_avx512(x, M, K, static_cast<const uint16_t*>(w), nullptr, bias, N, y);
  else if (t == Dense::F16)
    rows_avx512(x, M, K, static_cast<const half_bits*>(w), nullptr, bias, N, y);
  else
    rows_avx512(x, M, K, static_cast<const float*>(w), nullptr, bias, N, y);
}

namespace {

// Weight layout (see musicgen/quant.py): per output row, groups of 32 weights with one float16 scale each;
// 32 bytes hold two groups, byte j carrying weight j of the first group in its low nibble and weight j of the
// second in its high nibble, stored as w + 8 (0..15). With x quantised per group (xq int8, scale xs):
//   sum_j (u_j - 8) xq_j = maddubs(u, xq) - 8 sum_j xq_j
// so the unsigned nibbles go straight into maddubs and the offset becomes one precomputed term per group.
// Rows are processed 8 groups (256 weights) at a time: the 8 float16 scales convert in one instruction;
// K must be a multiple of 64 (whole pairs of groups).
template <int MB>
inline void dot_rows_q4(const int8_t* xq, const float* xs, const float* xc, int64_t K, const uint8_t* w,
                        const uint16_t* ws, float bias, float* out, int64_t ldy) {
  const int64_t G = K / 32;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MB], corr[MB];
  for (int m = 0; m < MB; ++m) acc[m] = corr[m] = _mm256_setzero_ps();
  alignas(32) float f[MB][8];
  int64_t g0 = 0;
  for (; g0 + 8 <= G; g0 += 8) {
    const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + g0)));
    for (int m = 0; m < MB; ++m) {
      _mm256_store_ps(f[m], _mm256_mul_ps(sw, _mm256_loadu_ps(xs + m * G + g0)));
      corr[m] = _mm256_fmadd_ps(sw, _mm256_loadu_ps(xc + m * G + g0), corr[m]);
    }
    const uint8_t* wb = w + 16 * g0;
    prefetch_weights(wb);
    for (int pair = 0; pair < 4; ++pair) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * pair));
      const __m256i u0 = _mm256_and_si256(raw, low4);
      const __m256i u1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      const int64_t g = g0 + 2 * pair;
      for (int m = 0; m < MB; ++m) {
        const int8_t* x = xq + m * K + 32 * g;
        __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), ones);
        __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))), ones);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(&f[m][2 * pair]), acc[m]);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_broadcast_ss(&f[m][2 * pair + 1]), acc[m]);
      }
    }
  }
  float tail[MB] = {};
  for (; g0 < G; g0 += 2) {   // groups left over when K is not a multiple of 256: a pair at a time
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * g0));
    const __m256i u0 = _mm256_and_si256(raw, low4);
    const __m256i u1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
    const float s0 = _cvtsh_ss(ws[g0]), s1 = _cvtsh_ss(ws[g0 + 1]);
    for (int m = 0; m < MB; ++m) {
      const int8_t* x = xq + m * K + 32 * g0;
      __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), ones);
      __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))), ones);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(s0 * xs[m * G + g0]), acc[m]);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(s1 * xs[m * G + g0 + 1]), acc[m]);
      tail[m] += s0 * xc[m * G + g0] + s1 * xc[m * G + g0 + 1];
    }
  }
  for (int m = 0; m < MB; ++m) out[m * ldy] = musicgen::hsum(acc[m]) - musicgen::hsum(corr[m]) - tail[m] + bias;
}

// The same product with AVX-512 VNNI (Intel Ice Lake and later, AMD Zen 4 and later): vpdpbusd multiplies
// 64 unsigned nibbles by 64 int8 activations and sums each 4 into int32 in one instruction, two groups per
// register. Compiled for that target only and chosen at run time.
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl,fma,f16c")))
void dot_rows_q4_vnni(const int8_t* xq, const float* xs, const float* xc, int64_t K, const uint8_t* w,
                      const uint16_t* ws, float bias, float* out, int64_t ldy) {
  const int64_t G = K / 32;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m512 acc[MB];
  __m256 corr[MB];
  for (int m = 0; m < MB; ++m) { acc[m] = _mm512_setzero_ps(); corr[m] = _mm256_setzero_ps(); }
  // lanes 0-7 take group 2p's factor, lanes 8-15 group 2p + 1's
  const __m512i pick[4] = {_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                           _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2),
                           _mm512_set_epi32(5, 5, 5, 5, 5, 5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4),
                           _mm512_set_epi32(7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6)};
  int64_t g0 = 0;
  for (; g0 + 8 <= G; g0 += 8) {
    const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + g0)));
    __m512 f[MB];
    for (int m = 0; m < MB; ++m) {
      f[m] = _mm512_castps256_ps512(_mm256_mul_ps(sw, _mm256_loadu_ps(xs + m * G + g0)));
      corr[m] = _mm256_fmadd_ps(sw, _mm256_loadu_ps(xc + m * G + g0), corr[m]);
    }
    const uint8_t* wb = w + 16 * g0;
    prefetch_weights(wb);
    for (int pair = 0; pair < 4; ++pair) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * pair));
      const __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, low4)),
                                           _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), 1);
      const int64_t g = g0 + 2 * pair;
      for (int m = 0; m < MB; ++m) {
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512(xq + m * K + 32 * g));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(pick[pair], f[m]), acc[m]);
      }
    }
  }
  float tail[MB] = {};
  for (; g0 < G; g0 += 2) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * g0));
    const __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, low4)),
                                         _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), 1);
    const float s0 = _cvtsh_ss(ws[g0]), s1 = _cvtsh_ss(ws[g0 + 1]);
    for (int m = 0; m < MB; ++m) {
      const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512(xq + m * K + 32 * g0));
      const __m512 fs = _mm512_castps256_ps512(_mm256_set1_ps(s0 * xs[m * G + g0]));
      const __m512 f2 = _mm512_castpd_ps(_mm512_insertf64x4(
          _mm512_castps_pd(fs), _mm256_castps_pd(_mm256_set1_ps(s1 * xs[m * G + g0 + 1])), 1));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), f2, acc[m]);
      tail[m] += s0 * xc[m * G + g0] + s1 * xc[m * G + g0 + 1];
    }
  }
  for (int m = 0; m < MB; ++m) out[m * ldy] = _mm512_reduce_add_ps(acc[m]) - musicgen::hsum(corr[m]) - tail[m] + bias;
}

inline float hmax_abs(const float* v, int64_t n) {            // max |v| over n (a multiple of 8) floats
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

inline __m256i pack32(const __m256i c[4]) {                    // 4 x 8 int32 (small) -> 32 bytes in order
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// One group of 32 activations -> int8 codes round(v * 127 / max|v|) (nearest even, as the default rounding
// mode of cvtps), the scale max|v| / 127, and the offset term 8 * scale * sum(codes) of the kernels above.
inline void quantize_group(const float* v, int8_t* q, float* scale, float* offset) {
  const float mx = hmax_abs(v, 32);
  const __m256 inv = _mm256_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
  __m256i c[4], sum = _mm256_setzero_si256();
  for (int u = 0; u < 4; ++u) {
    c[u] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * u), inv));
    sum = _mm256_add_epi32(sum, c[u]);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), pack32(c));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  *scale = mx / 127.f;
  *offset = 8.f * *scale * static_cast<float>(_mm_cvtsi128_si32(s4));
}

constexpr int64_t AMX_INT4_MIN_ROWS = 4;   // fewer rows take the VNNI kernel (as fast: bound by the weight stream)

// checked per call (cheap): MUSICGEN_NO_AVX512=1 selects the AVX2 paths, e.g. to compare the two
bool avx512_allowed() {
  const char* off = std::getenv("MUSICGEN_NO_AVX512");
  return off == nullptr || off[0] == '\0' || off[0] == '0';
}

bool has_avx512() {
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return cpu && avx512_allowed();
}

bool has_vnni() {
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return cpu && avx512_allowed();
}

}  // namespace

// The same int4 product for 4 rows and more with AMX (Intel Sapphire Rapids and later): the tile unit multiplies
// up to 16 activation rows by 16 weight rows over one group of 32 in one instruction (tdpbssd), where the VNNI
// kernel above spends a dot product, a conversion and a multiply-add per row and per pair of groups; from 4 rows
// on that arithmetic, not the weight stream, was its limit (16 rows took 4.7x as long as 1 on the musicgen-small
// layer set). Each block of 16 weight rows (contiguous in memory) is walked a pair of groups at a time:
//   - the 16 x 32 weight bytes of the pair are transposed into the tile unit's B layout (row r: the 4 bytes
//     k = 4r..4r+3 of each of the 16 weight rows) and the nibbles become signed codes u - 8, one B tile per
//     group, so no offset term is needed;
//   - one tdpbssd per group gives the (rows x 16) exact int32 group sums; they are stored and scaled in float,
//     y[m, n] += sum * x_scale[m, g] * w_scale[n, g], 16 output channels per vector;
//   - the next pair is transposed, and the next block of weight rows prefetched, while the tile unit works:
//     without the prefetch the strided walk over 16 rows was slower than the VNNI kernel at 4 rows.
// Only the order of the float sums differs from the kernels above. Needs N % 16 == 0 (every MusicGen layer).
namespace {

// 16 weight rows (leading dimension ld bytes) x 32 bytes, two groups of nibbles -> the B tiles of the two groups,
// 8 rows x 64 bytes each, as signed codes u - 8.
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline void q4_to_tiles(const uint8_t* w, int64_t ld, int8_t* ba, int8_t* bb) {
  __m512i z[8], t[8], u[8];
  for (int i = 0; i < 8; ++i)   // lanes 0-7: the 8 dwords of row i; lanes 8-15: those of row i + 8
    z[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * ld))),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (i + 8) * ld)), 1);
  // an 8 x 8 dword transpose in each 256-bit half
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(z[2 * i], z[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(z[2 * i], z[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // 128-bit lane q of u[j] holds dword 4 * (q & 1) + j of rows 0-3 (j < 4) or 4-7 (j >= 4), plus 8 for q >= 2
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
  const __m512i second = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  const __m512i low4 = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  for (int j = 0; j < 8; ++j) {
    const __m512i row = _mm512_permutex2var_epi64(u[j % 4], j < 4 ? first : second, u[j % 4 + 4]);   // dword j
    _mm512_store_si512(ba + 64 * j, _mm512_sub_epi8(_mm512_and_si512(row, low4), eight));
    _mm512_store_si512(bb + 64 * j, _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(row, 4), low4), eight));
  }
}

// acc[m] (16 output channels) += the group sums ca / cb (rows x 16 int32) of groups 2p, 2p + 1, scaled
__attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))
inline void q4_tile_sums(const int32_t* ca, const int32_t* cb, const uint16_t* ws, __m512i scale_at, int64_t p,
                         const float* xs, int64_t G, int MB, __m512* acc) {
  const __m512i raw = _mm512_i32gather_epi32(scale_at, ws + 2 * p, 2);   // 16 rows' scales of groups 2p, 2p + 1
  const __m512 swa = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(raw));
  const __m512 swb = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(raw, 16)));
  for (int m = 0; m < MB; ++m) {
    const float* s = xs + m * G + 2 * p;
    const __m512 fa = _mm512_cvtepi32_ps(_mm512_load_si512(ca + 16 * m));
    const __m512 fb = _mm512_cvtepi32_ps(_mm512_load_si512(cb + 16 * m));
    acc[m] = _mm512_fmadd_ps(_mm512_mul_ps(fa, _mm512_set1_ps(s[0])), swa, acc[m]);
    acc[m] = _mm512_fmadd_ps(_mm512_mul_ps(fb, _mm512_set1_ps(s[1])), swb, acc[m]);
  }
}

// rows [0, MB) (MB <= 16) of y (leading dimension N), output channels [n0, n1) (multiples of 16)
__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,f16c,fma")))
void q4_amx(const int8_t* xq, const float* xs, int MB, int64_t K, const uint8_t* w, const uint16_t* ws,
            const float* bias, int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t G = K / 32, P = G / 2, ld = K / 2;
  TileConfig cfg;   // tiles 0, 1: sums (rows x 16 int32); 2, 3: activations (rows x 32); 4, 5: weights (8 x 64)
  for (int t = 0; t < 6; ++t) {
    cfg.rows[t] = t < 4 ? MB : 8;
    cfg.colsb[t] = t == 2 || t == 3 ? 32 : 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) int8_t b[2][2][512];          // two pairs of B tiles: one transposed ahead while the other is used
  alignas(64) int32_t c[2][2][16 * 16];
  const __m512i scale_at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(static_cast<int>(G)));
  for (int64_t nb = n0; nb < n1; nb += 16) {
    __m512 acc[16];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* wn = w + nb * ld;
    const uint16_t* wsn = ws + nb * G;
    q4_to_tiles(wn, ld, b[0][0], b[0][1]);
    for (int64_t p = 0; p < P; ++p) {
      const char* next = reinterpret_cast<const char*>(wn + 16 * ld) + 512 * p;   // next block: 8 lines per pair
      for (int l = 0; l < 8; ++l) _mm_prefetch(next + 64 * l, _MM_HINT_T0);
      if (p + 1 < P) q4_to_tiles(wn + 32 * (p + 1), ld, b[(p + 1) & 1][0], b[(p + 1) & 1][1]);
      _tile_zero(0);
      _tile_zero(1);
      _tile_loadd(2, xq + 64 * p, K);
      _tile_loadd(3, xq + 64 * p + 32, K);
      _tile_loadd(4, b[p & 1][0], 64);
      _tile_loadd(5, b[p & 1][1], 64);
      _tile_dpbssd(0, 2, 4);
      _tile_dpbssd(1, 3, 5);
      _tile_stored(0, c[p & 1][0], 64);
      _tile_stored(1, c[p & 1][1], 64);
      if (p > 0) q4_tile_sums(c[(p - 1) & 1][0], c[(p - 1) & 1][1], wsn, scale_at, p - 1, xs, G, MB, acc);
    }
    q4_tile_sums(c[(P - 1) & 1][0], c[(P - 1) & 1][1], wsn, scale_at, P - 1, xs, G, MB, acc);
    const __m512 bv = bias ? _mm512_loadu_ps(bias + nb) : _mm512_setzero_ps();
    for (int m = 0; m < MB; ++m) _mm512_storeu_ps(y + m * N + nb, _mm512_add_ps(acc[m], bv));
  }
  _tile_release();
}

}  // namespace

bool amx_available(const std::string& kind) { return amx_usable(kind == "bf16" ? AMX_BF16 : AMX_INT8); }

void musicgen::int4_gemv_raw(const float* xp, int64_t M, int64_t K, const uint8_t* qp, const uint16_t* sp,
                             const float* bp, int64_t N, float* yp, Int4Scratch& scratch) {
  const int64_t G = K / 32;
  // activations -> int8 per group of 32 (scale max|x| / 127, round to nearest), and each group's offset term
  scratch.xq.resize(M * K);
  scratch.xs.resize(M * G);
  scratch.xc.resize(M * G);
  int8_t* xq = scratch.xq.data();
  float *xs = scratch.xs.data(), *xc = scratch.xc.data();
  for (int64_t i = 0; i < M * G; ++i) quantize_group(xp + 32 * i, xq + 32 * i, xs + i, xc + i);
  if (M >= AMX_INT4_MIN_ROWS && N % 16 == 0 && amx_usable(AMX_INT8)) {
    at::parallel_for(0, N / 16, 4, [&](int64_t b0, int64_t b1) {
      for (int64_t m = 0; m < M; m += 16)
        q4_amx(xq + m * K, xs + m * G, static_cast<int>(std::min<int64_t>(16, M - m)), K, qp, sp, bp, 16 * b0,
               16 * b1, yp + m * N, N);
    });
    return;
  }
  const bool vnni = has_vnni();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = qp + n * (K / 2);
      const uint16_t* ws = sp + n * G;
      const float bn = bp ? bp[n] : 0.f;
      row_blocks(M, [&](auto mb, int64_t m) {
        constexpr int MB = decltype(mb)::value;
        if (vnni) dot_rows_q4_vnni<MB>(xq + m * K, xs + m * G, xc + m * G, K, w, ws, bn, yp + m * N + n, N);
        else dot_rows_q4<MB>(xq + m * K, xs + m * G, xc + m * G, K, w, ws, bn, yp + m * N + n, N);
      });
    }
  });
}

torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor qw, torch::Tensor scales, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && qw.dim() == 2 && x.size(1) == 2 * qw.size(1) && x.size(1) % 64 == 0,
              "int4_gemv: x (M, K) and packed weights (N, K / 2) with K a multiple of 64 expected");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "int4_gemv: x must be float32");
  TORCH_CHECK(qw.scalar_type() == torch::kUInt8 && qw.is_contiguous(), "int4_gemv: weights must be contiguous uint8");
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0), G = K / 32;
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous() && scales.size(0) == N &&
              scales.size(1) == G, "int4_gemv: float16 scales (N, K / 32) expected");
  x = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  torch::Tensor b;
  const float* bp = float_bias(bias, N, b, "int4_gemv");
  thread_local musicgen::Int4Scratch scratch;
  musicgen::int4_gemv_raw(x.data_ptr<float>(), M, K, qw.data_ptr<uint8_t>(),
                          reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), bp, N, y.data_ptr<float>(),
                          scratch);
  return y;
}

// Dequantise 4-bit weights (N, K / 2) with float16 group scales (N, K / 32) to float32 or bfloat16 (N, K), for
// products with many rows (prefill), which go to BLAS. Weight j of a 64-weight block sits in byte j % 32, low
// nibble for the first group of 32 and high nibble for the second; value (code - 8) * scale. bfloat16 is
// rounded to nearest even, as torch's own conversion does.
namespace {

inline __m256 dequant8(__m128i bytes8, __m256 scale) {       // 8 codes (low 8 bytes) -> 8 floats
  const __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes8), _mm256_set1_epi32(8));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(v), scale);
}

inline __m128i to_bf16(__m256 f) {                            // 8 floats -> 8 bfloat16, nearest even
  __m256i b = _mm256_castps_si256(f);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i packed = _mm256_packus_epi32(b, b);           // lanes: a0..3 a0..3 | a4..7 a4..7
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

}  // namespace

torch::Tensor int4_dequant(torch::Tensor qw, torch::Tensor scales, bool bf16) {
  TORCH_CHECK(qw.dim() == 2 && qw.scalar_type() == torch::kUInt8 && qw.is_contiguous() && qw.size(1) % 32 == 0,
              "int4_dequant: contiguous packed uint8 weights (N, K / 2) with K a multiple of 64 expected");
  const int64_t N = qw.size(0), K = 2 * qw.size(1), G = K / 32;
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous() && scales.size(0) == N &&
              scales.size(1) == G, "int4_dequant: float16 scales (N, K / 32) expected");
  auto out = torch::empty({N, K}, qw.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  const uint8_t* w = qw.data_ptr<uint8_t>();
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* ob = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t b = 0; b < K / 64; ++b) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * (K / 2) + b * 32));
        const __m256i lo = _mm256_and_si256(bytes, _mm256_set1_epi8(15));
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(15));
        for (int half = 0; half < 2; ++half) {
          const __m256i codes = half ? hi : lo;
          const __m256 s = _mm256_set1_ps(_cvtsh_ss(sc[n * G + 2 * b + half]));
          const __m128i c0 = _mm256_castsi256_si128(codes), c1 = _mm256_extracti128_si256(codes, 1);
          const __m256 f[4] = {dequant8(c0, s), dequant8(_mm_srli_si128(c0, 8), s), dequant8(c1, s),
                               dequant8(_mm_srli_si128(c1, 8), s)};
          const int64_t at = n * K + b * 64 + half * 32;
          for (int i = 0; i < 4; ++i) {
            if (bf16) _mm_storeu_si128(reinterpret_cast<__m128i*>(ob + at + 8 * i), to_bf16(f[i]));
            else _mm256_storeu_ps(of + at + 8 * i, f[i]);
          }
        }
      }
    }
  });
  return out;
}

// Quantisers, bitwise the same as quant.py's Python ones (float32 divisions, round half to even, the same
// clamps), native because quantising at load was most of a quantised load (medium int4: 11 of 17 s).
namespace {

inline __m256i codes8(const float* v, __m256 scale, float lo, float hi) {   // round(v / scale) clamped, as int32
  __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(v), scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm256_min_ps(_mm256_max_ps(q, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
  return _mm256_cvtps_epi32(q);
}

}  // namespace

std::vector<torch::Tensor> int4_quantize(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.size(1) % 64 == 0,
              "int4_quantize: float32 weights (N, K) with K a multiple of 64 expected");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), G = K / 32;
  auto packed = torch::empty({N, K / 2}, w.options().dtype(torch::kUInt8));
  auto scales = torch::empty({N, G}, w.options().dtype(torch::kFloat16));
  const float* wp = w.data_ptr<float>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  uint16_t* sp = reinterpret_cast<uint16_t*>(scales.data_ptr<at::Half>());
  const float tiny = 6.103515625e-05f;                        // float16's smallest normal
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t b = 0; b < K / 64; ++b) {
        __m256i half[2];
        for (int h = 0; h < 2; ++h) {
          const float* v = wp + n * K + 64 * b + 32 * h;
          const uint16_t sh = _cvtss_sh(hmax_abs(v, 32) / 7.0f, _MM_FROUND_TO_NEAREST_INT);
          sp[n * G + 2 * b + h] = sh;
          const __m256 s = _mm256_set1_ps(std::max(_cvtsh_ss(sh), tiny));
          __m256i c[4];
          for (int u = 0; u < 4; ++u) c[u] = _mm256_add_epi32(codes8(v + 8 * u, s, -7.f, 7.f), _mm256_set1_epi32(8));
          half[h] = pack32(c);
        }
        // codes are 1..15: the high group's shift by 4 stays inside each byte
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pp + n * (K / 2) + 32 * b),
                            _mm256_or_si256(half[0], _mm256_slli_epi16(half[1], 4)));
      }
    }
  });
  return {packed, scales};
}

std::vector<torch::Tensor> int8_quantize(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32, "int8_quantize: float32 weights (N, K) expected");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto q = torch::empty({N, K}, w.options().dtype(torch::kInt8));
  auto scales = torch::empty({N}, w.options());
  const float* wp = w.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) sp[n] = musicgen::int8_quantize_row(wp + n * K, K, qp + n * K);
  });
  return {q, scales};
}

float musicgen::int8_quantize_row(const float* v, int64_t K, int8_t* q) {
  const int64_t K8 = K / 8 * 8;
  float amax = hmax_abs(v, K8);
  for (int64_t k = K8; k < K; ++k) amax = std::max(amax, std::fabs(v[k]));
  const float scale = std::max(amax, 1e-12f) / 127.0f;
  const __m256 s = _mm256_set1_ps(scale);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i c[4];
    for (int u = 0; u < 4; ++u) c[u] = codes8(v + k + 8 * u, s, -127.f, 127.f);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), pack32(c));
  }
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(v[k] / scale))));
  return scale;
}
