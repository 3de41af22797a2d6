// Landmark attention: landmark_select against top-k by f64 landmark scores (block means or
// the caller's landmarks), the grouped softmax against its definition computed in f64 from
// the weights (not through the logit-offset identity the kernel uses), the flat softmax
// against the dense oracle masked to the retrieved and local keys, selection reuse across
// decode steps, thread invariance, landmark_means, NaN placement and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fovea/fovea.hpp>
#include <limits>
#include <string>
#include <vector>

#include "../common/attention_case.hpp"
#include "../common/configs.hpp"
#include "../common/random.hpp"

namespace fovea::test::landmark_test {

template <class C>
class Landmark : public ::testing::Test {};
TYPED_TEST_SUITE(Landmark, configs, config_names);

index_t first_local(const landmark_options& o, index_t p) {
  return p < 0 ? 0 : std::max<index_t>(0, p / o.block_size - (o.local_blocks - 1));
}

/// Landmark c of (b, hk) in Acc: the caller's, or the block's mean key.
template <class Acc, class T>
std::vector<Acc> landmark_of(tensor_view<const T, 4> k, const landmark_options& o, index_t b,
                             index_t hk, index_t c) {
  const index_t D = k.extent(3);
  std::vector<Acc> l(D, Acc(0));
  for (index_t d = 0; d < D; ++d) {
    if (o.landmarks.data()) {
      l[d] = Acc(o.landmarks(b, hk, c, d));
      continue;
    }
    for (index_t j = c * o.block_size; j < (c + 1) * o.block_size; ++j) l[d] += Acc(k(b, hk, j, d));
    l[d] /= Acc(o.block_size);
  }
  return l;
}

/// The retrieval by its definition, in f64.
template <class T>
std::vector<std::vector<int>> reference_retrieval(tensor_view<const T, 4> q,
                                                  tensor_view<const T, 4> k,
                                                  const landmark_options& o) {
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), D = q.extent(3);
  const index_t Hk = k.extent(1), off = k.extent(2) - Sq;
  std::vector<std::vector<int>> want(B * H * Sq);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Sq; ++i) {
        std::vector<std::pair<double, int>> rank;
        for (index_t c = 0; c < first_local(o, i + off); ++c) {
          const auto l = landmark_of<double>(k, o, b, h / (H / Hk), c);
          double s = 0;
          for (index_t d = 0; d < D; ++d) s += double(q(b, h, i, d)) * l[d];
          if (!std::isnan(s)) rank.push_back({-s, int(c)});
        }
        std::sort(rank.begin(), rank.end());
        auto& row = want[(b * H + h) * Sq + i];
        for (index_t m = 0; m < std::min<index_t>(o.top_k, index_t(rank.size())); ++m)
          row.push_back(rank[m].second);
        std::sort(row.begin(), row.end());
      }
  return want;
}

