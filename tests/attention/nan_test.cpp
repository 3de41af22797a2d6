// NaN and Inf reach exactly the rows the f64 oracle says they reach, on the decode path
// (Sq <= 16: stacked heads, split keys, ordered merge) and the prefill path alike: NaN
// keys, queries and Inf values placed at lane, tile and chunk edges, whole tiles and whole
// chunks, for every storage type and entry point. NaN or Inf in keys a row cannot see
// never reach it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fovea/fovea.hpp>
#include <limits>
#include <numeric>
#include <set>
#include <utility>
#include <vector>

#include "../common/attention_case.hpp"
#include "../common/configs.hpp"

namespace fovea::test::nan_test {

constexpr double nan = std::numeric_limits<double>::quiet_NaN();
constexpr double inf = std::numeric_limits<double>::infinity();

template <class C>
class NaNPropagation : public ::testing::Test {
 protected:
  using T = typename C::value_type;
  using Backend = typename C::backend;
};
TYPED_TEST_SUITE(NaNPropagation, configs, config_names);

/// Where a poison goes: key rows [first, last) of key head 0 (a NaN key or an Inf value),
/// or query row `first` of head 0.
enum class poison { nan_keys, inf_values, nan_query };

/// Sets the poison into a case's inputs.
template <class T>
void place(attention_inputs<T>& in, poison kind, index_t first, index_t last) {
  const shape& s = in.s;
  const bool bshd_layout = in.features & feature::bshd;
  auto at = [&](index_t heads, index_t seq, index_t dim, index_t h, index_t i, index_t d) {
    return bshd_layout ? (i * heads + h) * dim + d : (h * seq + i) * dim + d;
  };
  for (index_t j = first; j < last; ++j) switch (kind) {
      case poison::nan_keys:
        in.k[at(s.Hk, s.Sk, s.D, 0, j, (j * 5) % s.D)] = T(nan);
        break;
      case poison::inf_values:
        in.v[at(s.Hk, s.Sk, s.Dv, 0, j, (j * 3) % s.Dv)] = T(inf);
        break;
      case poison::nan_query:
        in.q[at(s.H, s.Sq, s.D, 0, j, s.D - 1)] = T(nan);
        break;
    }
}

/// Runs the case and compares out and lse with the oracle: NaN exactly where it has NaN,
/// infinities equal, the rest within the tolerance rule.
template <class T, class Backend>
void check_poisoned(const shape& s, unsigned features, poison kind, index_t first, index_t last,
                    std::uint64_t seed) {
  SCOPED_TRACE(describe(s, features) + " poison " + std::to_string(int(kind)) + " [" +
               std::to_string(first) + ", " + std::to_string(last) + ")");
  attention_inputs<T> in(s, features | feature::lse, seed);
  place(in, kind, first, last);
  check_case<T, Backend>(in);
}

/// Key ranges at the edges that matter: SIMD lanes (4, 8, 16 wide), prefill tiles (64
/// keys), decode tiles (256) and decode chunks (512), whole tiles and chunks, everything.
std::set<std::pair<index_t, index_t>> key_ranges(index_t sk) {
  std::set<std::pair<index_t, index_t>> r;
  for (index_t j : {0, 3, 4, 7, 8, 15, 16, 63, 64, 255, 256, 511, 512})
    if (j < sk) r.insert({j, j + 1});
  r.insert({sk - 1, sk});
  for (auto [a, b] : {std::pair<index_t, index_t>{0, 17}, {0, 64}, {0, 256}, {0, 300}, {0, 511},
                      {0, 512}, {256, 512}, {512, 1024}})
    if (b <= sk) r.insert({a, b});
  r.insert({0, sk});
  return r;
}

// The inputs of the defect report, as they were: each gave 0 / -inf or a plausible
// number on the decode path.
TYPED_TEST(NaNPropagation, ReportedInputs) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  {  // B = H = Sq = Sk = D = 1, q NaN, k = v = 1: out NaN, lse NaN.
    const T q = T(nan), k = T(1), v = T(1);
    T out = T(-7);
    float lse = -7.f;
    softmax_options o;
    o.lse = view<float, 3>(&lse, {1, 1, 1});
    softmax_attention<Backend>(bhsd<const T>(&q, 1, 1, 1, 1), bhsd<const T>(&k, 1, 1, 1, 1),
                               bhsd<const T>(&v, 1, 1, 1, 1), bhsd(&out, 1, 1, 1, 1), o);
    EXPECT_TRUE(std::isnan(double(out)));
    EXPECT_TRUE(std::isnan(lse));
  }
  const shape s{1, 1, 1, 1, 32, 8, 8};
  check_poisoned<T, Backend>(s, 0, poison::nan_keys, 0, 17, 1);  // keys 0..16 NaN
  check_poisoned<T, Backend>({1, 1, 1, 1, 1024, 8, 8}, 0, poison::nan_keys, 0, 512, 2);
  check_poisoned<T, Backend>({1, 1, 1, 1, 512, 8, 8}, 0, poison::nan_keys, 0, 511, 3);
  check_poisoned<T, Backend>({1, 1, 1, 1, 512, 8, 8}, 0, poison::nan_keys, 0, 300, 4);
}

