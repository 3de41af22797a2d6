// fovea::landmark_select and fovea::landmark_attention: Landmark attention's inference form
// (Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for
// Transformers", NeurIPS 2023; reference epfml/landmark-attention). Keys come in blocks of
// L; each block has a landmark key (the model's own landmark token, or the block's mean
// key); a query scores the landmarks, retrieves its top-k blocks, and attends to them and
// to its local blocks with the paper's grouped softmax. On the block-sparse engine, one
// query per row: the grouped softmax is a plain softmax over the retrieved and local keys
// in which a retrieved key's logit gains s_c - lse_c (its block's landmark score minus the
// log-sum-exp of the block's logits), so the block's keys share exp(s_c) as one landmark.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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

struct landmark_options {
  index_t block_size = 64;   ///< L: keys per block, one landmark each
  index_t top_k = 8;         ///< blocks a query retrieves
  index_t local_blocks = 1;  ///< the query's own block and the local_blocks - 1 before it
  bool grouped = true;       ///< the paper's grouped softmax; false: one flat softmax
  /// (B, Hk, >= C, D), C the blocks the last query may retrieve: one landmark key per
  /// block (entries past C are not read). Empty: each block's mean key, computed here.
  tensor_view<const float, 4> landmarks{};
  std::optional<double> scale{};  ///< logit scale of keys and landmarks; default 1/sqrt(D)
  tensor_view<float, 3> lse{};    ///< out, optional (B, H, Sq)
  tensor_view<const float, 3> k_scale{}, v_scale{};  ///< int8 / fp8 caches, as softmax_options
  int threads = 0;                                   ///< 0: all OpenMP offers; 1: serial
};

/// What landmark_select retrieved: per (batch, query head, query) up to top_k block indices,
/// increasing. Reusable (a later decode step, another layer's call): landmark_attention
/// recomputes the retrieved blocks' weights for the query it is given.
struct landmark_selection {
  landmark_selection() = default;  // not an aggregate: {.member = ...} names the options
  index_t batches = 0, heads = 0, queries = 0, top_k = 0, block_size = 0;
  std::vector<std::int32_t> blocks;  ///< (batches, heads, queries, top_k); -1 unused
  std::vector<std::int32_t> counts;  ///< (batches, heads, queries)

  std::span<const std::int32_t> retrieved(index_t b, index_t h, index_t i) const {
    const index_t row = (b * heads + h) * queries + i;
    return {blocks.data() + row * top_k, std::size_t(counts[row])};
  }
};

