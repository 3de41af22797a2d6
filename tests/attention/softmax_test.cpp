// softmax_attention against the f64 oracle: shape sweeps, every feature alone and in
// pairs, the numerical contract (masked rows, NaN, threads), layouts and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fovea/fovea.hpp>
#include <limits>
#include <string>
#include <vector>

#include "../common/attention_case.hpp"
#include "../common/configs.hpp"

namespace fovea::test::softmax_test {


template <class C>
class SoftmaxAttention : public ::testing::Test {
 protected:
  using T = typename C::value_type;
  using Backend = typename C::backend;
  void check(const shape& s, unsigned features, std::uint64_t seed = 1, int threads = 1) {
    check_features<T, Backend>(s, features, seed, threads);
  }
};
TYPED_TEST_SUITE(SoftmaxAttention, configs, config_names);

TYPED_TEST(SoftmaxAttention, SquareLengths) {
  for (index_t n : {0, 1, 17, 64, 97, 128, 200, 1025})
    for (unsigned f : {0u, unsigned(feature::causal)}) this->check({1, 2, 1, n, n, 64, 64}, f, n);
}

TYPED_TEST(SoftmaxAttention, RectangularCausalPairs) {
  const std::pair<index_t, index_t> pairs[] = {
      {1, 239}, {239, 1}, {113, 203}, {203, 113}, {1023, 1024}};
  for (auto [sq, sk] : pairs)
    for (unsigned f :
         {0u, unsigned(feature::causal), unsigned(feature::causal | feature::top_left)})
      this->check({1, 1, 1, sq, sk, sq > 1000 ? 64 : 59, 59}, f, sq * 7 + sk);
}

TYPED_TEST(SoftmaxAttention, HeadDims) {
  for (index_t d : {1, 3, 16, 59, 64, 111, 128, 256})
    for (unsigned f : {0u, unsigned(feature::causal)}) this->check({1, 1, 1, 97, 131, d, d}, f, d);
}

TYPED_TEST(SoftmaxAttention, ValueDimDiffersFromKeyDim) {
  this->check({1, 2, 2, 45, 77, 64, 17}, 0);
  this->check({1, 2, 2, 45, 77, 3, 128}, feature::causal);
  this->check({2, 1, 1, 33, 33, 1, 1}, feature::causal);
}

TYPED_TEST(SoftmaxAttention, GroupedQueryHeads) {
  for (index_t hk : {8, 2, 1})  // ratios 1, 4, 8
    for (unsigned f : {0u, unsigned(feature::causal), unsigned(feature::bshd | feature::causal)})
      this->check({2, 8, hk, 67, 97, 32, 24}, f, hk);
}

TYPED_TEST(SoftmaxAttention, EveryFeatureAloneAndInPairs) {
  const shape s{2, 4, 2, 70, 133, 40, 24};
  for (unsigned a = 0; a < 13; ++a)
    for (unsigned b = a; b < 13; ++b) this->check(s, (1u << a) | (1u << b), a * 13 + b);
}

TYPED_TEST(SoftmaxAttention, EverythingAtOnce) {
  this->check({2, 4, 2, 70, 133, 40, 24}, all_features & ~feature::top_left, 3);
  this->check({1, 2, 1, 150, 90, 33, 33}, all_features, 4);
}

TYPED_TEST(SoftmaxAttention, WindowShapes) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const shape s{1, 2, 1, 300, 300, 32, 32};
  const std::pair<index_t, index_t> windows[] = {{0, 0},  {0, -1},  {-1, 0},     {5, 5},
                                                 {64, 0}, {100, 3}, {1000, 1000}};
  for (auto [left, right] : windows) {
    SCOPED_TRACE("window " + std::to_string(left) + "," + std::to_string(right));
    attention_inputs<T> in(s, 0, left + 17);
    std::vector<T> out(s.H * s.Sq * s.Dv);
    softmax_options o{.window_left = left, .window_right = right, .threads = 1};
    auto ov = bhsd(out.data(), 1, s.H, s.Sq, s.Dv);
    softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), ov, o);
    const auto want = reference_softmax<double>(in.qv(), in.kv(), in.vv(), o);
    const auto naive = reference_softmax<T>(in.qv(), in.kv(), in.vv(), o);
    EXPECT_TRUE(within_tolerance<T>(to_dense(ov), want.out, naive.out));
  }
}

