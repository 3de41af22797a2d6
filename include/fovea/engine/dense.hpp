// The dense engine: flash-style attention over (batch, head, query tile) tasks. Each
// task keeps its query tile transposed (queries along the SIMD lanes), walks the key
// tiles its band allows, and keeps an online-softmax state per query; the Sq x Sk score
// matrix is never formed. Extra memory: one tile set per thread, independent of Sq, Sk.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "../core/parallel.hpp"
#include "../core/scratch.hpp"
#include "../core/tensor_view.hpp"
#include "gemm_tile.hpp"
#include "key_band.hpp"
#include "online_softmax.hpp"
#include "tile_traits.hpp"
#include "variant.hpp"

namespace fovea::detail {

/// Everything a dense attention call computes from, validated by the front-end.
template <class T>
struct dense_problem {
  tensor_view<const T, 4> q, k, v;  ///< (B, H, Sq, D), (B, Hk, Sk, D), (B, Hk, Sk, Dv)
  tensor_view<T, 4> out;            ///< (B, H, Sq, Dv)
  tensor_view<float, 3> lse;        ///< (B, H, Sq) or empty
  key_band band;
  logit_terms<T> terms;
};

/// True when rows [0, rows) x [0, cols) of a strided matrix hold only finite values.
template <class T, class Backend>
bool all_finite(const T* data, index_t row_stride, index_t rows, index_t cols) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width;
  auto acc = V::broadcast(T(0));
  T tail = 0;
  for (index_t r = 0; r < rows; ++r) {
    const T* row = data + r * row_stride;
    index_t c = 0;
    for (; c + W <= cols; c += W) acc = V::fma(V::load(row + c), V::broadcast(T(0)), acc);
    for (; c < cols; ++c) tail += row[c] * T(0);
  }
  return V::reduce_add(acc) + tail == T(0);
}

/// acc^T += V^T P^T for a tile whose masked (-inf) logits meet a non-finite value: each
/// masked (query, key) pair is skipped, so NaN/Inf in a masked key never reaches a row.
template <class T>
void accumulate_skipping_masked(const T* v, index_t v_stride, index_t keys, index_t dv,
                                const T* logits, const T* p, index_t ld, T* acc) noexcept {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  for (index_t d = 0; d < dv; ++d)
    for (index_t c = 0; c < ld; ++c) {
      T sum = acc[d * ld + c];
      for (index_t j = 0; j < keys; ++j)
        if (logits[j * ld + c] != neg_inf) sum += v[j * v_stride + d] * p[j * ld + c];
      acc[d * ld + c] = sum;
    }
}

