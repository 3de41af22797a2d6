// The backward of the dense engine's softmax attention (FlashAttention-2's algorithm),
// deterministic: delta_i = rowsum(dO_i * O_i); per tile of 64 keys x 64 queries the
// logits are recomputed through the forward's own logit pipeline (apply_logits: every
// modifier, the band and the masks give the same bits), P = exp(S - lse), dP = dO V^T,
// dS = P * (dP - delta) * dS/dx. One pass, five tile products, as FlashAttention-2's:
// tasks over key blocks (b, kv head, 64 keys) sum dV += P^T dO and dK += dS^T Q over the
// query heads of their group and the query blocks that see them, and add each tile's
// dQ = dS K into the query block's rows. Where FlashAttention adds dQ atomically (in
// whatever order the threads come), here the key blocks of a query block add in key
// order, each waiting for the previous one (ordered_turns; tasks start in that order, so
// the waits are short and always end): the result is bitwise the same for any number of
// threads. Extra memory: a few tiles per thread, delta (B, H, Sq), and for bf16 / fp16
// storage dQ's fp32 sums (B, H, Sq, D).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <vector>

#include "../../core/parallel.hpp"
#include "../../core/scratch.hpp"
#include "../../core/tensor_view.hpp"
#include "../../simd/convert.hpp"
#include "../../simd/row_math.hpp"
#include "../../simd/vec.hpp"
#include "../kv/stage.hpp"
#include "../tile/gemm_tile.hpp"
#include "dense.hpp"
#include "logits.hpp"
#include "query_columns.hpp"

