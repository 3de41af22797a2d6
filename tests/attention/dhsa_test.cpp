// DHSA: dhsa_select against its definition computed in f64 (length-normalised chunk sums,
// ranking, own chunk plus whole chunks within N_b), dhsa_attention against the dense
// oracle masked to exactly the selection, decode reusing a prefill selection (the open
// last chunk), a budget covering everything == softmax_attention, thread invariance, the
// mass kept on planted structure, and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fovea/fovea.hpp>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../common/attention_case.hpp"
#include "../common/configs.hpp"
#include "../common/random.hpp"

namespace fovea::test::dhsa_test {

template <class C>
class Dhsa : public ::testing::Test {};
TYPED_TEST_SUITE(Dhsa, configs, config_names);

std::vector<index_t> boundaries_of(const dhsa_options& o, index_t Sk) {
  if (!o.boundaries.empty()) return {o.boundaries.begin(), o.boundaries.end()};
  std::vector<index_t> b;
  for (index_t s = 0; s < Sk; s += o.chunk_size) b.push_back(s);
  b.push_back(Sk);
  return b;
}

/// The selection by its definition, in f64: per (b, h, query chunk) the kept key chunks.
template <class T>
std::vector<std::vector<int>> reference_selection(tensor_view<const T, 4> q,
                                                  tensor_view<const T, 4> k,
                                                  const dhsa_options& o) {
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), D = q.extent(3);
  const index_t Hk = k.extent(1), Sk = k.extent(2), off = Sk - Sq;
  const auto bounds = boundaries_of(o, Sk);
  const index_t C = index_t(bounds.size()) - 1;
  std::vector<std::vector<int>> kept(B * H * C);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h) {
      std::vector<double> qr(C * D, 0.0), kr(C * D, 0.0);
      std::vector<index_t> present(C, 0);
      for (index_t c = 0; c < C; ++c) {
        for (index_t j = bounds[c]; j < bounds[c + 1]; ++j)
          for (index_t d = 0; d < D; ++d) kr[c * D + d] += double(k(b, h / (H / Hk), j, d));
        for (index_t j = std::max(bounds[c], off); j < bounds[c + 1]; ++j, ++present[c])
          for (index_t d = 0; d < D; ++d) qr[c * D + d] += double(q(b, h, j - off, d));
        for (index_t d = 0; d < D; ++d) {
          kr[c * D + d] /= std::sqrt(double(bounds[c + 1] - bounds[c]));
          if (present[c]) qr[c * D + d] /= std::sqrt(double(present[c]));
        }
      }
      for (index_t a = 0; a < C; ++a) {
        if (!present[a]) continue;
        std::vector<std::pair<double, int>> rank;
        for (index_t c = 0; c <= (o.causal ? a : C - 1); ++c) {
          if (c == a) continue;
          double s = 0;
          for (index_t d = 0; d < D; ++d) s += qr[a * D + d] * kr[c * D + d];
          rank.push_back({std::isnan(s) ? -INFINITY : -s, int(c)});  // ascending = best first
        }
        std::stable_sort(rank.begin(), rank.end(),
                         [](auto x, auto y) { return x.first < y.first; });
        auto& row = kept[(b * H + h) * C + a];
        row.push_back(int(a));
        index_t budget = o.top_keys - (bounds[a + 1] - bounds[a]);
        for (auto [s, c] : rank)
          if (bounds[c + 1] - bounds[c] <= budget)
            row.push_back(c), budget -= bounds[c + 1] - bounds[c];
        std::sort(row.begin(), row.end());
      }
    }
  return kept;
}

/// The oracle's mask: key j visible to query (b, h, i) iff j's chunk is kept for i's.
struct dhsa_visible {
  const dhsa_selection* sel;
  index_t off;
  bool operator()(index_t b, index_t h, index_t i, index_t j) const {
    if (i + off < 0) return false;
    const auto kept = sel->kept(b, h, sel->chunk_of(i + off));
    return std::binary_search(kept.begin(), kept.end(), std::int32_t(sel->chunk_of(j)));
  }
};

