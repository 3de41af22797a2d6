// Turns a tile of raw scores q.k into logits: the built-in modifiers, the user's
// score_mod / mask_mod, and the key band, applied in the documented order.
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>

#include "../core/tensor_view.hpp"
#include "../simd/vec.hpp"
#include "key_band.hpp"
#include "query_columns.hpp"
#include "variant.hpp"

namespace fovea::detail {

/// Which checks a tile of keys needs: the band cuts through it (`band`), and the user's
/// mask_mod may hide some of its keys (`mask_mod`; a block-sparse layout marks the blocks
/// it holds whole as not needing it, FlexAttention's full blocks).
struct tile_cuts {
  bool band = true;
  bool mask_mod = true;
  const bool* mask_mod_rows = nullptr;  ///< if set, mask_mod applies to row r iff [r] is true
};

/// `tile` is laid out [key][column], `ld` columns per key row (a whole number of vectors);
/// row r holds key key_of(r), r < keys. Columns past cols.count are padding: they get the
/// vector passes only and are never read back. Returns true if any logit is -inf (a
/// masked key).
template <class Backend, class T, class ScoreMod, class MaskMod, class KeyOf>
bool apply_logits(const query_columns<T>& cols, const custom_variant<ScoreMod, MaskMod>& custom,
                  const key_band& band, tile_cuts cuts, T* tile, index_t ld, KeyOf&& key_of,
                  index_t keys) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const index_t n = cols.count;
  const auto scale = V::broadcast(cols.scale);
  const bool capped = cols.softcap > T(0);
  const auto cap = V::broadcast(cols.softcap);
  const auto inv_cap = V::broadcast(capped ? T(1) / cols.softcap : T(0));
  const auto minus_inf = V::broadcast(neg_inf);
  bool masked = false;
  for (index_t r = 0; r < keys; ++r) {
    T* row = tile + r * ld;
    const index_t j = key_of(r);
    const auto diagonal_minus_j = V::broadcast(T(band.offset - j));
    for (index_t c = 0; c < ld; c += W) {
      auto s = V::mul(V::load(row + c), scale);
      if (capped) s = V::mul(cap, V::tanh(V::mul(s, inv_cap)));
      if (cols.has_alibi) {  // - slope * |i + offset - j|
        const auto distance = V::abs(V::add(V::load(cols.pos_value + c), diagonal_minus_j));
        s = V::fma(V::load(cols.minus_slope + c), distance, s);
      }
      V::store(row + c, s);
    }
    if (cols.has_bias)
      for (index_t c = 0; c < n; ++c) {
        const T bias = T(cols.bias[c][j * cols.bias_step]);
        row[c] = bias == neg_inf ? neg_inf : row[c] + bias;
      }
    if constexpr (!std::is_same_v<ScoreMod, identity_score_mod>)
      for (index_t c = 0; c < n; ++c)
        row[c] = T(custom.score_mod(row[c], cols.batch, cols.head[c], cols.pos[c], j));
    if (cuts.band)
      for (index_t c = 0; c < n; ++c)
        if (!band.visible(cols.pos[c], j)) row[c] = neg_inf;
    if (cols.has_mask)
      for (index_t c = 0; c < n; ++c)
        if (!cols.mask[c][j * cols.mask_step]) row[c] = neg_inf;
    if constexpr (!std::is_same_v<MaskMod, keep_all_mask_mod>)
      if (cuts.mask_mod && (!cuts.mask_mod_rows || cuts.mask_mod_rows[r]))
        for (index_t c = 0; c < n; ++c)
          if (!custom.mask_mod(cols.batch, cols.head[c], cols.pos[c], j)) row[c] = neg_inf;
    for (index_t c = 0; c < ld; c += W)
      masked = masked || V::any(V::equal(V::load(row + c), minus_inf));
  }
  return masked;
}

}  // namespace fovea::detail
