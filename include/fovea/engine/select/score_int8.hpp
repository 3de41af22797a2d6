// Dot products of fp32 rows quantised to int8 with one scale per row, summed exactly in
// int32 by AVX512-VNNI's vpdpbusd (four multiply-adds per lane per instruction: twice
// vdpbf16ps, four times an fp32 FMA). HiP's mask estimation ranks key blocks by them,
// where only the order of the scores matters (the reference estimates its masks from
// fp16 or fp8 keys); attention itself stays in the accumulation type. Available when the
// compiler targets AVX512-VNNI and AVX512-BW.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#include "../../core/tensor_view.hpp"
#include "../../simd/prefetch.hpp"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FOVEA_HAS_INT8_DOT 1
#else
#define FOVEA_HAS_INT8_DOT 0
#endif

namespace fovea::detail {

/// 32-bit words (four int8 each) of a row of length d: whole 64-element vectors.
constexpr index_t int8_quads(index_t d) noexcept { return (d + 63) / 64 * 16; }
/// Words of a quantised key row: its quads, then its scale (float bits) and the sum of
/// its int8 values.
constexpr index_t int8_row_words(index_t d) noexcept { return int8_quads(d) + 2; }

#if FOVEA_HAS_INT8_DOT

/// x[0, n) as int8 values v with x ~ scale * v (scale = max |x| / 127; 0 for a row of
/// zeros), into dst[0, int8_quads(n)) (zeros past n); returns the scale and writes the
/// sum of the values.
inline float quantise_int8(const float* x, index_t n, std::uint32_t* dst,
                           std::int32_t& sum) noexcept {
  auto lanes = [&](index_t from) {
    const index_t left = n - from;
    return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
  };
  __m512 top = _mm512_setzero_ps();
  __mmask16 unordered = 0;
  for (index_t d = 0; d < n; d += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(lanes(d), x + d);
    top = _mm512_max_ps(top, _mm512_abs_ps(v));
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  const float largest = _mm512_reduce_max_ps(top);
  // A NaN or an infinity makes the scale NaN: every product with the row is NaN, which
  // the search treats as the highest score (the row is selected, and poisons its output).
  const float scale = unordered || !std::isfinite(largest) ? std::numeric_limits<float>::quiet_NaN()
                                                           : largest / 127;
  sum = 0;
  if (scale != scale) {  // the values do not matter then: zeros (NaN converts to INT_MIN)
    std::fill(dst, dst + int8_quads(n), 0u);
    return scale;
  }
  // x times 1 / scale, or x / scale where the reciprocal overflows (a row below ~3.7e-37,
  // whose zeros would otherwise become 0 * inf = NaN and read as -128).
  const float reciprocal = scale > 0 ? 1 / scale : 0;
  const bool divide = std::isinf(reciprocal);
  const __m512 inverse = _mm512_set1_ps(reciprocal), divisor = _mm512_set1_ps(scale);
  __m512i total = _mm512_setzero_si512();
  for (index_t d = 0; d < int8_quads(n) * 4; d += 16) {
    const __m512 in = _mm512_maskz_loadu_ps(lanes(d), x + d);
    const __m512i v =
        _mm512_cvtps_epi32(divide ? _mm512_div_ps(in, divisor) : _mm512_mul_ps(in, inverse));
    total = _mm512_add_epi32(total, v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d / 4), _mm512_cvtsepi32_epi8(v));
  }
  sum = _mm512_reduce_add_epi32(total);
  return scale;
}

/// A key row for dot_int8: int8_row_words(n) words at dst.
inline void quantise_key_int8(const float* x, index_t n, std::uint32_t* dst) noexcept {
  std::int32_t sum = 0;
  const float scale = quantise_int8(x, n, dst, sum);
  std::memcpy(dst + int8_quads(n), &scale, sizeof scale);
  std::memcpy(dst + int8_quads(n) + 1, &sum, sizeof sum);
}

/// Column c of the query matrix for dot_int8: x[0, n) quantised, stored offset by 128 (as
/// the unsigned operand of vpdpbusd) at q[i * ld + c], i < int8_quads(n); returns the scale.
inline float quantise_query_int8(const float* x, index_t n, std::uint32_t* q, index_t ld, index_t c,
                                 std::uint32_t* scratch) noexcept {
  std::int32_t sum = 0;
  const float scale = quantise_int8(x, n, scratch, sum);
  for (index_t i = 0; i < int8_quads(n); ++i) q[i * ld + c] = scratch[i] ^ 0x80808080u;
  return scale;
}

/// acc += the sums of four products of unsigned bytes u and signed bytes v per lane. As
/// an asm statement: through the intrinsic, GCC 12 copies every accumulator to a new
/// register before each instruction (and spills two), which made the loop twice as slow.
inline void dpbusd(__m512i& acc, __m512i u, __m512i v) noexcept {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(v));
}

