// linear_recurrence against an f64 token-by-token recurrence written from ONNX
// LinearAttention's definition: every rule x decay shape x beta shape x GQA/MQA x initial
// state x lengths around the chunk, strong decays; chunked == stepping; thread
// invariance; bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <fovea/fovea.hpp>
#include <string>
#include <vector>

#include "../common/configs.hpp"
#include "../common/random.hpp"
#include "../common/tolerance.hpp"

namespace fovea::test::linear_recurrence_test {

struct recurrence_case {
  index_t B = 1, H = 2, Hk = 1, S = 65, Dk = 16, Dv = 12;
  update_rule rule = update_rule::gated_delta;
  bool per_dim_decay = false, shared_beta = false, initial_state = false;
  double decay_strength = 1.0;  ///< g_t uniform in [-strength, 0]
};

std::string describe(const recurrence_case& c) {
  return std::string(to_string(c.rule)) + " B=" + std::to_string(c.B) + " H=" +
         std::to_string(c.H) + " Hk=" + std::to_string(c.Hk) + " S=" + std::to_string(c.S) +
         " Dk=" + std::to_string(c.Dk) + " Dv=" + std::to_string(c.Dv) +
         (c.per_dim_decay ? " per-dim decay" : "") + (c.shared_beta ? " shared beta" : "") +
         (c.initial_state ? " initial state" : "") + " strength " + std::to_string(c.decay_strength);
}

bool gated(update_rule r) { return r == update_rule::gated || r == update_rule::gated_delta; }
bool delta(update_rule r) { return r == update_rule::delta || r == update_rule::gated_delta; }

template <class T>
struct recurrence_inputs {
  recurrence_case c;
  std::vector<T> q, k, v;
  std::vector<float> decay, beta, state;
  explicit recurrence_inputs(const recurrence_case& cs, std::uint64_t seed) : c(cs) {
    q = normal<T>(c.B * c.H * c.S * c.Dk, seed + 1, 0.5);
    k = normal<T>(c.B * c.Hk * c.S * c.Dk, seed + 2, 0.5);
    for (index_t i = 0; i < c.B * c.Hk * c.S; ++i) {  // L2-normalised keys, as DeltaNet uses
      double n = 0;
      for (index_t e = 0; e < c.Dk; ++e) n += double(k[i * c.Dk + e]) * double(k[i * c.Dk + e]);
      for (index_t e = 0; e < c.Dk; ++e) k[i * c.Dk + e] = T(double(k[i * c.Dk + e]) / std::sqrt(n));
    }
    v = normal<T>(c.B * c.Hk * c.S * c.Dv, seed + 3);
    if (gated(c.rule))
      decay = uniform<float>(c.B * c.Hk * c.S * (c.per_dim_decay ? c.Dk : 1), seed + 4,
                             -c.decay_strength, 0.0);
    if (delta(c.rule)) beta = uniform<float>(c.B * (c.shared_beta ? 1 : c.Hk) * c.S, seed + 5, 0.0, 1.0);
    if (c.initial_state) state = normal<float>(c.B * c.Hk * c.Dk * c.Dv, seed + 6, 0.3);
  }
  linear_recurrence_options options() const {
    linear_recurrence_options o;
    o.rule = c.rule;
    if (gated(c.rule))
      o.decay = bhsd<const float>(decay.data(), c.B, c.Hk, c.S, c.per_dim_decay ? c.Dk : 1);
    if (delta(c.rule))
      o.beta = bhsd<const float>(beta.data(), c.B, c.shared_beta ? 1 : c.Hk, c.S, 1);
    if (c.initial_state) o.state_in = bhsd<const float>(state.data(), c.B, c.Hk, c.Dk, c.Dv);
    return o;
  }
};

/// The definition, token by token in double: outputs (B, H, S, Dv) and final states.
template <class T>
std::pair<std::vector<double>, std::vector<double>> reference(const recurrence_inputs<T>& in) {
  const auto& c = in.c;
  const index_t group = c.H / c.Hk;
  std::vector<double> out(c.B * c.H * c.S * c.Dv), states(c.B * c.Hk * c.Dk * c.Dv);
  const double scale = 1 / std::sqrt(double(c.Dk));
  for (index_t b = 0; b < c.B; ++b)
    for (index_t hk = 0; hk < c.Hk; ++hk) {
      std::vector<double> S(c.Dk * c.Dv, 0.0), kS(c.Dv), vn(c.Dv);
      if (c.initial_state)
        for (index_t i = 0; i < c.Dk * c.Dv; ++i) S[i] = in.state[(b * c.Hk + hk) * c.Dk * c.Dv + i];
      for (index_t t = 0; t < c.S; ++t) {
        const index_t kt = (b * c.Hk + hk) * c.S + t;
        if (gated(c.rule))
          for (index_t e = 0; e < c.Dk; ++e) {
            const double g = c.per_dim_decay ? in.decay[kt * c.Dk + e] : in.decay[kt];
            for (index_t d = 0; d < c.Dv; ++d) S[e * c.Dv + d] *= std::exp(g);
          }
        for (index_t d = 0; d < c.Dv; ++d) vn[d] = double(in.v[kt * c.Dv + d]);
        if (delta(c.rule)) {
          const double beta = in.beta[(b * (c.shared_beta ? 1 : c.Hk) + (c.shared_beta ? 0 : hk)) * c.S + t];
          for (index_t d = 0; d < c.Dv; ++d) {
            double s = 0;
            for (index_t e = 0; e < c.Dk; ++e) s += S[e * c.Dv + d] * double(in.k[kt * c.Dk + e]);
            vn[d] = beta * (vn[d] - s);
          }
        }
        for (index_t e = 0; e < c.Dk; ++e)
          for (index_t d = 0; d < c.Dv; ++d) S[e * c.Dv + d] += double(in.k[kt * c.Dk + e]) * vn[d];
        for (index_t g = 0; g < group; ++g) {
          const index_t h = hk * group + g, qt = (b * c.H + h) * c.S + t;
          for (index_t d = 0; d < c.Dv; ++d) {
            double o = 0;
            for (index_t e = 0; e < c.Dk; ++e) o += S[e * c.Dv + d] * double(in.q[qt * c.Dk + e]);
            out[qt * c.Dv + d] = scale * o;
          }
        }
      }
      std::copy(S.begin(), S.end(), states.begin() + (b * c.Hk + hk) * c.Dk * c.Dv);
    }
  return {out, states};
}

template <class C>
class LinearRecurrence : public ::testing::Test {
 protected:
  using T = typename C::value_type;
  using Backend = typename C::backend;
  static double tolerance() { return std::is_same_v<T, float> ? 2e-5 : 1e-6; }

