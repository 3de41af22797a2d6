// fovea::softmax_attention_backward: gradients of softmax attention with respect to q, k
// and v (FlashAttention-2's algorithm, deterministic), for every softmax_options modifier.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <type_traits>

#include "../engine/dense/backward.hpp"
#include "softmax.hpp"
#include "softmax_varlen.hpp"

namespace fovea {

/// Gradients beyond dq, dk, dv that a call may also want.
struct softmax_grads {
  tensor_view<float, 1> dsinks{};  ///< (H): d loss / d options.sinks
  /// d loss / d options.bias, the bias's shape: (B, H, Sq, Sk) (a bias per query and key),
  /// or (B, H|Hk, 1, Sk) (a bias per key, as dynamic-mask attention's: summed over the
  /// queries and, for Hk heads, over each group's query heads). Overwritten.
  tensor_view<float, 4> dbias{};
  /// d loss / d options.alibi_slopes, the slopes' shape (B|1, H) (summed over the batch
  /// when the slopes are shared). Overwritten.
  tensor_view<float, 2> dalibi_slopes{};
};

namespace detail {

/// The backward's tensors against the forward's (q, k, v, out), checked before any write:
/// dout like out, lse (B, H, Sq), dq, dk, dv like q, k, v, no gradient overlapping an
/// input, the bias or another gradient.
template <class S>
void check_backward_tensors(const tensor_view<const S, 4>& q, const tensor_view<const S, 4>& k,
                            const tensor_view<const S, 4>& v, const tensor_view<const S, 4>& out,
                            const tensor_view<const S, 4>& dout,
                            const tensor_view<const float, 3>& lse, const tensor_view<S, 4>& dq,
                            const tensor_view<S, 4>& dk, const tensor_view<S, 4>& dv,
                            const softmax_options& options) {
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2);
  check_data(lse, "lse");
  require(lse.data() != nullptr || B * H * Sq == 0, "lse: is required (the forward's options.lse)");
  const index_t want[3] = {B, H, Sq};
  for (std::size_t r = 0; r < 3; ++r)
    require(lse.extent(r) == want[r], "lse: extent ", r, " is ", lse.extent(r), ", expected ",
            want[r], " (lse is (B, H, Sq))");
  check_gradients(q, k, v, out, dout, dq, dk, dv);
  for (const auto& [g, name] : {std::pair{dq, "dq"}, {dk, "dk"}, {dv, "dv"}}) {
    check_no_alias(g, name, lse, "lse");
    check_no_alias(g, name, options.bias, "options.bias");
  }
}


/// An extra gradient `g` overlaps no input (q, k, v, out, dout) and no gradient.
template <class G, class S>
void check_apart(const G& g, const char* name, const tensor_view<const S, 4>& q,
                 const tensor_view<const S, 4>& k, const tensor_view<const S, 4>& v,
                 const tensor_view<const S, 4>& out, const tensor_view<const S, 4>& dout,
                 const tensor_view<S, 4>& dq, const tensor_view<S, 4>& dk,
                 const tensor_view<S, 4>& dv) {
  const char* inputs[] = {"q", "k", "v", "out", "dout"};
  const tensor_view<const S, 4> in[] = {q, k, v, out, dout};
  const char* grad_names[] = {"dq", "dk", "dv"};
  const tensor_view<S, 4> gs[] = {dq, dk, dv};
  for (int i = 0; i < 5; ++i) check_no_alias(g, name, in[i], inputs[i]);
  for (int i = 0; i < 3; ++i) check_no_alias(g, name, gs[i], grad_names[i]);
}

/// A d bias (`name`) against the bias it differentiates (`bias_name`): the bias's extents,
/// (B, H, Sq, Sk) or (B, H|Hk, 1, Sk), overlapping no input or gradient. Returns whether
/// it is per key (summed over the queries).
template <class S, class Bias>
bool check_dbias(const tensor_view<float, 4>& dbias, const Bias& bias,
                 const tensor_view<const S, 4>& q, const tensor_view<const S, 4>& k,
                 const tensor_view<const S, 4>& v, const tensor_view<const S, 4>& out,
                 const tensor_view<const S, 4>& dout, const tensor_view<S, 4>& dq,
                 const tensor_view<S, 4>& dk, const tensor_view<S, 4>& dv,
                 const char* name = "grads.dbias", const char* bias_name = "options.bias") {
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), Hk = k.extent(1);
  const index_t Sk = k.extent(2);
  require(bias.data() != nullptr, name, ": given, but ", bias_name, " is not");
  check_data(dbias, name);
  for (std::size_t r = 0; r < 4; ++r)
    require(dbias.extent(r) == bias.extent(r), name, ": extent ", r, " is ", dbias.extent(r),
            ", expected ", bias.extent(r), " as ", bias_name);
  const bool per_row = bias.extent(0) == B && bias.extent(1) == H && bias.extent(2) == Sq &&
                       bias.extent(3) == Sk;
  const bool per_key = bias.extent(0) == B && (bias.extent(1) == H || bias.extent(1) == Hk) &&
                       bias.extent(2) == 1 && bias.extent(3) == Sk &&
                       H / std::max<index_t>(Hk, 1) <= 64;
  require(per_row || per_key, name, ": a bias of extents (", bias.extent(0), ", ",
          bias.extent(1), ", ", bias.extent(2), ", ", bias.extent(3),
          ") has no gradient here; expected (B, H, Sq, Sk) or (B, H|Hk, 1, Sk)");
  check_one_to_one(dbias, name);
  check_apart(dbias, name, q, k, v, out, dout, dq, dk, dv);
  check_no_alias(dbias, name, bias, bias_name);
  return per_key;
}


