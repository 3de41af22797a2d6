// fovea::routing_attention: content-based sparse attention with online k-means (Roy et al.
// 2020, "Efficient Content-Based Sparse Attention with Routing Transformers"; reference
// lucidrains/routing-transformer). Tokens are routed to unit-norm centroids; each cluster
// takes its `window` best-matching tokens and attends among them; a token's output is the
// mean over the clusters it belongs to.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <vector>

#include "../core/error.hpp"
#include "../core/parallel.hpp"
#include "../core/scratch.hpp"
#include "../core/storage.hpp"
#include "../core/tensor_view.hpp"
#include "../core/validate.hpp"
#include "../engine/sparse/gathered.hpp"
#include "../engine/select/kmeans.hpp"
#include "../engine/sparse/sparse.hpp"
#include "../simd/backend.hpp"
#include "checks.hpp"
#include "softmax.hpp"

namespace fovea {

struct routing_options {
  bool causal = false;            ///< bottom-right aligned; membership still sees every token
  index_t num_clusters = 16;      ///< centroids per head
  index_t window = 256;           ///< members per cluster (fewer only when there are fewer tokens)
  bool shared_qk = false;         ///< route q only; keys are l2norm(k) (pass k = q); no self pair
  index_t kmeans_iterations = 3;  ///< Lloyd steps when the call clusters its own tokens
  std::uint64_t seed = 0;         ///< seeds those centroids
  std::optional<double> scale{};  ///< default 1/sqrt(D)
  index_t local_heads = 0;  ///< heads [0, local_heads) attend to a local window of `window` keys
  int threads = 0;          ///< 0: all OpenMP offers; 1: serial
};

/// Unit-norm centroids per head, (heads, clusters, dim), for callers that keep them
/// across calls and train them online (EMA k-means).
class routing_centroids {
 public:
  routing_centroids() = default;
  routing_centroids(index_t heads, index_t clusters, index_t dim)
      : heads_(heads), clusters_(clusters), dim_(dim), mu_(std::size_t(heads * clusters * dim)) {
    detail::require(heads >= 1 && clusters >= 1 && dim >= 1, "routing_centroids: extents (", heads,
                    ", ", clusters, ", ", dim, ") must all be >= 1");
  }
  index_t heads() const noexcept { return heads_; }
  index_t clusters() const noexcept { return clusters_; }
  index_t dim() const noexcept { return dim_; }
  tensor_view<const float, 3> view() const noexcept {
    return fovea::view<const float, 3>(mu_.data(), {heads_, clusters_, dim_});
  }
  const float* centroid(index_t h, index_t c) const noexcept {
    return mu_.data() + (h * clusters_ + c) * dim_;
  }
  float* centroid(index_t h, index_t c) noexcept { return mu_.data() + (h * clusters_ + c) * dim_; }

  /// Seeded start from x (B, heads, S, dim): per head, `clusters` distinct random tokens of
  /// batch row 0 (normalised), then `iterations` Lloyd steps over them.
  template <class TX>
  void init(tensor_view<TX, 4> x, index_t iterations = 3, std::uint64_t seed = 0) {
    using S = std::remove_const_t<TX>;
    check_x(x, "x");
    const index_t n = x.extent(2);
    detail::require(x.extent(0) >= 1 && n >= clusters_, "x: has ", x.extent(0), " batch rows of ",
                    n, " tokens; init needs one row of at least the ", clusters_, " clusters");
    detail::require(iterations >= 0, "iterations: is ", iterations, ", expected >= 0");
    const index_t score_rows = std::min(n, detail::kmeans_block_rows<double, scalar>());
    std::vector<double> rows(n * dim_), mu(clusters_ * dim_), scores(score_rows * clusters_),
        mu_t(dim_ * clusters_), sums(clusters_ * dim_);
    std::vector<index_t> assignment(n), counts(clusters_), picks(n);
    for (index_t h = 0; h < heads_; ++h) {
      const tensor_view<const S, 4> xc = x;
      detail::normalized_rows<double, scalar>(xc.ptr(0, h, 0, 0), xc.stride(2), n, dim_, rows.data());
      detail::seeded_centroids<double, scalar>(
          rows.data(), n, dim_, clusters_, iterations, seed + std::uint64_t(h), mu.data(),
          scores.data(), mu_t.data(), sums.data(), assignment.data(), counts.data(), picks.data());
      std::copy(mu.begin(), mu.end(), centroid(h, 0));
    }
  }

