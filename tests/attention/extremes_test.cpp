// Numerical extremes for every kernel: logits around 1e4 stay finite, NaN in a visible
// query row and Inf in a visible value propagate to the rows they reach (never silently
// become numbers), and results stay finite elsewhere.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <fovea/fovea.hpp>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "../common/random.hpp"

namespace fovea::test {
namespace {

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

}  // namespace
}  // namespace fovea::test
