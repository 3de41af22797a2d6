// fovea::dynamic_mask_attention: trainable dynamic mask attention (DMA; Shi et al. 2025,
// flash-dmattn / flash-sparse-attention). Each query row keeps the `keep` keys with the
// largest bias among those the causal and padding masks allow, and attends to them with
// scores scale * q.k + bias. The kept sets become key pieces for the block-sparse engine:
// keys no row of a tile keeps are never loaded, keys every row keeps need no mask, and
// only the few keys some rows keep and others drop are checked per element.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "../core/error.hpp"
#include "../core/parallel.hpp"
#include "../core/scratch.hpp"
#include "../core/tensor_view.hpp"
#include "../core/validate.hpp"
#include "../engine/sparse/sparse.hpp"
#include "../engine/sparse/sparse_backward.hpp"
#include "../engine/select/topk.hpp"
#include "../engine/dense/variant.hpp"
#include "../simd/backend.hpp"
#include "softmax.hpp"
#include "softmax_backward.hpp"

namespace fovea {

struct dynamic_mask_options {
  bool causal = false;                        ///< bottom-right aligned, as softmax_options
  index_t keep = 2048;                        ///< keys kept per query row (keep_window_size); >= 1
  std::optional<double> scale{};              ///< default 1/sqrt(D)
  double softcap = 0;                         ///< 0: off
  tensor_view<const std::uint8_t, 4> mask{};  ///< padding mask, nonzero keeps; as bias
  tensor_view<float, 3> lse{};                ///< out, optional (B, H, Sq)
  tensor_view<const float, 3> k_scale{}, v_scale{};  ///< int8 / fp8 caches, as softmax_options
  int threads = 0;                            ///< 0: all OpenMP offers; 1: serial
};

/// How the bias is made from dt: the current reference's A * softplus(dt), or the
/// paper-era zero-order hold exp(A * softplus(dt)).
enum class dynamic_mask_form { softplus, zoh_exp };

namespace detail {

/// softplus(dt), the forward's bias and the bias's derivatives in dt and in A.
struct dma_bias_terms {
  double bias, d_dt, d_a;
};
inline dma_bias_terms dma_bias_of(double dt, double a, dynamic_mask_form form) noexcept {
  const double softplus = dt > 20 ? dt : std::log1p(std::exp(dt));
  const double sigmoid = 1 / (1 + std::exp(-dt));
  const double x = a * softplus;
  if (form == dynamic_mask_form::softplus) return {x, a * sigmoid, softplus};
  const double y = std::exp(x);
  return {y, y * a * sigmoid, y * softplus};
}

/// dt(b, h, t) = dt_bias(h) + sum over (g, d) of v(b, g, t, d) w_dt(h, g * Dv + d).
template <class TV>
double dma_dt(const tensor_view<TV, 4>& v, const tensor_view<const float, 2>& w_dt,
              const tensor_view<const float, 1>& dt_bias, index_t b, index_t h, index_t t) noexcept {
  const index_t Hk = v.extent(1), Dv = v.extent(3);
  double dt = dt_bias.data() ? double(dt_bias(h)) : 0.0;
  for (index_t g = 0; g < Hk; ++g)
    for (index_t d = 0; d < Dv; ++d) dt += double(float(v(b, g, t, d))) * double(w_dt(h, g * Dv + d));
  return dt;
}

/// dynamic_mask_bias's inputs, checked; `to` names the view checked against the bias's
/// (B, Hk, 1, Sk) extents.
template <class S>
void check_dma_bias_inputs(const tensor_view<const S, 4>& v, const tensor_view<const float, 2>& w_dt,
                           const tensor_view<const float, 1>& a,
                           const tensor_view<const float, 1>& dt_bias) {
  check_rows(v, "v");
  const index_t Hk = v.extent(1), Dv = v.extent(3);
  check_data(w_dt, "w_dt");
  require(w_dt.extent(0) == Hk && w_dt.extent(1) == Hk * Dv, "w_dt: extents are (",
          w_dt.extent(0), ", ", w_dt.extent(1), "), expected (", Hk, ", ", Hk * Dv, ")");
  check_data(a, "a");
  require(a.extent(0) == Hk, "a: extent 0 is ", a.extent(0), ", expected ", Hk);
  if (dt_bias.data() != nullptr || !dt_bias.empty()) {
    check_data(dt_bias, "dt_bias");
    require(dt_bias.extent(0) == Hk, "dt_bias: extent 0 is ", dt_bias.extent(0), ", expected ", Hk);
  }
}

template <class E>
void check_bias_extents(const tensor_view<E, 4>& x, const char* name, index_t B, index_t Hk,
                        index_t Sk) {
  check_data(x, name);
  const index_t want[4] = {B, Hk, 1, Sk};
  for (std::size_t r = 0; r < 4; ++r)
    require(x.extent(r) == want[r], name, ": extent ", r, " is ", x.extent(r), ", expected ",
            want[r], " (B, Hk, 1, Sk)");
}

}  // namespace detail

/// The DMA bias from value states: dt = concat_heads(v) W_dt^T (+ dt_bias), mixing all
/// key/value heads, then bias = A * softplus(dt) (or exp of it). A is usually negative
/// (trained models store A = -exp(A_log), as Mamba does), so the bias is <= 0 and keys
/// with a small dt are preferred; a positive A works the same way with the order reversed.
///   v: (B, Hk, Sk, Dv)   w_dt: (Hk, Hk * Dv)   a: (Hk)   dt_bias: (Hk) or empty
///   bias (out): (B, Hk, 1, Sk), ready for dynamic_mask_attention.
template <class TV>
requires is_storage_type_v<std::remove_const_t<TV>>
void dynamic_mask_bias(tensor_view<TV, 4> v, tensor_view<const float, 2> w_dt,
                       tensor_view<const float, 1> a, tensor_view<float, 4> bias,
                       dynamic_mask_form form = dynamic_mask_form::softplus,
                       tensor_view<const float, 1> dt_bias = {}) {
  using S = std::remove_const_t<TV>;
  const tensor_view<const S, 4> vc = v;
  detail::check_dma_bias_inputs(vc, w_dt, a, dt_bias);
  const index_t B = v.extent(0), Hk = v.extent(1), Sk = v.extent(2);
  detail::check_bias_extents(bias, "bias", B, Hk, Sk);
  detail::check_one_to_one(bias, "bias");
  detail::check_no_alias(bias, "bias", vc, "v");
  detail::check_no_alias(bias, "bias", w_dt, "w_dt");
  detail::check_no_alias(bias, "bias", a, "a");
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < Sk; ++t)
      for (index_t h = 0; h < Hk; ++h)
        bias(b, h, 0, t) =
            float(detail::dma_bias_of(detail::dma_dt(vc, w_dt, dt_bias, b, h, t), double(a(h)), form).bias);
}

