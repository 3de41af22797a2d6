// Attention-sink calibration. ZeroTuning (Han et al. 2025, "ZeroTuning: Unlocking the
// Initial Token's Power to Enhance Large Language Models Without Training"): per query
// head h, the attention the initial token receives is multiplied by gamma_h and every row
// renormalised,
//   p'_0 = gamma_h p_0 / (gamma_h p_0 + sum_{j>0} p_j),   p'_j = p_j / (same),
// which is exactly softmax with ln(gamma_h) added to key 0's logit (the factor e^{s_0}
// becomes gamma_h e^{s_0}; the shared denominator cancels). So it runs inside the online
// softmax as a score_mod, in the same single pass, forward and backward.
//
// ACT (Yu et al. 2024, "Unveiling and Harnessing Hidden Attention Sinks: Training-Free
// Attention Calibration") and VAR (Kang et al. 2025, "See What You Are Told: Visual
// Attention Sink in Large Multimodal Models") move attention off sink keys. Both keep the
// other keys' relative weights, so the calibrated row is the plain row rescaled plus a
// correction over the few keys that change:
//   ACT: p'_j = beta p_j on the calibrated sinks J, p'_k = f p_k elsewhere, with
//        f = (L - beta C) / (L - C), C = sum_J p_j, L the keys' mass (1 but a sink
//        logit's share):  o' = f o + (beta - f) sum_J p_j v_j;
//   VAR: p'_j = (1 - p) p_j on the sinks J, p'_k = p_k (1 + p S / T) on the targets
//        (S = sum_J p_j, T their mass):  o' = o - p sum_J p_j v_j + p S o_T
// (o_T the attention restricted to the targets). So each is the plain call with its lse,
// the sinks' probabilities p_j = exp(s_j - lse) from their logits (the engine's logit
// pipeline, on a one-column tile), and for VAR one call over the targets; ACT's sinks come
// from column means of the attention, taken as the lse of the transposed problem (keys
// as queries, each query's logit shifted by -lse): exp of it is the column's sum.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "../core/error.hpp"
#include "../core/parallel.hpp"
#include "../core/tensor_view.hpp"
#include "../engine/dense/logits.hpp"
#include "../engine/dense/variant.hpp"
#include "moh.hpp"
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

struct act_options {
  /// A key is a sink of a head when its column-mean attention (the mean over the head's
  /// query rows of its probability) exceeds this; required, in (0, 1].
  double threshold = 0;
  double beta = 1;  ///< the calibrated sinks' attention is multiplied by this, in [0, 1]
  std::span<const index_t> heads{};  ///< the query heads calibrated; empty: every head
  softmax_options attention{};       ///< causal, window, scale, soft-cap, ALiBi, sinks, lse, threads
};

struct var_options {
  double p = 0;  ///< the fraction of the sink keys' attention moved to the targets, in [0, 1]
  std::span<const index_t> sink_keys{};          ///< key indices (< Sk), distinct
  std::span<const std::uint8_t> target_keys{};   ///< Sk flags: nonzero marks a target key
  std::span<const index_t> heads{};              ///< the query heads calibrated; empty: every head
  softmax_options attention{};                   ///< any option but mask (the targets are one)
};

