// dynamic_mask_attention against the dense oracle masked to the top-`keep` keys per row,
// which this file selects on its own, row by row, from the definition.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fovea/fovea.hpp>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "../common/attention_case.hpp"
#include "../common/configs.hpp"
#include "../common/reference_dma.hpp"

namespace fovea::test::dynamic_mask_test {

template <class C>
class DynamicMask : public ::testing::Test {};
TYPED_TEST_SUITE(DynamicMask, configs, config_names);

struct dma_case {
  shape s;
  index_t keep;
  bool causal;
  int bias_form;  // 0: (B, Hk, 1, Sk)  1: (1, 1, 1, Sk)  2: (B, H, Sq, Sk)  3: (B, 1, Sq, Sk)
  bool mask;      // a (B, 1, 1, Sk) padding mask
  bool softcap_lse;
  bool tied = false;  // bias values from {-1, -0, +0, 0.5}: most ranks are ties
};

template <class T, class Backend>
void check_dma_case(const dma_case& c, std::uint64_t seed, int threads = 1) {
  const shape& s = c.s;
  SCOPED_TRACE(describe(s, c.causal ? unsigned(feature::causal) : 0u) +
               " keep=" + std::to_string(c.keep) + " bias form " + std::to_string(c.bias_form) +
               (c.mask ? " +mask" : ""));
  const attention_inputs<T> in(s, 0, seed);
  const index_t bias_extents[4][4] = {
      {s.B, s.Hk, 1, s.Sk}, {1, 1, 1, s.Sk}, {s.B, s.H, s.Sq, s.Sk}, {s.B, 1, s.Sq, s.Sk}};
  const index_t* e = bias_extents[c.bias_form];
  auto bias_values = normal<float>(e[0] * e[1] * e[2] * e[3], seed + 5, 2.0);
  if (c.tied)
    for (float& x : bias_values) x = x < -1 ? -1.0f : x < 0 ? -0.0f : x < 1 ? 0.0f : 0.5f;
  const auto bias = view<const float, 4>(bias_values.data(), {e[0], e[1], e[2], e[3]});
  const auto mask_values = bernoulli(s.B * s.Sk, seed + 6, 0.85);
  dynamic_mask_options o;
  o.causal = c.causal;
  o.keep = c.keep;
  o.threads = threads;
  if (c.mask) o.mask = view<const std::uint8_t, 4>(mask_values.data(), {s.B, 1, 1, s.Sk});
  std::vector<float> lse(s.B * s.H * s.Sq, -7.f);
  if (c.softcap_lse) {
    o.softcap = 3.0;
    o.lse = view<float, 3>(lse.data(), {s.B, s.H, s.Sq});
  }
  std::vector<T> out(s.B * s.H * s.Sq * s.Dv, T(-7));
  const auto out_view = output_view(out, s);
  dynamic_mask_attention<Backend>(in.qv(), in.kv(), in.vv(), out_view, bias, o);

  softmax_options r;
  r.causal = c.causal;
  r.bias = bias;
  r.mask = o.mask;
  r.softcap = o.softcap;
  const auto kept = select_top(s.B, s.H, s.Hk, s.Sq, s.Sk, c.keep, c.causal, bias, o.mask);
  expect_softmax_result<T>(out_view, c.softcap_lse ? &lse : nullptr, in.qv(), in.kv(), in.vv(), r,
                           with_mask_mod(kept));
}

TYPED_TEST(DynamicMask, EqualsDenseOverTheKeptKeys) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape shapes[] = {{1, 1, 1, 1, 1, 1, 1},       {1, 2, 1, 37, 91, 13, 7},
                          {2, 4, 2, 130, 130, 32, 32}, {1, 4, 2, 1, 700, 16, 16},
                          {1, 2, 2, 3, 300, 8, 9},     {1, 2, 1, 70, 0, 8, 8},
                          {1, 2, 1, 0, 20, 8, 8}};
  std::uint64_t seed = 500;
  for (const shape& s : shapes)
    for (index_t keep : {1, 5, 64, 100})
      for (bool causal : {false, true}) {
        check_dma_case<T, Backend>({s, keep, causal, 0, false, false}, ++seed);
        const std::uint64_t next = ++seed;
        check_dma_case<T, Backend>({s, keep, causal, int(next % 4), next % 3 == 0, next % 2 == 0},
                                   next, int(next % 3));
      }
}

