// Spherical k-means for routing attention: l2-normalised rows, scores against unit-norm
// centroids (one GEMM), seeded Lloyd iterations, and balanced membership (the top-w rows
// of each cluster, in position order).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "../../core/tensor_view.hpp"
#include "../../simd/convert.hpp"
#include "../../simd/row_math.hpp"
#include "../../simd/transpose.hpp"
#include "../../simd/vec.hpp"
#include "../tile/gemm_tile.hpp"
#include "../tile/tile_traits.hpp"
#include "topk.hpp"

namespace fovea::detail {

/// dst[r] = x[r] / |x[r]| in T (rows of d, dst contiguous); an all-zero row stays zero.
template <class T, class Backend, class S>
void normalized_rows(const S* x, index_t row_stride, index_t rows, index_t d, T* dst) noexcept {
  using V = vec<T, Backend>;
  for (index_t r = 0; r < rows; ++r) {
    T* row = dst + r * d;
    convert_row(x + r * row_stride, row, d);
    const T norm = dot_row<T, Backend>(row, row, d);
    const T inv = norm > T(0) ? T(1) / std::sqrt(norm) : T(0);
    const auto scale = V::broadcast(inv);
    index_t e = 0;
    for (; e + V::width <= d; e += V::width) V::store(row + e, V::mul(V::load(row + e), scale));
    for (; e < d; ++e) row[e] *= inv;
  }
}

/// Centroids transposed for the score GEMM: mu_t[e][c] = mu[c][e], columns padded to ld.
template <class T>
void transpose_centroids(const T* mu, index_t clusters, index_t d, index_t ld, T* mu_t) noexcept {
  for (index_t e = 0; e < d; ++e)
    for (index_t c = 0; c < ld; ++c) mu_t[e * ld + c] = c < clusters ? mu[c * d + e] : T(0);
}

/// The padded column count of a score matrix with `clusters` columns.
template <class T, class Backend>
constexpr index_t score_columns(index_t clusters) noexcept {
  constexpr index_t W = vec<T, Backend>::width;
  return (clusters + W - 1) / W * W;
}

/// scores[r][c] = x[r] . mu[c] for rows of x (n x d) and mu_t as transpose_centroids made.
template <class T, class Backend>
void centroid_scores(const T* x, index_t n, index_t d, const T* mu_t, index_t ld,
                     T* scores) noexcept {
  constexpr int W = vec<T, Backend>::width, RB = tile_traits<T, Backend>::row_block;
  gemm_wide<T, Backend, RB, 4, false>(n, ld / W, x, d, 1, mu_t, ld, scores, ld, d);
}

/// The cluster of highest score per row (ties: the lower cluster). NaN scores are passed
/// over; a row whose every score is NaN (or -inf) goes to cluster 0. Vector lanes find the
/// row's maximum, then the first cluster holding it: the same choice as a scalar scan.
template <class T, class Backend>
void assign_rows(const T* scores, index_t n, index_t clusters, index_t ld,
                 index_t* assignment) noexcept {
  using V = vec<T, Backend>;
  constexpr T lowest = -std::numeric_limits<T>::infinity();
  for (index_t r = 0; r < n; ++r) {
    const T* row = scores + r * ld;
    auto top_lanes = V::broadcast(lowest);
    index_t c = 0;
    for (; c + V::width <= clusters; c += V::width) {
      const auto x = V::load(row + c);
      top_lanes = V::select(V::greater(x, top_lanes), x, top_lanes);  // NaN never wins
    }
    T top = V::reduce_max(top_lanes);
    for (; c < clusters; ++c) top = row[c] > top ? row[c] : top;
    index_t best = 0;
    if (top > lowest)
      while (!(row[best] == top)) ++best;
    assignment[r] = best;
  }
}

/// One Lloyd step on unit vectors: each centroid becomes the normalised mean of its rows;
/// a centroid with no rows keeps its place. Rows holding NaN or Inf move no centroid, and
/// a centroid seeded from such a row, left with no rows, becomes the zero vector (it then
/// scores 0 against every row): one poisoned key cannot pull every key into one cluster.
/// sums: clusters x d; counts: clusters.
template <class T, class Backend>
void recentre(const T* x, index_t n, index_t d, const index_t* assignment, T* mu, index_t clusters,
              T* sums, index_t* counts) noexcept {
  std::fill(sums, sums + clusters * d, T(0));
  std::fill(counts, counts + clusters, 0);
  for (index_t r = 0; r < n; ++r) {
    const T* row = x + r * d;
    if (!all_finite<T, Backend>(row, d, 1, d)) continue;
    ++counts[assignment[r]];
    add_row<T, Backend>(row, sums + assignment[r] * d, d);
  }
  for (index_t c = 0; c < clusters; ++c) {
    T* centre = mu + c * d;
    if (counts[c] > 0)
      normalized_rows<T, Backend>(sums + c * d, d, 1, d, centre);
    else if (!all_finite<T, Backend>(centre, d, 1, d))
      std::fill(centre, centre + d, T(0));
  }
}

/// Rows a Lloyd step scores and assigns at a time (see seeded_centroids).
template <class T, class Backend>
constexpr index_t kmeans_block_rows() noexcept {
  return 32 * tile_traits<T, Backend>::row_block;
}

/// Seeded centroids for the rows x (n x d, unit norm): `clusters` distinct rows chosen at
/// random, then `iterations` Lloyd steps. Needs clusters <= n. Scratch: scores
/// (min(n, kmeans_block_rows) x ld), mu_t (d x ld), sums (clusters x d), assignment (n),
/// counts (clusters), picks (n).
template <class T, class Backend>
void seeded_centroids(const T* x, index_t n, index_t d, index_t clusters, index_t iterations,
                      std::uint64_t seed, T* mu, T* scores, T* mu_t, T* sums, index_t* assignment,
                      index_t* counts, index_t* picks) noexcept {
  std::mt19937_64 gen(seed);
  for (index_t r = 0; r < n; ++r) picks[r] = r;
  for (index_t c = 0; c < clusters; ++c) {  // a partial Fisher-Yates shuffle
    const index_t other = c + index_t(gen() % std::uint64_t(n - c));
    std::swap(picks[c], picks[other]);
    std::copy(x + picks[c] * d, x + picks[c] * d + d, mu + c * d);
  }
  const index_t ld = score_columns<T, Backend>(clusters);
  // Rows are scored a block at a time and assigned while their scores are in cache (the
  // whole n x ld matrix, 64 MB at n = 65536 and 256 clusters, would go to memory and back
  // each step); each score is the same either way.
  constexpr index_t block = kmeans_block_rows<T, Backend>();
  for (index_t it = 0; it < iterations; ++it) {
    transpose_centroids(mu, clusters, d, ld, mu_t);
    for (index_t r0 = 0; r0 < n; r0 += block) {
      const index_t rows = std::min(block, n - r0);
      centroid_scores<T, Backend>(x + r0 * d, rows, d, mu_t, ld, scores);
      assign_rows<T, Backend>(scores, rows, clusters, ld, assignment + r0);
    }
    recentre<T, Backend>(x, n, d, assignment, mu, clusters, sums, counts);
  }
}

/// scores_t[c][r] = mu[c] . x[r] for clusters c (mu: clusters x d) and the rows of x as
/// transpose_rows laid them out (x_t: d x ld). The same products, in the same order, as
/// centroid_scores, one cluster's scores contiguous.
template <class T, class Backend>
void member_scores(const T* mu, index_t clusters, index_t d, const T* x_t, index_t ld,
                   T* scores_t) noexcept {
  constexpr int W = vec<T, Backend>::width, RB = tile_traits<T, Backend>::row_block;
  constexpr index_t strip = 64 * W;  // columns of x_t kept in cache while every cluster uses them
  for (index_t r0 = 0; r0 < ld; r0 += strip)
    gemm_wide<T, Backend, RB, 4, false>(clusters, std::min(strip, ld - r0) / W, mu, d, 1, x_t + r0,
                                        ld, scores_t + r0, ld, d);
}

/// members[c * w + m], m < w: the w rows of highest score for cluster c (ties: the lower
/// row; scores compared as float, NaN highest), in increasing row order, from scores_t as
/// member_scores made them. keys: 2 n scratch entries. The scores' order keys are made in
/// vector lanes (order_key; at -O2 GCC left the scalar loop unvectorised, a fifth of
/// routing's time); the w-th largest key then splits the rows: all above it, and the
/// first ones equal to it.
template <class T, class Backend>
void balanced_members(const T* scores_t, index_t n, index_t clusters, index_t ld, index_t w,
                      index_t* members, std::uint32_t* keys) noexcept {
  using V = vec<float, Backend>;
  for (index_t c = 0; c < clusters; ++c) {
    const T* score = scores_t + c * ld;
    index_t r = 0;
    if constexpr (std::is_same_v<T, float>)
      for (; r + V::width <= n; r += V::width) V::store_order_keys(keys + r, V::load(score + r));
    for (; r < n; ++r) keys[r] = order_key(float(score[r]));
    index_t above = 0;
    const std::uint32_t bar = kth_largest(keys, n, w, keys + n, &above);
    index_t* out = members + c * w;
    index_t ties = w - above;  // rows equal to the bar that make the cut, lowest first
    for (index_t i = 0; i < n; ++i) {
      const bool tie = keys[i] == bar;
      if (keys[i] > bar || (tie && ties > 0)) *out++ = i;
      ties -= tie;
    }
  }
}

}  // namespace fovea::detail