  /// One online k-means step from x (B, heads, S, dim): every normalised token is assigned
  /// to its nearest centroid; mu_c <- decay * mu_c + (1 - decay) * mean of its tokens,
  /// renormalised; a centroid with no tokens is left as it is. Returns the commitment loss
  /// (the mean over tokens of |x^ - mu_assigned|^2, before the update) for callers that train.
  template <class TX>
  double update(tensor_view<TX, 4> x, double decay = 0.999) {
    using S = std::remove_const_t<TX>;
    check_x(x, "x");
    detail::require(decay >= 0 && decay <= 1, "decay: is ", decay, ", expected in [0, 1]");
    const index_t B = x.extent(0), n = x.extent(2), d = dim_;
    const tensor_view<const S, 4> xc = x;
    std::vector<double> row(d), sums(clusters_ * d);
    std::vector<index_t> counts(clusters_);
    double loss = 0;
    for (index_t h = 0; h < heads_; ++h) {
      std::fill(sums.begin(), sums.end(), 0.0);
      std::fill(counts.begin(), counts.end(), 0);
      for (index_t b = 0; b < B; ++b)
        for (index_t t = 0; t < n; ++t) {
          detail::normalized_rows<double, scalar>(xc.ptr(b, h, t, 0), 0, 1, d, row.data());
          index_t best = 0;
          double best_dot = -INFINITY;
          for (index_t c = 0; c < clusters_; ++c) {
            double dot = 0;
            for (index_t e = 0; e < d; ++e) dot += row[e] * double(centroid(h, c)[e]);
            if (dot > best_dot) best = c, best_dot = dot;
          }
          ++counts[best];
          for (index_t e = 0; e < d; ++e) {
            sums[best * d + e] += row[e];
            const double diff = row[e] - double(centroid(h, best)[e]);
            loss += diff * diff;
          }
        }
      for (index_t c = 0; c < clusters_; ++c) {
        if (counts[c] == 0) continue;
        double norm = 0;
        for (index_t e = 0; e < d; ++e) {
          row[e] =
              decay * double(centroid(h, c)[e]) + (1 - decay) * sums[c * d + e] / double(counts[c]);
          norm += row[e] * row[e];
        }
        const double inv = norm > 0 ? 1 / std::sqrt(norm) : 0;
        for (index_t e = 0; e < d; ++e) centroid(h, c)[e] = float(row[e] * inv);
      }
    }
    return B * n * heads_ > 0 ? loss / double(B * n * heads_) : 0.0;
  }

 private:
  template <class TX>
  void check_x(const tensor_view<TX, 4>& x, const char* name) const {
    detail::check_rows(tensor_view<const std::remove_const_t<TX>, 4>(x), name);
    detail::require(x.extent(1) == heads_ && x.extent(3) == dim_, name, ": heads and dim are (",
                    x.extent(1), ", ", x.extent(3), "), expected (", heads_, ", ", dim_, ")");
  }