namespace detail {

/// The query heads a calibration applies to: `heads` checked against H, or every head.
inline std::vector<std::uint8_t> chosen_heads(std::span<const index_t> heads, index_t H) {
  std::vector<std::uint8_t> on(std::size_t(H), heads.empty() ? 1 : 0);
  for (index_t h : heads) {
    require(h >= 0 && h < H, "options.heads: holds ", h, ", expected a query head in [0, ", H, ")");
    on[std::size_t(h)] = 1;
  }
  return on;
}

/// For row (b, h, i) of a validated problem: p_j = exp(s_j - lse) for the keys `keys`
/// (their logits through the engine's pipeline: scale, soft-cap, ALiBi, bias, score_mod,
/// band, mask, mask_mod) into p, their sum returned, and sum_j p_j v_j into pv (Dv).
template <class Backend, class T, class ScoreMod, class MaskMod>
T key_probabilities(const dense_problem<T>& pr, const custom_variant<ScoreMod, MaskMod>& custom,
                    index_t b, index_t h, index_t i, T lse, std::span<const index_t> keys, T* tile,
                    T* pv) noexcept {
  constexpr int W = vec<T, Backend>::width;
  const index_t D = pr.q.extent(3), Dv = pr.out.extent(3), hk = h / pr.terms.group;
  const index_t n = index_t(keys.size());
  query_columns<T> cols;
  start_columns(cols, pr.terms, b + pr.batch_base);
  cols.add(pr.terms, pr.heads(), h, i);
  cols.pad_to(W);
  const T* q = pr.q.ptr(b, h, i, 0);
  for (index_t r = 0; r < n; ++r) {
    const T* k = pr.kv.k.ptr(b, hk, keys[std::size_t(r)], 0);
    T s = 0;
    for (index_t d = 0; d < D; ++d) s += q[d] * k[d];
    std::fill(tile + r * W, tile + (r + 1) * W, T(0));
    tile[r * W] = s;
  }
  apply_logits<Backend>(cols, custom, pr.band, tile_cuts{}, tile, W,
                        [&](index_t r) { return keys[std::size_t(r)]; }, n);
  std::fill(pv, pv + Dv, T(0));
  T sum = 0;
  for (index_t r = 0; r < n; ++r) {
    const T p = tile[r * W] == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(tile[r * W] - lse);
    if (p == T(0)) continue;
    sum += p;
    const T* v = pr.kv.v.ptr(b, hk, keys[std::size_t(r)], 0);
    for (index_t d = 0; d < Dv; ++d) pv[d] += p * v[d];
  }
  return sum;
}

/// softmax_attention with options o, its lse written to o.lse or, when none is given, to
/// `own` (sized here); returns the lse's view.
template <class Backend, class ScoreMod, class MaskMod>
tensor_view<float, 3> attention_with_lse(tensor_view<const float, 4> q, tensor_view<const float, 4> k,
                                         tensor_view<const float, 4> v, tensor_view<float, 4> out,
                                         const softmax_options& o,
                                         const custom_variant<ScoreMod, MaskMod>& custom,
                                         std::vector<float>& own) {
  tensor_view<float, 3> lse = o.lse;
  if (!lse.data()) {
    const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2);
    own.assign(std::size_t(B * H * Sq), 0.f);
    lse = view<float, 3>(own.data(), {B, H, Sq});
  }
  softmax_options plain = o;
  plain.lse = lse;
  softmax_attention<Backend>(q, k, v, out, plain, custom);
  return lse;
}

/// Runs body(b, h, i, tile, pv) over the rows of the chosen heads, in parallel by (b, h);
/// tile holds `keys` x W values, pv Dv.
template <class Backend, class T, class Body>
void for_chosen_rows(const dense_problem<T>& pr, const std::vector<std::uint8_t>& on, index_t keys,
                     int threads, Body&& body) {
  constexpr int W = vec<T, Backend>::width;
  const index_t B = pr.batch(), H = pr.heads(), Sq = pr.queries(), Dv = pr.out.extent(3);
  const index_t per_thread = std::max<index_t>(keys, 1) * W + Dv;
  const double flops = 2.0 * double(B * H * Sq) * double(keys) * double(pr.q.extent(3) + Dv);
  const int used = threads_for_work(threads, flops, B * H);
  std::vector<T> scratch(std::size_t(used * per_thread));
  parallel_for(B * H, used, [&](index_t task, int thread) {
    const index_t b = task / H, h = task % H;
    if (!on[std::size_t(h)]) return;
    T* tile = scratch.data() + thread * per_thread;
    for (index_t i = 0; i < Sq; ++i) body(b, h, i, tile, tile + std::max<index_t>(keys, 1) * W);
  });
}

/// Subtracts lse(b, h, i) of query head h = h' * group + g from every logit of key' i:
/// the transposed problem's score_mod (its queries are the keys, its keys the queries).
template <class T>
struct minus_row_lse {
  const T* lse;
  index_t H, Sq, group, g;
  template <class S>
  S operator()(S score, index_t b, index_t hk, index_t, index_t i) const noexcept {
    return score - S(lse[(b * H + hk * group + g) * Sq + i]);
  }
};

