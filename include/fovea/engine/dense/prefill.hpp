// The prefill tile: up to block_q query columns held transposed (queries along the SIMD
// lanes) against key tiles of block_k keys. Q K^T is computed as K * Q^T and P V as
// V^T * P^T by the one micro-kernel, reading K and V in place; the online-softmax max,
// sum and rescale are plain vertical vector operations.
#pragma once

#include <algorithm>
#include <limits>
#include <type_traits>

#include "../../core/scratch.hpp"
#include "../../core/tensor_view.hpp"
#include "../../simd/bf16_pairs.hpp"
#include "../../simd/prefetch.hpp"
#include "../../simd/row_math.hpp"
#include "../../simd/transpose.hpp"
#include "../tile/gemm_tile.hpp"
#include "key_band.hpp"
#include "../kv/kv_source.hpp"
#include "logits.hpp"
#include "online_softmax.hpp"
#include "query_columns.hpp"
#include "../kv/stage.hpp"
#include "../tile/tile_traits.hpp"

namespace fovea::detail {

/// acc += P V over one key tile for a tile whose masked (-inf) logits meet non-finite
/// values: each masked (column, key) pair is skipped, so NaN/Inf in a masked key never
/// reaches a row. Logit and p (key j, column c) are at [j * tile_j + c * tile_c]; acc(d, c)
/// is acc[d * acc_d + c * acc_c].
template <class T, class S>
void accumulate_skipping_masked(const S* v, index_t v_stride, index_t keys, index_t dv,
                                const T* logits, const T* p, index_t tile_j, index_t tile_c,
                                index_t columns, T* acc, index_t acc_d, index_t acc_c) noexcept {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  for (index_t c = 0; c < columns; ++c)
    for (index_t d = 0; d < dv; ++d) {
      T sum = acc[d * acc_d + c * acc_c];
      for (index_t j = 0; j < keys; ++j) {
        const index_t at = j * tile_j + c * tile_c;
        if (logits[at] != neg_inf) sum += T(v[j * v_stride + d]) * p[at];
      }
      acc[d * acc_d + c * acc_c] = sum;
    }
}

/// Per-thread buffers of a prefill tile.
template <class T, class Backend>
struct prefill_buffers {
  using traits = tile_traits<T, Backend>;
  static constexpr index_t BQ = traits::block_q, BK = traits::block_k;

  /// Whether the tile can compute in bf16 pairs (then it has the buffers for them).
  static constexpr bool pairs = bf16_pairs_apply<T, Backend>();
  static_assert(!pairs || sizeof(bf16_pair) == sizeof(T));

