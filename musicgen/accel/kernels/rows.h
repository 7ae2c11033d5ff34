// The row kernels of dense_gemv (AVX2 and AVX-512) and of int8_gemv at AVX-512 (its AVX2 kernel is in int8.cpp):
//
//   y[m, n] = (sum_k x[m, k] * w[n, k]) * scale[n] + bias[n]     x float32 (M, K), w (N, K), scale optional
//
// with the weights (int8, float32, bfloat16 or float16) widened exactly to float32 and float32 sums. Decoding
// multiplies a handful of rows by each weight, so the work is one pass over the weight stream; each widening of
// the weights feeds every row of a block of rows, and each row keeps A accumulators (several FMA chains in
// flight: with one, FMA latency rather than the weight stream is the limit).
//
// At AVX-512, blocks of NB = 16 weight rows share one chunk of the activation rows (1024 columns: 4 KB a row, so
// a block of up to 8 rows stays in L1 across the 16 weight rows, instead of every row's whole K streaming from
// L2 once per weight row). The AVX2 kernel, with at most 4 rows a block, reads each weight row whole: the
// sequential stream prefetches better than 16 interleaved ones (docs/kernels.md). Output channels are split
// across threads.
//
// A row's result does not depend on how many rows share the call (the service batches requests and promises each
// its solo codes): the chunks of K are the same for every row count, and a row has the same A accumulators,
// summed in the same order, in every block of rows.
#pragma once

#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace musicgen {

// The weights read next in a chunk of one weight row: each 64-byte line of w[k .. k + n) once, ahead_l1 bytes
// later in reading order into L1 and ahead_l2 into L2 (see prefetch_weights).
template <typename W>
inline void prefetch_chunk(const W* w, int64_t k, int64_t n, int64_t ahead_l1, int64_t ahead_l2) {
  const char* at = reinterpret_cast<const char*>(w + k);
  const int64_t bytes = n * int64_t(sizeof(W));
  for (int64_t line = (64 - (k * int64_t(sizeof(W))) % 64) % 64; line < bytes; line += 64) {
    _mm_prefetch(at + line + ahead_l1, _MM_HINT_T0);
    _mm_prefetch(at + line + ahead_l2, _MM_HINT_T1);
  }
}

// rows x[0..MB) (leading dimension ldx) times weight row w over K (one chunk), added to out[m * ld_out]
template <typename W, int A, int MaxRows>
struct Avx2Dot {
  static constexpr int max_rows = MaxRows;
  static constexpr int64_t chunk = 0;   // whole rows

  // (not inlined into the driver: there GCC kept the accumulators in memory)
  template <int MB>
  __attribute__((noinline)) static void run(const float* x, int64_t ldx, int64_t K, const W* w, float* out,
                                            int64_t ld_out, int64_t ahead_l1, int64_t ahead_l2) {
    __m256 acc[MB][A];
    for (int m = 0; m < MB; ++m)
      for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * A <= K; k += 8 * A) {
      prefetch_chunk(w, k, 8 * A, ahead_l1, ahead_l2);
      __m256 wv[A];
      for (int a = 0; a < A; ++a) wv[a] = widen8(w + k + 8 * a);
      for (int m = 0; m < MB; ++m)
        for (int a = 0; a < A; ++a)
          acc[m][a] = _mm256_fmadd_ps(wv[a], _mm256_loadu_ps(x + m * ldx + k + 8 * a), acc[m][a]);
    }
    for (; k + 8 <= K; k += 8) {
      const __m256 wv = widen8(w + k);
      for (int m = 0; m < MB; ++m) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k), acc[m][0]);
    }
    for (int m = 0; m < MB; ++m) {
      __m256 t = acc[m][0];
      for (int a = 1; a < A; ++a) t = _mm256_add_ps(t, acc[m][a]);
      float s = hsum(t);
      for (int64_t kk = k; kk < K; ++kk) s += widen1(w[kk]) * x[m * ldx + kk];
      out[m * ld_out] += s;
    }
  }
};

// Blocks whose (rows + 1) x A accumulators and weight vectors would not fit the 32 registers run in two passes
// over the chunk, each with half of every row's accumulators: the first pass the first A / 2 of each 16 A
// columns, the second the rest (its weights from L1). Every accumulator sees the same products in the same order
// as in one pass, and the sums combine in the same order, so the result is the same.
template <typename W, int A, int MaxRows>
struct Avx512Dot {
  static constexpr int max_rows = MaxRows;
  static constexpr int64_t chunk = 1024;   // columns of K

