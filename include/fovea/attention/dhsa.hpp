// fovea::dhsa_select and fovea::dhsa_attention: Dynamic Hierarchical Sparse Attention
// (Xiong, Zou, et al., "Long-Context Modeling with Dynamic Hierarchical Sparse Attention
// for On-Device LLMs", NeurIPS 2025, arXiv 2510.24606). The sequence is cut into chunks
// (the paper's learned boundary predictor stays with the caller: pass its boundaries, or
// take equal chunks); each chunk is summarised by its length-normalised sums of q rows and
// of k rows; the chunk-to-chunk similarities, upsampled to tokens, rank the keys of each
// query; each query attends to its top keys (whole chunks) on the block-sparse engine, one
// block per query chunk.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <span>
#include <vector>

#include "../core/error.hpp"
#include "../core/parallel.hpp"
#include "../core/scratch.hpp"
#include "../core/tensor_view.hpp"
#include "../engine/kv/stage.hpp"
#include "../engine/sparse/sparse.hpp"
#include "../simd/backend.hpp"
#include "../simd/row_math.hpp"
#include "softmax.hpp"

namespace fovea {

struct dhsa_options {
  /// true: bottom-right aligned, as softmax_options::causal. false: a query sees its kept
  /// chunks whole; queries still sit at key positions i + Sk - Sq (chunks are of positions),
  /// so with Sq > Sk the first Sq - Sk queries belong to no chunk and see no key.
  bool causal = true;
  /// Chunk starts over the key positions: 0 = b_0 < b_1 < ... < b_C = Sk (C + 1 entries),
  /// shared by every batch row and head. Empty: chunks of chunk_size keys (the last shorter).
  std::span<const index_t> boundaries{};
  index_t chunk_size = 64;
  /// N_b: the most keys a query keeps (its own chunk counted in full).
  index_t top_keys = 2048;
  std::optional<double> scale{};                     ///< attention logit scale; default 1/sqrt(D)
  tensor_view<float, 3> lse{};                       ///< out, optional (B, H, Sq)
  tensor_view<const float, 3> k_scale{}, v_scale{};  ///< int8 / fp8 caches, as softmax_options
  int threads = 0;                                   ///< 0: all OpenMP offers; 1: serial
};

/// What dhsa_select chose: per (batch, query head, query chunk) the sorted indices of the
/// key chunks its queries attend to. Reusable across decode steps: keys appended after the
/// last boundary join the last chunk (the open chunk), and so do queries past it.
struct dhsa_selection {
  dhsa_selection() = default;  // not an aggregate: {.member = ...} names the options
  index_t batches = 0, heads = 0;
  std::vector<index_t> boundaries;    ///< chunk starts, C + 1 entries
  std::vector<std::int32_t> offsets;  ///< (batches * heads * C) + 1 entries, CSR
  std::vector<std::int32_t> indices;  ///< per row: increasing key-chunk indices

