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
#include "../core/tensor_view.hpp"
#include "../core/validate.hpp"
#include "../engine/sparse/sparse.hpp"
#include "../engine/select/topk.hpp"
#include "../engine/dense/variant.hpp"
#include "../simd/backend.hpp"
#include "softmax.hpp"

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
  detail::check_rows(vc, "v");
  const index_t B = v.extent(0), Hk = v.extent(1), Sk = v.extent(2), Dv = v.extent(3);
  detail::check_data(w_dt, "w_dt");
  detail::require(w_dt.extent(0) == Hk && w_dt.extent(1) == Hk * Dv, "w_dt: extents are (",
                  w_dt.extent(0), ", ", w_dt.extent(1), "), expected (", Hk, ", ", Hk * Dv, ")");
  detail::check_data(a, "a");
  detail::require(a.extent(0) == Hk, "a: extent 0 is ", a.extent(0), ", expected ", Hk);
  if (dt_bias.data() != nullptr || !dt_bias.empty()) {
    detail::check_data(dt_bias, "dt_bias");
    detail::require(dt_bias.extent(0) == Hk, "dt_bias: extent 0 is ", dt_bias.extent(0),
                    ", expected ", Hk);
  }
  detail::check_data(bias, "bias");
  const index_t want[4] = {B, Hk, 1, Sk};
  for (std::size_t r = 0; r < 4; ++r)
    detail::require(bias.extent(r) == want[r], "bias: extent ", r, " is ", bias.extent(r),
                    ", expected ", want[r]);
  detail::check_one_to_one(bias, "bias");
  detail::check_no_alias(bias, "bias", vc, "v");
  detail::check_no_alias(bias, "bias", w_dt, "w_dt");
  detail::check_no_alias(bias, "bias", a, "a");
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < Sk; ++t)
      for (index_t h = 0; h < Hk; ++h) {
        double dt = dt_bias.data() ? double(dt_bias(h)) : 0.0;
        for (index_t g = 0; g < Hk; ++g)
          for (index_t d = 0; d < Dv; ++d)
            dt += double(float(v(b, g, t, d))) * double(w_dt(h, g * Dv + d));
        const double softplus = dt > 20 ? dt : std::log1p(std::exp(dt));
        const double x = double(a(h)) * softplus;
        bias(b, h, 0, t) = float(form == dynamic_mask_form::softplus ? x : std::exp(x));
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
  std::vector<ranked> scratch(same_keys ? 0 : std::size_t(used) * std::max<index_t>(Sk + 1, 1));
  std::vector<std::uint64_t> radix(same_keys ? std::size_t(used) * 2 * std::max<index_t>(Sk, 1)
                                             : 0);
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
    ranked* pool = scratch.data() + (same_keys ? 0 : std::size_t(thread) * (Sk + 1));
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
      std::uint64_t* keys = radix.data() + std::size_t(thread) * 2 * Sk;
      const auto [first, last] = pr.band.keys_for(0, 1);
      index_t n = 0;
      for (index_t j = first; j < last; ++j)
        if (!mask_plane.base || mask_plane(0, j) != 0)
          keys[n++] = rank_key(rank_value(bias_plane(0, j)), j);
      rank_bar bar{};
      if (n >= keep) {
        const auto j = index_t(~std::uint32_t(kth_largest(keys, n, keep, keys + n)));
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
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), Hk = k.extent(1);
  const index_t Sk = k.extent(2);
  detail::require(bias.data() != nullptr || B * H * Sq * Sk == 0,
                  "bias: is required (a (B|1, H|Hk|1, Sq|1, Sk|1) view)");
  detail::check_broadcast(bias, "bias", B, H, Hk, Sq, Sk);
  detail::check_no_alias(out, "out", bias, "bias");
  detail::require(options.keep >= 1, "options.keep: is ", options.keep, ", expected >= 1");
  softmax_options o;
  o.causal = options.causal;
  o.scale = options.scale;
  o.softcap = options.softcap;
  o.bias = bias;
  o.mask = options.mask;
  o.lse = options.lse;
  o.k_scale = options.k_scale;
  o.v_scale = options.v_scale;
  o.threads = options.threads;
  const auto pr = detail::make_softmax_problem<TO>(q, k, v, out, o);
  const int threads = detail::resolve_threads(options.threads);
  const detail::dma_selection sel = detail::select_kept(pr, options.keep, threads);

  const index_t group = pr.terms.group, bq = 64;
  const detail::sparse_rows rows{bq, sel.per_query_head, Sk};
  auto bars_of = [&](index_t b, index_t sh) { return sel.bars.data() + (b * sel.heads + sh) * Sq; };
  const bool per_row = bias.extent(2) != 1;
  auto select = [&](index_t b, index_t sh, index_t block, detail::key_piece* pieces) {
    const index_t i0 = block * bq, i1 = std::min(Sq, i0 + bq);
    const detail::rank_bar* bars = bars_of(b, sh);
    const index_t h = sel.per_query_head ? sh : sh * group;
    const auto plane = detail::bind_plane(pr.terms.bias, b, h, H, group);
    const index_t last = pr.band.keys_for(i0, i1).second;
    index_t count = 0;
    if (per_row) {  // each row ranks the key by its own bias
      for (index_t j = 0; j < last; ++j) {
        bool some = false, every = true;
        for (index_t i = i0; i < i1; ++i) {
          const bool in = detail::kept(plane(i, j), j, bars[i]);
          some = some || in;
          every = every && in;
        }
        if (some) count = detail::append_piece(pieces, count, j, j + 1, !every);
      }
      return count;
    }
    // One rank per key: kept by some row iff at or above the lowest bar, by every row iff
    // at or above the highest.
    detail::rank_bar lowest = bars[i0], highest = bars[i0];
    for (index_t i = i0 + 1; i < i1; ++i) {
      if (detail::ranks_above(lowest.value, lowest.index, bars[i].value, bars[i].index))
        lowest = bars[i];
      if (detail::ranks_above(bars[i].value, bars[i].index, highest.value, highest.index))
        highest = bars[i];
    }
    for (index_t j = 0; j < last; ++j) {
      const float b = plane(0, j);
      if (detail::kept(b, j, lowest))
        count = detail::append_piece(pieces, count, j, j + 1, !detail::kept(b, j, highest));
    }
    return count;
  };
  // Exact per-element check, run only in pieces some rows keep and others drop.
  auto kept_mask = [&](index_t b, index_t h, index_t i, index_t j) {
    const auto plane = detail::bind_plane(pr.terms.bias, b, h, H, group);
    return detail::kept(plane(i, j), j, bars_of(b, sel.per_query_head ? h : h / group)[i]);
  };
  detail::run_sparse<Backend>(pr, rows, select, with_mask_mod(kept_mask), threads);
}

}  // namespace fovea
