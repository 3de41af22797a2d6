// linear_attention_backward against f64 gradients written from the definition (every
// built-in map but FAVOR+, causal and not, GQA, lengths around the 64-key chunk, Sq != Sk),
// against central finite differences of the forward in double (FAVOR+ and a user map
// with its vjp), thread invariance, zero normalisers, NaN kept to the rows that see it,
// bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fovea/fovea.hpp>
#include <limits>
#include <string>
#include <span>
#include <tuple>
#include <vector>

#include "../common/configs.hpp"
#include "../common/random.hpp"
#include "../common/reference_linear.hpp"
#include "../common/tolerance.hpp"

namespace fovea::test::linear_backward_test {

struct grad_case {
  index_t B = 1, H = 2, Hk = 1, Sq = 70, Sk = 70, D = 7, Dv = 5;
  bool causal = true;
  feature_map map = feature_map::elu_plus_one;
};

std::string describe(const grad_case& c) {
  return std::string(to_string(c.map)) + (c.causal ? " causal" : " full") + " B=" +
         std::to_string(c.B) + " H=" + std::to_string(c.H) + " Hk=" + std::to_string(c.Hk) +
         " Sq=" + std::to_string(c.Sq) + " Sk=" + std::to_string(c.Sk) + " D=" +
         std::to_string(c.D) + " Dv=" + std::to_string(c.Dv);
}

double map_derivative(feature_map m, double x) {
  if (m == feature_map::relu) return x > 0 ? 1 : 0;
  if (m == feature_map::identity) return 1;
  return x > 0 ? 1 : std::exp(x);
}

struct grads {
  std::vector<double> dq, dk, dv;
};

/// From the definition, in double: per row, a_ij over the visible keys, den, out, then
/// d phi(q_i) = sum_j r_ij phi(k_j), d phi(k_j) += r_ij phi(q_i), dv_j += a_ij g_i with
/// g_i = dO_i / den_i, c_i = -(dO_i . out_i) / den_i, r_ij = v_j . g_i + c_i.
template <class T>
grads reference_grads(const grad_case& c, const std::vector<T>& q, const std::vector<T>& k,
                      const std::vector<T>& v, const std::vector<T>& dout, double eps) {
  const index_t group = c.H / c.Hk;
  grads g{std::vector<double>(q.size()), std::vector<double>(k.size()), std::vector<double>(v.size())};
  std::vector<double> fq(c.D), fk(c.Sk * c.D), a(c.Sk), out(c.Dv), gi(c.Dv), dfq(c.D);
  std::vector<double> dfk(c.B * c.Hk * c.Sk * c.D, 0.0);
  for (index_t b = 0; b < c.B; ++b)
    for (index_t h = 0; h < c.H; ++h) {
      const index_t hk = h / group;
      for (index_t j = 0; j < c.Sk; ++j)
        for (index_t d = 0; d < c.D; ++d)
          fk[j * c.D + d] = apply_map(c.map, double(k[((b * c.Hk + hk) * c.Sk + j) * c.D + d]));
      for (index_t i = 0; i < c.Sq; ++i) {
        const index_t qi = (b * c.H + h) * c.Sq + i;
        for (index_t d = 0; d < c.D; ++d) fq[d] = apply_map(c.map, double(q[qi * c.D + d]));
        const index_t last = c.causal ? i + c.Sk - c.Sq : c.Sk - 1;
        double den = 0;
        std::fill(out.begin(), out.end(), 0.0);
        for (index_t j = 0; j <= last && j < c.Sk; ++j) {
          a[j] = 0;
          for (index_t d = 0; d < c.D; ++d) a[j] += fq[d] * fk[j * c.D + d];
          den += a[j];
          for (index_t m = 0; m < c.Dv; ++m) out[m] += a[j] * double(v[((b * c.Hk + hk) * c.Sk + j) * c.Dv + m]);
        }
        den += eps;
        if (last < 0 || den == 0) continue;  // outputs 0: no gradient
        double dot = 0;
        for (index_t m = 0; m < c.Dv; ++m) {
          out[m] /= den;
          gi[m] = double(dout[qi * c.Dv + m]) / den;
          dot += double(dout[qi * c.Dv + m]) * out[m];
        }
        const double ci = -dot / den;
        std::fill(dfq.begin(), dfq.end(), 0.0);
        for (index_t j = 0; j <= last && j < c.Sk; ++j) {
          const index_t kj = (b * c.Hk + hk) * c.Sk + j;
          double r = ci;
          for (index_t m = 0; m < c.Dv; ++m) r += double(v[kj * c.Dv + m]) * gi[m];
          for (index_t d = 0; d < c.D; ++d) {
            dfq[d] += r * fk[j * c.D + d];
            dfk[kj * c.D + d] += r * fq[d];
          }
          for (index_t m = 0; m < c.Dv; ++m) g.dv[kj * c.Dv + m] += a[j] * gi[m];
        }
        for (index_t d = 0; d < c.D; ++d)
          g.dq[qi * c.D + d] = dfq[d] * map_derivative(c.map, double(q[qi * c.D + d]));
      }
    }
  for (std::size_t x = 0; x < k.size(); ++x) g.dk[x] = dfk[x] * map_derivative(c.map, double(k[x]));
  return g;
}

template <class T>
struct grad_inputs {
  grad_case c;
  std::vector<T> q, k, v, out, dout;
  grad_inputs(const grad_case& cs, std::uint64_t seed) : c(cs) {
    q = normal<T>(c.B * c.H * c.Sq * c.D, seed + 1, 0.5);
    k = normal<T>(c.B * c.Hk * c.Sk * c.D, seed + 2, 0.5);
    v = normal<T>(c.B * c.Hk * c.Sk * c.Dv, seed + 3);
    dout = normal<T>(c.B * c.H * c.Sq * c.Dv, seed + 4);
    out.assign(c.B * c.H * c.Sq * c.Dv, T(0));
  }
  auto Q() const { return bhsd<const T>(q.data(), c.B, c.H, c.Sq, c.D); }
  auto K() const { return bhsd<const T>(k.data(), c.B, c.Hk, c.Sk, c.D); }
  auto V() const { return bhsd<const T>(v.data(), c.B, c.Hk, c.Sk, c.Dv); }
  auto O() { return bhsd(out.data(), c.B, c.H, c.Sq, c.Dv); }
  auto dO() const { return bhsd<const T>(dout.data(), c.B, c.H, c.Sq, c.Dv); }
};

/// The forward, then the backward; returns (dq, dk, dv) as doubles.
template <class Backend, class T, class... Phi>
grads fovea_grads(grad_inputs<T>& in, const linear_options& o, const Phi&... phi) {
  const auto& c = in.c;
  linear_attention<Backend>(in.Q(), in.K(), in.V(), in.O(), o, phi...);
  std::vector<T> dq(in.q.size(), T(-7)), dk(in.k.size(), T(-7)), dv(in.v.size(), T(-7));
  linear_attention_backward<Backend>(in.Q(), in.K(), in.V(),
                                     tensor_view<const T, 4>(in.O()), in.dO(),
                                     bhsd(dq.data(), c.B, c.H, c.Sq, c.D),
                                     bhsd(dk.data(), c.B, c.Hk, c.Sk, c.D),
                                     bhsd(dv.data(), c.B, c.Hk, c.Sk, c.Dv), o, phi...);
  return {std::vector<double>(dq.begin(), dq.end()), std::vector<double>(dk.begin(), dk.end()),
          std::vector<double>(dv.begin(), dv.end())};
}

template <class C>
class LinearBackward : public ::testing::Test {
 protected:
  using T = typename C::value_type;
  using Backend = typename C::backend;
  static double tolerance() { return std::is_same_v<T, float> ? 1e-4 : 1e-10; }
  static void check(const grad_case& c, std::uint64_t seed, int threads = 1) {
    SCOPED_TRACE(describe(c));
    grad_inputs<T> in(c, seed);
    const linear_options o{.causal = c.causal, .map = c.map, .threads = threads};
    const auto got = fovea_grads<Backend>(in, o);
    const auto want = reference_grads(c, in.q, in.k, in.v, in.dout, o.eps);
    // Relative to the largest gradient, or to 1 where they are all tiny: with one key,
    // d out / d q is (dO . v) eps / den^2, a cancellation of terms of order 1.
    auto error = [](const std::vector<double>& g, const std::vector<double>& w) {
      return relative_error(g, w) * std::max(max_abs(w), 1e-30) / std::max(max_abs(w), 1.0);
    };
    EXPECT_LT(error(got.dq, want.dq), tolerance()) << "dq";
    EXPECT_LT(error(got.dk, want.dk), tolerance()) << "dk";
    EXPECT_LT(error(got.dv, want.dv), tolerance()) << "dv";
  }
};
TYPED_TEST_SUITE(LinearBackward, configs, config_names);

TYPED_TEST(LinearBackward, MapsCausalityAndGroups) {
  std::uint64_t seed = 1;
  for (auto map : {feature_map::elu_plus_one, feature_map::relu, feature_map::identity})
    for (bool causal : {true, false})
      for (auto [H, Hk] : {std::pair<index_t, index_t>{2, 1}, {4, 2}, {3, 3}}) {
        grad_case c;
        c.map = map, c.causal = causal, c.H = H, c.Hk = Hk;
        if (map == feature_map::identity) c.Sq = c.Sk = 20;  // keeps den away from 0
        TestFixture::check(c, ++seed);
      }
}

TYPED_TEST(LinearBackward, LengthsAroundTheChunk) {
  std::uint64_t seed = 100;
  for (auto [sq, sk] : {std::pair<index_t, index_t>{0, 5}, {5, 0}, {1, 1}, {63, 63}, {64, 64},
                        {65, 65}, {130, 70}, {20, 150}, {129, 129}})
    for (bool causal : {true, false}) {
      grad_case c;
      c.Sq = sq, c.Sk = sk, c.causal = causal, c.B = 2, c.D = 16, c.Dv = 9;
      TestFixture::check(c, ++seed);
    }
}

TYPED_TEST(LinearBackward, ThreadCountNeverChangesABit) {
  using T = typename TestFixture::T;
  grad_case c;
  c.B = 2, c.H = 4, c.Hk = 2, c.Sq = c.Sk = 150;
  grads first;
  for (int threads : {1, 2, 3, 0}) {
    grad_inputs<T> in(c, 9);
    const auto g = fovea_grads<typename TestFixture::Backend>(in, {.causal = true, .threads = threads});
    if (threads == 1)
      first = g;
    else
      EXPECT_TRUE(g.dq == first.dq && g.dk == first.dk && g.dv == first.dv) << threads;
  }
}

// relu with queries all <= 0: the normaliser is 0, the output 0 and so are its gradients.
TYPED_TEST(LinearBackward, ZeroNormaliserGivesZeroGradients) {
  using T = typename TestFixture::T;
  grad_case c;
  c.map = feature_map::relu;
  grad_inputs<T> in(c, 5);
  for (T& x : in.q) x = -std::abs(x);
  const auto g = fovea_grads<typename TestFixture::Backend>(in, {.causal = true, .map = c.map, .eps = 0});
  for (double x : g.dq) ASSERT_EQ(x, 0.0);
  for (double x : g.dk) ASSERT_EQ(x, 0.0);
  for (double x : g.dv) ASSERT_EQ(x, 0.0);
}

// A NaN key or value at position t reaches the gradients of the queries that see it (and
// of the keys those queries see), never dq of an earlier causal query.
TYPED_TEST(LinearBackward, NanReachesOnlyTheRowsThatSeeIt) {
  using T = typename TestFixture::T;
  for (index_t t : {3, 63, 64, 100})
    for (bool in_key : {true, false}) {
    grad_case c;
    c.Sq = c.Sk = 130;
    grad_inputs<T> in(c, 7 + t);
    (in_key ? in.k[t * c.D + 2] : in.v[t * c.Dv + 2]) = std::numeric_limits<T>::quiet_NaN();
    SCOPED_TRACE(std::string(in_key ? "NaN key " : "NaN value ") + std::to_string(t));
    const auto g = fovea_grads<typename TestFixture::Backend>(in, {.causal = true});
    for (index_t h = 0; h < c.H; ++h)
      for (index_t i = 0; i < c.Sq; ++i)
        for (index_t d = 0; d < c.D; ++d) {
          const double x = g.dq[((h * c.Sq) + i) * c.D + d];
          ASSERT_EQ(std::isnan(x), i >= t) << "dq of query " << i;
        }
  }
}

/// Central finite differences of L = sum dO * out in double, through the forward.
template <class Backend, class... Phi>
void finite_differences(const grad_case& c, const linear_options& o, const Phi&... phi) {
  SCOPED_TRACE(describe(c));
  grad_inputs<double> in(c, 3);
  const auto got = fovea_grads<Backend>(in, o, phi...);
  auto loss = [&]() {
    std::vector<double> out(in.out.size());
    linear_attention<Backend>(in.Q(), in.K(), in.V(), bhsd(out.data(), c.B, c.H, c.Sq, c.Dv), o, phi...);
    double l = 0;
    for (std::size_t i = 0; i < out.size(); ++i) l += out[i] * in.dout[i];
    return l;
  };
  auto check = [&](std::vector<double>& x, const std::vector<double>& analytic, const char* name) {
    const double h = 1e-6;
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double keep = x[i];
      x[i] = keep + h;
      const double up = loss();
      x[i] = keep - h;
      const double down = loss();
      x[i] = keep;
      const double numeric = (up - down) / (2 * h);
      ASSERT_NEAR(analytic[i], numeric, 1e-6 * (1 + std::abs(numeric))) << name << " element " << i;
    }
  };
  check(in.q, got.dq, "dq");
  check(in.k, got.dk, "dk");
  check(in.v, got.dv, "dv");
}