TYPED_TEST(SoftmaxAttention, BroadcastShapesOfBiasAndMask) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const shape s{2, 4, 2, 37, 53, 16, 16};
  attention_inputs<T> in(s, 0, 9);
  const auto bias = normal<float>(s.B * s.H * s.Sq * s.Sk, 10);
  const auto mask = bernoulli(s.B * s.H * s.Sq * s.Sk, 11, 0.7);
  const std::array<index_t, 4> full{s.B, s.H, s.Sq, s.Sk};
  const std::array<index_t, 4> shapes[] = {
      {s.B, s.H, s.Sq, s.Sk}, {1, 1, 1, s.Sk},     {s.B, 1, 1, s.Sk}, {1, s.Hk, s.Sq, s.Sk},
      {1, 1, s.Sq, 1},        {s.B, s.H, s.Sq, 1}, {1, 1, 1, 1}};
  for (const auto& e : shapes) {
    SCOPED_TRACE(std::to_string(e[0]) + "x" + std::to_string(e[1]) + "x" + std::to_string(e[2]) +
                 "x" + std::to_string(e[3]));
    std::array<index_t, 4> st{};
    index_t stride = 1;
    for (int r = 3; r >= 0; --r) {
      st[r] = e[r] == 1 ? 0 : stride;
      stride *= e[r];
    }
    (void)full;
    softmax_options o{.causal = true, .threads = 1};
    o.bias = view<const float, 4>(bias.data(), e, st);
    o.mask = view<const std::uint8_t, 4>(mask.data(), e, st);
    std::vector<T> out(s.B * s.H * s.Sq * s.Dv);
    auto ov = output_view(out, s);
    softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), ov, o);
    const auto want = reference_softmax<double>(in.qv(), in.kv(), in.vv(), o);
    const auto naive = reference_softmax<T>(in.qv(), in.kv(), in.vv(), o);
    EXPECT_TRUE(within_tolerance<T>(to_dense(ov), want.out, naive.out));
  }
}

TYPED_TEST(SoftmaxAttention, ScoreModWritingAlibiByHandMatchesBuiltIn) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const shape s{1, 2, 1, 80, 120, 32, 32};
  attention_inputs<T> in(s, 0, 21);
  const float slopes[] = {0.25f, 0.0625f};
  std::vector<T> built_in(s.H * s.Sq * s.Dv), by_hand(built_in.size());
  softmax_options o{.causal = true, .threads = 1};
  o.alibi_slopes = view<const float, 2>(slopes, {1, 2});
  softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(built_in.data(), 1, 2, s.Sq, s.Dv), o);
  const index_t off = s.Sk - s.Sq;
  auto alibi = [&](auto x, index_t, index_t h, index_t i, index_t j) {
    return x - decltype(x)(slopes[h]) * decltype(x)(std::abs(double(i + off - j)));
  };
  softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(by_hand.data(), 1, 2, s.Sq, s.Dv),
                             {.causal = true, .threads = 1}, with_score_mod(alibi));
  for (std::size_t i = 0; i < built_in.size(); ++i)
    EXPECT_NEAR(double(built_in[i]), double(by_hand[i]), (std::is_same_v<T, float> ? 1e-5 : 1e-12));
}

TYPED_TEST(SoftmaxAttention, DocumentMaskThroughMaskMod) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const shape s{1, 1, 1, 150, 150, 24, 24};
  attention_inputs<T> in(s, 0, 5);
  const index_t doc_start[] = {0, 40, 41, 100, 150};
  auto doc = [&](index_t t) {
    index_t d = 0;
    while (doc_start[d + 1] <= t) ++d;
    return d;
  };
  auto same_doc = [&](index_t, index_t, index_t i, index_t j) {
    return doc(i) == doc(j) && j <= i;
  };
  std::vector<T> out(s.Sq * s.Dv);
  auto ov = bhsd(out.data(), 1, 1, s.Sq, s.Dv);
  softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), ov, {.threads = 1},
                             with_mask_mod(same_doc));
  const auto want =
      reference_softmax<double>(in.qv(), in.kv(), in.vv(), {}, with_mask_mod(same_doc));
  const auto naive = reference_softmax<T>(in.qv(), in.kv(), in.vv(), {}, with_mask_mod(same_doc));
  EXPECT_TRUE(within_tolerance<T>(to_dense(ov), want.out, naive.out));
  // Each document attends only inside itself: output row 40 (a one-token document) is v[40].
  for (index_t d = 0; d < s.Dv; ++d)
    EXPECT_EQ(double(ov(0, 0, 40, d)), double(in.vv()(0, 0, 40, d)));
}