  static index_t size(index_t D, index_t Dv) noexcept {
    const index_t pair_buffers = pairs ? round_to_line<T>((D + 1) / 2 * BQ) +
                                             round_to_line<T>(BK / 2 * BQ) +
                                             round_to_line<T>(BK / 2 * Dv)
                                       : 0;
    return round_to_line<T>(D * BQ) + 2 * BK * BQ + round_to_line<T>(Dv * BQ) + 3 * BQ +
           round_to_line<T>(BK * D) + round_to_line<T>(BK * Dv) + pair_buffers;
  }
  T *q_t, *s, *p, *acc, *m, *l, *alpha, *stage_k, *stage_v;
  /// The bf16 pair tile's operands (when `pairs`): queries transposed [D/2][BQ], the
  /// probabilities [BK/2][BQ] and the values [BK/2][Dv], each pair two consecutive rows.
  bf16_pair *q_pairs = nullptr, *p_pairs = nullptr, *v_pairs = nullptr;
  prefill_buffers(T* work, index_t D, index_t Dv) noexcept {
    q_t = work;                                    // [D][BQ]  queries transposed
    s = q_t + round_to_line<T>(D * BQ);            // [BK][BQ] logits
    p = s + BK * BQ;                               // [BK][BQ] probabilities
    acc = p + BK * BQ;                             // [Dv][BQ] unnormalised output, transposed
    m = acc + round_to_line<T>(Dv * BQ);           // [BQ] running max
    l = m + BQ;                                    // [BQ] running sum
    alpha = l + BQ;                                // [BQ] rescale factors
    stage_k = alpha + BQ;                          // [BK][D]  keys in T, when staged
    stage_v = stage_k + round_to_line<T>(BK * D);  // [BK][Dv]
    if constexpr (pairs) {
      q_pairs = reinterpret_cast<bf16_pair*>(stage_v + round_to_line<T>(BK * Dv));
      p_pairs = q_pairs + round_to_line<T>((D + 1) / 2 * BQ);
      v_pairs = p_pairs + round_to_line<T>(BK / 2 * BQ);
    }
  }
};

/// Loads the columns' query rows (q_row(c), length D) transposed and clears the state.
template <class Backend, class T, class QueryRow>
void start_tile(const query_columns<T>& cols, QueryRow&& q_row, index_t D, index_t Dv,
                prefill_buffers<T, Backend>& buf) noexcept {
  constexpr index_t BQ = prefill_buffers<T, Backend>::BQ;
  constexpr int W = vec<T, Backend>::width;
  index_t c0 = 0;  // whole blocks of W columns of the storage type T: in registers
  if constexpr (std::is_same_v<std::remove_cvref_t<decltype(*q_row(0))>, T>) {
    const T* rows[W];
    for (; c0 + W <= cols.count; c0 += W) {
      for (int c = 0; c < W; ++c) rows[c] = q_row(c0 + c);
      index_t d = 0;
      for (; d + W <= D; d += W) {
        transpose_block<T, Backend>(rows, buf.q_t + d * BQ + c0, BQ);
        for (int c = 0; c < W; ++c) rows[c] += W;
      }
      for (; d < D; ++d)
        for (int c = 0; c < W; ++c) buf.q_t[d * BQ + c0 + c] = *rows[c]++;
    }
  }
  for (index_t c = c0; c < BQ; ++c) {
    const auto* row = c < cols.count ? q_row(c) : nullptr;
    for (index_t d = 0; d < D; ++d) buf.q_t[d * BQ + c] = row ? T(row[d]) : T(0);
  }
  std::fill(buf.acc, buf.acc + Dv * BQ, T(0));
  std::fill(buf.m, buf.m + BQ, -std::numeric_limits<T>::infinity());
  std::fill(buf.l, buf.l + BQ, T(0));
}

/// Micro-kernel calls of attend_keys over `keys` keys (the ticks it gives a paced prefetch).
template <class T, class Backend>
constexpr index_t attend_ticks(index_t keys, index_t Dv) noexcept {
  constexpr index_t RB = tile_traits<T, Backend>::row_block;
  return std::max<index_t>(1, keys / RB + Dv / RB);
}

/// The online softmax over a tile's logits (buf.s, `keys` rows): the logit modifiers,
/// then the probabilities into buf.p and the accumulator rescaled (or, in a prob_mod
/// tile's second walk, the final probabilities through the prob_mod). Returns whether
/// any logit was masked.
template <class Backend, class T, class ScoreMod, class MaskMod, class KeyOf>
bool softmax_step(const query_columns<T>& cols, index_t keys, KeyOf&& key_of, tile_cuts cuts,
                  const key_band& band, const custom_variant<ScoreMod, MaskMod>& custom,
                  index_t Dv, prefill_buffers<T, Backend>& buf) noexcept {
  using traits = tile_traits<T, Backend>;
  constexpr index_t BQ = traits::block_q;
  constexpr int QV = traits::query_vectors;
  const bool masked = apply_logits<Backend>(cols, custom, band, cuts, buf.s, BQ, key_of, keys);
  if constexpr (is_prob_pass<ScoreMod>) {
    // The rows' max m and 1 / sum (in alpha) are final: p = exp(s - m) / sum, then the
    // user's prob_mod on every visible one.
    normalised_probabilities<T, Backend, QV>(buf.s, buf.p, BQ, keys, buf.m, buf.alpha);
    for (index_t r = 0; r < keys; ++r)
      for (index_t c = 0; c < cols.count; ++c)
        if (buf.s[r * BQ + c] != -std::numeric_limits<T>::infinity())
          buf.p[r * BQ + c] = T(custom.score_mod.prob_mod(buf.p[r * BQ + c], cols.batch,
                                                          cols.head[c], cols.pos[c], key_of(r)));
  } else if (online_softmax_update<T, Backend, QV>(buf.s, buf.p, BQ, keys, buf.m, buf.l, buf.alpha)) {
    rescale_rows<T, Backend, QV>(buf.acc, BQ, Dv, buf.alpha);
  }
  return masked;
}

/// One step of the online softmax over `keys` keys: rows k (D long) and v (Dv long) in the
/// compute type, key key_of(r) in row r, needing the checks `cuts`; pace->tick() between
/// the products' micro-kernel calls.
template <class Backend, class T, class ScoreMod, class MaskMod, class KeyOf>
void attend_keys(const query_columns<T>& cols, row_block<T> k, row_block<T> v, index_t keys,
                 KeyOf&& key_of, tile_cuts cuts, const key_band& band,
                 const custom_variant<ScoreMod, MaskMod>& custom, index_t D, index_t Dv,
                 prefill_buffers<T, Backend>& buf, paced_prefetch* pace = nullptr) noexcept {
  using traits = tile_traits<T, Backend>;
  constexpr index_t BQ = traits::block_q;
  constexpr int QV = traits::query_vectors, RB = traits::row_block;
  gemm_rows<T, Backend, RB, QV, false>(keys, k.data, k.stride, 1, buf.q_t, BQ, buf.s, BQ, D, pace);
  const bool masked = softmax_step(cols, keys, key_of, cuts, band, custom, Dv, buf);
  if (masked && !all_finite<T, Backend>(v.data, v.stride, keys, Dv))
    accumulate_skipping_masked(v.data, v.stride, keys, Dv, buf.s, buf.p, BQ, 1, BQ, buf.acc, BQ, 1);
  else
    gemm_rows<T, Backend, RB, QV, true>(Dv, v.data, 1, v.stride, buf.p, BQ, buf.acc, BQ, keys,
                                        pace);
}

#if FOVEA_HAS_BF16_DOT
/// attend_keys in bf16 pairs (AVX512-BF16), for bf16 keys and values under queries already
/// in buf.q_pairs: S = K Q^T over the D / 2 pairs of each key row, read in place (`k`,
/// rows `k_stride` elements apart, D even); the probabilities rounded to bf16 and P V over
/// pairs of consecutive keys, the value rows `v` interleaved into buf.v_pairs (a masked
/// key's non-finite value is skipped as in attend_keys, in fp32).
template <class Backend, class T, class ScoreMod, class MaskMod, class KeyOf>
void attend_keys_bf16(const query_columns<T>& cols, const bfloat16* k, index_t k_stride,
                      const bfloat16* v, index_t v_stride, index_t keys, KeyOf&& key_of,
                      tile_cuts cuts, const key_band& band,
                      const custom_variant<ScoreMod, MaskMod>& custom, index_t D, index_t Dv,
                      prefill_buffers<T, Backend>& buf, paced_prefetch* pace = nullptr) noexcept {
  using traits = tile_traits<T, Backend>;
  constexpr index_t BQ = traits::block_q;
  constexpr int QV = traits::query_vectors, RB = traits::row_block;
  struct key_rows {  // (any stride: a row may start at an odd element)
    const bfloat16* k;
    index_t stride;
    const bf16_pair* operator()(index_t r) const noexcept {
      return reinterpret_cast<const bf16_pair*>(k + r * stride);
    }
  };
  gemm_rows<T, Backend, RB, QV, false>(keys, key_rows{k, k_stride}, 1, buf.q_pairs, BQ, buf.s, BQ,
                                       D / 2, pace);
  const bool masked = softmax_step(cols, keys, key_of, cuts, band, custom, Dv, buf);
  if (masked && !all_finite<T, Backend>(v, v_stride, keys, Dv)) {
    accumulate_skipping_masked(v, v_stride, keys, Dv, buf.s, buf.p, BQ, 1, BQ, buf.acc, BQ, 1);
    return;
  }
  const index_t pairs = (keys + 1) / 2;
  for (index_t i = 0; i < pairs; ++i) {
    const bool whole = 2 * i + 1 < keys;
    interleave_bf16_pairs(buf.p + 2 * i * BQ, whole ? buf.p + (2 * i + 1) * BQ : nullptr, BQ,
                          buf.p_pairs + i * BQ);
    interleave_bf16_pairs(v + 2 * i * v_stride, whole ? v + (2 * i + 1) * v_stride : nullptr, Dv,
                          buf.v_pairs + i * Dv);
  }
  gemm_rows<T, Backend, RB, QV, true>(Dv, buf.v_pairs, 1, Dv, buf.p_pairs, BQ, buf.acc, BQ, pairs,
                                      pace);
}
#endif

/// Hands each column's finished output row (`const T*`, Dv values: the accumulator
/// divided by the row's sum and multiplied by the column's weight, exactly 0 for a row
/// that saw no key) and lse (0 unless
/// `with_lse`) to `emit(c, row, lse)`. The accumulator is transposed back W columns at a
/// time into the (now free) logit buffers and scaled there with vector lanes.
template <class Backend, class T, class Emit>
void finish_tile(const query_columns<T>& cols, index_t Dv, prefill_buffers<T, Backend>& buf,
                 Emit&& emit, bool with_lse = true, bool normalised = false) noexcept {
  using V = vec<T, Backend>;
  constexpr index_t BQ = prefill_buffers<T, Backend>::BQ, BK = prefill_buffers<T, Backend>::BK;
  constexpr int W = V::width;
  auto finish = [&](index_t c, T* row) {
    // (normalised: a prob_mod tile, whose p were final and whose lse is in l)
    const row_result<T> r = normalised ? row_result<T>{T(1), with_lse ? buf.l[c] : T(0)}
                                       : finish_row(buf.m[c], buf.l[c], cols.sink[c], with_lse);
    if (r.factor == T(0)) {  // no key seen: exactly 0, whatever the accumulator holds
      std::fill(row, row + Dv, T(0));
    } else {
      const T f = r.factor * cols.weight[c];
      const auto factor = V::broadcast(f);
      index_t d = 0;
      for (; d + W <= Dv; d += W) V::store(row + d, V::mul(V::load(row + d), factor));
      for (; d < Dv; ++d) row[d] *= f;
    }
    emit(c, static_cast<const T*>(row), r.lse);
  };
  if (W * Dv <= 2 * BK * BQ) {  // buf.s and buf.p, contiguous
    T* rows_out = buf.s;        // [W][Dv]
    const T* rows[W];
    for (index_t c0 = 0; c0 < cols.count; c0 += W) {
      const index_t n = std::min<index_t>(W, cols.count - c0);
      index_t d = 0;
      for (; d + W <= Dv; d += W) {
        for (int i = 0; i < W; ++i) rows[i] = buf.acc + (d + i) * BQ + c0;
        transpose_block<T, Backend>(rows, rows_out + d, Dv);
      }
      for (; d < Dv; ++d)
        for (index_t c = 0; c < n; ++c) rows_out[c * Dv + d] = buf.acc[d * BQ + c0 + c];
      for (index_t c = 0; c < n; ++c) finish(c0 + c, rows_out + c * Dv);
    }
    return;
  }
  T* row = buf.stage_v;  // [BK][Dv], free once the keys are attended
  for (index_t c = 0; c < cols.count; ++c) {
    for (index_t d = 0; d < Dv; ++d) row[d] = buf.acc[d * BQ + c];
    finish(c, row);
  }
}

/// How prefill_tile runs: whether the caller wants the lse; whether the keys and values
/// are read by this tile alone (few queries against many keys: agent attention's first
/// stage), so that they come from memory and the next key tile's rows are worth
/// prefetching (tiles that share their K/V find them in cache: the prefetches only cost);
/// the window of keys [from, to) it covers, when the keys are split between tasks; and
/// the caller's own requests (`ahead`, added but not paced), paced through the first key
/// tile's products and finished after it.
struct tile_options {
  bool with_lse = true;
  /// Products in bf16 pairs (bf16 keys and values, D even, a tile with pair buffers; see
  /// attend_keys_bf16): the queries and probabilities rounded to bf16.
  bool bf16_pairs = false;
  bool stream_kv = false;
  index_t from = 0, to = std::numeric_limits<index_t>::max();
  paced_prefetch* ahead = nullptr;
};

/// Loads the columns `cols` (query rows q_row(c), length D) and attends them over the keys
/// in [how.from, how.to) that the band lets them see in `kv`.
template <class Backend, class T, class K, class V, class ScoreMod, class MaskMod, class QueryRow>
void prefill_keys(const query_columns<T>& cols, QueryRow&& q_row, const kv_source<K, V>& kv,
                  const key_band& band, const custom_variant<ScoreMod, MaskMod>& custom, index_t D,
                  index_t Dv, prefill_buffers<T, Backend>& buf, const tile_options& how) noexcept {
  constexpr index_t BQ = prefill_buffers<T, Backend>::BQ, BK = prefill_buffers<T, Backend>::BK;
  start_tile(cols, q_row, D, Dv, buf);
#if FOVEA_HAS_BF16_DOT
  if constexpr (prefill_buffers<T, Backend>::pairs)
    if (how.bf16_pairs)  // rows 2i and 2i + 1 of the transposed queries, as pairs
      for (index_t i = 0; i < D / 2; ++i)
        interleave_bf16_pairs(buf.q_t + 2 * i * BQ, buf.q_t + (2 * i + 1) * BQ, BQ,
                              buf.q_pairs + i * BQ);
#endif
  const auto visible = band.keys_for(cols.first_pos, cols.last_pos + 1);
  const index_t first = std::max(visible.first, how.from), last = std::min(visible.second, how.to);
  if constexpr (is_prob_pass<ScoreMod>) {  // a first walk for the rows' max and sum (QK^T only)
    using traits = tile_traits<T, Backend>;
    constexpr int QV = traits::query_vectors, RB = traits::row_block;
    for (index_t j0 = first; j0 < last; j0 += BK) {
      const index_t keys = std::min(BK, last - j0);
      const auto k = rows_for_kernel<T>(kv, true, j0, keys, D, D, buf.stage_k);
      gemm_rows<T, Backend, RB, QV, false>(keys, k.data, k.stride, 1, buf.q_t, BQ, buf.s, BQ, D);
      const tile_cuts cuts{!band.covers(cols.first_pos, cols.last_pos + 1, j0, j0 + keys)};
      apply_logits<Backend>(cols, custom, band, cuts, buf.s, BQ, [j0](index_t r) { return j0 + r; },
                            keys);
      online_softmax_update<T, Backend, QV>(buf.s, buf.p, BQ, keys, buf.m, buf.l, buf.alpha);
    }
    normalisers(cols.count, cols.sink, buf.m, buf.l, buf.alpha);
  }
  paced_prefetch* ahead = how.ahead;
  for (index_t j0 = first; j0 < last;) {
    const index_t keys = std::min(BK, last - j0);  // pages are gathered: the same tiles
    paced_prefetch next_tile;
    paced_prefetch& pace = ahead ? *ahead : next_tile;
    if (how.stream_kv) {
      const index_t next = std::min(BK, last - j0 - keys);
      pace_rows(pace, kv, true, j0 + keys, next, D, prefetch_kind::l1);
      pace_rows(pace, kv, false, j0 + keys, next, Dv, prefetch_kind::l1);
    }
    pace.pace(attend_ticks<T, Backend>(keys, Dv));
    const tile_cuts cuts{!band.covers(cols.first_pos, cols.last_pos + 1, j0, j0 + keys)};
    auto key_of = [j0](index_t r) { return j0 + r; };
    paced_prefetch* ticks = pace.empty() ? nullptr : &pace;
    bool in_pairs = false;
#if FOVEA_HAS_BF16_DOT
    // bf16 rows read in place (or gathered, when they span pages) by the pair products
    if constexpr (prefill_buffers<T, Backend>::pairs && std::is_same_v<K, bfloat16> &&
                  std::is_same_v<V, bfloat16>)
      if ((in_pairs = how.bf16_pairs))
        with_rows(kv, true, j0, keys, D, D, buf.stage_k, [&](const auto* k, index_t k_stride) {
          with_rows(kv, false, j0, keys, Dv, Dv, buf.stage_v, [&](const auto* v, index_t v_stride) {
            if constexpr (std::is_same_v<std::remove_cvref_t<decltype(*k)>, bfloat16> &&
                          std::is_same_v<std::remove_cvref_t<decltype(*v)>, bfloat16>)
              attend_keys_bf16(cols, k, k_stride, v, v_stride, keys, key_of, cuts, band, custom,
                               D, Dv, buf, ticks);
          });
        });
#endif
    if (!in_pairs) {
      const auto k = rows_for_kernel<T>(kv, true, j0, keys, D, D, buf.stage_k);
      const auto v = rows_for_kernel<T>(kv, false, j0, keys, Dv, Dv, buf.stage_v);
      attend_keys(cols, k, v, keys, key_of, cuts, band, custom, D, Dv, buf, ticks);
    }
    pace.finish();
    ahead = nullptr;
    j0 += keys;
  }
  if (ahead) ahead->finish();  // no keys
}

/// prefill_keys, then each column's output row and lse (0 unless `how.with_lse`) through
/// `emit`.
template <class Backend, class T, class K, class V, class ScoreMod, class MaskMod, class QueryRow,
          class Emit>
void prefill_tile(const query_columns<T>& cols, QueryRow&& q_row, const kv_source<K, V>& kv,
                  const key_band& band, const custom_variant<ScoreMod, MaskMod>& custom, index_t D,
                  index_t Dv, prefill_buffers<T, Backend>& buf, Emit&& emit,
                  const tile_options& how = {}) noexcept {
  prefill_keys(cols, q_row, kv, band, custom, D, Dv, buf, how);
  finish_tile(cols, Dv, buf, emit, how.with_lse, is_prob_pass<ScoreMod>);
}

/// Each column's online-softmax state (m, l, then its Dv unnormalised outputs) at
/// partials + c * stride, for a merge with the states of the tile's other key windows.
template <class Backend, class T>
void store_partials(const query_columns<T>& cols, index_t Dv,
                    const prefill_buffers<T, Backend>& buf, T* partials, index_t stride) noexcept {
  constexpr index_t BQ = prefill_buffers<T, Backend>::BQ;
  for (index_t c = 0; c < cols.count; ++c) {
    T* out = partials + c * stride;
    out[0] = buf.m[c];
    out[1] = buf.l[c];
    for (index_t d = 0; d < Dv; ++d) out[2 + d] = buf.acc[d * BQ + c];
  }
}

}  // namespace fovea::detail
