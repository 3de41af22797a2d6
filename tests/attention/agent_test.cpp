// agent_attention against a two-stage reference written from the definition.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fovea/fovea.hpp>
#include <type_traits>
#include <vector>

#include "../common/attention_case.hpp"
#include "../common/configs.hpp"

namespace fovea::test::agent_test {

/// softmax(scale * x y^T + bias) z for one (row set x) in Acc; bias(i, j) or 0.
template <class Acc, class Bias>
std::vector<Acc> softmax_rows(const std::vector<Acc>& x, index_t rows, const std::vector<Acc>& y,
                              index_t cols, const std::vector<Acc>& z, index_t D, index_t Dv,
                              Acc scale, Bias bias) {
  std::vector<Acc> out(rows * Dv, Acc(0)), p(cols);
  for (index_t i = 0; i < rows; ++i) {
    Acc m = -INFINITY, l = 0;
    for (index_t j = 0; j < cols; ++j) {
      Acc s = 0;
      for (index_t d = 0; d < D; ++d) s += x[i * D + d] * y[j * D + d];
      p[j] = scale * s + bias(i, j);
      m = std::max(m, p[j]);
    }
    if (cols == 0) continue;
    for (index_t j = 0; j < cols; ++j) l += (p[j] = std::exp(p[j] - m));
    for (index_t j = 0; j < cols; ++j)
      for (index_t e = 0; e < Dv; ++e) out[i * Dv + e] += p[j] / l * z[j * Dv + e];
  }
  return out;
}

/// The reference: agents pooled from q (or given), VA, then the broadcast stage.
template <class Acc, class T>
std::vector<double> reference_agent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                                    tensor_view<const T, 4> v, index_t m,
                                    std::type_identity_t<const std::vector<T>*> explicit_agents,
                                    const std::vector<float>& b1, const std::vector<float>& b2) {
  const index_t B = q.extent(0), H = q.extent(1), n = q.extent(2), D = q.extent(3);
  const index_t Hk = k.extent(1), Sk = k.extent(2), Dv = v.extent(3);
  const Acc scale = Acc(1) / std::sqrt(Acc(D));
  std::vector<double> out(B * H * n * Dv);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h) {
      std::vector<Acc> qs(n * D), ks(Sk * D), vs(Sk * Dv), agents(m * D, Acc(0));
      for (index_t i = 0; i < n; ++i)
        for (index_t d = 0; d < D; ++d) qs[i * D + d] = Acc(q(b, h, i, d));
      for (index_t j = 0; j < Sk; ++j) {
        for (index_t d = 0; d < D; ++d) ks[j * D + d] = Acc(k(b, h / (H / Hk), j, d));
        for (index_t d = 0; d < Dv; ++d) vs[j * Dv + d] = Acc(v(b, h / (H / Hk), j, d));
      }
      for (index_t t = 0; t < m; ++t) {
        if (explicit_agents) {
          for (index_t d = 0; d < D; ++d)
            agents[t * D + d] = Acc((*explicit_agents)[((b * H + h) * m + t) * D + d]);
          continue;
        }
        const index_t lo = (t * n) / m, hi = ((t + 1) * n + m - 1) / m;
        for (index_t i = lo; i < hi; ++i)
          for (index_t d = 0; d < D; ++d) agents[t * D + d] += qs[i * D + d] / Acc(hi - lo);
      }
      const auto va =
          softmax_rows<Acc>(agents, m, ks, Sk, vs, D, Dv, scale, [&](index_t t, index_t j) {
            return b1.empty() ? Acc(0) : Acc(b1[t * Sk + j]);  // (1, 1, m, Sk)
          });
      const auto o = softmax_rows<Acc>(qs, n, agents, m, va, D, Dv, scale, [&](index_t, index_t t) {
        return b2.empty() ? Acc(0) : Acc(b2[t]);  // (1, 1, 1, m)
      });
      for (index_t i = 0; i < n * Dv; ++i) out[(b * H + h) * n * Dv + i] = double(o[i]);
    }
  return out;
}

template <class C>
class AgentAttention : public ::testing::Test {};
TYPED_TEST_SUITE(AgentAttention, configs, config_names);

