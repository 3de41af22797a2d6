// routing_attention against a reference that routes with the same centroids from the
// definitions (normalise, top-w per cluster, attend within clusters, average), in double
// and in the storage type for the tolerance rule; plus the spec's structural oracles.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fovea/fovea.hpp>
#include <numeric>
#include <string>
#include <vector>

#include "../common/attention_case.hpp"
#include "../common/configs.hpp"

namespace fovea::test::routing_test {

template <class C>
class Routing : public ::testing::Test {};
TYPED_TEST_SUITE(Routing, configs, config_names);

/// Normalised row in Acc.
template <class Acc, class T>
std::vector<Acc> unit(tensor_view<const T, 4> x, index_t b, index_t h, index_t t) {
  const index_t D = x.extent(3);
  std::vector<Acc> r(D);
  Acc n = 0;
  for (index_t e = 0; e < D; ++e) n += (r[e] = Acc(x(b, h, t, e))) * r[e];
  for (Acc& e : r) e = n > 0 ? e / std::sqrt(n) : Acc(0);
  return r;
}

/// The top-w rows of x (batch b, head xh) by x^ . mu_c with query head h's centroids,
/// per cluster, in row order.
template <class T>
std::vector<std::vector<index_t>> members(tensor_view<const T, 4> x, index_t b, index_t xh,
                                          index_t h, const routing_centroids& mu, index_t w) {
  const index_t n = x.extent(2), D = x.extent(3);
  std::vector<std::vector<index_t>> out(mu.clusters());
  for (index_t c = 0; c < mu.clusters(); ++c) {
    std::vector<std::pair<double, index_t>> s(n);
    for (index_t t = 0; t < n; ++t) {
      const auto u = unit<double>(x, b, xh, t);
      double dot = 0;
      for (index_t e = 0; e < D; ++e) dot += u[e] * mu.centroid(h, c)[e];
      s[t] = {-dot, t};
    }
    std::sort(s.begin(), s.end());
    for (index_t m = 0; m < std::min(w, n); ++m) out[c].push_back(s[m].second);
    std::sort(out[c].begin(), out[c].end());
  }
  return out;
}

/// Reference routing attention in Acc with the given centroids.
template <class Acc, class T>
std::vector<double> reference_routing(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                                      tensor_view<const T, 4> v, const routing_centroids& mu,
                                      const routing_options& o) {
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), D = q.extent(3);
  const index_t Hk = k.extent(1), Sk = k.extent(2), Dv = v.extent(3), group = H / Hk;
  const Acc scale = Acc(1) / std::sqrt(Acc(D));
  std::vector<double> out(B * H * Sq * Dv, 0.0);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h) {
      const index_t hk = h / group;
      const auto qm = members(q, b, h, h, mu, o.window);
      const auto km = o.shared_qk ? qm : members(k, b, hk, h, mu, o.window);
      std::vector<Acc> sum(Sq * Dv, 0);
      std::vector<int> count(Sq, 0);
      for (index_t c = 0; c < mu.clusters(); ++c)
        for (const index_t i : qm[c]) {
          std::vector<Acc> s;
          std::vector<index_t> keys;
          for (const index_t j : km[c]) {
            if (o.causal && j > i + Sk - Sq) continue;
            if (o.shared_qk && j == i) continue;
            keys.push_back(j);
          }
          if (keys.empty() && o.shared_qk) keys.push_back(i);  // self only when alone
          ++count[i];                  // t is in this cluster, whatever it sees
          if (keys.empty()) continue;  // a query that sees no key contributes 0
          Acc m = -INFINITY;
          for (const index_t j : keys) {
            Acc dot = 0;
            if (o.shared_qk) {
              const auto kj = unit<Acc>(k, b, hk, j);
              for (index_t e = 0; e < D; ++e) dot += Acc(q(b, h, i, e)) * kj[e];
            } else {
              for (index_t e = 0; e < D; ++e) dot += Acc(q(b, h, i, e)) * Acc(k(b, hk, j, e));
            }
            s.push_back(scale * dot);
            m = std::max(m, s.back());
          }
          Acc l = 0;
          for (Acc& x : s) l += (x = std::exp(x - m));
          for (std::size_t t = 0; t < keys.size(); ++t)
            for (index_t e = 0; e < Dv; ++e)
              sum[i * Dv + e] += s[t] / l * Acc(v(b, hk, keys[t], e));
        }
      for (index_t i = 0; i < Sq; ++i)
        for (index_t e = 0; e < Dv; ++e)
          out[((b * H + h) * Sq + i) * Dv + e] =
              count[i] ? double(sum[i * Dv + e] / Acc(count[i])) : 0.0;
    }
  return out;
}

