// The vector API: every operation, for every configuration, against plain C++.
#include <gtest/gtest.h>

#include <cmath>
#include <fovea/fovea.hpp>
#include <limits>
#include <vector>

#include "../common/configs.hpp"

namespace fovea::test::vec_test {

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

}  // namespace fovea::test::vec_test

namespace fovea::test::vec_test {

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

#if FOVEA_HAS_BF16_DOT
// bf16 pairs (AVX512-BF16): rows rounded to nearest even as Eigen's bfloat16 rounds them,
// interleaved pair by pair, nothing written past n; and the micro-kernel's vdpbf16ps
// products equal fp32 sums of the same bf16 products.
TEST(Bf16Pairs, InterleaveRoundsAndStopsAtN) {
  for (const index_t n : {1, 5, 16, 21, 64}) {
    std::vector<float> first(n), second(n);
    for (index_t i = 0; i < n; ++i) {
      first[i] = 1.0f + float(i) / 3.0f;        // not bf16 values: rounded
      second[i] = -0.001f * float(i * i + 1);
    }
    first[0] = std::numeric_limits<float>::quiet_NaN();
    std::vector<detail::bf16_pair> from_float(n + 3, {0xDEADBEEF}), from_bf16(n + 3, {0xDEADBEEF}),
        alone(n + 3, {0xDEADBEEF});
    std::vector<bfloat16> first16(first.begin(), first.end()), second16(second.begin(), second.end());
    detail::interleave_bf16_pairs(first.data(), second.data(), n, from_float.data());
    detail::interleave_bf16_pairs(first16.data(), second16.data(), n, from_bf16.data());
    detail::interleave_bf16_pairs(first.data(), nullptr, n, alone.data());
    auto bits = [](bfloat16 x) { return std::uint32_t(Eigen::numext::bit_cast<std::uint16_t>(x)); };
    for (index_t i = 0; i < n; ++i) {
      SCOPED_TRACE("n " + std::to_string(n) + " i " + std::to_string(i));
      if (i == 0) {  // NaN stays NaN (quieted), in the low half
        EXPECT_EQ(from_float[0].bits & 0x7F80u, 0x7F80u);
        EXPECT_NE(from_float[0].bits & 0x7Fu, 0u);
        EXPECT_EQ(from_float[0].bits >> 16, bits(second16[0]));
        continue;
      }
      EXPECT_EQ(from_float[i].bits, bits(first16[i]) | bits(second16[i]) << 16);
      EXPECT_EQ(from_bf16[i].bits, bits(first16[i]) | bits(second16[i]) << 16);
      EXPECT_EQ(alone[i].bits, bits(first16[i]));
    }
    for (index_t i = n; i < n + 3; ++i) {
      EXPECT_EQ(from_float[i].bits, 0xDEADBEEFu) << "written past n";
      EXPECT_EQ(from_bf16[i].bits, 0xDEADBEEFu) << "written past n";
      EXPECT_EQ(alone[i].bits, 0xDEADBEEFu) << "written past n";
    }
  }
}

TEST(Bf16Pairs, MicroKernelSumsThePairProducts) {
  using Backend = default_backend;
  constexpr int Rows = 3, Vectors = 2, W = 16;
  const index_t depth = 5;  // pairs
  std::vector<bfloat16> a(Rows * 2 * depth + 1), b(depth * 2 * Vectors * W);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = bfloat16(std::sin(float(i)) * 4.0f);
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = bfloat16(std::cos(float(3 * i)));
  // B as pair rows: pair (p, n) = (b[2p][n], b[2p + 1][n]); A rows start at an odd element
  std::vector<detail::bf16_pair> bp(depth * Vectors * W);
  for (index_t p = 0; p < depth; ++p)
    detail::interleave_bf16_pairs(&b[(2 * p) * Vectors * W], &b[(2 * p + 1) * Vectors * W],
                                  Vectors * W, &bp[p * Vectors * W]);
  const bfloat16* rows = a.data() + 1;
  struct odd_rows {
    const bfloat16* a;
    const detail::bf16_pair* operator()(index_t r) const noexcept {
      return reinterpret_cast<const detail::bf16_pair*>(a + r * 2 * depth);
    }
  };
  std::vector<float> c(Rows * Vectors * W, 1.0f);
  detail::gemm_rows<float, Backend, Rows, Vectors, true>(Rows, odd_rows{rows}, 1, bp.data(),
                                                         Vectors * W, c.data(), Vectors * W, depth);
  for (int r = 0; r < Rows; ++r)
    for (int n = 0; n < Vectors * W; ++n) {
      double want = 1;
      for (index_t k = 0; k < 2 * depth; ++k)
        want += double(float(rows[r * 2 * depth + k])) * double(float(b[k * Vectors * W + n]));
      EXPECT_NEAR(c[r * Vectors * W + n], want, 1e-5 * (1 + std::abs(want))) << r << "," << n;
    }
}
#endif

}  // namespace fovea::test::vec_test
