// ZeroTuning: softmax attention whose initial token's attention is scaled by gamma per
// head and renormalised, against that definition in f64; equal, bit for bit, to adding
// ln(gamma) to key 0's logit as a bias; and its backward through the score_mod equal to
// the backward with that bias.
#include <gtest/gtest.h>

#include <cmath>
#include <fovea/fovea.hpp>
#include <limits>
#include <span>
#include <vector>

#include "../common/attention_case.hpp"
#include "../common/random.hpp"
#include "../common/reference.hpp"

namespace fovea::test::calibration_test {

/// out[b][h][i] by the definition: p = softmax(scale q.k over the keys row i sees
/// (causal: bottom-right)), p_0 *= gamma_h, renormalised; 0 for a row whose sum is 0.
std::vector<double> zero_tuning_reference(const std::vector<float>& q, const std::vector<float>& k,
                                          const std::vector<float>& v, index_t B, index_t H,
                                          index_t Hk, index_t Sq, index_t Sk, index_t D,
                                          const std::vector<float>& gamma, bool causal) {
  std::vector<double> out(B * H * Sq * D, 0.0);
  const double scale = 1.0 / std::sqrt(double(D));
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Sq; ++i) {
        const index_t hk = h / (H / Hk), last = causal ? std::min(Sk, i + Sk - Sq + 1) : Sk;
        std::vector<double> p(Sk, 0.0);
        double m = -INFINITY;
        for (index_t j = 0; j < last; ++j) {
          double s = 0;
          for (index_t d = 0; d < D; ++d)
            s += double(q[((b * H + h) * Sq + i) * D + d]) * k[((b * Hk + hk) * Sk + j) * D + d];
          p[j] = s * scale;
          m = std::max(m, p[j]);
        }
        double sum = 0;
        for (index_t j = 0; j < last; ++j) {
          p[j] = std::exp(p[j] - m);
          sum += p[j];
        }
        for (index_t j = 0; j < last; ++j) p[j] /= sum;  // the model's own attention
        if (last > 0) p[0] *= gamma[h];                  // ZeroTuning: scale, renormalise
        double total = 0;
        for (index_t j = 0; j < last; ++j) total += p[j];
        if (total == 0) continue;
        for (index_t j = 0; j < last; ++j)
          for (index_t d = 0; d < D; ++d)
            out[((b * H + h) * Sq + i) * D + d] +=
                p[j] / total * v[((b * Hk + hk) * Sk + j) * D + d];
      }
  return out;
}

TEST(ZeroTuning, ScalesTheInitialTokensAttentionAndRenormalises) {
  const index_t B = 2, H = 4, Hk = 2, D = 16;
  const std::vector<float> gamma = {0.5f, 1.0f, 3.0f, 0.0f};  // 0: the initial token hidden
  std::uint64_t seed = 10;
  for (auto [Sq, Sk] : {std::pair<index_t, index_t>{5, 37}, {5, 5}, {1, 1}, {70, 70}, {1, 300}})
    for (bool causal : {false, true}) {
      SCOPED_TRACE(testing::Message() << "Sq " << Sq << " Sk " << Sk << (causal ? " causal" : ""));
      const auto q = normal<float>(B * H * Sq * D, ++seed, 1.5);
      const auto k = normal<float>(B * Hk * Sk * D, ++seed, 1.5);
      const auto v = normal<float>(B * Hk * Sk * D, ++seed);
      std::vector<float> out(B * H * Sq * D, -7.f);
      zero_tuning_attention(bhsd<const float>(q.data(), B, H, Sq, D),
                            bhsd<const float>(k.data(), B, Hk, Sk, D),
                            bhsd<const float>(v.data(), B, Hk, Sk, D), bhsd(out.data(), B, H, Sq, D),
                            std::span<const float>(gamma), {.causal = causal});
      const auto ref = zero_tuning_reference(q, k, v, B, H, Hk, Sq, Sk, D, gamma, causal);
      for (std::size_t e = 0; e < out.size(); ++e)
        ASSERT_NEAR(out[e], ref[e], 2e-5 * (1 + std::abs(ref[e]))) << "element " << e;
      if (causal && Sq == Sk) {  // row 0 sees only the initial token: with gamma 0, nothing
        for (index_t b = 0; b < B; ++b)
          for (index_t d = 0; d < D; ++d) {
            EXPECT_EQ(out[((b * H + 3) * Sq + 0) * D + d], 0.f);
          }
      }
    }
}

