// Top-k selection by rank keys: kth_largest (radix passes over every key) and
// streaming_top_k (a bounded buffer cut back to the best k) must find the same bar, with
// NaN ranked highest and ties going to the lower index.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fovea/fovea.hpp>
#include <functional>
#include <limits>
#include <vector>

#include "../../common/random.hpp"

namespace fovea::test::topk_test {

using detail::kth_largest;
using detail::rank_key;
using detail::streaming_top_k;

/// The k-th largest key by sorting.
std::uint64_t sorted_kth(std::vector<std::uint64_t> keys, index_t k) {
  std::sort(keys.begin(), keys.end(), std::greater<>());
  return keys[std::size_t(k - 1)];
}

TEST(TopK, RankKeysOrderScoresThenLowerIndex) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = INFINITY;
  const float order[] = {nan, inf, 3.f, 1e-30f, 0.f, -1e-30f, -2.f, -inf};  // highest first
  for (std::size_t a = 0; a + 1 < std::size(order); ++a)
    EXPECT_GT(rank_key(order[a], 9), rank_key(order[a + 1], 0)) << order[a] << " vs " << order[a + 1];
  EXPECT_GT(rank_key(1.f, 3), rank_key(1.f, 4));  // a tie: the lower index ranks higher
  EXPECT_GT(rank_key(-nan, 5), rank_key(inf, 0));  // a NaN of either sign ranks first
  EXPECT_NE(rank_key(-inf, 0), 0u);                // streaming_top_k needs nonzero keys
}

TEST(TopK, StreamingEqualsRadixForAnyCapacity) {
  std::uint64_t seed = 40;
  for (index_t n : {1, 2, 100, 5000, 70000})
    for (index_t k : {1, 2, 7, 100, 1000, 4096}) {
      if (k > n) continue;
      // Scores with many ties (a few distinct values) or spread out.
      for (bool ties : {false, true}) {
        const auto scores = normal<float>(n, ++seed);
        std::vector<std::uint64_t> keys(n);
        for (index_t j = 0; j < n; ++j)
          keys[j] = rank_key(ties ? std::round(scores[j] * 2.f) : scores[j], j);
        const std::uint64_t expected = sorted_kth(keys, k);
        std::vector<std::uint64_t> scratch(n);
        EXPECT_EQ(kth_largest(keys.data(), n, k, scratch.data()), expected) << "n " << n << " k " << k;
        for (index_t capacity : {k + 1, 2 * k + 3, detail::streaming_capacity(n, k)}) {
          if (capacity <= k) continue;
          std::vector<std::uint64_t> buffer(2 * capacity);
          streaming_top_k best(k, buffer.data(), capacity);
          for (std::uint64_t key : keys) best.push(key);
          EXPECT_EQ(best.seen(), n);
          EXPECT_EQ(best.bar(), expected) << "n " << n << " k " << k << " capacity " << capacity
                                          << (ties ? " ties" : "");
        }
      }
    }
}

/// 32-bit order keys (routing's members) have equal keys: the k-th largest counts each,
/// and the count of larger keys comes with it.
TEST(TopK, RadixOverEqualKeysCountsEachOne) {
  std::uint64_t seed = 90;
  for (index_t n : {1, 2, 15, 16, 17, 300, 5000})
    for (index_t k : {1, 2, 7, 100, 1000}) {
      if (k > n) continue;
      for (int distinct : {1, 3, 50, 1 << 20}) {
        const auto scores = normal<float>(n, ++seed);
        std::vector<std::uint32_t> keys(n), scratch(n);
        for (index_t j = 0; j < n; ++j)
          keys[j] = detail::order_key(std::round(scores[j] * float(distinct)) / float(distinct));
        auto sorted = keys;
        std::sort(sorted.begin(), sorted.end(), std::greater<>());
        index_t greater = -1;
        const std::uint32_t kth = kth_largest(keys.data(), n, k, scratch.data(), &greater);
        EXPECT_EQ(kth, sorted[std::size_t(k - 1)]) << "n " << n << " k " << k << " distinct " << distinct;
        EXPECT_EQ(greater, std::count_if(keys.begin(), keys.end(), [&](std::uint32_t x) { return x > kth; }))
            << "n " << n << " k " << k << " distinct " << distinct;
      }
    }
}

/// The vector lanes' order keys are the scalar order_key's bits, for every special value
/// at every lane.
TEST(TopK, VectorOrderKeysEqualTheScalarTwin) {
  using V = detail::vec<float, default_backend>;
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
                            INFINITY, -INFINITY, 0.f, -0.f, 1e-40f, -1e-40f,
                            std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                            1.f, -1.f, 3.5e-20f, -7.25f};
  std::vector<float> lanes(V::width);
  std::vector<std::uint32_t> got(V::width);
  const auto random = normal<float>(V::width, 7);
  for (float special : specials)
    for (int at = 0; at < V::width; ++at) {
      std::copy(random.begin(), random.end(), lanes.begin());
      lanes[std::size_t(at)] = special;
      V::store_order_keys(got.data(), V::load(lanes.data()));
      for (int i = 0; i < V::width; ++i)
        EXPECT_EQ(got[std::size_t(i)], detail::order_key(lanes[std::size_t(i)])) << special << " at " << at;
    }
  // Order: highest first, NaN of either sign above everything.
  const float order[] = {std::numeric_limits<float>::quiet_NaN(), INFINITY, 3.f, 1e-40f, 0.f,
                         -0.f, -1e-40f, -2.f, -INFINITY};
  for (std::size_t a = 0; a + 1 < std::size(order); ++a)
    EXPECT_GT(detail::order_key(order[a]), detail::order_key(order[a + 1])) << order[a];
  EXPECT_EQ(detail::order_key(-std::numeric_limits<float>::quiet_NaN()), 0xFFFFFFFFu);
}

TEST(TopK, StreamingCapacityBoundsTheBuffer) {
  EXPECT_EQ(detail::streaming_capacity(1 << 20, 1024), 4096);
  EXPECT_EQ(detail::streaming_capacity(1 << 20, 5000), 10000);
  EXPECT_EQ(detail::streaming_capacity(100, 1024), 101);  // never more than all the keys
}

}  // namespace fovea::test::topk_test