// Every position class for Sq on both sides of the decode limit, Sk around tiles and
// chunks, causal (so rows before a poisoned key must stay clean) and not.
TYPED_TEST(NaNPropagation, EveryPositionClass) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  std::uint64_t seed = 10;
  for (index_t sq : {1, 4, 16, 17})
    for (index_t sk : {1, 31, 256, 511, 512, 513, 1024}) {
      const shape s{1, 2, 1, sq, sk, 8, 8};
      for (unsigned f : {0u, unsigned(feature::causal)}) {
        for (auto [a, b] : key_ranges(sk)) {
          check_poisoned<T, Backend>(s, f, poison::nan_keys, a, b, ++seed);
          check_poisoned<T, Backend>(s, f, poison::inf_values, a, b, ++seed);
        }
        for (index_t i : {index_t(0), sq - 1})
          check_poisoned<T, Backend>(s, f, poison::nan_query, i, i + 1, ++seed);
      }
    }
}

// The same poisons with the other modifiers, GQA stacking and the BSHD layout: the sink
// joins the denominator, masks and windows hide some poisoned keys. (Inf values are left
// out under ALiBi: a far key's fp32 weight underflows to 0 there and 0 * Inf is NaN, as
// in any fp32 computation, while the f64 oracle still has a weight.)
TYPED_TEST(NaNPropagation, WithModifiers) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  std::uint64_t seed = 5000;
  const unsigned modifiers[] = {feature::sinks, feature::window | feature::causal, feature::mask,
                                feature::bias,  feature::softcap, feature::alibi, feature::bshd};
  for (index_t sq : {1, 3, 17})
    for (index_t sk : {200, 1100})
      for (unsigned f : modifiers)
        for (auto [a, b] : {std::pair<index_t, index_t>{0, 1}, {0, 64}, {sk - 1, sk}, {0, sk}}) {
          const shape s{2, 4, 2, sq, sk, 12, 9};
          check_poisoned<T, Backend>(s, f, poison::nan_keys, a, b, ++seed);
          if (!(f & feature::alibi))
            check_poisoned<T, Backend>(s, f, poison::inf_values, a, b, ++seed);
        }
}