/// Unit centroids drawn at random.
routing_centroids random_centroids(index_t H, index_t c, index_t D, std::uint64_t seed) {
  routing_centroids mu(H, c, D);
  const auto x = normal<float>(H * c * D, seed);
  for (index_t h = 0; h < H; ++h)
    for (index_t j = 0; j < c; ++j) {
      double n = 0;
      for (index_t e = 0; e < D; ++e) n += double(x[(h * c + j) * D + e]) * x[(h * c + j) * D + e];
      for (index_t e = 0; e < D; ++e)
        mu.centroid(h, j)[e] = float(x[(h * c + j) * D + e] / std::sqrt(n));
    }
  return mu;
}

template <class T, class Backend>
void check_routing_case(const shape& s, routing_options o, std::uint64_t seed) {
  SCOPED_TRACE(describe(s, o.causal ? unsigned(feature::causal) : 0u) +
               " clusters=" + std::to_string(o.num_clusters) +
               " window=" + std::to_string(o.window) + (o.shared_qk ? " shared_qk" : ""));
  attention_inputs<T> in(s, 0, seed);
  if (o.shared_qk) in.k = in.q;  // shared QK: k is q
  const routing_centroids mu = random_centroids(s.H, o.num_clusters, s.D, seed + 9);
  std::vector<T> out(s.B * s.H * s.Sq * s.Dv, T(-7));
  routing_attention<Backend>(in.qv(), in.kv(), in.vv(), output_view(out, s), mu, o);
  const auto want = reference_routing<double>(in.qv(), in.kv(), in.vv(), mu, o);
  const auto naive = reference_routing<T>(in.qv(), in.kv(), in.vv(), mu, o);
  EXPECT_TRUE(within_tolerance<T>(std::vector<double>(out.begin(), out.end()), want, naive));
}

TYPED_TEST(Routing, EqualsTheReferenceWithGivenCentroids) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  std::uint64_t seed = 1100;
  const shape shapes[] = {{1, 1, 1, 1, 1, 1, 1},       {1, 2, 1, 37, 37, 13, 7},
                          {2, 4, 2, 150, 150, 32, 32}, {1, 2, 2, 70, 130, 16, 20},
                          {1, 2, 1, 0, 20, 8, 8},      {1, 2, 1, 20, 0, 8, 8}};
  for (const shape& s : shapes)
    for (bool causal : {false, true})
      for (bool shared : {false, true}) {
        if (shared && s.Sq != s.Sk) continue;
        routing_options o;
        o.causal = causal;
        o.shared_qk = shared;
        o.num_clusters = 5;
        o.window = 11;
        o.threads = int(seed % 3);
        check_routing_case<T, Backend>(s, o, ++seed);
        o.num_clusters = 2;
        o.window = 100;  // more than some sequences hold
        check_routing_case<T, Backend>(s, o, ++seed);
      }
}