// Ties (and -0 against +0) go to the earlier key, whether the rows share one selection
// (one query row, or rows with the same allowed keys: a radix top-k) or rank a growing
// causal prefix each (a heap) or their own biases.
TYPED_TEST(DynamicMask, TiesGoToTheEarlierKey) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  std::uint64_t seed = 900;
  for (const shape& s : {shape{1, 4, 2, 1, 700, 16, 16}, shape{1, 2, 1, 5, 300, 8, 8}})
    for (index_t keep : {1, 5, 64, 299})
      for (bool causal : {false, true})
        for (int form : {0, 2})
          for (bool mask : {false, true})
            check_dma_case<T, Backend>({s, keep, causal, form, mask, false, true}, ++seed);
}

// A decode row over a long cache: the selection shared by the row's heads streams the keys
// through a bounded buffer (cut back to the best `keep` whenever it fills), ties and a
// padding mask included; any thread count.
TYPED_TEST(DynamicMask, LongCacheDecodeStreamsTheSelection) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  std::uint64_t seed = 1300;
  for (index_t keep : {1, 100, 3000})
    for (bool tied : {false, true})
      for (bool mask : {false, true}) {
        const std::uint64_t next = ++seed;
        check_dma_case<T, Backend>({{1, 4, 2, 1, 20000, 16, 16}, keep, true, 0, mask, false, tied},
                                   next, int(next % 3));
      }
}

TYPED_TEST(DynamicMask, EveryBiasAndMaskShape) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  std::uint64_t seed = 700;
  for (int form = 0; form < 4; ++form)
    for (bool mask : {false, true})
      check_dma_case<T, Backend>({{2, 4, 2, 150, 200, 24, 24}, 40, true, form, mask, true}, ++seed);
}

// Oracle 1: with at most `keep` keys and a bias constant along the keys (A = 0), the bias
// cancels in every row and the result is dense causal attention.
TYPED_TEST(DynamicMask, FewKeysAndZeroBiasIsDenseCausal) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape s{1, 4, 2, 90, 120, 32, 32};
  const attention_inputs<T> in(s, feature::causal, 3);
  std::vector<float> zero(s.Hk * s.Sk, 0.f);
  std::vector<T> dma(s.H * s.Sq * s.Dv), dense(dma.size());
  dynamic_mask_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(dma.data(), 1, 4, 90, 32),
                                  view<const float, 4>(zero.data(), {1, 2, 1, s.Sk}),
                                  {.causal = true, .keep = 120});
  softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(dense.data(), 1, 4, 90, 32),
                             {.causal = true});
  for (const auto* result : {&dma, &dense})
    expect_softmax_result<T>(*result, nullptr, in.qv(), in.kv(), in.vv(), {.causal = true});
}

// Oracle 3: in self-attention, rows i < keep see all their causal keys, whatever the bias.
TYPED_TEST(DynamicMask, EarlyRowsSeeEveryCausalKey) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const index_t S = 200, D = 16, keep = 50;
  const attention_inputs<T> in({1, 1, 1, S, S, D, D}, 0, 9);
  const auto bias_values = normal<float>(S, 10, 3.0);
  const auto bias = view<const float, 4>(bias_values.data(), {1, 1, 1, S});
  std::vector<T> dma(S * D), dense(S * D);
  dynamic_mask_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(dma.data(), 1, 1, S, D), bias,
                                  {.causal = true, .keep = keep});
  softmax_options o;
  o.causal = true;
  o.bias = bias;
  softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(dense.data(), 1, 1, S, D), o);
  for (index_t i = 0; i < keep * D; ++i) EXPECT_NEAR(double(dma[i]), double(dense[i]), 1e-5) << i;
  double differ = 0;  // and later rows do drop keys
  for (index_t i = keep * D; i < S * D; ++i) differ += std::abs(double(dma[i] - dense[i]));
  EXPECT_GT(differ, 1.0);
}

