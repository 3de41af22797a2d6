// The dense engine's entry: runs a list of attention problems (one for a plain call, one
// per sequence for varlen and paged calls) on up to `threads` threads. plan_dense cuts
// them into tasks (a plan a test can inspect); run_dense executes it. A problem with at
// most decode_max_queries queries takes the decode path (stacked GQA heads, split keys,
// ordered merge); any other takes prefill tiles. Which path, how keys are chunked and
// which task computes which row depend on the shapes only, never on the thread count.
#pragma once

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <span>
#include <vector>

#include "../../core/parallel.hpp"
#include "../../core/scratch.hpp"
#include "../../core/storage.hpp"
#include "../../core/tensor_view.hpp"
#include "../../simd/convert.hpp"
#include "../../simd/prefetch.hpp"
#include "decode.hpp"
#include "key_band.hpp"
#include "../kv/kv_source.hpp"
#include "prefill.hpp"
#include "query_columns.hpp"
#include "variant.hpp"

namespace fovea::detail {

/// One attention problem, validated by a front-end: q and out of storage type S, keys
/// of K and values of V (each S, or another storage or cache type).
template <class S, class K = S, class V = S>
struct dense_problem {
  using T = accumulator_t<S>;
  using key_type = K;
  using value_type = V;
  tensor_view<const S, 4> q;  ///< (B, H, Sq, D)
  tensor_view<S, 4> out;      ///< (B, H, Sq, Dv)
  tensor_view<float, 3> lse;  ///< (B, H, Sq) or empty
  kv_layout<K, V> kv;
  index_t keys = 0;        ///< Sk
  index_t batch_base = 0;  ///< batch index of q's row 0 in the caller's terms (varlen, paged)
  key_band band;
  logit_terms<T> terms;
  /// (B, H, Sq) or empty: the head-sparse mode (Mixture-of-Head attention). A row whose
  /// weight is 0 is never computed and is written 0 (lse -inf); any other row's output is
  /// multiplied by its weight.
  tensor_view<const float, 3> row_weights;
  /// A prob_mod call (its score_mod a prob_pass): each prefill tile walks its keys twice,
  /// for the rows' max and sum, then for the normalised probabilities through the prob_mod
  /// before P V; so prefill tiles over whole keys only (no decode path, no key split).
  bool prob_mod = false;
  /// float q over bf16 keys and values: products in bf16 pairs as a bf16 call computes them
  /// (softmax_options::bf16_products).
  bool bf16_products = false;
  /// float (or bf16 / fp16) q over q8_0 keys: decode logits in integers against q
  /// quantized to q8_0 (softmax_options::q8_0_products).
  bool q8_0_products = false;