// Oracle 1: one cluster holding every token is dense attention, with or without centroids.
TYPED_TEST(Routing, OneClusterOfEveryTokenIsDense) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape s{2, 4, 2, 90, 90, 24, 24};
  const attention_inputs<T> in(s, 0, 3);
  for (bool causal : {false, true}) {
    std::vector<T> routed(s.B * s.H * s.Sq * s.Dv), given(routed.size());
    const auto O = [&](std::vector<T>& x) { return output_view(x, s); };
    const routing_options o{.causal = causal, .num_clusters = 1, .window = s.Sq};
    routing_attention<Backend>(in.qv(), in.kv(), in.vv(), O(routed), o);
    routing_attention<Backend>(in.qv(), in.kv(), in.vv(), O(given),
                               random_centroids(s.H, 1, s.D, 4), o);
    for (const auto* result : {&routed, &given})
      expect_softmax_result<T>(*result, nullptr, in.qv(), in.kv(), in.vv(), {.causal = causal});
  }
}

// Oracles 2 and 3: with constant V every covered token outputs that constant and every
// uncovered token 0; with c clusters of w, at most c * w tokens are covered.
TYPED_TEST(Routing, ConstantValuesAndUncoveredTokens) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const index_t S = 200, D = 16, c = 3, w = 20;
  attention_inputs<T> in({1, 2, 2, S, S, D, D}, 0, 5);
  std::fill(in.v.begin(), in.v.end(), T(1.5));
  std::vector<T> out(2 * S * D, T(-7));
  routing_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(out.data(), 1, 2, S, D),
                             {.causal = true, .num_clusters = c, .window = w});
  for (index_t h = 0; h < 2; ++h) {
    index_t covered = 0;
    for (index_t t = 0; t < S; ++t) {
      const T x = out[(h * S + t) * D];
      if (x != T(0)) ++covered;
      EXPECT_TRUE(x == T(0) || std::abs(double(x) - 1.5) < 1e-5) << t << ": " << double(x);
      for (index_t e = 1; e < D; ++e) EXPECT_EQ(out[(h * S + t) * D + e], x);
    }
    EXPECT_LE(covered, c * w);
    EXPECT_GE(covered, w);
  }
}

// Oracle 4: without causality, permuting the tokens permutes the output (given centroids).
TYPED_TEST(Routing, PermutingTokensPermutesTheOutput) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const index_t S = 64, D = 8;
  const attention_inputs<T> in({1, 1, 1, S, S, D, D}, 0, 7);
  std::vector<index_t> perm(S);
  std::iota(perm.begin(), perm.end(), 0);
  std::reverse(perm.begin(), perm.begin() + 40);
  std::rotate(perm.begin(), perm.begin() + 13, perm.end());
  std::vector<T> pq(S * D), pk(S * D), pv(S * D);
  for (index_t t = 0; t < S; ++t)
    for (index_t e = 0; e < D; ++e) {
      pq[t * D + e] = in.q[perm[t] * D + e];
      pk[t * D + e] = in.k[perm[t] * D + e];
      pv[t * D + e] = in.v[perm[t] * D + e];
    }
  const auto mu = random_centroids(1, 4, D, 8);
  const routing_options o{.num_clusters = 4, .window = 16};
  std::vector<T> out(S * D), pout(S * D);
  routing_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(out.data(), 1, 1, S, D), mu, o);
  routing_attention<Backend>(
      bhsd<const T>(pq.data(), 1, 1, S, D), bhsd<const T>(pk.data(), 1, 1, S, D),
      bhsd<const T>(pv.data(), 1, 1, S, D), bhsd(pout.data(), 1, 1, S, D), mu, o);
  for (index_t t = 0; t < S; ++t)
    for (index_t e = 0; e < D; ++e)
      EXPECT_NEAR(double(pout[t * D + e]), double(out[perm[t] * D + e]), 1e-5) << t;
}

