// linear_attention and linear_state against the f64 definition and the spec's oracles.
#include <gtest/gtest.h>

#include <cstring>
#include <fovea/fovea.hpp>
#include <limits>
#include <vector>

#include "../common/attention_case.hpp"
#include "../common/configs.hpp"
#include "../common/reference_linear.hpp"

namespace fovea::test::linear_test {

template <class C>
class LinearAttention : public ::testing::Test {
 protected:
  using T = typename C::value_type;
  using Backend = typename C::backend;

  // Runs fovea on `in` and checks against the f64 reference under the tolerance rule.
  void check(const attention_inputs<T>& in, const linear_options& o) {
    const shape& s = in.s;
    SCOPED_TRACE(describe(s, in.features) + " map " + to_string(o.map) +
                 (o.causal ? " causal" : ""));
    std::vector<T> out(s.B * s.H * s.Sq * s.Dv, T(-7));
    auto ov = in.template layout<T>(out.data(), s.H, s.Sq, s.Dv);
    linear_attention<Backend>(in.qv(), in.kv(), in.vv(), ov, o);
    const auto want = reference_linear<double>(in.qv(), in.kv(), in.vv(), o);
    const auto naive = reference_linear<T>(in.qv(), in.kv(), in.vv(), o);
    EXPECT_TRUE(within_tolerance<T>(to_dense(ov), want, naive));
  }
};
TYPED_TEST_SUITE(LinearAttention, configs, config_names);

TYPED_TEST(LinearAttention, ShapeSweep) {
  using T = typename TestFixture::T;
  for (index_t n : {0, 1, 17, 64, 97, 200})
    for (bool causal : {false, true})
      this->check(attention_inputs<T>({1, 2, 1, n, n, 16, 16}, 0, n),
                  {.causal = causal, .threads = 1});
  for (index_t d : {1, 3, 59, 64})
    for (bool causal : {false, true})
      this->check(attention_inputs<T>({1, 1, 1, 70, 70, d, d == 59 ? 17 : d}, 0, d),
                  {.causal = causal, .threads = 1});
}

TYPED_TEST(LinearAttention, RectangularCausalIsBottomRight) {
  using T = typename TestFixture::T;
  const std::pair<index_t, index_t> pairs[] = {{1, 239}, {113, 203}, {64, 129}, {239, 1}, {90, 40}};
  for (auto [sq, sk] : pairs)
    this->check(attention_inputs<T>({1, 2, 1, sq, sk, 12, 9}, 0, sq + sk),
                {.causal = true, .threads = 1});
}

TYPED_TEST(LinearAttention, FeatureMapsGroupsAndLayouts) {
  using T = typename TestFixture::T;
  for (auto map : {feature_map::elu_plus_one, feature_map::relu, feature_map::identity})
    for (unsigned layout : {0u, unsigned(feature::bshd)})
      for (index_t hk : {4, 1}) {
        attention_inputs<T> in({2, 4, hk, 75, 75, 24, 20}, layout, hk);
        if (map == feature_map::identity)  // phi(q).phi(k) must not cancel to ~0 with identity
          for (auto* x : {&in.q, &in.k})
            for (T& e : *x) e = std::abs(e);
        this->check(in, {.causal = true,
                         .map = map,
                         .eps = map == feature_map::identity ? 0.0 : 1e-6,
                         .threads = 1});
      }
}

TYPED_TEST(LinearAttention, UserFeatureMapFunctor) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const attention_inputs<T> in({1, 2, 1, 80, 80, 8, 8}, 0, 3);
  std::vector<T> a(2 * 80 * 8), b(a.size());
  auto squared_relu = [](const T* x, T* y, index_t n) {
    for (index_t i = 0; i < n; ++i) y[i] = x[i] > 0 ? x[i] * x[i] : T(0);
  };
  linear_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(a.data(), 1, 2, 80, 8),
                            {.causal = true, .threads = 1}, squared_relu);
  // The same thing through the identity map on inputs squared by hand.
  attention_inputs<T> sq = in;
  for (auto* x : {&sq.q, &sq.k})
    for (T& e : *x) e = e > 0 ? e * e : T(0);
  linear_attention<Backend>(sq.qv(), sq.kv(), sq.vv(), bhsd(b.data(), 1, 2, 80, 8),
                            {.causal = true, .map = feature_map::identity, .threads = 1});
  EXPECT_EQ(a, b);
}

