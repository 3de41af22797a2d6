// tensor_view, the layout factories and the overlap checks.
#include <gtest/gtest.h>

#include <array>
#include <fovea/fovea.hpp>
#include <vector>

namespace fovea::tensor_view_test {

TEST(TensorView, BhsdAndBshdAddressTheSameLogicalElement) {
  std::vector<float> mem(2 * 3 * 5 * 7);
  const auto a = bhsd(mem.data(), 2, 3, 5, 7);
  const auto b = bshd(mem.data(), 2, 5, 3, 7);
  EXPECT_EQ(a.extents(), b.extents());
  EXPECT_EQ(&a(1, 2, 4, 6), mem.data() + ((1 * 3 + 2) * 5 + 4) * 7 + 6);
  EXPECT_EQ(&b(1, 2, 4, 6), mem.data() + ((1 * 5 + 4) * 3 + 2) * 7 + 6);
  EXPECT_EQ(a.required_span_size(), index_t(mem.size()));
  EXPECT_EQ(b.required_span_size(), index_t(mem.size()));
}

TEST(TensorView, ConstConversionAndEmptyViews) {
  std::vector<double> mem(12);
  tensor_view<double, 2> m = view<double, 2>(mem.data(), {3, 4});
  tensor_view<const double, 2> c = m;
  EXPECT_EQ(c.data(), mem.data());
  EXPECT_EQ(c.stride(0), 4);
  EXPECT_EQ((view<double, 2>(nullptr, {0, 4}).required_span_size()), 0);
  EXPECT_TRUE((tensor_view<float, 3>{}.empty()));
}

TEST(TensorView, BroadcastStrideZero) {
  const float row[4] = {1, 2, 3, 4};
  const auto b = view<const float, 4>(row, {2, 8, 1, 4}, {0, 0, 0, 1});
  EXPECT_EQ(b(1, 7, 0, 3), 4.f);
  EXPECT_EQ(b.required_span_size(), 4);
}

TEST(TensorView, OverlapAndOneToOne) {
  std::vector<float> mem(100);
  const auto lo = view<float, 2>(mem.data(), {5, 10});
  const auto hi = view<float, 2>(mem.data() + 50, {5, 10});
  const auto mid = view<float, 2>(mem.data() + 49, {1, 2});
  EXPECT_FALSE(detail::overlaps(lo, hi));
  EXPECT_TRUE(detail::overlaps(lo, mid));
  EXPECT_TRUE(detail::overlaps(hi, mid));
  EXPECT_TRUE(detail::is_one_to_one(lo));
  EXPECT_TRUE(detail::is_one_to_one(bshd(mem.data(), 1, 5, 2, 10)));
  EXPECT_FALSE(detail::is_one_to_one(view<float, 2>(mem.data(), {5, 10}, {5, 1})));
  EXPECT_FALSE(detail::is_one_to_one(view<float, 2>(mem.data(), {5, 10}, {0, 1})));
  EXPECT_TRUE(detail::is_one_to_one(view<float, 2>(mem.data(), {1, 10}, {0, 1})));
}

}  // namespace fovea::tensor_view_test