/// s[r][c] = the dot product of key row a_r and query column c, for Rows rows and
/// Vectors * 16 columns: sum over the quads of (u_c - 128) v_r in int32, times the two
/// scales (q_scale[c] per column). q is [quads][ld] words, s is [Rows][lds] floats.
template <int Rows, int Vectors>
inline void dot_int8_block(const std::uint32_t* const* a, const std::uint32_t* q, index_t ld,
                           const float* q_scale, index_t quads, float* s, index_t lds) noexcept {
  __m512i acc[Rows][Vectors];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 4
    for (int x = 0; x < Vectors; ++x) acc[r][x] = _mm512_setzero_si512();
  for (index_t i = 0; i < quads; ++i) {
    __m512i qv[Vectors];
#pragma GCC unroll 4
    for (int x = 0; x < Vectors; ++x) qv[x] = _mm512_loadu_si512(q + i * ld + x * 16);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const __m512i kv = _mm512_set1_epi32(int(a[r][i]));
#pragma GCC unroll 4
      for (int x = 0; x < Vectors; ++x) dpbusd(acc[r][x], qv[x], kv);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    float scale;
    std::int32_t sum;
    std::memcpy(&scale, a[r] + quads, sizeof scale);
    std::memcpy(&sum, a[r] + quads + 1, sizeof sum);
    const __m512i offset = _mm512_set1_epi32(128 * sum);
#pragma GCC unroll 4
    for (int x = 0; x < Vectors; ++x) {
      const __m512 exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][x], offset));
      const __m512 scales = _mm512_mul_ps(_mm512_set1_ps(scale), _mm512_loadu_ps(q_scale + x * 16));
      _mm512_storeu_ps(s + r * lds + x * 16, _mm512_mul_ps(exact, scales));
    }
  }
}

/// s[r][c] for r < rows (key rows a[r] as quantise_key_int8 wrote them, `quads` quads each)
/// and c < vectors * 16 (at most 4 vectors): blocks of 8 rows (6 at four vectors: the
/// accumulators fit the 32 registers), then one call sized to the remainder. The rows are
/// usually scattered (a tree search's picks), so the hardware cannot guess the next one:
/// each block's rows are prefetched into L1 two blocks ahead.
template <int Vectors>
inline void dot_int8_rows(index_t rows, const std::uint32_t* const* a, const std::uint32_t* q,
                          index_t ld, const float* q_scale, index_t quads, float* s,
                          index_t lds) noexcept {
  constexpr int RB = Vectors == 4 ? 6 : 8, ahead = 2 * RB;
  constexpr index_t line = 16;  // words per cache line
  auto prefetch_block = [&](index_t from, index_t to) {
    for (index_t r = from; r < std::min(to, rows); ++r)
      for (index_t i = 0; i < quads + 2; i += line) prefetch_l1(a[r] + i);
  };
  prefetch_block(0, ahead);
  index_t r = 0;
  for (; r + RB <= rows; r += RB) {
    prefetch_block(r + ahead, r + ahead + RB);
    dot_int8_block<RB, Vectors>(a + r, q, ld, q_scale, quads, s + r * lds, lds);
  }
  const index_t rest = rows - r;
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((rest == R + 1 ? dot_int8_block<R + 1, Vectors>(a + r, q, ld, q_scale, quads, s + r * lds, lds)
                    : void()),
     ...);
  }
  (std::make_integer_sequence<int, RB - 1>{});
}

inline void dot_int8(index_t rows, index_t vectors, const std::uint32_t* const* a,
                     const std::uint32_t* q, index_t ld, const float* q_scale, index_t quads,
                     float* s, index_t lds) noexcept {
  switch (vectors) {
    case 1:
      return dot_int8_rows<1>(rows, a, q, ld, q_scale, quads, s, lds);
    case 2:
      return dot_int8_rows<2>(rows, a, q, ld, q_scale, quads, s, lds);
    case 3:
      return dot_int8_rows<3>(rows, a, q, ld, q_scale, quads, s, lds);
    default:
      return dot_int8_rows<4>(rows, a, q, ld, q_scale, quads, s, lds);
  }
}

#endif

}  // namespace fovea::detail
