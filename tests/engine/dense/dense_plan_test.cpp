// The dense engine's plan: which tasks a call is cut into depends on the shapes alone;
// every (tile, chunk) of every problem is one task, each tile with chunk states has one
// merge, and decode's key chunks follow decode_chunk_keys (by the call's shapes, never
// its threads).
#include <gtest/gtest.h>

#include <fovea/fovea.hpp>
#include <set>
#include <tuple>
#include <vector>

namespace fovea::test::dense_plan_test {

using detail::dense_problem;

dense_problem<float> problem(const std::vector<float>& q, const std::vector<float>& kv,
                             std::vector<float>& out, index_t B, index_t H, index_t Hk, index_t Sq,
                             index_t Sk, index_t D) {
  return detail::make_softmax_problem<float>(
      bhsd<const float>(q.data(), B, H, Sq, D), bhsd<const float>(kv.data(), B, Hk, Sk, D),
      bhsd<const float>(kv.data(), B, Hk, Sk, D), bhsd(out.data(), B, H, Sq, D), {});
}

/// Every (problem, b, head, tile, chunk) exactly once; merges exactly the tiles whose
/// states wait for one (decode tiles, split prefill tiles).
void expect_covering(const detail::dense_plan& plan) {
  std::set<std::tuple<index_t, index_t, index_t, index_t, index_t>> seen;
  for (const auto& t : plan.work)
    EXPECT_TRUE(seen.insert({t.problem, t.b, t.head, t.tile, t.chunk}).second) << "twice";
  std::set<std::tuple<index_t, index_t, index_t, index_t>> merged;
  for (const auto& t : plan.merges)
    EXPECT_TRUE(merged.insert({t.problem, t.b, t.head, t.tile}).second) << "merged twice";
  std::vector<index_t> chunks_of(plan.merges.size(), 0);
  for (const auto& t : plan.work) {
    const auto& lay = plan.layouts[t.problem];
    EXPECT_LT(t.chunk, lay.chunks);
    EXPECT_LT(t.tile, lay.tiles);
    const bool waits = lay.decode || lay.chunks > 1;
    EXPECT_EQ(waits, merged.count({t.problem, t.b, t.head, t.tile}) == 1);
    // The task names the merge of its own tile (run by whichever chunk finishes last).
    ASSERT_EQ(waits, t.merge >= 0);
    if (!waits) continue;
    ASSERT_LT(t.merge, index_t(plan.merges.size()));
    const auto& m = plan.merges[std::size_t(t.merge)];
    EXPECT_EQ(std::tuple(m.problem, m.b, m.head, m.tile, m.partials),
              std::tuple(t.problem, t.b, t.head, t.tile, t.partials));
    ++chunks_of[std::size_t(t.merge)];
  }
  for (std::size_t m = 0; m < plan.merges.size(); ++m)
    EXPECT_EQ(chunks_of[m], plan.layouts[plan.merges[m].problem].chunks) << "merge " << m;
}

TEST(DensePlan, DecodeChunksKeysByShapeOnly) {
  // Enough chunks of >= 512 keys per column tile for 64 tasks in the call, at most 64
  const index_t D = 16;
  for (const auto& [B, H, Hk] : {std::tuple<index_t, index_t, index_t>{2, 8, 2}, {1, 32, 8}, {1, 16, 1}, {4, 64, 16}}) {
    for (index_t sk : {1, 511, 512, 513, 1024, 32768, 40000}) {
      SCOPED_TRACE(testing::Message() << "B=" << B << " H=" << H << " Hk=" << Hk << " Sk=" << sk);
      std::vector<float> q(B * H * D), kv(B * Hk * sk * D), out(B * H * D);
      const auto pr = problem(q, kv, out, B, H, Hk, 1, sk, D);
      const auto plan = detail::plan_dense<default_backend>(std::span(&pr, 1));
      const auto& lay = plan.layouts[0];
      ASSERT_EQ(lay.tiles, 1);  // H / Hk columns fit one tile
      const index_t tiles = B * Hk, wanted = std::min<index_t>(64, (64 + tiles - 1) / tiles);
      const index_t chunk = std::max<index_t>(512, ((sk + wanted - 1) / wanted + 255) / 256 * 256);
      EXPECT_EQ(lay.chunk_keys, chunk);
      EXPECT_EQ(lay.chunks, (sk + chunk - 1) / chunk);
      EXPECT_LE(lay.chunks, 64);
      if (sk % (wanted * 256) == 0 && sk / wanted >= 512) {  // threads share any head count
        EXPECT_EQ(index_t(plan.work.size()), std::max<index_t>(64, tiles));
      }
      EXPECT_EQ(lay.columns, H / Hk);  // the group's heads stacked as columns
      EXPECT_EQ(index_t(plan.work.size()), B * Hk * lay.tiles * lay.chunks);
      EXPECT_EQ(index_t(plan.merges.size()), B * Hk * lay.tiles);
      expect_covering(plan);
    }
  }
}

TEST(DensePlan, DecodeWithManyHeadsPerKvHeadRunsThePrefillTile) {
  const index_t D = 16, Sk = 2000;
  constexpr index_t BQ = detail::tile_traits<float, default_backend>::block_q;
  for (const auto& [H, Sq] : {std::pair<index_t, index_t>{16, 1}, {32, 1}, {64, 1}, {8, 4}, {128, 1}, {16, 16}}) {
    SCOPED_TRACE("H " + std::to_string(H) + " Sq " + std::to_string(Sq));
    std::vector<float> q(H * Sq * D), kv(Sk * D), out(H * Sq * D);
    const auto pr = problem(q, kv, out, 1, H, 1, Sq, Sk, D);
    const auto plan = detail::plan_dense<default_backend>(std::span(&pr, 1));
    const auto& lay = plan.layouts[0];
    EXPECT_TRUE(lay.decode);
    EXPECT_EQ(lay.gemm, H * Sq >= detail::decode_gemm_columns);
    if (lay.gemm) {
      EXPECT_EQ(lay.width, BQ);
    }
    EXPECT_EQ(lay.tiles, (H * Sq + lay.width - 1) / lay.width);
    expect_covering(plan);
  }
}

TEST(DensePlan, PrefillSplitsKeysOnlyForFewTilesOverManyKeys) {
  const index_t D = 8;
  {  // one tile of queries over 8192 keys: split into chunks, merged
    std::vector<float> q(40 * D), kv(8192 * D), out(40 * D);
    const auto pr = problem(q, kv, out, 1, 1, 1, 40, 8192, D);
    const auto plan = detail::plan_dense<default_backend>(std::span(&pr, 1));
    EXPECT_GT(plan.layouts[0].chunks, 1);
    EXPECT_FALSE(plan.merges.empty());
    EXPECT_GT(plan.partial_total, 0);
    expect_covering(plan);
  }
  {  // many tiles: one task per tile, no merge
    std::vector<float> q(4 * 2048 * D), kv(2048 * D), out(4 * 2048 * D);
    const auto pr = problem(q, kv, out, 1, 4, 1, 2048, 2048, D);
    const auto plan = detail::plan_dense<default_backend>(std::span(&pr, 1));
    EXPECT_EQ(plan.layouts[0].chunks, 1);
    EXPECT_TRUE(plan.merges.empty());
    EXPECT_EQ(index_t(plan.work.size()), 4 * plan.layouts[0].tiles);
    EXPECT_EQ(plan.work.front().tile, plan.layouts[0].tiles - 1);  // longest tiles first
    expect_covering(plan);
  }
}

TEST(DensePlan, EmptyProblemsHaveNoWork) {
  std::vector<float> q(1), kv(1), out(1);
  const auto pr = problem(q, kv, out, 1, 1, 1, 0, 5, 1);
  EXPECT_TRUE(detail::plan_dense<default_backend>(std::span(&pr, 1)).work.empty());
}

}  // namespace fovea::test::dense_plan_test