TYPED_TEST(LinearAttention, LastCausalRowEqualsNonCausal) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const attention_inputs<T> in({1, 2, 2, 130, 130, 16, 16}, 0, 4);
  std::vector<T> causal(2 * 130 * 16), full(causal.size());
  linear_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(causal.data(), 1, 2, 130, 16),
                            {.causal = true, .threads = 1});
  linear_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(full.data(), 1, 2, 130, 16),
                            {.threads = 1});
  for (index_t h = 0; h < 2; ++h)
    for (index_t m = 0; m < 16; ++m) {
      const index_t at = (h * 130 + 129) * 16 + m;
      EXPECT_NEAR(double(causal[at]), double(full[at]), (std::is_same_v<T, float> ? 1e-5 : 1e-12));
    }
}

TYPED_TEST(LinearAttention, ConstantValuesGiveTheConstantScaledByTheNormaliser) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  attention_inputs<T> in({1, 1, 1, 50, 50, 8, 4}, 0, 5);
  std::fill(in.v.begin(), in.v.end(), T(3));
  std::vector<T> out(50 * 4);
  const double eps = 0.5;
  linear_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(out.data(), 1, 1, 50, 4),
                            {.causal = true, .eps = eps, .threads = 1});
  for (index_t i = 0; i < 50; ++i) {
    double den = 0;
    for (index_t j = 0; j <= i; ++j)
      for (index_t d = 0; d < 8; ++d)
        den += apply_map(feature_map::elu_plus_one, double(in.q[i * 8 + d])) *
               apply_map(feature_map::elu_plus_one, double(in.k[j * 8 + d]));
    for (index_t m = 0; m < 4; ++m)
      EXPECT_NEAR(double(out[i * 4 + m]), 3 * den / (den + eps), 1e-4 * (1 + den));
  }
}

TYPED_TEST(LinearAttention, ReluZeroNormaliserGivesZeroNotNan) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  attention_inputs<T> in({1, 1, 1, 10, 10, 4, 4}, 0, 6);
  for (index_t d = 0; d < 4; ++d) in.q[3 * 4 + d] = T(-1);  // phi(q_3) = 0
  std::vector<T> out(40, T(9));
  linear_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(out.data(), 1, 1, 10, 4),
                            {.causal = true, .map = feature_map::relu, .eps = 0.0, .threads = 1});
  for (index_t m = 0; m < 4; ++m) EXPECT_EQ(out[3 * 4 + m], T(0));
}

TYPED_TEST(LinearAttention, FutureNanNeverReachesEarlierRows) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  attention_inputs<T> in({1, 1, 1, 100, 100, 8, 8}, 0, 7);
  for (index_t d = 0; d < 8; ++d)
    in.k[60 * 8 + d] = in.v[60 * 8 + d] = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> out(800);
  linear_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(out.data(), 1, 1, 100, 8),
                            {.causal = true, .threads = 1});
  for (index_t i = 0; i < 100; ++i)
    for (index_t m = 0; m < 8; ++m)
      EXPECT_EQ(std::isnan(double(out[i * 8 + m])), i >= 60) << "row " << i;
}

