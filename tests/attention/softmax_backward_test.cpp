// softmax_attention_backward against f64 gradients written from the definitions (the
// tolerance rule: at most 2x the error of the same definitions in fp32, plus the floor),
// every option alone and in pairs over awkward shapes; the reference itself against
// central finite differences; thread invariance; masked rows and keys; bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fovea/fovea.hpp>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "../common/random.hpp"
#include "../common/reference.hpp"
#include "../common/reference_backward.hpp"
#include "../common/tolerance.hpp"

namespace fovea::test::softmax_backward_test {

struct shape_case {
  index_t B, H, Hk, Sq, Sk, D, Dv;
};

enum feature : unsigned {
  causal = 1,
  top_left = 2,
  window = 4,
  softcap = 8,
  alibi = 16,
  bias = 32,
  mask = 64,
  sinks = 128,
  scale = 256,
  bshd_layout = 512,
};
constexpr unsigned feature_count = 10;

/// One problem's inputs and fovea's forward (out, lse), as a training step has them.
struct problem {
  shape_case s;
  std::vector<float> q, k, v, out, dout, lse, bias_data, slopes, sink_logits;
  std::vector<std::uint8_t> mask_data;
  softmax_options o;
  bool bshd = false;

  tensor_view<float, 4> view4(std::vector<float>& x, index_t b, index_t h, index_t n, index_t d) {
    return bshd ? fovea::bshd(x.data(), b, n, h, d) : bhsd(x.data(), b, h, n, d);
  }
  problem(const shape_case& sc, unsigned f, int threads) : s(sc) {
    bshd = f & bshd_layout;
    q = normal<float>(s.B * s.H * s.Sq * s.D, 1);
    k = normal<float>(s.B * s.Hk * s.Sk * s.D, 2);
    v = normal<float>(s.B * s.Hk * s.Sk * s.Dv, 3);
    dout = normal<float>(s.B * s.H * s.Sq * s.Dv, 4);
    out.resize(dout.size());
    lse.resize(s.B * s.H * s.Sq);
    o.causal = f & causal;
    if (f & top_left) o.align = diagonal::top_left;
    if (f & window) o.window_left = 5, o.window_right = o.causal ? 0 : 7;
    if (f & softcap) o.softcap = 2.5;
    if (f & scale) o.scale = 0.3;
    if (f & alibi) {
      slopes = uniform<float>(s.H, 5, 0.01, 0.3);
      o.alibi_slopes = view<const float>(slopes.data(), {1, s.H});
    }
    if (f & bias) {
      bias_data = normal<float>(s.B * s.Sq * s.Sk, 6);
      if (!bias_data.empty()) bias_data[0] = -HUGE_VALF;  // a hidden key
      o.bias = view<const float>(bias_data.data(), {s.B, 1, s.Sq, s.Sk});
    }
    if (f & mask) {
      mask_data = bernoulli(s.H * s.Sk, 7, 0.7);
      o.mask = view<const std::uint8_t>(mask_data.data(), {1, s.H, 1, s.Sk});
    }
    if (f & sinks) {
      sink_logits = normal<float>(s.H, 8);
      o.sinks = view<const float>(sink_logits.data(), {s.H});
    }
    o.threads = threads;
    softmax_options fwd = o;
    fwd.lse = view(lse.data(), {s.B, s.H, s.Sq});
    softmax_attention(Q(), K(), V(), view4(out, s.B, s.H, s.Sq, s.Dv), fwd);
  }
  tensor_view<const float, 4> Q() { return view4(q, s.B, s.H, s.Sq, s.D); }
  tensor_view<const float, 4> K() { return view4(k, s.B, s.Hk, s.Sk, s.D); }
  tensor_view<const float, 4> V() { return view4(v, s.B, s.Hk, s.Sk, s.Dv); }
  tensor_view<const float, 4> dO() { return view4(dout, s.B, s.H, s.Sq, s.Dv); }

