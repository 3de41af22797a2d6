// Top-k by radix selection: scores become 64-bit keys (the float's order-preserving bits,
// then the inverted index, so ties go to the lower index and every key is distinct), and
// the k-th largest key is found in a few branch-light byte passes. HiP keeps its best
// halves this way; routing its clusters' members from the 32-bit order bits alone (made in
// vector lanes), taking the first rows equal to the k-th.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <type_traits>

#include "../../core/tensor_view.hpp"
#include "../../simd/vec.hpp"

namespace fovea::detail {

/// A key that orders (score, lower index first) as unsigned integers; NaN ranks highest.
inline std::uint64_t rank_key(float score, index_t index) noexcept {
  return (std::uint64_t(order_key(score)) << 32) | std::uint32_t(~std::uint32_t(index));
}

/// The k-th largest of n keys (1 <= k <= n; equal keys counted each time they occur), for
/// unsigned 32- or 64-bit keys; `greater`, when given, receives how many keys are larger
/// than it. `scratch` holds n keys. Each pass buckets the candidates by the 8 bits just
/// below the bits they all share (scores of one magnitude share their sign and exponent:
/// a fixed first byte would put them all in one bucket) and keeps the bucket holding the
/// k-th.
template <class Key>
Key kth_largest(const Key* keys, index_t n, index_t k, Key* scratch,
                index_t* greater = nullptr) noexcept {
  static_assert(std::is_same_v<Key, std::uint32_t> || std::is_same_v<Key, std::uint64_t>);
  const Key* cand = keys;
  index_t larger = 0;  // keys above the candidates left
  auto done = [&](Key kth) {
    if (greater) {
      *greater = larger;
      for (index_t i = 0; i < n; ++i) *greater += cand[i] > kth;
    }
    return kth;
  };
  for (;;) {
    // The bits in which the candidates differ: four independent chains, as GCC -O2
    // leaves this reduction unvectorised.
    Key d0 = 0, d1 = 0, d2 = 0, d3 = 0;
    const Key first = cand[0];
    index_t i = 0;
    for (; i + 4 <= n; i += 4) {
      d0 |= cand[i] ^ first;
      d1 |= cand[i + 1] ^ first;
      d2 |= cand[i + 2] ^ first;
      d3 |= cand[i + 3] ^ first;
    }
    for (; i < n; ++i) d0 |= cand[i] ^ first;
    const Key differ = (d0 | d1) | (d2 | d3);
    if (differ == 0) return done(first);  // the candidates left are one value
    const int shift = std::max(0, int(std::bit_width(differ)) - 8);
    index_t count[256] = {};
    for (i = 0; i < n; ++i) ++count[(cand[i] >> shift) & 255];
    index_t bucket = 255, above = 0;
    for (; above + count[bucket] < k; --bucket) above += count[bucket];
    index_t m = 0;
    for (i = 0; i < n; ++i) {
      scratch[m] = cand[i];
      m += ((cand[i] >> shift) & 255) == Key(bucket);
    }
    k -= above;
    larger += above;
    n = m;
    cand = scratch;
    if (n == k) return done(*std::min_element(scratch, scratch + n));
    if (k == 1) return done(*std::max_element(scratch, scratch + n));
  }
}

/// The k largest of keys pushed one at a time (1 <= k), in `capacity` keys of memory
/// whatever their number: keys above the current floor are buffered; when the buffer
/// fills it is cut back to its best k and the floor rises to the k-th. A million-key
/// selection stays in cache instead of writing and re-reading every key.
/// `buffer` holds 2 * capacity keys; capacity > k. Keys must be nonzero (rank_key's are).
class streaming_top_k {
 public:
  streaming_top_k(index_t k, std::uint64_t* buffer, index_t capacity) noexcept
      : k_(k), capacity_(capacity), buffer_(buffer) {}

  void push(std::uint64_t key) noexcept {
    ++seen_;
    if (key <= floor_) return;
    buffer_[count_++] = key;
    if (count_ == capacity_) cut();
  }
  /// How many keys were pushed.
  index_t seen() const noexcept { return seen_; }
  /// The k-th largest key pushed; needs seen() >= k.
  std::uint64_t bar() const noexcept { return kth_largest(buffer_, count_, k_, buffer_ + capacity_); }

 private:
  void cut() noexcept {
    floor_ = bar();
    index_t kept = 0;
    for (index_t i = 0; i < count_; ++i) {
      buffer_[kept] = buffer_[i];
      kept += buffer_[i] >= floor_;
    }
    count_ = kept;  // == k: keys are distinct
  }

  index_t k_, capacity_, count_ = 0, seen_ = 0;
  std::uint64_t floor_ = 0;
  std::uint64_t* buffer_;
};

/// The buffer a streaming_top_k of k keeps among n keys: room for k and as many more
/// (at least 4096), never more than n + 1.
constexpr index_t streaming_capacity(index_t n, index_t k) noexcept {
  return std::min(n + 1, std::max<index_t>(2 * k, 4096));
}

}  // namespace fovea::detail