// ---- the numerical contract ----------------------------------------------------------

TYPED_TEST(SoftmaxAttention, RowsThatSeeNoKeyAreZeroWithLseMinusInfinity) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  // Bottom-right causal with Sq > Sk leaves the first Sq - Sk queries without keys.
  const shape s{1, 1, 1, 90, 40, 16, 16};
  attention_inputs<T> in(s, 0, 3);
  std::vector<T> out(s.Sq * s.Dv, T(5));
  std::vector<float> lse(s.Sq, 5.f);
  softmax_options o{.causal = true, .threads = 1};
  o.lse = view<float, 3>(lse.data(), {1, 1, s.Sq});
  softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(out.data(), 1, 1, s.Sq, s.Dv), o);
  for (index_t i = 0; i < s.Sq; ++i) {
    if (i < s.Sq - s.Sk) {
      for (index_t d = 0; d < s.Dv; ++d) EXPECT_EQ(out[i * s.Dv + d], T(0)) << "row " << i;
      EXPECT_EQ(lse[i], -std::numeric_limits<float>::infinity()) << "row " << i;
    } else {
      EXPECT_TRUE(std::isfinite(lse[i])) << "row " << i;
    }
  }
  // No keys at all.
  std::vector<T> none(3 * s.Dv, T(5));
  std::vector<float> lse0(3, 5.f);
  softmax_options o0{.threads = 1};
  o0.lse = view<float, 3>(lse0.data(), {1, 1, 3});
  softmax_attention<Backend>(bhsd(in.q.data(), 1, 1, 3, s.D), bhsd(in.k.data(), 1, 1, 0, s.D),
                             bhsd(in.v.data(), 1, 1, 0, s.Dv), bhsd(none.data(), 1, 1, 3, s.Dv),
                             o0);
  for (T x : none) EXPECT_EQ(x, T(0));
  for (float x : lse0) EXPECT_EQ(x, -std::numeric_limits<float>::infinity());
  // A sink with no visible key: out 0, lse = the sink.
  const float sink = 0.75f;
  o0.sinks = view<const float, 1>(&sink, {1});
  softmax_attention<Backend>(bhsd(in.q.data(), 1, 1, 3, s.D), bhsd(in.k.data(), 1, 1, 0, s.D),
                             bhsd(in.v.data(), 1, 1, 0, s.Dv), bhsd(none.data(), 1, 1, 3, s.Dv),
                             o0);
  for (T x : none) EXPECT_EQ(x, T(0));
  for (float x : lse0) EXPECT_FLOAT_EQ(x, sink);
}

TYPED_TEST(SoftmaxAttention, FullyMaskedRowsByMaskAndBias) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const shape s{1, 1, 1, 70, 100, 16, 16};
  attention_inputs<T> in(s, 0, 8);
  std::vector<std::uint8_t> mask(s.Sq * s.Sk, 1);
  std::vector<float> bias(s.Sq * s.Sk, 0.f);
  for (index_t j = 0; j < s.Sk; ++j) mask[5 * s.Sk + j] = 0, bias[6 * s.Sk + j] = -INFINITY;
  std::vector<T> out(s.Sq * s.Dv, T(5));
  softmax_options o{.threads = 1};
  o.mask = view<const std::uint8_t, 4>(mask.data(), {1, 1, s.Sq, s.Sk});
  o.bias = view<const float, 4>(bias.data(), {1, 1, s.Sq, s.Sk});
  softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(out.data(), 1, 1, s.Sq, s.Dv), o);
  for (index_t row : {5, 6})
    for (index_t d = 0; d < s.Dv; ++d) EXPECT_EQ(out[row * s.Dv + d], T(0)) << "row " << row;
  for (index_t d = 0; d < s.Dv; ++d) EXPECT_NE(out[7 * s.Dv + d], T(0));
}

