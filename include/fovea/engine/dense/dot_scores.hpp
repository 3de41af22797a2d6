// Decode's scoring loop: logits of a block of key rows against a few query rows, as dot
// products along the head dim (keys land in the SIMD lanes, reduced once per block), and
// the ways a key row is multiplied by a query row (Dot): converted as loaded from any
// storage type, quantized rows (q8_0, int8, fp8) converted in registers, bf16 rows against
// bf16 query pairs (AVX512-BF16).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../../core/cache_types.hpp"
#include "../../core/tensor_view.hpp"
#include "../../simd/bf16_pairs.hpp"
#include "../../simd/convert.hpp"
#include "../../simd/dequantize.hpp"
#include "../../simd/vec.hpp"
#include "quantized_values.hpp"  // FOVEA_HAS_QUANTIZED_VALUES, quantized_in_registers

namespace fovea::detail {

/// Columns of one score block: the query rows dot_scores reads come in groups of this many
/// (rows past the last column must exist, zeroed).
template <class T, class Backend>
constexpr index_t score_block_columns() noexcept {
  return vec<T, Backend>::width < 4 ? vec<T, Backend>::width : 4;
}

/// How dot_scores multiplies a key row by a query row, `step` elements at a time: key rows
/// in any storage type converted as they are loaded, query rows in the compute type
/// (`q`, rows `dq` apart and zero-padded to whole vectors). A dot may also define
/// row(k, j, k_stride), the handle its load_key takes for key row j (without one, the
/// row's pointer: int8_key_dot's carries the row's scale).
template <class T, class Backend>
struct converting_dot {
  using V = vec<T, Backend>;
  using key_reg = typename V::type;
  using query_reg = typename V::type;
  static constexpr int step = V::width;
  const T* q;
  index_t dq;

  template <class S>
  static key_reg load_key(const S* row, index_t d) noexcept {
    return load_as<T, Backend>(row + d);
  }
  const T* query_row(index_t c) const noexcept { return q + c * dq; }
  static query_reg load_query(const T* row, index_t d) noexcept { return V::load(row + d); }
  static typename V::type fma(key_reg k, query_reg x, typename V::type acc) noexcept {
    return V::fma(k, x, acc);
  }
};

#if FOVEA_HAS_QUANTIZED_VALUES
/// Quantized key rows converted in registers as dot_scores loads them, a register (8 or 16
/// values) at a time: fp8 (e4m3, e5m2; one scale per head) through fp16 times the head's
/// factor, q8_0 times its block's scale. The values dequantize_row writes, bit for bit,
/// so the logits are those of the staged rows without their store and reload (rows must
/// be readable in whole steps).
template <class Backend, class KS>
struct quantized_key_dot : converting_dot<float, Backend> {
  using key_reg = typename converting_dot<float, Backend>::key_reg;
  using native = typename key_reg::register_type;
  key_reg factor;  ///< fp8: the head's scale as fp8_factor gives it

  quantized_key_dot(const float* q, index_t dq, float head_scale) noexcept
      : converting_dot<float, Backend>{q, dq}, factor(fp8_factor<KS>(head_scale)) {}
  key_reg load_key(const KS* row, index_t d) const noexcept {
    if constexpr (std::is_same_v<KS, block_q8_0>) {
      const block_q8_0& block = row[d / block_q8_0::size];
      return key_reg(scaled_codes(block.qs + d % block_q8_0::size, native(key_reg(block_scale(block.d)))));
    } else {
      return key_reg(scaled_codes(row + d, native(factor)));
    }
  }
};

/// int8 key rows with a scale per row (and, with Channels, a scale per column) converted in
/// registers as dot_scores loads them, a register at a time: float(q) * the row's scale
/// (* the column's), the values dequantize_row writes, bit for bit (rows of whole vectors;
/// row j's scale at scales[j * scale_stride], relative to the rows dot_scores is given).
template <class Backend, bool Channels>
struct int8_key_dot : converting_dot<float, Backend> {
  using V = vec<float, Backend>;
  using key_reg = typename converting_dot<float, Backend>::key_reg;
  using native = typename key_reg::register_type;
  struct scaled_row {
    const std::int8_t* codes;
    float scale;
  };
  const float* scales;
  index_t scale_stride;
  const float* channels;  ///< Channels: the head's column scales

