// Decode: few queries (Sq <= 16) against a long key/value sequence. The query heads that
// share a key/value head are stacked as columns of one tile, so K and V are read once for
// all of them; scores are dot products along the head dim (keys land in the SIMD lanes,
// then in the usual [key][column] tile, so the logit modifiers and online softmax are
// the prefill ones); P V runs with the output rows along the lanes. The keys are split
// into chunks of a size fixed by Sk alone; each chunk leaves a partial state (m, l, acc)
// and the chunks are merged in order, so any thread count gives the same bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "../core/scratch.hpp"
#include "../core/tensor_view.hpp"
#include "../simd/prefetch.hpp"
#include "gemm_tile.hpp"
#include "key_band.hpp"
#include "kv_source.hpp"
#include "logits.hpp"
#include "online_softmax.hpp"
#include "prefill.hpp"
#include "query_columns.hpp"
#include "stage.hpp"
#include "tile_traits.hpp"

namespace fovea::detail {

/// Queries per problem up to which the decode path is taken.
inline constexpr index_t decode_max_queries = 16;
/// Keys per decode tile: larger than prefill's, since a decode tile has few columns and
/// its per-tile work (rescale, calls, prefetch) is then spread over more keys.
inline constexpr index_t decode_block_k = 256;

/// s[j][c] = q_c . k_j for c < columns, j < keys; columns [columns, ld) are zeroed.
/// q rows are `dq` long (zero-padded to whole vectors); k rows readable for dq elements.
template <class T, class Backend>
void dot_scores(const T* q, index_t dq, index_t columns, const T* k, index_t k_stride, index_t keys,
                T* s, index_t ld) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width;
  alignas(64) T lanes[W];
  for (index_t jb = 0; jb < keys; jb += W) {
    const T* rows[W];
#pragma GCC unroll 16
    for (int r = 0; r < W; ++r) rows[r] = k + std::min<index_t>(jb + r, keys - 1) * k_stride;
    const index_t n = std::min<index_t>(W, keys - jb);
    for (index_t c = 0; c < columns; ++c) {
      const T* qc = q + c * dq;
      typename V::type acc[W];
#pragma GCC unroll 16
      for (int r = 0; r < W; ++r) acc[r] = V::broadcast(T(0));
      for (index_t d = 0; d < dq; d += W) {
        const auto qv = V::load(qc + d);
#pragma GCC unroll 16
        for (int r = 0; r < W; ++r) acc[r] = V::fma(V::load(rows[r] + d), qv, acc[r]);
      }
      V::store(lanes, V::reduce_add_lanes(acc));
      for (index_t r = 0; r < n; ++r) s[(jb + r) * ld + c] = lanes[r];
    }
    for (index_t r = 0; r < n; ++r)
      std::fill(s + (jb + r) * ld + columns, s + (jb + r) * ld + ld, T(0));
  }
}

/// Per-thread buffers of a decode tile: up to `capacity` columns.
template <class T, class Backend>
struct decode_buffers {
  static constexpr index_t capacity = query_columns<T>::capacity;
  static constexpr index_t BK = decode_block_k;
  static constexpr int W = vec<T, Backend>::width;

  static index_t padded(index_t n) noexcept { return (n + W - 1) / W * W; }
  static index_t size(index_t D, index_t Dv) noexcept {
    const index_t dq = padded(D), dvp = padded(Dv);
    return round_to_line<T>(capacity * dq) + 2 * BK * capacity + round_to_line<T>(capacity * dvp) +
           3 * capacity + round_to_line<T>(BK * dq) + round_to_line<T>(BK * dvp);
  }
  index_t dq, dvp;
  T *q, *s, *p, *acc, *m, *l, *alpha, *stage_k, *stage_v;
  decode_buffers(T* work, index_t D, index_t Dv) noexcept : dq(padded(D)), dvp(padded(Dv)) {
    q = work;                                    // [capacity][dq] query rows
    s = q + round_to_line<T>(capacity * dq);     // [BK][ld] logits
    p = s + BK * capacity;                       // [BK][ld] probabilities
    acc = p + BK * capacity;                     // [capacity][dvp] unnormalised output rows
    m = acc + round_to_line<T>(capacity * dvp);  // [capacity]
    l = m + capacity;
    alpha = l + capacity;
    stage_k = alpha + capacity;                     // [BK][dq]
    stage_v = stage_k + round_to_line<T>(BK * dq);  // [BK][dvp]
  }
};