TYPED_TEST(AgentAttention, PooledAgentsMatchTheReference) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  for (index_t n : {1, 17, 200})
    for (index_t m : {1, 7, 64})
      for (index_t hk : {2, 1}) {
        const shape s{2, 2, hk, n, n + 5, 16, 12};
        SCOPED_TRACE(describe(s, 0) + " m=" + std::to_string(m));
        const attention_inputs<T> in(s, 0, n * m + hk);
        std::vector<T> out(s.B * s.H * s.Sq * s.Dv);
        const auto ov = output_view(out, s);
        agent_attention<Backend>(in.qv(), in.kv(), in.vv(), ov, {.num_agents = m, .threads = 1});
        const auto want = reference_agent<double>(in.qv(), in.kv(), in.vv(), m, nullptr, {}, {});
        const auto naive = reference_agent<T>(in.qv(), in.kv(), in.vv(), m, nullptr, {}, {});
        EXPECT_TRUE(within_tolerance<T>(to_dense(ov), want, naive));
      }
}

TYPED_TEST(AgentAttention, ExplicitAgentsAndBiases) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape s{1, 2, 1, 90, 120, 24, 8};
  const index_t m = 9;
  const attention_inputs<T> in(s, feature::bshd, 3);
  const auto agents = normal<T>(s.B * s.H * m * s.D, 4);
  const auto b1 = normal<float>(m * s.Sk, 5), b2 = normal<float>(m, 6);
  std::vector<T> out(s.B * s.H * s.Sq * s.Dv);
  const auto ov = output_view(out, s);
  agent_options o{.threads = 2};
  o.agent_bias = view<const float, 4>(b1.data(), {1, 1, m, s.Sk});
  o.query_bias = view<const float, 4>(b2.data(), {1, 1, 1, m}, {0, 0, 0, 1});
  agent_attention<Backend>(in.qv(), in.kv(), in.vv(), ov, bhsd(agents.data(), s.B, s.H, m, s.D), o);
  const auto want = reference_agent<double>(in.qv(), in.kv(), in.vv(), m, &agents, b1, b2);
  const auto naive = reference_agent<T>(in.qv(), in.kv(), in.vv(), m, &agents, b1, b2);
  EXPECT_TRUE(within_tolerance<T>(to_dense(ov), want, naive));
}

TYPED_TEST(AgentAttention, ConstantValuesGiveConstantOutput) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  attention_inputs<T> in({1, 2, 1, 150, 150, 16, 4}, 0, 8);
  std::fill(in.v.begin(), in.v.end(), T(2.5));
  std::vector<T> out(2 * 150 * 4);
  agent_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(out.data(), 1, 2, 150, 4),
                           {.num_agents = 12, .threads = 1});
  for (T x : out) EXPECT_NEAR(double(x), 2.5, (std::is_same_v<T, float> ? 1e-5 : 1e-12));
}

TYPED_TEST(AgentAttention, QueriesAsAgentsWithDiagonalBiasIsSoftmaxAttention) {  // spec oracle 1
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const index_t n = 70, sk = 90, D = 16, Dv = 8;
  const attention_inputs<T> in({1, 2, 1, n, sk, D, Dv}, 0, 11);
  std::vector<float> diagonal(n * n, -INFINITY);
  for (index_t i = 0; i < n; ++i) diagonal[i * n + i] = 0;
  agent_options o{.threads = 1};
  o.query_bias = view<const float, 4>(diagonal.data(), {1, 1, n, n});
  std::vector<T> agent(2 * n * Dv), dense(agent.size());
  agent_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(agent.data(), 1, 2, n, Dv), in.qv(), o);
  softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(dense.data(), 1, 2, n, Dv),
                             {.threads = 1});
  EXPECT_EQ(agent, dense);  // one visible agent: weight exactly 1, the agent's row unchanged
}

TYPED_TEST(AgentAttention, OneAgentGivesTheSameRowEverywhere) {  // spec oracle 2
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const attention_inputs<T> in({1, 1, 1, 40, 55, 8, 6}, 0, 12);
  std::vector<T> out(40 * 6);
  agent_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(out.data(), 1, 1, 40, 6),
                           {.num_agents = 1, .threads = 1});
  const auto want = reference_agent<double>(in.qv(), in.kv(), in.vv(), 1, nullptr, {}, {});
  for (index_t i = 1; i < 40; ++i)
    for (index_t m = 0; m < 6; ++m) EXPECT_EQ(out[i * 6 + m], out[m]) << "row " << i;
  for (index_t m = 0; m < 6; ++m)
    EXPECT_NEAR(double(out[m]), want[m], (std::is_same_v<T, float> ? 1e-5 : 1e-12));
}

