// hip_select's invariants and hip_attention against the dense oracle masked to exactly
// the union the spec defines: sinks + the selected blocks + the sliding window.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fovea/fovea.hpp>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../common/attention_case.hpp"
#include "../common/configs.hpp"
#include "../common/sparse_case.hpp"

namespace fovea::test::hip_test {

template <class C>
class Hip : public ::testing::Test {};
TYPED_TEST_SUITE(Hip, configs, config_names);

/// The spec's index invariants: sorted, unique, in the candidates, as many as possible.
void expect_valid_selection(const hip_selection& sel, const hip_options& o, index_t Sq,
                            index_t Sk) {
  const index_t window = o.sliding_window >= 0 ? o.sliding_window : (o.causal ? 256 : 0);
  const index_t sink = o.sink_tokens >= 0 ? o.sink_tokens : (o.causal ? 16 : 0);
  for (index_t b = 0; b < sel.batches; ++b)
    for (index_t h = 0; h < sel.heads; ++h)
      for (index_t qb = 0; qb < sel.query_blocks; ++qb) {
        const index_t last = std::min(Sq, (qb + 1) * o.block_size_q) - 1 + Sk - Sq;
        const index_t c0 = o.causal ? std::min(sink, Sk) : 0;
        const index_t c1 = o.causal ? std::clamp<index_t>(last - window + 1, c0, Sk) : Sk;
        const index_t candidates = (c1 - c0 + o.block_size_k - 1) / o.block_size_k;
        const auto blocks = sel.blocks(b, h, qb);
        ASSERT_EQ(index_t(blocks.size()), std::min(o.top_k / o.block_size_k, candidates));
        for (std::size_t m = 0; m < blocks.size(); ++m) {
          EXPECT_GE(blocks[m], c0);
          EXPECT_LT(blocks[m], c1);
          EXPECT_EQ((blocks[m] - c0) % o.block_size_k, 0);
          if (m > 0) {
            EXPECT_GT(blocks[m], blocks[m - 1]);
          }
        }
      }
}

template <class T, class Backend>
void check_hip_case(const shape& s, hip_options o, std::uint64_t seed, bool bshd_layout = false) {
  SCOPED_TRACE(describe(s, (o.causal ? unsigned(feature::causal) : 0u) |
                               (bshd_layout ? unsigned(feature::bshd) : 0u)) +
               " top_k=" + std::to_string(o.top_k) + " bq=" + std::to_string(o.block_size_q) +
               " bk=" + std::to_string(o.block_size_k) + " window=" +
               std::to_string(o.sliding_window) + " sink=" + std::to_string(o.sink_tokens));
  const attention_inputs<T> in(s, bshd_layout ? unsigned(feature::bshd) : 0u, seed);
  std::vector<T> out(s.B * s.H * s.Sq * s.Dv, T(-7)), again(out.size(), T(-7));
  std::vector<float> lse(s.B * s.H * s.Sq, -7.f);
  o.lse = view<float, 3>(lse.data(), {s.B, s.H, s.Sq});
  const auto out_view = in.template layout<T>(out.data(), s.H, s.Sq, s.Dv);
  hip_attention<Backend>(in.qv(), in.kv(), in.vv(), out_view, o);

  const hip_selection sel = hip_select<Backend>(in.qv(), in.kv(), o);
  expect_valid_selection(sel, o, s.Sq, s.Sk);
  hip_attention<Backend>(in.qv(), in.kv(), in.vv(),
                         in.template layout<T>(again.data(), s.H, s.Sq, s.Dv), sel, o);
  EXPECT_EQ(out, again) << "select + attend differs from one call";

  const hip_visible visible(sel, o, s.Sq, s.Sk);
  softmax_options r;
  r.causal = o.causal;
  expect_softmax_result<T>(out_view, &lse, in.qv(), in.kv(), in.vv(), r, with_mask_mod(visible));
}

TYPED_TEST(Hip, EqualsDenseOverTheSelectedUnion) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape shapes[] = {{1, 1, 1, 1, 1, 1, 1},       {1, 2, 1, 37, 91, 13, 7},
                          {2, 4, 2, 150, 300, 32, 32}, {1, 2, 2, 1, 700, 16, 16},
                          {1, 2, 1, 0, 20, 8, 8},      {1, 3, 3, 40, 0, 8, 8},
                          {1, 2, 1, 300, 300, 24, 20}};
  std::uint64_t seed = 900;
  for (const shape& s : shapes) {
    hip_options o;  // small parameters so the tree search runs several rounds
    o.top_k = 16;
    o.block_size_q = 16;
    o.block_size_k = 2;
    o.sliding_window = 8;
    o.sink_tokens = 3;
    o.causal = true;
    check_hip_case<T, Backend>(s, o, ++seed);
    o.block_size_q = 13, o.block_stride_q = 3, o.block_size_k = 4, o.block_stride_k = 3;
    check_hip_case<T, Backend>(s, o, ++seed, true);
    o.top_k = 12, o.block_size_k = 3, o.block_stride_k = 1, o.sliding_window = 0, o.sink_tokens = 0;
    check_hip_case<T, Backend>(s, o, ++seed);
    hip_options plain;  // non-causal: no window, no sinks
    plain.top_k = 24;
    plain.block_size_q = 32;
    plain.block_size_k = 4;
    check_hip_case<T, Backend>(s, plain, ++seed);
    plain.block_size_k = 1;
    plain.top_k = 5;
    plain.threads = 2;
    check_hip_case<T, Backend>(s, plain, ++seed);
  }
  hip_options defaults;  // the reference's parameters, causal
  defaults.causal = true;
  check_hip_case<T, Backend>({1, 2, 1, 130, 1500, 32, 32}, defaults, ++seed);
}