/// sum_i p_ij for every (b, query head h, key j), (B, H, Sk) dense: per group member g,
/// the keys as queries against the queries of heads h' * group + g, each logit shifted
/// by -lse_i (minus_row_lse) and the band transposed; that call's lse is log sum_i p_ij.
/// `pr` is the validated problem of (q, k, options o) without bias or mask.
template <class Backend, class T>
std::vector<T> column_sums(const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
                           const dense_problem<T>& pr, const softmax_options& o,
                           const std::vector<T>& row_lse) {
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), D = q.extent(3);
  const index_t Hk = k.extent(1), Sk = k.extent(2), group = H / std::max<index_t>(Hk, 1);
  std::vector<float> column_lse(std::size_t(B * Hk * Sk));
  std::vector<T> sums(std::size_t(B * H * Sk));
  softmax_options t;
  t.align = o.align;
  t.scale = double(pr.terms.scale);
  t.softcap = o.softcap;
  t.window_left = pr.band.right;  // query i saw j in [i + off - left, i + off + right]
  t.window_right = pr.band.left;
  t.lse = view<float, 3>(column_lse.data(), {B, Hk, Sk});
  t.threads = o.threads;
  for (index_t g = 0; g < group; ++g) {
    const auto qg = view<const T, 4>(q.ptr(0, g, 0, 0), {B, Hk, Sq, D},
                                     {q.stride(0), group * q.stride(1), q.stride(2), q.stride(3)});
    const auto none = view<const T, 4>(q.data(), {B, Hk, Sq, 0});
    T unused = 0;
    const auto no_out = view<T, 4>(&unused, {B, Hk, Sk, 0}, {0, 0, 0, 1});
    if (pr.terms.alibi.data()) {
      const auto& a = pr.terms.alibi;
      t.alibi_slopes = view<const float, 2>(a.data() + g * a.stride(1), {a.extent(0), Hk},
                                            {a.stride(0), group * a.stride(1)});
    }
    softmax_attention<Backend>(k, qg, none, no_out, t,
                               with_score_mod(minus_row_lse<T>{row_lse.data(), H, Sq, group, g}));
    for (index_t b = 0; b < B; ++b)
      for (index_t hk = 0; hk < Hk; ++hk)
        for (index_t j = 0; j < Sk; ++j)
          sums[std::size_t((b * H + hk * group + g) * Sk + j)] =
              std::exp(T(column_lse[std::size_t((b * Hk + hk) * Sk + j)]));
  }
  return sums;
}

}  // namespace detail