TYPED_TEST(AgentAttention, ThreadCountNeverChangesABit) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const attention_inputs<T> in({2, 4, 2, 333, 333, 32, 32}, 0, 7);
  expect_same_bits_for_threads([&](int threads) {
    std::vector<T> out(2 * 4 * 333 * 32);
    agent_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(out.data(), 2, 4, 333, 32),
                             {.num_agents = 16, .threads = threads});
    return out;
  });
}

TYPED_TEST(AgentAttention, BadInputThrowsNamingTheArgument) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  std::vector<T> q(4 * 10 * 8, T(1)), k(q.size(), T(1)), v(q.size(), T(1)), out(q.size(), T(42)),
      a(4 * 3 * 8, T(1));
  const auto Q = bhsd(q.data(), 1, 4, 10, 8), K = bhsd(k.data(), 1, 4, 10, 8),
             V = bhsd(v.data(), 1, 4, 10, 8);
  const auto O = bhsd(out.data(), 1, 4, 10, 8);
  auto expect_error = [&](const char* needle, auto&& call) {
    expect_rejected(needle, out, T(42), call);
  };
  expect_error("options.num_agents",
               [&] { agent_attention<Backend>(Q, K, V, O, {.num_agents = 0}); });
  expect_error("options.causal", [&] {  // pooled agents would see future queries
    agent_attention<Backend>(Q, K, V, O, {.causal = true});
  });
  expect_error("agents: extent 3",
               [&] { agent_attention<Backend>(Q, K, V, O, bhsd(a.data(), 1, 4, 4, 6)); });
  const float bias[3] = {0, 0, 0};
  agent_options bad;
  bad.query_bias = view<const float, 4>(bias, {1, 1, 1, 2});
  expect_error("options.query_bias",
               [&] { agent_attention<Backend>(Q, K, V, O, bhsd(a.data(), 1, 4, 3, 8), bad); });
}

/// The causal variant from its definition: query i (at i + Sk - Sq) uses each agent's
/// softmax over keys j <= i + Sk - Sq (plus B1), then softmax over agents (plus B2).
template <class Acc, class T>
std::vector<double> reference_causal_agent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                                           tensor_view<const T, 4> v, const std::vector<T>& a,
                                           index_t m, const std::vector<float>& b1,
                                           const std::vector<float>& b2) {
  const index_t B = q.extent(0), H = q.extent(1), n = q.extent(2), D = q.extent(3);
  const index_t Hk = k.extent(1), Sk = k.extent(2), Dv = v.extent(3);
  const Acc scale = Acc(1) / std::sqrt(Acc(D));
  std::vector<double> out(B * H * n * Dv);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < n; ++i) {
        const index_t last = i + Sk - n;
        std::vector<Acc> p(m), va(m * Dv, Acc(0));
        for (index_t t = 0; t < m; ++t) {
          const T* at = a.data() + ((b * H + h) * m + t) * D;
          std::vector<Acc> w;
          Acc top = -INFINITY;
          for (index_t j = 0; j <= last && j < Sk; ++j) {
            Acc dot = 0;
            for (index_t d = 0; d < D; ++d) dot += Acc(at[d]) * Acc(k(b, h / (H / Hk), j, d));
            w.push_back(scale * dot + (b1.empty() ? Acc(0) : Acc(b1[t * Sk + j])));
            top = std::max(top, w.back());
          }
          Acc sum = 0;
          for (Acc& x : w) sum += (x = std::exp(x - top));
          for (std::size_t j = 0; j < w.size(); ++j)
            for (index_t e = 0; e < Dv; ++e)
              va[t * Dv + e] += w[j] / sum * Acc(v(b, h / (H / Hk), j, e));
          Acc dot = 0;
          for (index_t d = 0; d < D; ++d) dot += Acc(at[d]) * Acc(q(b, h, i, d));
          p[t] = scale * dot + (b2.empty() ? Acc(0) : Acc(b2[i * m + t]));
        }
        const Acc top = *std::max_element(p.begin(), p.end());
        Acc sum = 0;
        for (Acc& x : p) sum += (x = std::exp(x - top));
        for (index_t e = 0; e < Dv; ++e) {
          Acc x = 0;
          for (index_t t = 0; t < m; ++t) x += p[t] / sum * va[t * Dv + e];
          out[((b * H + h) * n + i) * Dv + e] = double(x);
        }
      }
  return out;
}