  static void check(const recurrence_case& c, std::uint64_t seed, int threads = 1) {
    SCOPED_TRACE(describe(c));
    const recurrence_inputs<T> in(c, seed);
    std::vector<T> out(c.B * c.H * c.S * c.Dv, T(-7));
    std::vector<float> state(c.B * c.Hk * c.Dk * c.Dv, -7.f);
    auto o = in.options();
    o.state_out = bhsd(state.data(), c.B, c.Hk, c.Dk, c.Dv);
    o.threads = threads;
    linear_recurrence<Backend>(bhsd<const T>(in.q.data(), c.B, c.H, c.S, c.Dk),
                               bhsd<const T>(in.k.data(), c.B, c.Hk, c.S, c.Dk),
                               bhsd<const T>(in.v.data(), c.B, c.Hk, c.S, c.Dv),
                               bhsd(out.data(), c.B, c.H, c.S, c.Dv), o);
    const auto [want_out, want_state] = reference(in);
    // States travel in fp32: their rounding is part of the bound for double too.
    const double state_tol = std::max(tolerance(), 2e-6);
    EXPECT_LT(relative_error(std::vector<double>(out.begin(), out.end()), want_out), tolerance())
        << "out";
    EXPECT_LT(relative_error(std::vector<double>(state.begin(), state.end()), want_state), state_tol)
        << "state";
  }
};
TYPED_TEST_SUITE(LinearRecurrence, configs, config_names);

TYPED_TEST(LinearRecurrence, EveryRuleDecayAndBetaShape) {
  std::uint64_t seed = 1;
  for (auto rule : {update_rule::linear, update_rule::gated, update_rule::delta, update_rule::gated_delta})
    for (bool per_dim : {false, true})
      for (bool shared_beta : {false, true})
        for (bool initial : {false, true}) {
          if ((per_dim && !gated(rule)) || (shared_beta && !delta(rule))) continue;
          recurrence_case c;
          c.rule = rule, c.per_dim_decay = per_dim, c.shared_beta = shared_beta;
          c.initial_state = initial;
          TestFixture::check(c, ++seed);
        }
}

TYPED_TEST(LinearRecurrence, LengthsAroundTheChunk) {
  std::uint64_t seed = 100;
  for (index_t s : {0, 1, 2, 15, 16, 17, 63, 64, 65, 129, 1000})
    for (auto rule : {update_rule::linear, update_rule::gated_delta, update_rule::delta}) {
      recurrence_case c;
      c.S = s, c.rule = rule, c.initial_state = s % 2 == 1;
      TestFixture::check(c, ++seed);
      if (rule == update_rule::gated_delta) {
        c.per_dim_decay = true;
        TestFixture::check(c, ++seed);
      }
    }
}

TYPED_TEST(LinearRecurrence, GroupsHeadDimsAndBatches) {
  std::uint64_t seed = 200;
  for (auto [H, Hk] : {std::pair<index_t, index_t>{4, 4}, {4, 2}, {6, 1}})
    for (auto [Dk, Dv] : {std::pair<index_t, index_t>{1, 1}, {3, 7}, {32, 32}, {17, 40}}) {
      recurrence_case c;
      c.B = 2, c.H = H, c.Hk = Hk, c.Dk = Dk, c.Dv = Dv, c.S = 70;
      c.rule = update_rule::gated_delta, c.initial_state = true;
      TestFixture::check(c, ++seed);
      c.per_dim_decay = true;
      TestFixture::check(c, ++seed);
    }
}

TYPED_TEST(LinearRecurrence, StrongDecaysStayFinite) {
  std::uint64_t seed = 300;
  // Per-dimension decays: 2.5 and 5 cut chunks short of 16 tokens (a dimension's log decay
  // spreads past per_dim_decay_span), 20 to two or three tokens, 60 to the token step.
  for (double strength : {2.5, 5.0, 20.0, 60.0})
    for (auto rule : {update_rule::gated, update_rule::gated_delta})
      for (bool per_dim : {false, true}) {
        recurrence_case c;
        c.S = 200, c.rule = rule, c.decay_strength = strength, c.per_dim_decay = per_dim;
        c.initial_state = true;
        TestFixture::check(c, ++seed);
      }
}

TYPED_TEST(LinearRecurrence, ThreadCountNeverChangesABit) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  recurrence_case c;
  c.B = 2, c.H = 4, c.Hk = 2, c.S = 150, c.rule = update_rule::gated_delta;
  const recurrence_inputs<T> in(c, 9);
  std::vector<T> first;
  for (int threads : {1, 2, 3, 0}) {
    std::vector<T> out(c.B * c.H * c.S * c.Dv);
    auto o = in.options();
    o.threads = threads;
    linear_recurrence<Backend>(bhsd<const T>(in.q.data(), c.B, c.H, c.S, c.Dk),
                               bhsd<const T>(in.k.data(), c.B, c.Hk, c.S, c.Dk),
                               bhsd<const T>(in.v.data(), c.B, c.Hk, c.S, c.Dv),
                               bhsd(out.data(), c.B, c.H, c.S, c.Dv), o);
    if (first.empty())
      first = out;
    else
      EXPECT_EQ(0, std::memcmp(first.data(), out.data(), out.size() * sizeof(T))) << threads;
  }
}