/// A user map with its derivative: phi(x) = x^2 + 1 (elementwise).
struct square_plus_one {
  template <class T>
  void operator()(const T* x, T* y, index_t n) const noexcept {
    for (index_t i = 0; i < n; ++i) y[i] = x[i] * x[i] + T(1);
  }
  template <class T>
  void vjp(const T* x, const T* dy, T* dx, index_t n) const noexcept {
    for (index_t i = 0; i < n; ++i) dx[i] = 2 * x[i] * dy[i];
  }
};

TEST(LinearBackwardFiniteDifferences, EveryMapIncludingFavorAndAUserMap) {
  for (bool causal : {true, false}) {
    grad_case c;
    c.B = 1, c.H = 2, c.Hk = 1, c.Sq = 9, c.Sk = 11, c.D = 4, c.Dv = 3, c.causal = causal;
    for (auto map : {feature_map::elu_plus_one, feature_map::identity, feature_map::favor}) {
      c.map = map;
      finite_differences<default_backend>(c, {.causal = causal, .map = map, .favor_features = 8});
    }
    finite_differences<default_backend>(c, {.causal = causal}, square_plus_one{});
  }
}

// Chunked training through the recurrent state: the sequence run as two linear_state
// steps (lengths off the 64-key chunk), then the backward chunk by chunk from the last,
// each chunk from its state and with the next chunk's d state, equals the backward of
// the whole causal sequence; d state against central differences of the forward from a
// restored state (double); bad state arguments.
TEST(LinearBackwardState, ChunksThroughTheStateEqualTheWholeSequence) {
  for (const feature_map map : {feature_map::elu_plus_one, feature_map::favor}) {
    SCOPED_TRACE(to_string(map));
    const index_t B = 2, H = 4, Hk = 2, S = 150, cut = 70, D = 8, Dv = 6;
    const linear_options o{.causal = true, .map = map, .favor_features = 16, .threads = 2};
    const index_t E = map == feature_map::favor ? 16 : D;
    const auto q = normal<double>(B * H * S * D, 11, 0.5), k = normal<double>(B * Hk * S * D, 12, 0.5),
               v = normal<double>(B * Hk * S * Dv, 13), g = normal<double>(B * H * S * Dv, 14);
    auto Q = bhsd<const double>(q.data(), B, H, S, D), K = bhsd<const double>(k.data(), B, Hk, S, D),
         V = bhsd<const double>(v.data(), B, Hk, S, Dv), G = bhsd<const double>(g.data(), B, H, S, Dv);
    std::vector<double> out(B * H * S * Dv), dq(q.size()), dk(k.size()), dv(v.size());
    linear_attention(Q, K, V, bhsd(out.data(), B, H, S, Dv), o);
    linear_attention_backward(Q, K, V, bhsd<const double>(out.data(), B, H, S, Dv), G,
                              bhsd(dq.data(), B, H, S, D), bhsd(dk.data(), B, Hk, S, D),
                              bhsd(dv.data(), B, Hk, S, Dv), o);
    // the chunks' forward through the state
    linear_state<double> state(B, Hk, E, Dv);
    std::vector<double> chunk_out(out.size()), cq(q.size()), ck(k.size()), cv(v.size());
    const auto O = bhsd(chunk_out.data(), B, H, S, Dv);
    state.step(slice(Q, 2, 0, cut), slice(K, 2, 0, cut), slice(V, 2, 0, cut), slice(O, 2, 0, cut), o);
    const std::vector<double> between(state.data().begin(), state.data().end());
    state.step(slice(Q, 2, cut, S - cut), slice(K, 2, cut, S - cut), slice(V, 2, cut, S - cut),
               slice(O, 2, cut, S - cut), o);
    EXPECT_LT(relative_error(chunk_out, out), 1e-12);
    // backward: the last chunk first, from the state between
    std::vector<double> d_between(between.size(), 9.0), d_start(between.size(), 9.0);
    const auto dQ = bhsd(cq.data(), B, H, S, D), dK = bhsd(ck.data(), B, Hk, S, D),
               dV = bhsd(cv.data(), B, Hk, S, Dv);
    const auto O_ = bhsd<const double>(chunk_out.data(), B, H, S, Dv);
    linear_attention_backward(slice(Q, 2, cut, S - cut), slice(K, 2, cut, S - cut),
                              slice(V, 2, cut, S - cut), slice(O_, 2, cut, S - cut),
                              slice(G, 2, cut, S - cut), slice(dQ, 2, cut, S - cut),
                              slice(dK, 2, cut, S - cut), slice(dV, 2, cut, S - cut), o,
                              linear_state_grads<double>{.state_in = between, .dstate_in = d_between});
    linear_attention_backward(slice(Q, 2, 0, cut), slice(K, 2, 0, cut), slice(V, 2, 0, cut),
                              slice(O_, 2, 0, cut), slice(G, 2, 0, cut), slice(dQ, 2, 0, cut),
                              slice(dK, 2, 0, cut), slice(dV, 2, 0, cut), o,
                              linear_state_grads<double>{.dstate_out = d_between, .dstate_in = d_start});
    EXPECT_LT(relative_error(cq, dq), 1e-12) << "dq";
    EXPECT_LT(relative_error(ck, dk), 1e-12) << "dk";
    EXPECT_LT(relative_error(cv, dv), 1e-12) << "dv";
    // d state between the chunks against central differences of the second chunk's loss
    auto loss_from = [&](const std::vector<double>& s0) {
      linear_state<double> st(B, Hk, E, Dv);
      std::copy(s0.begin(), s0.end(), st.data().begin());
      std::vector<double> o2(B * H * (S - cut) * Dv);
      st.step(slice(Q, 2, cut, S - cut), slice(K, 2, cut, S - cut), slice(V, 2, cut, S - cut),
              bhsd(o2.data(), B, H, S - cut, Dv), o);
      double l = 0;
      for (index_t b = 0; b < B; ++b)
        for (index_t h = 0; h < H; ++h)
          for (index_t i = 0; i < S - cut; ++i)
            for (index_t e = 0; e < Dv; ++e) l += o2[((b * H + h) * (S - cut) + i) * Dv + e] * G(b, h, cut + i, e);
      return l;
    };
    std::vector<double> s = between;
    for (std::size_t e = 0; e < s.size(); e += 7) {  // a spread of entries, S and z alike
      const double keep = s[e], step = 1e-6 * std::max(1.0, std::abs(keep));
      s[e] = keep + step;
      const double up = loss_from(s);
      s[e] = keep - step;
      const double down = loss_from(s);
      s[e] = keep;
      EXPECT_NEAR(d_between[e], (up - down) / (2 * step), 1e-6 * std::max(1.0, std::abs(d_between[e]))) << e;
    }
    // the first chunk started from zero: its d state is what a caller with a learnt
    // initial state would use; finite and written
    for (double x : d_start) ASSERT_TRUE(std::isfinite(x) && x != 9.0);
  }
  // bad state arguments name it and write nothing
  std::vector<float> q(2 * 4 * 4, 0.5f), out(q.size()), dq(q.size(), 7.f), dk(q.size(), 7.f),
      dv(q.size(), 7.f), st(2 * (4 * 4 + 4)), dst(st.size(), 7.f);
  const auto X = bhsd<const float>(q.data(), 1, 2, 4, 4);
  auto call = [&](linear_options o, linear_state_grads<float> sg) {
    linear_attention_backward(X, X, X, bhsd<const float>(out.data(), 1, 2, 4, 4), X,
                              bhsd(dq.data(), 1, 2, 4, 4), bhsd(dk.data(), 1, 2, 4, 4),
                              bhsd(dv.data(), 1, 2, 4, 4), o, sg);
  };
  for (const auto& [o, sg, what] :
       {std::tuple{linear_options{}, linear_state_grads<float>{.state_in = st}, std::string("options.causal")},
        {linear_options{.causal = true}, linear_state_grads<float>{.state_in = std::span<const float>(st).first(5)},
         std::string("state.state_in")},
        {linear_options{.causal = true},
         linear_state_grads<float>{.state_in = st, .dstate_in = std::span<float>(st)}, std::string("overlaps")}}) {
    try {
      call(o, sg);
      ADD_FAILURE() << "no error for " << what;
    } catch (const error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
    for (const auto* x : {&dq, &dk, &dv, &dst})
      for (float e : *x) ASSERT_EQ(e, 7.f) << what;
  }
}

TEST(LinearBackwardBadInput, NamesTheArgumentAndWritesNothing) {
  const index_t B = 1, H = 2, Hk = 1, S = 8, D = 4;
  std::vector<float> q(B * H * S * D, 0.1f), k(B * Hk * S * D, 0.1f), v(B * Hk * S * D, 0.1f),
      o(B * H * S * D, 0.1f), dq(q.size(), -7.f), dk(k.size(), -7.f), dv(v.size(), -7.f);
  const auto Q = bhsd<const float>(q.data(), B, H, S, D), K = bhsd<const float>(k.data(), B, Hk, S, D),
             V = bhsd<const float>(v.data(), B, Hk, S, D), O = bhsd<const float>(o.data(), B, H, S, D);
  auto expect_error = [&](const char* needle, auto&& call) {
    try {
      call();
      ADD_FAILURE() << "no error for " << needle;
    } catch (const fovea::error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    for (const auto* g : {&dq, &dk, &dv})
      for (float x : *g) ASSERT_EQ(x, -7.f) << "written before the error";
  };
  expect_error("dq: extent 2 (seq) is 7", [&] {
    linear_attention_backward(Q, K, V, O, O, bhsd(dq.data(), B, H, S - 1, D), bhsd(dk.data(), B, Hk, S, D),
                              bhsd(dv.data(), B, Hk, S, D));
  });
  expect_error("dout: extent 3 (dim) is 3", [&] {
    linear_attention_backward(Q, K, V, O, bhsd<const float>(o.data(), B, H, S, 3),
                              bhsd(dq.data(), B, H, S, D), bhsd(dk.data(), B, Hk, S, D),
                              bhsd(dv.data(), B, Hk, S, D));
  });
  expect_error("dq: memory overlaps dk", [&] {
    linear_attention_backward(Q, K, V, O, O, bhsd(dq.data(), B, H, S, D), bhsd(dq.data(), B, Hk, S, D),
                              bhsd(dv.data(), B, Hk, S, D));
  });
  expect_error("dv: memory overlaps v", [&] {
    linear_attention_backward(Q, K, V, O, O, bhsd(dq.data(), B, H, S, D), bhsd(dk.data(), B, Hk, S, D),
                              bhsd(v.data(), B, Hk, S, D));
  });
  expect_error("options.eps", [&] {
    linear_attention_backward(Q, K, V, O, O, bhsd(dq.data(), B, H, S, D), bhsd(dk.data(), B, Hk, S, D),
                              bhsd(dv.data(), B, Hk, S, D), {.eps = -1.0});
  });
}

}  // namespace fovea::test::linear_backward_test