TYPED_TEST(AgentAttention, CausalVariantMatchesItsDefinition) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const index_t m = 7;
  for (const shape& s : {shape{2, 4, 2, 60, 60, 16, 12}, shape{1, 2, 1, 30, 75, 13, 5},
                         shape{1, 2, 2, 40, 11, 6, 3}, shape{1, 1, 1, 1, 1, 1, 1}}) {
    SCOPED_TRACE(describe(s, feature::causal));
    const attention_inputs<T> in(s, 0, 31);
    const auto agents = normal<T>(s.B * s.H * m * s.D, 32);
    const auto b1 = normal<float>(m * s.Sk, 33), b2 = normal<float>(s.Sq * m, 34);
    std::vector<T> out(s.B * s.H * s.Sq * s.Dv);
    agent_options o{.causal = true, .threads = 2};
    o.agent_bias = view<const float, 4>(b1.data(), {1, 1, m, s.Sk});
    o.query_bias = view<const float, 4>(b2.data(), {1, 1, s.Sq, m});
    const auto A = bhsd(agents.data(), s.B, s.H, m, s.D);
    agent_attention<Backend>(in.qv(), in.kv(), in.vv(), output_view(out, s), A, o);
    const auto want = reference_causal_agent<double>(in.qv(), in.kv(), in.vv(), agents, m, b1, b2);
    const auto naive = reference_causal_agent<T>(in.qv(), in.kv(), in.vv(), agents, m, b1, b2);
    EXPECT_TRUE(within_tolerance<T>(std::vector<double>(out.begin(), out.end()), want, naive));
  }
}

// Spec oracle 5: out_i does not change when tokens after i change, and stepping the
// decode state (one token, or several at a time) gives the batch result bit for bit.
TYPED_TEST(AgentAttention, CausalVariantIgnoresTheFutureAndDecodesExactly) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape s{2, 4, 2, 50, 50, 16, 16};
  const index_t m = 6;
  attention_inputs<T> in(s, 0, 41);
  const auto agents = normal<T>(s.B * s.H * m * s.D, 42);
  const auto A = bhsd(agents.data(), s.B, s.H, m, s.D);
  auto run = [&] {
    std::vector<T> out(s.B * s.H * s.Sq * s.Dv);
    agent_attention<Backend>(in.qv(), in.kv(), in.vv(), output_view(out, s), A, {.causal = true});
    return out;
  };
  const auto batch = run();
  const index_t cut = 20;
  for (index_t b = 0; b < s.B; ++b)  // change every token after `cut`
    for (index_t hk = 0; hk < s.Hk; ++hk)
      for (index_t j = cut + 1; j < s.Sk; ++j) {
        in.k[((b * s.Hk + hk) * s.Sk + j) * s.D] += T(3);
        in.v[((b * s.Hk + hk) * s.Sk + j) * s.Dv] -= T(2);
      }
  const auto changed = run();
  for (index_t bh = 0; bh < s.B * s.H; ++bh)
    for (index_t i = 0; i < s.Sq; ++i)
      for (index_t e = 0; e < s.Dv; ++e) {
        const std::size_t at = (bh * s.Sq + i) * s.Dv + e;
        if (i <= cut) {
          EXPECT_EQ(batch[at], changed[at]) << i;
        }
      }
  for (index_t chunk : {1, 3, 7}) {
    agent_state<T, Backend> state(A, s.Dv);
    std::vector<T> stepped(changed.size());
    for (index_t t0 = 0; t0 < s.Sq; t0 += chunk) {
      const index_t n = std::min(chunk, s.Sq - t0);
      auto rows = [&](const auto* base, index_t heads, index_t dim) {
        return view<const T, 4>(base + t0 * dim, {s.B, heads, n, dim},
                                {heads * s.Sq * dim, s.Sq * dim, dim, 1});
      };
      state.step(rows(in.q.data(), s.H, s.D), rows(in.k.data(), s.Hk, s.D),
                 rows(in.v.data(), s.Hk, s.Dv),
                 view<T, 4>(stepped.data() + t0 * s.Dv, {s.B, s.H, n, s.Dv},
                            {s.H * s.Sq * s.Dv, s.Sq * s.Dv, s.Dv, 1}));
    }
    EXPECT_EQ(stepped, changed) << "chunk " << chunk;
    EXPECT_EQ(state.tokens(), s.Sq);
  }
}

