// The linear-recurrence engine: gated and delta-rule linear attention (ONNX
// LinearAttention's update rules) computed chunk by chunk with the UT transform, on the
// register-blocked micro-kernels; and the fused token step for decoding. Its own engine:
// the state update is not a softmax over keys (see attention/linear_recurrence.hpp for
// the semantics).
//
// Per (batch, key/value head), state S (Dk x Dv). In a chunk of n tokens with start state
// S0, cumulative log decays gamma_t = g_1 + ... + g_t (scalar per token) and
// Gamma_t = exp(gamma_t) (every exponent below is a difference gamma_t - gamma_s with
// s <= t, <= 0 for decays, so strong decays underflow to 0 instead of overflowing):
//   delta rules: A_ts = beta_t exp(gamma_t - gamma_s) k_t . k_s (s < t), T = (I + A)^-1,
//     W = T diag(beta Gamma) K, U = T diag(beta) V, and the new values U' = U - W S0
//     (Gated DeltaNet's / flash-linear-attention's chunked form; derivation in the README);
//   other rules: U' = V;
//   o_t = scale (Gamma_t S0^T q_t + sum_{s<=t} exp(gamma_t - gamma_s) (q_t . k_s) u'_s);
//   S_end = Gamma_n S0 + sum_s exp(gamma_n - gamma_s) k_s u'_s^T.
// Decays per key dimension (Kimi Linear's KDA; ONNX's per-dimension g) make gamma_t a
// vector and the pair factors exp(gamma_t - gamma_s) per dimension: the C x C products
// become (K o exp(gamma - rho)) (K o exp(rho - gamma))^T with rho the midpoint of the
// chunk's gamma in each dimension, so a chunk is cut where some dimension's gamma spans
// more than per_dim_decay_span (every factor then within exp(+-span / 2): no overflow,
// no subnormals); factors against the start and end states stay exp(<= 0) as above.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../../core/parallel.hpp"
#include "../../core/scratch.hpp"
#include "../../core/tensor_view.hpp"
#include "../../simd/convert.hpp"
#include "../../simd/prefetch.hpp"
#include "../../simd/row_math.hpp"
#include "../../simd/transpose.hpp"
#include "../../simd/vec.hpp"
#include "../tile/gemm_tile.hpp"
#include "../tile/tile_traits.hpp"