namespace detail {

inline void check_landmark_options(const landmark_options& o) {
  require(o.block_size >= 1, "options.block_size: is ", o.block_size, ", expected >= 1");
  require(o.top_k >= 0, "options.top_k: is ", o.top_k, ", expected >= 0");
  require(o.local_blocks >= 1, "options.local_blocks: is ", o.local_blocks, ", expected >= 1");
  require(o.threads >= 0, "options.threads: is ", o.threads, ", expected >= 0");
}

/// Where a query at key position p reads: retrieved blocks are those below `local`, the
/// first of its local blocks; local keys are [local * L, p].
struct landmark_geometry {
  index_t L = 64, local_blocks = 1, offset = 0;  // query i sits at position i + offset
  index_t first_local(index_t i) const noexcept {
    const index_t p = i + offset;
    return p < 0 ? 0 : std::max<index_t>(0, p / L - (local_blocks - 1));
  }
};

/// mean[0, D) = the mean of the L rows staged[0, L x D) (the block's mean key).
template <class Backend, class T>
void block_mean(const T* staged, index_t L, index_t D, T* mean) noexcept {
  using V = vec<T, Backend>;
  const auto count = V::broadcast(T(L));
  const index_t whole = D - D % V::width;
  for (index_t d = 0; d < whole; d += V::width) {
    auto sum = V::broadcast(T(0));
    for (index_t j = 0; j < L; ++j) sum = V::add(sum, V::load(staged + j * D + d));
    V::store(mean + d, V::div(sum, count));
  }
  for (index_t d = whole; d < D; ++d) {
    T sum = 0;
    for (index_t j = 0; j < L; ++j) sum += staged[j * D + d];
    mean[d] = sum / T(L);
  }
}

/// A landmark per retrievable block: the caller's, or the blocks' mean keys in T.
template <class T, class K>
struct landmark_rows {
  std::vector<T> means;                 // (B, Hk, C, D) when computed
  tensor_view<const float, 4> given{};  // the caller's
  index_t C = 0, D = 0, Hk = 0;
  const T* row(index_t b, index_t hk, index_t c, T* staged) const {
    if (given.data() == nullptr) return means.data() + ((b * Hk + hk) * C + c) * D;
    const float* src = given.ptr(b, hk, c, 0);
    if constexpr (std::is_same_v<T, float>) {
      return src;
    } else {
      for (index_t d = 0; d < D; ++d) staged[d] = T(src[d]);
      return staged;
    }
  }
};

template <class Backend, class T, class K>
landmark_rows<T, K> make_landmarks(const kv_layout<K, K>& kv, const landmark_options& o, index_t B,
                                   index_t C, bool compute_means, int threads) {
  landmark_rows<T, K> lm;
  lm.C = C;
  lm.D = kv.dim();
  lm.Hk = kv.heads();
  const index_t D = lm.D, L = o.block_size;
  if (is_given(o.landmarks)) {
    const auto& g = o.landmarks;
    require(g.data() != nullptr || g.extent(0) * g.extent(1) * g.extent(2) * g.extent(3) == 0,
            "options.landmarks: data is null");
    require(g.extent(0) == B && g.extent(1) == lm.Hk && g.extent(2) >= C && g.extent(3) == D,
            "options.landmarks: is (", g.extent(0), ", ", g.extent(1), ", ", g.extent(2), ", ",
            g.extent(3), "), expected (", B, ", ", lm.Hk, ", >= ", C, ", ", D, ")");
    require(g.extent(3) <= 1 || g.stride(3) == 1, "options.landmarks: stride 3 is ", g.stride(3),
            ", expected 1 (contiguous rows)");
    lm.given = g;
    return lm;
  }
  if (!compute_means) return lm;
  lm.means.assign(std::size_t(B * lm.Hk * C * D), T(0));
  const int used = int(std::min<index_t>(std::max(threads, 1), std::max<index_t>(1, B * lm.Hk)));
  const scratch_slices<T> staged(used, L * D);
  parallel_for(B * lm.Hk, used, [&](index_t bh, int thread) {
    const auto src = kv.source(bh / lm.Hk, bh % lm.Hk);
    for (index_t c = 0; c < C; ++c) {
      stage_rows(src, true, c * L, L, D, D, staged.slice(thread));
      block_mean<Backend>(staged.slice(thread), L, D, lm.means.data() + (bh * C + c) * D);
    }
  });
  return lm;
}

/// log sum_j exp(scale * q . k_j) over block c's keys (NaN if a logit is NaN).
template <class Backend, class T, class K, class V>
T block_lse(const T* q, const kv_source<K, V>& src, index_t c, index_t L, index_t D, T scale,
            T* staged, T* logits) {
  stage_rows(src, true, c * L, L, D, D, staged);
  T top = -std::numeric_limits<T>::infinity();
  bool nan = false;
  for (index_t j = 0; j < L; ++j) {
    logits[j] = scale * dot_row<T, Backend>(q, staged + j * D, D);
    nan = nan || std::isnan(logits[j]);
    top = std::max(top, logits[j]);
  }
  if (nan) return std::numeric_limits<T>::quiet_NaN();
  if (top == -std::numeric_limits<T>::infinity()) return top;
  T sum = 0;
  for (index_t j = 0; j < L; ++j) sum += std::exp(logits[j] - top);
  return top + std::log(sum);
}

/// Per (b, h, query, slot): the retrieved block's logit offset s_c - lse_c (grouped), the
/// landmark scores s_c written by retrieval.
template <class T>
struct landmark_bias {
  const landmark_selection* sel = nullptr;
  const T* offset = nullptr;  // (B, H, Sq, top_k)
  landmark_geometry geo;