  index_t heads_ = 0, clusters_ = 0, dim_ = 0;
  std::vector<float> mu_;
};

namespace detail {

/// Per-thread buffers of one (batch, head): routed vectors, scores, memberships, one
/// cluster's gathered rows, the output sums and the prefill tile.
template <class T, class Backend>
struct routing_buffers {
  index_t sq, sk, d, dv, clusters, wq, wk, ld;
  static constexpr index_t tile(index_t d, index_t dv) {
    return prefill_buffers<T, Backend>::size(d, dv);
  }
  /// Score rows: the queries', then the keys' (the same rows), or a k-means block.
  index_t score_rows() const noexcept {
    return std::max({sq, sk, std::min(sq + sk, kmeans_block_rows<T, Backend>())});
  }
  /// Routed rows of one side padded to whole vectors: the columns of the transposed
  /// rows and of the membership scores.
  index_t member_ld() const noexcept { return score_columns<T, Backend>(std::max(sq, sk)); }
  index_t size() const noexcept {
    return round_to_line<T>((sq + sk) * d) +
           round_to_line<T>(std::max(score_rows() * ld, clusters * member_ld())) +
           round_to_line<T>(d * member_ld()) +
           2 * round_to_line<T>(clusters * d) + round_to_line<T>(d * ld) +
           round_to_line<T>((wq + 2 * wk) * std::max(d, dv)) + round_to_line<T>(sq * dv) +
           tile(d, dv);
  }
  index_t indices() const noexcept {
    // keys for balanced_members, then assignment and picks for k-means
    return clusters * (wq + wk) + 4 * (sq + sk) + clusters + sq;
  }
};

}  // namespace detail

/// Routing attention with the given centroids (their heads must be q's heads), or, in the
/// overload without them, centroids found per (batch, head) from the call's own tokens by
/// seeded Lloyd iterations (deterministic for a seed).
///
///   q: (B, H, Sq, D)   k: (B, Hk, Sk, D)   v: (B, Hk, Sk, Dv)   out: (B, H, Sq, Dv)
///
/// Each cluster takes its `window` queries (and, unless shared_qk, its `window` keys) of
/// highest x^ . mu; its queries attend to its keys (causal: key position <= query
/// position, bottom-right aligned); out[t] = the mean of t's outputs over the clusters that
/// hold it as a query, and 0 for a token in none. As in the references, membership looks at
/// the whole sequence, so with causal only the attention is causal. With local_heads = L,
/// heads [0, L) instead attend to a sliding window of `window` keys (causal: the last
/// `window` keys; otherwise window / 2 on each side) through softmax_attention, as the
/// paper's models mix routed and local heads. Bitwise the same for every thread count.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO>
requires detail::attention_types<TQ, TK, TV, TO>
void routing_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                       tensor_view<TO, 4> out, const routing_centroids& centroids,
                       const routing_options& options = {});

template <class Backend = default_backend, class TQ, class TK, class TV, class TO>
requires detail::attention_types<TQ, TK, TV, TO>
void routing_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                       tensor_view<TO, 4> out, const routing_options& options = {});

namespace detail {

template <class Backend, class S>
void run_routing(const tensor_view<const S, 4>& q, const tensor_view<const S, 4>& k,
                 const tensor_view<const S, 4>& v, const tensor_view<S, 4>& out,
                 const routing_centroids* given, const routing_options& o) {
  using T = accumulator_t<S>;
  const index_t group = check_qkvo(q, k, v, out);
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), D = q.extent(3);
  const index_t Sk = k.extent(2), Dv = v.extent(3);
  const double scale = o.scale.value_or(1.0 / std::sqrt(double(D)));
  require(std::isfinite(scale) && scale > 0, "options.scale: is ", scale,
          ", expected a finite value > 0");
  require(o.num_clusters >= 1, "options.num_clusters: is ", o.num_clusters, ", expected >= 1");
  require(o.window >= 1, "options.window: is ", o.window, ", expected >= 1");
  require(o.kmeans_iterations >= 0, "options.kmeans_iterations: is ", o.kmeans_iterations,
          ", expected >= 0");
  require(o.threads >= 0, "options.threads: is ", o.threads, ", expected >= 0");
  require(o.local_heads >= 0 && o.local_heads <= H && o.local_heads % group == 0,
          "options.local_heads: is ", o.local_heads, ", expected 0 to ", H,
          " and a multiple of the ", group, " query heads per key/value head");
  require(!o.shared_qk || Sq == Sk, "options.shared_qk: needs as many queries as keys (", Sq,
          " vs ", Sk, "), k being q");
  if (given) {
    require(given->heads() == H && given->dim() == D && given->clusters() == o.num_clusters,
            "centroids: are (", given->heads(), ", ", given->clusters(), ", ", given->dim(),
            "), expected (", H, ", ", o.num_clusters, ", ", D, ") for q and options.num_clusters");
  } else if (H > o.local_heads && B * Sq > 0) {
    const index_t routed = o.shared_qk ? Sq : Sq + Sk;
    require(o.num_clusters <= routed, "options.num_clusters: is ", o.num_clusters,
            ", more than the ", routed, " tokens to cluster");
  }
  const int threads = resolve_threads(o.threads);

