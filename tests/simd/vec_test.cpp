// The vector API: every operation, for every configuration, against plain C++.
#include <gtest/gtest.h>

#include <cmath>
#include <fovea/fovea.hpp>
#include <limits>
#include <vector>

#include "../common/configs.hpp"

namespace fovea::test {
namespace {

template <class C>
class VectorApi : public ::testing::Test {};
TYPED_TEST_SUITE(VectorApi, configs, config_names);

TYPED_TEST(VectorApi, ArithmeticReductionsAndSelect) {
  using T = typename TypeParam::value_type;
  using V = detail::vec<T, typename TypeParam::backend>;
  constexpr int W = V::width;
  std::vector<T> a(W), b(W), c(W), out(W);
  for (int i = 0; i < W; ++i) a[i] = T(i) - T(2.5), b[i] = T(0.5) * T(i + 1), c[i] = T(3 - i);
  const auto va = V::load(a.data()), vb = V::load(b.data()), vc = V::load(c.data());
  V::store(out.data(), V::fma(va, vb, vc));
  for (int i = 0; i < W; ++i) EXPECT_NEAR(out[i], a[i] * b[i] + c[i], 1e-6);
  V::store(out.data(), V::max(va, vc));
  for (int i = 0; i < W; ++i) EXPECT_EQ(out[i], std::max(a[i], c[i]));
  V::store(out.data(), V::select(V::equal(va, vc), vb, va));
  for (int i = 0; i < W; ++i) EXPECT_EQ(out[i], a[i] == c[i] ? b[i] : a[i]);
  T sum = 0, mx = a[0];
  for (int i = 0; i < W; ++i) sum += a[i], mx = std::max(mx, a[i]);
  EXPECT_NEAR(V::reduce_add(va), sum, 1e-6);
  EXPECT_EQ(V::reduce_max(va), mx);
  V::store(out.data(), V::iota(T(7)));
  for (int i = 0; i < W; ++i) EXPECT_EQ(out[i], T(7 + i));
  EXPECT_TRUE(V::any(V::equal(va, va)));
  EXPECT_FALSE(V::any(V::not_equal(va, va)));
  // IEEE comparisons on every backend: NaN equals nothing and differs from everything
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const auto vn = V::broadcast(nan), vinf = V::broadcast(-std::numeric_limits<T>::infinity());
  EXPECT_FALSE(V::any(V::equal(vn, vn)));
  EXPECT_TRUE(V::all(V::not_equal(vn, vn)));
  EXPECT_TRUE(V::all(V::not_equal(vn, vinf)));
  EXPECT_TRUE(V::all(V::not_equal(vinf, vn)));
  EXPECT_FALSE(V::any(V::not_equal(vinf, vinf)));
}

TYPED_TEST(VectorApi, ExpAndTanhOverTheirRange) {
  using T = typename TypeParam::value_type;
  using V = detail::vec<T, typename TypeParam::backend>;
  constexpr int W = V::width;
  constexpr T inf = std::numeric_limits<T>::infinity();
  const double rel = std::is_same_v<T, float> ? 4e-7 : 1e-15;
  std::vector<T> x(W), out(W);
  for (T start = T(-120); start < T(80); start += T(0.37) * W) {
    for (int i = 0; i < W; ++i) x[i] = start + T(0.37) * T(i);
    V::store(out.data(), V::exp(V::load(x.data())));
    for (int i = 0; i < W; ++i) {
      const double want = std::exp(double(x[i]));
      if (want > double(std::numeric_limits<T>::min())) {
        EXPECT_NEAR(out[i], want, rel * want * 2) << "exp(" << x[i] << ")";
      }
    }
    V::store(out.data(), V::tanh(V::load(x.data())));
    for (int i = 0; i < W; ++i)
      EXPECT_NEAR(out[i], std::tanh(double(x[i])), 2e-6) << "tanh(" << x[i] << ")";
  }
  // The values the online softmax relies on.
  for (T special : {-inf, T(-1e30), T(0)}) {
    V::store(out.data(), V::exp(V::broadcast(special)));
    EXPECT_EQ(out[0], special == T(0) ? T(1) : T(0)) << "exp(" << special << ")";
  }
  V::store(out.data(), V::exp(V::broadcast(std::numeric_limits<T>::quiet_NaN())));
  EXPECT_TRUE(std::isnan(out[0]));
}

}  // namespace
}  // namespace fovea::test

namespace fovea::test {
namespace {

TYPED_TEST(VectorApi, ReduceAddLanesPutsRowSumsInOrder) {
  using T = typename TypeParam::value_type;
  using V = detail::vec<T, typename TypeParam::backend>;
  constexpr int W = V::width;
  typename V::type rows[W];
  std::vector<T> row(W);
  for (int r = 0; r < W; ++r) {
    for (int i = 0; i < W; ++i) row[i] = T(r + 1) * T(i == (r * 7) % W ? 100 : 1);
    rows[r] = V::load(row.data());
  }
  std::vector<T> out(W);
  V::store(out.data(), V::reduce_add_lanes(rows));
  for (int r = 0; r < W; ++r) EXPECT_EQ(out[r], T(r + 1) * T(W - 1 + 100)) << "lane " << r;
}

TYPED_TEST(VectorApi, TransposeBlockMovesEveryElement) {
  using T = typename TypeParam::value_type;
  constexpr int W = detail::vec<T, typename TypeParam::backend>::width;
  constexpr index_t ld = W + 3;  // rows of the destination further apart than W
  std::vector<std::vector<T>> src(W, std::vector<T>(W));
  const T* rows[W];
  for (int c = 0; c < W; ++c) {
    for (int i = 0; i < W; ++i) src[c][i] = T(100 * c + i);
    rows[c] = src[c].data();
  }
  std::vector<T> dst(W * ld, T(-1));
  detail::transpose_block<T, typename TypeParam::backend>(rows, dst.data(), ld);
  for (int i = 0; i < W; ++i) {
    for (int c = 0; c < W; ++c) EXPECT_EQ(dst[i * ld + c], T(100 * c + i)) << i << "," << c;
    for (index_t c = W; c < ld; ++c) EXPECT_EQ(dst[i * ld + c], T(-1)) << "written past the block";
  }
}

}  // namespace
}  // namespace fovea::test
