// Tile sizes per (storage type, backend): how many queries a tile holds (a few SIMD
// vectors wide), how many keys it takes at a time, and the micro-kernel's row block.
#pragma once

#include "../../core/tensor_view.hpp"
#include "../../simd/vec.hpp"

namespace fovea::detail {

template <class T, class Backend>
struct tile_traits {
  using V = vec<T, Backend>;
  static constexpr int width = V::width;
  /// Query columns per tile, in vectors: 4 with 32 vector registers, 2 with 16.
  static constexpr int query_vectors = V::width == 1 ? 4 : (V::registers >= 32 ? 4 : 2);
  /// Rows (keys for Q K^T, value columns for P V) per micro-kernel call.
  static constexpr int row_block = V::width == 1 ? 4 : 6;
  static constexpr index_t block_q = index_t(query_vectors) * width;
  static constexpr index_t block_k = 64;
};

}  // namespace fovea::detail