/// The grouped softmax from its weights, in Acc, over the selection's blocks.
template <class Acc, class T>
attention_result reference_grouped(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                                   tensor_view<const T, 4> v, const landmark_selection& sel,
                                   const landmark_options& o) {
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), D = q.extent(3);
  const index_t Hk = k.extent(1), Dv = v.extent(3), off = k.extent(2) - Sq, L = o.block_size;
  const Acc scale = Acc(o.scale.value_or(1.0 / std::sqrt(double(D))));
  attention_result r{std::vector<double>(B * H * Sq * Dv, 0.0), std::vector<double>(B * H * Sq)};
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Sq; ++i) {
        const index_t p = i + off, hk = h / (H / Hk), row = (b * H + h) * Sq + i;
        if (p < 0) {
          r.lse[row] = -INFINITY;
          continue;
        }
        auto logit = [&](index_t j) {
          Acc s = 0;
          for (index_t d = 0; d < D; ++d) s += Acc(q(b, h, i, d)) * Acc(k(b, hk, j, d));
          return scale * s;
        };
        // Terms of Z: each local key, and each retrieved block's landmark.
        std::vector<std::pair<Acc, std::vector<std::pair<index_t, Acc>>>>
            terms;  // (log weight, keys with in-group weights)
        const index_t local = first_local(o, p);
        for (const std::int32_t c : sel.retrieved(b, h, i)) {
          if (c >= local) continue;
          const auto l = landmark_of<Acc>(k, o, b, hk, c);
          Acc s = 0;
          for (index_t d = 0; d < D; ++d) s += Acc(q(b, h, i, d)) * l[d];
          Acc top = -INFINITY, sum = 0;
          for (index_t j = c * L; j < (c + 1) * L; ++j) top = std::max(top, logit(j));
          for (index_t j = c * L; j < (c + 1) * L; ++j) sum += std::exp(logit(j) - top);
          std::vector<std::pair<index_t, Acc>> keys;
          for (index_t j = c * L; j < (c + 1) * L; ++j)
            keys.push_back({j, std::exp(logit(j) - top) / sum});
          terms.push_back({scale * s, keys});
        }
        for (index_t j = local * L; j <= p; ++j) terms.push_back({logit(j), {{j, Acc(1)}}});
        Acc top = -INFINITY, z = 0;
        for (auto& t : terms) top = std::max(top, t.first);
        for (auto& t : terms) z += std::exp(t.first - top);
        r.lse[row] = double(top + std::log(z));
        for (auto& t : terms) {
          const Acc w = std::exp(t.first - top) / z;
          for (auto [j, in_group] : t.second)
            for (index_t d = 0; d < Dv; ++d)
              r.out[row * Dv + d] += double(w * in_group * Acc(v(b, hk, j, d)));
        }
      }
  return r;
}

struct landmark_visible {  // the flat softmax's keys: retrieved blocks and local keys
  const landmark_selection* sel;
  landmark_options o;
  index_t off;
  bool operator()(index_t b, index_t h, index_t i, index_t j) const {
    const index_t local = first_local(o, i + off);
    if (j >= local * o.block_size) return true;  // causality left to the oracle
    const auto r = sel->retrieved(b, h, i);
    return std::binary_search(r.begin(), r.end(), std::int32_t(j / o.block_size));
  }
};

template <class T, class Backend>
void check_landmark_case(const shape& s, landmark_options o, std::uint64_t seed, bool bshd_layout) {
  SCOPED_TRACE(describe(s, bshd_layout ? unsigned(feature::bshd) : 0u) +
               " L=" + std::to_string(o.block_size) + " top_k=" + std::to_string(o.top_k) +
               " local=" + std::to_string(o.local_blocks) + (o.grouped ? " grouped" : " flat") +
               (o.landmarks.data() ? " given landmarks" : ""));
  const attention_inputs<T> in(s, bshd_layout ? unsigned(feature::bshd) : 0u, seed);
  std::vector<T> out(s.B * s.H * s.Sq * s.Dv, T(-7)), again(out.size(), T(-7));
  std::vector<float> lse(s.B * s.H * s.Sq, -7.f);
  o.lse = view<float, 3>(lse.data(), {s.B, s.H, s.Sq});
  const auto out_view = in.template layout<T>(out.data(), s.H, s.Sq, s.Dv);
  landmark_attention<Backend>(in.qv(), in.kv(), in.vv(), out_view, o);

  const landmark_selection sel = landmark_select<Backend>(in.qv(), in.kv(), o);
  const auto want = reference_retrieval<T>(in.qv(), in.kv(), o);
  for (index_t r = 0; r < s.B * s.H * s.Sq; ++r) {
    const auto got = sel.retrieved(r / (s.H * s.Sq), r / s.Sq % s.H, r % s.Sq);
    ASSERT_EQ(std::vector<int>(got.begin(), got.end()), want[r]) << "query row " << r;
  }
  landmark_options reuse = o;
  reuse.lse = {};
  landmark_attention<Backend>(in.qv(), in.kv(), in.vv(),
                              in.template layout<T>(again.data(), s.H, s.Sq, s.Dv), sel, reuse);
  EXPECT_EQ(out, again) << "select + attend differs from one call";

  if (o.grouped) {
    const auto exact = reference_grouped<double>(in.qv(), in.kv(), in.vv(), sel, o);
    const auto naive = reference_grouped<T>(in.qv(), in.kv(), in.vv(), sel, o);
    EXPECT_TRUE(within_tolerance<T>(as_dense(out_view), exact.out, naive.out)) << "out";
    EXPECT_TRUE(within_tolerance<float>(as_dense(lse), exact.lse, naive.lse)) << "lse";
  } else {
    expect_softmax_result<T>(out_view, &lse, in.qv(), in.kv(), in.vv(), {.causal = true},
                             with_mask_mod(landmark_visible{&sel, o, s.Sk - s.Sq}));
  }
}