// The equality that makes it one pass: ln(gamma_h) added to key 0's logit as a bias.
TEST(ZeroTuning, EqualsLnGammaAddedToKeyZero) {
  const index_t B = 1, H = 4, Hk = 1, Sq = 33, Sk = 80, D = 24;
  const std::vector<float> gamma = {0.25f, 2.0f, 1.0f, 0.0f};
  const auto q = normal<float>(B * H * Sq * D, 1), k = normal<float>(B * Hk * Sk * D, 2),
             v = normal<float>(B * Hk * Sk * D, 3), dout = normal<float>(B * H * Sq * D, 4);
  std::vector<float> bias(H * Sk, 0.f);
  for (index_t h = 0; h < H; ++h) bias[h * Sk] = std::log(gamma[h]);
  const auto Q = bhsd<const float>(q.data(), B, H, Sq, D);
  const auto K = bhsd<const float>(k.data(), B, Hk, Sk, D);
  const auto V = bhsd<const float>(v.data(), B, Hk, Sk, D);
  for (bool causal : {false, true}) {
    softmax_options with_bias{.causal = causal};
    with_bias.bias = view<const float, 4>(bias.data(), {1, H, 1, Sk});
    std::vector<float> o1(B * H * Sq * D), o2(o1.size()), lse1(B * H * Sq), lse2(lse1.size());
    softmax_options plain{.causal = causal};
    plain.lse = view<float, 3>(lse1.data(), {B, H, Sq});
    with_bias.lse = view<float, 3>(lse2.data(), {B, H, Sq});
    const zero_tuning zt{std::span<const float>(gamma)};
    softmax_attention(Q, K, V, bhsd(o1.data(), B, H, Sq, D), plain, with_score_mod(zt));
    softmax_attention(Q, K, V, bhsd(o2.data(), B, H, Sq, D), with_bias);
    ASSERT_EQ(o1, o2);
    ASSERT_EQ(lse1, lse2);
    // The backward through the score_mod (derivative 1) equals the backward with the bias.
    std::vector<float> dq1(q.size()), dk1(k.size()), dv1(v.size()), dq2(q.size()), dk2(k.size()),
        dv2(v.size());
    const auto O = bhsd<const float>(o1.data(), B, H, Sq, D);
    const auto G = bhsd<const float>(dout.data(), B, H, Sq, D);
    const auto L = view<const float, 3>(lse1.data(), {B, H, Sq});
    softmax_attention_backward(Q, K, V, O, G, L, bhsd(dq1.data(), B, H, Sq, D),
                               bhsd(dk1.data(), B, Hk, Sk, D), bhsd(dv1.data(), B, Hk, Sk, D),
                               softmax_options{.causal = causal}, {}, with_score_mod(zt));
    softmax_options bias_only{.causal = causal};
    bias_only.bias = with_bias.bias;
    softmax_attention_backward(Q, K, V, O, G, L, bhsd(dq2.data(), B, H, Sq, D),
                               bhsd(dk2.data(), B, Hk, Sk, D), bhsd(dv2.data(), B, Hk, Sk, D),
                               bias_only);
    for (std::size_t e = 0; e < dq1.size(); ++e) ASSERT_NEAR(dq1[e], dq2[e], 1e-6f);
    for (std::size_t e = 0; e < dk1.size(); ++e) ASSERT_NEAR(dk1[e], dk2[e], 1e-6f);
    for (std::size_t e = 0; e < dv1.size(); ++e) ASSERT_NEAR(dv1[e], dv2[e], 1e-6f);
  }
}

TEST(ZeroTuning, BadGammaNamesTheArgument) {
  const index_t H = 2, S = 4, D = 8;
  const std::vector<float> x(H * S * D, 0.5f);
  std::vector<float> out(H * S * D, -3.f);
  const auto X = bhsd<const float>(x.data(), 1, H, S, D);
  const auto O = bhsd(out.data(), 1, H, S, D);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const std::vector<float>& gamma :
       {std::vector<float>{1.f}, {1.f, 1.f, 1.f}, {1.f, -0.5f}, {nan, 1.f}, {1.f, INFINITY}})
    expect_rejected("gamma", out, -3.f,
                    [&] { zero_tuning_attention(X, X, X, O, std::span<const float>(gamma)); });
}