/// Views of tokens [t0, t0 + n) of a (B, heads, S, dim) buffer.
template <class T>
tensor_view<T, 4> tokens(T* p, index_t B, index_t heads, index_t S, index_t dim, index_t t0,
                         index_t n) {
  return slice(bhsd(p, B, heads, S, dim), 2, t0, n);
}

// The state object: stepping by 64 tokens (whole chunks) gives the batch's bits; by 1 or 37 tokens the
// batch within rounding; the final state equals the batch's state_out.
TYPED_TEST(LinearRecurrence, SteppingEqualsTheBatch) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  for (auto [rule, per_dim] : {std::pair{update_rule::gated_delta, false}, {update_rule::linear, false},
                                {update_rule::gated_delta, true}, {update_rule::gated, true}}) {
    recurrence_case c;
    c.B = 1, c.H = 4, c.Hk = 2, c.S = 193, c.rule = rule;  // (a one-token tail)
    c.per_dim_decay = per_dim;  // (decays within [-1, 0]: chunks of 16, as with one per head)
    SCOPED_TRACE(describe(c));
    const recurrence_inputs<T> in(c, 77);
    std::vector<T> batch(c.B * c.H * c.S * c.Dv);
    std::vector<float> batch_state(c.B * c.Hk * c.Dk * c.Dv);
    auto o = in.options();
    o.state_out = bhsd(batch_state.data(), c.B, c.Hk, c.Dk, c.Dv);
    linear_recurrence<Backend>(bhsd<const T>(in.q.data(), c.B, c.H, c.S, c.Dk),
                               bhsd<const T>(in.k.data(), c.B, c.Hk, c.S, c.Dk),
                               bhsd<const T>(in.v.data(), c.B, c.Hk, c.S, c.Dv),
                               bhsd(batch.data(), c.B, c.H, c.S, c.Dv), o);
    for (index_t step : {64, 37, 1}) {
      linear_recurrence_state<T> state(c.B, c.Hk, c.Dk, c.Dv);
      std::vector<T> stepped(batch.size());
      for (index_t t0 = 0; t0 < c.S; t0 += step) {
        const index_t n = std::min(step, c.S - t0);
        linear_recurrence_options so;
        so.rule = rule;
        if (gated(rule))
          so.decay = tokens<const float>(in.decay.data(), c.B, c.Hk, c.S, per_dim ? c.Dk : 1, t0, n);
        if (delta(rule)) so.beta = tokens<const float>(in.beta.data(), c.B, c.Hk, c.S, 1, t0, n);
        state.template step<Backend>(tokens<const T>(in.q.data(), c.B, c.H, c.S, c.Dk, t0, n),
                                     tokens<const T>(in.k.data(), c.B, c.Hk, c.S, c.Dk, t0, n),
                                     tokens<const T>(in.v.data(), c.B, c.Hk, c.S, c.Dv, t0, n),
                                     tokens<T>(stepped.data(), c.B, c.H, c.S, c.Dv, t0, n), so);
      }
      const std::vector<double> a(batch.begin(), batch.end()), b(stepped.begin(), stepped.end());
      if (step == 64 && std::is_same_v<T, float>)
        EXPECT_EQ(a, b) << "steps of 64 tokens";
      else
        EXPECT_LT(relative_error(b, a), 2e-5) << "steps of " << step;
      const auto final_state = state.view();
      double err = 0;
      const auto want = bhsd<const float>(batch_state.data(), c.B, c.Hk, c.Dk, c.Dv);
      for (index_t h = 0; h < c.Hk; ++h)
        for (index_t e = 0; e < c.Dk; ++e)
          for (index_t d = 0; d < c.Dv; ++d)
            err = std::max(err, double(std::abs(final_state(0, h, e, d) - want(0, h, e, d))));
      EXPECT_LT(err, 1e-4) << "final state, steps of " << step;
    }
  }
}