  if (o.local_heads > 0) {  // local heads: a sliding window through the dense engine
    softmax_options local;
    local.causal = o.causal;
    local.scale = scale;
    local.window_left = o.causal ? o.window - 1 : o.window / 2;
    local.window_right = o.causal ? 0 : o.window / 2;
    local.threads = o.threads;
    const index_t L = o.local_heads, Lk = L / group;
    softmax_attention<Backend>(slice(q, 1, 0, L), slice(k, 1, 0, Lk), slice(v, 1, 0, Lk),
                               slice(out, 1, 0, L), local);
  }
  const index_t routed_heads = H - o.local_heads;
  if (B * routed_heads * Sq == 0) return;

  routing_buffers<T, Backend> sizes{Sq,
                                    Sk,
                                    D,
                                    Dv,
                                    o.num_clusters,
                                    std::min(o.window, Sq),
                                    std::min(o.window, Sk),
                                    score_columns<T, Backend>(o.num_clusters)};
  if (o.shared_qk) sizes.wk = sizes.wq;
  const index_t tasks = B * routed_heads;
  const int used = int(std::min<index_t>(std::max(threads, 1), tasks));
  const scratch_slices<T> buffers(used, sizes.size());
  std::vector<index_t> index_scratch(std::size_t(used) * sizes.indices());
  const index_t c_n = o.num_clusters, wq = sizes.wq, wk = sizes.wk, ld = sizes.ld;
  const index_t offset = Sk - Sq;  // bottom-right: query i sits at key position i + offset

  parallel_for(tasks, used, [&](index_t task, int thread) {
    const index_t b = task / routed_heads, h = o.local_heads + task % routed_heads;
    const index_t hk = h / group;
    T* xq = buffers.slice(thread);  // routed queries, then keys (Sq + Sk) x D
    T* xk = xq + Sq * D;
    T* scores = xq + round_to_line<T>((Sq + Sk) * D);
    T* x_t = scores + round_to_line<T>(std::max(sizes.score_rows() * ld, c_n * sizes.member_ld()));
    T* mu = x_t + round_to_line<T>(D * sizes.member_ld());
    T* sums = mu + round_to_line<T>(c_n * D);
    T* mu_t = sums + round_to_line<T>(c_n * D);
    T* gq = mu_t + round_to_line<T>(D * ld);  // gathered queries, keys, values
    T* gk = gq + wq * std::max(D, Dv);
    T* gv = gk + wk * std::max(D, Dv);
    T* acc = gq + round_to_line<T>((wq + 2 * wk) * std::max(D, Dv));
    prefill_buffers<T, Backend> tile(acc + round_to_line<T>(Sq * Dv), D, Dv);
    index_t* q_members = index_scratch.data() + std::size_t(thread) * sizes.indices();
    index_t* k_members = q_members + c_n * wq;
    index_t* order = k_members + c_n * wk;
    auto* keys = reinterpret_cast<std::uint32_t*>(order);  // for the top-w of each cluster
    index_t* assignment = order + 2 * (Sq + Sk);
    index_t* picks = assignment + Sq + Sk;
    index_t* counts = picks + Sq + Sk;
    index_t* covered = counts + c_n;

    // Route: normalised rows; centroids given or found; balanced memberships.
    normalized_rows<T, Backend>(q.ptr(b, h, 0, 0), q.stride(2), Sq, D, xq);
    normalized_rows<T, Backend>(k.ptr(b, hk, 0, 0), k.stride(2), Sk, D, xk);
    if (given) {
      for (index_t c = 0; c < c_n * D; ++c) mu[c] = T(given->centroid(h, 0)[c]);
    } else {
      const index_t n = o.shared_qk ? Sq : Sq + Sk;  // xk follows xq
      seeded_centroids<T, Backend>(xq, n, D, c_n, o.kmeans_iterations,
                                   o.seed + std::uint64_t(b * H + h), mu, scores, mu_t, sums,
                                   assignment, counts, picks);
    }
    auto members = [&](const T* x, index_t n, index_t w, index_t* out) {
      const index_t ld_t = score_columns<T, Backend>(n);
      transpose_rows<T, Backend>(x, n, D, D, x_t, ld_t);
      member_scores<T, Backend>(mu, c_n, D, x_t, ld_t, scores);
      balanced_members<T, Backend>(scores, n, c_n, ld_t, w, out, keys);
    };
    members(xq, Sq, wq, q_members);
    if (o.shared_qk)
      std::copy(q_members, q_members + c_n * wq, k_members);
    else
      members(xk, Sk, wk, k_members);

    // Attend within each cluster; sum each query's outputs over its clusters.
    std::fill(acc, acc + Sq * Dv, T(0));
    std::fill(covered, covered + Sq, 0);
    for (index_t c = 0; c < c_n; ++c) {
      const index_t* qm = q_members + c * wq;
      const index_t* km = k_members + c * wk;
      for (index_t m = 0; m < wq; ++m) convert_row(q.ptr(b, h, qm[m], 0), gq + m * D, D);
      for (index_t m = 0; m < wk; ++m) {
        if (o.shared_qk)
          std::copy(xk + km[m] * D, xk + km[m] * D + D, gk + m * D);
        else
          convert_row(k.ptr(b, hk, km[m], 0), gk + m * D, D);
        convert_row(v.ptr(b, hk, km[m], 0), gv + m * Dv, Dv);
      }
      // Positions: query member i at qm[i] + offset, key member j at km[j], both sorted.
      auto visible = [&](index_t i, index_t j) {
        if (o.causal && km[j] > qm[i] + offset) return false;
        if (!o.shared_qk || qm[i] != km[j]) return true;
        return o.causal ? i == 0 : wq == 1;  // the self pair, only when it is the only key
      };
      auto classify = [&](index_t i0, index_t i1, index_t j0, index_t j1) {
        if (o.causal && km[j0] > qm[i1 - 1] + offset) return tile_view::hidden;
        const bool self = o.shared_qk && j0 < i1 && i0 < j1;  // member lists are equal
        const bool causal_cut = o.causal && km[j1 - 1] > qm[i0] + offset;
        return self || causal_cut ? tile_view::partial : tile_view::whole;
      };
      attend_gathered<Backend>(gq, wq, gk, gv, wk, D, Dv, T(scale), classify, visible, tile,
                               [&](index_t i, const T* row, T) {
                                 ++covered[qm[i]];
                                 add_row<T, Backend>(row, acc + qm[i] * Dv, Dv);
                               });
    }
    for (index_t t = 0; t < Sq; ++t) {
      S* row = out.ptr(b, h, t, 0);
      const T inv = covered[t] ? T(1) / T(covered[t]) : T(0);
      for (index_t e = 0; e < Dv; ++e) row[e] = covered[t] ? S(acc[t * Dv + e] * inv) : S(0);
    }
  });
}

}  // namespace detail

