// Decode's P V over quantized value rows without a staging buffer: q8_0 blocks, int8 rows
// with a scale per row (AVX2 and AVX-512), fp8 rows with a scale per head (AVX-512). Each
// group of values (32 on AVX-512, 16 on AVX2: two registers) is converted in registers
// (value = float(q) * scale, one rounding, as dequantize_row computes it) and used at once
// for up to four columns, so the same fused multiply-adds run in the same key order as
// the staged path (dequantize_row into a buffer, then gemm_wide): the same bits, without
// the store and reload of every value. Other targets keep the staged path.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../../core/cache_types.hpp"
#include "../../core/tensor_view.hpp"
#include "../../simd/dequantize.hpp"
#include "../../simd/vec.hpp"

#if defined(__AVX2__) && defined(__F16C__) && !defined(FOVEA_FORCE_SCALAR)
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

/// Values per group: two registers.
template <class Backend>
constexpr index_t value_group() noexcept {
  return 2 * vec<float, Backend>::width;
}

/// Whether decode converts S rows in registers on this backend, keys in dot_scores and
/// values in quantized_values: AVX-512 every quantized type, AVX2 int8 and q8_0. AVX2 fp8
/// stays staged: its conversion works on 16 codes, half of them wasted at 8 per register
/// (keys in registers: e4m3 decode 14.8 -> 16.0 ms). AVX2 decode (Sk = 32768, D = 128, 1
/// thread, medians of 9 interleaved), keys in registers: q8_0 12.1 -> 11.0 ms, int8 11.7
/// -> 10.4; values too: q8_0 10.9 -> 10.2, int8 10.8 -> 9.51, q8_0 products 16.8 -> 16.0.
template <class T, class Backend, class S>
constexpr bool quantized_in_registers() noexcept {
  constexpr std::size_t bytes = sizeof(typename vec<T, Backend>::type);
  constexpr bool fp8 = std::is_same_v<S, e4m3> || std::is_same_v<S, e5m2>;
  return std::is_same_v<T, float> && is_quantized_v<S> && (bytes == 64 || (bytes == 32 && !fp8));
}

/// Group `g` (value_group values) of a value row in fp32, as two registers R (__m512 or
/// __m256): q8_0 with its block's scale, the scaled types with `scale` (the row's or
/// head's; e4m3 through fp16 needs it times 256, see dequantize_row).
template <class S, class R>
[[gnu::always_inline]] inline void convert_group(const S* row, index_t g, float scale, R (&x)[2]) noexcept {
  constexpr index_t half_group = sizeof(R) / sizeof(float), group = 2 * half_group;
  if constexpr (std::is_same_v<S, block_q8_0> || std::is_same_v<S, std::int8_t>) {
    const std::int8_t* q;
    if constexpr (std::is_same_v<S, block_q8_0>)
      q = row[g * group / block_q8_0::size].qs + g * group % block_q8_0::size;
    else
      q = row + group * g;
    R s;
    if constexpr (sizeof(R) == 32)
      s = _mm256_set1_ps(scale);
    else
      s = _mm512_set1_ps(scale);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) x[h] = scaled_codes(q + half_group * h, s);
  } else {
#if defined(__AVX512F__)
    static_assert(sizeof(R) == 64, "fp8 values in registers on AVX-512 only");
    const __m512 s = _mm512_set1_ps(scale);
#if defined(__AVX512BW__)
    const __m512i halves = fp8_as_half_32<S>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * g)));
    x[0] = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(halves)), s);
    x[1] = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(halves, 1)), s);
#else
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) x[h] = scaled_fp8x16(row + 32 * g + 16 * h, s);
#endif
#endif
  }
}

