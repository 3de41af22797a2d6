// Mixture-of-Head attention and the dense engine's head-sparse mode: kept rows against the
// f64 oracle times their weight, skipped rows exactly 0 (lse -inf) and never computed (a
// NaN query there changes nothing), weight 1 everywhere == softmax_attention bit for bit,
// thread invariance, MoH's selection (shared heads + top-k, ties to the lower head) and
// bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fovea/fovea.hpp>
#include <limits>
#include <numeric>
#include <vector>

#include "../common/attention_case.hpp"
#include "../common/configs.hpp"
#include "../common/random.hpp"

namespace fovea::test::moh_test {

/// Row weights (B, H, Sq): about a third exactly 0, the rest in [0.1, 2] (one negative).
std::vector<float> some_row_weights(const shape& s, std::uint64_t seed) {
  auto w = uniform<float>(s.B * s.H * s.Sq, seed, 0.1, 2.0);
  const auto keep = bernoulli(w.size(), seed + 1, 0.65);
  for (std::size_t i = 0; i < w.size(); ++i)
    if (!keep[i]) w[i] = 0.f;
  if (w.size() > 3) w[3] = -0.5f;
  return w;
}

template <class C>
class HeadSparse : public ::testing::Test {
 protected:
  using T = typename C::value_type;
  using Backend = typename C::backend;

  /// Runs head_sparse_attention on a case; checks kept rows against the oracle times the
  /// weight, skipped rows for exact zeros and lse -inf.
  static void check(const shape& s, unsigned features, std::uint64_t seed, int threads = 1) {
    SCOPED_TRACE(describe(s, features));
    const attention_inputs<T> in(s, features | feature::lse, seed);
    const auto weights = some_row_weights(s, seed + 10);
    std::vector<T> out(s.B * s.H * s.Sq * s.Dv, T(-7));
    std::vector<float> lse(s.B * s.H * s.Sq, -7.f);
    auto o = in.options(lse.data());
    o.threads = threads;
    auto out_view = in.template layout<T>(out.data(), s.H, s.Sq, s.Dv);
    head_sparse_attention<Backend>(in.qv(), in.kv(), in.vv(), out_view,
                                   view<const float, 3>(weights.data(), {s.B, s.H, s.Sq}), o);
    auto want = reference_softmax<double>(in.qv(), in.kv(), in.vv(), o);
    auto naive = reference_softmax<T>(in.qv(), in.kv(), in.vv(), o);
    const auto got = as_dense(out_view);
    for (std::size_t r = 0; r < weights.size(); ++r) {
      for (index_t d = 0; d < s.Dv; ++d) {
        want.out[r * s.Dv + d] *= weights[r];
        naive.out[r * s.Dv + d] *= weights[r];
        if (weights[r] == 0.f) {
          ASSERT_EQ(got[r * s.Dv + d], 0.0) << "skipped row " << r;
        }
      }
      if (weights[r] == 0.f) {
        ASSERT_EQ(lse[r], -std::numeric_limits<float>::infinity()) << "skipped row " << r;
        want.lse[r] = naive.lse[r] = -std::numeric_limits<double>::infinity();
      }
    }
    EXPECT_TRUE(within_tolerance<T>(got, want.out, naive.out)) << "out";
    EXPECT_TRUE(within_tolerance<float>(as_dense(lse), want.lse, naive.lse)) << "lse";
  }
};
TYPED_TEST_SUITE(HeadSparse, configs, config_names);

TYPED_TEST(HeadSparse, KeptRowsAreWeightedAttentionTheOthersZero) {
  std::uint64_t seed = 1;
  // Decode (Sq <= 16: stacked GQA columns) and prefill tiles; odd dims; GQA and MQA; more
  // queries than keys (bottom-right causal: early rows see no key).
  const shape shapes[] = {{2, 4, 2, 37, 37, 16, 16}, {1, 4, 1, 1, 300, 32, 32},
                          {2, 6, 3, 5, 50, 17, 9},   {1, 3, 3, 70, 90, 17, 23},
                          {1, 2, 1, 40, 20, 8, 8},   {1, 2, 1, 0, 5, 8, 8}};
  for (const auto& s : shapes)
    for (unsigned f : {0u, unsigned(feature::causal), feature::causal | feature::bshd,
                       feature::window | feature::sinks | feature::alibi, feature::top_left | feature::causal})
      TestFixture::check(s, f, seed += 20);
}

TYPED_TEST(HeadSparse, ThreadCountNeverChangesABit) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  for (const shape s : {shape{2, 4, 2, 150, 150, 16, 16}, shape{2, 8, 2, 1, 3000, 16, 16}}) {
    const attention_inputs<T> in(s, feature::causal, 3);
    const auto weights = some_row_weights(s, 4);
    std::vector<T> first;
    for (int threads : {1, 2, 3, 0}) {
      std::vector<T> out(s.B * s.H * s.Sq * s.Dv);
      auto o = in.options(nullptr);
      o.threads = threads;
      head_sparse_attention<Backend>(in.qv(), in.kv(), in.vv(), output_view(out, s),
                                     view<const float, 3>(weights.data(), {s.B, s.H, s.Sq}), o);
      if (first.empty())
        first = out;
      else
        EXPECT_EQ(0, std::memcmp(first.data(), out.data(), out.size() * sizeof(T))) << threads;
    }
  }
}

