// Logit modifiers: the built-in ones (scale, soft-cap, ALiBi, additive bias, boolean
// mask, sinks) are runtime-optional and cost nothing when off; a user's score_mod /
// mask_mod functors are template parameters, inlined and compiled out when absent.
// Order per logit: s = scale * q.k; soft-cap; + ALiBi; + bias; score_mod; then the band,
// mask and mask_mod set it to -inf. A key whose logit ends at -inf (masked, or a -inf
// bias) is skipped, never multiplied by zero.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../core/tensor_view.hpp"
#include "../simd/vec.hpp"
#include "key_band.hpp"

namespace fovea {

/// A score_mod that leaves scores alone, and a mask_mod that keeps every key.
struct identity_score_mod {};
struct keep_all_mask_mod {};

/// A user variant, FlexAttention style: score_mod(score, b, h, q_idx, k_idx) returns the
/// new logit (score already scaled and soft-capped, ALiBi and bias added); mask_mod(b, h,
/// q_idx, k_idx) returns false to hide the key. Indices are those of the views; h is the
/// query head.
template <class ScoreMod = identity_score_mod, class MaskMod = keep_all_mask_mod>
struct custom_variant {
  ScoreMod score_mod{};
  MaskMod mask_mod{};
};

template <class ScoreMod>
constexpr custom_variant<ScoreMod, keep_all_mask_mod> with_score_mod(ScoreMod f) {
  return {f, {}};
}
template <class MaskMod>
constexpr custom_variant<identity_score_mod, MaskMod> with_mask_mod(MaskMod f) {
  return {{}, f};
}
template <class ScoreMod, class MaskMod>
constexpr custom_variant<ScoreMod, MaskMod> with_mods(ScoreMod s, MaskMod m) {
  return {s, m};
}

namespace detail {

/// The built-in modifiers for a whole call, as the front-end validated them.
template <class T>
struct logit_terms {
  T scale = 1;
  T softcap = 0;                            ///< 0: off
  tensor_view<const float, 4> bias;         ///< (B|1, H|Hk|1, Sq|1, Sk|1); empty: none
  tensor_view<const std::uint8_t, 4> mask;  ///< same shapes; nonzero keeps the key
  tensor_view<const float, 2> alibi;        ///< (B|1, H) slopes; empty: none
  tensor_view<const float, 1> sinks;        ///< (H) sink logits; empty: none
  index_t group = 1;                        ///< query heads per key/value head
};

/// A broadcastable (B, H, Sq, Sk) view bound to one (batch, head): base + (i, j) strides.
template <class E>
struct bound_plane {
  const E* base = nullptr;
  index_t row = 0, col = 0;
  const E& operator()(index_t i, index_t j) const noexcept { return base[i * row + j * col]; }
};

/// Binds view (B|1, H|Hk|1, Sq|1, Sk|1) to batch b and query head h (of `heads`, sharing
/// a key/value head in groups of `group`); extent-1 dimensions broadcast.
template <class E>
bound_plane<E> bind_plane(const tensor_view<const E, 4>& v, index_t b, index_t h, index_t heads,
                          index_t group) noexcept {
  if (v.data() == nullptr) return {};
  const index_t vb = v.extent(0) == 1 ? 0 : b;
  const index_t vh = v.extent(1) == 1 ? 0 : (v.extent(1) == heads ? h : h / group);
  return {v.data() + vb * v.stride(0) + vh * v.stride(1), v.extent(2) == 1 ? 0 : v.stride(2),
          v.extent(3) == 1 ? 0 : v.stride(3)};
}

/// The modifiers of one (batch, query head).
template <class T>
struct head_logits {
  T scale = 1;
  T softcap = 0;
  bool alibi = false;
  T slope = 0;
  T sink = -std::numeric_limits<T>::infinity();
  bound_plane<float> bias;
  bound_plane<std::uint8_t> mask;
};

template <class T>
head_logits<T> bind_head(const logit_terms<T>& t, index_t b, index_t h, index_t heads) noexcept {
  head_logits<T> hl;
  hl.scale = t.scale;
  hl.softcap = t.softcap;
  if (t.alibi.data() != nullptr) {
    hl.alibi = true;
    hl.slope = T(t.alibi(t.alibi.extent(0) == 1 ? 0 : b, h));
  }
  if (t.sinks.data() != nullptr) hl.sink = T(t.sinks(h));
  hl.bias = bind_plane(t.bias, b, h, heads, t.group);
  hl.mask = bind_plane(t.mask, b, h, heads, t.group);
  return hl;
}

/// Turns a tile of raw scores q.k, laid out [key][query] with `ld` query columns (a whole
/// number of vectors), into logits for queries [i0, i0 + queries) and keys [j0, j0 + keys).
/// Columns past `queries` are padding: they get the vector passes only and are never read
/// back. `partial` says the band cuts through the tile. Returns true if any logit is -inf.
template <class Backend, class T, class ScoreMod, class MaskMod>
bool apply_logits(const head_logits<T>& hl, const custom_variant<ScoreMod, MaskMod>& custom,
                  const key_band& band, bool partial, index_t b, index_t h, T* tile, index_t ld,
                  index_t i0, index_t queries, index_t j0, index_t keys) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const auto scale = V::broadcast(hl.scale);
  const bool capped = hl.softcap > T(0);
  const auto cap = V::broadcast(hl.softcap);
  const auto inv_cap = V::broadcast(capped ? T(1) / hl.softcap : T(0));
  const auto minus_slope = V::broadcast(-hl.slope);
  bool masked = false;
  for (index_t r = 0; r < keys; ++r) {
    T* row = tile + r * ld;
    const index_t j = j0 + r;
    for (index_t c = 0; c < ld; c += W) {
      auto s = V::mul(V::load(row + c), scale);
      if (capped) s = V::mul(cap, V::tanh(V::mul(s, inv_cap)));
      if (hl.alibi) {
        const auto distance = V::abs(V::iota(T(i0 + c + band.offset - j)));
        s = V::fma(minus_slope, distance, s);
      }
      V::store(row + c, s);
    }
    if (hl.bias.base != nullptr)
      for (index_t c = 0; c < queries; ++c) {
        const T bias = T(hl.bias(i0 + c, j));
        row[c] = bias == neg_inf ? neg_inf : row[c] + bias;
      }
    if constexpr (!std::is_same_v<ScoreMod, identity_score_mod>)
      for (index_t c = 0; c < queries; ++c) row[c] = T(custom.score_mod(row[c], b, h, i0 + c, j));
    if (partial) {
      const auto [first, last] = band.queries_for(j);
      for (index_t c = 0; c < queries; ++c)
        if (i0 + c < first || i0 + c > last) row[c] = neg_inf;
    }
    if (hl.mask.base != nullptr)
      for (index_t c = 0; c < queries; ++c)
        if (!hl.mask(i0 + c, j)) row[c] = neg_inf;
    if constexpr (!std::is_same_v<MaskMod, keep_all_mask_mod>)
      for (index_t c = 0; c < queries; ++c)
        if (!custom.mask_mod(b, h, i0 + c, j)) row[c] = neg_inf;
    const auto minus_inf = V::broadcast(neg_inf);
    for (index_t c = 0; c < ld; c += W)
      masked = masked || V::any(V::equal(V::load(row + c), minus_inf));
  }
  return masked;
}

}  // namespace detail
}  // namespace fovea
