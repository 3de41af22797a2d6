// Decode's P V over quantized value rows without a staging buffer: q8_0 blocks, int8 rows
// with a scale per row, fp8 rows with a scale per head. Each group of 32 values is
// converted in registers (value = float(q) * scale, one rounding, as dequantize_row
// computes it) and used at once for up to four columns, so the same fused multiply-adds
// run in the same key order as the staged path (dequantize_row into a buffer, then
// gemm_wide): the same bits, without the store and reload of every value (decode on
// AVX-512). Other targets keep the staged path.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../../core/cache_types.hpp"
#include "../../core/tensor_view.hpp"
#include "../../simd/dequantize.hpp"
#include "../../simd/vec.hpp"

#if defined(__AVX512F__) && defined(__AVX2__) && defined(__F16C__) && !defined(FOVEA_FORCE_SCALAR)
#include <immintrin.h>
#define FOVEA_HAS_QUANTIZED_VALUES 1
#else
#define FOVEA_HAS_QUANTIZED_VALUES 0
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

#if FOVEA_HAS_QUANTIZED_VALUES

/// Group `g` (32 values) of a value row in fp32, as two vectors: q8_0 with its block's
/// scale, the scaled types with `scale` (the row's or head's; e4m3 through fp16 needs it
/// times 256, see dequantize_row).
template <class S>
[[gnu::always_inline]] inline void convert_group(const S* row, index_t g, float scale, __m512 (&x)[2]) noexcept {
  const __m512 s = _mm512_set1_ps(scale);
  if constexpr (std::is_same_v<S, block_q8_0> || std::is_same_v<S, std::int8_t>) {
    const std::int8_t* q;
    if constexpr (std::is_same_v<S, block_q8_0>)
      q = row[g].qs;
    else
      q = row + 32 * g;
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) x[h] = scaled_int8x16(q + 16 * h, s);
  } else {
#if defined(__AVX512BW__)
    const __m512i halves = fp8_as_half_32<S>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * g)));
    x[0] = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(halves)), s);
    x[1] = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(halves, 1)), s);
#else
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) x[h] = scaled_fp8x16(row + 32 * g + 16 * h, s);
#endif
  }
}

/// The factor convert_group takes for group g of a row: q8_0's block scale, else the
/// row's scale (times 256 for e4m3).
template <class S>
[[gnu::always_inline]] inline float group_scale(const S* row, index_t g, float scale) noexcept {
  if constexpr (std::is_same_v<S, block_q8_0>)
    return block_scale(row[g].d);
  else if constexpr (std::is_same_v<S, e4m3> || std::is_same_v<S, e5m2>)
    return fp8_factor<S>(scale);
  else
    return scale;
}

/// acc[c * ld_acc + (0, 32 * Groups)) += sum over keys j of p[c * ld_p + j] * value_j over
/// the groups of 32 values [g0, g0 + Groups) of the rows, for c < Columns (Channels: int8
/// values times their column's scale in `channels`, as dequantize_row multiplies them).
/// (The multiply-adds are the backend's, vec::fma, as gemm_wide's: so the staged path is
/// matched at every -O and by every compiler.)
template <class Backend, int Columns, int Groups, bool Channels, class S>
[[gnu::noinline]] void quantized_values_kernel(const S* const* rows, const float* scales,
                                               const float* channels, index_t keys, index_t g0,
                                               const float* p, index_t ld_p, float* acc,
                                               index_t ld_acc) noexcept {
  using V = vec<float, Backend>;
  static_assert(V::width == 16);
  constexpr int vectors = 2 * Groups;
  typename V::type sum[Columns][vectors];
#pragma GCC unroll 4
  for (int c = 0; c < Columns; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < vectors; ++v) sum[c][v] = V::load(acc + c * ld_acc + 16 * v);
  for (index_t j = 0; j < keys; ++j) {
    typename V::type x[vectors];
#pragma GCC unroll 2
    for (int g = 0; g < Groups; ++g) {
      __m512 pair[2];
      convert_group(rows[j], g0 + g, group_scale(rows[j], g0 + g, scales[j]), pair);
      if constexpr (Channels)
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) pair[h] = _mm512_mul_ps(pair[h], _mm512_loadu_ps(channels + 32 * (g0 + g) + 16 * h));
      x[2 * g] = typename V::type(pair[0]);
      x[2 * g + 1] = typename V::type(pair[1]);
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
/// rows `rows`, Dv % 32 == 0; `scales` the scaled types' per-row scales, unused for q8_0;
/// `channels` an int8 cache's per-column scales, or null) for c < columns: four columns by
/// 64 values at a time.
template <class Backend, class S>
void quantized_values(const S* const* rows, const float* scales, index_t keys, index_t Dv,
                      const float* p, index_t ld_p, index_t columns, float* acc, index_t ld_acc,
                      [[maybe_unused]] const float* channels = nullptr) noexcept {
  auto run = [&]<bool Channels>() {
    const index_t groups = Dv / 32;
    for (index_t c0 = 0; c0 < columns; c0 += 4) {
      const index_t n = std::min<index_t>(4, columns - c0);
      for (index_t g0 = 0; g0 < groups; g0 += 2) {
        const bool pair = g0 + 2 <= groups;
        const float* pc = p + c0 * ld_p;
        float* out = acc + c0 * ld_acc + g0 * 32;
        [&]<int... C>(std::integer_sequence<int, C...>) {
          ((n == C + 1 ? (pair ? quantized_values_kernel<Backend, C + 1, 2, Channels>(rows, scales, channels, keys, g0,
                                                                                     pc, ld_p, out, ld_acc)
                               : quantized_values_kernel<Backend, C + 1, 1, Channels>(rows, scales, channels, keys, g0,
                                                                                     pc, ld_p, out, ld_acc))
                       : void()),
           ...);
        }(std::make_integer_sequence<int, 4>{});
      }
    }
  };
  if constexpr (std::is_same_v<S, std::int8_t>)
    if (channels) return run.template operator()<true>();
  run.template operator()<false>();
}

#endif

}  // namespace fovea::detail