  index_t chunks() const noexcept { return index_t(boundaries.size()) - 1; }
  std::span<const std::int32_t> kept(index_t b, index_t h, index_t chunk) const {
    const index_t row = (b * heads + h) * chunks() + chunk;
    return {indices.data() + offsets[row], std::size_t(offsets[row + 1] - offsets[row])};
  }
  /// The chunk of key position `pos` (the last for positions past the last boundary).
  index_t chunk_of(index_t pos) const noexcept {
    const auto it = std::upper_bound(boundaries.begin(), boundaries.end() - 1, pos);
    return index_t(it - boundaries.begin()) - 1;
  }
};

namespace detail {

inline void check_dhsa_options(const dhsa_options& o) {
  require(o.chunk_size >= 1, "options.chunk_size: is ", o.chunk_size, ", expected >= 1");
  require(o.top_keys >= 1, "options.top_keys: is ", o.top_keys, ", expected >= 1");
  require(o.threads >= 0, "options.threads: is ", o.threads, ", expected >= 0");
}

/// The chunk starts: the caller's (checked against Sk) or equal chunks.
inline std::vector<index_t> dhsa_boundaries(const dhsa_options& o, index_t Sk) {
  if (o.boundaries.empty()) {
    std::vector<index_t> b;
    for (index_t s = 0; s < Sk; s += o.chunk_size) b.push_back(s);
    b.push_back(Sk);
    return b;
  }
  const auto& b = o.boundaries;
  require(b.front() == 0, "options.boundaries: entry 0 is ", b.front(), ", expected 0");
  require(b.back() == Sk, "options.boundaries: last entry is ", b.back(),
          ", expected the key count ", Sk);
  for (std::size_t c = 1; c < b.size(); ++c)
    require(b[c] > b[c - 1], "options.boundaries: entry ", c, " (", b[c], ") is not above entry ",
            c - 1, " (", b[c - 1], ")");
  return {b.begin(), b.end()};
}

/// The engine's query blocks: block 0 holds the queries before every chunk (positions
/// below 0 when Sq > Sk: they see no key), block c + 1 the queries of chunk c.
inline std::vector<index_t> dhsa_query_starts(const std::vector<index_t>& boundaries, index_t Sq,
                                              index_t Sk) {
  const index_t off = Sk - Sq, chunks = index_t(boundaries.size()) - 1;
  std::vector<index_t> starts{0};
  for (index_t c = 0; c < chunks; ++c)
    starts.push_back(std::clamp(boundaries[c] - off, index_t(0), Sq));
  starts.push_back(Sq);
  return starts;
}

/// rep[c] = (sum of the rows of chunk c that `row(i)` gives) / sqrt(their count), for
/// the positions [first[c], first[c + 1]) of a row range; rows(c) counts them.
template <class T, class Backend, class Row>
void chunk_sums(const std::vector<index_t>& first, index_t D, T* rep, Row&& row) {
  const index_t chunks = index_t(first.size()) - 1;
  for (index_t c = 0; c < chunks; ++c) {
    T* out = rep + c * D;
    std::fill(out, out + D, T(0));
    for (index_t i = first[c]; i < first[c + 1]; ++i) row(i, out);
    const index_t n = first[c + 1] - first[c];
    if (n > 0) {
      const T norm = T(1) / std::sqrt(T(n));
      for (index_t d = 0; d < D; ++d) out[d] *= norm;
    }
  }
}

template <class Backend, class S, class K>
dhsa_selection run_dhsa_select(const tensor_view<const S, 4>& q, const kv_layout<K, K>& kv,
                               const dhsa_options& o, std::vector<index_t> boundaries,
                               int threads) {
  using T = accumulator_t<S>;
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), D = q.extent(3);
  const index_t Hk = kv.k.extent(1), Sk = kv.k.extent(2), group = Hk ? H / Hk : 1;
  const index_t C = index_t(boundaries.size()) - 1;
  dhsa_selection sel;
  sel.batches = B;
  sel.heads = H;
  sel.boundaries = std::move(boundaries);
  const std::vector<index_t> starts = dhsa_query_starts(sel.boundaries, Sq, Sk);
  const std::vector<index_t> query_first(starts.begin() + 1, starts.end());
  const index_t rows = B * H * C;
  // Key chunk representations, one task per (batch, key/value head).
  std::vector<T> key_rep(std::size_t(B * Hk * C * D));
  const int used = int(std::min<index_t>(std::max(threads, 1), std::max<index_t>(B * Hk, 1)));
  const scratch_slices<T> staged(used, D);
  parallel_for(B * Hk, used, [&](index_t bh, int thread) {
    const auto src = kv.source(bh / Hk, bh % Hk);
    T* const row = staged.slice(thread);
    chunk_sums<T, Backend>(sel.boundaries, D, key_rep.data() + bh * C * D, [&](index_t j, T* acc) {
      stage_rows(src, true, j, 1, D, D, row);
      add_row<T, Backend>(row, acc, D);
    });
  });
  // Per (batch, query head): query chunk representations, similarities, the ranking.
  std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(rows));
  const int row_threads = int(std::min<index_t>(std::max(threads, 1), std::max<index_t>(B * H, 1)));
  const scratch_slices<T> reps(row_threads, C * D + 2 * C);
  parallel_for(B * H, row_threads, [&](index_t bh, int thread) {
    const index_t b = bh / H, h = bh % H;
    T* const query_rep = reps.slice(thread);
    T* const sim = query_rep + C * D;
    chunk_sums<T, Backend>(query_first, D, query_rep, [&](index_t i, T* acc) {
      add_row<T, Backend>(q.ptr(b, h, i, 0), acc, D);
    });
    const T* keys = key_rep.data() + (b * Hk + h / group) * C * D;
    std::vector<std::int32_t> order;
    for (index_t a = 0; a < C; ++a) {
      auto& row = kept[std::size_t(bh * C + a)];
      if (query_first[a] == query_first[a + 1]) continue;  // no query in this chunk
      const index_t last = o.causal ? a : C - 1;           // key chunks in the causal range
      order.clear();
      for (index_t c = 0; c <= last; ++c) {
        if (c == a) continue;
        const T s = dot_row<T, Backend>(query_rep + a * D, keys + c * D, D);
        sim[c] = std::isnan(s) ? -std::numeric_limits<T>::infinity() : s;
        order.push_back(std::int32_t(c));
      }
      // Highest similarity first; ties (and NaN, ranked last) by position.
      std::stable_sort(order.begin(), order.end(),
                       [sim](std::int32_t x, std::int32_t y) { return sim[x] > sim[y]; });
      const auto length = [&](index_t c) { return sel.boundaries[c + 1] - sel.boundaries[c]; };
      row.push_back(std::int32_t(a));  // the query's own chunk: always, counted in full
      index_t budget = o.top_keys - length(a);
      for (const std::int32_t c : order)
        if (length(c) <= budget) {
          row.push_back(c);
          budget -= length(c);
        }
      std::sort(row.begin(), row.end());
    }
  });
  sel.offsets.assign(std::size_t(rows + 1), 0);
  for (index_t r = 0; r < rows; ++r) {
    sel.offsets[r + 1] = sel.offsets[r] + std::int32_t(kept[r].size());
    sel.indices.insert(sel.indices.end(), kept[r].begin(), kept[r].end());
  }
  return sel;
}

