// titans_memory against an f64 token-by-token reading of the Titans paper's linear memory
// (momentum, forgetting, gradients at the chunk's start memory): chunk sizes x gate
// shapes x GQA/MQA x initial states x lengths around the chunk, strong forgetting; the
// delta rule it becomes without momentum and forgetting; stepping in place == the batch;
// thread invariance; NaN reaches later tokens only; bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fovea/fovea.hpp>
#include <limits>
#include <string>
#include <vector>

#include "../common/configs.hpp"
#include "../common/random.hpp"
#include "../common/tolerance.hpp"

namespace fovea::test::titans_memory_test {

struct titans_case {
  index_t B = 1, H = 2, Hk = 1, S = 65, Dk = 16, Dv = 12, chunk = 16;
  bool eta = true, alpha = true, shared_gates = false, initial = false;
  double alpha_max = 0.2;  ///< alpha_t uniform in [0, alpha_max]
  double eta_min = 0.5;    ///< eta_t uniform in [eta_min, 1]
};

std::string describe(const titans_case& c) {
  return "B=" + std::to_string(c.B) + " H=" + std::to_string(c.H) + " Hk=" + std::to_string(c.Hk) +
         " S=" + std::to_string(c.S) + " Dk=" + std::to_string(c.Dk) + " Dv=" + std::to_string(c.Dv) +
         " chunk=" + std::to_string(c.chunk) + (c.eta ? " eta" : "") + (c.alpha ? " alpha" : "") +
         (c.shared_gates ? " shared gates" : "") + (c.initial ? " initial states" : "") +
         " alpha<=" + std::to_string(c.alpha_max) + " eta>=" + std::to_string(c.eta_min);
}

template <class T>
struct titans_inputs {
  titans_case c;
  std::vector<T> q, k, v;
  std::vector<float> eta, theta, alpha, memory, momentum;
  titans_inputs(const titans_case& cs, std::uint64_t seed) : c(cs) {
    q = normal<T>(c.B * c.H * c.S * c.Dk, seed + 1, 0.5);
    k = normal<T>(c.B * c.Hk * c.S * c.Dk, seed + 2, 0.5);
    for (index_t i = 0; i < c.B * c.Hk * c.S; ++i) {  // L2-normalised keys, as the paper uses
      double n = 0;
      for (index_t e = 0; e < c.Dk; ++e) n += double(k[i * c.Dk + e]) * double(k[i * c.Dk + e]);
      for (index_t e = 0; e < c.Dk; ++e) k[i * c.Dk + e] = T(double(k[i * c.Dk + e]) / std::sqrt(n));
    }
    v = normal<T>(c.B * c.Hk * c.S * c.Dv, seed + 3);
    const index_t gates = c.B * (c.shared_gates ? 1 : c.Hk) * c.S;
    theta = uniform<float>(gates, seed + 4, 0.0, 0.4);
    if (c.eta) eta = uniform<float>(gates, seed + 5, c.eta_min, 1.0);
    if (c.alpha) alpha = uniform<float>(gates, seed + 6, 0.0, c.alpha_max);
    if (c.initial) {
      memory = normal<float>(c.B * c.Hk * c.Dk * c.Dv, seed + 7, 0.3);
      momentum = normal<float>(c.B * c.Hk * c.Dk * c.Dv, seed + 8, 0.1);
    }
  }
  index_t gate_heads() const { return c.shared_gates ? 1 : c.Hk; }
  double gate(const std::vector<float>& g, index_t b, index_t hk, index_t t) const {
    if (g.empty()) return 0;
    return g[(b * gate_heads() + (c.shared_gates ? 0 : hk)) * c.S + t];
  }
  titans_memory_options options() const {
    titans_memory_options o;
    o.theta = bhsd<const float>(theta.data(), c.B, gate_heads(), c.S, 1);
    if (c.eta) o.eta = bhsd<const float>(eta.data(), c.B, gate_heads(), c.S, 1);
    if (c.alpha) o.alpha = bhsd<const float>(alpha.data(), c.B, gate_heads(), c.S, 1);
    o.chunk = c.chunk;
    if (c.initial) {
      o.memory_in = bhsd<const float>(memory.data(), c.B, c.Hk, c.Dk, c.Dv);
      o.momentum_in = bhsd<const float>(momentum.data(), c.B, c.Hk, c.Dk, c.Dv);
    }
    return o;
  }
  auto Q() const { return bhsd<const T>(q.data(), c.B, c.H, c.S, c.Dk); }
  auto K() const { return bhsd<const T>(k.data(), c.B, c.Hk, c.S, c.Dk); }
  auto V() const { return bhsd<const T>(v.data(), c.B, c.Hk, c.S, c.Dv); }
};

struct titans_result {
  std::vector<double> out, memory, momentum;
};

/// The paper's update read token by token in double: for every token, the gradient of
/// ||M^T k - v||^2 at M0 (the memory at the start of the token's chunk), then momentum,
/// forgetting and the read.
template <class T>
titans_result reference(const titans_inputs<T>& in) {
  const auto& c = in.c;
  const index_t group = c.H / c.Hk, DD = c.Dk * c.Dv;
  titans_result r{std::vector<double>(c.B * c.H * c.S * c.Dv), std::vector<double>(c.B * c.Hk * DD),
                  std::vector<double>(c.B * c.Hk * DD)};
  for (index_t b = 0; b < c.B; ++b)
    for (index_t hk = 0; hk < c.Hk; ++hk) {
      std::vector<double> M(DD, 0.0), U(DD, 0.0), M0, err(c.Dv);
      if (c.initial)
        for (index_t i = 0; i < DD; ++i) {
          M[i] = in.memory[(b * c.Hk + hk) * DD + i];
          U[i] = in.momentum[(b * c.Hk + hk) * DD + i];
        }
      for (index_t t = 0; t < c.S; ++t) {
        if (t % c.chunk == 0) M0 = M;
        const index_t kt = (b * c.Hk + hk) * c.S + t;
        const double eta = in.gate(in.eta, b, hk, t), theta = in.gate(in.theta, b, hk, t);
        const double alpha = in.gate(in.alpha, b, hk, t);
        for (index_t d = 0; d < c.Dv; ++d) {
          double p = 0;
          for (index_t e = 0; e < c.Dk; ++e) p += M0[e * c.Dv + d] * double(in.k[kt * c.Dk + e]);
          err[d] = p - double(in.v[kt * c.Dv + d]);
        }
        for (index_t e = 0; e < c.Dk; ++e)
          for (index_t d = 0; d < c.Dv; ++d) {
            const double grad = 2 * double(in.k[kt * c.Dk + e]) * err[d];
            double& u = U[e * c.Dv + d];
            u = eta * u - theta * grad;
            M[e * c.Dv + d] = (1 - alpha) * M[e * c.Dv + d] + u;
          }
        for (index_t g = 0; g < group; ++g) {
          const index_t qt = (b * c.H + hk * group + g) * c.S + t;
          for (index_t d = 0; d < c.Dv; ++d) {
            double o = 0;
            for (index_t e = 0; e < c.Dk; ++e) o += M[e * c.Dv + d] * double(in.q[qt * c.Dk + e]);
            r.out[qt * c.Dv + d] = o;
          }
        }
      }
      std::copy(M.begin(), M.end(), r.memory.begin() + (b * c.Hk + hk) * DD);
      std::copy(U.begin(), U.end(), r.momentum.begin() + (b * c.Hk + hk) * DD);
    }
  return r;
}

template <class C>
class TitansMemory : public ::testing::Test {
 protected:
  using T = typename C::value_type;
  using Backend = typename C::backend;
  static double tolerance() { return std::is_same_v<T, float> ? 3e-5 : 1e-6; }

