// k-means for routing: a row holding NaN must neither capture the argmax nor move a
// centroid, so one poisoned token cannot pull every token into one cluster.
#include <gtest/gtest.h>

#include <cmath>
#include <fovea/fovea.hpp>
#include <limits>
#include <vector>

#include "../../common/random.hpp"

namespace fovea::test::kmeans_test {

constexpr float nan = std::numeric_limits<float>::quiet_NaN();

TEST(KMeans, ArgmaxPassesOverNaN) {
  const float scores[] = {nan, 0.5f, 2.f, 1.f,  // the max is column 2
                          nan, nan,  nan, nan,  // nothing to choose: cluster 0
                          3.f, nan,  1.f, 4.f};
  index_t assignment[3];
  detail::assign_rows<float, default_backend>(scores, 3, 4, 4, assignment);
  EXPECT_EQ(assignment[0], 2);
  EXPECT_EQ(assignment[1], 0);
  EXPECT_EQ(assignment[2], 3);
}

TEST(KMeans, APoisonedRowMovesNoCentroid) {
  const index_t n = 200, d = 8, clusters = 4;
  const auto raw = normal<float>(n * d, 1);
  std::vector<float> x(n * d);
  detail::normalized_rows<float, default_backend>(raw.data(), d, n, d, x.data());
  x[37 * d + 2] = nan;  // one poisoned token
  std::vector<float> mu(clusters * d), scores(n * 16), mu_t(d * 16), sums(clusters * d);
  std::vector<index_t> assignment(n), counts(clusters), picks(n);
  for (std::uint64_t seed = 0; seed < 20; ++seed) {  // some seeds pick the poisoned row
    detail::seeded_centroids<float, default_backend>(x.data(), n, d, clusters, 3, seed, mu.data(),
                                                     scores.data(), mu_t.data(), sums.data(),
                                                     assignment.data(), counts.data(), picks.data());
    for (float m : mu) ASSERT_TRUE(std::isfinite(m)) << "seed " << seed;
    index_t in_first = 0;
    for (index_t r = 0; r < n; ++r) in_first += assignment[r] == assignment[0];
    EXPECT_LT(in_first, n) << "every row in one cluster, seed " << seed;
  }
}

}  // namespace fovea::test::kmeans_test