  T operator()(T score, index_t b, index_t h, index_t i, index_t j) const noexcept {
    const index_t block = j / geo.L;
    if (block >= geo.first_local(i)) return score;  // a local key
    const index_t row = (b * sel->heads + h) * sel->queries + i;
    const std::int32_t* first = sel->blocks.data() + row * sel->top_k;
    const std::int32_t* at = std::lower_bound(first, first + sel->counts[row], std::int32_t(block));
    return score + offset[at - sel->blocks.data()];
  }
};

/// Scores every retrievable landmark for the query heads of one key/value head at query i
/// (each landmark row loaded once for the group) and keeps each head's top_k; with
/// `offsets`, also each retrieved block's s_c - lse_c for the query.
template <class Backend, class S, class K>
void retrieve_for_query(const tensor_view<const S, 4>& q, const kv_layout<K, K>& kv,
                        const landmark_rows<accumulator_t<S>, K>& lm, const landmark_geometry& geo,
                        accumulator_t<S> scale, index_t b, index_t hk, index_t i,
                        accumulator_t<S>* work, landmark_selection& sel, accumulator_t<S>* offsets,
                        bool select) {
  using T = accumulator_t<S>;
  const index_t H = q.extent(1), D = q.extent(3), group = H / kv.heads(), L = geo.L;
  const index_t candidates = geo.first_local(i);
  T* const rows = work;                     // group x D: the query rows in T
  T* const scores = rows + group * D;       // group x C
  T* const staged = scores + group * lm.C;  // L x D
  T* const logits = staged + L * D;         // L
  T* const landmark_row = logits + L;       // D
  for (index_t g = 0; g < group; ++g)
    load_row(q.ptr(b, hk * group + g, i, 0), 1.0f, rows + g * D, D);
  if (select) {
    for (index_t c = 0; c < candidates; ++c) {
      const T* landmark = lm.row(b, hk, c, staged);
      for (index_t g = 0; g < group; ++g)
        scores[g * lm.C + c] = scale * dot_row<T, Backend>(rows + g * D, landmark, D);
    }
  }
  std::vector<std::int32_t> order;
  for (index_t g = 0; g < group; ++g) {
    const index_t h = hk * group + g, row = (b * H + h) * sel.queries + i;
    std::int32_t* const chosen = sel.blocks.data() + row * sel.top_k;
    if (select) {
      const T* s = scores + g * lm.C;
      order.clear();
      for (index_t c = 0; c < candidates; ++c)
        if (!std::isnan(s[c])) order.push_back(std::int32_t(c));
      const index_t keep = std::min<index_t>(sel.top_k, index_t(order.size()));
      std::partial_sort(
          order.begin(), order.begin() + keep, order.end(),
          [s](std::int32_t x, std::int32_t y) { return s[x] > s[y] || (s[x] == s[y] && x < y); });
      std::sort(order.begin(), order.begin() + keep);
      std::copy_n(order.begin(), keep, chosen);
      sel.counts[row] = std::int32_t(keep);
    }
    if (!offsets) continue;
    const auto src = kv.source(b, hk);
    for (index_t m = 0; m < sel.counts[row]; ++m) {
      const index_t c = chosen[m];
      T& off = offsets[row * sel.top_k + m];
      if (c >= candidates) {  // a reused selection's block that is local now: not read
        off = 0;
        continue;
      }
      const T lse = block_lse<Backend>(rows + g * D, src, c, L, D, scale, staged, logits);
      T landmark_score;
      if (select) {
        landmark_score = scores[g * lm.C + c];
      } else {  // a reused selection: the landmark given, or the mean of the rows just staged
        const T* landmark = lm.given.data() ? lm.row(b, hk, c, landmark_row) : landmark_row;
        if (!lm.given.data()) block_mean<Backend>(staged, L, D, landmark_row);
        landmark_score = scale * dot_row<T, Backend>(rows + g * D, landmark, D);
      }
      off = lse == -std::numeric_limits<T>::infinity() ? lse : landmark_score - lse;
    }
  }
}

/// How many blocks the last query may retrieve: the landmarks a call needs.
inline index_t retrievable_blocks(const landmark_geometry& geo, index_t Sq) {
  return Sq == 0 ? 0 : geo.first_local(Sq - 1);
}

/// Retrieval (select) and / or the grouped softmax's offsets for every query.
template <class Backend, class S, class K>
void run_landmark_queries(const tensor_view<const S, 4>& q, const kv_layout<K, K>& kv,
                          const landmark_options& o, const landmark_geometry& geo,
                          accumulator_t<S> scale, landmark_selection& sel,
                          std::vector<accumulator_t<S>>* offsets, bool select, int threads) {
  using T = accumulator_t<S>;
  const index_t B = q.extent(0), Sq = q.extent(2), D = q.extent(3), Hk = kv.heads();
  const index_t group = Hk ? q.extent(1) / Hk : 1;
  const index_t C = retrievable_blocks(geo, Sq);
  const auto lm = make_landmarks<Backend, T>(kv, o, B, C, select, threads);
  if (offsets) offsets->assign(sel.blocks.size(), T(0));
  const index_t tasks = B * Hk * Sq;
  const int used = int(std::min<index_t>(std::max(threads, 1), std::max<index_t>(1, tasks)));
  const scratch_slices<T> work(used, group * D + group * C + geo.L * D + geo.L + D);
  parallel_for(tasks, used, [&](index_t t, int thread) {
    retrieve_for_query<Backend>(q, kv, lm, geo, scale, t / (Hk * Sq), t / Sq % Hk, t % Sq,
                                work.slice(thread), sel, offsets ? offsets->data() : nullptr,
                                select);
  });
}

/// No block retrieved yet; room for top_k blocks per query, or for every block the last
/// query may retrieve when there are fewer.
inline landmark_selection empty_selection(index_t B, index_t H, index_t Sq, index_t Sk,
                                          const landmark_options& o) {
  landmark_selection sel;
  const landmark_geometry geo{o.block_size, o.local_blocks, Sk - Sq};
  sel.batches = B, sel.heads = H, sel.queries = Sq;
  sel.top_k = std::min(o.top_k, retrievable_blocks(geo, Sq));
  sel.block_size = o.block_size;
  sel.blocks.assign(std::size_t(B * H * Sq * sel.top_k), -1);
  sel.counts.assign(std::size_t(B * H * Sq), 0);
  return sel;
}

inline void check_landmark_selection(const landmark_selection& s, const landmark_options& o,
                                     index_t B, index_t H, index_t Sq, index_t Sk) {
  require(s.batches == B && s.heads == H && s.queries == Sq, "selection: is for (", s.batches, ", ",
          s.heads, ", ", s.queries, ") queries, expected (", B, ", ", H, ", ", Sq, ")");
  require(s.block_size == o.block_size, "selection: block size ", s.block_size,
          " differs from options.block_size (", o.block_size, ")");
  require(s.top_k >= 0 && index_t(s.counts.size()) == B * H * Sq &&
              index_t(s.blocks.size()) == B * H * Sq * s.top_k,
          "selection: blocks/counts sizes do not match its extents");
  const index_t complete = Sk / o.block_size;
  for (index_t r = 0; r < index_t(s.counts.size()); ++r) {
    require(s.counts[r] >= 0 && s.counts[r] <= s.top_k, "selection: count ", r, " is ", s.counts[r],
            ", expected 0 to ", s.top_k);
    const std::int32_t* b = s.blocks.data() + r * s.top_k;
    for (index_t m = 0; m < s.counts[r]; ++m)
      require(b[m] >= 0 && b[m] < complete && (m == 0 || b[m] > b[m - 1]), "selection: block ", m,
              " of row ", r, " is ", b[m], ", expected increasing blocks in [0, ", complete, ")");
  }
}

/// Attention over each query's retrieved blocks and local keys.
template <class Backend, class S, class K, class V>
void run_landmark_attention(const dense_problem<S, K, V>& pr, landmark_selection& sel,
                            const landmark_options& o, bool select, int threads) {
  using T = accumulator_t<S>;
  const landmark_geometry geo{o.block_size, o.local_blocks, pr.keys - pr.queries()};
  const kv_layout<K, K> keys{pr.kv.k, pr.kv.k, {}, pr.kv.k_scale, {}};
  std::vector<T> offsets;
  const T scale = pr.terms.scale;
  run_landmark_queries<Backend>(pr.q, keys, o, geo, scale, sel, o.grouped ? &offsets : nullptr,
                                select, threads);
  const index_t L = o.block_size;
  auto pieces_for = [&, L](index_t b, index_t h, index_t i, key_piece* pieces) {
    const index_t local = geo.first_local(i), p = i + geo.offset;
    if (p < 0) return index_t(0);
    index_t count = 0;
    for (const std::int32_t c : sel.retrieved(b, h, i))
      if (c < local) count = append_piece(pieces, count, c * L, (c + 1) * L, false);
    return append_piece(pieces, count, local * L, p + 1, false);
  };
  const sparse_rows rows{1, true, sel.top_k + 1};
  if (o.grouped)
    run_sparse<Backend>(pr, rows, pieces_for,
                        with_score_mod(landmark_bias<T>{&sel, offsets.data(), geo}), threads);
  else
    run_sparse<Backend>(pr, rows, pieces_for, custom_variant<>{}, threads);
}

}  // namespace detail