// Weight 1 on every row is softmax_attention itself, bit for bit (prefill and decode).
TEST(HeadSparseMode, WeightOneEverywhereIsSoftmaxAttention) {
  for (const shape s : {shape{2, 4, 2, 70, 70, 32, 32}, shape{1, 8, 2, 1, 700, 64, 64}}) {
    const attention_inputs<float> in(s, feature::causal, 7);
    const std::vector<float> ones(s.B * s.H * s.Sq, 1.f);
    std::vector<float> a(s.B * s.H * s.Sq * s.Dv), b(a.size()), lse_a(s.B * s.H * s.Sq), lse_b(lse_a.size());
    softmax_attention(in.qv(), in.kv(), in.vv(), output_view(a, s), in.options(lse_a.data()));
    head_sparse_attention(in.qv(), in.kv(), in.vv(), output_view(b, s),
                          view<const float, 3>(ones.data(), {s.B, s.H, s.Sq}), in.options(lse_b.data()));
    EXPECT_EQ(a, b);
    EXPECT_EQ(lse_a, lse_b);
  }
}

// Skipped rows are never computed: a NaN query there leaves its row 0; in a kept row it
// makes the row NaN (the softmax contract).
TEST(HeadSparseMode, SkippedRowsAreNeverComputed) {
  for (const shape s : {shape{1, 4, 2, 40, 40, 16, 16}, shape{1, 4, 2, 1, 200, 16, 16}}) {
    attention_inputs<float> in(s, 0, 9);
    std::vector<float> weights(s.B * s.H * s.Sq, 1.f);
    const index_t skipped = (1 * s.Sq + s.Sq - 1), kept = (2 * s.Sq + 0);  // (h, i) rows
    weights[skipped] = 0.f;
    in.q[skipped * s.D + 5] = std::numeric_limits<float>::quiet_NaN();
    in.q[kept * s.D + 3] = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> out(s.B * s.H * s.Sq * s.Dv, -7.f);
    head_sparse_attention(in.qv(), in.kv(), in.vv(), output_view(out, s),
                          view<const float, 3>(weights.data(), {s.B, s.H, s.Sq}));
    for (index_t d = 0; d < s.Dv; ++d) {
      EXPECT_EQ(out[skipped * s.Dv + d], 0.f);
      EXPECT_TRUE(std::isnan(out[kept * s.Dv + d]));
    }
    for (std::size_t r = 0; r < weights.size(); ++r)
      if (index_t(r) != kept) {
        for (index_t d = 0; d < s.Dv; ++d) ASSERT_TRUE(std::isfinite(out[r * s.Dv + d])) << r;
      }
  }
}

/// MoH's selection by its definition: shared heads, then the top_k routed heads by weight
/// (descending, lower head first on ties).
std::vector<float> moh_reference_rows(const std::vector<float>& g, index_t B, index_t S, index_t H,
                                      index_t shared, index_t top_k) {
  std::vector<float> rows(B * H * S, 0.f);
  for (index_t b = 0; b < B; ++b)
    for (index_t s = 0; s < S; ++s) {
      const float* w = &g[(b * S + s) * H];
      std::vector<index_t> routed(H - shared);
      std::iota(routed.begin(), routed.end(), shared);
      std::stable_sort(routed.begin(), routed.end(), [&](index_t x, index_t y) { return w[x] > w[y]; });
      for (index_t h = 0; h < shared; ++h) rows[(b * H + h) * S + s] = w[h];
      for (index_t r = 0; r < top_k; ++r) rows[(b * H + routed[r]) * S + s] = w[routed[r]];
    }
  return rows;
}

