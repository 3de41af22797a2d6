// The queries of one tile: up to `capacity` columns, each a (query head, position) pair of
// one batch row, all reading the same key/value head. A prefill tile is consecutive
// positions of one head; a decode tile stacks the query heads of a GQA group, so K and V
// are read once for all of them. Per column it holds what the logit modifiers need.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../../core/tensor_view.hpp"
#include "variant.hpp"

namespace fovea::detail {

template <class T>
struct query_columns {
  static constexpr index_t capacity = 64;  ///< the widest tile any backend uses

  index_t count = 0;  ///< real columns; the rest up to the tile width are padding
  index_t batch = 0;
  index_t first_pos = 0, last_pos = 0;  ///< smallest and largest position
  index_t head[capacity];
  index_t pos[capacity];
  alignas(64) T pos_value[capacity];  ///< pos as T, for vector ALiBi
  alignas(64) T minus_slope[capacity];
  T sink[capacity];
  T weight[capacity];  ///< the output row's factor (1; a head-sparse call's row weight)
  const float* bias[capacity];
  const std::uint8_t* mask[capacity];
  index_t bias_step = 0, mask_step = 0;  ///< element step from key j to j + 1
  T scale = 1, softcap = 0;
  bool has_alibi = false, has_bias = false, has_mask = false;

  /// Appends column (h, i) of batch row `batch`.
  void add(const logit_terms<T>& t, index_t heads, index_t h, index_t i) noexcept {
    const index_t c = count++;
    head[c] = h;
    pos[c] = i;
    pos_value[c] = T(i);
    minus_slope[c] = has_alibi ? -T(t.alibi(t.alibi.extent(0) == 1 ? 0 : batch, h)) : T(0);
    sink[c] = t.sinks.data() ? T(t.sinks(h)) : -std::numeric_limits<T>::infinity();
    weight[c] = T(1);
    if (has_bias) {
      const auto plane = bind_plane(t.bias, batch, h, heads, t.group);
      bias[c] = plane.base + i * plane.row;
      bias_step = plane.col;
    }
    if (has_mask) {
      const auto plane = bind_plane(t.mask, batch, h, heads, t.group);
      mask[c] = plane.base + i * plane.row;
      mask_step = plane.col;
    }
    first_pos = c == 0 ? i : std::min(first_pos, i);
    last_pos = c == 0 ? i : std::max(last_pos, i);
  }

  /// Fills padding columns up to `width` so vector passes read defined values.
  void pad_to(index_t width) noexcept {
    for (index_t c = count; c < width; ++c) pos_value[c] = T(0), minus_slope[c] = T(0);
  }
};

template <class T>
void start_columns(query_columns<T>& cols, const logit_terms<T>& t, index_t batch) noexcept {
  cols.count = 0;
  cols.batch = batch;
  cols.scale = t.scale;
  cols.softcap = t.softcap;
  cols.has_alibi = t.alibi.data() != nullptr;
  cols.has_bias = t.bias.data() != nullptr;
  cols.has_mask = t.mask.data() != nullptr;
}

}  // namespace fovea::detail