// bf16 and fp16 storage (f32 accumulation): a NaN query or NaN keys over a whole decode
// chunk reach out and lse.
TEST(NaNPropagationLowPrecision, DecodeAndPrefill) {
  for (index_t sq : {1, 4, 17})
    for (auto range : {std::pair<index_t, index_t>{0, 512}, {0, 17}, {1023, 1024}}) {
      const index_t a = range.first, b = range.second;  // (lambdas may not capture bindings in clang 14)
      SCOPED_TRACE("Sq " + std::to_string(sq) + " keys [" + std::to_string(a) + ", " +
                   std::to_string(b) + ")");
      auto run = [&](auto tag) {
        using S = decltype(tag);
        const index_t H = 2, Sk = 1024, D = 8;
        std::vector<S> q(H * sq * D), k(Sk * D), v(Sk * D), out(H * sq * D);
        const auto qf = normal<float>(q.size(), 1), kf = normal<float>(k.size(), 2);
        for (std::size_t i = 0; i < q.size(); ++i) q[i] = S(qf[i]);
        for (std::size_t i = 0; i < k.size(); ++i) k[i] = S(kf[i]), v[i] = S(kf[i] * 0.5f);
        for (index_t j = a; j < b; ++j) k[j * D] = S(float(nan));
        std::vector<float> lse(H * sq);
        softmax_options o;
        o.causal = true;
        o.lse = view<float, 3>(lse.data(), {1, H, sq});
        softmax_attention(bhsd<const S>(q.data(), 1, H, sq, D), bhsd<const S>(k.data(), 1, 1, Sk, D),
                          bhsd<const S>(v.data(), 1, 1, Sk, D), bhsd(out.data(), 1, H, sq, D), o);
        for (index_t h = 0; h < H; ++h)
          for (index_t i = 0; i < sq; ++i) {
            const bool sees = a <= i + Sk - sq;  // bottom-right causal
            EXPECT_EQ(sees, std::isnan(lse[h * sq + i])) << "h " << h << " i " << i;
            for (index_t d = 0; d < D; ++d)
              EXPECT_EQ(sees, std::isnan(float(out[(h * sq + i) * D + d])))
                  << "h " << h << " i " << i << " d " << d;
          }
      };
      run(bfloat16{});
      run(half{});
    }
}

// Paged and varlen calls (the decode path per sequence) and agent attention with explicit
// agents and few queries (its second stage is a decode-sized dense problem).
TEST(NaNPropagationEntryPoints, PagedVarlenAndAgent) {
  const index_t H = 2, D = 8, page = 16, Sk = 600;
  auto q = normal<float>(H * 3 * D, 1), k = normal<float>(Sk * D, 2), v = normal<float>(Sk * D, 3);
  for (index_t j = 0; j < 512; ++j) k[j * D + 1] = float(nan);  // the first decode chunk
  {                                                             // paged, Sq = 1
    const index_t pages = (Sk + page - 1) / page;
    std::vector<float> kc(pages * page * D), vc(pages * page * D);
    std::vector<std::int32_t> table(pages);
    for (index_t p = 0; p < pages; ++p) table[p] = std::int32_t(pages - 1 - p);  // scrambled
    for (index_t j = 0; j < Sk; ++j)
      for (index_t d = 0; d < D; ++d) {
        const index_t slot = (table[j / page] * page + j % page) * D + d;
        kc[slot] = k[j * D + d];
        vc[slot] = v[j * D + d];
      }
    std::vector<float> out(H * D);
    const std::int32_t len = Sk;
    softmax_attention_paged(bhsd<const float>(q.data(), 1, H, 1, D),
                            paged_nhd<const float>(kc.data(), pages, page, 1, D),
                            paged_nhd<const float>(vc.data(), pages, page, 1, D),
                            bhsd(out.data(), 1, H, 1, D),
                            view<const std::int32_t, 2>(table.data(), {1, pages}),
                            std::span<const std::int32_t>(&len, 1));
    for (float x : out) EXPECT_TRUE(std::isnan(x)) << "paged";
  }
  {  // varlen: sequence 0 of 3 queries sees the NaN keys, sequence 1 (other keys) does not
    std::vector<float> out(H * 4 * D);
    auto q4 = normal<float>(H * 4 * D, 4);
    const std::int32_t cu_q[] = {0, 3, 4}, cu_k[] = {0, 520, int(Sk)};
    softmax_attention_varlen(bhsd<const float>(q4.data(), 1, H, 4, D),
                             bhsd<const float>(k.data(), 1, 1, Sk, D),
                             bhsd<const float>(v.data(), 1, 1, Sk, D), bhsd(out.data(), 1, H, 4, D),
                             cu_q, cu_k, {.causal = true});
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < 4; ++i)
        for (index_t d = 0; d < D; ++d)
          EXPECT_EQ(i < 3, std::isnan(out[(h * 4 + i) * D + d])) << "varlen h " << h << " i " << i;
  }
  {  // agent attention, explicit agents, 4 queries, one of them NaN
    auto q4 = normal<float>(H * 4 * D, 5);
    const auto clean_k = normal<float>(Sk * D, 6);
    q4[(0 * 4 + 2) * D] = float(nan);  // head 0, query 2
    const auto agents = normal<float>(H * 4 * D, 7);
    std::vector<float> out(H * 4 * D);
    agent_attention(bhsd<const float>(q4.data(), 1, H, 4, D),
                    bhsd<const float>(clean_k.data(), 1, 1, Sk, D),
                    bhsd<const float>(v.data(), 1, 1, Sk, D), bhsd(out.data(), 1, H, 4, D),
                    bhsd<const float>(agents.data(), 1, H, 4, D));
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < 4; ++i)
        for (index_t d = 0; d < D; ++d)
          EXPECT_EQ(h == 0 && i == 2, std::isnan(out[(h * 4 + i) * D + d]))
              << "agent h " << h << " i " << i;
  }
}


