// One square block of W x W elements transposed (W: the vector width). The prefill tile
// keeps its queries and its output transposed (one query per lane); a tile that sees few
// keys (agent attention's second stage, short sequences) spends as long moving rows in
// and out as computing, element by element. fp32 blocks are transposed in registers with
// AVX-512 (16 x 16) or AVX (8 x 8) shuffles; other types copy element by element.
#pragma once

#include <algorithm>
#include <type_traits>

#include "../core/tensor_view.hpp"
#include "vec.hpp"

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace fovea::detail {

#if defined(__AVX__)
/// Within each 128-bit lane k of rows r[0..4): u[j] lane k = {r[0][4k + j], ..., r[3][4k + j]}.
template <class Reg, class UnpackLo, class UnpackHi, class Shuffle>
inline void transpose_4x4_lanes(const Reg* r, Reg* u, UnpackLo lo, UnpackHi hi,
                                Shuffle shuffle) noexcept {
  const Reg t0 = lo(r[0], r[1]), t1 = hi(r[0], r[1]), t2 = lo(r[2], r[3]), t3 = hi(r[2], r[3]);
  u[0] = shuffle.template operator()<0x44>(t0, t2);
  u[1] = shuffle.template operator()<0xEE>(t0, t2);
  u[2] = shuffle.template operator()<0x44>(t1, t3);
  u[3] = shuffle.template operator()<0xEE>(t1, t3);
}
#endif

/// dst[i * ld + c] = rows[c][i] for c, i < W = vec<T, Backend>::width.
template <class T, class Backend>
inline void transpose_block(const T* const* rows, T* dst, index_t ld) noexcept {
  constexpr int W = vec<T, Backend>::width;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && W == 16) {
    __m512 r[16], u[16];
    for (int c = 0; c < 16; ++c) r[c] = _mm512_loadu_ps(rows[c]);
    for (int g = 0; g < 16; g += 4)  // u[g + j] lane k: column 4k + j of rows g..g+3
      transpose_4x4_lanes(
          r + g, u + g, [](__m512 a, __m512 b) { return _mm512_unpacklo_ps(a, b); },
          [](__m512 a, __m512 b) { return _mm512_unpackhi_ps(a, b); },
          []<int imm>(__m512 a, __m512 b) { return _mm512_shuffle_ps(a, b, imm); });
    for (int j = 0; j < 4; ++j) {  // gather lane k of u[j], u[4 + j], u[8 + j], u[12 + j]
      const __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44);
      const __m512 v1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
      const __m512 v2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44);
      const __m512 v3 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
      _mm512_storeu_ps(dst + (j)*ld, _mm512_shuffle_f32x4(v0, v2, 0x88));
      _mm512_storeu_ps(dst + (4 + j) * ld, _mm512_shuffle_f32x4(v0, v2, 0xDD));
      _mm512_storeu_ps(dst + (8 + j) * ld, _mm512_shuffle_f32x4(v1, v3, 0x88));
      _mm512_storeu_ps(dst + (12 + j) * ld, _mm512_shuffle_f32x4(v1, v3, 0xDD));
    }
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float> && W == 8) {
    __m256 r[8], u[8];
    for (int c = 0; c < 8; ++c) r[c] = _mm256_loadu_ps(rows[c]);
    for (int g = 0; g < 8; g += 4)
      transpose_4x4_lanes(
          r + g, u + g, [](__m256 a, __m256 b) { return _mm256_unpacklo_ps(a, b); },
          [](__m256 a, __m256 b) { return _mm256_unpackhi_ps(a, b); },
          []<int imm>(__m256 a, __m256 b) { return _mm256_shuffle_ps(a, b, imm); });
    for (int j = 0; j < 4; ++j) {
      _mm256_storeu_ps(dst + j * ld, _mm256_permute2f128_ps(u[j], u[4 + j], 0x20));
      _mm256_storeu_ps(dst + (4 + j) * ld, _mm256_permute2f128_ps(u[j], u[4 + j], 0x31));
    }
    return;
  }
#endif
  for (int c = 0; c < W; ++c)
    for (int i = 0; i < W; ++i) dst[i * ld + c] = rows[c][i];
}

/// x_t[e * ld + r] = x[r * stride + e] for rows r < n and columns e < d of x; the columns
/// [n, ld) of x_t are zero. Whole W x W blocks through transpose_block, the edges element
/// by element.
template <class T, class Backend>
void transpose_rows(const T* x, index_t n, index_t stride, index_t d, T* x_t, index_t ld) noexcept {
  constexpr index_t W = vec<T, Backend>::width;
  // (the whole blocks' end computed once: with `r + W <= n` as the test, GCC -O3 inlined
  // into the recurrence's chunk step warned of undefined behaviour in the tail loop)
  const index_t whole = n / W * W;
  for (index_t r = 0; r < whole; r += W) {
    const T* rows[W];
    index_t e = 0;
    for (; e + W <= d; e += W) {
      for (index_t i = 0; i < W; ++i) rows[i] = x + (r + i) * stride + e;
      transpose_block<T, Backend>(rows, x_t + e * ld + r, ld);
    }
    for (; e < d; ++e)
      for (index_t i = 0; i < W; ++i) x_t[e * ld + r + i] = x[(r + i) * stride + e];
  }
  for (index_t e = 0; e < d; ++e) {
    for (index_t i = whole; i < n; ++i) x_t[e * ld + i] = x[i * stride + e];
    std::fill(x_t + e * ld + n, x_t + e * ld + ld, T(0));
  }
}

}  // namespace fovea::detail
