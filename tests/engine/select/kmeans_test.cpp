// k-means for routing: a row holding NaN must neither capture the argmax nor move a
// centroid, so one poisoned token cannot pull every token into one cluster.
#include <gtest/gtest.h>

#include <algorithm>
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

/// balanced_members: per cluster, the w rows of highest score as floats (ties to the lower
/// row, NaN highest, -0 just below +0 as order_key has them), in row order; checked
/// against a sort over (score, row), with many ties, NaN, rows not a multiple of the
/// vector width, w = 1 and w = n.
TEST(KMeans, BalancedMembersAreTheTopRowsLowerRowFirst) {
  std::uint64_t seed = 3;
  for (index_t n : {1, 5, 16, 17, 100, 1000})
    for (index_t w : {index_t(1), index_t(3), n / 2, n}) {
      if (w < 1 || w > n) continue;
      for (int distinct : {2, 10, 1 << 20}) {
        const index_t clusters = 3, ld = n + 7;
        auto scores = normal<float>(clusters * ld, ++seed);
        for (float& x : scores) x = std::round(x * float(distinct)) / float(distinct);
        if (n > 4) scores[2] = nan, scores[ld + n - 1] = -nan;
        std::vector<index_t> got(clusters * w);
        std::vector<std::uint32_t> keys(2 * n);
        detail::balanced_members<float, default_backend>(scores.data(), n, clusters, ld, w,
                                                         got.data(), keys.data());
        for (index_t c = 0; c < clusters; ++c) {
          std::vector<index_t> rows(n);
          for (index_t r = 0; r < n; ++r) rows[r] = r;
          auto higher = [&](index_t a, index_t b) {
            const float x = scores[c * ld + a], y = scores[c * ld + b];
            if (std::isnan(x) != std::isnan(y)) return std::isnan(x);
            if (!std::isnan(x) && x != y) return x > y;
            if (x == 0 && std::signbit(x) != std::signbit(y)) return std::signbit(y);
            return a < b;
          };
          std::stable_sort(rows.begin(), rows.end(), higher);
          std::vector<index_t> want(rows.begin(), rows.begin() + w);
          std::sort(want.begin(), want.end());
          EXPECT_EQ(std::vector<index_t>(got.begin() + c * w, got.begin() + (c + 1) * w), want)
              << "n " << n << " w " << w << " distinct " << distinct << " cluster " << c;
        }
      }
    }
}

}  // namespace fovea::test::kmeans_test
