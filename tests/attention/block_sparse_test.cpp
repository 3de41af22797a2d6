// block_sparse_attention against the dense oracle masked to exactly the layout's blocks.
#include <gtest/gtest.h>

#include <cmath>
#include <fovea/fovea.hpp>
#include <limits>
#include <string>
#include <vector>

#include "../common/attention_case.hpp"
#include "../common/configs.hpp"
#include "../common/sparse_case.hpp"

namespace fovea::test::block_sparse_test {

template <class C>
class BlockSparse : public ::testing::Test {};
TYPED_TEST_SUITE(BlockSparse, configs, config_names);

struct layout_shape {
  index_t bq, bk, batches, heads;  // heads: 1, Hk or H
  double density;
};

/// Runs one case and checks out (and lse) against the oracle masked to the layout.
template <class T, class Backend>
void check_layout_case(const shape& s, unsigned features, const layout_shape& ls,
                       std::uint64_t seed, int threads = 1) {
  SCOPED_TRACE(describe(s, features) + " bq=" + std::to_string(ls.bq) +
               " bk=" + std::to_string(ls.bk) + " layout " + std::to_string(ls.batches) + "x" +
               std::to_string(ls.heads) + " density " + std::to_string(ls.density));
  const attention_inputs<T> in(s, features, seed);
  const bool sm = features & feature::score_mod, mm = features & feature::mask_mod;
  const owned_layout lay =
      random_layout(ls.batches, ls.heads, s.Sq, s.Sk, ls.bq, ls.bk, ls.density, mm, seed + 11);
  std::vector<T> out(s.B * s.H * s.Sq * s.Dv, T(-7));
  std::vector<float> lse(s.B * s.H * s.Sq, -7.f);
  auto o = in.options(lse.data());
  o.threads = threads;
  auto out_view = in.template layout<T>(out.data(), s.H, s.Sq, s.Dv);

  auto run = [&](const auto& fovea_variant, const auto& oracle_variant) {
    block_sparse_attention<Backend>(in.qv(), in.kv(), in.vv(), out_view, lay.layout, o,
                                    fovea_variant);
    expect_softmax_result<T>(out_view, features & feature::lse ? &lse : nullptr, in.qv(), in.kv(),
                             in.vv(), o, oracle_variant);
  };
  const layout_mask<> in_layout{&lay.layout, s.H, s.Hk, s.Sq};
  const layout_mask<test_mask_mod> in_layout_and_mod{&lay.layout, s.H, s.Hk, s.Sq};
  if (sm && mm)
    run(with_mods(test_score_mod{}, test_mask_mod{}),
        with_mods(test_score_mod{}, in_layout_and_mod));
  else if (sm)
    run(with_score_mod(test_score_mod{}), with_mods(test_score_mod{}, in_layout));
  else if (mm)
    run(with_mask_mod(test_mask_mod{}), with_mask_mod(in_layout_and_mod));
  else
    run(custom_variant<>{}, with_mask_mod(in_layout));
}

TYPED_TEST(BlockSparse, RandomLayoutsEqualMaskedDense) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape shapes[] = {{1, 1, 1, 1, 1, 1, 1},       {1, 2, 1, 37, 91, 13, 7},
                          {2, 4, 2, 130, 130, 32, 32}, {1, 2, 2, 64, 300, 64, 64},
                          {1, 4, 1, 3, 500, 16, 17},   {1, 3, 3, 70, 0, 8, 8},
                          {1, 2, 1, 0, 20, 8, 8}};
  const layout_shape layouts[] = {{64, 64, 1, 1, 0.5}, {16, 3, 1, 1, 0.3},  {1, 1, 1, 1, 0.2},
                                  {100, 200, 1, 1, 1}, {17, 7, 0, 0, 0.6},  {64, 2, 0, 0, 0.1},
                                  {8, 64, 1, 1, 0.0},  {33, 16, 0, -1, 0.5}};
  std::uint64_t seed = 100;
  for (const shape& s : shapes)
    for (layout_shape ls : layouts) {
      // batches/heads 0: the problem's B and H; heads -1: the key/value heads.
      if (ls.batches == 0) ls.batches = s.B;
      if (ls.heads == 0) ls.heads = s.H;
      if (ls.heads == -1) ls.heads = s.Hk;
      check_layout_case<T, Backend>(s, 0, ls, ++seed);
    }
}

TYPED_TEST(BlockSparse, EveryFeatureInsideTheBlocks) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape s{2, 4, 2, 77, 140, 24, 20};
  const unsigned singles[] = {feature::causal,
                              feature::top_left | feature::causal,
                              feature::window,
                              feature::window | feature::causal,
                              feature::bias,
                              feature::mask,
                              feature::alibi,
                              feature::softcap,
                              feature::sinks,
                              feature::lse,
                              feature::scale,
                              feature::bshd,
                              feature::score_mod,
                              feature::mask_mod,
                              feature::causal | feature::bias | feature::sinks | feature::lse |
                                  feature::mask_mod | feature::score_mod | feature::alibi};
  std::uint64_t seed = 300;
  for (unsigned f : singles) {
    check_layout_case<T, Backend>(s, f, {16, 8, 2, 4, 0.5}, ++seed);
    check_layout_case<T, Backend>(s, f, {64, 64, 1, 2, 0.7}, ++seed, 2);
  }
  // Decode-like: few queries, heads of a group stacked into one tile.
  check_layout_case<T, Backend>({1, 8, 2, 1, 1000, 32, 32},
                                feature::causal | feature::lse | feature::mask_mod,
                                {1, 5, 1, 2, 0.2}, ++seed);
}