/// A selection made for these shapes: same batches and heads, boundaries within the keys.
inline void check_dhsa_selection(const dhsa_selection& s, index_t B, index_t H, index_t Sq,
                                 index_t Sk) {
  require(s.batches == B && s.heads == H, "selection: is for ", s.batches, " batch rows and ",
          s.heads, " heads, expected ", B, " and ", H);
  const index_t C = s.chunks();
  require(C >= 0 && s.boundaries.front() == 0 && s.boundaries.back() <= Sk,
          "selection: boundaries end at ", s.boundaries.empty() ? -1 : s.boundaries.back(),
          ", expected 0 first and at most the key count ", Sk);
  for (index_t c = 1; c <= C; ++c)
    require(s.boundaries[c] > s.boundaries[c - 1], "selection: boundaries not increasing at ", c);
  require(index_t(s.offsets.size()) == B * H * C + 1 && s.offsets[0] == 0 &&
              index_t(s.offsets.back()) == index_t(s.indices.size()),
          "selection: offsets do not match its extents");
  for (index_t r = 0; r < B * H * C; ++r) {
    require(s.offsets[r] <= s.offsets[r + 1], "selection: offsets decrease at row ", r);
    for (index_t e = s.offsets[r]; e < s.offsets[r + 1]; ++e)
      require(s.indices[e] >= 0 && s.indices[e] < C &&
                  (e == s.offsets[r] || s.indices[e] > s.indices[e - 1]),
              "selection: row ", r, " entry ", e - s.offsets[r], " is ", s.indices[e],
              ", expected increasing chunks in [0, ", C, ")");
  }
  // A chunk that holds queries now but held none when the selection was made kept nothing.
  const std::vector<index_t> starts = dhsa_query_starts(s.boundaries, Sq, Sk);
  for (index_t c = 0; c < C; ++c)
    if (starts[c + 2] > starts[c + 1])
      for (index_t r = 0; r < B * H; ++r)
        require(s.offsets[r * C + c + 1] > s.offsets[r * C + c], "selection: query chunk ", c,
                " of row ", r,
                " has queries but keeps no chunk (the selection was made without "
                "them: select with the queries it will attend)");
}