TYPED_TEST(Routing, LocalHeadsAreSlidingWindowAttention) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape s{1, 4, 2, 100, 100, 16, 16};
  const attention_inputs<T> in(s, 0, 9);
  for (bool causal : {false, true}) {
    std::vector<T> out(s.H * s.Sq * s.Dv), local(out.size()), routed(out.size());
    const auto O = [&](std::vector<T>& x) { return output_view(x, s); };
    routing_attention<Backend>(
        in.qv(), in.kv(), in.vv(), O(out),
        {.causal = causal, .num_clusters = 3, .window = 20, .local_heads = 2});
    softmax_attention<Backend>(
        in.qv(), in.kv(), in.vv(), O(local),
        {.causal = causal, .window_left = causal ? 19 : 10, .window_right = causal ? 0 : 10});
    routing_attention<Backend>(in.qv(), in.kv(), in.vv(), O(routed),
                               {.causal = causal, .num_clusters = 3, .window = 20});
    const index_t half = 2 * s.Sq * s.Dv;
    EXPECT_TRUE(std::equal(out.begin(), out.begin() + half, local.begin()));
    EXPECT_TRUE(std::equal(out.begin() + half, out.end(), routed.begin() + half));
  }
}

TYPED_TEST(Routing, SameBitsForAnyThreadCount) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape s{2, 4, 2, 300, 300, 32, 32};
  const attention_inputs<T> in(s, 0, 11);
  expect_same_bits_for_threads([&](int threads) {
    std::vector<T> out(s.B * s.H * s.Sq * s.Dv);
    routing_attention<Backend>(
        in.qv(), in.kv(), in.vv(), output_view(out, s),
        {.causal = true, .num_clusters = 8, .window = 40, .threads = threads});
    return out;
  });
}

TEST(RoutingCentroids, UpdateIsTheEmaOfAssignedMeans) {
  const index_t H = 2, c = 3, D = 5, S = 40;
  const auto x = normal<float>(2 * H * S * D, 12);
  const auto X = bhsd<const float>(x.data(), 2, H, S, D);
  routing_centroids mu(H, c, D);
  mu.init(X, 2, 7);
  for (index_t h = 0; h < H; ++h)  // init leaves unit vectors
    for (index_t j = 0; j < c; ++j) {
      double n = 0;
      for (index_t e = 0; e < D; ++e) n += double(mu.centroid(h, j)[e]) * mu.centroid(h, j)[e];
      EXPECT_NEAR(n, 1.0, 1e-6);
    }
  const routing_centroids before = mu;
  const double decay = 0.9;
  const double loss = mu.update(X, decay);
  double want_loss = 0;
  for (index_t h = 0; h < H; ++h) {
    std::vector<double> sums(c * D, 0.0);
    std::vector<int> counts(c, 0);
    for (index_t b = 0; b < 2; ++b)
      for (index_t t = 0; t < S; ++t) {
        const auto u = unit<double>(X, b, h, t);
        index_t best = 0;
        double best_dot = -INFINITY;
        for (index_t j = 0; j < c; ++j) {
          double dot = 0;
          for (index_t e = 0; e < D; ++e) dot += u[e] * before.centroid(h, j)[e];
          if (dot > best_dot) best = j, best_dot = dot;
        }
        ++counts[best];
        for (index_t e = 0; e < D; ++e) {
          sums[best * D + e] += u[e];
          want_loss += (u[e] - before.centroid(h, best)[e]) * (u[e] - before.centroid(h, best)[e]);
        }
      }
    for (index_t j = 0; j < c; ++j) {
      std::vector<double> m(D);
      double n = 0;
      for (index_t e = 0; e < D; ++e) {
        m[e] = counts[j]
                   ? decay * before.centroid(h, j)[e] + (1 - decay) * sums[j * D + e] / counts[j]
                   : before.centroid(h, j)[e];
        n += m[e] * m[e];
      }
      for (index_t e = 0; e < D; ++e)
        EXPECT_NEAR(mu.centroid(h, j)[e], counts[j] ? m[e] / std::sqrt(n) : m[e], 1e-6);
    }
  }
  EXPECT_NEAR(loss, want_loss / (2 * H * S), 1e-9);
}