TEST(MixtureOfHeads, SharedHeadsAndTopKRoutedHeadsWeightTheirRows) {
  const index_t B = 2, H = 8, Hk = 2, D = 16;
  std::uint64_t seed = 50;
  for (index_t S : {1, 9, 64})
    for (auto [shared, top_k] : {std::pair<index_t, index_t>{2, 3}, {0, 4}, {0, 0}, {8, 0}, {1, 7}}) {
      SCOPED_TRACE(testing::Message() << "S " << S << " shared " << shared << " top_k " << top_k);
      const shape s{B, H, Hk, S, S, D, D};
      const attention_inputs<float> in(s, feature::causal, ++seed);
      auto g = uniform<float>(B * S * H, ++seed, 0.0, 1.0);  // the router's weights (B, S, H)
      for (index_t t = 0; t < B * S; ++t) g[t * H + H - 1] = g[t * H + H - 2];  // ties
      std::vector<float> out(B * H * S * D, -7.f), lse(B * H * S);
      moh_options mo{.shared_heads = shared, .top_k = top_k};
      mo.attention = in.options(lse.data());
      moh_attention(in.qv(), in.kv(), in.vv(), output_view(out, s),
                    view<const float, 3>(g.data(), {B, S, H}), mo);
      const auto rows = moh_reference_rows(g, B, S, H, shared, top_k);
      std::vector<float> selection(rows.size());
      moh_row_weights(view<const float, 3>(g.data(), {B, S, H}), shared, top_k,
                      view<float, 3>(selection.data(), {B, H, S}));
      EXPECT_EQ(selection, rows);
      index_t on = 0;
      for (float w : rows) on += w != 0.f;
      EXPECT_EQ(on, B * S * (shared + top_k));  // (uniform weights are never exactly 0)
      auto want = reference_softmax<double>(in.qv(), in.kv(), in.vv(), mo.attention);
      auto naive = reference_softmax<float>(in.qv(), in.kv(), in.vv(), mo.attention);
      for (std::size_t r = 0; r < rows.size(); ++r)
        for (index_t d = 0; d < D; ++d) {
          want.out[r * D + d] *= rows[r];
          naive.out[r * D + d] *= rows[r];
        }
      EXPECT_TRUE(within_tolerance<float>(as_dense(out), want.out, naive.out));
    }
}

TEST(MixtureOfHeads, BadInputNamesTheArgumentAndWritesNothing) {
  const index_t B = 1, H = 4, Hk = 2, S = 6, D = 8;
  const shape s{B, H, Hk, S, S, D, D};
  const attention_inputs<float> in(s, 0, 1);
  std::vector<float> g(B * S * H, 0.5f), rows(B * H * S, 1.f), out(B * H * S * D, -7.f);
  auto expect_error = [&](auto&& call, const char* name) {
    expect_error_naming(call, name, out, -7.f);
  };
  const auto G = view<const float, 3>(g.data(), {B, S, H});
  expect_error([&] { moh_attention(in.qv(), in.kv(), in.vv(), output_view(out, s), G, {.top_k = 5}); },
               "options.top_k");
  expect_error([&] { moh_attention(in.qv(), in.kv(), in.vv(), output_view(out, s), G, {.shared_heads = -1}); },
               "options.shared_heads");
  expect_error([&] {
    moh_attention(in.qv(), in.kv(), in.vv(), output_view(out, s), view<const float, 3>(g.data(), {B, H, S}),
                  {.top_k = 1});
  }, "head_weights");
  g[5] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { moh_attention(in.qv(), in.kv(), in.vv(), output_view(out, s), G, {.top_k = 1}); },
               "head_weights");
  rows[7] = std::numeric_limits<float>::infinity();
  expect_error([&] {
    head_sparse_attention(in.qv(), in.kv(), in.vv(), output_view(out, s),
                          view<const float, 3>(rows.data(), {B, H, S}));
  }, "row_weights");
  expect_error([&] {
    head_sparse_attention(in.qv(), in.kv(), in.vv(), output_view(out, s),
                          view<const float, 3>(rows.data(), {B, S, H}));
  }, "row_weights");
}

}  // namespace fovea::test::moh_test
