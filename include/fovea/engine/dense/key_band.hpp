// Which keys a query may see by position: the band lo(i) <= j <= hi(i) around a diagonal,
// which is how causal masking (right = 0) and sliding windows (left, right) are both
// expressed, as FlashAttention's window_size. Whole key tiles outside the band are never
// visited; tiles inside it need no per-element mask.
#pragma once

#include <algorithm>
#include <utility>

#include "../../core/tensor_view.hpp"

namespace fovea::detail {

struct key_band {
  index_t keys = 0;    ///< Sk
  index_t offset = 0;  ///< query i sits on the diagonal at key i + offset
  index_t left = -1;   ///< keys before the diagonal a query may see; -1: unbounded
  index_t right = -1;  ///< keys after the diagonal a query may see; -1: unbounded

  bool visible(index_t i, index_t j) const noexcept {
    return (left < 0 || j >= i + offset - left) && (right < 0 || j <= i + offset + right);
  }

  /// [first, last) keys that at least one query of [i0, i1) may see (i1 > i0).
  std::pair<index_t, index_t> keys_for(index_t i0, index_t i1) const noexcept {
    const index_t first = left < 0 ? 0 : std::max<index_t>(0, i0 + offset - left);
    const index_t last = right < 0 ? keys : std::min<index_t>(keys, i1 - 1 + offset + right + 1);
    return {first, std::max(first, last)};
  }

  /// True when every query of [i0, i1) sees every key of [j0, j1).
  bool covers(index_t i0, index_t i1, index_t j0, index_t j1) const noexcept {
    return (right < 0 || j1 - 1 <= i0 + offset + right) &&
           (left < 0 || j0 >= i1 - 1 + offset - left);
  }

  /// Queries that may see key j: [first, last] (inclusive, possibly empty or unbounded).
  std::pair<index_t, index_t> queries_for(index_t j) const noexcept {
    constexpr index_t unbounded = index_t(1) << 62;
    return {right < 0 ? -unbounded : j - offset - right, left < 0 ? unbounded : j - offset + left};
  }
};

}  // namespace fovea::detail
