// Attention over gathered rows: queries and keys picked from anywhere (a routing cluster's
// members), copied into contiguous buffers, run through the prefill tile. Which (query,
// key) pairs are visible is a predicate on member indices; a per-tile classification
// lets whole tiles be skipped or run without the predicate.
#pragma once

#include <algorithm>

#include "../../core/tensor_view.hpp"
#include "../dense/key_band.hpp"
#include "../kv/kv_source.hpp"
#include "../dense/prefill.hpp"
#include "../dense/query_columns.hpp"
#include "../dense/variant.hpp"

namespace fovea::detail {

enum class tile_view { hidden, whole, partial };

/// Attends the nq gathered query rows q (nq x D) to the nk gathered key/value rows k
/// (nk x D) and v (nk x Dv) with logit scale `scale`. classify(i0, i1, j0, j1) says how
/// query members [i0, i1) see key members [j0, j1); inside partial tiles visible(i, j)
/// decides per pair. emit(i, row, lse) receives query member i's output row (Dv values).
template <class Backend, class T, class Classify, class Visible, class Emit>
void attend_gathered(const T* q, index_t nq, const T* k, const T* v, index_t nk, index_t D,
                     index_t Dv, T scale, Classify&& classify, Visible&& visible,
                     prefill_buffers<T, Backend>& buf, Emit&& emit) noexcept {
  constexpr index_t BQ = prefill_buffers<T, Backend>::BQ, BK = prefill_buffers<T, Backend>::BK;
  logit_terms<T> terms;
  terms.scale = scale;
  const auto pairs = with_mask_mod(
      [&visible](index_t, index_t, index_t i, index_t j) { return bool(visible(i, j)); });
  const key_band everywhere{nk};
  kv_source<T> kv;
  kv.k = k, kv.v = v, kv.k_stride = D, kv.v_stride = Dv;
  for (index_t i0 = 0; i0 < nq; i0 += BQ) {
    const index_t i1 = std::min(nq, i0 + BQ);
    query_columns<T> cols;
    start_columns(cols, terms, 0);
    for (index_t i = i0; i < i1; ++i) cols.add(terms, 1, 0, i);
    cols.pad_to(BQ);
    start_tile(
        cols, [&](index_t c) { return q + (i0 + c) * D; }, D, Dv, buf);
    for (index_t j0 = 0; j0 < nk; j0 += BK) {
      const index_t j1 = std::min(nk, j0 + BK);
      const tile_view how = classify(i0, i1, j0, j1);
      if (how == tile_view::hidden) continue;
      attend_keys(
          cols, row_block<T>{k + j0 * D, D}, row_block<T>{v + j0 * Dv, Dv}, j1 - j0,
          [j0](index_t r) { return j0 + r; }, tile_cuts{false, how == tile_view::partial},
          everywhere, pairs, D, Dv, buf);
    }
    finish_tile(cols, Dv, buf, [&](index_t c, const T* row, T lse) { emit(i0 + c, row, lse); });
  }
}

}  // namespace fovea::detail