// ---- ACT and VAR ----------------------------------------------------------------------

/// Inputs with planted sinks: every query shares a direction u, and keys 0, 7 and 33 lie
/// along it, so they draw a large share of every row they are visible to.
struct sink_case {
  index_t B = 2, H = 4, Hk = 2, Sq = 96, Sk = 96, D = 16;
  std::vector<float> q, k, v;
  sink_case(index_t b, index_t h, index_t hk, index_t sq, index_t sk, index_t d, std::uint64_t seed)
      : B(b), H(h), Hk(hk), Sq(sq), Sk(sk), D(d) {
    q = normal<float>(B * H * Sq * D, seed, 0.5);
    k = normal<float>(B * Hk * Sk * D, seed + 1, 0.5);
    v = normal<float>(B * Hk * Sk * D, seed + 2);
    for (std::size_t r = 0; r < q.size() / D; ++r) q[r * D] += 3.0f;  // u = e_0
    for (index_t bh = 0; bh < B * Hk; ++bh)
      for (index_t j : {0, 7, 33})
        if (j < Sk) k[(bh * Sk + j) * D] += 4.0f;
  }
  tensor_view<const float, 4> Q() const { return bhsd<const float>(q.data(), B, H, Sq, D); }
  tensor_view<const float, 4> K() const { return bhsd<const float>(k.data(), B, Hk, Sk, D); }
  tensor_view<const float, 4> V() const { return bhsd<const float>(v.data(), B, Hk, Sk, D); }
  /// Row (b, h, i)'s probabilities by the definitions, in double (0 where hidden).
  std::vector<double> probabilities(const softmax_options& o, index_t b, index_t h, index_t i) const {
    reference_row<double> row;
    row_weights<double>(Q(), K(), o, custom_variant<>{}, b, h, i, row);
    std::vector<double> p(Sk, 0.0);
    for (index_t j = 0; j < Sk; ++j) p[j] = row.keep[j] && row.l > 0 ? row.e[j] / row.l : 0.0;
    return p;
  }
  std::vector<double> mix(const std::vector<double>& p, index_t b, index_t h) const {
    std::vector<double> o(D, 0.0);
    for (index_t j = 0; j < Sk; ++j)
      for (index_t d = 0; d < D; ++d) o[d] += p[j] * v[((b * Hk + h / (H / Hk)) * Sk + j) * D + d];
    return o;
  }
};

/// ACT by its definition: column means over the head's rows, the sinks above the
/// threshold but the first, beta on them and their removed mass spread over the rest.
std::vector<double> act_reference(const sink_case& c, const softmax_options& o, double threshold,
                                  double beta, const std::vector<bool>& chosen) {
  std::vector<double> out(c.B * c.H * c.Sq * c.D);
  for (index_t b = 0; b < c.B; ++b)
    for (index_t h = 0; h < c.H; ++h) {
      std::vector<std::vector<double>> P(c.Sq);
      std::vector<double> mean(c.Sk, 0.0);
      for (index_t i = 0; i < c.Sq; ++i) {
        P[i] = c.probabilities(o, b, h, i);
        for (index_t j = 0; j < c.Sk; ++j) mean[j] += P[i][j] / double(c.Sq);
      }
      std::vector<bool> in_J(c.Sk, false);
      bool first = true;
      for (index_t j = 0; j < c.Sk; ++j)
        if (chosen[h] && mean[j] > threshold) {
          in_J[j] = !first;
          first = false;
        }
      for (index_t i = 0; i < c.Sq; ++i) {
        auto p = P[i];
        double C = 0, L = 0;  // L: the keys' mass (below 1 with a sink logit)
        for (index_t j = 0; j < c.Sk; ++j) C += in_J[j] ? p[j] : 0.0, L += p[j];
        if (L - C > 1e-5 * L)
          for (index_t j = 0; j < c.Sk; ++j) p[j] *= in_J[j] ? beta : (L - beta * C) / (L - C);
        const auto row = c.mix(p, b, h);
        std::copy(row.begin(), row.end(), out.begin() + ((b * c.H + h) * c.Sq + i) * c.D);
      }
    }
  return out;
}