TYPED_TEST(BlockSparse, FullLayoutEqualsSoftmaxAttention) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape s{1, 2, 1, 150, 150, 40, 40};
  const attention_inputs<T> in(s, feature::causal, 7);
  const owned_layout full = random_layout(1, 1, s.Sq, s.Sk, 64, 64, 1.0, false, 8);
  std::vector<T> dense(s.B * s.H * s.Sq * s.Dv), sparse(dense.size());
  const auto o = in.options(nullptr);
  softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(dense.data(), 1, 2, 150, 40), o);
  block_sparse_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(sparse.data(), 1, 2, 150, 40),
                                  full.layout, o);
  // Every backend's query tile divides 64, so the tiles are the dense ones: the same bits.
  EXPECT_EQ(dense, sparse);
}

TYPED_TEST(BlockSparse, NaNInUnlistedBlocksNeverLeaks) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape s{1, 2, 1, 40, 256, 16, 16};
  attention_inputs<T> in(s, 0, 21);
  const owned_layout lay = random_layout(1, 1, s.Sq, s.Sk, 8, 16, 0.4, false, 22);
  std::vector<bool> listed(s.Sk / 16, false);
  for (auto idx : lay.indices) listed[idx] = true;
  for (index_t j = 0; j < s.Sk; ++j)
    if (!listed[j / 16]) {
      in.k[j * s.D] = std::numeric_limits<T>::quiet_NaN();
      in.v[j * s.Dv + 3] = std::numeric_limits<T>::infinity();
    }
  std::vector<T> out(s.H * s.Sq * s.Dv);
  block_sparse_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(out.data(), 1, 2, 40, 16),
                                  lay.layout);
  const auto want = reference_softmax<double>(in.qv(), in.kv(), in.vv(), {},
                                              with_mask_mod(layout_mask<>{&lay.layout, 2, 1, 40}));
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (std::isfinite(want.out[i])) {
      ASSERT_TRUE(std::isfinite(double(out[i]))) << i;
    }
    EXPECT_NEAR(double(out[i]), want.out[i], 1e-4) << i;
  }
}

TYPED_TEST(BlockSparse, SameBitsForAnyThreadCount) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape s{2, 4, 2, 200, 333, 32, 32};
  const attention_inputs<T> in(s, feature::causal | feature::sinks, 5);
  const owned_layout lay = random_layout(2, 2, s.Sq, s.Sk, 32, 16, 0.5, false, 6);
  expect_same_bits_for_threads([&](int threads) {
    std::vector<T> out(s.B * s.H * s.Sq * s.Dv);
    auto o = in.options(nullptr);
    o.threads = threads;
    block_sparse_attention<Backend>(in.qv(), in.kv(), in.vv(), output_view(out, s), lay.layout, o);
    return out;
  });
}

TEST(BlockSparseArguments, BadLayoutsNameTheField) {
  const index_t B = 2, H = 4, Hk = 2, S = 100, D = 8;
  std::vector<float> q(B * H * S * D, 1.f), k(B * Hk * S * D, 1.f), out(q.size(), -3.f);
  const auto Q = bhsd<const float>(q.data(), B, H, S, D);
  const auto K = bhsd<const float>(k.data(), B, Hk, S, D);
  const auto O = bhsd(out.data(), B, H, S, D);
  auto expect_bad = [&](const char* needle, auto edit) {
    owned_layout lay = random_layout(1, 1, S, S, 32, 16, 0.5, true, 3);
    edit(lay);
    lay.point();
    expect_rejected(needle, out, -3.f, [&] { block_sparse_attention(Q, K, K, O, lay.layout); });
  };
  expect_bad("layout.block_q", [](owned_layout& l) { l.layout.block_q = 0; });
  expect_bad("layout.block_k", [](owned_layout& l) { l.layout.block_k = -1; });
  expect_bad("layout.batches", [](owned_layout& l) { l.layout.batches = 3; });
  expect_bad("layout.heads", [](owned_layout& l) { l.layout.heads = 3; });
  expect_bad("layout.offsets", [](owned_layout& l) { l.offsets.pop_back(); });
  expect_bad("layout.offsets", [](owned_layout& l) { l.offsets[0] = 1; });
  expect_bad("layout.offsets", [](owned_layout& l) { l.offsets[1] = l.offsets.back() + 1; });
  expect_bad("layout.offsets", [](owned_layout& l) { l.indices.push_back(0); });
  expect_bad("layout.indices", [](owned_layout& l) { l.indices[0] = 7; });  // >= 7 blocks
  expect_bad("layout.indices", [](owned_layout& l) { l.indices[0] = -1; });
  expect_bad("layout.indices", [](owned_layout& l) {  // a repeat inside one row
    for (std::size_t r = 0; r + 1 < l.offsets.size(); ++r)
      if (l.offsets[r + 1] - l.offsets[r] >= 2) {
        l.indices[l.offsets[r] + 1] = l.indices[l.offsets[r]];
        return;
      }
    FAIL() << "no row with two blocks";
  });
  expect_bad("layout.partial", [](owned_layout& l) { l.partial.pop_back(); });
}

}  // namespace fovea::test::block_sparse_test
