// Where the keys and values of one (sequence, key/value head) live: contiguous rows, or
// fixed-size pages addressed through a block table (vLLM / FlashInfer paged KV). The tile
// loops ask for runs of consecutive keys that share one row stride.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../core/tensor_view.hpp"
#include "../simd/prefetch.hpp"

namespace fovea::detail {

template <class S>
struct kv_source {
  const S* k = nullptr;  ///< key 0 (contiguous) or slot 0 of page 0 (paged)
  const S* v = nullptr;
  index_t k_stride = 0, v_stride = 0;  ///< between consecutive keys (within a page)
  index_t k_page_stride = 0, v_page_stride = 0;
  const std::int32_t* pages = nullptr;  ///< block-table row; null: contiguous
  index_t page_size = 0;

  /// How many of `want` keys starting at j share one stride (all, unless a page ends).
  index_t run(index_t j, index_t want) const noexcept {
    return pages ? std::min(want, page_size - j % page_size) : want;
  }
  const S* k_row(index_t j) const noexcept {
    return pages ? k + pages[j / page_size] * k_page_stride + (j % page_size) * k_stride
                 : k + j * k_stride;
  }
  const S* v_row(index_t j) const noexcept {
    return pages ? v + pages[j / page_size] * v_page_stride + (j % page_size) * v_stride
                 : v + j * v_stride;
  }
};

/// The keys/values of a whole problem: (B, Hk, Sk, D) views, or paged caches viewed as
/// (pages, Hk, page_size, D) with a block table (B, max_pages).
template <class S>
struct kv_layout {
  tensor_view<const S, 4> k, v;
  tensor_view<const std::int32_t, 2> table{};  ///< empty: contiguous

  kv_source<S> source(index_t b, index_t hk) const noexcept {
    kv_source<S> s;
    if (table.data() == nullptr) {
      s.k = k.data() + b * k.stride(0) + hk * k.stride(1);
      s.v = v.data() + b * v.stride(0) + hk * v.stride(1);
    } else {
      s.k = k.data() + hk * k.stride(1);
      s.v = v.data() + hk * v.stride(1);
      s.k_page_stride = k.stride(0);
      s.v_page_stride = v.stride(0);
      s.pages = table.data() + b * table.stride(0);
      s.page_size = k.extent(2);
    }
    s.k_stride = k.stride(2);
    s.v_stride = v.stride(2);
    return s;
  }
  index_t heads() const noexcept { return k.extent(1); }
  index_t dim() const noexcept { return k.extent(3); }
  index_t value_dim() const noexcept { return v.extent(3); }
};

/// Asks for the key rows [j, j + rows) to be brought into cache level KeyLevel and the
/// value rows into ValueLevel (1 or 2; 0: not asked for). Decode streams K and V once
/// and the hardware prefetcher alone leaves the core waiting; the block-sparse engine
/// reads scattered pieces the hardware cannot guess.
template <int KeyLevel, int ValueLevel, class S>
[[gnu::always_inline]] inline void prefetch_rows(const kv_source<S>& kv, index_t j, index_t rows,
                                                 index_t D, index_t Dv) noexcept {
  constexpr index_t line = 64 / sizeof(S), size = sizeof(S);
  if (!kv.pages && kv.k_stride == D && kv.v_stride == Dv) {  // rows back to back: two spans
    if constexpr (KeyLevel > 0) prefetch_span<KeyLevel>(kv.k_row(j), rows * D * size);
    if constexpr (ValueLevel > 0) prefetch_span<ValueLevel>(kv.v_row(j), rows * Dv * size);
    return;
  }
  for (index_t r = j; r < j + rows; ++r) {  // (as spans, strided rows were 25% slower)
    if constexpr (KeyLevel > 0)
      for (index_t d = 0; d < D; d += line) prefetch_into<KeyLevel>(kv.k_row(r) + d);
    if constexpr (ValueLevel > 0)
      for (index_t d = 0; d < Dv; d += line) prefetch_into<ValueLevel>(kv.v_row(r) + d);
  }
}

}  // namespace fovea::detail