/// grads.dsinks and grads.dalibi_slopes against the options they differentiate: given
/// only with their option, its extents, overlapping no input or gradient.
template <class S>
void check_extra_grads(const softmax_grads& grads, const softmax_options& options, index_t H,
                       const tensor_view<const S, 4>& q, const tensor_view<const S, 4>& k,
                       const tensor_view<const S, 4>& v, const tensor_view<const S, 4>& out,
                       const tensor_view<const S, 4>& dout, const tensor_view<S, 4>& dq,
                       const tensor_view<S, 4>& dk, const tensor_view<S, 4>& dv) {
  if (grads.dsinks.data() != nullptr || !grads.dsinks.empty()) {
    require(options.sinks.data() != nullptr, "grads.dsinks: given, but options.sinks is not");
    check_data(grads.dsinks, "grads.dsinks");
    require(grads.dsinks.extent(0) == H, "grads.dsinks: extent 0 is ", grads.dsinks.extent(0),
            ", expected ", H, " (heads)");
    check_apart(grads.dsinks, "grads.dsinks", q, k, v, out, dout, dq, dk, dv);
    check_no_alias(grads.dsinks, "grads.dsinks", options.sinks, "options.sinks");
  }
  if (grads.dalibi_slopes.data() != nullptr || !grads.dalibi_slopes.empty()) {
    const auto& slopes = options.alibi_slopes;
    require(slopes.data() != nullptr, "grads.dalibi_slopes: given, but options.alibi_slopes is not");
    check_data(grads.dalibi_slopes, "grads.dalibi_slopes");
    for (std::size_t r = 0; r < 2; ++r)
      require(grads.dalibi_slopes.extent(r) == slopes.extent(r), "grads.dalibi_slopes: extent ", r,
              " is ", grads.dalibi_slopes.extent(r), ", expected ", slopes.extent(r),
              " as options.alibi_slopes");
    check_one_to_one(grads.dalibi_slopes, "grads.dalibi_slopes");
    check_apart(grads.dalibi_slopes, "grads.dalibi_slopes", q, k, v, out, dout, dq, dk, dv);
    check_no_alias(grads.dalibi_slopes, "grads.dalibi_slopes", slopes, "options.alibi_slopes");
    check_no_alias(grads.dalibi_slopes, "grads.dalibi_slopes", grads.dbias, "grads.dbias");
    check_no_alias(grads.dalibi_slopes, "grads.dalibi_slopes", grads.dsinks, "grads.dsinks");
  }
  check_no_alias(grads.dsinks, "grads.dsinks", grads.dbias, "grads.dbias");
}