TYPED_TEST(Landmark, RetrievalAndBothSoftmaxesMatchTheirDefinitions) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape shapes[] = {{1, 1, 1, 1, 1, 1, 1},       {1, 2, 1, 37, 91, 13, 7},
                          {2, 4, 2, 150, 150, 32, 32}, {1, 4, 1, 1, 700, 16, 16},
                          {1, 2, 1, 0, 20, 8, 8},      {1, 3, 3, 40, 0, 8, 8},
                          {1, 2, 2, 60, 45, 17, 9},    {1, 8, 2, 3, 513, 24, 20}};
  std::uint64_t seed = 5100;
  for (const shape& s : shapes)
    for (bool grouped : {true, false}) {
      landmark_options o;
      o.grouped = grouped;
      o.block_size = 8, o.top_k = 3;
      check_landmark_case<T, Backend>(s, o, ++seed, false);
      o.block_size = 5, o.top_k = 4, o.local_blocks = 2, o.threads = 2;
      check_landmark_case<T, Backend>(s, o, ++seed, true);
      o.block_size = 16, o.top_k = 100, o.local_blocks = 1;  // every block retrieved
      check_landmark_case<T, Backend>(s, o, ++seed, false);
      o.top_k = 0;  // local keys only
      check_landmark_case<T, Backend>(s, o, ++seed, false);
      // The model's own landmarks (not the means).
      o.top_k = 2, o.block_size = 6;
      const index_t C = std::max<index_t>(0, s.Sk / 6);
      const auto given = normal<float>(s.B * s.Hk * C * s.D, seed + 50);
      o.landmarks = view<const float, 4>(given.data(), {s.B, s.Hk, C, s.D});
      check_landmark_case<T, Backend>(s, o, ++seed, false);
    }
}

// A retrieved block's keys together weigh exactly what its landmark weighs: with one key
// per block (L = 1) and the key as its own landmark, grouped == flat == dense over them.
TEST(LandmarkGrouped, OneKeyBlocksAreAPlainSoftmax) {
  const shape s{1, 2, 1, 20, 64, 16, 16};
  const attention_inputs<float> in(s, 0, 12);
  std::vector<float> grouped(s.H * s.Sq * s.Dv), flat(grouped.size());
  landmark_options o{.block_size = 1, .top_k = 64};
  landmark_attention(in.qv(), in.kv(), in.vv(), bhsd(grouped.data(), 1, 2, 20, 16), o);
  o.grouped = false;
  landmark_attention(in.qv(), in.kv(), in.vv(), bhsd(flat.data(), 1, 2, 20, 16), o);
  expect_softmax_result<float>(grouped, nullptr, in.qv(), in.kv(), in.vv(), {.causal = true});
  expect_softmax_result<float>(flat, nullptr, in.qv(), in.kv(), in.vv(), {.causal = true});
}