  index_t batch() const noexcept { return q.extent(0); }
  index_t heads() const noexcept { return q.extent(1); }
  index_t queries() const noexcept { return q.extent(2); }
  bool decode() const noexcept { return queries() <= decode_max_queries && !prob_mod; }
};

/// Whether a problem's products run in bf16 pairs (AVX512-BF16 vdpbf16ps, fp32 sums): bf16
/// keys and values with D even under bf16 queries, or float ones whose caller opted in, on
/// an AVX512-BF16 target; not in a prob_mod call (its two walks score in fp32).
template <class Backend, class S, class K, class V>
bool uses_bf16_pairs(const dense_problem<S, K, V>& pr) noexcept {
  if constexpr (bf16_pairs_apply<accumulator_t<S>, Backend>() && std::is_same_v<K, bfloat16> &&
                std::is_same_v<V, bfloat16>)
    return (std::is_same_v<S, bfloat16> || pr.bf16_products) && pr.q.extent(3) % 2 == 0 &&
           !pr.prob_mod;
  return false;
}

/// Whether a problem's decode logits are q8_0 integer products (score_q8_0.hpp): q8_0
/// keys under queries of an fp32 compute type whose caller opted in; not in a prob_mod call.
template <class S, class K, class V>
bool uses_q8_0_products(const dense_problem<S, K, V>& pr) noexcept {
  if constexpr (std::is_same_v<accumulator_t<S>, float> && std::is_same_v<K, block_q8_0>)
    return pr.q8_0_products && !pr.prob_mod;
  return false;
}

/// Decode problems with at least this many stacked columns per key/value head take the
/// prefill tile (dense_layout::gemm): its micro-kernel computes 6 keys x BQ columns per
/// depth step from one load of each operand, where the decode tile's dot products reduce
/// lanes per 4 keys x 4 columns and load each key vector once per 4 columns. Measured
/// (AVX-512, D = 128, 1 thread): 64 columns 1.1x (fp32) and 1.35x (bf16) faster through
/// the prefill tile; 32 columns, which fill half its 64, 1.7x slower (fp32).
inline constexpr index_t decode_gemm_columns = 64;

/// Decode calls are cut into at least this many tasks (column tiles x key chunks) where
/// the keys allow chunks of decode_min_chunk_keys, so that threads share the work however
/// few the key/value heads.
inline constexpr index_t decode_min_tasks = 64;
inline constexpr index_t decode_min_chunk_keys = 512;

/// Fixed chunking of Sk for the decode path, from the shapes alone (`tiles`: the call's
/// column tiles, B x Hk x tiles per kv head): enough chunks per tile for decode_min_tasks
/// tasks in all (at most 64), of >= 512 keys, a whole number of BK-key tiles. Fewer,
/// longer chunks than 64 per tile whatever the heads: each chunk restarts its tile's
/// state, stages and quantizes its queries, and leaves a state to merge (Sk = 32768, H =
/// 32, Hk = 8, D = 128, medians of 5-7 interleaved: 8 chunks of 4096 keys against 64 of
/// 512, 1 thread: q8_0_products 6.12 -> 5.66 ms, q8_0 7.09 -> 6.75, bf16 9.39 -> 8.64 on
/// a busy host; 2 threads: q8_0_products 4.71 -> 3.49 ms, bf16 6.13 -> 5.07).
template <index_t BK>
constexpr index_t decode_chunk_keys(index_t keys, index_t tiles) noexcept {
  const index_t chunks = std::clamp<index_t>((decode_min_tasks + tiles - 1) / std::max<index_t>(tiles, 1), 1, 64);
  const index_t by_count = (keys + chunks - 1) / chunks;
  return std::max<index_t>(decode_min_chunk_keys, (by_count + BK - 1) / BK * BK);
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

/// One unit of work: a prefill query tile of (b, head) over all its keys or one chunk of
/// them, or a decode column tile of (b, kv head) over one key chunk; merges reuse it to
/// name the tile whose chunk states they combine.
struct dense_task {
  index_t problem, b, head, tile, chunk;  ///< head: query head (prefill) or kv head (decode)
  index_t partials;                       ///< split keys: offset of the tile's chunk states
  index_t merge = -1;                     ///< split keys: the merge that waits for this chunk
};

/// How one problem is cut: column tiles of `width` columns and key chunks, whose states
/// wait at `partials` for the merge (every decode tile; prefill tiles with chunks > 1).
struct dense_layout {
  bool decode = false;
  /// decode: the stacked columns run through the prefill tile (a GEMM with M = query heads
  /// x positions; many heads per key/value head, as MLA's 16 to 128) instead of the decode
  /// tile's dot products.
  bool gemm = false;
  index_t columns = 0;  ///< decode: stacked (query head, position) columns
  index_t width = 0, tiles = 0, chunk_keys = 0, chunks = 1, partials = 0;
  /// Head-sparse problems: the first of this problem's lists in dense_plan::selected (one
  /// per (b, head) for prefill, per (b, kv head) for decode); -1 for every row.
  index_t lists = -1;
};

/// The rows one (b, head) prefill list or (b, kv head) decode list computes: positions
/// (prefill) or stacked column indices (decode), ascending; all when `all`.
struct row_list {
  const index_t* at = nullptr;
  index_t count = 0;
  bool all = true;
  index_t operator[](index_t r) const noexcept { return all ? r : at[r]; }
};

/// The work of a run_dense call, fixed by the shapes alone (never by the thread count):
/// the tasks, the merges of split keys, each problem's layout and the memory they need.
struct dense_plan {
  std::vector<dense_task> work, merges;
  std::vector<dense_layout> layouts;
  index_t scratch = 0;        ///< elements of per-thread scratch
  index_t partial_total = 0;  ///< elements of chunk states
  double flops = 0;           ///< Q K^T and P V over every key (causal or not): an upper bound
  /// Head-sparse problems' rows: list l is selected[list_start[l] .. list_start[l + 1]).
  std::vector<index_t> selected, list_start{0};

  /// List `key` of a problem laid out as `lay` (every row of `all_rows` when not sparse).
  row_list rows(const dense_layout& lay, index_t key, index_t all_rows) const noexcept {
    if (lay.lists < 0) return {nullptr, all_rows, true};
    const index_t l = lay.lists + key, first = list_start[std::size_t(l)];
    return {selected.data() + first, list_start[std::size_t(l) + 1] - first, false};
  }
};

/// Appends a head-sparse problem's lists to the plan: per (b, h) the positions whose weight
/// is not 0 (prefill), or per (b, kv head) the stacked columns g * Sq + i whose head
/// h = hk * group + g has a weight at i that is not 0 (decode).
template <class S, class K, class V>
void plan_selected_rows(const dense_problem<S, K, V>& pr, bool decode, dense_plan& plan,
                        dense_layout& lay) {
  const index_t B = pr.batch(), H = pr.heads(), Sq = pr.queries(), Hk = pr.kv.heads();
  const index_t group = H / Hk, lists = decode ? B * Hk : B * H;
  const index_t per_list = decode ? group * Sq : Sq;
  lay.lists = index_t(plan.list_start.size()) - 1;
  for (index_t l = 0; l < lists; ++l) {
    const index_t b = l / (decode ? Hk : H), head = l % (decode ? Hk : H);
    for (index_t r = 0; r < per_list; ++r) {
      const index_t h = decode ? head * group + r / Sq : head, i = decode ? r % Sq : r;
      if (pr.row_weights(b, h, i) != 0.0f) plan.selected.push_back(r);
    }
    plan.list_start.push_back(index_t(plan.selected.size()));
  }
}

/// Plans problems for the prefill tile (query tiles of BQ, split keys when few tiles meet
/// many keys) or the decode tile (stacked GQA columns, keys in decode_chunk_keys chunks).
template <class Backend, class S, class K, class V>
dense_plan plan_dense(std::span<const dense_problem<S, K, V>> problems) {
  using T = accumulator_t<S>;
  using prefill_buf = prefill_buffers<T, Backend>;
  using decode_buf = decode_buffers<T, Backend>;
  constexpr int W = vec<T, Backend>::width;
  constexpr index_t BQ = prefill_buf::BQ;
  constexpr index_t wide = 4 * index_t(W);  // decode tile width with 4 vectors
  dense_plan plan;
  plan.layouts.resize(problems.size());
  for (index_t pi = 0; pi < index_t(problems.size()); ++pi) {
    const auto& pr = problems[pi];
    const index_t B = pr.batch(), H = pr.heads(), Sq = pr.queries();
    const index_t D = pr.q.extent(3), Dv = pr.out.extent(3), Hk = pr.kv.heads();
    if (B * H * Sq == 0) continue;
    dense_layout& lay = plan.layouts[pi];
    if (pr.row_weights.data()) plan_selected_rows(pr, pr.decode(), plan, lay);
    const index_t rows = lay.lists < 0 ? B * H * Sq : index_t(plan.selected.size()) - plan.list_start[std::size_t(lay.lists)];
    plan.flops += 2.0 * double(rows) * double(pr.keys) * double(D + Dv);
    if (!pr.decode()) {
      plan.scratch = std::max(plan.scratch, prefill_buf::size(D, Dv));
      lay.width = BQ;
      lay.tiles = (Sq + BQ - 1) / BQ;
      if (B * H * lay.tiles <= split_prefill_max_tiles && pr.keys >= split_prefill_min_keys &&
          !pr.prob_mod) {
        lay.chunk_keys = split_prefill_chunk_keys<prefill_buf::BK>(pr.keys);
        lay.chunks = (pr.keys + lay.chunk_keys - 1) / lay.chunk_keys;
        lay.partials = plan.partial_total;
      }
      const index_t per_tile = lay.chunks * BQ * partial_size<T>(Dv);
      // Later query tiles see more keys under a causal band: hand them out first.
      for (index_t bh = 0; bh < B * H; ++bh)
        for (index_t t = (plan.rows(lay, bh, Sq).count + BQ - 1) / BQ; t-- > 0;) {
          if (lay.chunks == 1) {
            plan.work.push_back({pi, bh / H, bh % H, t, 0, 0});
            continue;
          }
          const index_t at = lay.partials + (bh * lay.tiles + t) * per_tile;
          const index_t merge = index_t(plan.merges.size());
          plan.merges.push_back({pi, bh / H, bh % H, t, 0, at});
          for (index_t ch = 0; ch < lay.chunks; ++ch)
            plan.work.push_back({pi, bh / H, bh % H, t, ch, at, merge});
        }
      if (lay.chunks > 1) plan.partial_total += B * H * lay.tiles * per_tile;
      continue;
    }
    lay.decode = true;
    lay.columns = (H / Hk) * Sq;
    // (q8_0 products are the decode tile's: every decode problem of the call scores so)
    lay.gemm = lay.columns >= decode_gemm_columns && !uses_q8_0_products(pr);
    plan.scratch = std::max(plan.scratch, lay.gemm ? prefill_buf::size(D, Dv) : decode_buf::size(D, Dv));
    lay.width = lay.gemm ? BQ : lay.columns <= W ? W : wide;
    lay.tiles = (lay.columns + lay.width - 1) / lay.width;
    lay.chunk_keys = decode_chunk_keys<decode_block_k>(pr.keys, B * Hk * lay.tiles);
    lay.chunks = std::max<index_t>(1, (pr.keys + lay.chunk_keys - 1) / lay.chunk_keys);
    lay.partials = plan.partial_total;
    const index_t per_tile = lay.chunks * lay.width * partial_size<T>(Dv);
    for (index_t b = 0; b < B; ++b)
      for (index_t hk = 0; hk < Hk; ++hk)
        for (index_t t = 0; t < (plan.rows(lay, b * Hk + hk, lay.columns).count + lay.width - 1) / lay.width; ++t) {
          const index_t at = lay.partials + ((b * Hk + hk) * lay.tiles + t) * per_tile;
          const index_t merge = index_t(plan.merges.size());
          plan.merges.push_back({pi, b, hk, t, 0, at});
          for (index_t ch = 0; ch < lay.chunks; ++ch)
            plan.work.push_back({pi, b, hk, t, ch, at, merge});
        }
    plan.partial_total += B * Hk * lay.tiles * per_tile;
  }
  return plan;
}

/// Adds column (h, i) of batch row b, weighted in a head-sparse problem.
template <class S, class K, class V, class T>
void add_column(const dense_problem<S, K, V>& pr, index_t b, index_t h, index_t i,
                query_columns<T>& cols) noexcept {
  cols.add(pr.terms, pr.heads(), h, i);
  if (pr.row_weights.data()) cols.weight[cols.count - 1] = T(pr.row_weights(b, h, i));
}

/// Columns of decode tile t of (b, hk): entries [t * width, (t + 1) * width) of the
/// stacked columns r = g * Sq + i (query head hk * group + g, position i) it computes.
template <class S, class K, class V, class T>
void decode_columns(const dense_problem<S, K, V>& pr, const dense_layout& lay, const row_list& rows,
                    index_t b, index_t hk, index_t t, query_columns<T>& cols) noexcept {
  const index_t Sq = pr.queries(), group = pr.heads() / pr.kv.heads();
  start_columns(cols, pr.terms, b + pr.batch_base);
  const index_t end = std::min(rows.count, (t + 1) * lay.width);
  for (index_t e = t * lay.width; e < end; ++e)
    add_column(pr, b, hk * group + rows[e] / Sq, rows[e] % Sq, cols);
  cols.pad_to(lay.width);
}

/// Columns of prefill tile t of (b, h): query head h, positions rows[t * BQ + c].
template <class Backend, class S, class K, class V, class T>
void prefill_columns(const dense_problem<S, K, V>& pr, const row_list& rows, index_t b, index_t h,
                     index_t t, query_columns<T>& cols) noexcept {
  constexpr index_t BQ = prefill_buffers<T, Backend>::BQ;
  start_columns(cols, pr.terms, b + pr.batch_base);
  for (index_t e = t * BQ; e < std::min(rows.count, (t + 1) * BQ); ++e)
    add_column(pr, b, h, rows[e], cols);
  cols.pad_to(BQ);
}

/// Runs one prefill task: a query tile over all its keys (rows written), or over one chunk
/// of them (states stored for the merge).
template <class Backend, class S, class K, class V, class ScoreMod, class MaskMod>
void run_prefill_task(const dense_problem<S, K, V>& pr, const dense_layout& lay, const row_list& rows,
                      const dense_task& tk, const custom_variant<ScoreMod, MaskMod>& custom,
                      accumulator_t<S>* scratch, accumulator_t<S>* partials) {
  using T = accumulator_t<S>;
  using prefill_buf = prefill_buffers<T, Backend>;
  constexpr index_t BQ = prefill_buf::BQ;
  // A prefill tile over at most this many keys (agent attention's second stage) computes
  // for less time than its query rows and output rows take to arrive from memory.
  constexpr index_t short_tile_keys = 4 * prefill_buf::BK;
  const index_t D = pr.q.extent(3), Dv = pr.out.extent(3);
  const index_t i0 = tk.tile * BQ, n = std::min(BQ, pr.queries() - i0);
  paced_prefetch ahead;
  if (pr.keys <= short_tile_keys && rows.all) {  // little compute to hide a miss behind
    constexpr index_t size = sizeof(S);
    const index_t r0 = std::max<index_t>(0, i0 - BQ);  // the next task's queries
    ahead.add(pr.out.ptr(tk.b, tk.head, i0, 0), Dv * size, pr.out.stride(2) * size, n,
              prefetch_kind::write);  // this tile's output rows
    ahead.add(pr.q.ptr(tk.b, tk.head, r0, 0), D * size, pr.q.stride(2) * size, i0 - r0,
              prefetch_kind::l2);
  }
  query_columns<T> cols;
  prefill_columns<Backend>(pr, rows, tk.b, tk.head, tk.tile, cols);
  prefill_buf buf(scratch, D, Dv);
  const auto kv = pr.kv.source(tk.b, tk.head / pr.terms.group);
  auto q_row = [&](index_t c) { return pr.q.ptr(tk.b, tk.head, cols.pos[c], 0); };
  tile_options how{.with_lse = pr.lse.data() != nullptr,
                   .bf16_pairs = uses_bf16_pairs<Backend>(pr),
                   .stream_kv = pr.queries() <= BQ && pr.terms.group == 1,
                   .ahead = &ahead};
  if (lay.chunks > 1) {  // this task's chunk of the keys, kept as partial states
    how.from = tk.chunk * lay.chunk_keys;
    how.to = how.from + lay.chunk_keys;
    prefill_keys(cols, q_row, kv, pr.band, custom, D, Dv, buf, how);
    store_partials(cols, Dv, buf, partials + tk.partials + tk.chunk * BQ * partial_size<T>(Dv),
                   partial_size<T>(Dv));
    return;
  }
  prefill_tile<Backend>(
      cols, q_row, kv, pr.band, custom, D, Dv, buf,
      [&](index_t c, const T* row, T lse) {
        convert_row(row, pr.out.ptr(tk.b, tk.head, cols.pos[c], 0), Dv);
        if (pr.lse.data()) pr.lse(tk.b, tk.head, cols.pos[c]) = float(lse);
      },
      how);
}

/// Runs one decode task: a column tile of (b, kv head) over one key chunk, states stored.
/// `alone`: no other thread runs (see decode_value_group).
template <class Backend, class S, class K, class V, class ScoreMod, class MaskMod>
void run_decode_task(const dense_problem<S, K, V>& pr, const dense_layout& lay, const row_list& rows,
                     const dense_task& tk, const custom_variant<ScoreMod, MaskMod>& custom,
                     bool alone, accumulator_t<S>* scratch, accumulator_t<S>* partials) {
  using T = accumulator_t<S>;
  const index_t D = pr.q.extent(3), Dv = pr.out.extent(3);
  query_columns<T> cols;
  decode_columns(pr, lay, rows, tk.b, tk.head, tk.tile, cols);
  const index_t c0 = tk.chunk * lay.chunk_keys;
  T* states = partials + tk.partials + tk.chunk * lay.width * partial_size<T>(Dv);
  const auto kv = pr.kv.source(tk.b, tk.head);
  if (lay.gemm) {  // the prefill tile over this chunk's keys, its states kept
    prefill_buffers<T, Backend> buf(scratch, D, Dv);
    prefill_keys(cols, [&](index_t c) { return pr.q.ptr(tk.b, cols.head[c], cols.pos[c], 0); },
                 kv, pr.band, custom, D, Dv, buf,
                 {.bf16_pairs = uses_bf16_pairs<Backend>(pr), .stream_kv = true, .from = c0,
                  .to = c0 + lay.chunk_keys});
    store_partials(cols, Dv, buf, states, partial_size<T>(Dv));
    return;
  }
  decode_buffers<T, Backend> buf(scratch, D, Dv);
  constexpr index_t CQ = score_block_columns<T, Backend>();
  // float queries with bf16_products are bf16 queries: rounded here too, for the head
  // dims the decode tile scores in fp32 (D % 32 != 0), so the call is the bf16 call's
  const bool round_q = std::is_same_v<S, float> && uses_bf16_pairs<Backend>(pr);
  for (index_t c = 0; c < (cols.count + CQ - 1) / CQ * CQ; ++c) {  // zero-padded rows
    T* q = buf.q + c * buf.dq;
    const index_t n = c < cols.count ? D : 0;
    if (n > 0) convert_row(pr.q.ptr(tk.b, cols.head[c], cols.pos[c], 0), q, n);
    if (round_q)
      for (index_t d = 0; d < n; ++d) q[d] = T(bfloat16(q[d]));
    std::fill(q + n, q + buf.dq, T(0));
  }
  const auto [first, last] = pr.band.keys_for(cols.first_pos, cols.last_pos + 1);
  const index_t lo = std::max(first, c0), hi = std::min(last, c0 + lay.chunk_keys);
  decode_chunk<Backend>(cols, kv, pr.band, custom, D, Dv, lo, std::max(lo, hi), last, alone,
                        {.bf16_pairs = uses_bf16_pairs<Backend>(pr), .q8_0 = uses_q8_0_products(pr)},
                        buf, states);
}

/// Merges the chunk states of one tile in chunk order and writes its rows (and lse).
template <class Backend, class S, class K, class V>
void run_merge_task(const dense_problem<S, K, V>& pr, const dense_layout& lay, const row_list& rows,
                    const dense_task& tk, accumulator_t<S>* acc, const accumulator_t<S>* partials) {
  using T = accumulator_t<S>;
  const index_t Dv = pr.out.extent(3), stride = lay.width * partial_size<T>(Dv);
  query_columns<T> cols;
  if (pr.decode())
    decode_columns(pr, lay, rows, tk.b, tk.head, tk.tile, cols);
  else
    prefill_columns<Backend>(pr, rows, tk.b, tk.head, tk.tile, cols);
  for (index_t c = 0; c < cols.count; ++c) {
    T m, l;
    merge_partials(partials + tk.partials + c * partial_size<T>(Dv), stride, lay.chunks, Dv, m, l,
                   acc);
    const row_result<T> r = finish_row(m, l, cols.sink[c], pr.lse.data() != nullptr);
    S* row = pr.out.ptr(tk.b, cols.head[c], cols.pos[c], 0);
    const T factor = r.factor * cols.weight[c];
    for (index_t d = 0; d < Dv; ++d) row[d] = r.factor == T(0) ? S(0) : S(acc[d] * factor);
    if (pr.lse.data()) pr.lse(tk.b, cols.head[c], cols.pos[c]) = float(r.lse);
  }
}

/// A head-sparse problem's rows of weight 0: out 0, lse -inf.
template <class S, class K, class V>
void write_skipped_rows(const dense_problem<S, K, V>& pr) noexcept {
  if (!pr.row_weights.data()) return;
  const index_t Dv = pr.out.extent(3);
  for (index_t b = 0; b < pr.batch(); ++b)
    for (index_t h = 0; h < pr.heads(); ++h)
      for (index_t i = 0; i < pr.queries(); ++i) {
        if (pr.row_weights(b, h, i) != 0.0f) continue;
        S* row = pr.out.ptr(b, h, i, 0);
        for (index_t d = 0; d < Dv; ++d) row[d] = S(0);
        if (pr.lse.data()) pr.lse(b, h, i) = -std::numeric_limits<float>::infinity();
      }
}

/// Runs the problems on up to `threads` threads: plan_dense's tasks, each merge run by the
/// thread that finishes its last chunk (one parallel region: a second one for the merges,
/// microseconds of work, would add a barrier that waits for every thread to be scheduled
/// again, up to a time slice on a busy machine). The merge reads the chunks in their
/// order, so which thread runs it changes nothing.
template <class Backend, class S, class K, class V, class ScoreMod, class MaskMod>
void run_dense(std::span<const dense_problem<S, K, V>> problems,
               const custom_variant<ScoreMod, MaskMod>& custom, int threads) {
  using T = accumulator_t<S>;
  const dense_plan plan = plan_dense<Backend>(problems);
  for (const auto& pr : problems) write_skipped_rows(pr);
  if (plan.work.empty()) return;
  const int used = threads_for_work(std::max(threads, 1), plan.flops, index_t(plan.work.size()));
  const scratch_slices<T> buffers(used, plan.scratch);
  std::vector<T> partials(plan.partial_total);
  const auto pending = std::make_unique<std::atomic<index_t>[]>(plan.merges.size());
  for (std::size_t m = 0; m < plan.merges.size(); ++m)
    pending[m].store(plan.layouts[plan.merges[m].problem].chunks, std::memory_order_relaxed);
  parallel_for(index_t(plan.work.size()), used, [&](index_t i, int thread) {
    const dense_task& tk = plan.work[i];
    const dense_problem<S, K, V>& pr = problems[tk.problem];
    const dense_layout& lay = plan.layouts[tk.problem];
    const row_list rows = pr.decode()
                              ? plan.rows(lay, tk.b * pr.kv.heads() + tk.head, lay.columns)
                              : plan.rows(lay, tk.b * pr.heads() + tk.head, pr.queries());
    if (pr.decode())
      run_decode_task<Backend>(pr, lay, rows, tk, custom, used == 1, buffers.slice(thread),
                               partials.data());
    else
      run_prefill_task<Backend>(pr, lay, rows, tk, custom, buffers.slice(thread), partials.data());
    // The chunk's states are released to, and the last chunk acquires the others'.
    if (tk.merge >= 0 && pending[tk.merge].fetch_sub(1, std::memory_order_acq_rel) == 1)
      run_merge_task<Backend>(pr, lay, rows, plan.merges[tk.merge], buffers.slice(thread),
                              partials.data());
  });
}

}  // namespace fovea::detail