TYPED_TEST(SoftmaxAttention, NanInMaskedKeysDoesNotLeak) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  for (unsigned how = 0; how < 4; ++how) {  // causal future, window past, mask, -inf bias
    SCOPED_TRACE("masked by " + std::to_string(how));
    const shape s{1, 2, 1, 130, 130, 20, 20};
    attention_inputs<T> in(s, 0, 30 + how);
    std::vector<std::uint8_t> mask(s.Sq * s.Sk, 1);
    std::vector<float> bias(s.Sq * s.Sk, 0.f);
    softmax_options o{.threads = 1};
    std::vector<index_t> poisoned;
    if (how == 0) o.causal = true, poisoned = {129, 100, 70};
    if (how == 1) o.window_left = 10, o.window_right = 10, poisoned = {0, 1};
    if (how >= 2) poisoned = {3, 64, 65, 127};
    for (index_t j : poisoned) {
      for (index_t d = 0; d < s.D; ++d) in.k[j * s.D + d] = (d % 2) ? nan : inf;
      for (index_t d = 0; d < s.Dv; ++d) in.v[j * s.Dv + d] = (d % 3) ? nan : -inf;
      for (index_t i = 0; i < s.Sq; ++i) mask[i * s.Sk + j] = 0, bias[i * s.Sk + j] = -INFINITY;
    }
    if (how == 2) o.mask = view<const std::uint8_t, 4>(mask.data(), {1, 1, s.Sq, s.Sk});
    if (how == 3) o.bias = view<const float, 4>(bias.data(), {1, 1, s.Sq, s.Sk});
    std::vector<T> out(s.H * s.Sq * s.Dv);
    auto ov = bhsd(out.data(), 1, s.H, s.Sq, s.Dv);
    softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), ov, o);
    // Rows that can see a poisoned key (window: rows within 10 of key 0/1) are excluded.
    for (index_t h = 0; h < s.H; ++h)
      for (index_t i = 0; i < s.Sq; ++i) {
        if (how == 0 && i >= 70) continue;
        if (how == 1 && i <= 11) continue;
        for (index_t d = 0; d < s.Dv; ++d)
          ASSERT_TRUE(std::isfinite(double(ov(0, h, i, d)))) << "h " << h << " row " << i;
      }
    const auto want = reference_softmax<double>(in.qv(), in.kv(), in.vv(), o);
    const auto naive = reference_softmax<T>(in.qv(), in.kv(), in.vv(), o);
    EXPECT_TRUE(within_tolerance<T>(to_dense(ov), want.out, naive.out));
  }
}

TYPED_TEST(SoftmaxAttention, NanInVisibleInputsPropagates) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const shape s{1, 1, 1, 100, 100, 16, 16};
  for (int where = 0; where < 3; ++where) {  // q row 50, k row 20, v row 20
    SCOPED_TRACE("NaN in " + std::string(1, "qkv"[where]));
    attention_inputs<T> in(s, 0, 40);
    if (where == 0) in.q[50 * s.D + 3] = nan;
    if (where == 1) in.k[20 * s.D + 3] = nan;
    if (where == 2) in.v[20 * s.Dv + 3] = nan;
    std::vector<T> out(s.Sq * s.Dv);
    auto ov = bhsd(out.data(), 1, 1, s.Sq, s.Dv);
    softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), ov, {.causal = true, .threads = 1});
    for (index_t i = 0; i < s.Sq; ++i) {
      const bool affected = where == 0 ? i == 50 : i >= 20;
      for (index_t d = 0; d < s.Dv; ++d) {
        const bool nan_expected = affected && (where != 2 || d == 3);
        EXPECT_EQ(std::isnan(double(ov(0, 0, i, d))), nan_expected) << "row " << i << " d " << d;
      }
    }
  }
}