/// The mean key of every complete block of L keys: landmarks(b, hk, c, :) = mean of
/// k(b, hk, [c L, (c + 1) L), :) for c in [first_block, landmarks.extent(2)), so an engine
/// keeps them beside its cache and adds one per filled block (first_block = the blocks it
/// has). k of any cache type (dequantized); landmarks (B, Hk, C, D) float, C <= Sk / L.
template <class Backend = default_backend, class TK>
requires is_cache_type_v<std::remove_const_t<TK>>
void landmark_means(tensor_view<TK, 4> k, tensor_view<float, 4> landmarks, index_t block_size,
                    index_t first_block = 0, tensor_view<const float, 3> k_scale = {}) {
  using K = std::remove_const_t<TK>;
  const tensor_view<const K, 4> kc = k;
  detail::check_rows(kc, "k");
  detail::check_blocks(kc, "k");
  detail::require(block_size >= 1, "block_size: is ", block_size, ", expected >= 1");
  const index_t B = kc.extent(0), Hk = kc.extent(1), D = kc.extent(3);
  detail::require(landmarks.extent(0) == B && landmarks.extent(1) == Hk &&
                      landmarks.extent(2) <= kc.extent(2) / block_size && landmarks.extent(3) == D,
                  "landmarks: is (", landmarks.extent(0), ", ", landmarks.extent(1), ", ",
                  landmarks.extent(2), ", ", landmarks.extent(3), "), expected (", B, ", ", Hk,
                  ", <= ", kc.extent(2) / block_size, " complete blocks, ", D, ")");
  detail::require(first_block >= 0, "first_block: is ", first_block, ", expected >= 0");
  detail::check_cache_scales<K>(k_scale, "k_scale", B, Hk, kc.extent(2));
  detail::check_one_to_one(landmarks, "landmarks");
  detail::check_no_alias(landmarks, "landmarks", kc, "k");
  detail::check_no_alias(landmarks, "landmarks", k_scale, "k_scale");
  const detail::kv_layout<K, K> kv{kc, kc, {}, k_scale, {}};
  const detail::scratch_slices<float> work(1, (block_size + 1) * D);
  float* const staged = work.slice(0);
  float* const mean = staged + block_size * D;
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < Hk; ++h)
      for (index_t c = first_block; c < landmarks.extent(2); ++c) {
        detail::stage_rows(kv.source(b, h), true, c * block_size, block_size, D, D, staged);
        detail::block_mean<Backend>(staged, block_size, D, mean);
        for (index_t d = 0; d < D; ++d) landmarks(b, h, c, d) = mean[d];
      }
}