namespace fovea::detail {

/// The gradients' views, (B, H, Sq, D) for dq, (B, Hk, Sk, D) / (B, Hk, Sk, Dv) for dk, dv,
/// and the inputs only the backward reads.
template <class S>
struct backward_problem {
  dense_problem<S> forward;        ///< q, k, v, the options (out unused)
  tensor_view<const S, 4> out, dout;  ///< (B, H, Sq, Dv)
  tensor_view<const float, 3> lse;    ///< (B, H, Sq)
  tensor_view<S, 4> dq, dk, dv;
  tensor_view<float, 1> dsinks{};  ///< (H) or empty
  /// d loss / d bias, the bias's shape: (B, H, Sq, Sk) written by the query-block pass, or
  /// (B, H|Hk, 1, Sk) summed over the queries by the key-block pass; or empty.
  tensor_view<float, 4> dbias{};
  bool dbias_per_key = false;
  /// d loss / d alibi slopes, (B|1, H) like the slopes: sum over (i, j) of
  /// dz_ij * -|i + offset - j|, summed over the batch when the slopes are shared; or empty.
  tensor_view<float, 2> dalibi{};
};

/// Per-thread buffers of one backward tile: BQ query columns, BK keys, rows padded to
/// whole vectors (dp = padded D, dvp = padded Dv).
template <class T, class Backend>
struct backward_buffers {
  static constexpr index_t BQ = query_columns<T>::capacity, BK = 64;
  static constexpr int W = vec<T, Backend>::width;
  static index_t padded(index_t n) noexcept { return (n + W - 1) / W * W; }
  static index_t size(index_t D, index_t Dv) noexcept {
    const index_t dp = padded(D), dvp = padded(Dv);
    return round_to_line<T>(BQ * dp) * 3 + round_to_line<T>(BQ * dvp) * 2 +
           round_to_line<T>(BK * dp) * 2 + round_to_line<T>(BK * dvp) * 2 + 6 * BK * BQ + 2 * BQ +
           round_to_line<T>(query_columns<T>::capacity * BK);
  }
  index_t dp, dvp;
  T *q, *q_t, *dout, *dout_t, *k, *v, *s, *x, *p, *ds, *dz, *dmod, *lse, *delta, *acc, *dk, *dv,
      *dbias;
  backward_buffers(T* w, index_t D, index_t Dv) noexcept : dp(padded(D)), dvp(padded(Dv)) {
    auto take = [&w](index_t n) {
      T* at = w;
      w += round_to_line<T>(n);
      return at;
    };
    q = take(BQ * dp);          // [BQ][dp] query rows
    q_t = take(BQ * dp);        // [dp][BQ] transposed
    dout = take(BQ * dvp);      // [BQ][dvp] rows of dO
    dout_t = take(BQ * dvp);    // [dvp][BQ]
    k = take(BK * dp);          // [BK][dp] key rows
    v = take(BK * dvp);         // [BK][dvp]
    s = take(BK * BQ);          // [BK][BQ] logits
    x = take(BK * BQ);          // [BK][BQ] raw products (soft-cap's derivative)
    p = take(BK * BQ);          // [BK][BQ] probabilities
    ds = take(BK * BQ);         // [BK][BQ] dP, then dS (times dS/dx)
    dz = take(BK * BQ);         // [BK][BQ] d loss / d logit (d bias), when asked for
    dmod = take(BK * BQ);       // [BK][BQ] d score_mod / d score, with a user score_mod
    lse = take(BQ);
    delta = take(BQ);
    acc = take(BQ * dp);        // [BQ][dp] dQ of a query block
    dk = take(BK * dp);         // [BK][dp] dK of a key block
    dv = take(BK * dvp);        // [BK][dvp]
    dbias = take(query_columns<T>::capacity * BK);  // [heads of a group][BK] keys-only d bias
  }
};

/// rows x cols of src (row r at rows(r)) into dst [rows][ld] (zero-padded to ld and to
/// `total` rows) and, if dst_t, transposed into [ld][total].
template <class T, class Row>
void stage_block(Row&& rows, index_t n, index_t cols, index_t ld, index_t total, T* dst,
                 T* dst_t) noexcept {
  for (index_t r = 0; r < total; ++r) {
    T* out = dst + r * ld;
    if (r < n)
      convert_row(rows(r), out, cols);
    else
      std::fill(out, out + cols, T(0));
    std::fill(out + cols, out + ld, T(0));
  }
  if (dst_t)
    for (index_t d = 0; d < ld; ++d)
      for (index_t r = 0; r < total; ++r) dst_t[d * total + r] = dst[r * ld + d];
}

/// The query block [i0, i0 + n) of head h (batch b) staged: its rows, transposed rows,
/// dO, lse and delta; returns its columns for the logit pipeline.
template <class Backend, class S, class T = accumulator_t<S>>
void stage_queries(const backward_problem<S>& bp, const std::vector<T>& delta, index_t b,
                   index_t h, index_t i0, index_t n, backward_buffers<T, Backend>& buf,
                   query_columns<T>& cols) noexcept {
  constexpr index_t BQ = backward_buffers<T, Backend>::BQ;
  const auto& pr = bp.forward;
  const index_t D = pr.q.extent(3), Dv = bp.dout.extent(3), H = pr.heads(), Sq = pr.queries();
  stage_block([&](index_t r) { return pr.q.ptr(b, h, i0 + r, 0); }, n, D, buf.dp, BQ, buf.q,
              buf.q_t);
  stage_block([&](index_t r) { return bp.dout.ptr(b, h, i0 + r, 0); }, n, Dv, buf.dvp, BQ,
              buf.dout, buf.dout_t);
  for (index_t c = 0; c < BQ; ++c) {
    buf.lse[c] = c < n ? T(bp.lse(b, h, i0 + c)) : -std::numeric_limits<T>::infinity();
    buf.delta[c] = c < n ? delta[(b * H + h) * Sq + i0 + c] : T(0);
  }
  start_columns(cols, pr.terms, b + pr.batch_base);
  for (index_t c = 0; c < n; ++c) cols.add(pr.terms, H, h, i0 + c);
  cols.pad_to(BQ);
}

/// One tile: `keys` keys (rows in buf.k, buf.v; row r is key key_of(r), `cuts` says which
/// masks can cut the tile, as for the forward's attend_keys) against the staged columns:
/// leaves P in buf.p and dS * dS/dx in buf.ds, [key][column]. A masked (key, column) has
/// P = 0 and dS = 0, whatever its values. Returns whether the tile masks any pair: then
/// the products that follow must skip masked pairs when a row holds NaN or Inf
/// (masked_products), as 0 * NaN would carry a hidden key's NaN into a gradient.
template <class Backend, class T, class ScoreMod, class MaskMod, class KeyOf>
bool backward_tile(const query_columns<T>& cols, const key_band& band,
                   const custom_variant<ScoreMod, MaskMod>& custom, KeyOf&& key_of,
                   tile_cuts cuts, index_t keys, index_t D, index_t Dv,
                   backward_buffers<T, Backend>& buf, bool with_dz = false) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width;
  constexpr index_t BQ = backward_buffers<T, Backend>::BQ;
  constexpr int RB = tile_traits<T, Backend>::row_block;
  constexpr int QB = V::registers >= 32 ? 4 : 2;  // column vectors per micro-kernel call
  gemm_wide<T, Backend, RB, QB, false>(keys, BQ / W, buf.k, buf.dp, 1, buf.q_t, BQ, buf.s, BQ, D);
  const bool capped = cols.softcap > T(0);
  if (capped) std::copy(buf.s, buf.s + keys * BQ, buf.x);
  constexpr bool scored = !std::is_same_v<ScoreMod, identity_score_mod>;
  if constexpr (scored) std::fill(buf.dmod, buf.dmod + keys * BQ, T(1));  // padding columns
  const bool masked =
      apply_logits<Backend>(cols, custom, band, cuts, buf.s, BQ, key_of, keys, scored ? buf.dmod : nullptr);
  gemm_wide<T, Backend, RB, QB, false>(keys, BQ / W, buf.v, buf.dvp, 1, buf.dout_t, BQ, buf.ds, BQ,
                                       Dv);
  const auto minus_inf = V::broadcast(-std::numeric_limits<T>::infinity());
  const auto zero = V::broadcast(T(0)), one = V::broadcast(T(1));
  const auto scale = V::broadcast(cols.scale);
  const auto inv_cap = V::broadcast(capped ? T(1) / cols.softcap : T(0));
  for (index_t r = 0; r < keys; ++r)
    for (index_t c = 0; c < BQ; c += W) {
      const index_t at = r * BQ + c;
      const auto s = V::load(buf.s + at), lse = V::load(buf.lse + c);
      const auto seen = V::not_equal(s, minus_inf);
      const auto p = V::select(seen & V::not_equal(lse, minus_inf), V::exp(V::sub(s, lse)), zero);
      auto dx = scale;  // d logit / d (q . k)
      if (capped) {
        const auto t = V::tanh(V::mul(V::mul(V::load(buf.x + at), scale), inv_cap));
        dx = V::mul(scale, V::sub(one, V::mul(t, t)));
      }
      auto dz = V::mul(p, V::sub(V::load(buf.ds + at), V::load(buf.delta + c)));
      if constexpr (scored) dz = V::mul(dz, V::load(buf.dmod + at));  // through score_mod
      dz = V::select(seen, dz, zero);
      if (with_dz) V::store(buf.dz + at, dz);
      V::store(buf.p + at, p);
      V::store(buf.ds + at, V::mul(dz, dx));
    }
  return masked;
}