// Oracle 4 and the NaN rule: fully masked rows give 0 and lse -inf; NaN/Inf in keys no
// row keeps never reach the output.
TYPED_TEST(DynamicMask, MaskedRowsAndDroppedNaNKeys) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const index_t Sq = 20, Sk = 64, D = 8;
  attention_inputs<T> in({1, 2, 1, Sq, Sk, D, D}, 0, 11);
  std::vector<float> bias_values(Sk);
  for (index_t j = 0; j < Sk; ++j) bias_values[j] = float(j % 2 == 0 ? 1 + j : -1 - j);
  for (index_t j = 1; j < Sk; j += 2) {  // odd keys: lowest bias, never kept with keep = 32
    in.k[j * D] = std::numeric_limits<T>::quiet_NaN();
    in.v[j * D + 1] = std::numeric_limits<T>::infinity();
  }
  std::vector<std::uint8_t> mask(Sq * Sk, 1);
  std::fill(mask.begin() + 3 * Sk, mask.begin() + 4 * Sk, 0);  // row 3 sees nothing
  std::vector<T> out(2 * Sq * D, T(-7));
  std::vector<float> lse(2 * Sq, 0.f);
  dynamic_mask_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(out.data(), 1, 2, Sq, D),
                                  view<const float, 4>(bias_values.data(), {1, 1, 1, Sk}),
                                  {.keep = 32,
                                   .mask = view<const std::uint8_t, 4>(mask.data(), {1, 1, Sq, Sk}),
                                   .lse = view<float, 3>(lse.data(), {1, 2, Sq})});
  for (index_t h = 0; h < 2; ++h)
    for (index_t i = 0; i < Sq; ++i) {
      for (index_t d = 0; d < D; ++d) {
        const T x = out[(h * Sq + i) * D + d];
        if (i == 3)
          EXPECT_EQ(x, T(0));
        else
          EXPECT_TRUE(std::isfinite(double(x))) << h << " " << i << " " << d;
      }
      EXPECT_EQ(lse[h * Sq + 3], -std::numeric_limits<float>::infinity());
    }
}

TYPED_TEST(DynamicMask, SameBitsForAnyThreadCount) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape s{2, 4, 2, 300, 300, 32, 32};
  const attention_inputs<T> in(s, 0, 13);
  const auto bias_values = normal<float>(s.B * s.Hk * s.Sk, 14);
  expect_same_bits_for_threads([&](int threads) {
    std::vector<T> out(s.B * s.H * s.Sq * s.Dv);
    dynamic_mask_attention<Backend>(in.qv(), in.kv(), in.vv(), output_view(out, s),
                                    view<const float, 4>(bias_values.data(), {s.B, s.Hk, 1, s.Sk}),
                                    {.causal = true, .keep = 70, .threads = threads});
    return out;
  });
}

