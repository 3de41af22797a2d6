// Attention-sink calibration. ZeroTuning (Han et al. 2025, "ZeroTuning: Unlocking the
// Initial Token's Power to Enhance Large Language Models Without Training"): per query
// head h, the attention the initial token receives is multiplied by gamma_h and every row
// renormalised,
//   p'_0 = gamma_h p_0 / (gamma_h p_0 + sum_{j>0} p_j),   p'_j = p_j / (same),
// which is exactly softmax with ln(gamma_h) added to key 0's logit (the factor e^{s_0}
// becomes gamma_h e^{s_0}; the shared denominator cancels). So it runs inside the online
// softmax as a score_mod, in the same single pass, forward and backward.
#pragma once

#include <cmath>
#include <span>
#include <vector>

#include "../core/error.hpp"
#include "../core/tensor_view.hpp"
#include "../engine/dense/variant.hpp"
#include "softmax.hpp"

namespace fovea {

/// ZeroTuning as a score_mod: adds ln(gamma[h]) to the logit of key 0 (the initial token:
/// index 0 of k, the first cached token in decode) for query head h; other keys unchanged.
/// gamma: one value per query head, finite and >= 0 (1 changes nothing, < 1 takes attention
/// from the initial token, > 1 gives it more, 0 hides it: a row that then sees no key
/// outputs 0). Differentiable (its derivative is 1), so softmax_attention_backward takes
/// it. Pass it through softmax_attention's `custom` argument, or call
/// zero_tuning_attention, which also checks gamma against q's heads. Its cost is one add
/// per logit (prefill, 4 heads, N=2048, D=128, causal, AVX2: within 1% of the plain call).
/// Throws fovea::error naming "gamma" for a negative or non-finite value.
class zero_tuning {
 public:
  explicit zero_tuning(std::span<const float> gamma) : log_gamma_(gamma.size()) {
    for (std::size_t h = 0; h < gamma.size(); ++h) {
      detail::require(std::isfinite(gamma[h]) && gamma[h] >= 0.0f, "gamma: element ", h, " is ",
                      gamma[h], ", expected finite and >= 0");
      log_gamma_[h] = std::log(gamma[h]);  // -inf for 0: key 0 hidden
    }
  }
  template <class T>
  T operator()(T score, index_t, index_t h, index_t, index_t j) const noexcept {
    return j == 0 ? score + T(log_gamma_[std::size_t(h)]) : score;
  }
  template <class T>
  T derivative(T, index_t, index_t, index_t, index_t) const noexcept {
    return T(1);
  }
  /// The query heads it holds a gamma for.
  index_t heads() const noexcept { return index_t(log_gamma_.size()); }

 private:
  std::vector<float> log_gamma_;
};

/// softmax_attention with ZeroTuning's calibration of the initial token (see zero_tuning):
/// every option of softmax_attention applies (the score_mod runs after bias and ALiBi).
/// Throws fovea::error naming "gamma" when it does not hold one value per query head, or
/// holds a negative or non-finite one, before anything is written.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void zero_tuning_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                           tensor_view<TO, 4> out, std::span<const float> gamma,
                           const softmax_options& options = {}) {
  detail::require(index_t(gamma.size()) == q.extent(1), "gamma: holds ", gamma.size(),
                  " values, expected one per query head (", q.extent(1), ")");
  softmax_attention<Backend>(q, k, v, out, options, with_score_mod(zero_tuning(gamma)));
}

}  // namespace fovea