/// Gradients of dynamic_mask_bias: given its inputs and dbias = d loss / d bias (from
/// dynamic_mask_attention_backward), writes dw_dt, da and, if given, ddt_bias, and adds
/// v's share (through dt) to dv, which then holds v's gradient through the attention and
/// the bias together.
///   v: (B, Hk, Sk, Dv)   w_dt: (Hk, Hk * Dv)   a, dt_bias: (Hk)   dbias: (B, Hk, 1, Sk)
///   dv: like v, added to   dw_dt: like w_dt, da: (Hk), ddt_bias: (Hk) or empty: overwritten
/// With d dt = dbias * A * sigmoid(dt) (softplus form; times the bias for zoh_exp):
/// da = sum over (b, t) of dbias * softplus(dt) (times the bias for zoh_exp), ddt_bias =
/// sum of d dt, dw_dt(h, g Dv + d) = sum of d dt(b, h, t) v(b, g, t, d), dv(b, g, t, d) +=
/// sum over h of d dt(b, h, t) w_dt(h, g Dv + d). Computed in double, serially, in a fixed
/// order (deterministic); NaN in dbias propagates. A trained A = -exp(A_log) has d A_log =
/// da * A, the caller's. Bad arguments throw fovea::error before any write.
template <class TV, class S>
requires is_storage_type_v<std::remove_const_t<TV>> && is_storage_type_v<S>
void dynamic_mask_bias_backward(tensor_view<TV, 4> v, tensor_view<const float, 2> w_dt,
                                tensor_view<const float, 1> a, tensor_view<const float, 4> dbias,
                                tensor_view<S, 4> dv, tensor_view<float, 2> dw_dt,
                                tensor_view<float, 1> da,
                                dynamic_mask_form form = dynamic_mask_form::softplus,
                                tensor_view<const float, 1> dt_bias = {},
                                tensor_view<float, 1> ddt_bias = {}) {
  using namespace detail;
  using SV = std::remove_const_t<TV>;
  const tensor_view<const SV, 4> vc = v;
  check_dma_bias_inputs(vc, w_dt, a, dt_bias);
  const index_t B = v.extent(0), Hk = v.extent(1), Sk = v.extent(2), Dv = v.extent(3);
  check_bias_extents(dbias, "dbias", B, Hk, Sk);
  check_data(dv, "dv");
  for (std::size_t r = 0; r < 4; ++r)
    require(dv.extent(r) == v.extent(r), "dv: extent ", r, " is ", dv.extent(r), ", expected ",
            v.extent(r), " as v");
  check_one_to_one(dv, "dv");
  check_data(dw_dt, "dw_dt");
  require(dw_dt.extent(0) == Hk && dw_dt.extent(1) == Hk * Dv, "dw_dt: extents are (",
          dw_dt.extent(0), ", ", dw_dt.extent(1), "), expected (", Hk, ", ", Hk * Dv, ")");
  check_one_to_one(dw_dt, "dw_dt");
  check_data(da, "da");
  require(da.extent(0) == Hk, "da: extent 0 is ", da.extent(0), ", expected ", Hk);
  const bool want_dt_bias = ddt_bias.data() != nullptr || !ddt_bias.empty();
  if (want_dt_bias) {
    require(dt_bias.data() != nullptr, "ddt_bias: given, but dt_bias is not");
    check_data(ddt_bias, "ddt_bias");
    require(ddt_bias.extent(0) == Hk, "ddt_bias: extent 0 is ", ddt_bias.extent(0), ", expected ", Hk);
  }
  check_no_alias(dw_dt, "dw_dt", vc, "v");
  check_no_alias(dw_dt, "dw_dt", w_dt, "w_dt");
  check_no_alias(dw_dt, "dw_dt", dbias, "dbias");
  check_no_alias(dw_dt, "dw_dt", dv, "dv");
  for (const auto& [out, name] : {std::pair{da, "da"}, std::pair{ddt_bias, "ddt_bias"}}) {
    check_no_alias(out, name, vc, "v");
    check_no_alias(out, name, w_dt, "w_dt");
    check_no_alias(out, name, a, "a");
    check_no_alias(out, name, dt_bias, "dt_bias");
    check_no_alias(out, name, dbias, "dbias");
    check_no_alias(out, name, dv, "dv");
    check_no_alias(out, name, dw_dt, "dw_dt");
  }
  check_no_alias(da, "da", ddt_bias, "ddt_bias");
  check_no_alias(dv, "dv", vc, "v");
  check_no_alias(dv, "dv", w_dt, "w_dt");
  check_no_alias(dv, "dv", dbias, "dbias");

  std::vector<double> dw(std::size_t(Hk * Hk * Dv), 0.0), d_a(Hk, 0.0), d_dt_bias(Hk, 0.0), ddt(Hk);
  std::vector<double> share(std::size_t(Hk * Dv));
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < Sk; ++t) {
      for (index_t h = 0; h < Hk; ++h) {
        const auto terms = dma_bias_of(dma_dt(vc, w_dt, dt_bias, b, h, t), double(a(h)), form);
        const double g = double(dbias(b, h, 0, t));
        ddt[h] = g * terms.d_dt;
        d_a[h] += g * terms.d_a;
        d_dt_bias[h] += ddt[h];
      }
      std::fill(share.begin(), share.end(), 0.0);
      for (index_t h = 0; h < Hk; ++h)
        for (index_t g = 0; g < Hk; ++g)
          for (index_t d = 0; d < Dv; ++d) {
            dw[(h * Hk + g) * Dv + d] += ddt[h] * double(float(vc(b, g, t, d)));
            share[g * Dv + d] += ddt[h] * double(w_dt(h, g * Dv + d));
          }
      for (index_t g = 0; g < Hk; ++g)
        for (index_t d = 0; d < Dv; ++d) dv(b, g, t, d) = S(double(dv(b, g, t, d)) + share[g * Dv + d]);
    }
  for (index_t h = 0; h < Hk; ++h) {
    for (index_t c = 0; c < Hk * Dv; ++c) dw_dt(h, c) = float(dw[h * Hk * Dv + c]);
    da(h) = float(d_a[h]);
    if (want_dt_bias) ddt_bias(h) = float(d_dt_bias[h]);
  }
}

