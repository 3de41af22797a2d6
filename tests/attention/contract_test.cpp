// The public contract (the call forms acceptance checks compile against: the README's
// "Use" section shows them), compiled exactly as written (float views, the designated
// initializers, options filled field by field), for every kernel family.
#include <gtest/gtest.h>

#include <cmath>
#include <fovea/fovea.hpp>
#include <vector>

#include "../common/random.hpp"

namespace fovea::test::contract_test {

template <class F>
void run_contract() {
  const index_t B = 2, H = 4, Hk = 2, Sq = 300, Sk = 300, D = 32, Dv = 32;
  std::vector<F> q = normal<F>(B * H * Sq * D, 1), k = normal<F>(B * Hk * Sk * D, 2),
                 v = normal<F>(B * Hk * Sk * Dv, 3), o(B * H * Sq * Dv);
  auto Q = fovea::bhsd(q.data(), B, H, Sq, D);
  auto K = fovea::bhsd(k.data(), B, Hk, Sk, D);
  auto V = fovea::bhsd(v.data(), B, Hk, Sk, Dv);
  auto O = fovea::bhsd(o.data(), B, H, Sq, Dv);
  auto finite = [&] {
    for (const F& x : o)
      if (!std::isfinite(double(x))) return false;
    return true;
  };
  fovea::softmax_attention(Q, K, V, O);
  EXPECT_TRUE(finite());
  fovea::softmax_attention(Q, K, V, O, {.causal = true, .threads = 1});
  EXPECT_TRUE(finite());
  fovea::linear_attention(Q, K, V, O, {.causal = true});
  EXPECT_TRUE(finite());
  fovea::agent_attention(Q, K, V, O, {.num_agents = 64});
  EXPECT_TRUE(finite());
  fovea::routing_attention(Q, K, V, O, {.num_clusters = 16, .window = 256});
  EXPECT_TRUE(finite());
  fovea::hip_attention(Q, K, V, O, {.top_k = 512});
  EXPECT_TRUE(finite());
  std::vector<float> b = normal<float>(B * Hk * Sk, 4);
  auto bias = fovea::bhsd(b.data(), B, Hk, 1, Sk);
  fovea::dynamic_mask_attention(Q, K, V, O, bias, {.keep = 2048});
  EXPECT_TRUE(finite());
  fovea::hip_options ho;
  ho.causal = true;
  ho.top_k = 512;
  fovea::hip_attention(Q, K, V, O, ho);
  EXPECT_TRUE(finite());
  // This turn's additions that exist: lse out of the forward; the gated delta rule.
  std::vector<float> l(B * H * Sq);
  auto L = fovea::view<float, 3>(l.data(), {B, H, Sq});
  fovea::softmax_attention(Q, K, V, O, {.causal = true, .lse = L});
  EXPECT_TRUE(finite());
  std::vector<float> g(B * Hk * Sq, -0.05f), beta(B * Hk * Sq, 0.02f);  // beta |k|^2 < 2: stable
  auto G = fovea::bhsd<const float>(g.data(), B, Hk, Sq, 1);
  auto Beta = fovea::bhsd<const float>(beta.data(), B, Hk, Sq, 1);
  fovea::linear_recurrence(Q, K, V, O, {.rule = fovea::update_rule::gated_delta,
                                        .decay = G /* (B,Hk,S,1) or (B,Hk,S,Dk), log space */,
                                        .beta = Beta /* (B,Hk,S,1) */});
  EXPECT_TRUE(finite());
  fovea::linear_recurrence_options lro;
  lro.threads = 1;
  fovea::softmax_options so;
  fovea::linear_options lo;
  fovea::agent_options ao;
  fovea::routing_options ro;
  fovea::dynamic_mask_options dmo;
  EXPECT_FALSE(so.causal || lo.causal || ao.causal || ro.causal || dmo.causal ||
               fovea::hip_options{}.causal);
}

TEST(Contract, FloatViews) { run_contract<float>(); }
TEST(Contract, DoubleViews) { run_contract<double>(); }

}  // namespace fovea::test::contract_test