template <class Backend, class TQ, class TK, class TV, class TO>
requires detail::attention_types<TQ, TK, TV, TO>
void routing_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                       tensor_view<TO, 4> out, const routing_centroids& centroids,
                       const routing_options& options) {
  detail::run_routing<Backend, TO>(q, k, v, out, &centroids, options);
}

template <class Backend, class TQ, class TK, class TV, class TO>
requires detail::attention_types<TQ, TK, TV, TO>
void routing_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                       tensor_view<TO, 4> out, const routing_options& options) {
  detail::run_routing<Backend, TO>(q, k, v, out, nullptr, options);
}

/// The key side of strictly causal routing decode: every key appended joins its nearest
/// cluster (for each query head, with that head's centroids), so the per-cluster key lists
/// grow with the KV cache. Keys are never re-routed.
class routing_cache {
 public:
  routing_cache(const routing_centroids& centroids, index_t batch, index_t kv_heads)
      : mu_(&centroids),
        batch_(batch),
        kv_heads_(kv_heads),
        lists_(std::size_t(batch * centroids.heads() * centroids.clusters())) {
    detail::require(batch >= 1 && kv_heads >= 1 && centroids.heads() % kv_heads == 0,
                    "routing_cache: batch ", batch, " and kv_heads ", kv_heads,
                    " must be >= 1, kv_heads dividing the centroids' ", centroids.heads(),
                    " heads");
  }
  index_t size() const noexcept { return size_; }
  index_t batch() const noexcept { return batch_; }
  /// Keys of cluster c for query head h of batch row b, in position order.
  std::span<const index_t> cluster(index_t b, index_t h, index_t c) const noexcept {
    return lists_[std::size_t((b * mu_->heads() + h) * mu_->clusters() + c)];
  }