/// The factor convert_group takes for group g (`group` values) of a row: q8_0's block
/// scale, else the row's scale (times 256 for e4m3).
template <class S>
[[gnu::always_inline]] inline float group_scale(const S* row, index_t g, index_t group, float scale) noexcept {
  if constexpr (std::is_same_v<S, block_q8_0>)
    return block_scale(row[g * group / block_q8_0::size].d);
  else if constexpr (std::is_same_v<S, e4m3> || std::is_same_v<S, e5m2>)
    return fp8_factor<S>(scale);
  else
    return scale;
}

/// acc[c * ld_acc + (0, group * Groups)) += sum over keys j of p[c * ld_p + j] * value_j
/// over the groups (value_group values each) [g0, g0 + Groups) of the rows, for c <
/// Columns (Channels: int8 values times their column's scale in `channels`, as
/// dequantize_row multiplies them). (The multiply-adds are the backend's, vec::fma, as
/// gemm_wide's: so the staged path is matched at every -O and by every compiler.)
template <class Backend, int Columns, int Groups, bool Channels, class S>
[[gnu::noinline]] void quantized_values_kernel(const S* const* rows, const float* scales,
                                               const float* channels, index_t keys, index_t g0,
                                               const float* p, index_t ld_p, float* acc,
                                               index_t ld_acc) noexcept {
  using V = vec<float, Backend>;
  using R = typename V::type::register_type;
  constexpr int W = V::width, vectors = 2 * Groups;
  constexpr index_t group = value_group<Backend>();
  typename V::type sum[Columns][vectors];
#pragma GCC unroll 4
  for (int c = 0; c < Columns; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < vectors; ++v) sum[c][v] = V::load(acc + c * ld_acc + W * v);
  for (index_t j = 0; j < keys; ++j) {
    typename V::type x[vectors];
#pragma GCC unroll 2
    for (int g = 0; g < Groups; ++g) {
      R pair[2];
      convert_group(rows[j], g0 + g, group_scale(rows[j], g0 + g, group, scales[j]), pair);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        x[2 * g + h] = typename V::type(pair[h]);
        if constexpr (Channels) x[2 * g + h] = V::mul(x[2 * g + h], V::load(channels + group * (g0 + g) + W * h));
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
    for (int v = 0; v < vectors; ++v) V::store(acc + c * ld_acc + W * v, sum[c][v]);
}

/// acc[c * ld_acc + (0, Dv)) += sum over keys j < keys of p[c * ld_p + j] * value_j (the
/// rows `rows`, Dv % 32 == 0; `scales` the scaled types' per-row scales, unused for q8_0;
/// `channels` an int8 cache's per-column scales, or null) for c < columns: four columns by
/// two groups (AVX-512: 64 values; AVX2 one group, 16 values: 8 accumulators of its 16
/// registers) at a time.
template <class Backend, class S>
void quantized_values(const S* const* rows, const float* scales, index_t keys, index_t Dv,
                      const float* p, index_t ld_p, index_t columns, float* acc, index_t ld_acc,
                      [[maybe_unused]] const float* channels = nullptr) noexcept {
  constexpr index_t group = value_group<Backend>();
  constexpr int most_groups = vec<float, Backend>::registers >= 32 ? 2 : 1;
  auto run = [&]<bool Channels>() {
    const index_t groups = Dv / group;
    for (index_t c0 = 0; c0 < columns; c0 += 4) {
      const index_t n = std::min<index_t>(4, columns - c0);
      for (index_t g0 = 0; g0 < groups; g0 += most_groups) {
        const bool pair = most_groups == 2 && g0 + 2 <= groups;
        const float* pc = p + c0 * ld_p;
        float* out = acc + c0 * ld_acc + g0 * group;
        [&]<int... C>(std::integer_sequence<int, C...>) {
          ((n == C + 1 ? (pair ? quantized_values_kernel<Backend, C + 1, most_groups, Channels>(
                                     rows, scales, channels, keys, g0, pc, ld_p, out, ld_acc)
                               : quantized_values_kernel<Backend, C + 1, 1, Channels>(
                                     rows, scales, channels, keys, g0, pc, ld_p, out, ld_acc))
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
