// FlashAttention's tolerance rule: the kernel's largest error against the f64 oracle may
// be at most twice the largest error of a naive computation in the kernel's own precision
// on the same inputs, plus a small floor. NaN must sit exactly where the oracle has NaN;
// infinities must match.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace fovea::test {

template <class T>
constexpr double tolerance_floor() {
  return std::is_same_v<T, float> ? 2e-6 : 1e-13;
}

inline double max_abs_error(const std::vector<double>& got, const std::vector<double>& want) {
  double e = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    if (std::isfinite(want[i]) && std::isfinite(got[i]))
      e = std::max(e, std::abs(got[i] - want[i]));
  return e;
}

inline double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double e : x)
    if (std::isfinite(e)) m = std::max(m, std::abs(e));
  return m;
}

/// The recurrences' measure (their chunked forms and a token loop round differently by
/// design, so there is no naive counterpart): the largest error over the finite elements
/// of the reference, relative to its largest finite magnitude; infinity when `got` is not
/// finite where `want` is, or (with `nan_pattern`) the NaN patterns differ.
inline double relative_error(const std::vector<double>& got, const std::vector<double>& want,
                             bool nan_pattern = true) {
  double err = 0, mag = 1e-30;
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (nan_pattern && std::isnan(want[i]) != std::isnan(got[i])) return INFINITY;
    if (!std::isfinite(want[i])) continue;
    if (!std::isfinite(got[i])) return INFINITY;
    err = std::max(err, std::abs(got[i] - want[i]));
    mag = std::max(mag, std::abs(want[i]));
  }
  return err / mag;
}

/// `got` is finite exactly where `want` is (and NaN where it is NaN, with `nan_too`).
inline ::testing::AssertionResult same_finite_pattern(const std::vector<double>& got,
                                                      const std::vector<double>& want,
                                                      bool nan_too) {
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (std::isfinite(got[i]) != std::isfinite(want[i]))
      return ::testing::AssertionFailure() << "element " << i << ": " << got[i] << ", reference "
                                           << want[i];
    if (nan_too && std::isnan(got[i]) != std::isnan(want[i]))
      return ::testing::AssertionFailure() << "element " << i << ": " << got[i] << ", reference "
                                           << want[i];
  }
  return ::testing::AssertionSuccess();
}

/// Checks `got` against the oracle `want`, allowing 2x the naive error + floor * scale.
template <class T>
::testing::AssertionResult within_tolerance(const std::vector<double>& got,
                                            const std::vector<double>& want,
                                            const std::vector<double>& naive,
                                            double floor = tolerance_floor<T>()) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size mismatch";
  for (std::size_t i = 0; i < got.size(); ++i) {
    const bool got_nan = std::isnan(got[i]), want_nan = std::isnan(want[i]);
    if (got_nan != want_nan)
      return ::testing::AssertionFailure()
             << "element " << i << ": got " << got[i] << ", oracle " << want[i];
    if (std::isinf(want[i]) || std::isinf(got[i]))
      if (got[i] != want[i])
        return ::testing::AssertionFailure()
               << "element " << i << ": got " << got[i] << ", oracle " << want[i];
  }
  const double allowed = 2 * max_abs_error(naive, want) + floor * std::max(1.0, max_abs(want));
  const double err = max_abs_error(got, want);
  if (err <= allowed) return ::testing::AssertionSuccess();
  std::size_t worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    if (std::isfinite(want[i]) && std::abs(got[i] - want[i]) == err) worst = i;
  return ::testing::AssertionFailure()
         << "max error " << err << " > allowed " << allowed << " (element " << worst << ": got "
         << got[worst] << ", oracle " << want[worst] << ")";
}

}  // namespace fovea::test
