// Decode's P V over q8_0 value rows without a staging buffer: each block is converted in
// registers (value = float(q) * float(d), one rounding, as dequantize_row computes it)
// and used at once for up to four columns, so the same fused multiply-adds run in the same
// key order as the staged path (dequantize_row into a buffer, then gemm_wide): the same
// bits, without the store and reload of every value (q8_0 decode on AVX-512). Other
// targets keep the staged path.
#pragma once

#include <algorithm>
#include <cmath>

#include "../../core/cache_types.hpp"
#include "../../core/tensor_view.hpp"
#include "../../simd/dequantize.hpp"
#include "../../simd/vec.hpp"

#if defined(__AVX512F__) && !defined(FOVEA_FORCE_SCALAR)
#include <immintrin.h>
#define FOVEA_HAS_Q8_0_VALUES 1
#else
#define FOVEA_HAS_Q8_0_VALUES 0
#endif

namespace fovea::detail {

/// Whether every block scale of `rows` rows of `blocks` blocks is finite (then so is every
/// value: |q| <= 127 and |d| <= 65504).
inline bool q8_0_scales_finite(const block_q8_0* const* rows, index_t count,
                               index_t blocks) noexcept {
  for (index_t r = 0; r < count; ++r)
    for (index_t b = 0; b < blocks; ++b)
      if (!std::isfinite(block_scale(rows[r][b].d))) return false;
  return true;
}

#if FOVEA_HAS_Q8_0_VALUES

/// acc[c * ld_acc + (0, 32 * Blocks)) += sum over keys j of p[c * ld_p + j] * value_j over
/// blocks [b0, b0 + Blocks) of the rows, for c < Columns.
/// (The multiply-adds are the backend's, as gemm_wide's: xsimd 8.1 writes AVX-512's as
/// a * b + c, which GCC fuses from -O2 only, so the staged path is matched at every -O.)
template <class Backend, int Columns, int Blocks>
[[gnu::noinline]] void q8_0_values_kernel(const block_q8_0* const* rows, index_t keys, index_t b0,
                                          const float* p, index_t ld_p, float* acc,
                                          index_t ld_acc) noexcept {
  using V = vec<float, Backend>;
  static_assert(V::width == 16);
  constexpr int vectors = 2 * Blocks;
  typename V::type sum[Columns][vectors];
#pragma GCC unroll 4
  for (int c = 0; c < Columns; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < vectors; ++v) sum[c][v] = V::load(acc + c * ld_acc + 16 * v);
  for (index_t j = 0; j < keys; ++j) {
    const block_q8_0* blk = rows[j] + b0;
    typename V::type x[vectors];
#pragma GCC unroll 2
    for (int b = 0; b < Blocks; ++b) {
      const __m512 d = _mm512_set1_ps(block_scale(blk[b].d));
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk[b].qs + 16 * h));
        x[2 * b + h] = typename V::type(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw)), d));
      }
    }
#pragma GCC unroll 4
    for (int c = 0; c < Columns; ++c) {
      const auto pc = V::broadcast(p[c * ld_p + j]);
#pragma GCC unroll 4
      for (int v = 0; v < vectors; ++v) sum[c][v] = V::fma(pc, x[v], sum[c][v]);
    }
  }
#pragma GCC unroll 4
  for (int c = 0; c < Columns; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < vectors; ++v) V::store(acc + c * ld_acc + 16 * v, sum[c][v]);
}

/// acc[c * ld_acc + (0, Dv)) += sum over keys j < keys of p[c * ld_p + j] * value_j (the
/// q8_0 rows `rows`, Dv % 32 == 0) for c < columns: four columns by two blocks at a time.
template <class Backend>
void q8_0_values(const block_q8_0* const* rows, index_t keys, index_t Dv, const float* p,
                        index_t ld_p, index_t columns, float* acc, index_t ld_acc) noexcept {
  const index_t blocks = Dv / block_q8_0::size;
  for (index_t c0 = 0; c0 < columns; c0 += 4) {
    const index_t n = std::min<index_t>(4, columns - c0);
    for (index_t b0 = 0; b0 < blocks; b0 += 2) {
      const bool pair = b0 + 2 <= blocks;
      const float* pc = p + c0 * ld_p;
      float* out = acc + c0 * ld_acc + b0 * block_q8_0::size;
      [&]<int... C>(std::integer_sequence<int, C...>) {
        ((n == C + 1 ? (pair ? q8_0_values_kernel<Backend, C + 1, 2>(rows, keys, b0, pc, ld_p, out, ld_acc)
                             : q8_0_values_kernel<Backend, C + 1, 1>(rows, keys, b0, pc, ld_p, out, ld_acc))
                     : void()),
         ...);
      }(std::make_integer_sequence<int, 4>{});
    }
  }
}

#endif

}  // namespace fovea::detail
