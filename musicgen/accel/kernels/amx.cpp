// Products with many rows on AMX tiles (Intel Sapphire Rapids and later, level AMX): tile registers of up to 16
// rows x 64 bytes and a unit that multiplies them. Used from several rows on, where the row kernels are bound by
// arithmetic rather than by the weight stream (kernels.h: AMX_*_MIN_ROWS). Linux grants the 8 KB tile state
// per process (isa.cpp asks once); each call configures the tiles it uses and releases them.
//
// amx_bf16_gemv: int8 or bfloat16 weights on the bfloat16 tiles, float32 activations kept exactly.
// amx_int4_gemv: 4-bit weights times int8-quantised activations on the int8 tiles, exact int32 group sums.
#include "kernels.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

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
// part and an int8 or bfloat16 weight is exact in float32, so the result differs from the row kernels' only in
// the order of the float32 sums (with one part, activations rounded to bfloat16, it did not).
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

// y (M, N) = x (M, K) . w (N, K)^T (* scale) + bias on the tile unit (the caller checks N % 16, K % 32)
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

// The int4 product on the int8 tiles: one tdpbssd multiplies up to 16 activation rows by 16 weight rows over one
// group of 32, where the VNNI kernel (int4.cpp) spends a dot product, a conversion and a multiply-add per row and
// per pair of groups. Each block of 16 weight rows (contiguous in memory) is walked a pair of groups at a time:
//   - the 16 x 32 weight bytes of the pair are transposed into the tile unit's B layout (row r: the 4 bytes
//     k = 4r..4r+3 of each of the 16 weight rows) and the nibbles become signed codes u - 8, one B tile per
//     group, so no offset term is needed;
//   - one tdpbssd per group gives the (rows x 16) exact int32 group sums; they are stored and scaled in float,
//     y[m, n] += sum * x_scale[m, g] * w_scale[n, g], 16 output channels per vector;
//   - the next pair is transposed, and the next block of weight rows prefetched, while the tile unit works
//     (without the prefetch, the strided walk over 16 rows lost to the VNNI kernel).
// Only the order of the float sums differs from the row kernels. Needs N % 16 == 0 (every MusicGen layer).

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

void musicgen::amx_bf16_gemv(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale,
                             const float* bias, int64_t N, float* y) {
  gemv_amx_bf16(x, M, K, w, scale, bias, N, y);
}

void musicgen::amx_bf16_gemv(const float* x, int64_t M, int64_t K, const uint16_t* w, const float* bias, int64_t N,
                             float* y) {
  gemv_amx_bf16(x, M, K, w, nullptr, bias, N, y);
}

void musicgen::amx_int4_gemv(const int8_t* xq, const float* xs, int64_t M, int64_t K, const uint8_t* w,
                             const uint16_t* ws, const float* bias, int64_t N, float* y) {
  const int64_t G = K / 32;
  at::parallel_for(0, N / 16, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t m = 0; m < M; m += 16)
      q4_amx(xq + m * K, xs + m * G, static_cast<int>(std::min<int64_t>(16, M - m)), K, w, ws, bias, 16 * b0,
             16 * b1, y + m * N, N);
  });
}