  int8_key_dot(const float* q, index_t dq, const float* scales, index_t scale_stride,
               const float* channels) noexcept
      : converting_dot<float, Backend>{q, dq}, scales(scales), scale_stride(scale_stride), channels(channels) {}
  scaled_row row(const std::int8_t* k, index_t j, index_t k_stride) const noexcept {
    return {k + j * k_stride, scales[j * scale_stride]};
  }
  key_reg load_key(const scaled_row& row, index_t d) const noexcept {
    const key_reg value(scaled_codes(row.codes + d, native(key_reg(row.scale))));
    if constexpr (Channels)
      return V::mul(value, V::load(channels + d));
    else
      return value;
  }
};

#endif

#if FOVEA_HAS_BF16_DOT
/// bf16 key rows against bf16 query pairs with AVX512-BF16's vdpbf16ps: two products per
/// lane per instruction, exact, summed in fp32 (inputs below bf16's normal range count as
/// zero). Key rows must be readable in whole 32-element steps.
template <class Backend>
struct bf16_pair_dot {
  using V = vec<float, Backend>;
  using key_reg = __m512i;
  using query_reg = __m512i;
  static constexpr int step = 32;
  const std::uint32_t* q;  ///< query rows as bf16 pairs, `pairs` apart
  index_t pairs;

  static key_reg load_key(const bfloat16* row, index_t d) noexcept {
    return _mm512_loadu_si512(row + d);
  }
  const std::uint32_t* query_row(index_t c) const noexcept { return q + c * pairs; }
  static query_reg load_query(const std::uint32_t* row, index_t d) noexcept {
    return _mm512_loadu_si512(row + d / 2);
  }
  static typename V::type fma(key_reg k, query_reg x, typename V::type acc) noexcept {
    return typename V::type(_mm512_dpbf16_ps(acc, __m512bh(k), __m512bh(x)));
  }
};

/// bf16 keys scored in fp32 on an AVX-512 backend.
template <class T, class Backend, class K>
constexpr bool bf16_dot_applies() noexcept {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<K, bfloat16>)
    return sizeof(typename vec<T, Backend>::type) == 64;
  return false;
}
#endif

/// Keeps x in a register (see vec::pin). The asm works on a local copy: given an element
/// of an array, GCC would otherwise keep the array on the stack and store every pinned
/// value to it (8 dead stores per 16 FMAs in dot_scores, measured 12% of in-cache decode).
template <class R>
inline void pin_register(R& x) noexcept {
  if constexpr (requires { x.data; }) {
    auto r = x.data;
    FOVEA_PIN_VECTOR(r);
    x = R(r);
  } else if constexpr (sizeof(R) >= 16) {
    R r = x;
    FOVEA_PIN_VECTOR(r);
    x = r;
  }
}

