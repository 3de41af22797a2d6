// The online-softmax state: tile-by-tile updates equal one softmax over all keys, the
// -inf rows stay exactly zero, and finish_row handles sinks.
#include <gtest/gtest.h>

#include <cmath>
#include <fovea/engine/dense/online_softmax.hpp>
#include <limits>
#include <vector>

#include "../../common/configs.hpp"
#include "../../common/random.hpp"

namespace fovea::test::online_softmax_test {

template <class C>
class OnlineSoftmax : public ::testing::Test {};
TYPED_TEST_SUITE(OnlineSoftmax, configs, config_names);

TYPED_TEST(OnlineSoftmax, TilesEqualOneSoftmax) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  constexpr int W = detail::vec<T, Backend>::width;
  constexpr T inf = std::numeric_limits<T>::infinity();
  const index_t keys = 50, ld = W;
  auto s = normal<T>(keys * ld, 1, 3.0);
  for (index_t j = 0; j < keys; ++j) s[j * ld + 0] = -inf;  // column 0 sees nothing
  if (W > 1)
    for (index_t j = 0; j < 30; ++j) s[j * ld + 1] = -inf;  // column 1 only late keys
  std::vector<T> p(keys * ld), m(W, -inf), l(W, 0), alpha(W);
  std::vector<T> weighted(W, 0);  // sum p * (j + 1), rescaled as the engine does
  for (index_t j0 = 0; j0 < keys; j0 += 16) {
    const index_t n = std::min<index_t>(16, keys - j0);
    detail::online_softmax_update<T, Backend, 1>(s.data() + j0 * ld, p.data() + j0 * ld, ld, n,
                                                 m.data(), l.data(), alpha.data());
    for (int c = 0; c < W; ++c) {
      weighted[c] *= alpha[c];
      for (index_t j = j0; j < j0 + n; ++j) weighted[c] += p[j * ld + c] * T(j + 1);
    }
  }
  for (int c = 0; c < W; ++c) {
    double mx = -INFINITY, sum = 0, ws = 0;
    for (index_t j = 0; j < keys; ++j) mx = std::max(mx, double(s[j * ld + c]));
    for (index_t j = 0; j < keys; ++j)
      if (s[j * ld + c] != -inf)
        sum += std::exp(s[j * ld + c] - mx), ws += std::exp(s[j * ld + c] - mx) * (j + 1);
    const auto r = detail::finish_row<T>(m[c], l[c], -inf);
    if (c == 0) {
      EXPECT_EQ(l[c], T(0));
      EXPECT_EQ(weighted[c], T(0));
      EXPECT_EQ(r.factor, T(0));
      EXPECT_EQ(r.lse, -inf);
    } else {
      EXPECT_NEAR(double(weighted[c] * r.factor), ws / sum, 1e-4);
      EXPECT_NEAR(double(r.lse), mx + std::log(sum), 1e-5);
    }
  }
}

TEST(FinishRow, SinkJoinsTheDenominatorOnly) {
  // One key with logit 1 (m = 1, l = 1) and a sink with logit 0.
  const auto r = detail::finish_row(1.0, 1.0, 0.0);
  EXPECT_NEAR(r.factor,
              std::exp(1.0) / (std::exp(1.0) + 1.0) / 1.0 * std::exp(-1.0) * std::exp(1.0), 1e-15);
  EXPECT_NEAR(r.lse, std::log(std::exp(1.0) + 1.0), 1e-15);
  const auto none = detail::finish_row<double>(-INFINITY, 0.0, 2.0);
  EXPECT_EQ(none.factor, 0.0);
  EXPECT_EQ(none.lse, 2.0);
  EXPECT_TRUE(std::isnan(detail::finish_row<double>(std::nan(""), std::nan(""), -INFINITY).factor));
}

}  // namespace fovea::test::online_softmax_test