void expect_near(const std::vector<float>& got, const std::vector<double>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t e = 0; e < got.size(); ++e)
    ASSERT_NEAR(got[e], want[e], 3e-5 * (1 + std::abs(want[e]))) << "element " << e;
}

TEST(ACT, CalibratesTheSinksAboveTheThresholdButTheFirst) {
  std::uint64_t seed = 100;
  const std::vector<index_t> some = {1, 2};
  for (auto [Sq, Sk] : {std::pair<index_t, index_t>{96, 96}, {5, 60}, {1, 200}, {40, 75}})
    for (int variant = 0; variant < 4; ++variant) {
      const sink_case c(2, 4, 2, Sq, Sk, 16, seed += 10);
      act_options ao{.threshold = 0.05, .beta = 0.3};
      ao.attention.causal = variant % 2 == 1;
      if (variant == 2) {
        ao.attention.window_left = 40;
        ao.attention.softcap = 8;
      }
      std::vector<float> slopes(c.H, 0.02f), sinks(c.H, 0.5f);
      if (variant == 3) {
        ao.attention.alibi_slopes = view<const float, 2>(slopes.data(), {1, c.H});
        ao.attention.sinks = view<const float, 1>(sinks.data(), {c.H});
        ao.heads = some;
      }
      SCOPED_TRACE(testing::Message() << "Sq " << Sq << " Sk " << Sk << " variant " << variant);
      std::vector<float> out(c.B * c.H * Sq * c.D, -7.f);
      act_attention(c.Q(), c.K(), c.V(), bhsd(out.data(), c.B, c.H, Sq, c.D), ao);
      std::vector<bool> chosen(c.H, ao.heads.empty());
      for (index_t h : ao.heads) chosen[h] = true;
      expect_near(out, act_reference(c, ao.attention, ao.threshold, ao.beta, chosen));
      // Something moved: the same call at beta 1 is softmax attention, bit for bit.
      std::vector<float> plain(out.size()), same(out.size());
      softmax_attention(c.Q(), c.K(), c.V(), bhsd(plain.data(), c.B, c.H, Sq, c.D), ao.attention);
      ao.beta = 1;
      act_attention(c.Q(), c.K(), c.V(), bhsd(same.data(), c.B, c.H, Sq, c.D), ao);
      EXPECT_EQ(same, plain);
      if (Sq > 1) {
        EXPECT_NE(out, plain);
      }
    }
}

// The column sums ACT's sinks come from (the transposed problem's lse), against
// sum_i p_ij in double: causal and windows transpose, ALiBi and sinks carry over.
TEST(ACT, ColumnSumsAreTheAttentionEachKeyReceives) {
  std::uint64_t seed = 200;
  for (auto [Sq, Sk] : {std::pair<index_t, index_t>{96, 96}, {5, 60}, {40, 75}, {75, 40}})
    for (int variant = 0; variant < 5; ++variant) {
      const sink_case c(2, 4, 2, Sq, Sk, 16, seed += 10);
      softmax_options o;
      o.causal = variant == 1 || variant == 3;
      if (variant == 2) o.window_left = 9, o.window_right = 4;
      if (variant == 3) o.window_left = 20, o.align = diagonal::top_left;
      std::vector<float> slopes(c.B * c.H), sinks(c.H, 0.5f);
      for (std::size_t h = 0; h < slopes.size(); ++h) slopes[h] = 0.01f * float(h + 1);
      if (variant == 4) {
        o.alibi_slopes = view<const float, 2>(slopes.data(), {c.B, c.H});
        o.sinks = view<const float, 1>(sinks.data(), {c.H});
        o.softcap = 5;
      }
      SCOPED_TRACE(testing::Message() << "Sq " << Sq << " Sk " << Sk << " variant " << variant);
      std::vector<float> out(c.B * c.H * Sq * c.D), lse(c.B * c.H * Sq);
      softmax_options with_lse = o;
      with_lse.lse = view<float, 3>(lse.data(), {c.B, c.H, Sq});
      softmax_attention(c.Q(), c.K(), c.V(), bhsd(out.data(), c.B, c.H, Sq, c.D), with_lse);
      const auto pr = detail::make_softmax_problem<float>(c.Q(), c.K(), c.V(),
                                                         bhsd(out.data(), c.B, c.H, Sq, c.D), o);
      const auto got = detail::column_sums<default_backend>(c.Q(), c.K(), pr, o, lse);
      for (index_t b = 0; b < c.B; ++b)
        for (index_t h = 0; h < c.H; ++h) {
          std::vector<double> want(Sk, 0.0);
          for (index_t i = 0; i < Sq; ++i) {
            const auto p = c.probabilities(o, b, h, i);
            for (index_t j = 0; j < Sk; ++j) want[j] += p[j];
          }
          for (index_t j = 0; j < Sk; ++j)
            ASSERT_NEAR(got[(b * c.H + h) * Sk + j], want[j], 2e-5 * (1 + want[j]))
                << "b " << b << " h " << h << " key " << j;
        }
    }
}

