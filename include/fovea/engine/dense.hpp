// The dense engine's entry: runs a list of attention problems (one for a plain call, one
// per sequence for varlen and paged calls) on up to `threads` threads. A problem with at
// most decode_max_queries queries takes the decode path (stacked GQA heads, split keys,
// ordered merge); any other takes prefill tiles. Which path, how keys are chunked and
// which task computes which row depend on the shapes only, never on the thread count.
#pragma once

#include <algorithm>
#include <limits>
#include <span>
#include <vector>

#include "../core/parallel.hpp"
#include "../core/scratch.hpp"
#include "../core/storage.hpp"
#include "../core/tensor_view.hpp"
#include "../simd/convert.hpp"
#include "../simd/prefetch.hpp"
#include "decode.hpp"
#include "key_band.hpp"
#include "kv_source.hpp"
#include "prefill.hpp"
#include "query_columns.hpp"
#include "variant.hpp"

namespace fovea::detail {

/// One attention problem, validated by a front-end.
template <class S>
struct dense_problem {
  using T = accumulator_t<S>;
  tensor_view<const S, 4> q;  ///< (B, H, Sq, D)
  tensor_view<S, 4> out;      ///< (B, H, Sq, Dv)
  tensor_view<float, 3> lse;  ///< (B, H, Sq) or empty
  kv_layout<S> kv;
  index_t keys = 0;        ///< Sk
  index_t batch_base = 0;  ///< batch index of q's row 0 in the caller's terms (varlen, paged)
  key_band band;
  logit_terms<T> terms;