/// The backward problem of a call: the forward's problem (its checks, out read as an
/// input, options.lse not read) and the backward's tensors, checked before any write.
template <class S>
backward_problem<S> make_backward_problem(const tensor_view<const S, 4>& q,
                                          const tensor_view<const S, 4>& k,
                                          const tensor_view<const S, 4>& v,
                                          const tensor_view<const S, 4>& out,
                                          const tensor_view<const S, 4>& dout,
                                          const tensor_view<const float, 3>& lse,
                                          const tensor_view<S, 4>& dq, const tensor_view<S, 4>& dk,
                                          const tensor_view<S, 4>& dv, softmax_options options) {
  options.lse = {};
  const tensor_view<S, 4> out_shape(const_cast<S*>(out.data()), out.extents(), out.strides());
  backward_problem<S> bp;
  bp.forward = make_softmax_problem<S>(q, k, v, out_shape, options);
  check_backward_tensors(q, k, v, out, dout, lse, dq, dk, dv, options);
  bp.out = out;
  bp.dout = dout;
  bp.lse = lse;
  bp.dq = dq;
  bp.dk = dk;
  bp.dv = dv;
  return bp;
}
}  // namespace detail

/// Gradients of softmax attention: given the forward's inputs, its output `out` and the
/// log-sum-exp it returned (options.lse of the forward call), and dout = d loss / d out,
/// writes dq, dk, dv = d loss / d q, k, v.
///
///   q: (B, H, Sq, D)   k: (B, Hk, Sk, D)   v: (B, Hk, Sk, Dv)   out, dout: (B, H, Sq, Dv)
///   lse: (B, H, Sq)    dq like q, dk like k, dv like v (overwritten, not accumulated)
///
/// `options` are the forward's (causal and its alignment, window, scale, soft-cap through
/// its chain rule, ALiBi, bias, mask, sinks, GQA: dk and dv summed over the query heads of
/// each key/value head); options.lse is not read (lse is the argument). grads.dalibi_slopes,
/// if given, receives d loss / d slopes = sum over (i, j) of dz_ij * -|i + offset - j|
/// (per batch row or summed over the batch, as the slopes are given). grads.dsinks, if
/// given, receives d loss / d sinks = -sum_i p_sink,i * delta_i; grads.dbias d loss / d
/// bias (= dS before the soft-cap's factor; 0 where the key is hidden), summed
/// deterministically over what the bias broadcasts. A user mask_mod applies as
/// in the forward; a user score_mod is differentiated through its derivative member
/// (derivative(score, b, h, q_idx, k_idx) = d score_mod / d score; without it, a
/// compile-time error).
/// Storage: float or double (computed in that type) or bf16 / fp16 (computed in float);
/// all in one type.
///
/// Algorithm: FlashAttention-2's (delta_i = rowsum(dO_i * O_i); P = exp(S - lse) recomputed
/// through the forward's logit code; dV += P^T dO; dP = dO V^T; dS = P * (dP - delta);
/// dQ += scale dS K; dK += scale dS^T Q) in 64 x 64 tiles, one pass over key blocks whose
/// dQ shares are added in key order (not atomically): bitwise the same for any thread
/// count; extra memory is a few tiles per thread, delta (B, H, Sq) and, for bf16 / fp16,
/// dQ's fp32 sums (B, H, Sq, D). A row that
/// saw no key (lse = -inf) gives zero gradients; keys hidden by the band, the mask or a
/// -inf bias get none from it (NaN/Inf in them never leak); a NaN a row sees makes its
/// gradients NaN, as in the forward. Bad arguments throw fovea::error before any write.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO, class TG,
          class TL, class S, class ScoreMod = identity_score_mod,
          class MaskMod = keep_all_mask_mod>
requires detail::attention_types<TQ, TK, TV, S> && std::is_same_v<std::remove_const_t<TO>, S> &&
         std::is_same_v<std::remove_const_t<TG>, S> && std::is_same_v<std::remove_const_t<TL>, float>