  static void check(const titans_case& c, std::uint64_t seed, int threads = 1) {
    SCOPED_TRACE(describe(c));
    const titans_inputs<T> in(c, seed);
    std::vector<T> out(c.B * c.H * c.S * c.Dv, T(-7));
    std::vector<float> memory(c.B * c.Hk * c.Dk * c.Dv, -7.f), momentum(memory.size(), -7.f);
    auto o = in.options();
    o.memory_out = bhsd(memory.data(), c.B, c.Hk, c.Dk, c.Dv);
    o.momentum_out = bhsd(momentum.data(), c.B, c.Hk, c.Dk, c.Dv);
    o.threads = threads;
    titans_memory<Backend>(in.Q(), in.K(), in.V(), bhsd(out.data(), c.B, c.H, c.S, c.Dv), o);
    const auto want = reference(in);
    const double state_tol = std::max(tolerance(), 2e-6);  // states travel in fp32
    EXPECT_LT(relative_error(std::vector<double>(out.begin(), out.end()), want.out), tolerance())
        << "out";
    EXPECT_LT(relative_error(std::vector<double>(memory.begin(), memory.end()), want.memory),
              state_tol)
        << "memory";
    EXPECT_LT(relative_error(std::vector<double>(momentum.begin(), momentum.end()), want.momentum),
              state_tol)
        << "momentum";
  }
};
TYPED_TEST_SUITE(TitansMemory, configs, config_names);

TYPED_TEST(TitansMemory, EveryChunkAndGateShape) {
  std::uint64_t seed = 1;
  for (index_t chunk : {1, 4, 16, 64})
    for (bool eta : {false, true})
      for (bool alpha : {false, true})
        for (bool shared : {false, true}) {
          titans_case c;
          c.chunk = chunk, c.eta = eta, c.alpha = alpha, c.shared_gates = shared;
          c.initial = (chunk + eta + alpha) % 2 == 0;
          TestFixture::check(c, ++seed);
        }
}

TYPED_TEST(TitansMemory, LengthsAroundTheChunk) {
  std::uint64_t seed = 100;
  for (index_t s : {0, 1, 2, 15, 16, 17, 63, 64, 65, 1000})
    for (index_t chunk : {1, 16}) {
      titans_case c;
      c.S = s, c.chunk = chunk, c.initial = s % 2 == 1;
      TestFixture::check(c, ++seed);
    }
}

TYPED_TEST(TitansMemory, GroupsHeadDimsAndBatches) {
  std::uint64_t seed = 200;
  for (auto [H, Hk] : {std::pair<index_t, index_t>{4, 4}, {4, 2}, {6, 1}})
    for (auto [Dk, Dv] : {std::pair<index_t, index_t>{1, 1}, {3, 7}, {32, 32}, {17, 40}}) {
      titans_case c;
      c.B = 2, c.H = H, c.Hk = Hk, c.Dk = Dk, c.Dv = Dv, c.S = 70, c.initial = true;
      c.chunk = Dk % 2 == 1 ? 5 : 16;
      TestFixture::check(c, ++seed);
    }
}

// alpha up to 1 (everything forgotten) and eta down to 0 (no momentum) and up to 1: the
// within-chunk products underflow to 0 and nothing overflows.
TYPED_TEST(TitansMemory, StrongForgettingAndFullMomentum) {
  std::uint64_t seed = 300;
  for (auto [alpha_max, eta_min] : {std::pair{1.0, 0.0}, {0.9, 0.9}, {0.0, 1.0}})
    for (index_t chunk : {1, 16, 64}) {
      titans_case c;
      c.S = 200, c.chunk = chunk, c.alpha_max = alpha_max, c.eta_min = eta_min, c.initial = true;
      TestFixture::check(c, ++seed);
    }
}

// Without momentum or forgetting and with chunks of one token, the memory is the delta
// rule's state with beta = 2 theta.
TYPED_TEST(TitansMemory, IsTheDeltaRuleWithoutMomentumOrForgetting) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  titans_case c;
  c.H = 4, c.Hk = 2, c.S = 100, c.chunk = 1, c.eta = false, c.alpha = false, c.initial = false;
  const titans_inputs<T> in(c, 17);
  std::vector<T> a(c.B * c.H * c.S * c.Dv), b(a.size());
  titans_memory<Backend>(in.Q(), in.K(), in.V(), bhsd(a.data(), c.B, c.H, c.S, c.Dv), in.options());
  std::vector<float> beta(in.theta.size());
  for (std::size_t i = 0; i < beta.size(); ++i) beta[i] = 2 * in.theta[i];
  linear_recurrence<Backend>(in.Q(), in.K(), in.V(), bhsd(b.data(), c.B, c.H, c.S, c.Dv),
                             {.rule = update_rule::delta,
                              .beta = bhsd<const float>(beta.data(), c.B, c.Hk, c.S, 1),
                              .scale = 1.0});
  const double tolerance = std::is_same_v<T, float> ? 2e-5 : 1e-9;
  EXPECT_LT(relative_error(std::vector<double>(a.begin(), a.end()),
                           std::vector<double>(b.begin(), b.end())),
            tolerance);
}