template <class T, class Backend>
void check_dhsa_case(const shape& s, dhsa_options o, std::uint64_t seed, bool bshd_layout) {
  SCOPED_TRACE(describe(s, (o.causal ? unsigned(feature::causal) : 0u) |
                               (bshd_layout ? unsigned(feature::bshd) : 0u)) +
               " chunk=" + std::to_string(o.chunk_size) + " top_keys=" +
               std::to_string(o.top_keys) + " boundaries=" + std::to_string(o.boundaries.size()));
  const attention_inputs<T> in(s, bshd_layout ? unsigned(feature::bshd) : 0u, seed);
  std::vector<T> out(s.B * s.H * s.Sq * s.Dv, T(-7)), again(out.size(), T(-7));
  std::vector<float> lse(s.B * s.H * s.Sq, -7.f);
  o.lse = view<float, 3>(lse.data(), {s.B, s.H, s.Sq});
  const auto out_view = in.template layout<T>(out.data(), s.H, s.Sq, s.Dv);
  dhsa_attention<Backend>(in.qv(), in.kv(), in.vv(), out_view, o);

  const dhsa_selection sel = dhsa_select<Backend>(in.qv(), in.kv(), o);
  const auto want = reference_selection<T>(in.qv(), in.kv(), o);
  ASSERT_EQ(index_t(want.size()), s.B * s.H * sel.chunks());
  for (index_t b = 0; b < s.B; ++b)
    for (index_t h = 0; h < s.H; ++h)
      for (index_t a = 0; a < sel.chunks(); ++a) {
        const auto got = sel.kept(b, h, a);
        EXPECT_EQ(std::vector<int>(got.begin(), got.end()), want[(b * s.H + h) * sel.chunks() + a])
            << "b=" << b << " h=" << h << " chunk " << a;
      }
  dhsa_options reuse = o;
  reuse.lse = {};
  dhsa_attention<Backend>(in.qv(), in.kv(), in.vv(),
                          in.template layout<T>(again.data(), s.H, s.Sq, s.Dv), sel, reuse);
  EXPECT_EQ(out, again) << "select + attend differs from one call";

  softmax_options r;
  r.causal = o.causal;
  expect_softmax_result<T>(out_view, &lse, in.qv(), in.kv(), in.vv(), r,
                           with_mask_mod(dhsa_visible{&sel, s.Sk - s.Sq}));
}

TYPED_TEST(Dhsa, SelectionIsTheDefinitionAndAttentionIsDenseOverIt) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape shapes[] = {{1, 1, 1, 1, 1, 1, 1},       {1, 2, 1, 37, 91, 13, 7},
                          {2, 4, 2, 150, 150, 32, 32}, {1, 2, 2, 1, 700, 16, 16},
                          {1, 2, 1, 0, 20, 8, 8},      {1, 3, 3, 40, 0, 8, 8},
                          {1, 2, 1, 300, 300, 24, 20}, {1, 4, 1, 90, 60, 17, 9}};
  std::uint64_t seed = 4100;
  for (const shape& s : shapes) {
    dhsa_options o;
    o.chunk_size = 16;
    o.top_keys = 64;
    check_dhsa_case<T, Backend>(s, o, ++seed, false);
    o.chunk_size = 7, o.top_keys = 20;  // chunks that skip the tile and the budget
    check_dhsa_case<T, Backend>(s, o, ++seed, true);
    o.causal = false, o.chunk_size = 11, o.top_keys = 40, o.threads = 2;
    check_dhsa_case<T, Backend>(s, o, ++seed, false);
    o.causal = true, o.top_keys = 3;  // below a chunk: the own chunk only
    check_dhsa_case<T, Backend>(s, o, ++seed, false);
    // Variable chunks from a "predictor": lengths 1 to 80.
    std::vector<index_t> bounds{0};
    std::mt19937_64 gen(seed);
    while (bounds.back() < s.Sk)
      bounds.push_back(std::min(s.Sk, bounds.back() + 1 + index_t(gen() % 80)));
    if (s.Sk == 0) bounds = {0};
    o.boundaries = bounds;
    o.top_keys = 100;
    check_dhsa_case<T, Backend>(s, o, ++seed, true);
  }
}

