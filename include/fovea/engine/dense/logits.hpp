// Turns a tile of raw scores q.k into logits: the built-in modifiers, the user's
// score_mod / mask_mod, and the key band, applied in the documented order.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "../../core/tensor_view.hpp"
#include "../../simd/vec.hpp"
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

/// The per-(key, column) terms, in the documented order: bias, score_mod, the key band,
/// the boolean mask, mask_mod. `at(r, c)` is the logit of tile row r (key key_of(r)) and
/// column c < cols.count, whatever the tile's layout.
/// With `derivative` (the backward), derivative(r, c) also receives d score_mod / d score
/// where score_mod applies.
template <class T, class ScoreMod, class MaskMod, class KeyOf, class At, class Derivative = std::nullptr_t>
void apply_logit_terms(const query_columns<T>& cols,
                       const custom_variant<ScoreMod, MaskMod>& custom, const key_band& band,
                       tile_cuts cuts, KeyOf&& key_of, index_t keys, At&& at,
                       Derivative&& derivative = nullptr) noexcept {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  constexpr bool scored = !leaves_scores<ScoreMod>;
  constexpr bool masking = !std::is_same_v<MaskMod, keep_all_mask_mod>;
  const index_t n = cols.count;
  if (!cols.has_bias && !scored && !cuts.band && !cols.has_mask && !(masking && cuts.mask_mod))
    return;
  for (index_t r = 0; r < keys; ++r) {
    const index_t j = key_of(r);
    if (cols.has_bias)
      for (index_t c = 0; c < n; ++c) {
        const T bias = T(cols.bias[c][j * cols.bias_step]);
        at(r, c) = bias == neg_inf ? neg_inf : at(r, c) + bias;
      }
    if constexpr (scored)
      for (index_t c = 0; c < n; ++c) {
        if constexpr (!std::is_same_v<std::decay_t<Derivative>, std::nullptr_t>)
          derivative(r, c) = T(custom.score_mod.derivative(at(r, c), cols.batch, cols.head[c], cols.pos[c], j));
        at(r, c) = T(custom.score_mod(at(r, c), cols.batch, cols.head[c], cols.pos[c], j));
      }
    if (cuts.band)
      for (index_t c = 0; c < n; ++c)
        if (!band.visible(cols.pos[c], j)) at(r, c) = neg_inf;
    if (cols.has_mask)
      for (index_t c = 0; c < n; ++c)
        if (!cols.mask[c][j * cols.mask_step]) at(r, c) = neg_inf;
    if constexpr (masking)
      if (cuts.mask_mod && (!cuts.mask_mod_rows || cuts.mask_mod_rows[r]))
        for (index_t c = 0; c < n; ++c)
          if (!custom.mask_mod(cols.batch, cols.head[c], cols.pos[c], j)) at(r, c) = neg_inf;
  }
}