// The selection rule: a key whose selection score is NaN is selected (routing's cluster
// membership, dynamic-mask's bias, HiP's representative scores), so the NaN reaches every
// row that selects it and may see it (causal: rows at or after it); rows before it stay
// finite. Routing's k-means is not thrown off by the poisoned row (it moves no centroid).
TEST(NaNPropagationEntryPoints, SelectionKernelsKeepAPoisonedKey) {
  const index_t H = 2, S = 512, D = 16, poisoned = 300;
  const auto q = normal<float>(H * S * D, 1), v = normal<float>(H * S * D, 3);
  auto k = normal<float>(H * S * D, 2);
  std::vector<float> bias(H * S, 0.f);
  const auto Q = bhsd<const float>(q.data(), 1, H, S, D), V = bhsd<const float>(v.data(), 1, H, S, D);
  const auto K = bhsd<const float>(k.data(), 1, H, S, D);
  std::vector<float> out(H * S * D), clean(H * S * D);
  const auto O = bhsd(out.data(), 1, H, S, D);
  // Rows before the key: finite. Rows after it: NaN if `reached(h, i)`, else the clean run's.
  auto expect_rows = [&](const char* name, auto&& reached) {
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < S; ++i) {
        bool any_nan = false, all_nan = true;
        for (index_t d = 0; d < D; ++d) {
          any_nan = any_nan || std::isnan(O(0, h, i, d));
          all_nan = all_nan && std::isnan(O(0, h, i, d));
        }
        if (i < poisoned || !reached(h, i))
          ASSERT_FALSE(any_nan) << name << ": row " << i << " of head " << h;
        else
          ASSERT_TRUE(all_nan) << name << ": row " << i << " of head " << h << " lost the NaN";
      }
  };
  auto poison_key = [&](float x) {
    for (index_t h = 0; h < H; ++h) k[(h * S + poisoned) * D + 5] = x;
  };

  // Routing with given centroids (the same query memberships in both runs): every covered
  // query after the key sees it (it ranks first in every cluster); uncovered ones stay 0.
  routing_centroids centroids(H, 4, D);
  centroids.init(Q);
  const routing_options ro{.causal = true, .num_clusters = 4, .window = 64};
  routing_attention(Q, K, V, bhsd(clean.data(), 1, H, S, D), centroids, ro);
  poison_key(float(nan));
  routing_attention(Q, K, V, O, centroids, ro);
  expect_rows("routing (given centroids)", [&](index_t h, index_t i) {
    return std::any_of(clean.begin() + (h * S + i) * D, clean.begin() + (h * S + i + 1) * D,
                       [](float x) { return x != 0.f; });
  });
  // Routing clustering its own tokens: rows before the key stay finite, and the rows the
  // key reaches are NaN (which rows are covered depends on the clustering).
  routing_attention(Q, K, V, O, ro);
  index_t nan_rows = 0;
  for (index_t h = 0; h < H; ++h)
    for (index_t i = 0; i < S; ++i)
      for (index_t d = 0; d < D; ++d) {
        ASSERT_TRUE(i >= poisoned || std::isfinite(O(0, h, i, d))) << "routing: row " << i;
        nan_rows += d == 0 && std::isnan(O(0, h, i, d));
      }
  EXPECT_GT(nan_rows, 0) << "routing: the NaN key reached no row";

  // HiP: the NaN reaches the rows whose selection holds it (compared with the selection).
  const hip_options ho{.causal = true, .top_k = 64, .sliding_window = 16, .sink_tokens = 4};
  hip_attention(Q, K, V, O, ho);
  const auto sel = hip_select(Q, K, ho);
  expect_rows("hip", [&](index_t h, index_t i) {
    if (i - poisoned < 16) return true;  // the sliding window
    for (std::int32_t first : sel.blocks(0, h, i / ho.block_size_q))
      if (first <= poisoned && poisoned < first + ho.block_size_k) return true;
    return false;
  });

  // Dynamic mask: a NaN bias selects its key for every row.
  poison_key(0.25f);
  for (index_t h = 0; h < H; ++h) bias[h * S + poisoned] = float(nan);
  dynamic_mask_attention(Q, K, V, O, view<const float, 4>(bias.data(), {1, H, 1, S}),
                         {.causal = true, .keep = 32});
  expect_rows("dynamic_mask", [](index_t, index_t) { return true; });
}