// A budget that covers every key keeps every chunk: exactly softmax_attention's result.
TYPED_TEST(Dhsa, ABudgetOverEveryKeyIsDenseAttention) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  const shape s{1, 4, 2, 129, 129, 32, 32};
  const attention_inputs<T> in(s, 0, 77);
  for (bool causal : {true, false}) {
    std::vector<T> sparse(s.H * s.Sq * s.Dv), dense(sparse.size());
    dhsa_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(sparse.data(), 1, s.H, s.Sq, s.Dv),
                            {.causal = causal, .chunk_size = 10, .top_keys = s.Sk});
    softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(dense.data(), 1, s.H, s.Sq, s.Dv),
                               {.causal = causal});
    for (std::size_t i = 0; i < dense.size(); ++i)
      ASSERT_NEAR(double(sparse[i]), double(dense[i]), 1e-5 * (1 + std::abs(double(dense[i]))));
  }
}

// Decode: the prefill's selection is reused while new keys join the open last chunk.
TEST(DhsaDecode, ReusesThePrefillSelectionWithTheOpenChunk) {
  const index_t H = 4, Hk = 2, D = 32, S0 = 200;
  const shape full{1, H, Hk, S0 + 6, S0 + 6, D, D};
  const attention_inputs<float> in(full, 0, 91);
  const dhsa_options o{.chunk_size = 24, .top_keys = 96};
  const auto prefix = [&](const std::vector<float>& x, index_t heads, index_t rows) {
    return view<const float, 4>(x.data(), {1, heads, rows, D},
                                {heads * (S0 + 6) * D, (S0 + 6) * D, D, 1});
  };
  const dhsa_selection sel = dhsa_select(prefix(in.q, H, S0), prefix(in.k, Hk, S0), o);
  for (index_t step = 0; step < 6; ++step) {
    const index_t Sk = S0 + step + 1;
    const auto q = view<const float, 4>(in.q.data() + (Sk - 1) * D, {1, H, 1, D},
                                        {H * (S0 + 6) * D, (S0 + 6) * D, D, 1});
    std::vector<float> out(H * D, -7.f), lse(H, -7.f);
    dhsa_options run = o;
    run.lse = view<float, 3>(lse.data(), {1, H, 1});
    dhsa_attention(q, prefix(in.k, Hk, Sk), prefix(in.v, Hk, Sk), bhsd(out.data(), 1, H, 1, D), sel,
                   run);
    expect_softmax_result<float>(bhsd(out.data(), 1, H, 1, D), &lse, q, prefix(in.k, Hk, Sk),
                                 prefix(in.v, Hk, Sk), {.causal = true},
                                 with_mask_mod(dhsa_visible{&sel, Sk - 1}));
    // The open chunk: the new keys are seen.
    const auto last = sel.kept(0, 0, sel.chunks() - 1);
    EXPECT_TRUE(std::binary_search(last.begin(), last.end(), std::int32_t(sel.chunks() - 1)));
  }
}

TEST(DhsaThreads, ThreadCountNeverChangesABit) {
  const shape s{2, 4, 2, 300, 300, 64, 64};
  const attention_inputs<float> in(s, 0, 5);
  std::vector<float> one(s.B * s.H * s.Sq * s.Dv), two(one.size());
  dhsa_attention(in.qv(), in.kv(), in.vv(), bhsd(one.data(), 2, 4, 300, 64),
                 {.chunk_size = 20, .top_keys = 100, .threads = 1});
  dhsa_attention(in.qv(), in.kv(), in.vv(), bhsd(two.data(), 2, 4, 300, 64),
                 {.chunk_size = 20, .top_keys = 100, .threads = 2});
  EXPECT_EQ(one, two);
}

