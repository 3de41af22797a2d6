// Mixture-of-Head attention (Jin et al. 2024, "MoH: Multi-Head Attention as Mixture-of-Head
// Attention"): a router gives each token a weight per head; h_s shared heads are on for
// every token, and of the others each token keeps its top-k. A kept (token, head) row is
// softmax attention scaled by its weight; the rest output 0 and are never computed (the
// caller's W_O then sums the heads). It runs as the dense engine's head-sparse mode:
// query rows of weight 0 are left out of the tiles, so the cost follows the kept rows.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/error.hpp"
#include "../core/tensor_view.hpp"
#include "../engine/dense/dense.hpp"
#include "softmax.hpp"

namespace fovea {

struct moh_options {
  index_t shared_heads = 0;  ///< h_s: query heads [0, h_s) are on for every token
  index_t top_k = 0;         ///< routed heads on per token: the k largest weights of [h_s, H)
  softmax_options attention{};  ///< what softmax_attention takes (causal, window, lse, caches...)
};

namespace detail {

/// row_weights: (B, H, Sq), finite.
inline void check_row_weights(const tensor_view<const float, 3>& w, const char* name, index_t B,
                              index_t H, index_t Sq) {
  check_data(w, name);
  const index_t want[3] = {B, H, Sq};
  const char* what[3] = {"batch", "query heads", "queries"};
  for (std::size_t r = 0; r < 3; ++r)
    require(w.extent(r) == want[r], name, ": extent ", r, " (", what[r], ") is ", w.extent(r),
            ", expected ", want[r]);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Sq; ++i)
        require(std::isfinite(w(b, h, i)), name, ": element (", b, ", ", h, ", ", i, ") is ",
                w(b, h, i), ", expected a finite weight");
}

}  // namespace detail

/// Softmax attention computed only for the (batch, query head, query) rows whose weight
/// is not 0, each output row multiplied by its weight; rows of weight 0 are written 0
/// (lse -inf) and cost nothing. The head-sparse mode of the dense engine (query rows
/// skipped per head), on which moh_attention is built; any per-row gating works the same.
///
///   q: (B, H, Sq, D)  k: (B, Hk, Sk, D)  v: (B, Hk, Sk, Dv)  out: (B, H, Sq, Dv)
///   row_weights: (B, H, Sq) fp32, finite
///
/// Every option and type of softmax_attention applies, with its numerical contract per
/// computed row (the weight multiplies the row's 1/sum, so a NaN row stays NaN and a row
/// that sees no key stays 0). The lse, when asked for, is the row's own (unweighted).
/// Bitwise the same for every thread count. Throws fovea::error naming `row_weights` for a
/// wrong shape or a non-finite weight, before anything is written.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO,
          class ScoreMod = identity_score_mod, class MaskMod = keep_all_mask_mod>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void head_sparse_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                           tensor_view<TO, 4> out, tensor_view<const float, 3> row_weights,
                           const softmax_options& options = {},
                           const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  auto problem = detail::make_softmax_problem<TO>(q, k, v, out, options);
  detail::check_row_weights(row_weights, "row_weights", q.extent(0), q.extent(1), q.extent(2));
  detail::check_no_alias(out, "out", row_weights, "row_weights");
  problem.row_weights = row_weights;
  detail::run_dense<Backend>(std::span<const decltype(problem)>(&problem, 1), custom,
                             detail::resolve_threads(options.threads));
}