// Oracle 1: with at most top_k + window + sink keys everything is a candidate and HiP is
// dense causal attention.
TYPED_TEST(Hip, ShortSequencesAreDenseCausal) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape s{1, 2, 1, 100, 784, 32, 32};  // 784 = 512 + 256 + 16
  const attention_inputs<T> in(s, 0, 31);
  std::vector<T> hip(s.H * s.Sq * s.Dv), dense(hip.size());
  hip_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(hip.data(), 1, 2, 100, 32),
                         {.causal = true, .top_k = 512});
  softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(dense.data(), 1, 2, 100, 32),
                             {.causal = true});
  for (const auto* result : {&hip, &dense})
    expect_softmax_result<T>(*result, nullptr, in.qv(), in.kv(), in.vv(), {.causal = true});
}

// Oracle 4: keys piecewise constant, one segment (>= top_k keys) aligned with the queries:
// every selected block lies in that segment.
TYPED_TEST(Hip, SelectionFindsTheAlignedSegment) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const index_t Sk = 4096, Sq = 128, D = 16, top_k = 256;
  for (index_t seg_start : {700, 2000, 3300}) {
    std::vector<T> q(Sq * D), k(Sk * D);
    for (index_t i = 0; i < Sq; ++i)
      for (index_t d = 0; d < D; ++d) q[i * D + d] = T(d == 0 ? 1 : 0.01 * ((i + d) % 3));
    for (index_t j = 0; j < Sk; ++j) {
      const bool aligned = j >= seg_start && j < seg_start + 300;
      const index_t segment = j / 300;  // piecewise constant elsewhere too
      for (index_t d = 0; d < D; ++d)
        k[j * D + d] = T(d == 0 ? (aligned ? 2.0 : -0.5 + 0.05 * (segment % 7))
                                : (d == 1 + segment % (D - 1) ? 1.0 : 0.0));
    }
    hip_options o;
    o.causal = true;
    o.top_k = top_k;
    o.block_size_q = 64;
    const auto sel = hip_select<Backend>(bhsd<const T>(q.data(), 1, 1, Sq, D),
                                         bhsd<const T>(k.data(), 1, 1, Sk, D), o);
    for (index_t qb = 0; qb < sel.query_blocks; ++qb)
      for (const std::int32_t start : sel.blocks(0, 0, qb)) {
        EXPECT_GE(start, seg_start) << "query block " << qb;
        EXPECT_LT(start, seg_start + 300) << "query block " << qb;
      }
  }
}