// HiP's search scores a child by the max over its representative keys and columns; a max
// instruction passes over NaN (it returns its other operand), so a NaN there must be
// looked for on the side. Here every even key of a low-scoring region is NaN: each
// representative of the region is NaN, the region must be selected, and every row far
// enough after it (past the sliding window) must be NaN.
TEST(NaNPropagationEntryPoints, HipKeepsANaNRepresentative) {
  const index_t S = 512, D = 16, from = 256, to = 384;
  auto q = normal<float>(S * D, 1), k = normal<float>(S * D, 2);
  const auto v = normal<float>(S * D, 3);
  for (float& x : q) x = std::abs(x) + 1.f;  // every query scores the region very low
  for (index_t j = from; j < to; ++j)
    for (index_t d = 0; d < D; ++d) k[j * D + d] = (j % 2 == 0 && d == 3) ? float(nan) : -3.f;
  std::vector<float> out(S * D);
  hip_attention(bhsd<const float>(q.data(), 1, 1, S, D), bhsd<const float>(k.data(), 1, 1, S, D),
                bhsd<const float>(v.data(), 1, 1, S, D), bhsd(out.data(), 1, 1, S, D),
                {.causal = true, .top_k = 64, .sliding_window = 16, .sink_tokens = 4});
  for (index_t i = 0; i < S; ++i)
    for (index_t d = 0; d < D; ++d) {
      if (i < from) {
        ASSERT_TRUE(std::isfinite(out[i * D + d])) << "row " << i;
      } else if (i >= to + 64) {
        ASSERT_TRUE(std::isnan(out[i * D + d])) << "row " << i;
      }
    }
}

}  // namespace fovea::test::nan_test