TEST(RoutingArguments, BadInputNamesTheArgument) {
  const index_t S = 16, D = 8;
  std::vector<float> q(2 * S * D, 1.f), out(q.size(), -3.f);
  const auto Q = bhsd<const float>(q.data(), 1, 2, S, D);
  const auto O = bhsd(out.data(), 1, 2, S, D);
  auto bad = [&](const char* needle, routing_options o) {
    expect_rejected(needle, out, -3.f, [&] { routing_attention(Q, Q, Q, O, o); });
  };
  bad("options.num_clusters", {.num_clusters = 0});
  bad("options.num_clusters", {.num_clusters = 40, .shared_qk = true});  // > 16 tokens
  bad("options.window", {.window = 0});
  bad("options.kmeans_iterations", {.kmeans_iterations = -1});
  bad("options.scale", {.scale = -2.0});
  bad("options.local_heads", {.local_heads = 3});
  bad("options.threads", {.threads = -4});
  expect_rejected("centroids", out, -3.f, [&] {
    routing_attention(Q, Q, Q, O, routing_centroids(2, 3, 4), {.num_clusters = 3});
  });
  std::vector<float> k(2 * 5 * D);
  expect_rejected("options.shared_qk", out, -3.f, [&] {
    routing_attention(Q, bhsd<const float>(k.data(), 1, 2, 5, D),
                      bhsd<const float>(k.data(), 1, 2, 5, D), O,
                      {.num_clusters = 2, .shared_qk = true});
  });
  routing_centroids mu(2, 3, D);
  EXPECT_THROW(mu.init(bhsd<const float>(q.data(), 1, 2, 2, D)), fovea::error);  // 2 < 3 tokens
  EXPECT_THROW(mu.update(Q, 1.5), fovea::error);
}

// The decode step, one token at a time, equals masked dense attention over the keys of
// the query's nearest cluster (memberships computed here from the definitions).
TYPED_TEST(Routing, DecodeStepsAttendToTheirClustersEarlierKeys) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const index_t B = 2, H = 4, Hk = 2, D = 16, total = 90, c = 3;
  const auto k = normal<T>(B * Hk * total * D, 21), v = normal<T>(B * Hk * total * D, 22);
  const auto q = normal<T>(B * H * total * D, 23);
  const routing_centroids mu = random_centroids(H, c, D, 24);
  auto nearest = [&](const T* x, index_t h) {
    index_t best = 0;
    double best_dot = -INFINITY;
    for (index_t j = 0; j < c; ++j) {
      double dot = 0;
      for (index_t e = 0; e < D; ++e) dot += double(x[e]) * mu.centroid(h, j)[e];
      if (dot > best_dot) best = j, best_dot = dot;
    }
    return best;
  };
  routing_cache cache(mu, B, Hk);
  for (index_t step = 1; step <= total; step += 7) {  // the cache holds `step` keys
    auto cached = [&](const std::vector<T>& x) {
      return view<const T, 4>(x.data(), {B, Hk, step, D}, {Hk * total * D, total * D, D, 1});
    };
    cache.append(cached(k));
    const auto Q =
        view<const T, 4>(q.data() + (step - 1) * D, {B, H, 1, D}, {H * total * D, total * D, D, 1});
    std::vector<T> out(B * H * D, T(-7));
    routing_decode<Backend>(Q, cached(k), cached(v), bhsd(out.data(), B, H, 1, D), cache);
    auto in_cluster = [&](index_t b, index_t h, index_t, index_t j) {
      return nearest(&k[((b * Hk + h / 2) * total + j) * D], h) == nearest(&Q(b, h, 0, 0), h);
    };
    SCOPED_TRACE("step " + std::to_string(step));
    expect_softmax_result<T>(out, nullptr, Q, cached(k), cached(v), {.causal = true},
                             with_mask_mod(in_cluster));
  }
  std::vector<T> out(B * H * D);
  const auto Q1 = bhsd<const T>(q.data(), B, H, 1, D);
  EXPECT_THROW(routing_decode<Backend>(Q1, bhsd<const T>(k.data(), B, Hk, 5, D),
                                       bhsd<const T>(v.data(), B, Hk, 5, D),
                                       bhsd(out.data(), B, H, 1, D), cache),
               fovea::error);  // the cache has routed more keys than k holds
}

}  // namespace fovea::test::routing_test