// 2-D pooling: p x p agents as adaptive average pooling over the token grid, and the
// depthwise 3x3 conv term of V added on top.
TYPED_TEST(AgentAttention, GridPoolingAndDepthwiseConv) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const index_t gh = 7, gw = 9, n = gh * gw, p = 3, D = 8, Dv = 6;
  const shape s{2, 4, 2, n, n, D, Dv};
  const attention_inputs<T> in(s, 0, 51);
  std::vector<T> agents(s.B * s.H * p * p * D, T(0));
  for (index_t bh = 0; bh < s.B * s.H; ++bh)
    for (index_t r = 0; r < p; ++r)
      for (index_t c = 0; c < p; ++c) {
        const index_t y0 = r * gh / p, y1 = ((r + 1) * gh + p - 1) / p;
        const index_t x0 = c * gw / p, x1 = ((c + 1) * gw + p - 1) / p;
        T* a = agents.data() + (bh * p * p + r * p + c) * D;
        for (index_t y = y0; y < y1; ++y)
          for (index_t x = x0; x < x1; ++x)
            for (index_t d = 0; d < D; ++d) a[d] += in.q[(bh * n + y * gw + x) * D + d];
        for (index_t d = 0; d < D; ++d) a[d] /= T((y1 - y0) * (x1 - x0));
      }
  std::vector<T> pooled(s.B * s.H * n * Dv), given(pooled.size()), conv(pooled.size());
  const auto O = [&](std::vector<T>& x) { return bhsd(x.data(), s.B, s.H, n, Dv); };
  agent_options o{.num_agents = p * p, .grid_h = gh, .grid_w = gw};
  agent_attention<Backend>(in.qv(), in.kv(), in.vv(), O(pooled), o);
  agent_attention<Backend>(in.qv(), in.kv(), in.vv(), O(given),
                           bhsd<const T>(agents.data(), s.B, s.H, p * p, D), {});
  for (std::size_t i = 0; i < pooled.size(); ++i)
    EXPECT_NEAR(double(pooled[i]), double(given[i]), 1e-5) << i;

  const auto w = normal<float>(s.H * Dv * 9, 52), bias = normal<float>(s.H * Dv, 53);
  o.dwc_weight = view<const float, 4>(w.data(), {s.H, Dv, 3, 3});
  o.dwc_bias = view<const float, 2>(bias.data(), {s.H, Dv});
  agent_attention<Backend>(in.qv(), in.kv(), in.vv(), O(conv), o);
  for (index_t b = 0; b < s.B; ++b)
    for (index_t h = 0; h < s.H; ++h)
      for (index_t y = 0; y < gh; ++y)
        for (index_t x = 0; x < gw; ++x)
          for (index_t e = 0; e < Dv; ++e) {
            double want = bias[h * Dv + e];
            for (index_t dy = -1; dy <= 1; ++dy)
              for (index_t dx = -1; dx <= 1; ++dx) {
                const index_t yy = y + dy, xx = x + dx;
                if (yy < 0 || yy >= gh || xx < 0 || xx >= gw) continue;
                want += double(w[((h * Dv + e) * 3 + dy + 1) * 3 + dx + 1]) *
                        double(in.v[((b * s.Hk + h / 2) * n + yy * gw + xx) * Dv + e]);
              }
            const std::size_t at = ((b * s.H + h) * n + y * gw + x) * Dv + e;
            EXPECT_NEAR(double(conv[at]) - double(pooled[at]), want, 1e-4) << at;
          }
  std::vector<T> untouched(pooled.size(), T(9));
  auto bad = [&](const char* needle, agent_options x) {
    expect_rejected(needle, untouched, T(9),
                    [&] { agent_attention<Backend>(in.qv(), in.kv(), in.vv(), O(untouched), x); });
  };
  bad("options.num_agents", {.num_agents = 8, .grid_h = gh, .grid_w = gw});
  bad("options.grid_h", {.num_agents = 9, .grid_h = 3, .grid_w = 0});
  bad("options.grid_h", {.num_agents = 9, .grid_h = 5, .grid_w = 5});
  agent_options no_grid;
  no_grid.dwc_weight = o.dwc_weight;
  bad("options.dwc_weight", no_grid);
  agent_options wrong = o;
  wrong.dwc_weight = view<const float, 4>(w.data(), {s.H, Dv, 1, 9});
  bad("options.dwc_weight", wrong);
}

}  // namespace fovea::test::agent_test