// Decode: one retrieval reused for the following steps (new keys appended), and the
// landmarks an engine keeps beside its cache (landmark_means, one block at a time).
TEST(LandmarkDecode, AReusedSelectionAndKeptLandmarks) {
  const index_t H = 8, Hk = 2, D = 32, L = 16, S0 = 500, steps = 40;
  const shape full{1, H, Hk, S0 + steps, S0 + steps, D, D};
  const attention_inputs<float> in(full, 0, 44);
  const index_t cap = S0 + steps;
  auto prefix = [&](const std::vector<float>& x, index_t heads, index_t rows) {
    return view<const float, 4>(x.data(), {1, heads, rows, D}, {heads * cap * D, cap * D, D, 1});
  };
  std::vector<float> kept(Hk * (cap / L) * D);
  auto kept_view = [&](index_t blocks) {
    return view<float, 4>(kept.data(), {1, Hk, blocks, D},
                          {Hk * (cap / L) * D, (cap / L) * D, D, 1});
  };
  landmark_means(prefix(in.k, Hk, S0), kept_view(S0 / L), L);
  landmark_selection sel;
  for (index_t step = 0; step < steps; ++step) {
    const index_t Sk = S0 + step + 1;
    if (Sk % L == 0) landmark_means(prefix(in.k, Hk, Sk), kept_view(Sk / L), L, Sk / L - 1);
    const auto q = view<const float, 4>(in.q.data() + (Sk - 1) * D, {1, H, 1, D},
                                        {H * cap * D, cap * D, D, 1});
    landmark_options o{.block_size = L, .top_k = 4};
    o.landmarks = kept_view(Sk / L);
    if (step % 8 == 0) sel = landmark_select(q, prefix(in.k, Hk, Sk), o);
    std::vector<float> out(H * D), lse(H);
    o.lse = view<float, 3>(lse.data(), {1, H, 1});
    landmark_attention(q, prefix(in.k, Hk, Sk), prefix(in.v, Hk, Sk), bhsd(out.data(), 1, H, 1, D),
                       sel, o);
    const auto exact =
        reference_grouped<double>(q, prefix(in.k, Hk, Sk), prefix(in.v, Hk, Sk), sel, o);
    const auto naive =
        reference_grouped<float>(q, prefix(in.k, Hk, Sk), prefix(in.v, Hk, Sk), sel, o);
    EXPECT_TRUE(within_tolerance<float>(as_dense(out), exact.out, naive.out)) << "step " << step;
    EXPECT_TRUE(within_tolerance<float>(as_dense(lse), exact.lse, naive.lse)) << "step " << step;
  }
  // The kept landmarks are the means.
  const landmark_options means{.block_size = L};
  for (index_t c = 0; c < cap / L; ++c) {
    const auto want = landmark_of<double>(prefix(in.k, Hk, cap), means, 0, 1, c);
    for (index_t d = 0; d < D; ++d)
      ASSERT_NEAR(kept[((cap / L) + c) * D + d], want[d], 1e-5) << "block " << c;
  }
}

// A top_k beyond the blocks there are: every block, and no allocation for the rest.
TEST(LandmarkTopK, BeyondTheBlocksRetrievesEveryBlock) {
  const shape s{1, 4, 2, 100, 100, 8, 8};
  const attention_inputs<float> in(s, 0, 9);
  std::vector<float> huge(s.H * s.Sq * s.Dv), every(huge.size());
  landmark_options o{.block_size = 10, .top_k = index_t(1) << 40};
  landmark_attention(in.qv(), in.kv(), in.vv(), bhsd(huge.data(), 1, 4, 100, 8), o);
  const landmark_selection sel = landmark_select(in.qv(), in.kv(), o);
  EXPECT_EQ(sel.top_k, 9);  // the last query's candidates: blocks 0 .. 8
  o.top_k = 9;
  landmark_attention(in.qv(), in.kv(), in.vv(), bhsd(every.data(), 1, 4, 100, 8), o);
  EXPECT_EQ(huge, every);
}

TEST(LandmarkThreads, ThreadCountNeverChangesABit) {
  const shape s{2, 4, 2, 100, 400, 32, 32};
  const attention_inputs<float> in(s, 0, 8);
  std::vector<float> one(s.B * s.H * s.Sq * s.Dv), two(one.size());
  landmark_attention(in.qv(), in.kv(), in.vv(), bhsd(one.data(), 2, 4, 100, 32),
                     {.block_size = 16, .top_k = 5, .threads = 1});
  landmark_attention(in.qv(), in.kv(), in.vv(), bhsd(two.data(), 2, 4, 100, 32),
                     {.block_size = 16, .top_k = 5, .threads = 2});
  EXPECT_EQ(one, two);
}