namespace detail {

/// Keys ranking at or above the bar are kept. Rank: bias, higher first (NaN above +inf,
/// so a NaN bias is kept and propagates), then position, lower first.
struct rank_bar {
  float value = -std::numeric_limits<float>::infinity();
  index_t index = std::numeric_limits<index_t>::max();
};
inline float rank_value(float bias) noexcept {  // NaN ranks first; -0 ties with +0
  return std::isnan(bias) ? std::numeric_limits<float>::infinity() : bias == 0 ? 0.0f : bias;
}
inline bool ranks_above(float r1, index_t j1, float r2, index_t j2) noexcept {
  return r1 > r2 || (r1 == r2 && j1 < j2);
}
inline bool kept(float bias, index_t j, const rank_bar& bar) noexcept {
  return !ranks_above(bar.value, bar.index, rank_value(bias), j);
}

/// The bar of every query row of one (batch, selection head): rows keep their `keep`
/// highest-ranked allowed keys. allowed(i, j) is the band and the padding mask.
struct dma_selection {
  index_t heads = 0;  ///< selection heads: H (per query head) or Hk
  bool per_query_head = false;
  std::vector<rank_bar> bars;  ///< (B, heads, Sq)
};

template <class S, class K, class V>
dma_selection select_kept(const dense_problem<S, K, V>& pr, index_t keep, int threads) {
  const index_t B = pr.batch(), H = pr.heads(), Sq = pr.queries(), Hk = pr.kv.heads();
  const index_t Sk = pr.keys, group = pr.terms.group;
  const auto& bias = pr.terms.bias;
  const auto& mask = pr.terms.mask;
  dma_selection sel;
  sel.per_query_head = bias.extent(1) == H || (mask.data() && mask.extent(1) == H);
  sel.heads = sel.per_query_head ? H : Hk;
  sel.bars.resize(B * sel.heads * Sq);
  const bool per_row = bias.extent(2) != 1 || (mask.data() && mask.extent(2) != 1);
  const int used =
      int(std::min<index_t>(std::max(threads, 1), std::max<index_t>(1, B * sel.heads)));
  struct ranked {
    float rank;
    index_t j;
  };
  // Rows that share ranks and allow the same keys (one row, or no causal/window cut
  // between them) share one selection: a radix top-k over the allowed keys, O(Sk).
  const bool same_keys =
      !per_row && Sq > 0 && pr.band.keys_for(0, 1) == pr.band.keys_for(Sq - 1, Sq);
  // Per thread: every allowed key of a row (per_row), the heap of the best `keep`, or a
  // streaming top-k's buffer (same_keys). Not zeroed: each task writes before it reads.
  const index_t capacity = streaming_capacity(Sk, keep);
  const scratch_slices<ranked> scratch(same_keys ? 0 : used, per_row ? Sk + 1 : std::min(keep, Sk) + 1);
  const scratch_slices<std::uint64_t> radix(same_keys ? used : 0, 2 * capacity);
  // Heap order: the lowest-ranked key on top.
  auto lower_on_top = [](const ranked& x, const ranked& y) {
    return ranks_above(x.rank, x.j, y.rank, y.j);
  };

  parallel_for(B * sel.heads, used, [&](index_t task, int thread) {
    const index_t b = task / sel.heads, sh = task % sel.heads;
    const index_t h = sel.per_query_head ? sh : sh * group;  // a query head of the selection
    const auto bias_plane = bind_plane(bias, b, h, H, group);
    const auto mask_plane = bind_plane(mask, b, h, H, group);
    auto allowed = [&](index_t i, index_t j) {
      return pr.band.visible(i, j) && (!mask_plane.base || mask_plane(i, j) != 0);
    };
    ranked* pool = same_keys ? nullptr : scratch.slice(thread);
    rank_bar* bars = sel.bars.data() + task * Sq;
    auto bar_of = [&](index_t count) {  // the lowest kept, or keep-all
      return count < keep ? rank_bar{} : rank_bar{pool[0].rank, pool[0].j};
    };
    if (per_row) {  // every row ranks its own keys: O(Sq * Sk)
      for (index_t i = 0; i < Sq; ++i) {
        index_t n = 0;
        for (index_t j = 0; j < Sk; ++j)
          if (allowed(i, j)) pool[n++] = {rank_value(bias_plane(i, j)), j};
        bars[i] = rank_bar{};  // at most `keep` allowed: keep them all
        if (n > keep) {
          std::nth_element(pool, pool + keep - 1, pool + n, [&](const ranked& x, const ranked& y) {
            return ranks_above(x.rank, x.j, y.rank, y.j);
          });
          bars[i] = {pool[keep - 1].rank, pool[keep - 1].j};
        }
      }
      return;
    }
    if (same_keys) {
      streaming_top_k best(keep, radix.slice(thread), capacity);
      const auto [first, last] = pr.band.keys_for(0, 1);
      for (index_t j = first; j < last; ++j)
        if (!mask_plane.base || mask_plane(0, j) != 0)
          best.push(rank_key(rank_value(bias_plane(0, j)), j));
      rank_bar bar{};
      if (best.seen() >= keep) {
        const auto j = index_t(~std::uint32_t(best.bar()));
        bar = {rank_value(bias_plane(0, j)), j};
      }
      std::fill(bars, bars + Sq, bar);
      return;
    }
    // The rows share their ranks; row i allows a prefix of keys (when causal) that grows
    // with i, so one heap of the best `keep` serves every row: O(Sk log keep).
    index_t n = 0, next = 0;
    for (index_t i = 0; i < Sq; ++i) {
      const index_t end = pr.band.keys_for(i, i + 1).second;
      for (; next < end; ++next) {
        if (!allowed(i, next)) continue;
        const ranked r{rank_value(bias_plane(0, next)), next};
        if (n < keep) {
          pool[n++] = r;
          std::push_heap(pool, pool + n, lower_on_top);
        } else if (ranks_above(r.rank, r.j, pool[0].rank, pool[0].j)) {
          std::pop_heap(pool, pool + n, lower_on_top);
          pool[n - 1] = r;
          std::push_heap(pool, pool + n, lower_on_top);
        }
      }
      bars[i] = bar_of(n);
    }
  });
  return sel;
}

/// A DMA selection as the block-sparse engines take it: operator() writes the key pieces
/// of (b, selection head, block of bq queries), keys some of its rows keep, flagged where
/// others drop them; keeps(b, h, i, j) is the exact per-pair test for those pieces.
template <class S, class K, class V>
struct dma_kept {
  const dense_problem<S, K, V>& pr;
  const dma_selection& sel;
  index_t bq = 64;