// A NaN key or an Inf value at token t (lane, chunk and mid-chunk positions) reaches the
// outputs of tokens t.. of its group only: a later token's NaN must not leak into earlier
// outputs of its chunk through the zeros above the diagonal of T or of the masked Q K^T.
TYPED_TEST(LinearRecurrence, NonFiniteInputsReachLaterTokensOnly) {
  using T = typename TestFixture::T;
  for (auto [rule, per_dim] : {std::pair{update_rule::linear, false}, {update_rule::gated_delta, false},
                                {update_rule::delta, false}, {update_rule::gated_delta, true}})
    for (index_t t : {0, 7, 15, 16, 17, 40})
      for (bool in_key : {true, false}) {
        recurrence_case c;
        c.H = 4, c.Hk = 2, c.S = 48, c.rule = rule, c.per_dim_decay = per_dim;
        recurrence_inputs<T> in(c, 31 + t);
        if (in_key)
          in.k[(1 * c.S + t) * c.Dk + 3] = std::numeric_limits<T>::quiet_NaN();
        else
          in.v[(1 * c.S + t) * c.Dv + 5] = std::numeric_limits<T>::infinity();
        SCOPED_TRACE(describe(c) + " token " + std::to_string(t) + (in_key ? " NaN key" : " Inf value"));
        std::vector<T> out(c.B * c.H * c.S * c.Dv);
        linear_recurrence<typename TestFixture::Backend>(
            bhsd<const T>(in.q.data(), c.B, c.H, c.S, c.Dk), bhsd<const T>(in.k.data(), c.B, c.Hk, c.S, c.Dk),
            bhsd<const T>(in.v.data(), c.B, c.Hk, c.S, c.Dv), bhsd(out.data(), c.B, c.H, c.S, c.Dv),
            in.options());
        EXPECT_TRUE(same_finite_pattern(std::vector<double>(out.begin(), out.end()),
                                        reference(in).first, in_key));
      }
}