TYPED_TEST(SoftmaxAttention, LargeLogitsStayFinite) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const shape s{1, 1, 1, 64, 200, 8, 8};
  attention_inputs<T> in(s, 0, 50);
  for (auto& x : in.q) x *= T(300);  // logits around +-1e4
  std::vector<T> out(s.Sq * s.Dv);
  auto ov = bhsd(out.data(), 1, 1, s.Sq, s.Dv);
  softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), ov, {.causal = true, .threads = 1});
  const auto want = reference_softmax<double>(in.qv(), in.kv(), in.vv(), {.causal = true});
  const auto naive = reference_softmax<T>(in.qv(), in.kv(), in.vv(), {.causal = true});
  for (T x : out) ASSERT_TRUE(std::isfinite(double(x)));
  EXPECT_TRUE(within_tolerance<T>(to_dense(ov), want.out, naive.out));
}

TYPED_TEST(SoftmaxAttention, ThreadCountNeverChangesABit) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  expect_thread_invariant<T, Backend>(attention_inputs<T>(
      {2, 4, 2, 301, 333, 48, 40}, feature::bias | feature::alibi | feature::sinks, 60));
}

// At most 4 query tiles in all against >= 4096 keys: the engine splits the keys into fixed
// chunks whose states are merged in order (agent attention's first stage uses this).
TYPED_TEST(SoftmaxAttention, FewQueryTilesAgainstManyKeysSplitTheKeys) {
  namespace F = feature;
  for (unsigned f : {0u, unsigned(F::causal), unsigned(F::causal | F::top_left | F::lse),
                     unsigned(F::bias | F::alibi | F::sinks | F::lse), unsigned(F::window),
                     unsigned(F::mask | F::softcap)})
    for (int threads : {1, 2})
      this->check({1, 1, 1, 64, 5000, 64, 64}, f, 70 + f, threads);      // 3 chunks
  this->check({1, 2, 1, 17, 4096, 32, 24}, F::causal, 71, 2);            // GQA, 17 queries
  this->check({1, 1, 1, 100, 5000, 59, 40}, F::causal | F::lse, 72, 2);  // two tiles
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  expect_thread_invariant<T, Backend>(
      attention_inputs<T>({1, 2, 2, 40, 6000, 48, 40}, F::bias | F::alibi | F::sinks | F::lse, 73));
}

TYPED_TEST(SoftmaxAttention, LayoutsGiveIdenticalBits) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const index_t B = 2, H = 3, S = 77, D = 40;
  const auto q = normal<T>(B * H * S * D, 70), k = normal<T>(B * H * S * D, 71),
             v = normal<T>(B * H * S * D, 72);
  // The same logical tensors in BHSD, BSHD and a padded layout (row stride 64).
  auto to_bshd = [&](const std::vector<T>& x) {
    std::vector<T> y(x.size());
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < H; ++h)
        for (index_t s = 0; s < S; ++s)
          for (index_t d = 0; d < D; ++d)
            y[((b * S + s) * H + h) * D + d] = x[((b * H + h) * S + s) * D + d];
    return y;
  };
  auto to_padded = [&](const std::vector<T>& x) {
    std::vector<T> y(B * H * S * 64, std::numeric_limits<T>::quiet_NaN());
    for (index_t r = 0; r < B * H * S; ++r)
      for (index_t d = 0; d < D; ++d) y[r * 64 + d] = x[r * D + d];
    return y;
  };
  const auto qs = to_bshd(q), ks = to_bshd(k), vs = to_bshd(v);
  const auto qp = to_padded(q), kp = to_padded(k), vp = to_padded(v);
  auto padded = [&](const T* p) {
    return view<const T, 4>(p, {B, H, S, D}, {H * S * 64, S * 64, 64, 1});
  };
  std::vector<T> o1(B * H * S * D), o2(o1.size()), o3(o1.size());
  const softmax_options o{.causal = true, .threads = 1};
  softmax_attention<Backend>(bhsd(q.data(), B, H, S, D), bhsd(k.data(), B, H, S, D),
                             bhsd(v.data(), B, H, S, D), bhsd(o1.data(), B, H, S, D), o);
  softmax_attention<Backend>(bshd(qs.data(), B, S, H, D), bshd(ks.data(), B, S, H, D),
                             bshd(vs.data(), B, S, H, D), bshd(o2.data(), B, S, H, D), o);
  softmax_attention<Backend>(padded(qp.data()), padded(kp.data()), padded(vp.data()),
                             bhsd(o3.data(), B, H, S, D), o);
  EXPECT_EQ(to_dense(bhsd(o1.data(), B, H, S, D)), to_dense(bshd(o2.data(), B, S, H, D)));
  EXPECT_EQ(o1, o3);
}