// Planted structure: each query chunk shares a direction with two earlier key chunks.
// The kept keys hold at least 90% of the exact softmax mass (the recall target).
TEST(DhsaRecall, KeepsTheMassOfPlantedStructure) {
  const index_t S = 2048, D = 64, L = 32, C = S / L;
  std::mt19937_64 gen(3);
  std::normal_distribution<float> noise(0.f, 0.3f);
  std::vector<float> dirs(C * D), q(S * D), k(S * D), v(S * D);
  for (auto& x : dirs) x = std::normal_distribution<float>(0.f, 1.f)(gen);
  std::vector<float> planted(C * D,
                             0.f);  // key chunk c: the directions of the chunks that chose it
  for (index_t a = 1; a < C; ++a)
    for (int pick = 0; pick < 2; ++pick) {
      const index_t c = index_t(gen() % std::uint64_t(a));
      for (index_t d = 0; d < D; ++d) planted[c * D + d] += dirs[a * D + d];
    }
  for (index_t i = 0; i < S; ++i)
    for (index_t d = 0; d < D; ++d) {
      q[i * D + d] = noise(gen) + 0.8f * dirs[(i / L) * D + d];
      k[i * D + d] = noise(gen) + 0.8f * planted[(i / L) * D + d];
      v[i * D + d] = noise(gen);
    }
  const dhsa_options o{.chunk_size = L, .top_keys = 256};
  const auto Q = bhsd<const float>(q.data(), 1, 1, S, D),
             K = bhsd<const float>(k.data(), 1, 1, S, D);
  const dhsa_selection sel = dhsa_select(Q, K, o);
  double kept_mass = 0;
  index_t counted = 0;
  for (index_t i = 4 * L; i < S; i += 7, ++counted) {
    std::vector<double> logit(i + 1);
    double top = -INFINITY, total = 0, kept = 0;
    for (index_t j = 0; j <= i; ++j) {
      double s = 0;
      for (index_t d = 0; d < D; ++d) s += double(q[i * D + d]) * k[j * D + d];
      logit[j] = s / std::sqrt(double(D));
      top = std::max(top, logit[j]);
    }
    const auto chosen = sel.kept(0, 0, i / L);
    for (index_t j = 0; j <= i; ++j) {
      const double p = std::exp(logit[j] - top);
      total += p;
      if (std::binary_search(chosen.begin(), chosen.end(), std::int32_t(j / L))) kept += p;
    }
    kept_mass += kept / total;
  }
  EXPECT_GE(kept_mass / double(counted), 0.9);
}

TEST(DhsaBadInput, NamesTheArgumentAndWritesNothing) {
  const shape s{1, 4, 2, 30, 30, 8, 8};
  const attention_inputs<float> in(s, 0, 1);
  std::vector<float> out(s.H * s.Sq * s.Dv, -7.f);
  const auto O = bhsd(out.data(), 1, 4, 30, 8);
  auto expect_error = [&](auto&& call, const char* name) {
    expect_error_naming(call, name, out, -7.f);
  };
  expect_error([&] { dhsa_attention(in.qv(), in.kv(), in.vv(), O, {.chunk_size = 0}); },
               "options.chunk_size");
  expect_error([&] { dhsa_attention(in.qv(), in.kv(), in.vv(), O, {.top_keys = 0}); },
               "options.top_keys");
  const std::vector<index_t> short_end{0, 10, 20}, bad_start{1, 10, 30}, flat{0, 10, 10, 30};
  for (const auto* b : {&short_end, &bad_start, &flat})
    expect_error(
        [&] { dhsa_attention(in.qv(), in.kv(), in.vv(), O, dhsa_options{.boundaries = *b}); },
        "options.boundaries");
  dhsa_selection sel = dhsa_select(in.qv(), in.kv(), {.chunk_size = 8});
  dhsa_selection wrong = sel;
  wrong.heads = 2;
  expect_error([&] { dhsa_attention(in.qv(), in.kv(), in.vv(), O, wrong); }, "selection");
  wrong = sel;
  wrong.indices[0] = 99;
  expect_error([&] { dhsa_attention(in.qv(), in.kv(), in.vv(), O, wrong); }, "selection");
  wrong = sel;
  wrong.boundaries.back() = 31;
  expect_error([&] { dhsa_attention(in.qv(), in.kv(), in.vv(), O, wrong); }, "selection");
  expect_error([&] { dhsa_select(in.qv(), bhsd<const float>(in.k.data(), 1, 3, 20, 8)); }, "k");
  // A selection made with the last query only keeps nothing for the earlier chunks.
  const dhsa_selection last_only =
      dhsa_select(slice(in.qv(), 2, 29, 1), in.kv(), {.chunk_size = 8});
  expect_error([&] { dhsa_attention(in.qv(), in.kv(), in.vv(), O, last_only); }, "selection");
}

}  // namespace fovea::test::dhsa_test