/// s[c][j] = s[c * ld + j] = q_c . k_j for c < columns, j < keys (keys along the lanes,
/// as the softmax wants them), over `depth` elements (a multiple of Dot::step; k rows
/// readable that far). Blocks of (width / CQ) keys x CQ columns leave their sums in one
/// register after a single lane reduction, and every key row is loaded once per CQ
/// columns (query rows up to the next multiple of CQ must exist). prefetch.start(j, n,
/// parts) is called before each block of keys [j, j + n) is read in `parts` parts
/// (Parts Dot::steps each), and prefetch.step() with each part read for the first columns.
/// Flattened: GCC kept xsimd's 16-row lane reduction (haddp) out of line at -O2 and -O3,
/// its 16 sums stored to memory and reloaded for every block of keys (~6% of decode;
/// Sk = 32768, D = 128, 1 thread, minima of 5 alternated: bf16 6.30 -> 5.94 ms, q8_0
/// 7.06 -> 6.54, e4m3 7.95 -> 7.50, fp32 level; at -O2 bf16 medians 8.14 -> 7.22).
template <class T, class Backend, index_t Parts, class Dot, class S, class Prefetch>
[[gnu::flatten]] void dot_scores(const Dot& dot, index_t depth, index_t columns, const S* k,
                                 index_t k_stride, index_t keys, T* s, index_t ld,
                                 Prefetch&& prefetch) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width, CQ = int(score_block_columns<T, Backend>()), KR = W / CQ;
  alignas(64) T lanes[W];
  for (index_t jb = 0; jb < keys; jb += KR) {
    const index_t n = std::min<index_t>(KR, keys - jb);
    prefetch.start(jb, n, (depth + Parts * Dot::step - 1) / (Parts * Dot::step));
    // Row r as the dot loads it: a pointer, or what Dot::row makes of it (int8's scale)
    auto row_of = [&](index_t j) FOVEA_ALWAYS_INLINE {
      if constexpr (requires { dot.row(k, j, k_stride); })
        return dot.row(k, j, k_stride);
      else
        return k + j * k_stride;
    };
    decltype(row_of(0)) rows[KR];
#pragma GCC unroll 16
    for (int r = 0; r < KR; ++r) rows[r] = row_of(std::min<index_t>(jb + r, keys - 1));
    // One column block: the first also asks for the rows ahead (two instantiations, so
    // the loop over d does not test it: -O2 does not unswitch loops).
    auto column_block = [&]<bool Prefetching>(index_t c0) FOVEA_ALWAYS_INLINE {
      typename V::type acc[W];  // acc[c * KR + r]: lanes come out column by column
#pragma GCC unroll 16
      for (int i = 0; i < W; ++i) acc[i] = V::broadcast(T(0));
      decltype(dot.query_row(0)) query[CQ];
#pragma GCC unroll 4
      for (int c = 0; c < CQ; ++c) query[c] = dot.query_row(c0 + c);
      auto part = [&](index_t d) FOVEA_ALWAYS_INLINE {
        // Every operand loaded once into a register: left to itself, GCC folds the key
        // loads into the FMAs, loading each key vector CQ times (twice as slow).
        typename Dot::query_reg qv[CQ];
        typename Dot::key_reg kr[KR];
#pragma GCC unroll 4
        for (int c = 0; c < CQ; ++c) {
          qv[c] = Dot::load_query(query[c], d);
          pin_register(qv[c]);
        }
#pragma GCC unroll 16
        for (int r = 0; r < KR; ++r) {
          kr[r] = dot.load_key(rows[r], d);
          pin_register(kr[r]);
        }
#pragma GCC unroll 16
        for (int r = 0; r < KR; ++r)
#pragma GCC unroll 4
          for (int c = 0; c < CQ; ++c) acc[c * KR + r] = Dot::fma(kr[r], qv[c], acc[c * KR + r]);
      };
      constexpr index_t span = Parts * Dot::step;
      index_t d = 0;
      for (; d + span <= depth; d += span) {
        if constexpr (Prefetching) prefetch.step();
#pragma GCC unroll 4
        for (index_t i = 0; i < Parts; ++i) part(d + i * Dot::step);
      }
      if (d < depth) {
        if constexpr (Prefetching) prefetch.step();
        for (; d < depth; d += Dot::step) part(d);
      }
      V::store(lanes, V::reduce_add_lanes(acc));
      const index_t m = std::min<index_t>(CQ, columns - c0);
      for (index_t c = 0; c < m; ++c) {
        T* out = s + (c0 + c) * ld + jb;
        if (n == KR) {
#pragma GCC unroll 16
          for (int r = 0; r < KR; ++r) out[r] = lanes[c * KR + r];
        } else {
          std::copy_n(lanes + c * KR, n, out);
        }
      }
    };
    if (columns > 0) column_block.template operator()<true>(0);
    for (index_t c0 = CQ; c0 < columns; c0 += CQ) column_block.template operator()<false>(c0);
  }
}

}  // namespace fovea::detail
