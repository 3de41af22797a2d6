// Logit modifiers: the built-in ones (scale, soft-cap, ALiBi, additive bias, boolean
// mask, sinks) are runtime-optional and cost nothing when off; a user's score_mod /
// mask_mod functors are template parameters, inlined and compiled out when absent.
// Order per logit: s = scale * q.k; soft-cap; + ALiBi; + bias; score_mod; then the band,
// mask and mask_mod set it to -inf. A key whose logit ends at -inf (masked, or a -inf
// bias) is skipped, never multiplied by zero.
#pragma once

#include <memory>
#include <vector>

#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../../core/tensor_view.hpp"

namespace fovea {

/// A score_mod that leaves scores alone, and a mask_mod that keeps every key.
struct identity_score_mod {};
struct keep_all_mask_mod {};

/// A user variant, FlexAttention style: score_mod(score, b, h, q_idx, k_idx) returns the
/// new logit (score already scaled and soft-capped, ALiBi and bias added); mask_mod(b, h,
/// q_idx, k_idx) returns false to hide the key. Indices are those of the views; h is the
/// query head.
///
/// For the backward, a score_mod also gives its derivative: a member
/// derivative(score, b, h, q_idx, k_idx) returning d score_mod / d score at that score
/// (the same arguments as the call). The backward chains it into every gradient (dq, dk,
/// d bias, d slopes); a score_mod without it is a compile-time error there.
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

/// The score_mod of a prob_mod call's second pass: the user's score_mod (applied as
/// usual) and the user's prob_mod, which the prefill tile applies to each normalised
/// probability p = exp(s - lse) before P V (the lse given by the first pass).
template <class ScoreMod, class ProbMod>
struct prob_pass {
  ScoreMod score_mod{};
  ProbMod prob_mod{};
  template <class T>
  T operator()(T score, index_t b, index_t h, index_t i, index_t j) const {
    if constexpr (std::is_same_v<ScoreMod, identity_score_mod>)
      return score;
    else
      return score_mod(score, b, h, i, j);
  }
};

template <class ScoreMod>
inline constexpr bool is_prob_pass = false;
template <class ScoreMod, class ProbMod>
inline constexpr bool is_prob_pass<prob_pass<ScoreMod, ProbMod>> = true;

/// Whether a score_mod changes no logit (the identity, or a prob_pass around it).
template <class ScoreMod>
inline constexpr bool leaves_scores = std::is_same_v<ScoreMod, identity_score_mod>;
template <class ProbMod>
inline constexpr bool leaves_scores<prob_pass<identity_score_mod, ProbMod>> = true;

}  // namespace detail

/// Whether a score_mod has the derivative the backward needs (the identity has none to give).
template <class ScoreMod, class T>
concept differentiable_score_mod =
    std::is_same_v<ScoreMod, identity_score_mod> ||
    requires(const ScoreMod& f, T score, index_t i) {
      { f.derivative(score, i, i, i, i) } -> std::convertible_to<T>;
    };

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
  /// fp32 copies of a bias / slopes given in fp16 or bf16 (what bias / alibi view).
  std::shared_ptr<const std::vector<float>> widened_bias, widened_alibi;
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

}  // namespace detail
}  // namespace fovea