// Decode: a selection made at one step is reused while the cache grows; the window moves.
TYPED_TEST(Hip, DecodeReusesASelection) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const index_t H = 4, Hk = 2, D = 32, Sk = 2000;
  const auto q = normal<T>(H * D, 41), k = normal<T>(Hk * (Sk + 3) * D, 42);
  const auto v = normal<T>(Hk * (Sk + 3) * D, 43);
  hip_options o;
  o.causal = true;
  o.top_k = 64;
  auto view_of = [&](const std::vector<T>& x, index_t heads, index_t keys, index_t total) {
    return view<const T, 4>(x.data(), {1, heads, keys, D}, {heads * total * D, total * D, D, 1});
  };
  const auto Q = bhsd<const T>(q.data(), 1, H, 1, D);
  const auto sel = hip_select<Backend>(Q, view_of(k, Hk, Sk, Sk + 3), o);
  for (index_t step = 0; step <= 3; ++step) {
    const index_t keys = Sk + step;
    std::vector<T> out(H * D);
    hip_attention<Backend>(Q, view_of(k, Hk, keys, Sk + 3), view_of(v, Hk, keys, Sk + 3),
                           bhsd(out.data(), 1, H, 1, D), sel, o);
    SCOPED_TRACE("step " + std::to_string(step));
    expect_softmax_result<T>(out, nullptr, Q, view_of(k, Hk, keys, Sk + 3),
                             view_of(v, Hk, keys, Sk + 3), {.causal = true},
                             with_mask_mod(hip_visible(sel, o, 1, keys)));
  }
}

TYPED_TEST(Hip, SameBitsForAnyThreadCount) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape s{2, 4, 2, 200, 900, 32, 32};
  const attention_inputs<T> in(s, 0, 51);
  expect_same_bits_for_threads([&](int threads) {
    std::vector<T> out(s.B * s.H * s.Sq * s.Dv);
    hip_attention<Backend>(in.qv(), in.kv(), in.vv(), output_view(out, s),
                           {.causal = true, .top_k = 64, .threads = threads});
    return out;
  });
}

TEST(HipArguments, BadInputNamesTheArgument) {
  const index_t S = 40, D = 8;
  std::vector<float> q(2 * S * D, 1.f), out(q.size(), -3.f);
  const auto Q = bhsd<const float>(q.data(), 1, 2, S, D);
  const auto O = bhsd(out.data(), 1, 2, S, D);
  auto bad = [&](const char* needle, hip_options o) {
    expect_rejected(needle, out, -3.f, [&] { hip_attention(Q, Q, Q, O, o); });
  };
  bad("options.top_k", {.top_k = 0});
  bad("options.top_k", {.top_k = 7, .block_size_k = 2});
  bad("options.block_size_q", {.block_size_q = 0});
  bad("options.block_stride_q", {.block_stride_q = 0});
  bad("options.block_size_k", {.block_size_k = 0});
  bad("options.block_stride_k", {.block_stride_k = -2});
  bad("options.sliding_window", {.causal = true, .sliding_window = -2});
  bad("options.sliding_window", {.sliding_window = 16});
  bad("options.sink_tokens", {.sink_tokens = 4});
  bad("options.scale", {.scale = 0.0});
  bad("options.threads", {.threads = -1});
  const auto sel = hip_select(Q, Q, {.causal = true, .top_k = 8});
  auto wrong = sel;
  wrong.heads = 3;
  expect_rejected("selection", out, -3.f,
                  [&] { hip_attention(Q, Q, Q, O, wrong, {.causal = true, .top_k = 8}); });
  wrong = sel;
  wrong.counts[0] = 1;
  wrong.starts[0] = 1000;
  expect_rejected("selection", out, -3.f,
                  [&] { hip_attention(Q, Q, Q, O, wrong, {.causal = true, .top_k = 8}); });
  expect_rejected("selection", out, -3.f, [&] {
    hip_attention(Q, Q, Q, O, sel, {.causal = true, .top_k = 8, .block_size_k = 4});
  });
}

TEST(HipSelect, KthLargestMatchesASort) {
  std::mt19937_64 gen(5);
  for (index_t n : {1, 2, 7, 64, 512, 1000}) {
    std::vector<std::uint64_t> keys(n), scratch(n);
    for (index_t i = 0; i < n; ++i)  // equal high parts, told apart by the low bits
      keys[i] = (std::uint64_t(gen() % 5) << 40) | (gen() & 0xFFFFFF000ull) | std::uint64_t(i);
    std::vector<std::uint64_t> sorted = keys;
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    for (index_t k = 1; k <= n; k += std::max<index_t>(1, n / 7))
      EXPECT_EQ(detail::kth_largest(keys.data(), n, k, scratch.data()), sorted[k - 1])
          << "n=" << n << " k=" << k;
  }
}

}  // namespace fovea::test::hip_test