/// `tile` is laid out [key][column], `ld` columns per key row (a whole number of vectors);
/// row r holds key key_of(r), r < keys. Columns past cols.count are padding: they get the
/// vector passes only and are never read back. Returns true if any logit is -inf (a
/// masked key).
/// With `derivative` (a tile like `tile`; the backward of a user score_mod), it receives
/// d score_mod / d score per (key, column).
template <class Backend, class T, class ScoreMod, class MaskMod, class KeyOf>
bool apply_logits(const query_columns<T>& cols, const custom_variant<ScoreMod, MaskMod>& custom,
                  const key_band& band, tile_cuts cuts, T* tile, index_t ld, KeyOf&& key_of,
                  index_t keys, T* derivative = nullptr) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width;
  const auto scale = V::broadcast(cols.scale);
  const bool capped = cols.softcap > T(0);
  const auto cap = V::broadcast(cols.softcap);
  const auto inv_cap = V::broadcast(capped ? T(1) / cols.softcap : T(0));
  // The options are tested once per tile, not per vector (-O2 does not unswitch loops).
  auto scale_tile = [&]<bool Capped, bool Alibi>() {
    for (index_t r = 0; r < keys; ++r) {
      T* row = tile + r * ld;
      const auto diagonal_minus_j = V::broadcast(T(band.offset - key_of(r)));
      for (index_t c = 0; c < ld; c += W) {
        auto s = V::mul(V::load(row + c), scale);
        if constexpr (Capped) s = V::mul(cap, V::tanh(V::mul(s, inv_cap)));
        if constexpr (Alibi) {  // - slope * |i + offset - j|
          const auto distance = V::abs(V::add(V::load(cols.pos_value + c), diagonal_minus_j));
          s = V::fma(V::load(cols.minus_slope + c), distance, s);
        }
        V::store(row + c, s);
      }
    }
  };
  if (capped)
    cols.has_alibi ? scale_tile.template operator()<true, true>()
                   : scale_tile.template operator()<true, false>();
  else
    cols.has_alibi ? scale_tile.template operator()<false, true>()
                   : scale_tile.template operator()<false, false>();
  auto at = [&](index_t r, index_t c) -> T& { return tile[r * ld + c]; };
  if constexpr (!leaves_scores<ScoreMod> && differentiable_score_mod<ScoreMod, T>) {
    if (derivative)
      apply_logit_terms(cols, custom, band, cuts, key_of, keys, at,
                        [&](index_t r, index_t c) -> T& { return derivative[r * ld + c]; });
    else
      apply_logit_terms(cols, custom, band, cuts, key_of, keys, at);
  } else {
    apply_logit_terms(cols, custom, band, cuts, key_of, keys, at);
  }
  const auto minus_inf = V::broadcast(-std::numeric_limits<T>::infinity());
  bool masked = false;
  for (index_t r = 0; r < keys && !masked; ++r)
    for (index_t c = 0; c < ld; c += W)
      masked = masked || V::any(V::equal(V::load(tile + r * ld + c), minus_inf));
  return masked;
}

/// The same for a tile laid out [column][key] (keys contiguous, `ld` >= keys rounded up to
/// whole vectors): decode, whose few columns would leave most lanes of a [key][column] row
/// idle. Only the cols.count column rows exist; lanes past `keys` get the vector passes
/// and are never read back.
template <class Backend, class T, class ScoreMod, class MaskMod, class KeyOf>
bool apply_logits_by_column(const query_columns<T>& cols,
                            const custom_variant<ScoreMod, MaskMod>& custom, const key_band& band,
                            tile_cuts cuts, T* tile, index_t ld, KeyOf&& key_of,
                            index_t keys) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const index_t n = cols.count;
  const auto scale = V::broadcast(cols.scale);
  const bool capped = cols.softcap > T(0);
  const auto cap = V::broadcast(cols.softcap);
  const auto inv_cap = V::broadcast(capped ? T(1) / cols.softcap : T(0));
  alignas(64) T key_lanes[W];
  for (index_t j0 = 0; j0 < keys; j0 += W) {
    if (cols.has_alibi)
      for (int i = 0; i < W; ++i) key_lanes[i] = T(key_of(std::min<index_t>(j0 + i, keys - 1)));
    for (index_t c = 0; c < n; ++c) {
      T* at = tile + c * ld + j0;
      auto s = V::mul(V::load(at), scale);
      if (capped) s = V::mul(cap, V::tanh(V::mul(s, inv_cap)));
      if (cols.has_alibi) {  // - slope * |i + offset - j|
        const auto diagonal = V::broadcast(cols.pos_value[c] + T(band.offset));
        const auto distance = V::abs(V::sub(diagonal, V::load(key_lanes)));
        s = V::fma(V::broadcast(cols.minus_slope[c]), distance, s);
      }
      V::store(at, s);
    }
  }
  apply_logit_terms(cols, custom, band, cuts, key_of, keys,
                    [&](index_t r, index_t c) -> T& { return tile[c * ld + r]; });
  const auto minus_inf = V::broadcast(neg_inf);
  for (index_t c = 0; c < n; ++c) {
    const T* row = tile + c * ld;
    index_t j = 0;
    for (; j + W <= keys; j += W)
      if (V::any(V::equal(V::load(row + j), minus_inf))) return true;
    for (; j < keys; ++j)
      if (row[j] == neg_inf) return true;
  }
  return false;
}

}  // namespace fovea::detail
