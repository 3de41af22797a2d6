// A post-softmax hook (FlexAttention's and ONNX's prob_mod): a user functor applied to
// each normalised probability before P V. Each prefill tile walks its keys twice: QK^T
// for the rows' max and sum, then QK^T again with p = exp(s - max) / sum final, so each
// probability can be changed before it multiplies its value row.
#pragma once

#include <type_traits>

#include "../core/storage.hpp"
#include "../core/tensor_view.hpp"
#include "../engine/dense/dense.hpp"
#include "../engine/dense/variant.hpp"
#include "softmax.hpp"

namespace fovea {

/// Softmax attention whose probabilities pass through prob_mod before P V:
///   p_ij = softmax_j(logits of row i)   (every option of softmax_attention: band, bias,
///                                        mask, ALiBi, soft-cap, sinks in the denominator,
///                                        the user's score_mod / mask_mod; not
///                                        q8_0_products: the logits are fp32 ones)
///   out_i = sum_j prob_mod(p_ij, b, h, i, j) v_j
/// prob_mod(p, b, h, q_idx, k_idx) -> the new weight (h the query head); it is called only
/// for visible keys (a hidden key's weight stays 0) and nothing is renormalised after it:
/// the functor decides (a calibration that moves mass between keys keeps the sum itself).
/// options.lse, if given, receives the plain rows' lse.
///
///   q: (B, H, Sq, D)  k: (B, Hk, Sk, D)  v: (B, Hk, Sk, Dv)  out: (B, H, Sq, Dv)
///
/// Every storage and cache type softmax_attention takes (fp32 accumulation; double for
/// double). Cost: ~1.5x softmax_attention plus the functor per visible
/// (query, key) pair; every call takes the prefill tiles (decoding too: a tile of a few
/// queries per head, K and V read per query head).
/// NaN in a row's logits makes its lse NaN and the row NaN. Bitwise the same for every
/// thread count. Bad input throws fovea::error as softmax_attention does, before any write.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO, class ProbMod,
          class ScoreMod = identity_score_mod, class MaskMod = keep_all_mask_mod>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void softmax_attention_prob_mod(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                                tensor_view<TO, 4> out, ProbMod prob_mod,
                                const softmax_options& options = {},
                                const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  auto problem = detail::make_softmax_problem<TO>(q, k, v, out, options);
  problem.prob_mod = true;
  const custom_variant<detail::prob_pass<ScoreMod, ProbMod>, MaskMod> pass{
      {custom.score_mod, prob_mod}, custom.mask_mod};
  detail::run_dense<Backend>(std::span<const decltype(problem)>(&problem, 1), pass,
                             detail::resolve_threads(options.threads));
}

}  // namespace fovea