  dma_kept(const dense_problem<S, K, V>& problem, const dma_selection& selection) noexcept
      : pr(problem), sel(selection) {}

  /// The most key pieces one selection can list: each of its rows keeps `keep` keys among
  /// those it sees, and the keys above its bar that it cannot see are listed too (flagged):
  /// fewer than bq past the causal edge, any number when a mask hides keys.
  index_t max_pieces(index_t keep) const noexcept {
    const index_t Sk = pr.keys;
    if (pr.terms.mask.data()) return Sk;
    return std::min(Sk, std::min(bq, pr.queries()) * std::min(keep, Sk) + bq);
  }
  const rank_bar* bars_of(index_t b, index_t sh) const noexcept {
    return sel.bars.data() + (b * sel.heads + sh) * pr.queries();
  }
  index_t operator()(index_t b, index_t sh, index_t block, key_piece* pieces) const noexcept {
    const index_t H = pr.heads(), group = pr.terms.group;
    const index_t i0 = block * bq, i1 = std::min(pr.queries(), i0 + bq);
    const rank_bar* bars = bars_of(b, sh);
    const index_t h = sel.per_query_head ? sh : sh * group;
    const auto plane = bind_plane(pr.terms.bias, b, h, H, group);
    const index_t last = pr.band.keys_for(i0, i1).second;
    index_t count = 0;
    if (pr.terms.bias.extent(2) != 1) {  // each row ranks the key by its own bias
      for (index_t j = 0; j < last; ++j) {
        bool some = false, every = true;
        for (index_t i = i0; i < i1; ++i) {
          const bool in = kept(plane(i, j), j, bars[i]);
          some = some || in;
          every = every && in;
        }
        if (some) count = append_piece(pieces, count, j, j + 1, !every);
      }
      return count;
    }
    // One rank per key: kept by some row iff at or above the lowest bar, by every row iff
    // at or above the highest.
    rank_bar lowest = bars[i0], highest = bars[i0];
    for (index_t i = i0 + 1; i < i1; ++i) {
      if (ranks_above(lowest.value, lowest.index, bars[i].value, bars[i].index)) lowest = bars[i];
      if (ranks_above(bars[i].value, bars[i].index, highest.value, highest.index)) highest = bars[i];
    }
    for (index_t j = 0; j < last; ++j) {
      const float b = plane(0, j);
      if (kept(b, j, lowest)) count = append_piece(pieces, count, j, j + 1, !kept(b, j, highest));
    }
    return count;
  }
  bool keeps(index_t b, index_t h, index_t i, index_t j) const noexcept {
    const index_t group = pr.terms.group;
    const auto plane = bind_plane(pr.terms.bias, b, h, pr.heads(), group);
    return kept(plane(i, j), j, bars_of(b, sel.per_query_head ? h : h / group)[i]);
  }
  /// The exact test as a mask_mod, for the pieces flagged.
  auto mask() const noexcept {
    return with_mask_mod([this](index_t b, index_t h, index_t i, index_t j) { return keeps(b, h, i, j); });
  }
};

/// The softmax options a dynamic_mask_options call runs with.
inline softmax_options dma_softmax_options(const dynamic_mask_options& options,
                                           tensor_view<const float, 4> bias) {
  softmax_options o = sparse_softmax_options(options, options.causal);
  o.softcap = options.softcap;
  o.bias = bias;
  o.mask = options.mask;
  return o;
}

/// The checks of the bias and options that softmax_options do not make.
inline void check_dma_call(tensor_view<const float, 4> bias, const dynamic_mask_options& options,
                           index_t B, index_t H, index_t Hk, index_t Sq, index_t Sk) {
  require(bias.data() != nullptr || B * H * Sq * Sk == 0,
          "bias: is required (a (B|1, H|Hk|1, Sq|1, Sk|1) view)");
  check_broadcast(bias, "bias", B, H, Hk, Sq, Sk);
  require(options.keep >= 1, "options.keep: is ", options.keep, ", expected >= 1");
}

}  // namespace detail