// NaN in q gives its row NaN; NaN in a key: rows that read its block are NaN, the rest not.
TEST(LandmarkNaN, PoisonsExactlyTheRowsThatReadIt) {
  const shape s{1, 1, 1, 64, 64, 8, 8};
  attention_inputs<float> in(s, 0, 3);
  in.q[5 * 8 + 3] = std::numeric_limits<float>::quiet_NaN();
  in.k[17 * 8 + 0] = std::numeric_limits<float>::quiet_NaN();  // block 2 of 8 keys
  const landmark_options o{.block_size = 8, .top_k = 2};
  std::vector<float> out(64 * 8);
  landmark_attention(in.qv(), in.kv(), in.vv(), bhsd(out.data(), 1, 1, 64, 8), o);
  const auto sel = landmark_select(in.qv(), in.kv(), o);
  for (index_t i = 0; i < 64; ++i) {
    const auto r = sel.retrieved(0, 0, i);
    const bool local =
        i / 8 == 2 && i >= 17;  // block 2 is local to its queries (mean NaN: never retrieved)
    EXPECT_TRUE(std::find(r.begin(), r.end(), 2) == r.end());
    const bool want_nan = i == 5 || local;
    EXPECT_EQ(std::isnan(out[i * 8]), want_nan) << "row " << i;
  }
}

TEST(LandmarkBadInput, NamesTheArgumentAndWritesNothing) {
  const shape s{1, 4, 2, 30, 64, 8, 8};
  const attention_inputs<float> in(s, 0, 1);
  std::vector<float> out(s.H * s.Sq * s.Dv, -7.f);
  const auto O = bhsd(out.data(), 1, 4, 30, 8);
  auto expect_error = [&](auto&& call, const char* name) {
    expect_error_naming(call, name, out, -7.f);
  };
  expect_error([&] { landmark_attention(in.qv(), in.kv(), in.vv(), O, {.block_size = 0}); },
               "options.block_size");
  expect_error([&] { landmark_attention(in.qv(), in.kv(), in.vv(), O, {.top_k = -1}); },
               "options.top_k");
  expect_error([&] { landmark_attention(in.qv(), in.kv(), in.vv(), O, {.local_blocks = 0}); },
               "options.local_blocks");
  std::vector<float> few(1 * 2 * 3 * 8);
  landmark_options o{.block_size = 8};
  o.landmarks = view<const float, 4>(few.data(), {1, 2, 3, 8});  // 7 blocks retrievable
  expect_error([&] { landmark_attention(in.qv(), in.kv(), in.vv(), O, o); }, "options.landmarks");
  landmark_selection sel = landmark_select(in.qv(), in.kv(), {.block_size = 8});
  landmark_selection wrong = sel;
  wrong.queries = 29;
  expect_error([&] { landmark_attention(in.qv(), in.kv(), in.vv(), O, wrong, {.block_size = 8}); },
               "selection");
  expect_error([&] { landmark_attention(in.qv(), in.kv(), in.vv(), O, sel, {.block_size = 4}); },
               "selection");
  wrong = sel;
  wrong.blocks[0] = 40, wrong.counts[0] = std::max(wrong.counts[0], 1);
  expect_error([&] { landmark_attention(in.qv(), in.kv(), in.vv(), O, wrong, {.block_size = 8}); },
               "selection");
  o.landmarks = view<const float, 4>(nullptr, {1, 2, 8, 8});
  expect_error([&] { landmark_attention(in.qv(), in.kv(), in.vv(), O, o); }, "options.landmarks");
  std::vector<float> shared(out.size() + 2 * 8 * 8);  // out's buffer also holding landmarks
  o.landmarks = view<const float, 4>(shared.data() + 8, {1, 2, 8, 8});
  std::fill(shared.begin(), shared.begin() + out.size(), -7.f);
  try {
    landmark_attention(in.qv(), in.kv(), in.vv(), bhsd(shared.data(), 1, 4, 30, 8), o);
    ADD_FAILURE() << "out over options.landmarks accepted";
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find("options.landmarks"), std::string::npos) << e.what();
  }
  std::vector<float> keys(in.k);  // landmark_means writing into the keys it reads
  expect_error(
      [&] {
        landmark_means(bhsd<const float>(keys.data(), 1, 2, 64, 8),
                       view<float, 4>(keys.data(), {1, 2, 8, 8}), 8);
      },
      "landmarks");
  std::vector<float> lm(2 * 9 * 8);
  expect_error(
      [&] {
        landmark_means(in.kv(), view<float, 4>(lm.data(), {1, 2, 9, 8}), 8);
      },
      "landmarks");
}

}  // namespace fovea::test::landmark_test