/// MoH's selection: rows (B, H, S) = head_weights(b, s, h) for the heads on at token s
/// (the shared heads [0, shared_heads), and the top_k routed heads of largest weight, the
/// lower head first on ties), 0 for the others. head_weights: (B, S, H) from the caller's
/// router (the paper's alpha-scaled softmaxes), finite. A head that is on with weight 0
/// outputs 0 like one that is off. Throws fovea::error naming the argument for shapes,
/// counts (shared_heads + top_k <= H) or non-finite weights.
inline void moh_row_weights(tensor_view<const float, 3> head_weights, index_t shared_heads,
                            index_t top_k, tensor_view<float, 3> rows) {
  using detail::require;
  detail::check_data(head_weights, "head_weights");
  detail::check_data(rows, "rows");
  const index_t B = head_weights.extent(0), S = head_weights.extent(1), H = head_weights.extent(2);
  require(shared_heads >= 0 && shared_heads <= H, "options.shared_heads: is ", shared_heads,
          ", expected 0 to ", H, " (the heads)");
  require(top_k >= 0 && top_k <= H - shared_heads, "options.top_k: is ", top_k, ", expected 0 to ",
          H - shared_heads, " (the routed heads)");
  require(rows.extent(0) == B && rows.extent(1) == H && rows.extent(2) == S, "rows: extents are (",
          rows.extent(0), ", ", rows.extent(1), ", ", rows.extent(2), "), expected (", B, ", ", H,
          ", ", S, ") (head_weights transposed)");
  for (index_t b = 0; b < B; ++b)
    for (index_t s = 0; s < S; ++s)
      for (index_t h = 0; h < H; ++h)
        require(std::isfinite(head_weights(b, s, h)), "head_weights: element (", b, ", ", s, ", ",
                h, ") is ", head_weights(b, s, h), ", expected a finite weight");
  std::vector<index_t> order(std::size_t(H - shared_heads));
  for (index_t b = 0; b < B; ++b)
    for (index_t s = 0; s < S; ++s) {
      for (index_t h = 0; h < H; ++h) rows(b, h, s) = h < shared_heads ? head_weights(b, s, h) : 0.0f;
      for (std::size_t r = 0; r < order.size(); ++r) order[r] = shared_heads + index_t(r);
      std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](index_t x, index_t y) {
        const float wx = head_weights(b, s, x), wy = head_weights(b, s, y);
        return wx > wy || (wx == wy && x < y);
      });
      for (index_t r = 0; r < top_k; ++r) rows(b, order[r], s) = head_weights(b, s, order[r]);
    }
}

/// Mixture-of-Head attention: each token's output row of query head h is
/// head_weights(b, s, h) * softmax attention, for the shared heads [0, shared_heads) and
/// the token's top_k routed heads (largest weight, lower head first on ties); the other
/// rows are 0 and never computed (head_sparse_attention over moh_row_weights). Sum the
/// heads through W_O outside.
///
///   q: (B, H, S, D)  k: (B, Hk, Sk, D)  v: (B, Hk, Sk, Dv)  out: (B, H, S, Dv)
///   head_weights: (B, S, H) fp32 (the router's output per token, as models lay it out)
///
/// Decoding (S = 1 against a cache) takes the decode path, stacking the kept heads of a
/// key/value head. Extra memory: B * H * S floats for the selection. Throws fovea::error
/// naming the argument (head_weights, options.shared_heads, options.top_k, or any of
/// softmax_attention's) before anything is written.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO,
          class ScoreMod = identity_score_mod, class MaskMod = keep_all_mask_mod>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void moh_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                   tensor_view<TO, 4> out, tensor_view<const float, 3> head_weights,
                   const moh_options& options, const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  const index_t B = q.extent(0), H = q.extent(1), S = q.extent(2);
  detail::require(head_weights.extent(0) == B && head_weights.extent(1) == S &&
                      head_weights.extent(2) == H,
                  "head_weights: extents are (", head_weights.extent(0), ", ",
                  head_weights.extent(1), ", ", head_weights.extent(2), "), expected (", B, ", ",
                  S, ", ", H, ") (batch, queries, query heads)");
  std::vector<float> rows(std::size_t(std::max<index_t>(0, B * H * S)));
  const auto selection = view<float, 3>(rows.data(), {B, H, S});
  moh_row_weights(head_weights, options.shared_heads, options.top_k, selection);
  head_sparse_attention<Backend>(q, k, v, out, tensor_view<const float, 3>(selection),
                                 options.attention, custom);
}

}  // namespace fovea