// Rows that see only calibrated sinks keep their attention (nothing else can take the
// mass); 1 - C computed from fp32 probabilities is rounding there, not a weight.
TEST(ACT, RowsThatSeeOnlyTheSinksAreLeftAsTheyAre) {
  const index_t S = 8, D = 8;
  const auto q = uniform<float>(S * D, 1, -2.0, 2.0), k = uniform<float>(S * D, 2, -2.0, 2.0),
             v = uniform<float>(S * D, 3, -1.0, 1.0);
  const auto Q = bhsd<const float>(q.data(), 1, 1, S, D), K = bhsd<const float>(k.data(), 1, 1, S, D),
             V = bhsd<const float>(v.data(), 1, 1, S, D);
  act_options ao{.threshold = 1e-6, .beta = 0.2};  // every key a sink, all but key 0 in J
  ao.attention.window_left = 1, ao.attention.window_right = 0;  // each row sees 2 keys
  std::vector<float> out(S * D), plain(S * D);
  act_attention(Q, K, V, bhsd(out.data(), 1, 1, S, D), ao);
  softmax_attention(Q, K, V, bhsd(plain.data(), 1, 1, S, D), ao.attention);
  sink_case c(1, 1, 1, S, S, D, 1);
  c.q = q, c.k = k, c.v = v;
  expect_near(out, act_reference(c, ao.attention, ao.threshold, ao.beta, {true}));
  for (index_t i = 2; i < S; ++i)  // rows 2.. see keys i - 1 and i, both calibrated sinks
    for (index_t d = 0; d < D; ++d) EXPECT_EQ(out[i * D + d], plain[i * D + d]) << i;
}

TEST(ACT, ThreadCountNeverChangesABit) {
  const sink_case c(2, 4, 2, 150, 150, 16, 3);
  std::vector<float> first;
  for (int threads : {1, 2, 3, 0}) {
    std::vector<float> out(c.B * c.H * c.Sq * c.D);
    act_options ao{.threshold = 0.05, .beta = 0.3};
    ao.attention.causal = true;
    ao.attention.threads = threads;
    act_attention(c.Q(), c.K(), c.V(), bhsd(out.data(), c.B, c.H, c.Sq, c.D), ao);
    if (first.empty())
      first = out;
    else
      EXPECT_EQ(first, out) << threads;
  }
}

/// VAR by its definition: a fraction p of the sinks' mass to the targets, by weight.
std::vector<double> var_reference(const sink_case& c, const softmax_options& o, double p_move,
                                  const std::vector<index_t>& sinks,
                                  const std::vector<std::uint8_t>& targets,
                                  const std::vector<bool>& chosen) {
  std::vector<double> out(c.B * c.H * c.Sq * c.D);
  for (index_t b = 0; b < c.B; ++b)
    for (index_t h = 0; h < c.H; ++h)
      for (index_t i = 0; i < c.Sq; ++i) {
        auto p = c.probabilities(o, b, h, i);
        double S = 0, T = 0;
        for (index_t j : sinks) S += p[j];
        for (index_t j = 0; j < c.Sk; ++j) T += targets[j] ? p[j] : 0.0;
        if (chosen[h] && T > 0) {
          for (index_t j : sinks) p[j] *= 1 - p_move;
          for (index_t j = 0; j < c.Sk; ++j)
            if (targets[j]) p[j] *= 1 + p_move * S / T;
        }
        const auto row = c.mix(p, b, h);
        std::copy(row.begin(), row.end(), out.begin() + ((b * c.H + h) * c.Sq + i) * c.D);
      }
  return out;
}