/// backward_tile over the consecutive keys [j0, j0 + keys).
template <class Backend, class T, class ScoreMod, class MaskMod>
bool backward_tile(const query_columns<T>& cols, const key_band& band,
                   const custom_variant<ScoreMod, MaskMod>& custom, index_t j0, index_t keys,
                   index_t D, index_t Dv, backward_buffers<T, Backend>& buf,
                   bool with_dz = false) noexcept {
  const tile_cuts cuts{!band.covers(cols.first_pos, cols.last_pos + 1, j0, j0 + keys)};
  return backward_tile(cols, band, custom, [j0](index_t r) { return j0 + r; }, cuts, keys, D, Dv,
                       buf, with_dz);
}

/// Whether a masked tile's products must skip its masked pairs: some row they read (keys,
/// values, the columns' queries or dO) holds NaN or Inf.
template <class Backend, class T>
bool needs_skipping(const backward_buffers<T, Backend>& buf, index_t keys, index_t n, index_t D,
                    index_t Dv) noexcept {
  return !all_finite<T, Backend>(buf.k, buf.dp, keys, D) ||
         !all_finite<T, Backend>(buf.v, buf.dvp, keys, Dv) ||
         !all_finite<T, Backend>(buf.q, buf.dp, n, D) ||
         !all_finite<T, Backend>(buf.dout, buf.dvp, n, Dv);
}

