// Numerical extremes for every kernel: logits around 1e4 stay finite, NaN in a visible
// query row and Inf in a visible value propagate to the rows they reach (never silently
// become numbers), and results stay finite elsewhere.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fovea/fovea.hpp>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "../common/random.hpp"

namespace fovea::test::extremes_test {

using cview = tensor_view<const float, 4>;
using mview = tensor_view<float, 4>;

constexpr index_t H = 2, S = 96, D = 8;

/// Each kernel set up so that every query sees every key at or before it (causal), or
/// every key (the non-causal ones), which is what the row checks below rely on.
std::vector<std::pair<std::string, std::function<void(cview, cview, cview, mview)>>> kernels() {
  static const float zero[1] = {0.f};
  return {
      {"softmax",
       [](cview q, cview k, cview v, mview o) { softmax_attention(q, k, v, o, {.causal = true}); }},
      {"hip (everything a candidate)",
       [](cview q, cview k, cview v, mview o) {
         hip_attention(q, k, v, o, {.causal = true, .top_k = 512});
       }},
      {"dynamic_mask (keep all)",
       [](cview q, cview k, cview v, mview o) {
         dynamic_mask_attention(q, k, v, o, view<const float, 4>(zero, {1, 1, 1, 1}),
                                {.causal = true, .keep = S});
       }},
      {"routing (one cluster of all)",
       [](cview q, cview k, cview v, mview o) {
         routing_attention(q, k, v, o, {.causal = true, .num_clusters = 1, .window = S});
       }},
      {"linear",
       [](cview q, cview k, cview v, mview o) { linear_attention(q, k, v, o, {.causal = true}); }},
      {"agent (causal, explicit)",
       [](cview q, cview k, cview v, mview o) {
         static const std::vector<float> a = normal<float>(H * 4 * D, 99);
         agent_attention(q, k, v, o, bhsd<const float>(a.data(), 1, H, 4, D), {.causal = true});
       }},
  };
}

TEST(Extremes, HugeLogitsStayFinite) {
  for (const auto& [name, run] : kernels()) {
    SCOPED_TRACE(name);
    auto q = normal<float>(H * S * D, 1), k = normal<float>(H * S * D, 2);
    const auto v = normal<float>(H * S * D, 3);
    for (float& x : q) x *= 60.f;  // q.k / sqrt(D) around 1e4
    for (float& x : k) x *= 60.f;
    std::vector<float> out(H * S * D);
    run(bhsd<const float>(q.data(), 1, H, S, D), bhsd<const float>(k.data(), 1, H, S, D),
        bhsd<const float>(v.data(), 1, H, S, D), bhsd(out.data(), 1, H, S, D));
    for (float x : out) ASSERT_TRUE(std::isfinite(x));
  }
}

TEST(Extremes, NaNAndInfPropagateToTheRowsTheyReach) {
  const index_t row = 50;  // query row given a NaN; key row given an Inf value
  for (const auto& [name, run] : kernels()) {
    SCOPED_TRACE(name);
    auto q = normal<float>(H * S * D, 4);
    const auto k = normal<float>(H * S * D, 5);
    auto v = normal<float>(H * S * D, 6);
    std::vector<float> out(H * S * D);
    const auto Q = bhsd<const float>(q.data(), 1, H, S, D);
    const auto K = bhsd<const float>(k.data(), 1, H, S, D);
    const auto V = bhsd<const float>(v.data(), 1, H, S, D);
    const auto O = bhsd(out.data(), 1, H, S, D);
    q[row * D + 3] = std::numeric_limits<float>::quiet_NaN();  // head 0, query `row`
    run(Q, K, V, O);
    bool nan_row = false;
    for (index_t d = 0; d < D; ++d) nan_row = nan_row || std::isnan(O(0, 0, row, d));
    EXPECT_TRUE(nan_row) << "a NaN query became a number";
    for (index_t i = 0; i < row; ++i)  // causal: earlier rows never see it
      for (index_t d = 0; d < D; ++d) ASSERT_TRUE(std::isfinite(O(0, 0, i, d))) << i;

    q[row * D + 3] = 0.5f;
    v[(S * D) + row * D + 1] = std::numeric_limits<float>::infinity();  // head 1, key `row`
    run(Q, K, V, O);
    for (index_t i = 0; i < row; ++i)
      for (index_t d = 0; d < D; ++d) ASSERT_TRUE(std::isfinite(O(0, 1, i, d))) << i;
    bool reached = false;  // rows at or after `row` see the key (its weight is never 0)
    for (index_t i = row; i < S; ++i) reached = reached || !std::isfinite(O(0, 1, i, 1));
    EXPECT_TRUE(reached) << "an Inf value vanished";
  }
}

// NaN/Inf in keys that no query may see never leak: keys HiP's selection leaves out,
// and keys routing puts in no cluster.
TEST(Extremes, UnseenPoisonedKeysNeverLeak) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  {  // HiP, non-causal, small top_k: most keys are in no block's selection
    auto q = normal<float>(H * S * D, 7), k = normal<float>(H * S * D, 8);
    auto v = normal<float>(H * S * D, 9);
    const auto Q = bhsd<const float>(q.data(), 1, H, S, D);
    const auto K = bhsd<const float>(k.data(), 1, H, S, D);
    const auto V = bhsd<const float>(v.data(), 1, H, S, D);
    const hip_options o{.top_k = 8, .block_size_q = 16};
    const auto sel = hip_select(Q, K, o);
    std::vector<float> before(H * S * D), after(H * S * D);
    hip_attention(Q, K, V, bhsd(before.data(), 1, H, S, D), sel, o);
    index_t poisoned = 0;
    for (index_t h = 0; h < H; ++h)
      for (index_t j = 0; j < S; ++j) {
        bool seen = false;
        for (index_t qb = 0; qb < sel.query_blocks; ++qb)
          for (const std::int32_t start : sel.blocks(0, h, qb))
            seen = seen || (j >= start && j < start + 2);
        if (seen) continue;
        k[(h * S + j) * D] = nan;
        v[(h * S + j) * D + 1] = inf;
        ++poisoned;
      }
    ASSERT_GT(poisoned, S);
    hip_attention(Q, K, V, bhsd(after.data(), 1, H, S, D), sel, o);
    EXPECT_EQ(before, after);
  }
  {  // routing with given centroids: keys that join no cluster
    auto q = normal<float>(S * D, 10), k = normal<float>(S * D, 11);
    auto v = normal<float>(S * D, 12);
    const auto Q = bhsd<const float>(q.data(), 1, 1, S, D);
    const auto K = bhsd<const float>(k.data(), 1, 1, S, D);
    const auto V = bhsd<const float>(v.data(), 1, 1, S, D);
    routing_centroids mu(1, 2, D);
    for (index_t c = 0; c < 2; ++c) mu.centroid(0, c)[c] = 1.f;  // two axis directions
    const routing_options o{.num_clusters = 2, .window = 10};
    std::vector<float> before(S * D), after(S * D);
    routing_attention(Q, K, V, bhsd(before.data(), 1, 1, S, D), mu, o);
    // A key joins cluster c if its normalised component c is among the 10 largest.
    std::vector<bool> member(S, false);
    for (index_t c = 0; c < 2; ++c) {
      std::vector<std::pair<float, index_t>> score(S);
      for (index_t j = 0; j < S; ++j) {
        float n = 0;
        for (index_t e = 0; e < D; ++e) n += k[j * D + e] * k[j * D + e];
        score[j] = {-k[j * D + c] / std::sqrt(n), j};
      }
      std::sort(score.begin(), score.end());
      for (index_t m = 0; m < 10; ++m) member[score[m].second] = true;
    }
    for (index_t j = 0; j < S; ++j)
      if (!member[j]) v[j * D + 2] = nan;  // values only: k decides the membership
    routing_attention(Q, K, V, bhsd(after.data(), 1, 1, S, D), mu, o);
    EXPECT_EQ(before, after);
  }
}

}  // namespace fovea::test::extremes_test