TEST(VAR, MovesAFractionOfTheSinksAttentionToTheTargets) {
  std::uint64_t seed = 300;
  const std::vector<index_t> sinks = {0, 7}, some = {0, 3};
  std::vector<float> sink_logits = {1.0f, -0.5f, 2.0f, 0.0f};
  for (auto [Sq, Sk] : {std::pair<index_t, index_t>{96, 96}, {5, 60}, {1, 200}})
    for (int variant = 0; variant < 4; ++variant) {
      const sink_case c(2, 4, 2, Sq, Sk, 16, seed += 10);
      std::vector<std::uint8_t> targets(Sk, 0);  // "image tokens": keys [10, 50)
      for (index_t j = 10; j < std::min<index_t>(50, Sk); ++j) targets[j] = 1;
      var_options vo{.p = 0.6, .sink_keys = sinks, .target_keys = targets};
      vo.attention.causal = variant >= 1;
      if (variant == 2) vo.heads = some;
      if (variant == 3)  // a sink logit (options.sinks) is in every row's denominator, not a target
        vo.attention.sinks = view<const float, 1>(sink_logits.data(), {c.H});
      SCOPED_TRACE(testing::Message() << "Sq " << Sq << " Sk " << Sk << " variant " << variant);
      std::vector<float> out(c.B * c.H * Sq * c.D, -7.f);
      var_attention(c.Q(), c.K(), c.V(), bhsd(out.data(), c.B, c.H, Sq, c.D), vo);
      std::vector<bool> chosen(c.H, vo.heads.empty());
      for (index_t h : vo.heads) chosen[h] = true;
      // (Causal with Sq = Sk: rows before key 10 see no target and stay as they are.)
      expect_near(out, var_reference(c, vo.attention, vo.p, sinks, targets, chosen));
    }
}

TEST(ACTAndVAR, BadInputNamesTheArgumentAndWritesNothing) {
  const sink_case c(1, 4, 2, 6, 6, 8, 1);
  std::vector<float> out(c.B * c.H * c.Sq * c.D, -3.f);
  const auto O = bhsd(out.data(), c.B, c.H, c.Sq, c.D);
  for (double threshold : {0.0, -0.1, 1.5, double(NAN)})
    expect_rejected("options.threshold", out, -3.f,
                    [&] { act_attention(c.Q(), c.K(), c.V(), O, {.threshold = threshold, .beta = 0.5}); });
  expect_rejected("options.beta", out, -3.f,
                  [&] { act_attention(c.Q(), c.K(), c.V(), O, {.threshold = 0.1, .beta = 1.5}); });
  const std::vector<index_t> bad_heads = {4};
  expect_rejected("options.heads", out, -3.f, [&] {
    act_attention(c.Q(), c.K(), c.V(), O, {.threshold = 0.1, .beta = 0.5, .heads = bad_heads});
  });
  std::vector<float> bias(c.Sq * c.Sk, 0.f);
  act_options with_bias{.threshold = 0.1, .beta = 0.5};
  with_bias.attention.bias = view<const float, 4>(bias.data(), {1, 1, c.Sq, c.Sk});
  expect_rejected("options.attention.bias", out, -3.f,
                  [&] { act_attention(c.Q(), c.K(), c.V(), O, with_bias); });
  const std::vector<std::uint8_t> targets(c.Sk, 0), short_targets(c.Sk - 1, 0);
  std::vector<std::uint8_t> target_sink(c.Sk, 0);
  target_sink[0] = 1;
  const std::vector<index_t> sink0 = {0}, twice = {1, 1}, outside = {6};
  expect_rejected("options.p", out, -3.f, [&] {
    var_attention(c.Q(), c.K(), c.V(), O, {.p = -0.5, .sink_keys = sink0, .target_keys = targets});
  });
  expect_rejected("options.target_keys", out, -3.f, [&] {
    var_attention(c.Q(), c.K(), c.V(), O, {.p = 0.5, .sink_keys = sink0, .target_keys = short_targets});
  });
  for (const auto* s : {&twice, &outside})
    expect_rejected("options.sink_keys", out, -3.f, [&] {
      var_attention(c.Q(), c.K(), c.V(), O, {.p = 0.5, .sink_keys = *s, .target_keys = targets});
    });
  expect_rejected("options.sink_keys", out, -3.f, [&] {
    var_attention(c.Q(), c.K(), c.V(), O, {.p = 0.5, .sink_keys = sink0, .target_keys = target_sink});
  });
}


