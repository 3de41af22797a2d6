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

namespace fovea::test {
namespace {

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

}  // namespace
}  // namespace fovea::test