/// Dynamic mask attention: each query row attends, with scores scale * q.k + bias, to the
/// `keep` allowed keys of largest bias (all of them when it allows at most `keep`);
/// allowed = the causal band and the padding mask. Ties in bias go to the earlier key; a
/// NaN bias ranks first. A row that keeps no key outputs 0 (lse -inf).
///
///   q: (B, H, Sq, D)   k: (B, Hk, Sk, D)   v: (B, Hk, Sk, Dv)   out: (B, H, Sq, Dv)
///   bias: (B|1, H|Hk|1, Sq|1, Sk|1), typically (B, Hk, 1, Sk) from dynamic_mask_bias.
///
/// When neither bias nor mask varies along the query rows (the reference's form), the
/// selection costs O(Sk log keep) per head and attention O(Sq * keep); otherwise each row
/// ranks its keys (O(Sq * Sk) comparisons). Bitwise the same for every thread count.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void dynamic_mask_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                            tensor_view<TO, 4> out, tensor_view<const float, 4> bias,
                            const dynamic_mask_options& options = {}) {
  detail::check_dma_call(bias, options, q.extent(0), q.extent(1), k.extent(1), q.extent(2),
                         k.extent(2));
  detail::check_no_alias(out, "out", bias, "bias");
  const auto pr = detail::make_softmax_problem<TO>(q, k, v, out, detail::dma_softmax_options(options, bias));
  const int threads = detail::resolve_threads(options.threads);
  const detail::dma_selection sel = detail::select_kept(pr, options.keep, threads);
  const detail::dma_kept kept{pr, sel};
  const detail::sparse_rows rows{kept.bq, sel.per_query_head, kept.max_pieces(options.keep)};
  detail::run_sparse<Backend>(pr, rows, kept, kept.mask(), threads);
}