TYPED_TEST(TitansMemory, ThreadCountNeverChangesABit) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  titans_case c;
  c.B = 2, c.H = 4, c.Hk = 2, c.S = 150;
  const titans_inputs<T> in(c, 9);
  std::vector<T> first;
  for (int threads : {1, 2, 3, 0}) {
    std::vector<T> out(c.B * c.H * c.S * c.Dv);
    auto o = in.options();
    o.threads = threads;
    titans_memory<Backend>(in.Q(), in.K(), in.V(), bhsd(out.data(), c.B, c.H, c.S, c.Dv), o);
    if (first.empty())
      first = out;
    else
      EXPECT_EQ(0, std::memcmp(first.data(), out.data(), out.size() * sizeof(T))) << threads;
  }
}

/// Tokens [t0, t0 + n) of a (B, heads, S, dim) buffer.
template <class T>
tensor_view<T, 4> tokens(T* p, index_t B, index_t heads, index_t S, index_t dim, index_t t0,
                         index_t n) {
  return slice(bhsd(p, B, heads, S, dim), 2, t0, n);
}

// Decoding in place (memory_in = memory_out): steps of whole chunks give the batch's bits;
// with chunks of one token, steps of one token do too.
TYPED_TEST(TitansMemory, SteppingInPlaceEqualsTheBatch) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  for (index_t chunk : {16, 1, 3}) {  // (chunk 3: S = 97 leaves a one-token tail)
    titans_case c;
    c.H = 4, c.Hk = 2, c.S = chunk == 3 ? 97 : 96, c.chunk = chunk, c.shared_gates = true;
    SCOPED_TRACE(describe(c));
    const titans_inputs<T> in(c, 77);
    const index_t DD = c.B * c.Hk * c.Dk * c.Dv;
    std::vector<T> batch(c.B * c.H * c.S * c.Dv), stepped(batch.size());
    std::vector<float> batch_memory(DD), batch_momentum(DD), memory(DD, 0.f), momentum(DD, 0.f);
    auto o = in.options();
    o.memory_out = bhsd(batch_memory.data(), c.B, c.Hk, c.Dk, c.Dv);
    o.momentum_out = bhsd(batch_momentum.data(), c.B, c.Hk, c.Dk, c.Dv);
    titans_memory<Backend>(in.Q(), in.K(), in.V(), bhsd(batch.data(), c.B, c.H, c.S, c.Dv), o);
    const index_t step = chunk == 1 ? 1 : chunk == 3 ? 6 : 32;
    for (index_t t0 = 0; t0 < c.S; t0 += step) {
      const index_t n = std::min(step, c.S - t0);
      titans_memory_options so;
      so.theta = tokens<const float>(in.theta.data(), c.B, 1, c.S, 1, t0, n);
      so.eta = tokens<const float>(in.eta.data(), c.B, 1, c.S, 1, t0, n);
      so.alpha = tokens<const float>(in.alpha.data(), c.B, 1, c.S, 1, t0, n);
      so.chunk = chunk;
      so.memory_in = so.memory_out = bhsd(memory.data(), c.B, c.Hk, c.Dk, c.Dv);
      so.momentum_in = so.momentum_out = bhsd(momentum.data(), c.B, c.Hk, c.Dk, c.Dv);
      titans_memory<Backend>(tokens<const T>(in.q.data(), c.B, c.H, c.S, c.Dk, t0, n),
                             tokens<const T>(in.k.data(), c.B, c.Hk, c.S, c.Dk, t0, n),
                             tokens<const T>(in.v.data(), c.B, c.Hk, c.S, c.Dv, t0, n),
                             tokens<T>(stepped.data(), c.B, c.H, c.S, c.Dv, t0, n), so);
    }
    if (std::is_same_v<T, float>) {  // double crosses fp32 states between the calls
      EXPECT_EQ(batch, stepped);
      EXPECT_EQ(batch_memory, memory);
      EXPECT_EQ(batch_momentum, momentum);
    } else {
      EXPECT_LT(relative_error(std::vector<double>(stepped.begin(), stepped.end()),
                               std::vector<double>(batch.begin(), batch.end())),
                1e-5);
    }
  }
}