void softmax_attention_backward(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                                tensor_view<TO, 4> out, tensor_view<TG, 4> dout,
                                tensor_view<TL, 3> lse, tensor_view<S, 4> dq, tensor_view<S, 4> dk,
                                tensor_view<S, 4> dv, const softmax_options& options = {},
                                const softmax_grads& grads = {},
                                const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  static_assert(differentiable_score_mod<ScoreMod, accumulator_t<S>>,
                "softmax_attention_backward: a user score_mod needs its derivative here: a member "
                "derivative(score, b, h, q_idx, k_idx) returning d score_mod / d score");
  using namespace detail;
  const tensor_view<const S, 4> cq = q, ck = k, cv = v, co = out, cg = dout;
  const tensor_view<const float, 3> cl = lse;
  // the forward's checks, out read as an input
  backward_problem<S> bp = make_backward_problem(cq, ck, cv, co, cg, cl, dq, dk, dv, options);
  check_extra_grads(grads, options, q.extent(1), cq, ck, cv, co, cg, dq, dk, dv);
  if (grads.dbias.data() != nullptr || !grads.dbias.empty()) {
    bp.dbias = grads.dbias;
    bp.dbias_per_key = check_dbias(grads.dbias, options.bias, cq, ck, cv, co, cg, dq, dk, dv);
  }
  bp.dalibi = grads.dalibi_slopes;
  bp.dsinks = grads.dsinks;
  run_backward<Backend>(bp, custom, resolve_threads(options.threads));
}

/// Gradients of softmax_attention_varlen: the packed forward's inputs, out, dout and lse
/// (its options.lse, (1, H, total_q)), the same offsets and options; writes the packed
/// dq, dk, dv. Each sequence's gradients are softmax_attention_backward's on that
/// sequence alone (the block-diagonal bias and mask cut as the forward cuts them, ALiBi
/// slopes (sequences|1, H), score_mod / mask_mod positions within the sequence), run one
/// sequence after another, each over the threads: bitwise the same for any thread count.
/// Keys of a sequence without queries get zero gradients. `grads` as for
/// softmax_attention_backward, over the packed views: dsinks (H) summed over the
/// sequences (in order, in double); dbias like the packed bias, (1, H, total_q, total_k)
/// (zero off the block diagonal) or per key (1, H|Hk, 1, total_k); dalibi_slopes like
/// the slopes, per sequence (sequences, H) or summed over them (1, H). Bad arguments throw
/// fovea::error before any write.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO, class TG,
          class TL, class S, class ScoreMod = identity_score_mod,
          class MaskMod = keep_all_mask_mod>
requires detail::attention_types<TQ, TK, TV, S> && std::is_same_v<std::remove_const_t<TO>, S> &&
         std::is_same_v<std::remove_const_t<TG>, S> && std::is_same_v<std::remove_const_t<TL>, float>