/// Gradients of dynamic_mask_attention: given the forward's inputs (the same bias and
/// options), its output `out`, the log-sum-exp it returned (options.lse of the forward
/// call) and dout = d loss / d out, writes dq, dk, dv and, if given, dbias = d loss / d
/// bias. As in the reference implementation (flash-dmattn's backward), the top-`keep`
/// selection is not differentiated: it is made again from the bias exactly as the forward
/// made it, and gradients flow through the kept keys' logits only; keys no row keeps get
/// zero dk, dv and dbias.
///
///   q: (B, H, Sq, D)   k: (B, Hk, Sk, D)   v: (B, Hk, Sk, Dv)   out, dout: (B, H, Sq, Dv)
///   bias: as the forward's   lse: (B, H, Sq)   dq like q, dk like k, dv like v (overwritten)
///   dbias: the bias's extents, (B, H|Hk, 1, Sk) (summed over the queries and, for Hk
///          heads, over each group's query heads: the form dynamic_mask_bias makes) or
///          (B, H, Sq, Sk); overwritten. Its gradient flows on to dynamic_mask_bias_backward.
///
/// Algorithm: the dense backward's tiles (FlashAttention-2's, every option of the forward:
/// causal, soft-cap, padding mask, scale, GQA) over the kept keys only, gathered 64 at a
/// time, so it costs O(Sq * keep) as the forward does. Bitwise the same for any thread
/// count. A row that kept no key gives zero gradients; NaN rules as in the forward. All
/// of q, k, v, out, dout and the gradients in one type (float, double, bf16, fp16; bf16 and
/// fp16 computed in float); int8 / fp8 caches (options.k_scale) have no backward. Bad
/// arguments throw fovea::error before any write.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO, class TG,
          class TL, class S>