// A NaN key or an Inf value at token t (lane, chunk and mid-chunk positions) reaches the
// outputs of tokens t.. of its group and nothing before t nor in other groups. (The
// reference and the kernel agree on NaN; an Inf may come out as Inf or NaN.)
TYPED_TEST(TitansMemory, NonFiniteInputsReachLaterTokensOnly) {
  using T = typename TestFixture::T;
  for (index_t t : {0, 7, 15, 16, 17, 40})
    for (bool in_key : {true, false}) {
      titans_case c;
      c.H = 4, c.Hk = 2, c.S = 48;
      titans_inputs<T> in(c, 31 + t);
      if (in_key)
        in.k[(1 * c.S + t) * c.Dk + 3] = std::numeric_limits<T>::quiet_NaN();
      else
        in.v[(1 * c.S + t) * c.Dv + 5] = std::numeric_limits<T>::infinity();
      SCOPED_TRACE(describe(c) + " token " + std::to_string(t) + (in_key ? " NaN key" : " Inf value"));
      std::vector<T> out(c.B * c.H * c.S * c.Dv);
      titans_memory<typename TestFixture::Backend>(in.Q(), in.K(), in.V(),
                                                   bhsd(out.data(), c.B, c.H, c.S, c.Dv), in.options());
      const auto want = reference(in);
      // Finite exactly where the reference is (an Inf value gives Inf or NaN by the order
      // of the sums: sum_e q_e k_e Inf_e in the recurrence, (q . k) Inf in the chunk).
      const std::vector<double> got(out.begin(), out.end());
      EXPECT_TRUE(same_finite_pattern(got, want.out, in_key));
      EXPECT_LT(relative_error(got, want.out, in_key), TestFixture::tolerance());
    }
}