void softmax_attention_varlen_backward(tensor_view<TQ, 4> q, tensor_view<TK, 4> k,
                                       tensor_view<TV, 4> v, tensor_view<TO, 4> out,
                                       tensor_view<TG, 4> dout, tensor_view<TL, 3> lse,
                                       tensor_view<S, 4> dq, tensor_view<S, 4> dk,
                                       tensor_view<S, 4> dv,
                                       std::span<const std::int32_t> cu_seqlens_q,
                                       std::span<const std::int32_t> cu_seqlens_k,
                                       const softmax_options& options = {},
                                       const softmax_grads& grads = {},
                                       const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  static_assert(differentiable_score_mod<ScoreMod, accumulator_t<S>>,
                "softmax_attention_varlen_backward: a user score_mod needs its derivative here: a member "
                "derivative(score, b, h, q_idx, k_idx) returning d score_mod / d score");
  using namespace detail;
  const tensor_view<const S, 4> cq = q, ck = k, cv = v, co = out, cg = dout;
  const tensor_view<const float, 3> cl = lse;
  const tensor_view<S, 4> out_shape(const_cast<S*>(co.data()), co.extents(), co.strides());
  const auto call = check_varlen_call(cq, ck, cv, out_shape, cu_seqlens_q, cu_seqlens_k, options);
  const index_t group = call.group, sequences = call.sequences;
  const double scale = call.scale;
  check_backward_tensors(cq, ck, cv, co, cg, cl, dq, dk, dv, options);
  const index_t H = q.extent(1);
  const bool want_dsinks = grads.dsinks.data() != nullptr || !grads.dsinks.empty();
  const bool want_dbias = grads.dbias.data() != nullptr || !grads.dbias.empty();
  const bool want_dalibi = grads.dalibi_slopes.data() != nullptr || !grads.dalibi_slopes.empty();
  check_extra_grads(grads, options, H, cq, ck, cv, co, cg, dq, dk, dv);
  const bool per_key = want_dbias && check_dbias(grads.dbias, options.bias, cq, ck, cv, co, cg, dq, dk, dv);
  if (want_dbias)  // pairs of no sequence (off the block diagonal) get 0
    for (index_t a = 0; a < grads.dbias.extent(0); ++a)
      for (index_t h = 0; h < grads.dbias.extent(1); ++h)
        for (index_t i = 0; i < grads.dbias.extent(2); ++i)
          std::fill_n(grads.dbias.ptr(a, h, i, 0), grads.dbias.extent(3), 0.f);
  std::vector<float> seq_dsinks(want_dsinks ? H : 0), seq_dalibi(want_dalibi ? H : 0);
  std::vector<double> dsinks_sum(want_dsinks ? H : 0), dalibi_sum(want_dalibi ? H : 0);
  const bool alibi_per_sequence = want_dalibi && grads.dalibi_slopes.extent(0) == sequences && sequences > 1;
  const int threads = resolve_threads(options.threads);
  for (index_t b = 0; b < sequences; ++b) {
    const index_t q0 = cu_seqlens_q[b], sq = cu_seqlens_q[b + 1] - q0;
    const index_t k0 = cu_seqlens_k[b], sk = cu_seqlens_k[b + 1] - k0;
    backward_problem<S> bp;
    dense_problem<S>& pr = bp.forward;
    pr.q = slice(cq, 2, q0, sq);
    pr.out = slice(out_shape, 2, q0, sq);
    pr.kv.k = slice(ck, 2, k0, sk);
    pr.kv.v = slice(cv, 2, k0, sk);
    pr.batch_base = b;
    apply_options(pr, sequence_options(options, -1, q0, sq, k0, sk), scale, group, sq, sk);
    bp.out = slice(co, 2, q0, sq);
    bp.dout = slice(cg, 2, q0, sq);
    bp.lse = slice(cl, 2, q0, sq);
    bp.dq = slice(dq, 2, q0, sq);
    bp.dk = slice(dk, 2, k0, sk);
    bp.dv = slice(dv, 2, k0, sk);
    if (sq == 0) {  // keys no query reads
      for (const auto& g : {bp.dk, bp.dv})
        for (index_t h = 0; h < g.extent(1); ++h)
          for (index_t j = 0; j < sk; ++j) std::fill_n(g.ptr(0, h, j, 0), g.extent(3), S(0));
      continue;
    }
    if (want_dsinks) bp.dsinks = view(seq_dsinks.data(), {H});
    if (want_dbias) {
      const auto& g = grads.dbias;
      bp.dbias = g.extent(2) == 1 ? slice(g, 3, k0, sk) : slice(slice(g, 2, q0, sq), 3, k0, sk);
      bp.dbias_per_key = per_key;
    }
    if (want_dalibi) bp.dalibi = view(seq_dalibi.data(), {index_t(1), H});
    run_backward<Backend>(bp, custom, threads);
    for (index_t h = 0; h < (want_dsinks ? H : 0); ++h) dsinks_sum[h] += seq_dsinks[h];
    for (index_t h = 0; h < (want_dalibi ? H : 0); ++h) {
      if (alibi_per_sequence) grads.dalibi_slopes(b, h) = seq_dalibi[h];
      else dalibi_sum[h] += seq_dalibi[h];
    }
  }
  for (index_t h = 0; h < (want_dsinks ? H : 0); ++h) grads.dsinks(h) = float(dsinks_sum[h]);
  if (want_dalibi && !alibi_per_sequence)
    for (index_t a = 0; a < grads.dalibi_slopes.extent(0); ++a)  // (1, H), or one sequence
      for (index_t h = 0; h < H; ++h) grads.dalibi_slopes(a, h) = float(dalibi_sum[h]);
  if (want_dalibi && alibi_per_sequence)  // sequences without queries
    for (index_t b = 0; b < sequences; ++b)
      if (cu_seqlens_q[b + 1] == cu_seqlens_q[b])
        for (index_t h = 0; h < H; ++h) grads.dalibi_slopes(b, h) = 0;
}

}  // namespace fovea