TEST(DynamicMaskBias, MatchesTheDefinitionAndFeedsTheKernel) {
  const index_t B = 2, Hk = 2, Sk = 33, Dv = 5;
  const auto v = normal<float>(B * Hk * Sk * Dv, 1);
  const auto w = normal<float>(Hk * Hk * Dv, 2, 0.3);
  const std::vector<float> a = {-0.5f, -2.f}, dt_bias = {0.25f, -0.75f};
  std::vector<float> bias(B * Hk * Sk), zoh(B * Hk * Sk);
  const auto V = bhsd<const float>(v.data(), B, Hk, Sk, Dv);
  const auto W = view<const float, 2>(w.data(), {Hk, Hk * Dv});
  const auto A = view<const float, 1>(a.data(), {Hk});
  const auto DT = view<const float, 1>(dt_bias.data(), {Hk});
  dynamic_mask_bias(V, W, A, bhsd(bias.data(), B, Hk, 1, Sk), dynamic_mask_form::softplus, DT);
  dynamic_mask_bias(V, W, A, bhsd(zoh.data(), B, Hk, 1, Sk), dynamic_mask_form::zoh_exp, DT);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < Hk; ++h)
      for (index_t t = 0; t < Sk; ++t) {
        double dt = dt_bias[h];
        for (index_t g = 0; g < Hk; ++g)
          for (index_t d = 0; d < Dv; ++d)
            dt += double(V(b, g, t, d)) * double(w[h * Hk * Dv + g * Dv + d]);
        const double want = a[h] * std::log(1 + std::exp(dt));
        EXPECT_NEAR(bias[(b * Hk + h) * Sk + t], want, 1e-5);
        EXPECT_NEAR(zoh[(b * Hk + h) * Sk + t], std::exp(want), 1e-5);
      }
  std::vector<float> out(B * 4 * Sk * Dv, -1.f);
  const auto q = normal<float>(B * 4 * Sk * Dv, 3);
  const auto Q = bhsd<const float>(q.data(), B, 4, Sk, Dv);
  dynamic_mask_attention(Q, V, V, bhsd(out.data(), B, 4, Sk, Dv),
                         bhsd<const float>(bias.data(), B, Hk, 1, Sk), {.causal = true, .keep = 8});
  const auto kept =
      select_top(B, 4, Hk, Sk, Sk, 8, true, bhsd<const float>(bias.data(), B, Hk, 1, Sk), {});
  softmax_options r;
  r.causal = true;
  r.bias = bhsd<const float>(bias.data(), B, Hk, 1, Sk);
  expect_softmax_result<float>(out, nullptr, Q, V, V, r, with_mask_mod(kept));
}

TEST(DynamicMaskArguments, BadInputNamesTheArgument) {
  const index_t S = 16, D = 8;
  std::vector<float> q(2 * S * D, 1.f), out(q.size(), -3.f), bias(2 * S, 0.f), small(3);
  const auto Q = bhsd<const float>(q.data(), 1, 2, S, D);
  const auto O = bhsd(out.data(), 1, 2, S, D);
  const auto B = bhsd<const float>(bias.data(), 1, 2, 1, S);
  expect_rejected("bias", out, -3.f, [&] { dynamic_mask_attention(Q, Q, Q, O, {}); });
  expect_rejected("bias: extent 3", out, -3.f, [&] {
    dynamic_mask_attention(Q, Q, Q, O, bhsd<const float>(small.data(), 1, 1, 1, 3));
  });
  expect_rejected("options.keep", out, -3.f,
                  [&] { dynamic_mask_attention(Q, Q, Q, O, B, {.keep = 0}); });
  expect_rejected("options.scale", out, -3.f,
                  [&] { dynamic_mask_attention(Q, Q, Q, O, B, {.scale = -1.0}); });
  std::vector<std::uint8_t> m(5);
  expect_rejected("options.mask", out, -3.f, [&] {
    dynamic_mask_attention(Q, Q, Q, O, B,
                           {.mask = view<const std::uint8_t, 4>(m.data(), {1, 1, 1, 5})});
  });
  expect_rejected("out: memory overlaps bias", out, -3.f, [&] {
    dynamic_mask_attention(Q, Q, Q, O, bhsd<const float>(out.data(), 1, 2, 1, S));
  });
  std::vector<float> bias_out(2 * S, -3.f), w(2 * 2 * D), a(2);
  expect_rejected("w_dt", bias_out, -3.f, [&] {
    dynamic_mask_bias(Q, view<const float, 2>(w.data(), {2, D}),
                      view<const float, 1>(a.data(), {2}), bhsd(bias_out.data(), 1, 2, 1, S));
  });
  expect_rejected("bias: extent 2", bias_out, -3.f, [&] {
    dynamic_mask_bias(Q, view<const float, 2>(w.data(), {2, 2 * D}),
                      view<const float, 1>(a.data(), {2}), bhsd(bias_out.data(), 1, 2, 2, S / 2));
  });
}

}  // namespace fovea::test::dynamic_mask_test