/// The tile's products, pair by pair, skipping masked (key, column) pairs: dV += P^T dO and
/// dK += dS^T Q into buf.dv, buf.dk (keys), or dQ += dS K into buf.acc (queries).
template <class Backend, class T>
void masked_products(backward_buffers<T, Backend>& buf, bool keys_side, index_t keys, index_t n,
                     index_t D, index_t Dv) noexcept {
  constexpr index_t BQ = backward_buffers<T, Backend>::BQ;
  constexpr T minus_inf = -std::numeric_limits<T>::infinity();
  for (index_t j = 0; j < keys; ++j)
    for (index_t c = 0; c < n; ++c) {
      const index_t at = j * BQ + c;
      if (buf.s[at] == minus_inf) continue;
      if (keys_side) {
        for (index_t e = 0; e < Dv; ++e) buf.dv[j * buf.dvp + e] += buf.p[at] * buf.dout[c * buf.dvp + e];
        for (index_t d = 0; d < D; ++d) buf.dk[j * buf.dp + d] += buf.ds[at] * buf.q[c * buf.dp + d];
      } else {
        for (index_t d = 0; d < D; ++d) buf.acc[c * buf.dp + d] += buf.ds[at] * buf.k[j * buf.dp + d];
      }
    }
}

/// After backward_tile: dV += P^T dO and dK += dS^T Q into buf.dv, buf.dk (rows: the
/// tile's keys) and, if dbias, d loss / d logit summed over the tile's columns into
/// dbias[key], in column order.
template <class Backend, class T>
void add_key_products(backward_buffers<T, Backend>& buf, bool masked, index_t keys, index_t n,
                      index_t D, index_t Dv, T* dbias) noexcept {
  constexpr index_t BQ = backward_buffers<T, Backend>::BQ;
  constexpr int W = vec<T, Backend>::width, RB = tile_traits<T, Backend>::row_block;
  constexpr int QB = vec<T, Backend>::registers >= 32 ? 4 : 2;
  if (dbias)
    for (index_t j = 0; j < keys; ++j) {
      T sum = 0;
      for (index_t c = 0; c < n; ++c) sum += buf.dz[j * BQ + c];
      dbias[j] += sum;
    }
  if (masked && needs_skipping(buf, keys, n, D, Dv)) return masked_products(buf, true, keys, n, D, Dv);
  gemm_wide<T, Backend, RB, QB, true>(keys, buf.dvp / W, buf.p, BQ, 1, buf.dout, buf.dvp, buf.dv,
                                      buf.dvp, n);
  gemm_wide<T, Backend, RB, QB, true>(keys, buf.dp / W, buf.ds, BQ, 1, buf.q, buf.dp, buf.dk,
                                      buf.dp, n);
}

/// After backward_tile: dQ += dS K into buf.acc (rows: the staged columns).
template <class Backend, class T>
void add_query_products(backward_buffers<T, Backend>& buf, bool masked, index_t keys, index_t n,
                        index_t D, index_t Dv) noexcept {
  constexpr index_t BQ = backward_buffers<T, Backend>::BQ;
  constexpr int W = vec<T, Backend>::width, RB = tile_traits<T, Backend>::row_block;
  constexpr int QB = vec<T, Backend>::registers >= 32 ? 4 : 2;
  if (masked && needs_skipping(buf, keys, n, D, Dv)) return masked_products(buf, false, keys, n, D, Dv);
  gemm_wide<T, Backend, RB, QB, true>(n, buf.dp / W, buf.ds, 1, BQ, buf.k, buf.dp, buf.acc, buf.dp,
                                      keys);
}

/// The key block [j0, j0 + keys) of (b, hk) into buf.k, buf.v.
template <class Backend, class S, class T>
void stage_keys(const dense_problem<S>& pr, index_t b, index_t hk, index_t j0, index_t keys,
                backward_buffers<T, Backend>& buf) noexcept {
  constexpr index_t BK = backward_buffers<T, Backend>::BK;
  const auto kv = pr.kv.source(b, hk);
  const index_t D = pr.q.extent(3), Dv = pr.kv.value_dim();
  stage_rows(kv, true, j0, keys, D, buf.dp, buf.k);
  stage_rows(kv, false, j0, keys, Dv, buf.dvp, buf.v);
  std::fill(buf.k + keys * buf.dp, buf.k + BK * buf.dp, T(0));
  std::fill(buf.v + keys * buf.dvp, buf.v + BK * buf.dvp, T(0));
}

