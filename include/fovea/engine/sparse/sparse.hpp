// The block-sparse executor: the prefill tile run over a selection of keys per query
// block instead of the band's one range. A selection is a sorted list of disjoint key
// pieces; tiles of block_k keys are read in place where a piece is long enough, and
// gathered from several short pieces into the staging buffers otherwise, so the cost
// follows the number of selected keys, not the number of blocks they fall in. Keys in no
// piece are never loaded. Block-sparse layouts, HiP, dynamic-mask and routing front-ends
// all describe their selections as pieces.
#pragma once

#include <algorithm>
#include <span>
#include <vector>

#include "../../core/parallel.hpp"
#include "../../core/scratch.hpp"
#include "../../core/storage.hpp"
#include "../../core/tensor_view.hpp"
#include "../dense/dense.hpp"
#include "../dense/prefill.hpp"
#include "../kv/stage.hpp"

namespace fovea::detail {

/// Keys [first, last); `mask_mod`: the variant's mask_mod must be checked inside.
struct key_piece {
  index_t first = 0, last = 0;
  bool mask_mod = true;
};

/// How a selection is indexed: one per (batch, selection head, block of block_q queries).
/// With per_query_head, each query head has its own; otherwise the query heads of a
/// key/value head share one and are stacked as the columns of the same tiles.
struct sparse_rows {
  index_t block_q = 64;
  bool per_query_head = true;
  index_t max_pieces = 0;  ///< the most pieces any selection has
  /// Empty, or blocks of variable size: block n holds queries [starts[n], starts[n + 1])
  /// (non-decreasing, 0 first, Sq last; empty blocks are skipped). block_q is then unused.
  std::span<const index_t> query_starts{};

  index_t blocks(index_t Sq) const noexcept {
    return query_starts.empty() ? (Sq + block_q - 1) / block_q : index_t(query_starts.size()) - 1;
  }
  index_t first_query(index_t block) const noexcept {
    return query_starts.empty() ? block * block_q : query_starts[block];
  }
  index_t queries_in(index_t block, index_t Sq) const noexcept {
    return query_starts.empty() ? std::min(block_q, Sq - block * block_q)
                                : query_starts[block + 1] - query_starts[block];
  }
};

/// Appends [first, last) to a sorted piece list, merging with the previous piece when they
/// touch and agree on mask_mod. Returns the new count.
inline index_t append_piece(key_piece* pieces, index_t count, index_t first, index_t last,
                            bool mask_mod) noexcept {
  if (first >= last) return count;
  if (count > 0 && pieces[count - 1].last == first && pieces[count - 1].mask_mod == mask_mod) {
    pieces[count - 1].last = last;
    return count;
  }
  pieces[count] = {first, last, mask_mod};
  return count + 1;
}

/// Attends `cols` over the pieces [pieces, pieces + count) of `kv`, clipped to the band.
template <class Backend, class T, class K, class V, class ScoreMod, class MaskMod>
void attend_pieces(const query_columns<T>& cols, const key_piece* pieces, index_t count,
                   const kv_source<K, V>& kv, const key_band& band,
                   const custom_variant<ScoreMod, MaskMod>& custom, index_t D, index_t Dv,
                   prefill_buffers<T, Backend>& buf) noexcept {
  constexpr index_t BK = prefill_buffers<T, Backend>::BK;
  const index_t i0 = cols.first_pos, i1 = cols.last_pos + 1;
  const auto visible = band.keys_for(i0, i1);  // (no structured binding: lambdas use it)
  const index_t first = visible.first, last = visible.second;
  index_t key_index[BK];
  bool mask_mod_rows[BK];
  index_t p = 0, j = 0;
  // Moves to the next non-empty clipped piece; j is its first key.
  auto next = [&](index_t from) {
    for (p = from; p < count; ++p) {
      j = std::max(pieces[p].first, first);
      if (j < std::min(pieces[p].last, last)) return;
    }
  };
  auto end_of = [&](index_t piece) { return std::min(pieces[piece].last, last); };
  // Short pieces are scattered: their rows are prefetched a few pieces ahead.
  constexpr index_t pieces_ahead = 4;
  index_t prefetched = 0;  // pieces [0, prefetched) asked for
  auto prefetch_ahead = [&] {
    for (; prefetched < std::min(count, p + pieces_ahead); ++prefetched) {
      const index_t a = std::max(pieces[prefetched].first, first);
      const index_t e = std::min({pieces[prefetched].last, last, a + BK});
      if (a < e) prefetch_rows<2, 2>(kv, a, e - a, D, Dv);
    }
  };
  next(0);
  while (p < count) {
    prefetch_ahead();
    const index_t left = end_of(p) - j;
    if (left >= BK || p + 1 == count) {  // in place: a run of one piece
      const index_t keys = kv.run(j, std::min(BK, left));
      const auto k = rows_for_kernel<T>(kv, true, j, keys, D, D, buf.stage_k);
      const auto v = rows_for_kernel<T>(kv, false, j, keys, Dv, Dv, buf.stage_v);
      const tile_cuts cuts{!band.covers(i0, i1, j, j + keys), pieces[p].mask_mod};
      const index_t j0 = j;
      attend_keys(
          cols, k, v, keys, [j0](index_t r) { return j0 + r; }, cuts, band, custom, D, Dv, buf);
      j += keys;
      if (j == end_of(p)) next(p + 1);
      continue;
    }
    index_t keys = 0;  // gathered: up to BK keys from consecutive pieces
    tile_cuts cuts{false, false, mask_mod_rows};
    const index_t lowest = j;
    while (keys < BK && p < count) {
      const index_t take = std::min(BK - keys, end_of(p) - j);
      stage_rows(kv, true, j, take, D, D, buf.stage_k + keys * D);
      stage_rows(kv, false, j, take, Dv, Dv, buf.stage_v + keys * Dv);
      for (index_t r = 0; r < take; ++r) {
        key_index[keys + r] = j + r;
        mask_mod_rows[keys + r] = pieces[p].mask_mod;
      }
      cuts.mask_mod = cuts.mask_mod || pieces[p].mask_mod;
      keys += take;
      j += take;
      if (j == end_of(p)) next(p + 1), prefetch_ahead();
    }
    cuts.band = !band.covers(i0, i1, lowest, key_index[keys - 1] + 1);
    attend_keys(
        cols, row_block<T>{buf.stage_k, D}, row_block<T>{buf.stage_v, Dv}, keys,
        [&key_index](index_t r) { return key_index[r]; }, cuts, band, custom, D, Dv, buf);
  }
}

/// Runs problem `pr` over the selections that `select(b, h, block, pieces)` writes
/// (h: query head, or key/value head when rows.per_query_head is false; returns the
/// count, at most rows.max_pieces). Each output row is written by one task, so the result
/// does not depend on the thread count.
template <class Backend, class S, class K, class V, class ScoreMod, class MaskMod, class Select>
void run_sparse(const dense_problem<S, K, V>& pr, const sparse_rows& rows, Select&& select,
                const custom_variant<ScoreMod, MaskMod>& custom, int threads) {
  using T = accumulator_t<S>;
  using buffers_t = prefill_buffers<T, Backend>;
  constexpr index_t BQ = buffers_t::BQ;
  const index_t B = pr.batch(), H = pr.heads(), Sq = pr.queries(), Hk = pr.kv.heads();
  const index_t D = pr.q.extent(3), Dv = pr.out.extent(3);
  if (B * H * Sq == 0) return;
  const index_t group = H / Hk;
  const index_t selection_heads = rows.per_query_head ? H : Hk;
  const index_t stacked = rows.per_query_head ? 1 : group;  // query heads per selection
  const index_t blocks = rows.blocks(Sq);

  struct task {
    index_t b, head, block, chunk;
  };
  std::vector<task> work;
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < selection_heads; ++h)
      for (index_t blk = blocks; blk-- > 0;) {  // later blocks see more keys: first
        const index_t columns = stacked * rows.queries_in(blk, Sq);
        for (index_t ch = 0; ch * BQ < columns; ++ch) work.push_back({b, h, blk, ch});
      }