  template <int MB>
  MUSICGEN_AVX512 static void run(const float* x, int64_t ldx, int64_t K, const W* w, float* out, int64_t ld_out,
                                  int64_t ahead_l1, int64_t ahead_l2) {
    constexpr bool two_passes = (MB + 1) * A > 32;
    __m512 t[MB];   // each row's accumulators summed, in order
    int64_t k = 0;
    if constexpr (!two_passes) {
      __m512 acc[MB][A];
      for (int m = 0; m < MB; ++m)
        for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
      for (; k + 16 * A <= K; k += 16 * A) {
        prefetch_chunk(w, k, 16 * A, ahead_l1, ahead_l2);
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
        t[m] = acc[m][0];
        for (int a = 1; a < A; ++a) t[m] = _mm512_add_ps(t[m], acc[m][a]);
      }
    } else {
      static_assert(A % 2 == 0, "two passes need an even number of accumulators");
      constexpr int H = A / 2;
      const int64_t whole = K / (16 * A) * (16 * A);
      for (int p = 0; p < 2; ++p) {
        __m512 acc[MB][H];
        for (int m = 0; m < MB; ++m)
          for (int a = 0; a < H; ++a) acc[m][a] = _mm512_setzero_ps();
        for (k = 0; k < whole; k += 16 * A) {
          if (p == 0) prefetch_chunk(w, k, 16 * A, ahead_l1, ahead_l2);
          const int64_t kp = k + 16 * H * p;
          __m512 wv[H];
          for (int a = 0; a < H; ++a) wv[a] = widen16(w + kp + 16 * a);
          for (int m = 0; m < MB; ++m)
            for (int a = 0; a < H; ++a)
              acc[m][a] = _mm512_fmadd_ps(wv[a], _mm512_loadu_ps(x + m * ldx + kp + 16 * a), acc[m][a]);
        }
        if (p == 0)
          for (; k + 16 <= K; k += 16) {
            const __m512 wv = widen16(w + k);
            for (int m = 0; m < MB; ++m)
              acc[m][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * ldx + k), acc[m][0]);
          }
        for (int m = 0; m < MB; ++m)
          for (int a = 0; a < H; ++a) t[m] = p == 0 && a == 0 ? acc[m][0] : _mm512_add_ps(t[m], acc[m][a]);
      }
      k = whole;
      while (k + 16 <= K) k += 16;   // where the first pass's 16-column steps ended
    }
    for (int m = 0; m < MB; ++m) {
      float s = _mm512_reduce_add_ps(t[m]);
      for (int64_t kk = k; kk < K; ++kk) s += widen1(w[kk]) * x[m * ldx + kk];
      out[m * ld_out] += s;
    }
  }
};

// y (M, N) = x (M, K) . w (N, K)^T (* scale[n] where scale) + bias[n] with the dot products of Dot
template <typename Dot, typename W>
void gemv_rows(const float* x, int64_t M, int64_t K, const W* w, const float* scale, const float* bias, int64_t N,
               float* y) {
  constexpr int64_t NB = 16;                       // weight rows sharing one activation chunk
  const int64_t KC = Dot::chunk ? Dot::chunk : K;   // the same chunks whatever M (see above)
  at::parallel_for(0, N, NB, [&](int64_t n0, int64_t n1) {
    std::vector<float> part(NB * M);   // part[m * NB + n - nb]
    for (int64_t nb = n0; nb < n1; nb += NB) {
      const int64_t ne = std::min(nb + NB, n1);
      std::fill(part.begin(), part.end(), 0.f);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        // prefetch 2 KB and 16 KB ahead in reading order: in chunks of K, whole weight rows ahead
        const int64_t row = K * int64_t(sizeof(W)), chunk = kc * int64_t(sizeof(W));
        const int64_t l1 = kc == K ? 2048 : row * std::max<int64_t>(1, 2048 / chunk);
        const int64_t l2 = kc == K ? 16384 : row * std::max<int64_t>(1, 16384 / chunk);
        for (int64_t n = nb; n < ne; ++n) {
          const W* wn = w + n * K + k0;
          float* acc = &part[n - nb];
          row_blocks<Dot::max_rows>(M, [&](auto mb, int64_t m) {
            Dot::template run<decltype(mb)::value>(x + m * K + k0, K, kc, wn, acc + m * NB, NB, l1, l2);
          });
        }
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = nb; n < ne; ++n)
          y[m * N + n] = part[m * NB + n - nb] * (scale ? scale[n] : 1.f) + (bias ? bias[n] : 0.f);
    }
  });
}

}  // namespace musicgen