/// ACT (Yu et al. 2024): softmax attention in which, per chosen head, the keys whose
/// column-mean attention exceeds options.threshold are sinks; every sink but the first
/// (the lowest key index: the initial token's, which the model needs) has its attention
/// multiplied by beta in every row, and the attention removed is given to the row's other
/// keys in proportion to their weights:
///   a_j = (1 / Sq) sum_i p_ij;  J = {j : a_j > threshold} minus its smallest index;
///   p'_ij = beta p_ij (j in J),  p'_ik = p_ik (L_i - beta C_i) / (L_i - C_i) (k not in J),
///   C_i = sum_{j in J} p_ij,  L_i = sum over every key of p_ik (1, or 1 minus a sink
///   logit's share with options.sinks: the removed mass goes to keys, not to the sink).
/// A row whose attention outside J, L_i - C_i, is within rounding of 0 (64 eps (|J| + 1)
/// L_i) is left as it is; the correction's relative error grows as eps L_i / (L_i - C_i)
/// for rows that keep little attention outside J.
///
///   q: (B, H, Sq, D)  k: (B, Hk, Sk, D)  v: (B, Hk, Sk, Dv)  out: (B, H, Sq, Dv)
///
/// fp32 (the correction reads the engine's fp32 lse). Options: causal, window, scale, soft-cap,
/// ALiBi, sinks (a sink logit's mass counts in every p_ij's denominator), lse (the plain
/// row's), threads. Three passes: the plain call with its lse; the column sums as the lse
/// of the transposed problem (QK^T only, no P V); and the correction over J per row.
/// Cost on every head: ~1.5x softmax_attention plus |J| (D + Dv) per row. Bitwise the same
/// for every thread count. Throws fovea::error naming the argument (options.threshold,
/// options.beta, options.heads, options.attention.bias / mask, which ACT does not take,
/// or any of softmax_attention's) before anything is written.
template <class Backend = default_backend>
void act_attention(tensor_view<const float, 4> q, tensor_view<const float, 4> k,
                   tensor_view<const float, 4> v, tensor_view<float, 4> out,
                   const act_options& options) {
  using detail::require;
  using T = float;
  const softmax_options& o = options.attention;
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2);
  auto pr = detail::make_softmax_problem<T>(q, k, v, out, o);
  require(std::isfinite(options.threshold) && options.threshold > 0 && options.threshold <= 1,
          "options.threshold: is ", options.threshold, ", expected in (0, 1]");
  require(options.beta >= 0 && options.beta <= 1, "options.beta: is ", options.beta,
          ", expected in [0, 1]");
  require(!pr.terms.bias.data() && !o.mask.data(), "options.attention.bias / mask: ACT takes neither ",
          "(its column means run the problem transposed)");
  const auto on = detail::chosen_heads(options.heads, H);
  const index_t Sk = k.extent(2), Dv = v.extent(3);
  const int threads = detail::resolve_threads(o.threads);

  // 1. The plain call, with the lse.
  std::vector<float> own_lse;
  const auto lse = detail::attention_with_lse<Backend>(q, k, v, out, o, custom_variant<>{}, own_lse);
  if (B * H * Sq == 0 || Sk == 0) return;
  std::vector<T> row_lse(std::size_t(B * H * Sq));
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Sq; ++i) row_lse[std::size_t((b * H + h) * Sq + i)] = T(lse(b, h, i));

  // 2. Column sums of the attention (mean = sum / Sq).
  const auto column_sum = detail::column_sums<Backend>(q, k, pr, o, row_lse);

  // 3. Per chosen (b, h): J; per row: C, sum_J p v, and the correction.
  std::vector<std::vector<index_t>> calibrated(std::size_t(B * H));
  index_t most = 0;
  for (index_t bh = 0; bh < B * H; ++bh) {
    if (!on[std::size_t(bh % H)]) continue;
    auto& J = calibrated[std::size_t(bh)];
    for (index_t j = 0; j < Sk; ++j)
      if (column_sum[std::size_t(bh * Sk + j)] / T(Sq) > T(options.threshold)) J.push_back(j);
    if (!J.empty()) J.erase(J.begin());  // the first sink stays
    most = std::max(most, index_t(J.size()));
  }
  const T beta = T(options.beta);
  detail::for_chosen_rows<Backend>(pr, on, most, threads, [&](index_t b, index_t h, index_t i, T* tile, T* pv) {
    const auto& J = calibrated[std::size_t(b * H + h)];
    if (J.empty()) return;
    const T lse_i = row_lse[std::size_t((b * H + h) * Sq + i)];
    const T C = detail::key_probabilities<Backend>(pr, custom_variant<>{}, b, h, i, lse_i, J, tile, pv);
    // The keys' mass L (all of it, but a sink logit's share) and R = L - C outside J. A row
    // whose R is within rounding of 0 has no other key to give the mass to (or is NaN).
    const T L = pr.terms.sinks.data() ? T(1) - std::exp(T(pr.terms.sinks(h)) - lse_i) : T(1);
    const T R = L - C;
    if (!(R > T(64) * std::numeric_limits<T>::epsilon() * T(J.size() + 1) * L)) return;
    const T f = (L - beta * C) / R;
    T* row = out.ptr(b, h, i, 0);
    for (index_t d = 0; d < Dv; ++d) row[d] = f * row[d] + (beta - f) * pv[d];
  });
}

