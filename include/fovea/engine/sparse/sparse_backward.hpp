// The backward of the block-sparse executor: the dense backward's tile (backward_tile,
// the same logits, dS and products) run over a selection of keys per query block instead
// of the band's range, so its cost follows the selected keys as the forward's does. The
// selected keys are gathered into tiles of up to 64 (from any number of pieces); keys in
// no piece are never loaded and get zero gradients. Deterministic as the dense backward:
// dQ rows are written by their query block's task; dK and dV rows by the task that owns
// their key range, which visits the query blocks in a fixed order and adds each gathered
// tile's products into the range's accumulators.
#pragma once

#include <algorithm>
#include <span>
#include <vector>

#include "../../core/parallel.hpp"
#include "../../core/scratch.hpp"
#include "../../core/tensor_view.hpp"
#include "../dense/backward.hpp"
#include "sparse.hpp"

namespace fovea::detail {

/// Every selection of a problem, computed once: (batch, selection head, query block).
struct stored_selections {
  index_t heads = 0, blocks = 0;
  std::vector<std::vector<key_piece>> lists;

  std::span<const key_piece> of(index_t b, index_t sh, index_t block) const noexcept {
    return lists[std::size_t((b * heads + sh) * blocks + block)];
  }
  /// The mean number of keys a selection holds.
  double mean_keys() const noexcept {
    double total = 0;
    for (const auto& list : lists)
      for (const key_piece& p : list) total += double(p.last - p.first);
    return lists.empty() ? 0.0 : total / double(lists.size());
  }
};

template <class Select>
stored_selections store_selections(index_t B, index_t heads, index_t blocks, index_t max_pieces,
                                   Select&& select, int threads) {
  stored_selections s{heads, blocks, std::vector<std::vector<key_piece>>(B * heads * blocks)};
  const scratch_slices<key_piece> buffers(std::max(threads, 1), max_pieces);  // select writes
  parallel_for(index_t(s.lists.size()), threads, [&](index_t task, int thread) {
    key_piece* pieces = buffers.slice(thread);
    const index_t count = select(task / (heads * blocks), task / blocks % heads, task % blocks, pieces);
    s.lists[std::size_t(task)].assign(pieces, pieces + count);
  });
  return s;
}

/// The keys of `pieces` within [lo, hi), in order, gathered BK at a time:
/// f(count, index, mask_mod_rows, any_mask_mod) for each group.
template <index_t BK, class F>
void for_gathered_keys(std::span<const key_piece> pieces, index_t lo, index_t hi, F&& f) {
  index_t index[BK];
  bool mask_mod[BK];
  index_t n = 0;
  bool any = false;
  auto p = std::partition_point(pieces.begin(), pieces.end(),
                                [lo](const key_piece& x) { return x.last <= lo; });
  for (; p != pieces.end() && p->first < hi; ++p)
    for (index_t j = std::max(p->first, lo), end = std::min(p->last, hi); j < end; ++j) {
      index[n] = j;
      mask_mod[n] = p->mask_mod;
      any = any || p->mask_mod;
      if (++n == BK) {
        f(n, static_cast<const index_t*>(index), static_cast<const bool*>(mask_mod), any);
        n = 0;
        any = false;
      }
    }
  if (n > 0) f(n, static_cast<const index_t*>(index), static_cast<const bool*>(mask_mod), any);
}

/// The gathered keys index[0, count) of (b, hk) into buf.k, buf.v, a run of consecutive
/// keys at a time.
template <class Backend, class S, class T>
void stage_gathered_keys(const dense_problem<S>& pr, index_t b, index_t hk, const index_t* index,
                         index_t count, backward_buffers<T, Backend>& buf) noexcept {
  const auto kv = pr.kv.source(b, hk);
  const index_t D = pr.q.extent(3), Dv = pr.kv.value_dim();
  for (index_t r = 0; r < count;) {
    index_t run = 1;
    while (r + run < count && index[r + run] == index[r] + run) ++run;
    stage_rows(kv, true, index[r], run, D, buf.dp, buf.k + r * buf.dp);
    stage_rows(kv, false, index[r], run, Dv, buf.dvp, buf.v + r * buf.dvp);
    r += run;
  }
}

/// Runs the backward of `bp` over the selections `select(b, sh, block, pieces)` writes,
/// as run_sparse takes them (rows.block_q must be the backward tile's 64 query rows; sh
/// is the query head with rows.per_query_head, else its key/value head).
template <class Backend, class S, class ScoreMod, class MaskMod, class Select>
void run_sparse_backward(const backward_problem<S>& bp, const sparse_rows& rows, Select&& select,
                         const custom_variant<ScoreMod, MaskMod>& custom, int threads) {
  using T = accumulator_t<S>;
  using buffers_t = backward_buffers<T, Backend>;
  constexpr index_t BQ = buffers_t::BQ, BK = buffers_t::BK;
  const auto& pr = bp.forward;
  const index_t B = pr.batch(), H = pr.heads(), Sq = pr.queries(), Hk = pr.kv.heads();
  const index_t Sk = pr.keys, D = pr.q.extent(3), Dv = bp.dout.extent(3), group = pr.terms.group;
  if (!start_backward(bp)) return;
  const index_t blocks = (Sq + BQ - 1) / BQ;
  const index_t heads = rows.per_query_head ? H : Hk;
  auto head_of = [&](index_t h) { return rows.per_query_head ? h : h / group; };
  threads = std::max(threads, 1);
  const stored_selections sel =
      store_selections(B, heads, blocks, rows.max_pieces, select, threads);
  const double kept = sel.mean_keys();  // per query block

  // Key ranges: wide enough that a query block keeps ~BK of their keys (full tiles),
  // narrow enough for several tasks (8 per call at least) and accumulators that stay in
  // cache. Never from the thread count: the ranges decide which keys share a tile.
  const index_t per_head_tasks = std::max<index_t>(1, (8 + B * Hk - 1) / std::max<index_t>(1, B * Hk));
  index_t range = index_t(double(BK) * double(Sk) / std::max(kept, 1.0));
  range = std::min({range, (Sk + per_head_tasks - 1) / per_head_tasks, index_t(2048)});
  range = std::max<index_t>(BK, (range + BK - 1) / BK * BK);
  const index_t ranges = (Sk + range - 1) / range;
  const int used = threads_for_work(threads, 7.0 * double(B * H * Sq) * kept * double(D + Dv),
                                    B * std::min(Hk * ranges, H * blocks));
  const std::vector<T> delta = backward_delta(bp, used);
  const scratch_slices<T> scratch(used, buffers_t::size(D, Dv));
  const index_t dp = buffers_t::padded(D), dvp = buffers_t::padded(Dv);
  const bool key_bias = bp.dbias_per_key, row_bias = bp.dbias.data() && !key_bias;
  const scratch_slices<T> sums(used, range * (dp + dvp) + (key_bias ? group * range : 0));

  auto tile = [&](query_columns<T>& cols, buffers_t& buf, index_t b, index_t hk, index_t count,
                  const index_t* index, const bool* mask_mod, bool any, bool with_dz) {
    stage_gathered_keys(pr, b, hk, index, count, buf);
    const tile_cuts cuts{!pr.band.covers(cols.first_pos, cols.last_pos + 1, index[0],
                                         index[count - 1] + 1),
                         any, mask_mod};
    return backward_tile(cols, pr.band, custom, [index](index_t r) { return index[r]; }, cuts,
                         count, D, Dv, buf, with_dz);
  };

  // dK, dV: one task per (b, kv head, key range)
  parallel_for(B * Hk * ranges, used, [&](index_t task, int thread) {
    const index_t b = task / (Hk * ranges), hk = task / ranges % Hk;
    const index_t r0 = task % ranges * range, r1 = std::min(Sk, r0 + range);
    buffers_t buf(scratch.slice(thread), D, Dv);
    T* dk = sums.slice(thread);
    T* dv = dk + range * dp;
    T* dbias = dv + range * dvp;
    std::fill(dk, dk + range * (dp + dvp) + (key_bias ? group * range : 0), T(0));
    for (index_t h = hk * group; h < (hk + 1) * group; ++h)
      for (index_t qb = 0; qb < blocks; ++qb) {
        const index_t i0 = qb * BQ, n = std::min(BQ, Sq - i0);
        const auto band = pr.band.keys_for(i0, i0 + n);
        const index_t lo = std::max(band.first, r0), hi = std::min(band.second, r1);
        if (lo >= hi) continue;
        query_columns<T> cols;
        bool staged = false;
        for_gathered_keys<BK>(sel.of(b, head_of(h), qb), lo, hi,
                              [&](index_t count, const index_t* index, const bool* mm, bool any) {
          if (!staged) stage_queries(bp, delta, b, h, i0, n, buf, cols), staged = true;
          const bool masked = tile(cols, buf, b, hk, count, index, mm, any, key_bias);
          std::fill(buf.dk, buf.dk + count * dp, T(0));
          std::fill(buf.dv, buf.dv + count * dvp, T(0));
          if (key_bias) std::fill(buf.dbias, buf.dbias + count, T(0));
          add_key_products(buf, masked, count, n, D, Dv, key_bias ? buf.dbias : nullptr);
          for (index_t r = 0; r < count; ++r) {  // into the range's rows
            const index_t at = index[r] - r0;
            for (index_t d = 0; d < D; ++d) dk[at * dp + d] += buf.dk[r * dp + d];
            for (index_t e = 0; e < Dv; ++e) dv[at * dvp + e] += buf.dv[r * dvp + e];
            if (key_bias) dbias[(h - hk * group) * range + at] += buf.dbias[r];
          }
        });
      }
    store_key_gradients(bp, b, hk, r0, r1 - r0, dk, dp, dv, dvp, dbias, range);
  });

  // dQ: one task per (b, head, query block)
  parallel_for(B * H * blocks, used, [&](index_t task, int thread) {
    const index_t b = task / (H * blocks), h = task / blocks % H, qb = task % blocks;
    const index_t i0 = qb * BQ, n = std::min(BQ, Sq - i0);
    buffers_t buf(scratch.slice(thread), D, Dv);
    query_columns<T> cols;
    stage_queries(bp, delta, b, h, i0, n, buf, cols);
    std::fill(buf.acc, buf.acc + BQ * buf.dp, T(0));
    const auto band = pr.band.keys_for(i0, i0 + n);
    for_gathered_keys<BK>(sel.of(b, head_of(h), qb), band.first, band.second,
                          [&](index_t count, const index_t* index, const bool* mm, bool any) {
      const bool masked = tile(cols, buf, b, h / group, count, index, mm, any, row_bias);
      if (row_bias)  // (B, H, Sq, Sk): this task's rows alone
        for (index_t c = 0; c < n; ++c)
          for (index_t r = 0; r < count; ++r)
            bp.dbias(b, h, i0 + c, index[r]) = float(buf.dz[r * BQ + c]);
      add_query_products(buf, masked, count, n, D, Dv);
    });
    for (index_t c = 0; c < n; ++c) {
      S* row = bp.dq.ptr(b, h, i0 + c, 0);
      for (index_t d = 0; d < D; ++d) row[d] = S(buf.acc[c * buf.dp + d]);
    }
  });
}

}  // namespace fovea::detail