/// Starts a backward: zeroes d bias (pairs no tile visits get 0); with no query, writes
/// the zero gradients such a call has and returns false.
template <class S>
bool start_backward(const backward_problem<S>& bp) {
  const auto& pr = bp.forward;
  const index_t B = pr.batch(), H = pr.heads(), Sq = pr.queries(), Hk = pr.kv.heads();
  const index_t Sk = pr.keys, D = pr.q.extent(3), Dv = bp.dout.extent(3);
  if (bp.dbias.data())
    for (index_t a = 0; a < bp.dbias.extent(0); ++a)
      for (index_t h = 0; h < bp.dbias.extent(1); ++h)
        for (index_t i = 0; i < bp.dbias.extent(2); ++i)
          for (index_t j = 0; j < bp.dbias.extent(3); ++j) bp.dbias(a, h, i, j) = 0;
  if (B * H * Sq != 0) return true;
  for (index_t b = 0; b < B; ++b)  // no query: no gradient reaches a key or value
    for (index_t hk = 0; hk < Hk; ++hk)
      for (index_t j = 0; j < Sk; ++j) {
        std::fill_n(bp.dk.ptr(b, hk, j, 0), D, S(0));
        std::fill_n(bp.dv.ptr(b, hk, j, 0), Dv, S(0));
      }
  if (bp.dsinks.data())
    for (index_t h = 0; h < H; ++h) bp.dsinks(h) = 0;
  for (index_t a = 0; a < bp.dalibi.extent(0); ++a)
    for (index_t h = 0; h < bp.dalibi.extent(1); ++h) bp.dalibi(a, h) = 0;
  return false;
}

/// delta_i = rowsum(dO_i * O_i), (B, H, Sq), in the compute type.
template <class S, class T = accumulator_t<S>>
std::vector<T> backward_delta(const backward_problem<S>& bp, int threads) {
  const auto& pr = bp.forward;
  const index_t H = pr.heads(), Sq = pr.queries(), Dv = bp.dout.extent(3);
  std::vector<T> delta(pr.batch() * H * Sq);
  parallel_for(pr.batch() * H, threads, [&](index_t bh, int) {
    const index_t b = bh / H, h = bh % H;
    for (index_t i = 0; i < Sq; ++i) {
      const S *o = bp.out.ptr(b, h, i, 0), *g = bp.dout.ptr(b, h, i, 0);
      T sum = 0;
      for (index_t e = 0; e < Dv; ++e) sum += T(o[e]) * T(g[e]);
      delta[bh * Sq + i] = sum;
    }
  });
  return delta;
}

/// Stores the key block [j0, j0 + keys) of (b, hk): dk, dv from accumulators [key][dp],
/// [key][dvp], and, for a per-key d bias, its sums [head of the group][ld].
template <class S, class T>
void store_key_gradients(const backward_problem<S>& bp, index_t b, index_t hk, index_t j0,
                         index_t keys, const T* dk, index_t dp, const T* dv, index_t dvp,
                         const T* dbias, index_t ld) noexcept {
  const index_t D = bp.dk.extent(3), Dv = bp.dv.extent(3), Hk = bp.dk.extent(1);
  const index_t group = bp.forward.terms.group;
  for (index_t r = 0; r < keys; ++r) {
    S* k_row = bp.dk.ptr(b, hk, j0 + r, 0);
    S* v_row = bp.dv.ptr(b, hk, j0 + r, 0);
    for (index_t d = 0; d < D; ++d) k_row[d] = S(dk[r * dp + d]);
    for (index_t e = 0; e < Dv; ++e) v_row[e] = S(dv[r * dvp + e]);
  }
  if (!bp.dbias_per_key) return;
  const bool per_head = bp.dbias.extent(1) != Hk || group == 1;  // (B, H, 1, Sk)
  for (index_t g = 0; g < group; ++g)
    for (index_t j = 0; j < keys; ++j) {
      float& out = bp.dbias(b, per_head ? hk * group + g : hk, 0, j0 + j);
      out = per_head || g == 0 ? float(dbias[g * ld + j]) : out + float(dbias[g * ld + j]);
    }
}