/// VAR (Kang et al. 2025): softmax attention in which, per chosen head, a fraction p of the
/// attention on the sink keys moves to the target keys (the image tokens, in the paper) in
/// proportion to their weights; other keys keep theirs:
///   p'_ij = (1 - p) p_ij (j a sink),  p'_ik = p_ik (1 + p S_i / T_i) (k a target),
///   S_i = sum_sinks p_ij,  T_i = sum_targets p_ik.
/// A row that sees no target (T_i = 0) is left as it is. Sinks and targets are disjoint.
///
///   q: (B, H, Sq, D)  k: (B, Hk, Sk, D)  v: (B, Hk, Sk, Dv)  out: (B, H, Sq, Dv)
///
/// fp32 (the correction reads the engine's fp32 lse). Every softmax option but mask (the
/// targets are applied as one), and
/// the user's score_mod / mask_mod. Two engine calls (the plain one with its lse, and the
/// chosen heads over the targets only, through head_sparse_attention) and per row the
/// sinks' probabilities: ~2x softmax_attention. Bitwise the same for every thread count.
/// Throws fovea::error naming the argument (options.p, options.sink_keys,
/// options.target_keys, options.heads, options.attention.mask, or any of
/// softmax_attention's) before anything is written.
template <class Backend = default_backend, class ScoreMod = identity_score_mod,
          class MaskMod = keep_all_mask_mod>
void var_attention(tensor_view<const float, 4> q, tensor_view<const float, 4> k,
                   tensor_view<const float, 4> v, tensor_view<float, 4> out,
                   const var_options& options, const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  using detail::require;
  using T = float;
  const softmax_options& o = options.attention;
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), Sk = k.extent(2), Dv = v.extent(3);
  const auto pr = detail::make_softmax_problem<T>(q, k, v, out, o);
  require(options.p >= 0 && options.p <= 1, "options.p: is ", options.p, ", expected in [0, 1]");
  require(!o.mask.data(), "options.attention.mask: VAR takes none (the targets are its mask)");
  require(index_t(options.target_keys.size()) == Sk, "options.target_keys: holds ",
          options.target_keys.size(), " flags, expected one per key (", Sk, ")");
  std::vector<std::uint8_t> is_sink(std::size_t(Sk), 0);
  for (index_t j : options.sink_keys) {
    require(j >= 0 && j < Sk, "options.sink_keys: holds ", j, ", expected a key in [0, ", Sk, ")");
    require(!is_sink[std::size_t(j)], "options.sink_keys: holds ", j, " twice");
    require(!options.target_keys[std::size_t(j)], "options.sink_keys: key ", j,
            " is also a target (options.target_keys)");
    is_sink[std::size_t(j)] = 1;
  }
  const auto on = detail::chosen_heads(options.heads, H);
  const int threads = detail::resolve_threads(o.threads);

  std::vector<float> own_lse;
  const auto lse = detail::attention_with_lse<Backend>(q, k, v, out, o, custom, own_lse);
  if (B * H * Sq == 0 || Sk == 0 || options.sink_keys.empty()) return;

  // The chosen heads over the targets alone (normalised among them), with their lse.
  std::vector<T> targets(std::size_t(B * H * Sq * Dv));
  std::vector<float> target_lse(std::size_t(B * H * Sq)), rows(std::size_t(B * H * Sq));
  for (index_t bh = 0; bh < B * H; ++bh)
    std::fill_n(rows.begin() + bh * Sq, Sq, on[std::size_t(bh % H)] ? 1.f : 0.f);
  softmax_options over_targets = o;  // (a sink logit is no target: o_T is normalised over them)
  over_targets.sinks = {};
  over_targets.mask = view<const std::uint8_t, 4>(options.target_keys.data(), {1, 1, 1, Sk});
  over_targets.lse = view<float, 3>(target_lse.data(), {B, H, Sq});
  head_sparse_attention<Backend>(q, k, v, view<T, 4>(targets.data(), {B, H, Sq, Dv}),
                                 view<const float, 3>(rows.data(), {B, H, Sq}), over_targets, custom);

  const T p = T(options.p);
  detail::for_chosen_rows<Backend>(pr, on, index_t(options.sink_keys.size()), threads,
                                   [&](index_t b, index_t h, index_t i, T* tile, T* pv) {
    const std::size_t r = std::size_t((b * H + h) * Sq + i);
    if (target_lse[r] == -INFINITY) return;  // no target in view: nothing moves
    const T S = detail::key_probabilities<Backend>(pr, custom, b, h, i, T(lse(b, h, i)),
                                                   options.sink_keys, tile, pv);
    const T* o_t = targets.data() + r * std::size_t(Dv);
    T* row = out.ptr(b, h, i, 0);
    for (index_t d = 0; d < Dv; ++d) row[d] += p * (S * o_t[d] - pv[d]);
  });
}

}  // namespace fovea