/// Every query chunk attends to its kept key chunks (the last one open to Sk).
template <class Backend, class S, class K, class V>
void run_dhsa_attention(const dense_problem<S, K, V>& pr, const dhsa_selection& sel, int threads) {
  const index_t Sq = pr.queries(), Sk = pr.keys, C = sel.chunks();
  const std::vector<index_t> starts = dhsa_query_starts(sel.boundaries, Sq, Sk);
  index_t longest = 1;
  for (index_t r = 0; r + 1 < index_t(sel.offsets.size()); ++r)
    longest = std::max<index_t>(longest, sel.offsets[r + 1] - sel.offsets[r]);
  sparse_rows rows{1, true, longest};
  rows.query_starts = starts;
  auto select = [&](index_t b, index_t h, index_t block, key_piece* pieces) {
    if (block == 0) return index_t(0);  // queries before every chunk
    index_t count = 0;
    for (const std::int32_t c : sel.kept(b, h, block - 1)) {
      const index_t last = c + 1 == C ? Sk : sel.boundaries[c + 1];
      count = append_piece(pieces, count, sel.boundaries[c], last, false);
    }
    return count;
  };
  run_sparse<Backend>(pr, rows, select, custom_variant<>{}, threads);
}

}  // namespace detail

/// DHSA's key selection for every (batch, query head, query chunk), from q and k only.
///
///   q: (B, H, Sq, D)   k: (B, Hk, Sk, D), Hk dividing H; query i sits at key position
///   i + Sk - Sq (bottom-right, as causal attention aligns them)
///
/// Chunk c's representations are (sum of its q rows) / sqrt(their count) and (sum of its
/// k rows) / sqrt(its length), the paper's length-normalised aggregation (only the query
/// rows present in q are summed). Query chunk a ranks the key chunks of its range (c < a
/// when causal, every other chunk otherwise) by Q_a . K_c, the token-level similarity
/// being constant over a chunk pair; it keeps its own chunk, then, in rank order, every
/// chunk that still fits in options.top_keys keys (N_b), so a query keeps whole chunks and
/// at most max(N_b, its chunk's length) keys. Ties and NaN similarities (ranked last) go by
/// position. k may be of any cache type softmax_attention reads (quantized keys are
/// dequantized for the sums). Throws fovea::error naming the argument for misshapen q, k,
/// scales, boundaries or options.
template <class Backend = default_backend, class TQ, class TK>
requires detail::mixed_attention_types<TQ, TK, TK, std::remove_const_t<TQ>> dhsa_selection
dhsa_select(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, const dhsa_options& options = {}) {
  using S = std::remove_const_t<TQ>;
  using K = std::remove_const_t<TK>;
  detail::check_dhsa_options(options);
  const tensor_view<const S, 4> qc = q;
  const tensor_view<const K, 4> kc = k;
  const auto kv = detail::check_selection_inputs(qc, kc, options.k_scale);
  return detail::run_dhsa_select<Backend>(qc, kv, options,
                                          detail::dhsa_boundaries(options, kc.extent(2)),
                                          detail::resolve_threads(options.threads));
}

/// DHSA attention with a given selection: query i attends to the keys of the chunks kept
/// for its chunk (clipped by causality), with one online softmax; options.boundaries and
/// options.top_keys are not read (the selection holds its own). Same shapes, types (k and v
/// in any cache type, options.k_scale / v_scale for int8 and fp8) and guarantees as
/// softmax_attention; queries at positions below 0 (Sq > Sk) see no key: 0, lse -inf.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void dhsa_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                    tensor_view<TO, 4> out, const dhsa_selection& selection,
                    const dhsa_options& options = {}) {
  detail::check_dhsa_options(options);
  const auto pr = detail::make_softmax_problem<TO>(
      q, k, v, out, detail::sparse_softmax_options(options, options.causal));
  detail::check_dhsa_selection(selection, q.extent(0), q.extent(1), q.extent(2), k.extent(2));
  detail::run_dhsa_attention<Backend>(pr, selection, detail::resolve_threads(options.threads));
}

/// DHSA attention: dhsa_select, then attention over what it chose.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void dhsa_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                    tensor_view<TO, 4> out, const dhsa_options& options = {}) {
  detail::check_dhsa_options(options);
  const auto pr = detail::make_softmax_problem<TO>(
      q, k, v, out, detail::sparse_softmax_options(options, options.causal));
  const int threads = detail::resolve_threads(options.threads);
  using K = std::remove_const_t<TK>;
  const detail::kv_layout<K, K> keys{pr.kv.k, pr.kv.k, {}, pr.kv.k_scale, {}};
  const dhsa_selection sel = detail::run_dhsa_select<Backend>(
      pr.q, keys, options, detail::dhsa_boundaries(options, k.extent(2)), threads);
  detail::run_dhsa_attention<Backend>(pr, sel, threads);
}

}  // namespace fovea