TEST(TitansMemoryBadInput, NamesTheArgumentAndWritesNothing) {
  const index_t B = 1, H = 2, Hk = 1, S = 8, D = 4;
  std::vector<float> q(B * H * S * D, 0.1f), k(B * Hk * S * D, 0.1f), v(B * Hk * S * D, 0.1f),
      out(B * H * S * D, -7.f), gate(B * Hk * S, 0.5f), memory(Hk * D * D, -7.f);
  const auto Q = bhsd<const float>(q.data(), B, H, S, D), K = bhsd<const float>(k.data(), B, Hk, S, D),
             V = bhsd<const float>(v.data(), B, Hk, S, D);
  const auto O = bhsd(out.data(), B, H, S, D);
  const auto G = bhsd<const float>(gate.data(), B, Hk, S, 1);
  auto expect_error = [&](const char* needle, titans_memory_options o) {
    try {
      titans_memory(Q, K, V, O, o);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const fovea::error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    for (float x : out) ASSERT_EQ(x, -7.f) << "written before the error";
    for (float x : memory) ASSERT_EQ(x, -7.f) << "state written before the error";
  };
  expect_error("options.theta: the step size is required", {});
  expect_error("options.chunk: is 0, expected >= 1", {.theta = G, .chunk = 0});
  expect_error("options.theta: extent 2 (tokens) is 4",
               {.theta = bhsd<const float>(gate.data(), B, Hk, 4, 1)});
  gate[3] = 1.5f;
  expect_error("options.eta: element (0, 0, 3, 0) is 1.5, expected a finite value in [0",
               {.eta = G, .theta = bhsd<const float>(v.data(), B, Hk, S, 1)});
  expect_error("options.alpha: element (0, 0, 3, 0) is 1.5",
               {.theta = bhsd<const float>(v.data(), B, Hk, S, 1), .alpha = G});
  gate[3] = -0.5f;
  expect_error("options.theta: element (0, 0, 3, 0) is -0.5", {.theta = G});
  gate[3] = std::numeric_limits<float>::quiet_NaN();
  expect_error("options.theta: element (0, 0, 3, 0) is nan", {.theta = G});
  gate[3] = 0.5f;
  expect_error("options.memory_in: extent 3 (value dim) is 3",
               {.theta = G, .memory_in = bhsd<const float>(memory.data(), B, Hk, D, 3)});
  const auto M = bhsd(memory.data(), B, Hk, D, D);
  expect_error("options.memory_out: memory overlaps options.momentum_out",
               {.theta = G, .memory_out = M, .momentum_out = M});
  expect_error("options.memory_out: memory overlaps options.momentum_in",
               {.theta = G, .momentum_in = M, .memory_out = M});
  expect_error("options.memory_out: memory overlaps q",
               {.theta = G, .memory_out = bhsd(q.data(), B, Hk, D, D)});
  expect_error("options.scale", {.theta = G, .scale = 0.0});
  expect_error("options.threads", {.theta = G, .threads = -1});
}

}  // namespace fovea::test::titans_memory_test