/// One (batch, head, query tile) task. `work` holds the tile buffers of this thread.
template <class Backend, class T, class ScoreMod, class MaskMod>
void attend_query_tile(const dense_problem<T>& pr, const custom_variant<ScoreMod, MaskMod>& custom,
                       index_t b, index_t h, index_t i0, index_t queries, T* work) noexcept {
  using traits = tile_traits<T, Backend>;
  constexpr index_t BQ = traits::block_q, BK = traits::block_k;
  constexpr int QV = traits::query_vectors, RB = traits::row_block;
  const index_t D = pr.q.extent(3), Dv = pr.v.extent(3), H = pr.q.extent(1);
  const index_t hk = h / pr.terms.group;

  T* q_t = work;                           // [D][BQ]   queries transposed
  T* s = q_t + round_to_line<T>(D * BQ);   // [BK][BQ]  logits
  T* p = s + BK * BQ;                      // [BK][BQ]  probabilities
  T* acc = p + BK * BQ;                    // [Dv][BQ]  unnormalised output, transposed
  T* m = acc + round_to_line<T>(Dv * BQ);  // [BQ] running max
  T* l = m + BQ;                           // [BQ] running sum
  T* alpha = l + BQ;                       // [BQ] rescale factors

  for (index_t c = 0; c < BQ; ++c) {
    const T* row = c < queries ? &pr.q(b, h, i0 + c, 0) : nullptr;
    for (index_t d = 0; d < D; ++d) q_t[d * BQ + c] = row ? row[d] : T(0);
  }
  std::fill(acc, acc + Dv * BQ, T(0));
  std::fill(m, m + BQ, -std::numeric_limits<T>::infinity());
  std::fill(l, l + BQ, T(0));

  const head_logits<T> hl = bind_head(pr.terms, b, h, H);
  const index_t k_stride = pr.k.stride(2), v_stride = pr.v.stride(2);
  const T* k_head = pr.k.data() + b * pr.k.stride(0) + hk * pr.k.stride(1);
  const T* v_head = pr.v.data() + b * pr.v.stride(0) + hk * pr.v.stride(1);
  const auto [first, last] = pr.band.keys_for(i0, i0 + queries);

  for (index_t j0 = first; j0 < last; j0 += BK) {
    const index_t keys = std::min(BK, last - j0);
    const T* k_tile = k_head + j0 * k_stride;
    const T* v_tile = v_head + j0 * v_stride;
    gemm_rows<T, Backend, RB, QV, false>(keys, k_tile, k_stride, 1, q_t, BQ, s, BQ, D);
    const bool partial = !pr.band.covers(i0, i0 + queries, j0, j0 + keys);
    const bool masked =
        apply_logits<Backend>(hl, custom, pr.band, partial, b, h, s, BQ, i0, queries, j0, keys);
    if (online_softmax_update<T, Backend, QV>(s, p, BQ, keys, m, l, alpha))
      rescale_rows<T, Backend, QV>(acc, BQ, Dv, alpha);
    if (masked && !all_finite<T, Backend>(v_tile, v_stride, keys, Dv))
      accumulate_skipping_masked(v_tile, v_stride, keys, Dv, s, p, BQ, acc);
    else
      gemm_rows<T, Backend, RB, QV, true>(Dv, v_tile, 1, v_stride, p, BQ, acc, BQ, keys);
  }

  for (index_t c = 0; c < queries; ++c) {
    const row_result<T> r = finish_row(m[c], l[c], hl.sink);
    T* out_row = &pr.out(b, h, i0 + c, 0);
    for (index_t d = 0; d < Dv; ++d)
      out_row[d] = r.factor == T(0) ? T(0) : acc[d * BQ + c] * r.factor;
    if (pr.lse.data() != nullptr) pr.lse(b, h, i0 + c) = static_cast<float>(r.lse);
  }
}

/// Runs the whole problem on up to `threads` threads. Every output row is computed by
/// one task in a fixed order, so the result does not depend on the thread count.
template <class Backend, class T, class ScoreMod, class MaskMod>
void run_dense(const dense_problem<T>& pr, const custom_variant<ScoreMod, MaskMod>& custom,
               int threads) {
  using traits = tile_traits<T, Backend>;
  constexpr index_t BQ = traits::block_q, BK = traits::block_k;
  const index_t B = pr.q.extent(0), H = pr.q.extent(1), Sq = pr.q.extent(2);
  const index_t D = pr.q.extent(3), Dv = pr.v.extent(3);
  const index_t tiles = (Sq + BQ - 1) / BQ;
  const index_t tasks = B * H * tiles;
  if (tasks == 0) return;
  const int used = static_cast<int>(std::min<index_t>(std::max(threads, 1), tasks));
  const index_t per_thread =
      round_to_line<T>(D * BQ) + 2 * BK * BQ + round_to_line<T>(Dv * BQ) + 3 * BQ;
  const scratch_slices<T> scratch(used, per_thread);
  parallel_for(tasks, used, [&](index_t task, int thread) {
    // Later query tiles see more keys under a causal band: hand them out first.
    const index_t tile = tiles - 1 - task % tiles;
    const index_t bh = task / tiles;
    const index_t i0 = tile * BQ;
    attend_query_tile<Backend>(pr, custom, bh / H, bh % H, i0, std::min(BQ, Sq - i0),
                               scratch.slice(thread));
  });
}

}  // namespace fovea::detail