  index_t batch() const noexcept { return q.extent(0); }
  index_t heads() const noexcept { return q.extent(1); }
  index_t queries() const noexcept { return q.extent(2); }
  bool decode() const noexcept { return queries() <= decode_max_queries; }
};

/// Fixed chunking of Sk for the decode path: at most 64 chunks of >= 512 keys.
template <index_t BK>
constexpr index_t decode_chunk_keys(index_t keys) noexcept {
  const index_t by_count = (keys + 63) / 64;
  return std::max<index_t>(512, (by_count + BK - 1) / BK * BK);
}

/// Prefill problems with at most this many query tiles in all, against at least
/// split_prefill_min_keys keys, split their keys into fixed chunks (as decode does) so that
/// threads share the keys, not only the tiles: agent attention's first stage (64 agent
/// queries against every key) would otherwise run on one core. The chunking depends on
/// the shape only, so the result does not depend on the thread count.
inline constexpr index_t split_prefill_max_tiles = 4;
inline constexpr index_t split_prefill_min_keys = 4096;

/// The split's chunk: at most 16 chunks of >= 2048 keys (a tile's 64 columns over 2048 keys
/// are ~100 us of work: the per-chunk load, store and merge stay a few percent).
template <index_t BK>
constexpr index_t split_prefill_chunk_keys(index_t keys) noexcept {
  const index_t by_count = (keys + 15) / 16;
  return std::max<index_t>(2048, (by_count + BK - 1) / BK * BK);
}

template <class Backend, class S, class ScoreMod, class MaskMod>
void run_dense(std::span<const dense_problem<S>> problems,
               const custom_variant<ScoreMod, MaskMod>& custom, int threads) {
  using T = accumulator_t<S>;
  using prefill_buf = prefill_buffers<T, Backend>;
  using decode_buf = decode_buffers<T, Backend>;
  constexpr int W = vec<T, Backend>::width;
  constexpr index_t BQ = prefill_buf::BQ;
  constexpr index_t wide = 4 * index_t(W);  // decode tile width with 4 vectors
  // A prefill tile over at most this many keys (agent attention's second stage) computes
  // for less time than its query rows and output rows take to arrive from memory.
  constexpr index_t short_tile_keys = 4 * prefill_buf::BK;

  struct task {
    index_t problem, b, head, tile, chunk;  // head: query head (prefill) or kv head (decode)
    index_t partials;                       // split keys: offset of this tile's states
  };
  struct layout {  // a problem's column tiles and key chunks (chunks > 1: split keys)
    index_t columns, width, tiles, chunk_keys, chunks, partials;
  };
  std::vector<task> work, merges;
  std::vector<layout> layouts(problems.size());
  index_t scratch = 0, partial_total = 0;
  for (index_t pi = 0; pi < index_t(problems.size()); ++pi) {
    const auto& pr = problems[pi];
    const index_t B = pr.batch(), H = pr.heads(), Sq = pr.queries();
    const index_t D = pr.q.extent(3), Dv = pr.out.extent(3), Hk = pr.kv.heads();
    if (B * H * Sq == 0) continue;
    if (!pr.decode()) {
      scratch = std::max(scratch, prefill_buf::size(D, Dv));
      layout& lay = layouts[pi];
      lay.width = BQ;
      lay.tiles = (Sq + BQ - 1) / BQ;
      lay.chunks = 1;
      if (B * H * lay.tiles <= split_prefill_max_tiles && pr.keys >= split_prefill_min_keys) {
        lay.chunk_keys = split_prefill_chunk_keys<prefill_buf::BK>(pr.keys);
        lay.chunks = (pr.keys + lay.chunk_keys - 1) / lay.chunk_keys;
        lay.partials = partial_total;
      }
      const index_t per_tile = lay.chunks * BQ * partial_size<T>(Dv);
      // Later query tiles see more keys under a causal band: hand them out first.
      for (index_t bh = 0; bh < B * H; ++bh)
        for (index_t t = lay.tiles; t-- > 0;) {
          if (lay.chunks == 1) {
            work.push_back({pi, bh / H, bh % H, t, 0, 0});
            continue;
          }
          const index_t at = lay.partials + (bh * lay.tiles + t) * per_tile;
          merges.push_back({pi, bh / H, bh % H, t, 0, at});
          for (index_t ch = 0; ch < lay.chunks; ++ch)
            work.push_back({pi, bh / H, bh % H, t, ch, at});
        }
      if (lay.chunks > 1) partial_total += B * H * lay.tiles * per_tile;
      continue;
    }
    scratch = std::max(scratch, decode_buf::size(D, Dv));
    layout& lay = layouts[pi];
    lay.columns = (H / Hk) * Sq;
    lay.width = lay.columns <= W ? W : wide;
    lay.tiles = (lay.columns + lay.width - 1) / lay.width;
    lay.chunk_keys = decode_chunk_keys<decode_block_k>(pr.keys);
    lay.chunks = std::max<index_t>(1, (pr.keys + lay.chunk_keys - 1) / lay.chunk_keys);
    lay.partials = partial_total;
    const index_t per_tile = lay.chunks * lay.width * partial_size<T>(Dv);
    for (index_t b = 0; b < B; ++b)
      for (index_t hk = 0; hk < Hk; ++hk)
        for (index_t t = 0; t < lay.tiles; ++t) {
          const index_t at = lay.partials + ((b * Hk + hk) * lay.tiles + t) * per_tile;
          merges.push_back({pi, b, hk, t, 0, at});
          for (index_t ch = 0; ch < lay.chunks; ++ch) work.push_back({pi, b, hk, t, ch, at});
        }
    partial_total += B * Hk * lay.tiles * per_tile;
  }
  if (work.empty()) return;

  const int used = static_cast<int>(std::min<index_t>(std::max(threads, 1), index_t(work.size())));
  const scratch_slices<T> buffers(used, scratch);
  std::vector<T> partials(partial_total);

  // Columns c of decode tile t of (b, hk): query head hk * group + g, position i.
  auto decode_columns = [&](const dense_problem<S>& pr, const layout& lay, index_t b, index_t hk,
                            index_t t, query_columns<T>& cols) {
    const index_t Sq = pr.queries(), group = pr.heads() / pr.kv.heads();
    start_columns(cols, pr.terms, b + pr.batch_base);
    const index_t end = std::min(lay.columns, (t + 1) * lay.width);
    for (index_t r = t * lay.width; r < end; ++r)
      cols.add(pr.terms, pr.heads(), hk * group + r / Sq, r % Sq);
    cols.pad_to(lay.width);
  };
  // Columns c of prefill tile t of (b, h): query head h, position t * BQ + c.
  auto prefill_columns = [&](const dense_problem<S>& pr, index_t b, index_t h, index_t t,
                             query_columns<T>& cols) {
    start_columns(cols, pr.terms, b + pr.batch_base);
    for (index_t i = t * BQ; i < std::min(pr.queries(), (t + 1) * BQ); ++i)
      cols.add(pr.terms, pr.heads(), h, i);
    cols.pad_to(BQ);
  };

  parallel_for(index_t(work.size()), used, [&](index_t i, int thread) {
    const task& tk = work[i];
    const dense_problem<S>& pr = problems[tk.problem];
    const index_t D = pr.q.extent(3), Dv = pr.out.extent(3);
    query_columns<T> cols;
    if (!pr.decode()) {
      const index_t i0 = tk.tile * BQ, n = std::min(BQ, pr.queries() - i0);
      paced_prefetch ahead;
      if (pr.keys <= short_tile_keys) {  // little compute to hide a miss behind
        constexpr index_t size = sizeof(S);
        const index_t r0 = std::max<index_t>(0, i0 - BQ);  // the next task's queries
        ahead.add(pr.out.ptr(tk.b, tk.head, i0, 0), Dv * size, pr.out.stride(2) * size, n,
                  prefetch_kind::write);  // this tile's output rows
        ahead.add(pr.q.ptr(tk.b, tk.head, r0, 0), D * size, pr.q.stride(2) * size, i0 - r0,
                  prefetch_kind::l2);
      }
      prefill_columns(pr, tk.b, tk.head, tk.tile, cols);
      prefill_buf buf(buffers.slice(thread), D, Dv);
      const auto kv = pr.kv.source(tk.b, tk.head / pr.terms.group);
      auto q_row = [&](index_t c) { return pr.q.ptr(tk.b, tk.head, i0 + c, 0); };
      const layout& lay = layouts[tk.problem];
      tile_options how{.with_lse = pr.lse.data() != nullptr,
                       .stream_kv = pr.queries() <= BQ && pr.terms.group == 1,
                       .ahead = &ahead};
      if (lay.chunks > 1) {  // this task's chunk of the keys, kept as partial states
        how.from = tk.chunk * lay.chunk_keys;
        how.to = how.from + lay.chunk_keys;
        prefill_keys(cols, q_row, kv, pr.band, custom, D, Dv, buf, how);
        store_partials(cols, Dv, buf,
                       partials.data() + tk.partials + tk.chunk * BQ * partial_size<T>(Dv),
                       partial_size<T>(Dv));
        return;
      }
      prefill_tile<Backend>(
          cols, q_row, kv, pr.band, custom, D, Dv, buf,
          [&](index_t c, auto&& value, T lse) {
            S* row = pr.out.ptr(tk.b, tk.head, i0 + c, 0);
            for (index_t d = 0; d < Dv; ++d) row[d] = S(value(d));
            if (pr.lse.data()) pr.lse(tk.b, tk.head, i0 + c) = float(lse);
          },
          how);
      return;
    }
    const layout& lay = layouts[tk.problem];
    decode_columns(pr, lay, tk.b, tk.head, tk.tile, cols);
    decode_buf buf(buffers.slice(thread), D, Dv);
    constexpr index_t CQ = score_block_columns<T, Backend>();
    for (index_t c = 0; c < (cols.count + CQ - 1) / CQ * CQ; ++c) {  // zero-padded rows
      T* q = buf.q + c * buf.dq;
      const index_t n = c < cols.count ? D : 0;
      if (n > 0) convert_row(pr.q.ptr(tk.b, cols.head[c], cols.pos[c], 0), q, n);
      std::fill(q + n, q + buf.dq, T(0));
    }
    const auto [first, last] = pr.band.keys_for(cols.first_pos, cols.last_pos + 1);
    const index_t c0 = tk.chunk * lay.chunk_keys;
    const index_t lo = std::max(first, c0), hi = std::min(last, c0 + lay.chunk_keys);
    T* states = partials.data() + tk.partials + tk.chunk * lay.width * partial_size<T>(Dv);
    const auto kv = pr.kv.source(tk.b, tk.head);
    decode_chunk<Backend>(cols, kv, pr.band, custom, D, Dv, lo, std::max(lo, hi), last, used == 1,
                          buf, states);
  });

  parallel_for(index_t(merges.size()), used, [&](index_t i, int thread) {
    const task& tk = merges[i];
    const dense_problem<S>& pr = problems[tk.problem];
    const layout& lay = layouts[tk.problem];
    const index_t Dv = pr.out.extent(3), stride = lay.width * partial_size<T>(Dv);
    query_columns<T> cols;
    if (pr.decode())
      decode_columns(pr, lay, tk.b, tk.head, tk.tile, cols);
    else
      prefill_columns(pr, tk.b, tk.head, tk.tile, cols);
    T* acc = buffers.slice(thread);
    for (index_t c = 0; c < cols.count; ++c) {
      T m, l;
      merge_partials(partials.data() + tk.partials + c * partial_size<T>(Dv), stride, lay.chunks,
                     Dv, m, l, acc);
      const row_result<T> r = finish_row(m, l, cols.sink[c], pr.lse.data() != nullptr);
      S* row = pr.out.ptr(tk.b, cols.head[c], cols.pos[c], 0);
      for (index_t d = 0; d < Dv; ++d) row[d] = r.factor == T(0) ? S(0) : S(acc[d] * r.factor);
      if (pr.lse.data()) pr.lse(tk.b, cols.head[c], cols.pos[c]) = float(r.lse);
    }
  });
}

}  // namespace fovea::detail