TYPED_TEST(LinearAttention, RecurrentStepsEqualTheCausalBatch) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const shape s{2, 4, 2, 150, 150, 12, 10};
  const attention_inputs<T> in(s, 0, 8);
  std::vector<T> batch(s.B * s.H * s.Sq * s.Dv), steps(batch.size());
  linear_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(batch.data(), s.B, s.H, s.Sq, s.Dv),
                            {.causal = true});
  linear_state<T> state(s.B, s.Hk, s.D, s.Dv);
  const auto out = bhsd(steps.data(), s.B, s.H, s.Sq, s.Dv);
  for (index_t t = 0; t < s.Sq;) {  // steps of 1, 2, 3, ... tokens
    const index_t n = std::min<index_t>(t % 4 + 1, s.Sq - t);
    state.template step<Backend>(slice(in.qv(), 2, t, n), slice(in.kv(), 2, t, n),
                                 slice(in.vv(), 2, t, n), slice(out, 2, t, n));
    t += n;
  }
  EXPECT_EQ(state.tokens(), s.Sq);
  const std::vector<double> b(batch.begin(), batch.end()), r(steps.begin(), steps.end());
  const auto want = reference_linear<double>(in.qv(), in.kv(), in.vv(), {.causal = true});
  EXPECT_TRUE(within_tolerance<T>(r, want, b));
}

TYPED_TEST(LinearAttention, ThreadCountNeverChangesABit) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const attention_inputs<T> in({2, 8, 2, 300, 300, 32, 32}, 0, 9);
  expect_same_bits_for_threads([&](int threads) {
    std::vector<T> out(2 * 8 * 300 * 32);
    linear_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(out.data(), 2, 8, 300, 32),
                              {.causal = true, .threads = threads});
    return out;
  });
}

TYPED_TEST(LinearAttention, BadInputThrowsNamingTheArgument) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  std::vector<T> q(2 * 4 * 10 * 8, T(1)), k(2 * 2 * 10 * 8, T(1)), v(k.size(), T(1)),
      out(q.size(), T(42));
  auto expect_error = [&](const char* needle, auto&& call) {
    expect_rejected(needle, out, T(42), call);
  };
  const auto Q = bhsd(q.data(), 2, 4, 10, 8), K = bhsd(k.data(), 2, 2, 10, 8),
             V = bhsd(v.data(), 2, 2, 10, 8);
  const auto O = bhsd(out.data(), 2, 4, 10, 8);
  expect_error("options.eps", [&] { linear_attention<Backend>(Q, K, V, O, {.eps = -1}); });
  expect_error("options.eps",
               [&] { linear_attention<Backend>(Q, K, V, O, {.eps = std::nan("")}); });
  expect_error("options.threads", [&] { linear_attention<Backend>(Q, K, V, O, {.threads = -3}); });
  expect_error("k: extent 3",
               [&] { linear_attention<Backend>(Q, bhsd(k.data(), 2, 2, 10, 7), V, O); });
  expect_error("k: extent 1", [&] {
    linear_attention<Backend>(Q, bhsd(k.data(), 2, 3, 5, 8), bhsd(v.data(), 2, 3, 5, 8), O);
  });
  expect_error("out: memory overlaps q",
               [&] { linear_attention<Backend>(Q, K, V, bhsd(q.data(), 2, 4, 10, 8)); });
  linear_state<T> state(3, 2, 8, 8);  // a state for 3 sequences fed 2
  expect_error("k: shape does not match", [&] { state.template step<Backend>(Q, K, V, O); });
}