  /// fovea's gradients, dense bhsd.
  gradients run(int threads, std::vector<float>* raw = nullptr) {
    std::vector<float> dq(q.size(), 9.f), dk(k.size(), 9.f), dv(v.size(), 9.f), ds(s.H, 9.f);
    softmax_options bo = o;
    bo.threads = threads;
    softmax_grads grads;
    if (o.sinks.data()) grads.dsinks = view(ds.data(), {s.H});
    softmax_attention_backward(Q(), K(), V(), view4(out, s.B, s.H, s.Sq, s.Dv), dO(),
                               view<const float>(lse.data(), {s.B, s.H, s.Sq}),
                               view4(dq, s.B, s.H, s.Sq, s.D), view4(dk, s.B, s.Hk, s.Sk, s.D),
                               view4(dv, s.B, s.Hk, s.Sk, s.Dv), bo, grads);
    if (raw) {
      raw->clear();
      for (auto* x : {&dq, &dk, &dv}) raw->insert(raw->end(), x->begin(), x->end());
    }
    gradients g;
    g.dq = dense(dq, s.B, s.H, s.Sq, s.D);
    g.dk = dense(dk, s.B, s.Hk, s.Sk, s.D);
    g.dv = dense(dv, s.B, s.Hk, s.Sk, s.Dv);
    if (o.sinks.data()) g.dsinks.assign(ds.begin(), ds.end());
    return g;
  }
  std::vector<double> dense(std::vector<float>& x, index_t b, index_t h, index_t n, index_t d) {
    const auto X = view4(x, b, h, n, d);
    std::vector<double> r;
    for (index_t i0 = 0; i0 < b; ++i0)
      for (index_t i1 = 0; i1 < h; ++i1)
        for (index_t i2 = 0; i2 < n; ++i2)
          for (index_t i3 = 0; i3 < d; ++i3) r.push_back(X(i0, i1, i2, i3));
    return r;
  }
};

std::string name_of(const shape_case& s, unsigned f) {
  static const char* names[] = {"causal", "top_left", "window", "softcap", "alibi",
                                "bias",   "mask",     "sinks",  "scale",   "bshd"};
  std::string n = "B" + std::to_string(s.B) + " H" + std::to_string(s.H) + " Hk" +
                  std::to_string(s.Hk) + " Sq" + std::to_string(s.Sq) + " Sk" +
                  std::to_string(s.Sk) + " D" + std::to_string(s.D) + " Dv" + std::to_string(s.Dv);
  for (unsigned b = 0; b < feature_count; ++b)
    if (f & (1u << b)) n += std::string(" ") + names[b];
  return n;
}

void expect_gradients_match(const shape_case& s, unsigned f) {
  SCOPED_TRACE(name_of(s, f));
  problem pb(s, f, 1);
  const gradients got = pb.run(2);
  const auto want = reference_softmax_backward<double>(pb.Q(), pb.K(), pb.V(), pb.dO(), pb.o);
  const auto naive = reference_softmax_backward<float>(pb.Q(), pb.K(), pb.V(), pb.dO(), pb.o);
  EXPECT_TRUE(within_tolerance<float>(got.dq, want.dq, naive.dq, 1e-5)) << "dq";
  EXPECT_TRUE(within_tolerance<float>(got.dk, want.dk, naive.dk, 1e-5)) << "dk";
  EXPECT_TRUE(within_tolerance<float>(got.dv, want.dv, naive.dv, 1e-5)) << "dv";
  if (f & sinks) {
    EXPECT_TRUE(within_tolerance<float>(got.dsinks, want.dsinks, naive.dsinks, 1e-5)) << "dsinks";
  }
}

TEST(SoftmaxBackward, EveryOptionAloneOverAwkwardShapes) {
  for (const auto s : {shape_case{1, 1, 1, 1, 1, 1, 1}, shape_case{1, 2, 1, 1, 70, 8, 8},
                       shape_case{2, 4, 2, 70, 70, 33, 17}, shape_case{1, 2, 2, 130, 65, 64, 64},
                       shape_case{1, 3, 1, 17, 200, 24, 40}, shape_case{1, 1, 1, 0, 5, 8, 8},
                       shape_case{1, 2, 1, 5, 0, 8, 8}})
    for (unsigned f = 0; f <= feature_count; ++f) expect_gradients_match(s, f == 0 ? 0 : 1u << (f - 1));
}

TEST(SoftmaxBackward, OptionsInPairs) {
  const shape_case s{1, 4, 2, 67, 131, 20, 12};
  for (unsigned a = 0; a < feature_count; ++a)
    for (unsigned b = a + 1; b < feature_count; ++b) {
      const unsigned f = (1u << a) | (1u << b);
      if ((f & top_left) && !(f & (causal | window))) continue;  // alignment alone: no effect
      expect_gradients_match(s, f);
    }
}

/// The f64 reference against central differences of the f64 forward, loss = sum(out * G).
TEST(SoftmaxBackward, ReferenceMatchesFiniteDifferences) {
  const index_t B = 1, H = 2, Hk = 1, Sq = 3, Sk = 5, D = 4, Dv = 3;
  for (const unsigned f : {0u, unsigned(causal | softcap), unsigned(alibi | sinks | bias)}) {
    SCOPED_TRACE(f);
    auto q = normal<double>(B * H * Sq * D, 11), k = normal<double>(B * Hk * Sk * D, 12),
         v = normal<double>(B * Hk * Sk * Dv, 13);
    const auto G = normal<double>(B * H * Sq * Dv, 14);
    const std::vector<float> slopes{0.2f, 0.1f}, sink_logits{0.5f, -1.0f};
    const auto bias_data = normal<float>(Sq * Sk, 15);
    softmax_options o{.causal = bool(f & causal), .softcap = (f & softcap) ? 1.5 : 0.0};
    if (f & alibi) o.alibi_slopes = view<const float>(slopes.data(), {1, H});
    if (f & sinks) o.sinks = view<const float>(sink_logits.data(), {H});
    if (f & bias) o.bias = view<const float>(bias_data.data(), {1, 1, Sq, Sk});
    auto loss = [&] {
      const auto r = reference_softmax<double>(bhsd<const double>(q.data(), B, H, Sq, D),
                                               bhsd<const double>(k.data(), B, Hk, Sk, D),
                                               bhsd<const double>(v.data(), B, Hk, Sk, Dv), o);
      double l = 0;
      for (std::size_t i = 0; i < G.size(); ++i) l += r.out[i] * G[i];
      return l;
    };
    const auto g = reference_softmax_backward<double>(
        bhsd<const double>(q.data(), B, H, Sq, D), bhsd<const double>(k.data(), B, Hk, Sk, D),
        bhsd<const double>(v.data(), B, Hk, Sk, Dv), bhsd<const double>(G.data(), B, H, Sq, Dv), o);
    auto check = [&](std::vector<double>& x, const std::vector<double>& dx, const char* what) {
      for (std::size_t i = 0; i < x.size(); ++i) {
        const double keep = x[i], h = 1e-6;
        x[i] = keep + h;
        const double up = loss();
        x[i] = keep - h;
        const double down = loss();
        x[i] = keep;
        EXPECT_NEAR(dx[i], (up - down) / (2 * h), 1e-7) << what << " " << i;
      }
    };
    check(q, g.dq, "dq");
    check(k, g.dk, "dk");
    check(v, g.dv, "dv");
  }
}

TEST(SoftmaxBackward, BitwiseTheSameForEveryThreadCount) {
  for (const unsigned f : {0u, unsigned(causal | bias), unsigned(window | alibi | bshd_layout)}) {
    problem pb({2, 4, 2, 150, 300, 64, 48}, f, 2);
    std::vector<float> one, many;
    pb.run(1, &one);
    // dQ is summed across tasks in key-block order: more threads than cores (4 on this
    // machine's 2) make tasks wait on preempted ones; repeated, as a race would show
    // only sometimes
    for (int round = 0; round < 3; ++round)
      for (int threads : {2, 3, 4}) {
        pb.run(threads, &many);
        ASSERT_EQ(one.size(), many.size());
        EXPECT_EQ(0, std::memcmp(one.data(), many.data(), 4 * one.size())) << f << " threads " << threads;
      }
  }
}

/// A row that sees no key has zero gradients and gives none; NaN in a masked key leaks
/// nowhere; NaN in a key a row sees makes that row's dq NaN.
TEST(SoftmaxBackward, MaskedRowsAndKeys) {
  const shape_case s{1, 2, 1, 70, 90, 16, 16};
  problem edited(s, bias, 1);
  // rows 3 and 40 see nothing; key 80 is hidden from every row and holds NaN
  for (index_t j = 0; j < s.Sk; ++j)
    edited.bias_data[3 * s.Sk + j] = edited.bias_data[40 * s.Sk + j] = -HUGE_VALF;
  for (index_t i = 0; i < s.Sq; ++i) edited.bias_data[i * s.Sk + 80] = -HUGE_VALF;
  for (index_t d = 0; d < s.D; ++d) edited.k[80 * s.D + d] = NAN;
  for (index_t e = 0; e < s.Dv; ++e) edited.v[80 * s.Dv + e] = NAN;
  softmax_options fwd = edited.o;
  fwd.lse = view(edited.lse.data(), {s.B, s.H, s.Sq});
  softmax_attention(edited.Q(), edited.K(), edited.V(),
                    edited.view4(edited.out, s.B, s.H, s.Sq, s.Dv), fwd);
  const gradients g = edited.run(2);
  for (double x : g.dq) ASSERT_FALSE(std::isnan(x));
  for (double x : g.dk) ASSERT_FALSE(std::isnan(x)) << "NaN key leaked into dk";
  for (double x : g.dv) ASSERT_FALSE(std::isnan(x)) << "NaN value leaked into dv";
  for (index_t h = 0; h < s.H; ++h)
    for (const index_t i : {3, 40})
      for (index_t d = 0; d < s.D; ++d) EXPECT_EQ(g.dq[((h * s.Sq) + i) * s.D + d], 0.0);
  // unhide key 80 from row 10: its dq turns NaN, other rows' stay finite
  edited.bias_data[10 * s.Sk + 80] = 0;
  softmax_attention(edited.Q(), edited.K(), edited.V(),
                    edited.view4(edited.out, s.B, s.H, s.Sq, s.Dv), fwd);
  const gradients n = edited.run(1);
  for (index_t h = 0; h < s.H; ++h) {
    EXPECT_TRUE(std::isnan(n.dq[(h * s.Sq + 10) * s.D]));
    EXPECT_FALSE(std::isnan(n.dq[(h * s.Sq + 11) * s.D]));
  }
  EXPECT_TRUE(std::isnan(n.dk[80 * s.D]));  // and the NaN key's own gradients
  EXPECT_TRUE(std::isnan(n.dv[80 * s.Dv]));
}

/// A user score_mod with its derivative: s + 0.3 sin(s) + a position term.
struct wavy_score {
  template <class T>
  T operator()(T s, index_t, index_t h, index_t i, index_t j) const {
    return s + T(0.3) * std::sin(s) + T(0.01) * T(h + 1) * T(j - i);
  }
  template <class T>
  T derivative(T s, index_t, index_t, index_t, index_t) const {
    return T(1) + T(0.3) * std::cos(s);
  }
};

/// A score_mod that adds what the built-in bias would: the same logits, bit for bit.
struct added_bias {
  const float* bias;
  index_t Sk;
  template <class T>
  T operator()(T s, index_t, index_t, index_t i, index_t j) const {
    const T b = T(bias[i * Sk + j]);
    return s + b;
  }
  template <class T>
  T derivative(T, index_t, index_t, index_t, index_t) const {
    return T(1);
  }
};

// A user score_mod is differentiated through its derivative member: the f64 backward
// against central differences of the f64 forward (with a soft-cap, ALiBi and a bias
// before it, so d bias and d slopes chain through it too), fp32 against f64, and a
// score_mod adding the bias against the built-in bias, bit for bit.
TEST(SoftmaxBackward, UserScoreModWithItsDerivative) {
  const index_t B = 1, H = 2, Hk = 1, Sq = 6, Sk = 9, D = 5;
  auto q = normal<double>(B * H * Sq * D, 71), k = normal<double>(B * Hk * Sk * D, 72),
       v = normal<double>(B * Hk * Sk * D, 73);
  const auto G = normal<double>(B * H * Sq * D, 74);
  auto bias = normal<float>(B * H * Sq * Sk, 75);
  auto slopes = std::vector<float>{0.2f, 0.05f};
  softmax_options o{.causal = true, .softcap = 3.0};
  o.bias = view<const float>(bias.data(), {B, H, Sq, Sk});
  o.alibi_slopes = view<const float>(slopes.data(), {1, H});
  const auto mod = with_score_mod(wavy_score{});
  auto Q = bhsd<const double>(q.data(), B, H, Sq, D), K = bhsd<const double>(k.data(), B, Hk, Sk, D),
       V = bhsd<const double>(v.data(), B, Hk, Sk, D);
  auto loss = [&] {
    std::vector<double> out(B * H * Sq * D);
    softmax_attention(Q, K, V, bhsd(out.data(), B, H, Sq, D), o, mod);
    double l = 0;
    for (std::size_t i = 0; i < out.size(); ++i) l += out[i] * G[i];
    return l;
  };
  std::vector<double> out(B * H * Sq * D), dq(q.size()), dk(k.size()), dv(v.size());
  std::vector<float> lse(B * H * Sq), dbias(bias.size()), dslopes(H);
  softmax_options fwd = o;
  fwd.lse = view(lse.data(), {B, H, Sq});
  softmax_attention(Q, K, V, bhsd(out.data(), B, H, Sq, D), fwd, mod);
  softmax_attention_backward(Q, K, V, bhsd<const double>(out.data(), B, H, Sq, D),
                             bhsd<const double>(G.data(), B, H, Sq, D),
                             view<const float>(lse.data(), {B, H, Sq}), bhsd(dq.data(), B, H, Sq, D),
                             bhsd(dk.data(), B, Hk, Sk, D), bhsd(dv.data(), B, Hk, Sk, D), o,
                             {.dbias = view(dbias.data(), {B, H, Sq, Sk}),
                              .dalibi_slopes = view(dslopes.data(), {1, H})},
                             mod);
  for (auto [x, g, name] : {std::tuple{&q, &dq, "dq"}, {&k, &dk, "dk"}, {&v, &dv, "dv"}})
    for (std::size_t e = 0; e < x->size(); ++e) {
      const double keep = (*x)[e], h = 1e-6;
      (*x)[e] = keep + h;
      const double up = loss();
      (*x)[e] = keep - h;
      const double down = loss();
      (*x)[e] = keep;
      EXPECT_NEAR((*g)[e], (up - down) / (2 * h), 1e-6) << name << " " << e;
    }
  for (auto [x, g, name] : {std::tuple{&bias, &dbias, "dbias"}, {&slopes, &dslopes, "dslopes"}})
    for (std::size_t e = 0; e < x->size(); ++e) {
      const float keep = (*x)[e], h = 1.0f / 4096;  // exact steps in float
      (*x)[e] = keep + h;
      const double up = loss();
      (*x)[e] = keep - h;
      const double down = loss();
      (*x)[e] = keep;
      EXPECT_NEAR((*g)[e], (up - down) / (2.0 * double(h)), 1e-5) << name << " " << e;
    }
  // fp32 storage against the f64 gradients
  const std::vector<float> qf(q.begin(), q.end()), kf(k.begin(), k.end()), vf(v.begin(), v.end()),
      gf(G.begin(), G.end());
  std::vector<float> of(out.size()), dqf(q.size()), dkf(k.size()), dvf(v.size());
  const auto Qf = bhsd<const float>(qf.data(), B, H, Sq, D), Kf = bhsd<const float>(kf.data(), B, Hk, Sk, D),
             Vf = bhsd<const float>(vf.data(), B, Hk, Sk, D);
  softmax_attention(Qf, Kf, Vf, bhsd(of.data(), B, H, Sq, D), fwd, mod);
  softmax_attention_backward(Qf, Kf, Vf, bhsd<const float>(of.data(), B, H, Sq, D),
                             bhsd<const float>(gf.data(), B, H, Sq, D),
                             view<const float>(lse.data(), {B, H, Sq}), bhsd(dqf.data(), B, H, Sq, D),
                             bhsd(dkf.data(), B, Hk, Sk, D), bhsd(dvf.data(), B, Hk, Sk, D), o, {}, mod);
  EXPECT_LT(relative_error(std::vector<double>(dqf.begin(), dqf.end()), dq), 1e-5);
  EXPECT_LT(relative_error(std::vector<double>(dkf.begin(), dkf.end()), dk), 1e-5);
  EXPECT_LT(relative_error(std::vector<double>(dvf.begin(), dvf.end()), dv), 1e-5);
  // a score_mod adding the bias is the built-in bias, bit for bit (GQA, 2 threads)
  const shape_case sc{2, 4, 2, 70, 90, 16, 16};
  problem built_in(sc, causal | feature::bias, 2);
  std::vector<float> raw_bias, raw_mod;
  built_in.run(2, &raw_bias);
  problem modded(sc, causal | feature::bias, 2);
  const softmax_options no_bias{.causal = true};
  std::vector<float> dq2(modded.q.size()), dk2(modded.k.size()), dv2(modded.v.size());
  // the problem's bias is (B, 1, Sq, Sk); one batch row at a time keeps the functor simple
  for (index_t b = 0; b < sc.B; ++b) {
    const auto m = with_score_mod(added_bias{modded.bias_data.data() + b * sc.Sq * sc.Sk, sc.Sk});
    auto cut = [&](std::vector<float>& x, index_t h, index_t n, index_t d) {
      return bhsd(x.data() + b * h * n * d, 1, h, n, d);
    };
    std::vector<float> o1(sc.H * sc.Sq * sc.Dv), l1(sc.H * sc.Sq);
    softmax_attention(tensor_view<const float, 4>(cut(modded.q, sc.H, sc.Sq, sc.D)),
                      tensor_view<const float, 4>(cut(modded.k, sc.Hk, sc.Sk, sc.D)),
                      tensor_view<const float, 4>(cut(modded.v, sc.Hk, sc.Sk, sc.Dv)),
                      bhsd(o1.data(), 1, sc.H, sc.Sq, sc.Dv),
                      {.causal = true, .lse = view(l1.data(), {1, sc.H, sc.Sq})}, m);
    softmax_attention_backward(tensor_view<const float, 4>(cut(modded.q, sc.H, sc.Sq, sc.D)),
                               tensor_view<const float, 4>(cut(modded.k, sc.Hk, sc.Sk, sc.D)),
                               tensor_view<const float, 4>(cut(modded.v, sc.Hk, sc.Sk, sc.Dv)),
                               bhsd<const float>(o1.data(), 1, sc.H, sc.Sq, sc.Dv),
                               tensor_view<const float, 4>(cut(modded.dout, sc.H, sc.Sq, sc.Dv)),
                               view<const float>(l1.data(), {1, sc.H, sc.Sq}), cut(dq2, sc.H, sc.Sq, sc.D),
                               cut(dk2, sc.Hk, sc.Sk, sc.D), cut(dv2, sc.Hk, sc.Sk, sc.Dv), no_bias, {}, m);
  }
  for (auto* x : {&dq2, &dk2, &dv2}) raw_mod.insert(raw_mod.end(), x->begin(), x->end());
  ASSERT_EQ(raw_bias.size(), raw_mod.size());
  EXPECT_EQ(0, std::memcmp(raw_bias.data(), raw_mod.data(), 4 * raw_bias.size()));
}

/// bf16 storage (computed in float) and the scalar backend: the same tolerance rule, with
/// the rounding of bf16 gradients added.
TEST(SoftmaxBackward, Bf16StorageAndTheScalarBackend) {
  const index_t H = 2, Hk = 1, Sq = 40, Sk = 90, D = 24;
  const auto qf = normal<float>(H * Sq * D, 31), kf = normal<float>(Hk * Sk * D, 32),
             vf = normal<float>(Hk * Sk * D, 33), gf = normal<float>(H * Sq * D, 34);
  const std::vector<bfloat16> q(qf.begin(), qf.end()), k(kf.begin(), kf.end()),
      v(vf.begin(), vf.end()), g(gf.begin(), gf.end());
  std::vector<bfloat16> o(H * Sq * D), dq(q.size()), dk(k.size()), dv(v.size());
  std::vector<float> lse(H * Sq);
  const auto Q = bhsd<const bfloat16>(q.data(), 1, H, Sq, D), K = bhsd<const bfloat16>(k.data(), 1, Hk, Sk, D),
             V = bhsd<const bfloat16>(v.data(), 1, Hk, Sk, D), G = bhsd<const bfloat16>(g.data(), 1, H, Sq, D);
  const softmax_options opt{.causal = true, .softcap = 3.0};
  softmax_options fwd = opt;
  fwd.lse = view(lse.data(), {1, H, Sq});
  softmax_attention(Q, K, V, bhsd(o.data(), 1, H, Sq, D), fwd);
  softmax_attention_backward(Q, K, V, bhsd<const bfloat16>(o.data(), 1, H, Sq, D), G,
                             view<const float>(lse.data(), {1, H, Sq}), bhsd(dq.data(), 1, H, Sq, D),
                             bhsd(dk.data(), 1, Hk, Sk, D), bhsd(dv.data(), 1, Hk, Sk, D), opt);
  // the reference on the same (bf16-exact) inputs, in float
  const std::vector<float> qr(q.begin(), q.end()), kr(k.begin(), k.end()), vr(v.begin(), v.end()),
      gr(g.begin(), g.end());
  const auto Qr = bhsd<const float>(qr.data(), 1, H, Sq, D), Kr = bhsd<const float>(kr.data(), 1, Hk, Sk, D),
             Vr = bhsd<const float>(vr.data(), 1, Hk, Sk, D), Gr = bhsd<const float>(gr.data(), 1, H, Sq, D);
  const auto want = reference_softmax_backward<double>(Qr, Kr, Vr, Gr, opt);
  const auto naive = reference_softmax_backward<float>(Qr, Kr, Vr, Gr, opt);
  // (out is bf16-rounded: delta differs by ~2^-9 of |dO . O|, hence the larger floor)
  EXPECT_TRUE(within_tolerance<float>(std::vector<double>(dq.begin(), dq.end()), want.dq, naive.dq, 1.0 / 64));
  EXPECT_TRUE(within_tolerance<float>(std::vector<double>(dk.begin(), dk.end()), want.dk, naive.dk, 1.0 / 64));
  EXPECT_TRUE(within_tolerance<float>(std::vector<double>(dv.begin(), dv.end()), want.dv, naive.dv, 1.0 / 128));
  // the scalar backend over the float copies
  std::vector<float> out(H * Sq * D), sq(qr.size()), sk(kr.size()), sv(vr.size());
  softmax_attention<scalar>(Qr, Kr, Vr, bhsd(out.data(), 1, H, Sq, D), fwd);
  softmax_attention_backward<scalar>(Qr, Kr, Vr, bhsd<const float>(out.data(), 1, H, Sq, D), Gr,
                                     view<const float>(lse.data(), {1, H, Sq}),
                                     bhsd(sq.data(), 1, H, Sq, D), bhsd(sk.data(), 1, Hk, Sk, D),
                                     bhsd(sv.data(), 1, Hk, Sk, D), opt);
  EXPECT_TRUE(within_tolerance<float>(std::vector<double>(sq.begin(), sq.end()), want.dq, naive.dq, 1e-5));
  EXPECT_TRUE(within_tolerance<float>(std::vector<double>(sk.begin(), sk.end()), want.dk, naive.dk, 1e-5));
  EXPECT_TRUE(within_tolerance<float>(std::vector<double>(sv.begin(), sv.end()), want.dv, naive.dv, 1e-5));
}

/// d bias: a bias per (query, key) and a bias per key (dynamic-mask attention's form, per
/// query head or per key/value head), against the reference's d logit summed over what
/// the bias broadcasts; the reference's d logit against finite differences of the loss.
TEST(SoftmaxBackward, BiasGradients) {
  const index_t B = 2, H = 4, Hk = 2, Sq = 70, Sk = 90, D = 16;
  for (const int form : {0, 1, 2}) {  // (B, H, Sq, Sk), (B, H, 1, Sk), (B, Hk, 1, Sk)
    SCOPED_TRACE("form " + std::to_string(form));
    const index_t bh = form == 2 ? Hk : H, bq = form == 0 ? Sq : 1;
    const auto q = normal<float>(B * H * Sq * D, 41), k = normal<float>(B * Hk * Sk * D, 42),
               v = normal<float>(B * Hk * Sk * D, 43), g = normal<float>(B * H * Sq * D, 44);
    auto bias = normal<float>(B * bh * bq * Sk, 45);
    bias[3] = -HUGE_VALF;  // a hidden key
    std::vector<float> o(q.size()), lse(B * H * Sq), dq(q.size()), dk(k.size()), dv(v.size());
    std::vector<float> dbias(bias.size(), 7.f), serial;
    const auto Q = bhsd<const float>(q.data(), B, H, Sq, D), K = bhsd<const float>(k.data(), B, Hk, Sk, D),
               V = bhsd<const float>(v.data(), B, Hk, Sk, D), G = bhsd<const float>(g.data(), B, H, Sq, D);
    softmax_options opt{.causal = true, .softcap = 4.0,
                        .bias = view<const float>(bias.data(), {B, bh, bq, Sk})};
    softmax_options fwd = opt;
    fwd.lse = view(lse.data(), {B, H, Sq});
    softmax_attention(Q, K, V, bhsd(o.data(), B, H, Sq, D), fwd);
    for (const int threads : {1, 2}) {
      opt.threads = threads;
      softmax_attention_backward(Q, K, V, bhsd<const float>(o.data(), B, H, Sq, D), G,
                                 view<const float>(lse.data(), {B, H, Sq}), bhsd(dq.data(), B, H, Sq, D),
                                 bhsd(dk.data(), B, Hk, Sk, D), bhsd(dv.data(), B, Hk, Sk, D), opt,
                                 {.dbias = view(dbias.data(), {B, bh, bq, Sk})});
      if (threads == 1) serial = dbias;
    }
    EXPECT_EQ(0, std::memcmp(serial.data(), dbias.data(), 4 * dbias.size())) << "threads";
    const auto want = reference_softmax_backward<double>(Q, K, V, G, opt);
    const auto naive = reference_softmax_backward<float>(Q, K, V, G, opt);
    auto reduce = [&](const std::vector<double>& dz) {  // onto the bias's shape
      std::vector<double> r(bias.size());
      for (index_t b = 0; b < B; ++b)
        for (index_t h = 0; h < H; ++h)
          for (index_t i = 0; i < Sq; ++i)
            for (index_t j = 0; j < Sk; ++j)
              r[((b * bh + (form == 2 ? h / (H / Hk) : h)) * bq + (form == 0 ? i : 0)) * Sk + j] +=
                  dz[((b * H + h) * Sq + i) * Sk + j];
      return r;
    };
    EXPECT_TRUE(within_tolerance<float>(std::vector<double>(dbias.begin(), dbias.end()),
                                        reduce(want.dz), reduce(naive.dz), 1e-5));
    EXPECT_EQ(dbias[3], 0.f);  // hidden
  }
  // the reference's d logit is d loss / d bias: central differences in f64
  const index_t b1 = 1, h1 = 2, s1 = 3, k1 = 5, d1 = 4;
  auto q = normal<double>(h1 * s1 * d1, 51), k = normal<double>(k1 * d1, 52), v = normal<double>(k1 * d1, 53);
  const auto G = normal<double>(h1 * s1 * d1, 54);
  auto bias = normal<float>(h1 * s1 * k1, 55);
  const softmax_options o{.causal = true, .softcap = 2.0, .bias = view<const float>(bias.data(), {b1, h1, s1, k1})};
  const auto Q = bhsd<const double>(q.data(), b1, h1, s1, d1), K = bhsd<const double>(k.data(), b1, 1, k1, d1),
             V = bhsd<const double>(v.data(), b1, 1, k1, d1);
  const auto grad = reference_softmax_backward<double>(Q, K, V, bhsd<const double>(G.data(), b1, h1, s1, d1), o);
  for (std::size_t e = 0; e < bias.size(); ++e) {
    const float keep = bias[e];
    auto loss = [&](float x) {
      bias[e] = x;
      const auto r = reference_softmax<double>(Q, K, V, o);
      double l = 0;
      for (std::size_t i = 0; i < G.size(); ++i) l += r.out[i] * G[i];
      return l;
    };
    const float h = 1.0f / 1024;  // exact in float
    const double fd = (loss(keep + h) - loss(keep - h)) / (2.0 * double(h));
    bias[e] = keep;
    EXPECT_NEAR(grad.dz[e], fd, 1e-5) << e;
  }
}

// d ALiBi slopes: sum over (i, j) of dz_ij * -|i + offset - j|, per batch row (B, H) or
// summed over the batch (1, H); causal (bottom-right, Sq != Sk) or not, a soft-cap, GQA;
// bitwise the same for 1 and 2 threads.
TEST(SoftmaxBackward, AlibiSlopeGradients) {
  const index_t B = 2, H = 4, Hk = 2, Sq = 70, Sk = 90, D = 16;
  const auto q = normal<float>(B * H * Sq * D, 61), k = normal<float>(B * Hk * Sk * D, 62),
             v = normal<float>(B * Hk * Sk * D, 63), g = normal<float>(B * H * Sq * D, 64);
  const auto Q = bhsd<const float>(q.data(), B, H, Sq, D), K = bhsd<const float>(k.data(), B, Hk, Sk, D),
             V = bhsd<const float>(v.data(), B, Hk, Sk, D), G = bhsd<const float>(g.data(), B, H, Sq, D);
  for (const index_t rows : {B, index_t(1)})
    for (const bool causal : {true, false}) {  // (not causal: keys on both sides of i)
    SCOPED_TRACE("slopes (" + std::to_string(rows) + ", H)" + (causal ? " causal" : ""));
    const auto slopes = uniform<float>(rows * H, 65, 0.01, 0.2);
    softmax_options opt{.causal = causal, .softcap = 5.0,
                        .alibi_slopes = view<const float>(slopes.data(), {rows, H})};
    std::vector<float> o(q.size()), lse(B * H * Sq), dq(q.size()), dk(k.size()), dv(v.size());
    softmax_options fwd = opt;
    fwd.lse = view(lse.data(), {B, H, Sq});
    softmax_attention(Q, K, V, bhsd(o.data(), B, H, Sq, D), fwd);
    std::vector<float> dslopes(rows * H, 7.f), serial;
    for (const int threads : {1, 2}) {
      opt.threads = threads;
      softmax_attention_backward(Q, K, V, bhsd<const float>(o.data(), B, H, Sq, D), G,
                                 view<const float>(lse.data(), {B, H, Sq}), bhsd(dq.data(), B, H, Sq, D),
                                 bhsd(dk.data(), B, Hk, Sk, D), bhsd(dv.data(), B, Hk, Sk, D), opt,
                                 {.dalibi_slopes = view(dslopes.data(), {rows, H})});
      if (threads == 1) serial = dslopes;
    }
    EXPECT_EQ(serial, dslopes) << "threads";
    const auto want = reference_softmax_backward<double>(Q, K, V, G, opt);
    const auto naive = reference_softmax_backward<float>(Q, K, V, G, opt);
    auto reduce = [&](const std::vector<double>& dz) {
      std::vector<double> r(rows * H, 0.0);
      for (index_t b = 0; b < B; ++b)
        for (index_t h = 0; h < H; ++h)
          for (index_t i = 0; i < Sq; ++i)
            for (index_t j = 0; j < Sk; ++j)
              r[(rows == 1 ? 0 : b) * H + h] -=
                  dz[((b * H + h) * Sq + i) * Sk + j] * double(std::abs(i + Sk - Sq - j));
      return r;
    };
    EXPECT_TRUE(within_tolerance<float>(std::vector<double>(dslopes.begin(), dslopes.end()),
                                        reduce(want.dz), reduce(naive.dz), 1e-4));
  }
}

// varlen: each packed sequence's gradients equal softmax_attention_backward on that
// sequence alone, bit for bit, with empty sequences (no queries: zero dk, dv; no keys:
// zero dq), a packed block-diagonal bias, ALiBi slopes per sequence, GQA, causal.
TEST(SoftmaxBackward, VarlenEqualsPerSequenceCalls) {
  const index_t H = 4, Hk = 2, D = 24, Dv = 16;
  const std::vector<std::int32_t> cu_q{0, 3, 3, 73, 74, 74}, cu_k{0, 10, 15, 215, 216, 216};
  const index_t tq = cu_q.back(), tk = cu_k.back(), seqs = index_t(cu_q.size()) - 1;
  const auto q = normal<float>(H * tq * D, 1), k = normal<float>(Hk * tk * D, 2),
             v = normal<float>(Hk * tk * Dv, 3), dout = normal<float>(H * tq * Dv, 4),
             bias = normal<float>(H * tq * tk, 5, 0.5), slopes = uniform<float>(seqs * H, 6, 0.0, 0.3),
             sink_logits = normal<float>(H, 7);
  // mode 0: plain; 1: a bias shared by the heads and per-sequence ALiBi, no extra
  // gradients; 2: a per-head bias with d bias, sinks with d sinks, per-sequence d slopes;
  // 3: a per-key bias (1, Hk, 1, total_k) with d bias, shared slopes (1, H) with d slopes
  for (int mode : {0, 1, 2, 3}) {
    SCOPED_TRACE("mode " + std::to_string(mode));
    const index_t bias_heads = mode == 1 ? 1 : mode == 2 ? H : Hk, bias_rows = mode == 3 ? 1 : tq;
    const index_t slope_rows = mode == 3 ? 1 : seqs;
    softmax_options o{.causal = true, .threads = 2};
    if (mode > 0) {
      o.bias = view<const float>(bias.data(), {1, bias_heads, bias_rows, tk});
      o.alibi_slopes = view<const float>(slopes.data(), {slope_rows, H});
    }
    if (mode == 2) o.sinks = view<const float>(sink_logits.data(), {H});
    std::vector<float> out(H * tq * Dv), lse(H * tq), dq(H * tq * D, -7.f), dk(Hk * tk * D, -7.f),
        dv(Hk * tk * Dv, -7.f), dbias(bias_heads * bias_rows * tk, -7.f), dslopes(slope_rows * H, -7.f),
        dsinks(H, -7.f);
    softmax_grads grads;
    if (mode >= 2) {
      grads.dbias = view(dbias.data(), {1, bias_heads, bias_rows, tk});
      grads.dalibi_slopes = view(dslopes.data(), {slope_rows, H});
    }
    if (mode == 2) grads.dsinks = view(dsinks.data(), {H});
    auto fwd = o;
    fwd.lse = view(lse.data(), {1, H, tq});
    const auto Q = bhsd<const float>(q.data(), 1, H, tq, D);
    const auto K = bhsd<const float>(k.data(), 1, Hk, tk, D);
    const auto V = bhsd<const float>(v.data(), 1, Hk, tk, Dv);
    softmax_attention_varlen(Q, K, V, bhsd(out.data(), 1, H, tq, Dv), cu_q, cu_k, fwd);
    softmax_attention_varlen_backward(Q, K, V, bhsd<const float>(out.data(), 1, H, tq, Dv),
                                      bhsd<const float>(dout.data(), 1, H, tq, Dv),
                                      view<const float>(lse.data(), {1, H, tq}),
                                      bhsd(dq.data(), 1, H, tq, D), bhsd(dk.data(), 1, Hk, tk, D),
                                      bhsd(dv.data(), 1, Hk, tk, Dv), cu_q, cu_k, o, grads);
    std::vector<double> sinks_sum(H), slopes_sum(H);
    for (index_t b = 0; b < seqs; ++b) {
      const index_t q0 = cu_q[b], sq = cu_q[b + 1] - q0, k0 = cu_k[b], sk = cu_k[b + 1] - k0;
      const index_t rows = mode == 3 ? 1 : sq;
      std::vector<float> bq(H * sq * D), bk(Hk * sk * D), bv(Hk * sk * Dv), bo(H * sq * Dv),
          bg(H * sq * Dv), bl(H * sq), bdq(bq.size()), bdk(bk.size()), bdv(bv.size()),
          bb(bias_heads * rows * sk), bdb(bb.size()), bds(H), bdsl(H);
      for (index_t h = 0; h < H; ++h) {
        std::copy_n(q.data() + ((h * tq + q0) * D), sq * D, bq.data() + (h * sq * D));
        std::copy_n(dout.data() + ((h * tq + q0) * Dv), sq * Dv, bg.data() + (h * sq * Dv));
      }
      for (index_t h = 0; h < Hk; ++h) {
        std::copy_n(k.data() + ((h * tk + k0) * D), sk * D, bk.data() + (h * sk * D));
        std::copy_n(v.data() + ((h * tk + k0) * Dv), sk * Dv, bv.data() + (h * sk * Dv));
      }
      for (index_t h = 0; h < bias_heads; ++h)
        for (index_t i = 0; i < rows; ++i)
          std::copy_n(bias.data() + ((h * bias_rows + (mode == 3 ? 0 : q0 + i)) * tk + k0), sk,
                      bb.data() + ((h * rows + i) * sk));
      softmax_options so{.causal = true, .threads = 1};
      softmax_grads sg;
      if (mode > 0) {
        so.bias = view<const float>(bb.data(), {1, bias_heads, rows, sk});
        so.alibi_slopes = view<const float>(slopes.data() + (mode == 3 ? 0 : b * H), {1, H});
      }
      if (mode == 2) so.sinks = o.sinks, sg.dsinks = view(bds.data(), {H});
      if (mode >= 2) {
        sg.dbias = view(bdb.data(), {1, bias_heads, rows, sk});
        sg.dalibi_slopes = view(bdsl.data(), {1, H});
      }
      auto sf = so;
      sf.lse = view(bl.data(), {1, H, sq});
      const auto SQ = bhsd<const float>(bq.data(), 1, H, sq, D);
      const auto SK = bhsd<const float>(bk.data(), 1, Hk, sk, D);
      const auto SV = bhsd<const float>(bv.data(), 1, Hk, sk, Dv);
      softmax_attention(SQ, SK, SV, bhsd(bo.data(), 1, H, sq, Dv), sf);
      softmax_attention_backward(SQ, SK, SV, bhsd<const float>(bo.data(), 1, H, sq, Dv),
                                 bhsd<const float>(bg.data(), 1, H, sq, Dv),
                                 view<const float>(bl.data(), {1, H, sq}), bhsd(bdq.data(), 1, H, sq, D),
                                 bhsd(bdk.data(), 1, Hk, sk, D), bhsd(bdv.data(), 1, Hk, sk, Dv), so, sg);
      if (sq == 0) std::fill(bdk.begin(), bdk.end(), 0.f), std::fill(bdv.begin(), bdv.end(), 0.f);
      for (index_t h = 0; h < H; ++h)
        for (index_t x = 0; x < sq * D; ++x)
          ASSERT_EQ(dq[(h * tq + q0) * D + x], bdq[h * sq * D + x]) << "dq, sequence " << b;
      for (index_t h = 0; h < Hk; ++h) {
        for (index_t x = 0; x < sk * D; ++x)
          ASSERT_EQ(dk[(h * tk + k0) * D + x], bdk[h * sk * D + x]) << "dk, sequence " << b;
        for (index_t x = 0; x < sk * Dv; ++x)
          ASSERT_EQ(dv[(h * tk + k0) * Dv + x], bdv[h * sk * Dv + x]) << "dv, sequence " << b;
      }
      if (mode < 2) continue;
      if (sq == 0) std::fill(bdb.begin(), bdb.end(), 0.f), std::fill(bds.begin(), bds.end(), 0.f),
                   std::fill(bdsl.begin(), bdsl.end(), 0.f);
      for (index_t h = 0; h < bias_heads; ++h)
        for (index_t i = 0; i < rows; ++i)
          for (index_t j = 0; j < sk; ++j)
            ASSERT_EQ(dbias[(h * bias_rows + (mode == 3 ? 0 : q0 + i)) * tk + k0 + j],
                      bdb[(h * rows + i) * sk + j])
                << "dbias, sequence " << b;
      for (index_t h = 0; h < H; ++h) {
        sinks_sum[h] += bds[h];
        if (mode == 2) {
          EXPECT_EQ(dslopes[b * H + h], bdsl[h]) << "dslopes, sequence " << b;
        }
        slopes_sum[h] += bdsl[h];
      }
    }
    if (mode == 2) {
      for (index_t h = 0; h < H; ++h) EXPECT_EQ(dsinks[h], float(sinks_sum[h])) << "dsinks";
      // off the block diagonal: zero
      EXPECT_EQ(dbias[(0 * tq + 0) * tk + 12], 0.f);
      EXPECT_EQ(dbias[(1 * tq + 72) * tk + 3], 0.f);
    }
    if (mode == 3) {
      for (index_t h = 0; h < H; ++h) EXPECT_EQ(dslopes[h], float(slopes_sum[h])) << "dslopes";
    }
  }
  // Bad input is caught before any write.
  std::vector<float> o(H * tq * Dv), l(H * tq), gq(H * tq * D, -7.f), gk(Hk * tk * D, -7.f),
      gv(Hk * tk * Dv, -7.f);
  const std::vector<std::int32_t> bad{0, 3, 3, 73, 74, 75};
  try {
    softmax_attention_varlen_backward(
        bhsd<const float>(q.data(), 1, H, tq, D), bhsd<const float>(k.data(), 1, Hk, tk, D),
        bhsd<const float>(v.data(), 1, Hk, tk, Dv), bhsd<const float>(o.data(), 1, H, tq, Dv),
        bhsd<const float>(dout.data(), 1, H, tq, Dv), view<const float>(l.data(), {1, H, tq}),
        bhsd(gq.data(), 1, H, tq, D), bhsd(gk.data(), 1, Hk, tk, D), bhsd(gv.data(), 1, Hk, tk, Dv),
        bad, cu_k);
    ADD_FAILURE() << "no error";
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find("cu_seqlens_q"), std::string::npos) << e.what();
  }
  for (const auto* g : {&gq, &gk, &gv})
    for (float x : *g) ASSERT_EQ(x, -7.f);
}