namespace fovea::detail {

/// Tokens per chunk of the chunked form. Small: per token the chunk's own products cost
/// ~10 C Dk flops against ~6 Dk Dv for the state's, and the state products are GEMMs at
/// any C (gated_delta, 16 heads of 128 x 128, N = 8192, AVX2: C = 8 270 ms, 16 234 ms,
/// 24 256 ms, 32 279-315 ms, 64 363 ms).
inline constexpr index_t recurrence_chunk = 16;

/// Per-dimension decays: the largest spread of one dimension's cumulative log decay
/// within a chunk (max - min over its tokens). Strong decays give shorter chunks (down to
/// the token step), never an infinite or subnormal factor.
inline constexpr double per_dim_decay_span = 40;

/// One call, validated by the front-end. Views are (B, heads, S, dim); decay (B, Hk, S, 1
/// or Dk) in log space, beta (B, Hk or 1, S, 1); state_in / state_out (B, Hk, Dk, Dv).
template <class T>
struct recurrence_problem {
  tensor_view<const T, 4> q, k, v;
  tensor_view<T, 4> out;
  tensor_view<const float, 4> decay, beta, state_in;
  tensor_view<float, 4> state_out;
  /// Or the state kept in place (the state object's): fp32 rows `state_ld` apart (a
  /// multiple of 16), Dk rows per (batch, key/value head); read and updated where it is.
  float* state = nullptr;
  index_t state_ld = 0;
  bool delta = false;
  double scale = 1;
};

/// Per-task buffers for `rows` tokens at a time (recurrence_chunk for the chunked form, 1
/// for the token step, which needs no C x C products), widths padded to whole vectors
/// (values to `dvp`, which a state kept in place fixes). q and o hold `group` rows per
/// token; the state S (Dk x dvp) is its own array unless kept in place.
template <class A, class Backend>
struct recurrence_buffers {
  static constexpr index_t C = recurrence_chunk;
  static index_t padded(index_t n) noexcept {
    constexpr index_t W = vec<A, Backend>::width;
    return (n + W - 1) / W * W;
  }
  static index_t size(index_t rows, index_t group, index_t Dk, index_t dvp, bool own_state) noexcept {
    const index_t dkp = padded(Dk), square = rows > 1 ? C * C : 0;
    const index_t decays = rows > 1 ? 3 * rows * dkp + dkp : 0;
    return 3 * rows * dkp + group * rows * dkp + dkp * rows + 3 * square +
           (2 + group) * rows * dvp + (own_state ? Dk * dvp : 0) + 4 * rows + decays + 64;
  }
  index_t dkp, dvp;
  A *k, *q, *w, *kd, *kt, *kk, *t, *p, *v, *u, *o, *s, *gamma, *beta, *scaled, *tail;
  A *gk, *ek, *eg, *rho;  // per-dimension decays (chunks only)
  recurrence_buffers(A* work, index_t rows, index_t group, index_t Dk, index_t dvp_, A* state)
      : dkp(padded(Dk)), dvp(dvp_) {
    const index_t square = rows > 1 ? C * C : 0;
    k = work;                       // [rows][dkp] keys
    q = k + rows * dkp;             // [group * rows][dkp] queries (Gamma-scaled)
    w = q + group * rows * dkp;     // [rows][dkp] W, negated
    kd = w + rows * dkp;            // [rows][dkp] keys decayed to the chunk's end
    kt = kd + rows * dkp;           // [dkp][rows] keys transposed
    kk = kt + dkp * rows;           // [C][C] K K^T
    t = kk + square;                // [C][C] T = (I + A)^-1
    p = t + square;                 // [C][C] masked Q K^T
    v = p + square;                 // [rows][dvp] values, then beta-scaled
    u = v + rows * dvp;             // [rows][dvp] new values U'
    o = u + rows * dvp;             // [group * rows][dvp] outputs
    gamma = o + group * rows * dvp; // [rows] cumulative log decay
    beta = gamma + rows;            // [rows]
    scaled = beta + rows;           // [rows]
    tail = scaled + rows;           // [rows]
    gk = tail + rows;               // [rows][dkp] cumulative log decays per dimension, then 1 / ek
    ek = gk + (rows > 1 ? rows * dkp : 0);  // [rows][dkp] exp(gamma - rho)
    eg = ek + (rows > 1 ? rows * dkp : 0);  // [rows][dkp] exp(gamma)
    rho = eg + (rows > 1 ? rows * dkp : 0); // [dkp] the chunk's midpoint per dimension
    s = state ? state : rho + (rows > 1 ? dkp : 0);  // [Dk][dvp] the state
  }
};

/// Rows [t0, t0 + n) of a (b, h) slice into dst (rows `ld` apart), converted, zero-padded.
template <class A, class S>
void load_rows(const tensor_view<const S, 4>& x, index_t b, index_t h, index_t t0, index_t n,
               index_t ld, A* dst) noexcept {
  const index_t d = x.extent(3);
  for (index_t r = 0; r < n; ++r) {
    convert_row(x.ptr(b, h, t0 + r, 0), dst + r * ld, d);
    std::fill(dst + r * ld + d, dst + (r + 1) * ld, A(0));
  }
}

/// o_t += sum_{s <= t} p_ts x_s for the n rows of a chunk: the causal product taken row by
/// row, for chunks whose x rows hold NaN or Inf (a block GEMM would multiply the zeros
/// above the diagonal by them and leak a later token's NaN into earlier outputs).
template <class A, class Backend>
void causal_product(index_t n, const A* p, index_t ldp, const A* x, index_t ldx, A* o,
                    index_t ldo, index_t width) noexcept {
  using V = vec<A, Backend>;
  constexpr int W = V::width;
  for (index_t t = 0; t < n; ++t)
    for (index_t s = 0; s <= t; ++s) {
      const auto f = V::broadcast(p[t * ldp + s]);
      for (index_t e = 0; e < width; e += W)
        V::store(o + t * ldo + e, V::fma(f, V::load(x + s * ldx + e), V::load(o + t * ldo + e)));
    }
}

/// out(b, h, t0 + r, :) = scale * o[r][:] for the n rows of a chunk (rows `ldo` apart).
/// In vector lanes for float outputs (GCC -O2 left the scalar loop unvectorised: 9% of
/// the chunked gated_delta time); other types element by element.
template <class Backend, class T, class A>
void store_outputs(const tensor_view<T, 4>& out, index_t b, index_t h, index_t t0, index_t n,
                   const A* o, index_t ldo, A scale) noexcept {
  using V = vec<A, Backend>;
  const index_t Dv = out.extent(3);
  for (index_t r = 0; r < n; ++r) {
    T* row = out.ptr(b, h, t0 + r, 0);
    const A* src = o + r * ldo;
    index_t e = 0;
    if constexpr (std::is_same_v<T, A>)
      for (; e + V::width <= Dv; e += V::width)
        V::store(row + e, V::mul(V::load(src + e), V::broadcast(scale)));
    for (; e < Dv; ++e) row[e] = T(src[e] * scale);
  }
}

/// The token steps' walk over a state's dvp columns: f.template operator()<N>(c0) for
/// blocks of four vectors, then one block of the remaining 1-3 (N a compile-time count,
/// so a block's sums stay in registers across the state's rows). This and
/// for_head_pairs are forced inline: out of line, the walks' register blocks went to
/// memory (decode step 2.8x slower at -O2).
template <int W, class F>
FOVEA_ALWAYS_INLINE inline void for_column_blocks(index_t dvp, F&& f) {
  constexpr int X = 4;
  index_t c0 = 0;
  for (; c0 + X * W <= dvp; c0 += X * W) f.template operator()<X>(c0);
  switch ((dvp - c0) / W) {
    case 3: f.template operator()<3>(c0); break;
    case 2: f.template operator()<2>(c0); break;
    case 1: f.template operator()<1>(c0); break;
    default: break;
  }
}

/// walk.template operator()<Two>(g0, first) over a group's query heads two at a time
/// (Two false for a last one alone); `first` is true for the first walk, which also
/// updates the state.
template <class F>
FOVEA_ALWAYS_INLINE inline void for_head_pairs(index_t group, F&& walk) {
  for (index_t g0 = 0; g0 < group; g0 += 2) {
    if (g0 + 1 < group)
      walk.template operator()<true>(g0, g0 == 0);
    else
      walk.template operator()<false>(g0, g0 == 0);
  }
}

/// Per-dimension decays: buf.gk[r] = g_{t0} + ... + g_{t0+r} for the rows r < n (padding
/// dimensions 0), buf.rho = the midpoint of each dimension's range over them; returns the
/// number of leading rows (at least 1) whose range stays within per_dim_decay_span.
template <class T, class A, class Backend>
index_t per_dim_decays(const recurrence_problem<T>& pr, index_t b, index_t hk, index_t t0,
                       index_t n, recurrence_buffers<A, Backend>& buf) noexcept {
  using V = vec<A, Backend>;
  constexpr int W = V::width;
  const index_t Dk = pr.k.extent(3), dkp = buf.dkp;
  A* hi = buf.ek;  // running max and -min per dimension (ek and eg are written later)
  A* nlo = buf.eg;
  const auto zero = V::broadcast(A(0));
  for (index_t r = 0; r < n; ++r) {
    A* g = buf.gk + r * dkp;
    for (index_t e = 0; e < Dk; ++e) g[e] = A(pr.decay(b, hk, t0 + r, e));
    std::fill(g + Dk, g + dkp, A(0));
    auto spread = zero;
    for (index_t e = 0; e < dkp; e += W) {
      auto x = V::load(g + e);
      if (r == 0) {
        V::store(hi + e, x), V::store(nlo + e, V::sub(zero, x));
      } else {
        x = V::add(x, V::load(g - dkp + e));
        const auto h = V::max(V::load(hi + e), x), l = V::max(V::load(nlo + e), V::sub(zero, x));
        V::store(hi + e, h), V::store(nlo + e, l);
        spread = V::max(spread, V::add(h, l));
      }
      V::store(g + e, x);
    }
    if (V::reduce_max(spread) > A(per_dim_decay_span)) {  // r >= 1: one row always fits
      n = r;
      break;
    }
  }
  // The midpoint over the rows kept (hi and nlo may include the row that did not fit).
  for (index_t e = 0; e < dkp; e += W) {
    auto h = V::load(buf.gk + e), l = V::sub(zero, h);
    for (index_t r = 1; r < n; ++r) {
      const auto x = V::load(buf.gk + r * dkp + e);
      h = V::max(h, x), l = V::max(l, V::sub(zero, x));
    }
    V::store(buf.rho + e, V::mul(V::broadcast(A(0.5)), V::sub(h, l)));
  }
  return n;
}

/// dst[r] = src[r] o f[r] (elementwise) for the n rows of a chunk, all `ld` apart.
template <class A, class Backend>
void scale_rows(index_t n, index_t ld, const A* f, const A* src, A* dst, A sign = A(1)) noexcept {
  using V = vec<A, Backend>;
  const auto sv = V::broadcast(sign);
  for (index_t i = 0; i < n * ld; i += V::width)
    V::store(dst + i, V::mul(sv, V::mul(V::load(f + i), V::load(src + i))));
}

/// One chunk of n tokens for key/value head (b, hk): advances buf.s and writes the
/// outputs of the group's query heads. Per-dimension decays: n is what per_dim_decays
/// returned, and buf.gk and buf.rho hold its results.
template <class Backend, class T>
void recurrence_chunk_step(const recurrence_problem<T>& pr, index_t b, index_t hk, index_t t0,
                           index_t n, recurrence_buffers<accumulator_t<T>, Backend>& buf) noexcept {
  using A = accumulator_t<T>;
  using V = vec<A, Backend>;
  constexpr int W = V::width;
  // Register blocks: 6 rows x 4 vectors with 32 vector registers, 6 x 2 with 16 (AVX2:
  // 4 x 4 would need 16 accumulators and spill).
  constexpr int RB = tile_traits<A, Backend>::row_block;
  constexpr int VB = V::registers >= 32 ? 4 : 2;
  constexpr index_t C = recurrence_chunk;
  const index_t Dk = pr.k.extent(3), Dv = pr.v.extent(3), dkp = buf.dkp, dvp = buf.dvp;
  const index_t H = pr.q.extent(1), group = H / pr.k.extent(1);
  const bool per_dim = pr.decay.data() && pr.decay.extent(3) > 1;
  load_rows(pr.k, b, hk, t0, n, dkp, buf.k);
  load_rows(pr.v, b, hk, t0, n, dvp, buf.v);
  for (index_t r = n; r < C; ++r) {  // padding rows: zero keys and values
    std::fill(buf.k + r * dkp, buf.k + (r + 1) * dkp, A(0));
    std::fill(buf.v + r * dvp, buf.v + (r + 1) * dvp, A(0));
  }
  // Scalar decays: gamma per row, pair factors exp(gamma_t - gamma_s) applied to the C x C
  // products. Per dimension: ek = exp(gamma - rho) and eg = exp(gamma) per row, the pair
  // factors folded into the operands (kt holds (K o exp(rho - gamma))^T) and the scalar
  // gamma left at 0.
  A g = 0;
  for (index_t r = 0; r < n; ++r) {
    if (pr.decay.data() && !per_dim) g += A(pr.decay(b, hk, t0 + r, 0));
    buf.gamma[r] = g;
  }
  const A gamma_n = n > 0 ? buf.gamma[n - 1] : A(0);
  A* ik = buf.gk;  // per dimension, 1 / ek in place of gamma once ek and eg are taken
  if (per_dim) {
    const auto one = V::broadcast(A(1));
    for (index_t r = 0; r < n; ++r)
      for (index_t e = 0; e < dkp; e += W) {
        const index_t i = r * dkp + e;
        const auto gr = V::load(buf.gk + i), er = V::exp(V::sub(gr, V::load(buf.rho + e)));
        const auto ir = V::div(one, er);  // within exp(+-span / 2): no overflow
        V::store(buf.ek + i, er);
        V::store(buf.eg + i, V::exp(gr));
        V::store(ik + i, ir);
        V::store(buf.w + i, V::mul(V::load(buf.k + i), ir));
      }
    std::fill(buf.w + n * dkp, buf.w + C * dkp, A(0));
  }
  // Products with the lower-triangular T and P: block GEMMs, or row by row when a key or
  // value of the chunk is not finite (it must reach only its own and later tokens).
  const bool finite = all_finite<A, Backend>(buf.k, dkp, n, Dk) &&
                      all_finite<A, Backend>(buf.v, dvp, n, Dv);
  auto lower = [&]<bool Accumulate>(const A* p, const A* x, index_t ldx, A* o, index_t ldo) {
    if (finite) {
      gemm_wide<A, Backend, RB, VB, Accumulate>(n, ldx / W, p, C, 1, x, ldx, o, ldo, n);
    } else {
      if constexpr (!Accumulate) std::fill(o, o + n * ldo, A(0));
      causal_product<A, Backend>(n, p, C, x, ldx, o, ldo, ldx);
    }
  };
  const A* keys_t = per_dim ? buf.w : buf.k;  // the keys whose transpose the products take
  transpose_rows<A, Backend>(keys_t, C, dkp, Dk, buf.kt, C);
  for (index_t e = Dk; e < dkp; ++e) std::fill(buf.kt + e * C, buf.kt + (e + 1) * C, A(0));

  // New values U' (delta rules) or V.
  A* values = buf.v;
  if (pr.delta) {
    for (index_t r = 0; r < n; ++r)
      buf.beta[r] = A(pr.beta(b, pr.beta.extent(1) == 1 ? 0 : hk, t0 + r, 0));
    const A* keys = buf.k;
    if (per_dim) {  // K o exp(gamma - rho)
      scale_rows<A, Backend>(n, dkp, buf.ek, buf.k, buf.kd);
      keys = buf.kd;
    }
    gemm_wide<A, Backend, RB, VB, false>(n, C / W, keys, dkp, 1, buf.kt, C, buf.kk, C, Dk);
    // T = (I + A)^-1 by forward substitution, row by row: T_t = e_t - sum_s A_ts T_s
    // (whole rows of C: T_s is zero past column s).
    for (index_t r = 0; r < n; ++r) {
      A* tr = buf.t + r * C;
      std::fill(tr, tr + C, A(0));
      tr[r] = 1;
      for (index_t s = 0; s < r; ++s) {
        const A a = buf.beta[r] * std::exp(buf.gamma[r] - buf.gamma[s]) * buf.kk[r * C + s];
        if (a == A(0)) continue;
        const auto na = V::broadcast(-a);
        const A* ts = buf.t + s * C;
        for (index_t c = 0; c < C; c += W) V::store(tr + c, V::fma(na, V::load(ts + c), V::load(tr + c)));
      }
    }
    for (index_t r = n; r < C; ++r) std::fill(buf.t + r * C, buf.t + (r + 1) * C, A(0));
    // W = T diag(beta) (Gamma o K) (negated), U = T diag(beta) V: scale the rows, then GEMMs.
    if (per_dim) scale_rows<A, Backend>(n, dkp, buf.eg, buf.k, buf.kd, A(-1));
    for (index_t r = 0; r < n; ++r) {
      const auto bg = V::broadcast(per_dim ? buf.beta[r] : -buf.beta[r] * std::exp(buf.gamma[r]));
      const auto bv = V::broadcast(buf.beta[r]);
      const A* src = per_dim ? buf.kd : buf.k;
      for (index_t e = 0; e < dkp; e += W)
        V::store(buf.kd + r * dkp + e, V::mul(bg, V::load(src + r * dkp + e)));
      for (index_t e = 0; e < dvp; e += W)
        V::store(buf.v + r * dvp + e, V::mul(bv, V::load(buf.v + r * dvp + e)));
    }
    lower.template operator()<false>(buf.t, buf.kd, dkp, buf.w, dkp);
    lower.template operator()<false>(buf.t, buf.v, dvp, buf.u, dvp);
    // U' = U - W S0 (W is stored negated).
    gemm_wide<A, Backend, RB, VB, true>(n, dvp / W, buf.w, dkp, 1, buf.s, dvp, buf.u, dvp, Dk);
    values = buf.u;
  }

  // Outputs of each query head of the group.
  const A scale = A(pr.scale);
  for (index_t gq = 0; gq < group; ++gq) {
    const index_t h = hk * group + gq;
    load_rows(pr.q, b, h, t0, n, dkp, buf.q);
    const A* queries = buf.q;
    if (per_dim) {  // Q o exp(gamma - rho)
      scale_rows<A, Backend>(n, dkp, buf.ek, buf.q, buf.kd);
      queries = buf.kd;
    }
    gemm_wide<A, Backend, RB, VB, false>(n, C / W, queries, dkp, 1, buf.kt, C, buf.p, C, Dk);
    for (index_t r = 0; r < n; ++r) {
      A* pr_row = buf.p + r * C;
      if (!per_dim)
        for (index_t s = 0; s <= r; ++s) pr_row[s] *= std::exp(buf.gamma[r] - buf.gamma[s]);
      std::fill(pr_row + r + 1, pr_row + C, A(0));
    }
    if (per_dim) {
      scale_rows<A, Backend>(n, dkp, buf.eg, buf.q, buf.q);
    } else {
      for (index_t r = 0; r < n; ++r) {
        const auto gr = V::broadcast(std::exp(buf.gamma[r]));
        for (index_t e = 0; e < dkp; e += W)
          V::store(buf.q + r * dkp + e, V::mul(gr, V::load(buf.q + r * dkp + e)));
      }
    }
    gemm_wide<A, Backend, RB, VB, false>(n, dvp / W, buf.q, dkp, 1, buf.s, dvp, buf.o, dvp, Dk);
    lower.template operator()<true>(buf.p, values, dvp, buf.o, dvp);
    store_outputs<Backend>(pr.out, b, h, t0, n, buf.o, dvp, scale);
  }

  // S = Gamma_n S0 + (exp(gamma_n - gamma) o K)^T U' (Gamma_n a row factor per dimension).
  const A* ek_n = buf.ek + (n - 1) * dkp;  // exp(gamma_n - gamma_r) = ek_n / ek_r
  for (index_t r = 0; r < C; ++r) {
    A* kd = buf.kd + r * dkp;
    if (r >= n) {
      std::fill(kd, kd + dkp, A(0));
    } else if (per_dim) {
      for (index_t e = 0; e < dkp; e += W)
        V::store(kd + e, V::mul(V::load(buf.k + r * dkp + e),
                                V::mul(V::load(ek_n + e), V::load(ik + r * dkp + e))));
    } else {
      const auto fv = V::broadcast(std::exp(gamma_n - buf.gamma[r]));
      for (index_t e = 0; e < dkp; e += W) V::store(kd + e, V::mul(fv, V::load(buf.k + r * dkp + e)));
    }
  }
  if (per_dim) {
    const A* decay_n = buf.eg + (n - 1) * dkp;
    for (index_t e = 0; e < Dk; ++e) {
      const auto f = V::broadcast(decay_n[e]);
      for (index_t c = 0; c < dvp; c += W) V::store(buf.s + e * dvp + c, V::mul(f, V::load(buf.s + e * dvp + c)));
    }
  } else if (gamma_n != A(0)) {
    const auto decay_n = V::broadcast(std::exp(gamma_n));
    for (index_t i = 0; i < Dk * dvp; i += W) V::store(buf.s + i, V::mul(decay_n, V::load(buf.s + i)));
  }
  gemm_wide<A, Backend, RB, VB, true>(Dk, dvp / W, buf.kd, 1, dkp, values, dvp, buf.s, dvp, n);
}

/// Columns [c0, c0 + N vectors) of the token step: N is a compile-time count, so the
/// block's sums stay in registers across the Dk rows of the state.
template <int N, class Backend, class A>
inline void token_columns(A* s, index_t dvp, index_t Dk, index_t c0, const A* alpha, const A* k,
                          const A* ak, const A* v, const A* q, index_t group, bool delta, A beta,
                          A* o, const A* next) noexcept {
  using V = vec<A, Backend>;
  using R = typename V::type;
  constexpr int W = V::width;
  R vn[N];
#pragma GCC unroll 4
  for (int x = 0; x < N; ++x) vn[x] = V::load(v + c0 + x * W);
  if (delta) {  // v' = beta (v - (alpha S)^T k) for this block of columns
    R ks[N];
#pragma GCC unroll 4
    for (int x = 0; x < N; ++x) ks[x] = V::broadcast(A(0));
    for (index_t e = 0; e < Dk; ++e) {
      const A* row = s + e * dvp + c0;
      const R f = V::broadcast(ak[e]);
#pragma GCC unroll 4
      for (int x = 0; x < N; ++x) ks[x] = V::fma(f, V::load(row + x * W), ks[x]);
    }
    const R bv = V::broadcast(beta);
#pragma GCC unroll 4
    for (int x = 0; x < N; ++x) vn[x] = V::mul(bv, V::sub(vn[x], ks[x]));
  }
  // One or two query heads' outputs per walk; the first walk also updates the state.
  auto walk = [&]<bool Two>(index_t g0, bool update) FOVEA_ALWAYS_INLINE {
    R o0[N], o1[N];
#pragma GCC unroll 4
    for (int x = 0; x < N; ++x) o0[x] = o1[x] = V::broadcast(A(0));
    for (index_t e = 0; e < Dk; ++e) {
      A* row = s + e * dvp + c0;
      const R a = V::broadcast(alpha[e]), ke = V::broadcast(k[e]);
      const R q0 = V::broadcast(q[g0 * Dk + e]);
      const R q1 = V::broadcast(Two ? q[(g0 + 1) * Dk + e] : A(0));
      if (update && next)  // the next block's row (from L3 or memory) while this one is in L1
        prefetch_span<1>(next + e * dvp, 4 * W * sizeof(A));
#pragma GCC unroll 4
      for (int x = 0; x < N; ++x) {
        R x_new = V::load(row + x * W);
        if (update) {
          x_new = V::fma(ke, vn[x], V::mul(a, x_new));
          V::store(row + x * W, x_new);
        }
        o0[x] = V::fma(q0, x_new, o0[x]);
        if constexpr (Two) o1[x] = V::fma(q1, x_new, o1[x]);
      }
    }
#pragma GCC unroll 4
    for (int x = 0; x < N; ++x) {
      V::store(o + g0 * dvp + c0 + x * W, o0[x]);
      if constexpr (Two) V::store(o + (g0 + 1) * dvp + c0 + x * W, o1[x]);
    }
  };
  for_head_pairs(group, walk);
}

/// One token t for key/value head (b, hk), any decay shape: the fused recurrence. The
/// state is walked in column blocks of four vectors held in registers across all Dk rows:
/// delta rules read each block once for S^T k, then once more (from L1) to update it and
/// add it into the outputs; the other rules take the second walk only. The updating walk
/// asks for the next block's rows ahead (the next state's first block after the last:
/// `next_state`, when known), so the state's fetch from L3 overlaps the arithmetic.
template <class Backend, class T>
void recurrence_token_step(const recurrence_problem<T>& pr, index_t b, index_t hk, index_t t,
                           recurrence_buffers<accumulator_t<T>, Backend>& buf,
                           const accumulator_t<T>* next_state = nullptr) noexcept {
  using A = accumulator_t<T>;
  constexpr int W = vec<A, Backend>::width;
  const index_t Dk = pr.k.extent(3), Dv = pr.v.extent(3), dvp = buf.dvp;
  const index_t H = pr.q.extent(1), group = H / pr.k.extent(1);
  const bool per_dim = pr.decay.data() && pr.decay.extent(3) > 1;
  A* alpha = buf.kd;  // [Dk] per-row decay factors
  if (pr.decay.data() && !per_dim) {
    std::fill(alpha, alpha + Dk, std::exp(A(pr.decay(b, hk, t, 0))));
  } else {
    for (index_t e = 0; e < Dk; ++e)
      alpha[e] = pr.decay.data() ? std::exp(A(pr.decay(b, hk, t, e))) : A(1);
  }
  A* k = buf.k;
  convert_row(pr.k.ptr(b, hk, t, 0), k, Dk);
  A* ak = buf.w;  // [Dk] alpha_e k_e
  for (index_t e = 0; e < Dk; ++e) ak[e] = alpha[e] * k[e];
  A* v = buf.v;
  convert_row(pr.v.ptr(b, hk, t, 0), v, Dv);
  std::fill(v + Dv, v + dvp, A(0));
  A* q = buf.q;  // [group][Dk]
  for (index_t g = 0; g < group; ++g) convert_row(pr.q.ptr(b, hk * group + g, t, 0), q + g * Dk, Dk);
  const A beta = pr.delta ? A(pr.beta(b, pr.beta.extent(1) == 1 ? 0 : hk, t, 0)) : A(1);
  A* o = buf.o;  // [group][dvp]
  for_column_blocks<W>(dvp, [&]<int N>(index_t c0) {
    const index_t c1 = c0 + N * W;  // the next block: of this state, or the next state's first
    const A* next = c1 < dvp ? buf.s + c1 : next_state;
    token_columns<N, Backend>(buf.s, dvp, Dk, c0, alpha, k, ak, v, q, group, pr.delta, beta, o, next);
  });
  for (index_t g = 0; g < group; ++g)
    store_outputs<Backend>(pr.out, b, hk * group + g, t, 1, o + g * dvp, dvp, A(pr.scale));
}

/// Runs the problem: one task per (batch, key/value head), each serial over its tokens
/// (so the result does not depend on the thread count), by chunks of recurrence_chunk
/// tokens (shorter for per-dimension decays that spread more than per_dim_decay_span; a
/// single token by the fused step).
template <class Backend, class T>
void run_recurrence(const recurrence_problem<T>& pr, int threads) {
  using A = accumulator_t<T>;
  using buffers = recurrence_buffers<A, Backend>;
  const index_t B = pr.k.extent(0), Hk = pr.k.extent(1), S = pr.k.extent(2);
  const index_t Dk = pr.k.extent(3), Dv = pr.v.extent(3);
  const bool per_dim = pr.decay.data() && pr.decay.extent(3) > 1;
  const bool token_steps = S == 1;
  const index_t tasks = B * Hk;
  if (tasks == 0) return;
  const index_t group = pr.q.extent(1) / Hk;
  const double flops = 2.0 * double(tasks) * double(S) * double(Dk) * double(Dv) * double(2 + group);
  const int used = threads_for_work(std::max(threads, 1), flops, tasks);
  constexpr bool in_place_capable = std::is_same_v<A, float>;
  const bool in_place = in_place_capable && pr.state != nullptr;
  const index_t dvp = in_place ? pr.state_ld : buffers::padded(Dv);
  const index_t rows = token_steps ? 1 : recurrence_chunk;
  const scratch_slices<A> scratch(used, buffers::size(rows, group, Dk, dvp, !in_place));
  parallel_for(tasks, used, [&](index_t task, int thread) {
    const index_t b = task / Hk, hk = task % Hk;
    A* state = nullptr;
    if constexpr (in_place_capable)
      if (in_place) state = pr.state + task * Dk * dvp;
    buffers buf(scratch.slice(thread), rows, group, Dk, dvp, state);
    if (!in_place) {
      std::fill(buf.s, buf.s + Dk * dvp, A(0));
      if (pr.state_in.data())
        for (index_t e = 0; e < Dk; ++e)
          for (index_t c = 0; c < Dv; ++c) buf.s[e * dvp + c] = A(pr.state_in(b, hk, e, c));
    }
    if (token_steps) {
      // (S = 1.) Decoding in place: the next task's state is the next in memory.
      const A* next = in_place && task + 1 < tasks ? buf.s + Dk * dvp : nullptr;
      recurrence_token_step<Backend>(pr, b, hk, 0, buf, next);
    } else {
      for (index_t t0 = 0, n = 0; t0 < S; t0 += n) {
        n = std::min(recurrence_chunk, S - t0);
        if (per_dim && n > 1) n = per_dim_decays(pr, b, hk, t0, n, buf);
        if (n == 1)  // a one-token tail: the same arithmetic as a one-token step
          recurrence_token_step<Backend>(pr, b, hk, t0, buf);
        else
          recurrence_chunk_step<Backend>(pr, b, hk, t0, n, buf);
      }
    }
    if (!in_place && pr.state_out.data())
      for (index_t e = 0; e < Dk; ++e)
        for (index_t c = 0; c < Dv; ++c) pr.state_out(b, hk, e, c) = float(buf.s[e * dvp + c]);
  });
}

}  // namespace fovea::detail
