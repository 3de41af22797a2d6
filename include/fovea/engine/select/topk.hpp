// Top-k by radix selection: scores become 64-bit keys (the float's order-preserving bits,
// then the inverted index, so ties go to the lower index and every key is distinct), and
// the k-th largest key is found in a few branch-light byte passes. HiP keeps its best
// halves this way, routing its clusters' members.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>

#include "../../core/tensor_view.hpp"

namespace fovea::detail {

/// A key that orders (score, lower index first) as unsigned integers; NaN ranks highest.
inline std::uint64_t rank_key(float score, index_t index) noexcept {
  const auto bits = std::bit_cast<std::uint32_t>(score);
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  const std::uint32_t ordered = nan ? 0xFFFFFFFFu : (bits >> 31) ? ~bits : bits | 0x80000000u;
  return (std::uint64_t(ordered) << 32) | std::uint32_t(~std::uint32_t(index));
}

/// The k-th largest of n distinct keys (1 <= k <= n). `scratch` holds n keys. Each pass
/// buckets the candidates by the 8 bits just below the bits they all share (scores of
/// one magnitude share their sign and exponent: a fixed first byte would put them all in
/// one bucket) and keeps the bucket holding the k-th.
inline std::uint64_t kth_largest(const std::uint64_t* keys, index_t n, index_t k,
                                 std::uint64_t* scratch) noexcept {
  const std::uint64_t* cand = keys;
  for (;;) {
    std::uint64_t differ = 0;
    for (index_t i = 0; i < n; ++i) differ |= cand[i] ^ cand[0];
    if (differ == 0) return cand[0];  // one key left (keys are distinct)
    const int shift = std::max(0, int(std::bit_width(differ)) - 8);
    index_t count[256] = {};
    for (index_t i = 0; i < n; ++i) ++count[(cand[i] >> shift) & 255];
    index_t bucket = 255, above = 0;
    for (; above + count[bucket] < k; --bucket) above += count[bucket];
    index_t m = 0;
    for (index_t i = 0; i < n; ++i) {
      scratch[m] = cand[i];
      m += ((cand[i] >> shift) & 255) == std::uint64_t(bucket);
    }
    k -= above;
    n = m;
    cand = scratch;
    if (n == k) return *std::min_element(scratch, scratch + n);
    if (k == 1) return *std::max_element(scratch, scratch + n);
  }
}

}  // namespace fovea::detail
