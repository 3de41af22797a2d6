// Dot products of fp32 rows rounded to bf16, summed in fp32, with AVX512-BF16's
// vdpbf16ps (two multiply-adds per lane per instruction, twice an fp32 FMA's). HiP's
// mask estimation uses them to rank key blocks, where only the order of the scores
// matters (the reference estimates masks from fp16 or fp8 keys); attention itself stays
// in the accumulation type. Available when the compiler targets AVX512-BF16.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "../core/tensor_view.hpp"
#include "../simd/prefetch.hpp"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FOVEA_HAS_BF16_DOT 1
#else
#define FOVEA_HAS_BF16_DOT 0
#endif

namespace fovea::detail {

/// bf16 pairs per row of length d: rounded up to whole 32-element vectors.
constexpr index_t bf16_pairs(index_t d) noexcept { return (d + 31) / 32 * 16; }

#if FOVEA_HAS_BF16_DOT

/// dst[i] = the bf16 pair (x[2i], x[2i + 1]), i < bf16_pairs(n); zeros past n.
inline void to_bf16_pairs(const float* x, index_t n, std::uint32_t* dst) noexcept {
  for (index_t d = 0; d < n; d += 32) {
    auto lanes = [&](index_t from) {
      const index_t left = n - from;
      return left >= 16  ? __mmask16(0xFFFF)
             : left <= 0 ? __mmask16(0)
                         : __mmask16((1u << left) - 1);
    };
    const __m512 lo = _mm512_maskz_loadu_ps(lanes(d), x + d);
    const __m512 hi = _mm512_maskz_loadu_ps(lanes(d + 16), x + d + 16);
    _mm512_storeu_si512(dst + d / 2, __m512i(_mm512_cvtne2ps_pbh(hi, lo)));
  }
}

/// s[r][c] = sum_i a_r[i] . b[i][c] over `pairs` bf16 pairs, for Rows rows and
/// Vectors * 16 columns; b is [pairs][ld] pairs, s is [Rows][lds] floats.
template <int Rows, int Vectors>
inline void dot_bf16_block(const std::uint32_t* const* a, const std::uint32_t* b, index_t ld,
                           index_t pairs, float* s, index_t lds) noexcept {
  __m512 acc[Rows][Vectors];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 4
    for (int x = 0; x < Vectors; ++x) acc[r][x] = _mm512_setzero_ps();
  for (index_t i = 0; i < pairs; ++i) {
    __m512bh bv[Vectors];
#pragma GCC unroll 4
    for (int x = 0; x < Vectors; ++x) bv[x] = __m512bh(_mm512_loadu_si512(b + i * ld + x * 16));
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const __m512bh av = __m512bh(_mm512_set1_epi32(int(a[r][i])));
#pragma GCC unroll 4
      for (int x = 0; x < Vectors; ++x) acc[r][x] = _mm512_dpbf16_ps(acc[r][x], av, bv[x]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 4
    for (int x = 0; x < Vectors; ++x) _mm512_storeu_ps(s + r * lds + x * 16, acc[r][x]);
}

/// s[r][c] for r < rows (rows a[r], `pairs` pairs each) and c < vectors * 16 (at most 4
/// vectors): blocks of 8 rows (6 at four vectors: the accumulators fit the 32 registers),
/// then one call sized to the remainder. The rows are usually scattered (a tree search's
/// picks), so the hardware cannot guess the next one: each block's rows are prefetched
/// into L1 two blocks ahead.
template <int Vectors>
inline void dot_bf16_rows(index_t rows, const std::uint32_t* const* a, const std::uint32_t* b,
                          index_t ld, index_t pairs, float* s, index_t lds) noexcept {
  constexpr int RB = Vectors == 4 ? 6 : 8, ahead = 2 * RB;
  constexpr index_t line = 16;  // pairs per cache line
  auto prefetch_block = [&](index_t from, index_t to) {
    for (index_t r = from; r < std::min(to, rows); ++r)
      for (index_t i = 0; i < pairs; i += line) prefetch_l1(a[r] + i);
  };
  prefetch_block(0, ahead);
  index_t r = 0;
  for (; r + RB <= rows; r += RB) {
    prefetch_block(r + ahead, r + ahead + RB);
    dot_bf16_block<RB, Vectors>(a + r, b, ld, pairs, s + r * lds, lds);
  }
  const index_t rest = rows - r;
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((rest == R + 1 ? dot_bf16_block<R + 1, Vectors>(a + r, b, ld, pairs, s + r * lds, lds)
                    : void()),
     ...);
  }
  (std::make_integer_sequence<int, RB - 1>{});
}

inline void dot_bf16(index_t rows, index_t vectors, const std::uint32_t* const* a,
                     const std::uint32_t* b, index_t ld, index_t pairs, float* s,
                     index_t lds) noexcept {
  switch (vectors) {
    case 1:
      return dot_bf16_rows<1>(rows, a, b, ld, pairs, s, lds);
    case 2:
      return dot_bf16_rows<2>(rows, a, b, ld, pairs, s, lds);
    case 3:
      return dot_bf16_rows<3>(rows, a, b, ld, pairs, s, lds);
    default:
      return dot_bf16_rows<4>(rows, a, b, ld, pairs, s, lds);
  }
}

#endif

}  // namespace fovea::detail