// FAVOR+: the map follows its formula, linear attention with it equals the definition
// (causal, through the batch and the recurrent state), and with many features it
// approaches softmax attention (spec oracle 4).
TYPED_TEST(LinearAttention, FavorFeatures) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const index_t D = 16, m = 64;
  const auto phi = feature_maps::favor::random(D, m, 7);
  EXPECT_EQ(phi.features(D), m);
  const auto x = normal<double>(D, 1);
  std::vector<double> y(m);
  phi(x.data(), y.data(), D);
  double sq = 0;
  for (double e : x) sq += e * e;
  for (index_t f = 0; f < m / 2; ++f) {
    double dot = 0;
    for (index_t e = 0; e < D; ++e) dot += phi.projections()[f * D + e] * x[e] / std::pow(D, 0.25);
    const double base = -sq / std::sqrt(double(D)) / 2 - std::log(double(m)) / 2;
    EXPECT_NEAR(y[f], std::exp(dot + base), 1e-12);
    EXPECT_NEAR(y[m / 2 + f], std::exp(-dot + base), 1e-12);
  }

  const shape s{2, 4, 2, 70, 70, D, 6};
  const attention_inputs<T> in(s, 0, 9);
  std::vector<T> batch(s.B * s.H * s.Sq * s.Dv), steps(batch.size());
  const linear_options o{.causal = true, .map = feature_map::favor, .favor_features = m, .seed = 7};
  linear_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(batch.data(), s.B, s.H, s.Sq, s.Dv), o);
  std::vector<double> want(batch.size());
  for (index_t b = 0; b < s.B; ++b)
    for (index_t h = 0; h < s.H; ++h)
      for (index_t i = 0; i < s.Sq; ++i) {
        std::vector<double> qi(D), pq(m), num(s.Dv, 0.0);
        for (index_t e = 0; e < D; ++e) qi[e] = double(in.qv()(b, h, i, e));
        phi(qi.data(), pq.data(), D);
        double den = 0;
        for (index_t j = 0; j <= i; ++j) {
          std::vector<double> kj(D), pk(m);
          for (index_t e = 0; e < D; ++e) kj[e] = double(in.kv()(b, h / 2, j, e));
          phi(kj.data(), pk.data(), D);
          double a = 0;
          for (index_t f = 0; f < m; ++f) a += pq[f] * pk[f];
          den += a;
          for (index_t e = 0; e < s.Dv; ++e) num[e] += a * double(in.vv()(b, h / 2, j, e));
        }
        for (index_t e = 0; e < s.Dv; ++e)
          want[((b * s.H + h) * s.Sq + i) * s.Dv + e] = num[e] / (den + 1e-6);
      }
  for (std::size_t i = 0; i < want.size(); ++i)
    EXPECT_NEAR(double(batch[i]), want[i], 1e-4 * (1 + std::abs(want[i]))) << i;
  linear_state<T> state(s.B, s.Hk, m, s.Dv);
  const auto out = bhsd(steps.data(), s.B, s.H, s.Sq, s.Dv);
  for (index_t t = 0; t < s.Sq; t += 10)
    state.template step<Backend>(slice(in.qv(), 2, t, 10), slice(in.kv(), 2, t, 10),
                                 slice(in.vv(), 2, t, 10), slice(out, 2, t, 10), o, phi);
  for (std::size_t i = 0; i < want.size(); ++i)
    EXPECT_NEAR(double(steps[i]), want[i], 1e-4 * (1 + std::abs(want[i]))) << i;

  // Many features: close to softmax attention (non-causal); fewer features: further.
  const shape small{1, 1, 1, 40, 40, D, 4};
  attention_inputs<T> sm(small, 0, 10);
  for (T& e : sm.q) e *= T(0.5);
  for (T& e : sm.k) e *= T(0.5);
  const auto exact = reference_softmax<double>(sm.qv(), sm.kv(), sm.vv(), {});
  auto error = [&](index_t features) {
    std::vector<T> o2(40 * 4);
    linear_attention<Backend>(sm.qv(), sm.kv(), sm.vv(), bhsd(o2.data(), 1, 1, 40, 4),
                              {.map = feature_map::favor, .favor_features = features, .seed = 3});
    double e = 0;
    for (std::size_t i = 0; i < o2.size(); ++i) e += std::abs(double(o2[i]) - exact.out[i]);
    return e / double(o2.size());
  };
  const double coarse = error(16), fine = error(8192);
  EXPECT_LT(fine, 0.05);
  EXPECT_LT(fine, coarse);

  std::vector<T> untouched(batch.size(), T(3));
  expect_rejected("options.favor_features", untouched, T(3), [&] {
    linear_attention<Backend>(in.qv(), in.kv(), in.vv(),
                              bhsd(untouched.data(), s.B, s.H, s.Sq, s.Dv),
                              {.map = feature_map::favor, .favor_features = 5});
  });
}

}  // namespace fovea::test::linear_test