  /// Routes keys [size(), k.extent(2)) of the cache k (B, Hk, S, D) and appends them.
  template <class TK>
  void append(tensor_view<TK, 4> k) {
    using S = std::remove_const_t<TK>;
    const tensor_view<const S, 4> kc = k;
    detail::check_rows(kc, "k");
    detail::require(k.extent(0) == batch_ && k.extent(1) == kv_heads_ && k.extent(3) == mu_->dim(),
                    "k: extents (", k.extent(0), ", ", k.extent(1), ", _, ", k.extent(3),
                    ") do not match the cache's (", batch_, ", ", kv_heads_, ", _, ", mu_->dim(),
                    ")");
    detail::require(k.extent(2) >= size_, "k: holds ", k.extent(2), " keys, fewer than the ", size_,
                    " already appended");
    const index_t H = mu_->heads(), group = H / kv_heads_;
    for (index_t b = 0; b < batch_; ++b)
      for (index_t h = 0; h < H; ++h)
        for (index_t j = size_; j < k.extent(2); ++j)
          lists_[std::size_t((b * H + h) * mu_->clusters() +
                             nearest(kc.ptr(b, h / group, j, 0), h))]
              .push_back(j);
    size_ = k.extent(2);
  }

  /// The cluster of the centroid nearest x (D long) for query head h (ties: the lower).
  template <class S>
  index_t nearest(const S* x, index_t h) const noexcept {
    index_t best = 0;
    double best_dot = -INFINITY;
    for (index_t c = 0; c < mu_->clusters(); ++c) {
      double dot = 0;  // the norm of x does not change the argmax
      for (index_t e = 0; e < mu_->dim(); ++e) dot += double(x[e]) * double(mu_->centroid(h, c)[e]);
      if (dot > best_dot) best = c, best_dot = dot;
    }
    return best;
  }
  const routing_centroids& centroids() const noexcept { return *mu_; }

 private:
  const routing_centroids* mu_;
  index_t batch_, kv_heads_, size_ = 0;
  std::vector<std::vector<index_t>> lists_;
};

/// Strictly causal routing decode: each query (b, h, i) of q (B, H, Sq, D), at position
/// Sk - Sq + i, joins its nearest cluster and attends to that cluster's cached keys at or
/// before it (the cache having appended all Sk keys of k). Runs on the block-sparse
/// engine, one selection per query. Same guarantees as softmax_attention.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO>
requires detail::attention_types<TQ, TK, TV, TO>
void routing_decode(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                    tensor_view<TO, 4> out, const routing_cache& cache,
                    const routing_options& options = {}) {
  softmax_options so;
  so.causal = true;
  so.scale = options.scale;
  so.threads = options.threads;
  const auto pr = detail::make_softmax_problem<TO>(q, k, v, out, so);
  const routing_centroids& mu = cache.centroids();
  detail::require(mu.heads() == q.extent(1) && mu.dim() == q.extent(3), "cache: its centroids (",
                  mu.heads(), " heads, dim ", mu.dim(), ") do not match q");
  detail::require(cache.size() == k.extent(2), "cache: has routed ", cache.size(),
                  " keys, but k holds ", k.extent(2), " (append them first)");
  detail::require(cache.batch() == q.extent(0), "cache: is for ", cache.batch(),
                  " batch rows, q has ", q.extent(0));
  index_t longest = 1;
  for (index_t b = 0; b < q.extent(0); ++b)
    for (index_t h = 0; h < q.extent(1); ++h)
      for (index_t c = 0; c < mu.clusters(); ++c)
        longest = std::max<index_t>(longest, index_t(cache.cluster(b, h, c).size()));
  const detail::sparse_rows rows{1, true, longest};
  auto select = [&](index_t b, index_t h, index_t i, detail::key_piece* pieces) {
    const auto keys = cache.cluster(b, h, cache.nearest(pr.q.ptr(b, h, i, 0), h));
    index_t count = 0;
    for (const index_t j : keys) count = detail::append_piece(pieces, count, j, j + 1, false);
    return count;
  };
  detail::run_sparse<Backend>(pr, rows, select, custom_variant<>{},
                              detail::resolve_threads(options.threads));
}

}  // namespace fovea