// ---- bad input -----------------------------------------------------------------------

template <class T, class Backend>
void expect_rejected(const std::string& needle, auto&& call_with) {
  const index_t B = 2, H = 4, Hk = 2, S = 10, D = 8;
  std::vector<T> q(B * H * S * D, T(1)), k(B * Hk * S * D, T(1)), v(B * Hk * S * D, T(1));
  std::vector<T> out(B * H * S * D, T(42));
  std::vector<float> lse(B * H * S, 42.f);
  try {
    call_with(q, k, v, out, lse);
    ADD_FAILURE() << "no fovea::error for " << needle;
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' does not name " << needle;
  }
  for (T x : out) ASSERT_EQ(x, T(42)) << "output written before the error";
  for (float x : lse) ASSERT_EQ(x, 42.f) << "lse written before the error";
}

TYPED_TEST(SoftmaxAttention, BadInputThrowsNamingTheArgumentAndWritesNothing) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  using vec_t = std::vector<T>;
  using lse_t = std::vector<float>;
  const index_t B = 2, H = 4, Hk = 2, S = 10, D = 8;
  auto run = [](auto q, auto k, auto v, auto o, softmax_options opt = {}) {
    softmax_attention<Backend>(q, k, v, o, opt);
  };
  auto std_views = [&](vec_t& q, vec_t& k, vec_t& v, vec_t& o) {
    return std::tuple{bhsd(q.data(), B, H, S, D), bhsd(k.data(), B, Hk, S, D),
                      bhsd(v.data(), B, Hk, S, D), bhsd(o.data(), B, H, S, D)};
  };
  expect_rejected<T, Backend>("k: extent 3", [&](vec_t& q, vec_t& k, vec_t& v, vec_t& o, lse_t&) {
    run(bhsd(q.data(), B, H, S, D), bhsd(k.data(), B, Hk, S, D - 1), bhsd(v.data(), B, Hk, S, D),
        bhsd(o.data(), B, H, S, D));
  });
  expect_rejected<T, Backend>("k: extent 1", [&](vec_t& q, vec_t& k, vec_t& v, vec_t& o, lse_t&) {
    run(bhsd(q.data(), B, H, S, D), bhsd(k.data(), B, 3, 6, D), bhsd(v.data(), B, 3, 6, D),
        bhsd(o.data(), B, H, S, D));
  });
  expect_rejected<T, Backend>("v: extent 2", [&](vec_t& q, vec_t& k, vec_t& v, vec_t& o, lse_t&) {
    run(bhsd(q.data(), B, H, S, D), bhsd(k.data(), B, Hk, S, D), bhsd(v.data(), B, Hk, S - 1, D),
        bhsd(o.data(), B, H, S, D));
  });
  expect_rejected<T, Backend>("k: extent 0", [&](vec_t& q, vec_t& k, vec_t& v, vec_t& o, lse_t&) {
    run(bhsd(q.data(), B, H, S, D), bhsd(k.data(), 1, Hk, S, D), bhsd(v.data(), 1, Hk, S, D),
        bhsd(o.data(), B, H, S, D));
  });
  expect_rejected<T, Backend>("out: extent 3", [&](vec_t& q, vec_t& k, vec_t& v, vec_t& o, lse_t&) {
    run(bhsd(q.data(), B, H, S, D), bhsd(k.data(), B, Hk, S, D), bhsd(v.data(), B, Hk, S, D),
        bhsd(o.data(), B, H, S, D - 1));
  });
  expect_rejected<T, Backend>(
      "q: innermost stride", [&](vec_t& q, vec_t& k, vec_t& v, vec_t& o, lse_t&) {
        auto [Q, K, V, O] = std_views(q, k, v, o);
        run(view<T, 4>(q.data(), {B, H, S, D / 2}, {H * S * D, S * D, D, 2}), K, V,
            view<T, 4>(o.data(), {B, H, S, D}, O.strides()));
      });
  expect_rejected<T, Backend>("v: data is null",
                              [&](vec_t& q, vec_t& k, vec_t& v, vec_t& o, lse_t&) {
                                auto [Q, K, V, O] = std_views(q, k, v, o);
                                run(Q, K, bhsd<T>(nullptr, B, Hk, S, D), O);
                              });
  expect_rejected<T, Backend>("out: memory overlaps q",
                              [&](vec_t& q, vec_t& k, vec_t& v, vec_t& o, lse_t&) {
                                auto [Q, K, V, O] = std_views(q, k, v, o);
                                const vec_t q_before = q;
                                try {
                                  run(Q, K, V, bhsd(q.data(), B, H, S, D));  // out is q (in place)
                                } catch (...) {
                                  EXPECT_EQ(q, q_before) << "q written before the error";
                                  throw;
                                }
                              });
  expect_rejected<T, Backend>("out: strides", [&](vec_t& q, vec_t& k, vec_t& v, vec_t& o, lse_t&) {
    auto [Q, K, V, O] = std_views(q, k, v, o);
    run(Q, K, V, view<T, 4>(o.data(), {B, H, S, D}, {H * S * D, S * D, 1, 1}));
  });
  struct bad_option {
    std::string needle;
    void (*set)(softmax_options&, lse_t&, std::vector<float>&);
  };
  const bad_option bad[] = {
      {"options.scale", [](softmax_options& o, lse_t&, std::vector<float>&) { o.scale = -1.0; }},
      {"options.scale",
       [](softmax_options& o, lse_t&, std::vector<float>&) { o.scale = std::nan(""); }},
      {"options.scale", [](softmax_options& o, lse_t&, std::vector<float>&) { o.scale = 0.0; }},
      {"options.window_left",
       [](softmax_options& o, lse_t&, std::vector<float>&) { o.window_left = -2; }},
      {"options.window_right",
       [](softmax_options& o, lse_t&, std::vector<float>&) { o.window_right = -5; }},
      {"options.softcap", [](softmax_options& o, lse_t&, std::vector<float>&) { o.softcap = -1; }},
      {"options.softcap",
       [](softmax_options& o, lse_t&, std::vector<float>&) { o.softcap = INFINITY; }},
      {"options.threads", [](softmax_options& o, lse_t&, std::vector<float>&) { o.threads = -1; }},
      {"options.bias: extent 2",
       [](softmax_options& o, lse_t&, std::vector<float>& x) {
         o.bias = view<const float, 4>(x.data(), {1, 1, 3, 10});
       }},
      {"options.bias: extent 1",
       [](softmax_options& o, lse_t&, std::vector<float>& x) {
         o.bias = view<const float, 4>(x.data(), {1, 3, 10, 10});
       }},
      {"options.mask: data is null",
       [](softmax_options& o, lse_t&, std::vector<float>&) {
         o.mask = view<const std::uint8_t, 4>(nullptr, {1, 1, 10, 10});
       }},
      {"options.alibi_slopes: extent 1",
       [](softmax_options& o, lse_t&, std::vector<float>& x) {
         o.alibi_slopes = view<const float, 2>(x.data(), {1, 3});
       }},
      {"options.sinks: extent 0",
       [](softmax_options& o, lse_t&, std::vector<float>& x) {
         o.sinks = view<const float, 1>(x.data(), {2});
       }},
      {"options.lse: extent 2",
       [](softmax_options& o, lse_t& l, std::vector<float>&) {
         o.lse = view<float, 3>(l.data(), {2, 4, 9});
       }},
  };
  std::vector<float> extra(2 * 4 * 10 * 10, 0.f);
  for (const auto& b : bad) {
    SCOPED_TRACE(b.needle);
    expect_rejected<T, Backend>(b.needle, [&](vec_t& q, vec_t& k, vec_t& v, vec_t& o, lse_t& l) {
      auto [Q, K, V, O] = std_views(q, k, v, o);
      softmax_options opt;
      b.set(opt, l, extra);
      run(Q, K, V, O, opt);
    });
  }
  expect_rejected<T, Backend>(
      "options.lse: memory overlaps q", [&](vec_t& q, vec_t& k, vec_t& v, vec_t& o, lse_t&) {
        auto [Q, K, V, O] = std_views(q, k, v, o);
        softmax_options opt;
        opt.lse = view<float, 3>(reinterpret_cast<float*>(q.data()), {B, H, S});
        run(Q, K, V, O, opt);
      });
}

}  // namespace fovea::test::softmax_test