/// Runs the backward on up to `threads` threads.
template <class Backend, class S, class ScoreMod, class MaskMod>
void run_backward(const backward_problem<S>& bp, const custom_variant<ScoreMod, MaskMod>& custom,
                  int threads) {
  using T = accumulator_t<S>;
  using buffers_t = backward_buffers<T, Backend>;
  constexpr index_t BQ = buffers_t::BQ, BK = buffers_t::BK;
  const auto& pr = bp.forward;
  const index_t B = pr.batch(), H = pr.heads(), Sq = pr.queries(), Hk = pr.kv.heads();
  const index_t Sk = pr.keys, D = pr.q.extent(3), Dv = bp.dout.extent(3), group = pr.terms.group;
  if (!start_backward(bp)) return;
  const index_t key_blocks = (Sk + BK - 1) / BK, query_blocks = (Sq + BQ - 1) / BQ;
  const int used = threads_for_work(std::max(threads, 1),
                                    7.0 * double(B * H * Sq) * double(Sk) * double(D + Dv),
                                    B * std::min(Hk * key_blocks, H * query_blocks));
  const std::vector<T> delta = backward_delta(bp, used);
  const scratch_slices<T> scratch(used, buffers_t::size(D, Dv));

  // One task per (b, kv head, key block): dK, dV of its keys summed over the query heads
  // of the group and the query blocks that see them, and each query block's share of dQ,
  // added into dq in key-block order (ordered_turns), so the sum is the same whatever runs
  // where. dQ sums in T: straight into dq when S is T, else in a buffer.
  constexpr bool accumulate_in_dq = std::is_same_v<S, T>;
  std::vector<T> dq_sums(accumulate_in_dq ? 0 : B * H * Sq * D, T(0));
  auto dq_row = [&](index_t b, index_t h, index_t i) -> T* {
    if constexpr (accumulate_in_dq) return bp.dq.ptr(b, h, i, 0);
    else return dq_sums.data() + ((b * H + h) * Sq + i) * D;
  };
  if constexpr (accumulate_in_dq)
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < H; ++h)
        for (index_t i = 0; i < Sq; ++i) std::fill_n(bp.dq.ptr(b, h, i, 0), D, T(0));
  // the first key block each query block sees takes the first turn
  const ordered_turns turns(B * H * query_blocks, [&](index_t slot) {
    const index_t i0 = slot % query_blocks * BQ;
    return pr.band.keys_for(i0, std::min(Sq, i0 + BQ)).first / BK;
  });
  const bool want_alibi = bp.dalibi.data() != nullptr;
  const bool key_bias = bp.dbias_per_key, row_bias = bp.dbias.data() && !key_bias;
  std::vector<T> alibi_parts(want_alibi ? B * H * key_blocks : 0);
  // A task's dQ shares wait in `pending` (up to pending_tiles per thread) until their turn,
  // so a task never stalls on a slower (or descheduled) neighbour while it has tiles left
  // to compute; it waits only when the buffer is full and at its end.
  constexpr index_t pending_tiles = 16;
  const index_t dp = buffers_t::padded(D), tile_size = round_to_line<T>(BQ * dp);
  const scratch_slices<T> pending_scratch(used, pending_tiles * tile_size);
  struct pending_share {
    index_t slot, b, h, i0, n;
    T* rows;
  };
  parallel_for(B * Hk * key_blocks, used, [&](index_t task, int thread) {
    const index_t b = task / (Hk * key_blocks), hk = task / key_blocks % Hk, kb = task % key_blocks;
    const index_t j0 = kb * BK, keys = std::min(BK, Sk - j0);
    buffers_t buf(scratch.slice(thread), D, Dv);
    pending_share pending[pending_tiles];
    index_t waiting = 0;
    T* free_rows[pending_tiles];
    for (index_t t = 0; t < pending_tiles; ++t) free_rows[t] = pending_scratch.slice(thread) + t * tile_size;
    index_t free_count = pending_tiles;
    auto add_share = [&](const pending_share& p) {
      for (index_t c = 0; c < p.n; ++c) {
        T* row = dq_row(p.b, p.h, p.i0 + c);
        const T* part = p.rows + c * dp;
        for (index_t d = 0; d < D; ++d) row[d] += part[d];
      }
      turns.pass(p.slot, kb);
      free_rows[free_count++] = p.rows;
    };
    // adds the shares whose turn has come; with `block`, waits for the oldest first
    auto drain = [&](bool block) {
      if (block && waiting > 0) {
        turns.wait(pending[0].slot, kb);
        add_share(pending[0]);
        std::copy(pending + 1, pending + waiting, pending);
        --waiting;
      }
      index_t kept = 0;
      for (index_t w = 0; w < waiting; ++w)
        if (turns.ready(pending[w].slot, kb)) add_share(pending[w]);
        else pending[kept++] = pending[w];
      waiting = kept;
    };
    stage_keys(pr, b, hk, j0, keys, buf);
    std::fill(buf.dk, buf.dk + BK * buf.dp, T(0));
    std::fill(buf.dv, buf.dv + BK * buf.dvp, T(0));
    if (key_bias) std::fill(buf.dbias, buf.dbias + group * BK, T(0));
    for (index_t h = hk * group; h < (hk + 1) * group; ++h)
      for (index_t qb = 0; qb < query_blocks; ++qb) {
        const index_t i0 = qb * BQ, n = std::min(BQ, Sq - i0);
        const auto [first, last] = pr.band.keys_for(i0, i0 + n);
        if (last <= j0 || first >= j0 + keys) continue;
        query_columns<T> cols;
        stage_queries(bp, delta, b, h, i0, n, buf, cols);
        const bool masked =
            backward_tile(cols, pr.band, custom, j0, keys, D, Dv, buf, key_bias || row_bias || want_alibi);
        if (want_alibi) {  // d slope += dz * -|i + offset - j| (hidden pairs have dz = 0)
          T part = 0;
          for (index_t c = 0; c < n; ++c)
            for (index_t j = 0; j < keys; ++j) {
              const index_t distance = i0 + c + pr.band.offset - (j0 + j);
              part -= buf.dz[j * BQ + c] * T(distance < 0 ? -distance : distance);
            }
          alibi_parts[(b * H + h) * key_blocks + kb] += part;
        }
        if (row_bias)  // (B, H, Sq, Sk): each pair in one tile
          for (index_t c = 0; c < n; ++c)
            for (index_t j = 0; j < keys; ++j) bp.dbias(b, h, i0 + c, j0 + j) = float(buf.dz[j * BQ + c]);
        if (free_count == 0) drain(true);
        T* share = free_rows[--free_count];
        buf.acc = share;  // dQ's share of this tile, straight into its pending rows
        std::fill(share, share + n * dp, T(0));
        add_query_products(buf, masked, keys, n, D, Dv);
        add_key_products(buf, masked, keys, n, D, Dv,
                         key_bias ? buf.dbias + (h - hk * group) * BK : nullptr);
        pending[waiting++] = {(b * H + h) * query_blocks + qb, b, h, i0, n, share};
        drain(false);
      }
    while (waiting > 0) drain(true);
    store_key_gradients(bp, b, hk, j0, keys, buf.dk, buf.dp, buf.dv, buf.dvp, buf.dbias, BK);
  });
  if constexpr (!accumulate_in_dq)
    parallel_for(B * H, used, [&](index_t bh, int) {
      for (index_t i = 0; i < Sq; ++i) {
        S* row = bp.dq.ptr(bh / H, bh % H, i, 0);
        const T* sum = dq_sums.data() + (bh * Sq + i) * D;
        for (index_t d = 0; d < D; ++d) row[d] = S(sum[d]);
      }
    });

  // d slopes: the tasks' shares summed in a fixed order (per batch row, or over the batch)
  if (want_alibi) {
    const bool per_batch = bp.dalibi.extent(0) == B;
    for (index_t a = 0; a < bp.dalibi.extent(0); ++a)
      for (index_t h = 0; h < H; ++h) {
        T sum = 0;
        for (index_t b = per_batch ? a : 0; b < (per_batch ? a + 1 : B); ++b)
          for (index_t kb = 0; kb < key_blocks; ++kb) sum += alibi_parts[(b * H + h) * key_blocks + kb];
        bp.dalibi(a, h) = float(sum);
      }
  }

  // d sinks_h = -sum over (b, i) of p_sink(b, h, i) * delta(b, h, i), in a fixed order
  if (bp.dsinks.data())
    for (index_t h = 0; h < H; ++h) {
      double sum = 0;
      const double sink = pr.terms.sinks(h);
      for (index_t b = 0; b < B; ++b)
        for (index_t i = 0; i < Sq; ++i) {
          const double lse = bp.lse(b, h, i);
          if (lse == -std::numeric_limits<double>::infinity()) continue;
          sum -= std::exp(sink - lse) * double(delta[(b * H + h) * Sq + i]);
        }
      bp.dsinks(h) = float(sum);
    }
}

}  // namespace fovea::detail