// ---- prob_mod: a functor on each normalised probability before P V -------------------

struct reweight_by_key {  // p' = p (1 + 0.5 ((j + h) % 3 - 1)): moves mass between keys
  template <class T>
  T operator()(T p, index_t, index_t h, index_t, index_t j) const {
    return p * T(1 + 0.5 * double((j + h) % 3 - 1));
  }
};
struct drop_small {  // p' = p if p >= 0.02 else 0 (a sparsified row, not renormalised)
  template <class T>
  T operator()(T p, index_t, index_t, index_t, index_t) const {
    return p >= T(0.02) ? p : T(0);
  }
};
struct keep_probability {
  template <class T>
  T operator()(T p, index_t, index_t, index_t, index_t) const {
    return p;
  }
};

/// sum_j f(p_ij) v_j in double, p from the definitions (every option and variant).
template <class F, class ScoreMod, class MaskMod>
std::vector<double> prob_mod_reference(const attention_inputs<float>& in, const softmax_options& o,
                                       const custom_variant<ScoreMod, MaskMod>& custom, F f) {
  const shape& s = in.s;
  std::vector<double> out(s.B * s.H * s.Sq * s.Dv, 0.0);
  for (index_t b = 0; b < s.B; ++b)
    for (index_t h = 0; h < s.H; ++h)
      for (index_t i = 0; i < s.Sq; ++i) {
        reference_row<double> row;
        row_weights<double>(in.qv(), in.kv(), o, custom, b, h, i, row);
        for (index_t j = 0; j < s.Sk; ++j) {
          if (!row.keep[j] || row.l == 0) continue;
          const double p = f(row.e[j] / row.l, b, h, i, j);
          for (index_t d = 0; d < s.Dv; ++d)
            out[((b * s.H + h) * s.Sq + i) * s.Dv + d] += p * in.vv()(b, h / (s.H / s.Hk), j, d);
        }
      }
  return out;
}

template <class F, class ScoreMod = identity_score_mod, class MaskMod = keep_all_mask_mod>
void check_prob_mod(const shape& s, unsigned features, std::uint64_t seed, F f, int threads = 1,
                    const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  SCOPED_TRACE(describe(s, features));
  const attention_inputs<float> in(s, features, seed);
  std::vector<float> out(s.B * s.H * s.Sq * s.Dv, -7.f), lse(s.B * s.H * s.Sq, -7.f);
  auto o = in.options(lse.data());
  o.threads = threads;
  auto out_view = in.layout<float>(out.data(), s.H, s.Sq, s.Dv);
  softmax_attention_prob_mod(in.qv(), in.kv(), in.vv(), out_view, f, o, custom);
  const auto want = prob_mod_reference(in, o, custom, f);
  const auto got = as_dense(out_view);
  for (std::size_t e = 0; e < got.size(); ++e)
    ASSERT_NEAR(got[e], want[e], 3e-5 * (1 + std::abs(want[e]))) << "element " << e;
  if (features & feature::lse) {
    const auto plain = reference_softmax<double>(in.qv(), in.kv(), in.vv(), o, custom);
    for (std::size_t r = 0; r < lse.size(); ++r)
      if (std::isinf(plain.lse[r])) {
        ASSERT_EQ(lse[r], float(plain.lse[r]));
      } else {
        ASSERT_NEAR(lse[r], plain.lse[r], 1e-5 * (1 + std::abs(plain.lse[r])));
      }
  }
}

