// HiP's int8 scores (dot_int8): within the quantisation bound of the f64 dot product for
// every row and column count the search uses, zero rows score zero, and a NaN or Inf in a
// key or query row makes its scores NaN (the search then selects that block). Built where
// the compiler targets AVX512-VNNI (the native executable on such a CPU).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fovea/engine/select/score_int8.hpp>
#include <limits>
#include <string>
#include <vector>

#include "../../common/random.hpp"

namespace fovea::test::score_int8_test {

#if FOVEA_HAS_INT8_DOT

/// Scores of `rows` keys against `columns` queries (both D long) through dot_int8.
struct int8_case {
  index_t rows, columns, D;
  std::vector<float> k, q, s;
  std::vector<float> k_scale, q_scale;

  int8_case(index_t rows_, index_t columns_, index_t D_, std::uint64_t seed)
      : rows(rows_),
        columns(columns_),
        D(D_),
        k(normal<float>(rows_ * D_, seed)),
        q(normal<float>(columns_ * D_, seed + 1, 2.0)) {}

  void run() {
    const index_t ld = (columns + 15) / 16 * 16, quads = detail::int8_quads(D);
    const index_t words = detail::int8_row_words(D);
    std::vector<std::uint32_t> keys(rows * words), q_quads(quads * ld), scratch(quads);
    std::vector<const std::uint32_t*> row(rows);
    q_scale.assign(ld, 0.f);
    k_scale.resize(rows);
    for (index_t r = 0; r < rows; ++r) {
      detail::quantise_key_int8(k.data() + r * D, D, keys.data() + r * words);
      std::memcpy(&k_scale[r], keys.data() + r * words + quads, sizeof(float));
      row[r] = keys.data() + r * words;
    }
    for (index_t c = 0; c < ld; ++c)  // padding columns repeat the last query
      q_scale[c] = detail::quantise_query_int8(q.data() + std::min(c, columns - 1) * D, D,
                                               q_quads.data(), ld, c, scratch.data());
    s.assign(rows * ld, -7.f);
    detail::dot_int8(rows, ld / 16, row.data(), q_quads.data(), ld, q_scale.data(), quads, s.data(),
                     ld);
  }
  float score(index_t r, index_t c) const { return s[r * ((columns + 15) / 16 * 16) + c]; }
};

/// Every score within the quantisation bound of the f64 dot product.
void expect_within_the_bound(const int8_case& t) {
  const index_t D = t.D;
  for (index_t r = 0; r < t.rows; ++r)
    for (index_t c = 0; c < t.columns; ++c) {
      double exact = 0, k1 = 0, q1 = 0;
      for (index_t d = 0; d < D; ++d) {
        exact += double(t.k[r * D + d]) * t.q[c * D + d];
        k1 += std::abs(t.k[r * D + d]);
        q1 += std::abs(t.q[c * D + d]);
      }
      // Each element is off by at most half a step of its row's scale; a tiny row against
      // a tiny column underflows the float score (the 1e-44 floor, a few subnormal steps).
      const double ks = t.k_scale[r], qs = t.q_scale[c];
      const double bound =
          0.5 * (ks * q1 + qs * k1) + 0.25 * D * ks * qs + 1e-5 * k1 * q1 + 1e-44;
      ASSERT_NEAR(t.score(r, c), exact, bound) << "row " << r << " column " << c;
    }
}

TEST(ScoreInt8, WithinTheQuantisationBound) {
  std::uint64_t seed = 40;
  for (const index_t D : {1, 7, 64, 100, 128, 256})
    for (const index_t rows : {1, 5, 8, 13, 30})
      for (const index_t columns : {1, 16, 32, 40, 64}) {
        SCOPED_TRACE("D=" + std::to_string(D) + " rows=" + std::to_string(rows) +
                     " columns=" + std::to_string(columns));
        int8_case t(rows, columns, D, seed += 2);
        t.run();
        expect_within_the_bound(t);
      }
}

// Rows below ~3.7e-37 have scales whose reciprocal overflows: quantised by division, their
// zeros stay 0 (not 0 * inf = NaN, read as -128) and the rest keep their steps.
TEST(ScoreInt8, TinyRowsKeepTheirValues) {
  int8_case t(5, 16, 64, 9);
  for (index_t i = 64; i < 3 * 64; ++i) t.k[i] *= 5e-38f;
  t.k[64 + 3] = 0;
  for (index_t i = 0; i < 64; ++i) t.q[i] *= 5e-38f;
  t.q[10] = 0;
  t.run();
  expect_within_the_bound(t);
}

TEST(ScoreInt8, ZeroRowsScoreZeroAndPoisonedRowsScoreNaN) {
  int8_case t(6, 16, 64, 7);
  for (index_t d = 0; d < 64; ++d) t.k[1 * 64 + d] = 0.f;  // key 1: zeros
  t.k[2 * 64 + 5] = std::numeric_limits<float>::quiet_NaN();
  t.k[3 * 64 + 63] = std::numeric_limits<float>::infinity();
  t.q[4 * 64 + 0] = std::numeric_limits<float>::quiet_NaN();  // query column 4
  t.run();
  for (index_t c = 0; c < 16; ++c) {
    if (c != 4) {
      EXPECT_EQ(t.score(1, c), 0.f);
      EXPECT_TRUE(std::isfinite(t.score(0, c)));
    }
    EXPECT_TRUE(std::isnan(t.score(2, c))) << c;
    EXPECT_TRUE(std::isnan(t.score(3, c))) << c;
  }
  for (index_t r = 0; r < 6; ++r) EXPECT_TRUE(std::isnan(t.score(r, 4))) << r;
}

#endif

}  // namespace fovea::test::score_int8_test