requires detail::attention_types<TQ, TK, TV, S> && std::is_same_v<std::remove_const_t<TO>, S> &&
         std::is_same_v<std::remove_const_t<TG>, S> && std::is_same_v<std::remove_const_t<TL>, float>
void dynamic_mask_attention_backward(tensor_view<TQ, 4> q, tensor_view<TK, 4> k,
                                     tensor_view<TV, 4> v, tensor_view<TO, 4> out,
                                     tensor_view<const float, 4> bias, tensor_view<TG, 4> dout,
                                     tensor_view<TL, 3> lse, tensor_view<S, 4> dq,
                                     tensor_view<S, 4> dk, tensor_view<S, 4> dv,
                                     const dynamic_mask_options& options = {},
                                     tensor_view<float, 4> dbias = {}) {
  using namespace detail;
  const tensor_view<const S, 4> cq = q, ck = k, cv = v, co = out, cg = dout;
  const tensor_view<const float, 3> cl = lse;
  check_dma_call(bias, options, q.extent(0), q.extent(1), k.extent(1), q.extent(2), k.extent(2));
  require(options.k_scale.data() == nullptr && options.v_scale.data() == nullptr,
          "options.k_scale: int8 / fp8 caches have no backward");
  backward_problem<S> bp =
      make_backward_problem(cq, ck, cv, co, cg, cl, dq, dk, dv, dma_softmax_options(options, bias));
  if (dbias.data() != nullptr || !dbias.empty()) {
    bp.dbias = dbias;
    bp.dbias_per_key = check_dbias(dbias, bias, cq, ck, cv, co, cg, dq, dk, dv, "dbias", "bias");
  }
  const int threads = resolve_threads(options.threads);
  const dma_selection sel = select_kept(bp.forward, options.keep, threads);
  const dma_kept kept{bp.forward, sel};
  const sparse_rows rows{kept.bq, sel.per_query_head, kept.max_pieces(options.keep)};
  run_sparse_backward<Backend>(bp, rows, kept, kept.mask(), threads);
}

}  // namespace fovea