TEST(ProbMod, EachProbabilityPassesThroughTheFunctorBeforePV) {
  std::uint64_t seed = 500;
  const shape shapes[] = {{2, 4, 2, 37, 37, 16, 16}, {1, 4, 1, 1, 300, 32, 24},
                          {2, 6, 3, 5, 50, 17, 9},   {1, 3, 3, 70, 90, 17, 23},
                          {1, 2, 1, 40, 20, 8, 8},   {1, 2, 1, 0, 5, 8, 8}};
  const unsigned sets[] = {0u, feature::causal | feature::lse,
                           feature::bias | feature::mask | feature::bshd | feature::lse,
                           feature::window | feature::sinks | feature::alibi | feature::softcap,
                           feature::top_left | feature::causal | feature::scale};
  for (const auto& s : shapes)
    for (unsigned f : sets) {
      check_prob_mod(s, f, seed += 10, reweight_by_key{});
      check_prob_mod(s, f, seed += 10, drop_small{});
      check_prob_mod(s, f, seed += 10, keep_probability{});
    }
  // The user's score_mod and mask_mod apply before it.
  check_prob_mod(shape{2, 4, 2, 33, 45, 16, 16}, feature::causal, 77, reweight_by_key{}, 1,
                 with_mods(test_score_mod{}, test_mask_mod{}));
}

TEST(ProbMod, TheIdentityIsSoftmaxAttentionAndThreadsChangeNoBit) {
  const shape s{2, 8, 2, 150, 150, 32, 32};
  const attention_inputs<float> in(s, feature::causal, 9);
  std::vector<float> plain(s.B * s.H * s.Sq * s.Dv), first;
  softmax_attention(in.qv(), in.kv(), in.vv(), output_view(plain, s), in.options(nullptr));
  for (int threads : {1, 2, 3, 0}) {
    std::vector<float> out(plain.size());
    auto o = in.options(nullptr);
    o.threads = threads;
    softmax_attention_prob_mod(in.qv(), in.kv(), in.vv(), output_view(out, s), keep_probability{}, o);
    for (std::size_t e = 0; e < out.size(); ++e)
      ASSERT_NEAR(out[e], plain[e], 2e-6 * (1 + std::abs(plain[e])));
    if (first.empty())
      first = out;
    else
      EXPECT_EQ(first, out) << threads;
  }
  // Huge logits (|s| ~ 1e12, found by the fuzzer): p is taken against the row's max, not
  // against an fp32 lse, which cannot hold log(Sk) next to 1e12.
  {
    attention_inputs<float> huge(shape{1, 2, 1, 13, 13, 6, 6}, 0, 21);
    for (index_t d = 0; d < 6; ++d) huge.q[3 * 6 + d] = 4e11f * float(d % 2 ? 1 : -1);
    std::vector<float> a(2 * 13 * 6), b(a.size());
    softmax_attention(huge.qv(), huge.kv(), huge.vv(), bhsd(a.data(), 1, 2, 13, 6));
    softmax_attention_prob_mod(huge.qv(), huge.kv(), huge.vv(), bhsd(b.data(), 1, 2, 13, 6),
                               keep_probability{});
    for (std::size_t e = 0; e < a.size(); ++e) ASSERT_NEAR(b[e], a[e], 1e-5 * (1 + std::abs(a[e]))) << e;
  }
  // bf16 q, k, v and out (fp32 inside): the identity within bf16's rounding of the output.
  std::vector<bfloat16> qb(in.q.begin(), in.q.end()), kb(in.k.begin(), in.k.end()),
      vb(in.v.begin(), in.v.end()), ob(plain.size()), pb(plain.size());
  const auto Qb = bhsd<const bfloat16>(qb.data(), s.B, s.H, s.Sq, s.D);
  const auto Kb = bhsd<const bfloat16>(kb.data(), s.B, s.Hk, s.Sk, s.D);
  const auto Vb = bhsd<const bfloat16>(vb.data(), s.B, s.Hk, s.Sk, s.Dv);
  softmax_attention(Qb, Kb, Vb, bhsd(pb.data(), s.B, s.H, s.Sq, s.Dv), {.causal = true});
  softmax_attention_prob_mod(Qb, Kb, Vb, bhsd(ob.data(), s.B, s.H, s.Sq, s.Dv), keep_probability{},
                             {.causal = true});
  for (std::size_t e = 0; e < ob.size(); ++e)
    ASSERT_NEAR(float(ob[e]), float(pb[e]), 1e-2 * (1 + std::abs(float(pb[e]))));
}

}  // namespace fovea::test::calibration_test