  const int used = static_cast<int>(std::min<index_t>(std::max(threads, 1), index_t(work.size())));
  const scratch_slices<T> buffers(used, buffers_t::size(D, Dv));
  const scratch_slices<key_piece> piece_buffers(used, rows.max_pieces);  // not zeroed: select writes

  parallel_for(index_t(work.size()), used, [&](index_t i, int thread) {
    const task& tk = work[i];
    const index_t i0 = rows.first_query(tk.block), positions = rows.queries_in(tk.block, Sq);
    const index_t h0 = rows.per_query_head ? tk.head : tk.head * group;
    const index_t columns = stacked * positions;
    query_columns<T> cols;
    start_columns(cols, pr.terms, tk.b + pr.batch_base);
    for (index_t r = tk.chunk * BQ; r < std::min(columns, (tk.chunk + 1) * BQ); ++r)
      cols.add(pr.terms, H, h0 + r / positions, i0 + r % positions);
    cols.pad_to(BQ);

    key_piece* pieces = piece_buffers.slice(thread);
    const index_t count = select(tk.b, tk.head, tk.block, pieces);
    buffers_t buf(buffers.slice(thread), D, Dv);
    start_tile(
        cols, [&](index_t c) { return pr.q.ptr(tk.b, cols.head[c], cols.pos[c], 0); }, D, Dv, buf);
    attend_pieces(cols, pieces, count, pr.kv.source(tk.b, h0 / group), pr.band, custom, D, Dv, buf);
    finish_tile(
        cols, Dv, buf,
        [&](index_t c, const T* row, T lse) {
          convert_row(row, pr.out.ptr(tk.b, cols.head[c], cols.pos[c], 0), Dv);
          if (pr.lse.data()) pr.lse(tk.b, cols.head[c], cols.pos[c]) = float(lse);
        },
        pr.lse.data() != nullptr);
  });
}

}  // namespace fovea::detail