/// Landmark retrieval: per (batch, query head, query) the top_k blocks by landmark score.
///
///   q: (B, H, Sq, D)   k: (B, Hk, Sk, D), Hk dividing H; query i sits at key position
///   p = i + Sk - Sq (causal, bottom-right)
///
/// A query's local blocks are its own block and the local_blocks - 1 before it; it may
/// retrieve any block c below them (all complete); its landmark score is
/// s_c = scale * q . landmark_c (options.landmarks, or block c's mean key). It keeps the
/// top_k by score (ties to the lower block; NaN scores never kept), stored increasing.
/// Throws fovea::error naming the argument for misshapen q, k, landmarks or options.
template <class Backend = default_backend, class TQ, class TK>
requires detail::mixed_attention_types<TQ, TK, TK, std::remove_const_t<TQ>> landmark_selection
landmark_select(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, const landmark_options& options = {}) {
  using S = std::remove_const_t<TQ>;
  using K = std::remove_const_t<TK>;
  detail::check_landmark_options(options);
  const tensor_view<const S, 4> qc = q;
  const tensor_view<const K, 4> kc = k;
  const auto kv = detail::check_selection_inputs(qc, kc, options.k_scale);
  const detail::landmark_geometry geo{options.block_size, options.local_blocks,
                                      kc.extent(2) - q.extent(2)};
  landmark_selection sel =
      detail::empty_selection(q.extent(0), q.extent(1), q.extent(2), k.extent(2), options);
  using T = accumulator_t<S>;
  const T scale = T(options.scale.value_or(1.0 / std::sqrt(double(q.extent(3)))));
  detail::run_landmark_queries<Backend>(qc, kv, options, geo, scale, sel, nullptr, true,
                                        detail::resolve_threads(options.threads));
  return sel;
}