TEST(LinearRecurrenceBadInput, NamesTheArgumentAndWritesNothing) {
  const index_t B = 1, H = 2, Hk = 1, S = 8, D = 4;
  std::vector<float> q(B * H * S * D, 0.1f), k(B * Hk * S * D, 0.1f), v(B * Hk * S * D, 0.1f),
      out(B * H * S * D, -7.f), g(B * Hk * S, -0.1f), beta(B * Hk * S, 0.5f);
  const auto Q = bhsd<const float>(q.data(), B, H, S, D), K = bhsd<const float>(k.data(), B, Hk, S, D),
             V = bhsd<const float>(v.data(), B, Hk, S, D);
  const auto O = bhsd(out.data(), B, H, S, D);
  const auto G = bhsd<const float>(g.data(), B, Hk, S, 1), Beta = bhsd<const float>(beta.data(), B, Hk, S, 1);
  auto expect_error = [&](const char* needle, linear_recurrence_options o) {
    try {
      linear_recurrence(Q, K, V, O, o);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const fovea::error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    for (float x : out) ASSERT_EQ(x, -7.f) << "written before the error";
  };
  expect_error("options.decay: the gated rule needs a decay", {.rule = update_rule::gated});
  expect_error("options.beta: the delta rule needs beta", {.rule = update_rule::delta});
  expect_error("options.decay: the linear rule takes no decay", {.decay = G});
  expect_error("options.beta: the gated rule takes no beta",
               {.rule = update_rule::gated, .decay = G, .beta = Beta});
  expect_error("options.decay: extent 2 (tokens) is 4",
               {.rule = update_rule::gated, .decay = bhsd<const float>(g.data(), B, Hk, 4, 1)});
  std::vector<float> g3(B * Hk * S * 3, -0.1f);
  expect_error("options.decay: extent 3 is 3, expected 1 or 4 (key dim)",
               {.rule = update_rule::gated, .decay = bhsd<const float>(g3.data(), B, Hk, S, 3)});
  g[3] = std::numeric_limits<float>::quiet_NaN();
  expect_error("options.decay: element (0, 0, 3, 0) is nan",
               {.rule = update_rule::gated, .decay = G});
  g[3] = -0.1f;
  beta[2] = std::numeric_limits<float>::infinity();
  expect_error("options.beta: element (0, 0, 2, 0) is inf", {.rule = update_rule::delta, .beta = Beta});
  beta[2] = 0.5f;
  std::vector<float> state(Hk * D * D);
  expect_error("options.state_in: extent 3 (value dim) is 3",
               {.state_in = bhsd<const float>(state.data(), B, Hk, D, 3)});
  expect_error("options.scale", {.scale = -1.0});
  // A final state over the call's own inputs (found by a new-user trial: head 0's state
  // overwrote head 1's decays before they were read); in place over state_in is allowed.
  std::vector<float> shared(B * Hk * S * D + D * D, 0.25f), st(D * D + 1, 0.25f), st_out(D * D);
  st.pop_back();
  const auto decay_dims = bhsd<const float>(shared.data(), B, Hk, S, D);
  expect_error("options.state_out: memory overlaps options.decay",
               {.rule = update_rule::gated, .decay = decay_dims,
                .state_out = bhsd(shared.data() + 8, B, Hk, D, D)});
  expect_error("options.state_out: memory overlaps options.beta",
               {.rule = update_rule::delta, .beta = bhsd<const float>(shared.data(), B, Hk, S, 1),
                .state_out = bhsd(shared.data() + 4, B, Hk, D, D)});
  expect_error("options.state_out: memory overlaps options.state_in",
               {.state_in = bhsd<const float>(shared.data(), B, Hk, D, D),
                .state_out = bhsd(shared.data() + 1, B, Hk, D, D)});
  linear_recurrence(Q, K, V, O, {.state_in = bhsd<const float>(st.data(), B, Hk, D, D),
                                 .state_out = bhsd(st_out.data(), B, Hk, D, D)});
  const std::vector<float> apart = out;
  linear_recurrence(Q, K, V, O, {.state_in = bhsd<const float>(st.data(), B, Hk, D, D),
                                 .state_out = bhsd(st.data(), B, Hk, D, D)});  // in place
  EXPECT_EQ(out, apart);
  EXPECT_EQ(st, st_out);
  std::fill(out.begin(), out.end(), -7.f);
  try {  // k with a different token count
    linear_recurrence(Q, bhsd<const float>(k.data(), B, Hk, S - 1, D),
                      bhsd<const float>(v.data(), B, Hk, S - 1, D), O);
    ADD_FAILURE() << "no error for a k of other length";
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find("k: extent 2 (seq) is 7"), std::string::npos) << e.what();
  }
}

}  // namespace fovea::test::linear_recurrence_test