/// A partial state as stored between the chunk pass and the merge: m, l, acc[Dv].
template <class T>
constexpr index_t partial_size(index_t Dv) noexcept {
  return Dv + 2;
}

/// Attends the columns `cols` (query rows already in buf.q) over keys [first, last) and
/// stores each column's partial state at partials + c * partial_size(Dv).
template <class Backend, int QV, class T, class S, class ScoreMod, class MaskMod>
void decode_chunk(const query_columns<T>& cols, const kv_source<S>& kv, const key_band& band,
                  const custom_variant<ScoreMod, MaskMod>& custom, index_t D, index_t Dv,
                  index_t first, index_t last, decode_buffers<T, Backend>& buf,
                  T* partials) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width;
  constexpr index_t ld = index_t(QV) * W, BK = decode_buffers<T, Backend>::BK;
  const index_t n = cols.count, dq = buf.dq, dvp = buf.dvp;
  std::fill(buf.acc, buf.acc + n * dvp, T(0));
  std::fill(buf.m, buf.m + ld, -std::numeric_limits<T>::infinity());
  std::fill(buf.l, buf.l + ld, T(0));

  for (index_t j0 = first; j0 < last;) {
    const index_t keys = kv.run(j0, std::min(BK, last - j0));
    const index_t ahead = std::min(last, j0 + keys + BK);  // two tiles ahead
    prefetch_rows(kv, ahead, std::min(BK, last - ahead), D, Dv);
    const auto k = rows_for_kernel<T>(kv, true, j0, keys, D, dq, buf.stage_k);
    const auto v = rows_for_kernel<T>(kv, false, j0, keys, Dv, dvp, buf.stage_v);
    dot_scores<T, Backend>(buf.q, dq, n, k.data, k.stride, keys, buf.s, ld);
    const tile_cuts cuts{!band.covers(cols.first_pos, cols.last_pos + 1, j0, j0 + keys)};
    const bool masked = apply_logits<Backend>(
        cols, custom, band, cuts, buf.s, ld, [j0](index_t r) { return j0 + r; }, keys);
    if (online_softmax_update<T, Backend, QV>(buf.s, buf.p, ld, keys, buf.m, buf.l, buf.alpha))
      for (index_t c = 0; c < n; ++c) {
        const auto a = V::broadcast(buf.alpha[c]);
        for (index_t d = 0; d < dvp; d += W)
          V::store(buf.acc + c * dvp + d, V::mul(V::load(buf.acc + c * dvp + d), a));
      }
    if (masked && !all_finite<T, Backend>(v.data, v.stride, keys, Dv))
      accumulate_skipping_masked(v.data, v.stride, keys, Dv, buf.s, buf.p, ld, n, buf.acc, 1, dvp);
    else
      gemm_wide<T, Backend, 4, 4, true>(n, dvp / W, buf.p, 1, ld, v.data, v.stride, buf.acc, dvp,
                                        keys);
    j0 += keys;
  }
  for (index_t c = 0; c < n; ++c) {
    T* out = partials + c * partial_size<T>(Dv);
    out[0] = buf.m[c];
    out[1] = buf.l[c];
    std::copy(buf.acc + c * dvp, buf.acc + c * dvp + Dv, out + 2);
  }
}

/// Merges `chunks` partial states (stride apart) in order into one (m, l) and acc[Dv].
template <class T>
void merge_partials(const T* partials, index_t stride, index_t chunks, index_t Dv, T& m, T& l,
                    T* acc) noexcept {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  m = neg_inf;
  for (index_t k = 0; k < chunks; ++k) {
    const T mk = partials[k * stride];
    if (mk > m || mk != mk) m = mk;  // NaN wins and poisons l below
  }
  l = 0;
  std::fill(acc, acc + Dv, T(0));
  for (index_t k = 0; k < chunks; ++k) {
    const T* p = partials + k * stride;
    if (p[0] == neg_inf) continue;
    const T e = std::exp(p[0] - m);
    l += p[1] * e;
    for (index_t d = 0; d < Dv; ++d) acc[d] += p[2 + d] * e;
  }
}

}  // namespace fovea::detail