TEST(SoftmaxBackward, BadInputNamesTheArgumentAndWritesNothing) {
  const index_t H = 2, S = 8, D = 16;
  std::vector<float> q(H * S * D), k(q), v(q), o(q), g(q), lse(H * S), dq(q.size(), 5.f),
      dk(dq), dv(dq);
  const auto Q = bhsd<const float>(q.data(), 1, H, S, D), K = bhsd<const float>(k.data(), 1, H, S, D),
             V = bhsd<const float>(v.data(), 1, H, S, D), O = bhsd<const float>(o.data(), 1, H, S, D),
             G = bhsd<const float>(g.data(), 1, H, S, D);
  const auto L = view<const float>(lse.data(), {1, H, S});
  auto expect_error = [&](auto&& call, const std::string& name) {
    try {
      call();
      ADD_FAILURE() << "no error for " << name;
    } catch (const error& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
    for (auto* x : {&dq, &dk, &dv})
      for (float e : *x) ASSERT_EQ(e, 5.f);
  };
  expect_error([&] {
    softmax_attention_backward(Q, K, V, O, G, view<const float>(lse.data(), {1, H, S - 1}),
                               bhsd(dq.data(), 1, H, S, D), bhsd(dk.data(), 1, H, S, D),
                               bhsd(dv.data(), 1, H, S, D));
  }, "lse: extent 2");
  expect_error([&] {
    softmax_attention_backward(Q, K, V, O, G, L, bhsd(dq.data(), 1, H, S - 1, D),
                               bhsd(dk.data(), 1, H, S, D), bhsd(dv.data(), 1, H, S, D));
  }, "dq: extent 2");
  expect_error([&] {
    softmax_attention_backward(Q, K, V, O, G, L, bhsd(dq.data(), 1, H, S, D),
                               bhsd(dq.data(), 1, H, S, D), bhsd(dv.data(), 1, H, S, D));
  }, "dq: memory overlaps dk");
  expect_error([&] {
    softmax_attention_backward(Q, K, V, O, bhsd<const float>(g.data(), 1, H, S, D / 2), L,
                               bhsd(dq.data(), 1, H, S, D), bhsd(dk.data(), 1, H, S, D),
                               bhsd(dv.data(), 1, H, S, D));
  }, "dout: extent 3");
  expect_error([&] {
    softmax_attention_backward(Q, K, V, O, G, L, bhsd(dq.data(), 1, H, S, D),
                               bhsd(dk.data(), 1, H, S, D), bhsd(dv.data(), 1, H, S, D),
                               {.scale = -1.0});
  }, "options.scale");
  std::vector<float> bias(S * S), dbias(S * S);
  expect_error([&] {  // a bias shared by every head and batch row: no gradient here
    softmax_attention_backward(Q, K, V, O, G, L, bhsd(dq.data(), 1, H, S, D),
                               bhsd(dk.data(), 1, H, S, D), bhsd(dv.data(), 1, H, S, D),
                               {.bias = view<const float>(bias.data(), {1, 1, S, S})},
                               {.dbias = view(dbias.data(), {1, 1, S, S})});
  }, "grads.dbias");
  expect_error([&] {
    softmax_attention_backward(Q, K, V, O, G, L, bhsd(dq.data(), 1, H, S, D),
                               bhsd(dk.data(), 1, H, S, D), bhsd(dv.data(), 1, H, S, D), {},
                               {.dbias = view(dbias.data(), {1, H, 1, S})});
  }, "grads.dbias: given, but options.bias is not");
  std::vector<float> slopes(H, 0.1f), dslopes(2 * H);
  expect_error([&] {
    softmax_attention_backward(Q, K, V, O, G, L, bhsd(dq.data(), 1, H, S, D),
                               bhsd(dk.data(), 1, H, S, D), bhsd(dv.data(), 1, H, S, D), {},
                               {.dalibi_slopes = view(dslopes.data(), {1, H})});
  }, "grads.dalibi_slopes: given, but options.alibi_slopes is not");
  expect_error([&] {
    softmax_attention_backward(Q, K, V, O, G, L, bhsd(dq.data(), 1, H, S, D),
                               bhsd(dk.data(), 1, H, S, D), bhsd(dv.data(), 1, H, S, D),
                               {.alibi_slopes = view<const float>(slopes.data(), {1, H})},
                               {.dalibi_slopes = view(dslopes.data(), {2, H})});
  }, "grads.dalibi_slopes: extent 0 is 2, expected 1");
}

}  // namespace fovea::test::softmax_backward_test