/// Landmark attention with a given selection. Query i at position p attends to the keys of
/// its retrieved blocks below its local blocks (a reused selection's blocks that are local
/// now are read as local keys) and to its local keys [first local block * L, p]:
///   grouped (the paper): weight(j local) = exp(s_j) / Z, weight(j in retrieved block c) =
///   exp(s_c) / Z * exp(s_j) / sum_{j' in c} exp(s_j'), Z = sum_local exp(s_j) +
///   sum_retrieved exp(s_c), s_j = scale * q . k_j and s_c the landmark score;
///   flat (options.grouped = false): one softmax over the retrieved and local keys.
/// options.lse gets log Z (grouped) or the flat softmax's lse. Same shapes, types (k and v
/// in any cache type, options.k_scale / v_scale) and guarantees as softmax_attention: a NaN
/// in q, or in a key a query reads, gives that row NaN; queries at positions below 0 see
/// no key: 0, lse -inf.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void landmark_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                        tensor_view<TO, 4> out, const landmark_selection& selection,
                        const landmark_options& options = {}) {
  detail::check_landmark_options(options);
  const auto pr =
      detail::make_softmax_problem<TO>(q, k, v, out, detail::sparse_softmax_options(options, true));
  detail::check_no_alias(out, "out", options.landmarks, "options.landmarks");
  detail::check_landmark_selection(selection, options, q.extent(0), q.extent(1), q.extent(2),
                                   k.extent(2));
  landmark_selection sel = selection;
  detail::run_landmark_attention<Backend>(pr, sel, options, false,
                                          detail::resolve_threads(options.threads));
}

/// Landmark attention: retrieval (landmark_select's), then attention over what it chose.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void landmark_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                        tensor_view<TO, 4> out, const landmark_options& options = {}) {
  detail::check_landmark_options(options);
  const auto pr =
      detail::make_softmax_problem<TO>(q, k, v, out, detail::sparse_softmax_options(options, true));
  detail::check_no_alias(out, "out", options.landmarks, "options.landmarks");
  landmark_selection sel =
      detail::empty_selection(q.extent(0), q.extent(1), q.extent(2), k.extent(2), options);
  detail::run_landmark_attention<Backend>(pr, sel, options, true,
                                          detail::resolve_threads(options.threads));
}

}  // namespace fovea
