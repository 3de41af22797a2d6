// The Titans memory engine: a linear memory updated at test time by gradient descent with
// momentum and forgetting (Behrouz, Zhong, Mirrokni 2024, "Titans: Learning to Memorize at
// Test Time", eqs. 8-14 with a linear memory), chunk by chunk on the register-blocked
// micro-kernels. Its own engine beside the delta-rule one: two states (memory and
// momentum) and a gradient taken at the chunk's start memory.
//
// Per (batch, key/value head): memory M (Dk x Dv, the transpose of the paper's matrix: it
// predicts M^T k) and momentum U (Dk x Dv). In a chunk of n tokens with start states M0,
// U0 (the paper's parallel form: every gradient in the chunk is taken at M0):
//   G_s = 2 theta_s (M0^T k_s - v_s)           (row s; the gradient is k_s G_s^T)
//   U_t = eta_t U_{t-1} - k_t G_t^T,   M_t = (1 - alpha_t) M_{t-1} + U_t
// so with products running inside the chunk (every factor in [0, 1], nothing divided):
//   h_ts = eta_{s+1} ... eta_t,  w_ts = sum_{j=s..t} (1 - alpha_{j+1}) ... (1 - alpha_t) h_js
//   a_t = (1 - alpha_1) ... (1 - alpha_t),  m_t = eta_1 ... eta_t,  c_t = sum_j (...) m_j
//   M_t = a_t M0 + c_t U0 - sum_{s<=t} w_ts k_s G_s^T,  U_t = m_t U0 - sum_{s<=t} h_ts k_s G_s^T
//   o_t = scale M_t^T q_t = scale (a_t M0^T q_t + c_t U0^T q_t - sum_{s<=t} w_ts (q_t . k_s) G_s)
// With chunks of one token this is the paper's token recurrence itself.
#pragma once

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../../core/parallel.hpp"
#include "../../core/scratch.hpp"
#include "../../core/tensor_view.hpp"
#include "../../simd/convert.hpp"
#include "../../simd/vec.hpp"
#include "../tile/gemm_tile.hpp"
#include "../tile/tile_traits.hpp"
#include "recurrence.hpp"

namespace fovea::detail {

/// One call, validated by the front-end. eta, theta, alpha: (B, Hk or 1, S, 1), absent
/// eta or alpha meaning 0; the four states (B, Hk, Dk, Dv), each optional.
template <class T>
struct titans_problem {
  tensor_view<const T, 4> q, k, v;
  tensor_view<T, 4> out;
  tensor_view<const float, 4> eta, theta, alpha;
  tensor_view<const float, 4> memory_in, momentum_in;
  tensor_view<float, 4> memory_out, momentum_out;
  index_t chunk = 16;
  double scale = 1;
};

/// Per-task buffers for chunks of C tokens (C = 1: the token step, which holds the
/// group's query rows and outputs instead), widths padded to whole vectors.
template <class A, class Backend>
struct titans_buffers {
  static index_t padded(index_t n) noexcept { return recurrence_buffers<A, Backend>::padded(n); }
  static index_t size(index_t C, index_t group, index_t Dk, index_t Dv) noexcept {
    const index_t dkp = padded(Dk), dvp = padded(Dv), cp = padded(C), rows = std::max(C, group);
    return 2 * C * dkp + rows * dkp + dkp * cp + 3 * C * cp + C * dvp + rows * dvp +
           2 * Dk * dvp + 6 * C + 64;
  }
  index_t C, dkp, dvp, cp;
  A *k, *q, *kd, *kt, *p, *w, *h, *g, *o, *memory, *momentum, *a, *c, *m, *eta, *theta, *keep;
  titans_buffers(A* work, index_t C_, index_t group, index_t Dk, index_t Dv)
      : C(C_), dkp(padded(Dk)), dvp(padded(Dv)), cp(padded(C_)) {
    const index_t rows = std::max(C, group);
    k = work;                      // [C][dkp] keys
    q = k + C * dkp;               // [rows][dkp] queries, scaled per row
    kd = q + rows * dkp;           // [C][dkp] keys scaled per row (state updates)
    kt = kd + C * dkp;             // [dkp][cp] keys transposed
    p = kt + dkp * cp;             // [C][cp] weighted Q K^T
    w = p + C * cp;                // [C][cp] w_ts
    h = w + C * cp;                // [C][cp] h_ts
    g = h + C * cp;                // [C][dvp] G
    o = g + C * dvp;               // [rows][dvp] values, then outputs
    memory = o + rows * dvp;       // [Dk][dvp] M
    momentum = memory + Dk * dvp;  // [Dk][dvp] U
    a = momentum + Dk * dvp;       // [C] a_t
    c = a + C;                     // [C] c_t
    m = c + C;                     // [C] m_t
    eta = m + C;                   // [C]
    theta = eta + C;               // [C]
    keep = theta + C;              // [C] 1 - alpha_t
  }
};

/// A (B, Hk or 1, S, 1) gate at token t of head hk, or `absent` when the view is empty.
template <class A>
inline A gate(const tensor_view<const float, 4>& x, index_t b, index_t hk, index_t t,
              A absent) noexcept {
  return x.data() ? A(x(b, x.extent(1) == 1 ? 0 : hk, t, 0)) : absent;
}

/// One chunk of n <= C tokens for key/value head (b, hk): writes the group's outputs and
/// advances buf.memory and buf.momentum.
template <class Backend, class T>
void titans_chunk_step(const titans_problem<T>& pr, index_t b, index_t hk, index_t t0, index_t n,
                       titans_buffers<accumulator_t<T>, Backend>& buf) noexcept {
  using A = accumulator_t<T>;
  using V = vec<A, Backend>;
  constexpr int W = V::width;
  constexpr int RB = tile_traits<A, Backend>::row_block;
  constexpr int VB = V::registers >= 32 ? 4 : 2;
  const index_t Dk = pr.k.extent(3), Dv = pr.v.extent(3), dkp = buf.dkp, dvp = buf.dvp;
  const index_t cp = buf.cp, group = pr.q.extent(1) / pr.k.extent(1);
  load_rows(pr.k, b, hk, t0, n, dkp, buf.k);
  for (index_t e = 0; e < Dk; ++e) {
    for (index_t s = 0; s < n; ++s) buf.kt[e * cp + s] = buf.k[s * dkp + e];
    std::fill(buf.kt + e * cp + n, buf.kt + (e + 1) * cp, A(0));
  }
  // The gates and the products they make inside the chunk.
  for (index_t t = 0; t < n; ++t) {
    buf.eta[t] = gate<A>(pr.eta, b, hk, t0 + t, A(0));
    buf.theta[t] = gate<A>(pr.theta, b, hk, t0 + t, A(0));
    buf.keep[t] = A(1) - gate<A>(pr.alpha, b, hk, t0 + t, A(0));
  }
  A a = 1, m = 1, c = 0;
  for (index_t t = 0; t < n; ++t) {
    a *= buf.keep[t], m *= buf.eta[t], c = buf.keep[t] * c + m;
    buf.a[t] = a, buf.m[t] = m, buf.c[t] = c;
  }
  for (index_t s = 0; s < n; ++s) {
    A hs = 1, ws = 1;
    buf.h[s * cp + s] = hs, buf.w[s * cp + s] = ws;
    for (index_t t = s + 1; t < n; ++t) {
      hs *= buf.eta[t], ws = buf.keep[t] * ws + hs;
      buf.h[t * cp + s] = hs, buf.w[t * cp + s] = ws;
    }
  }
  // G = diag(2 theta) (K M0 - V).
  load_rows(pr.v, b, hk, t0, n, dvp, buf.o);
  gemm_wide<A, Backend, RB, VB, false>(n, dvp / W, buf.k, dkp, 1, buf.memory, dvp, buf.g, dvp, Dk);
  for (index_t s = 0; s < n; ++s) {
    const auto f = V::broadcast(2 * buf.theta[s]);
    for (index_t e = 0; e < dvp; e += W)
      V::store(buf.g + s * dvp + e,
               V::mul(f, V::sub(V::load(buf.g + s * dvp + e), V::load(buf.o + s * dvp + e))));
  }

  const bool finite = all_finite<A, Backend>(buf.g, dvp, n, Dv);

  // Outputs of each query head of the group: (diag(a) Q) M0 + (diag(c) Q) U0 + P G, with
  // P = -(w o (Q K^T)) lower triangular.
  const A scale = A(pr.scale);
  for (index_t gq = 0; gq < group; ++gq) {
    const index_t head = hk * group + gq;
    load_rows(pr.q, b, head, t0, n, dkp, buf.q);
    gemm_wide<A, Backend, RB, VB, false>(n, cp / W, buf.q, dkp, 1, buf.kt, cp, buf.p, cp, Dk);
    for (index_t t = 0; t < n; ++t) {
      A* row = buf.p + t * cp;
      for (index_t s = 0; s <= t; ++s) row[s] *= -buf.w[t * cp + s];
      std::fill(row + t + 1, row + cp, A(0));
    }
    for (index_t t = 0; t < n; ++t) {  // q rows scaled by a_t (kd) and c_t (q)
      const auto ft = V::broadcast(buf.a[t]), ct = V::broadcast(buf.c[t]);
      for (index_t e = 0; e < dkp; e += W) {
        const auto x = V::load(buf.q + t * dkp + e);
        V::store(buf.kd + t * dkp + e, V::mul(ft, x));
        V::store(buf.q + t * dkp + e, V::mul(ct, x));
      }
    }
    gemm_wide<A, Backend, RB, VB, false>(n, dvp / W, buf.kd, dkp, 1, buf.memory, dvp, buf.o, dvp, Dk);
    gemm_wide<A, Backend, RB, VB, true>(n, dvp / W, buf.q, dkp, 1, buf.momentum, dvp, buf.o, dvp, Dk);
    if (finite)
      gemm_wide<A, Backend, RB, VB, true>(n, dvp / W, buf.p, cp, 1, buf.g, dvp, buf.o, dvp, n);
    else  // a NaN or Inf in G_s must reach tokens s.. only, not 0 * NaN above the diagonal
      causal_product<A, Backend>(n, buf.p, cp, buf.g, dvp, buf.o, dvp, dvp);
    store_outputs<Backend>(pr.out, b, head, t0, n, buf.o, dvp, scale);
  }

  // M = a_n M0 + c_n U0 - sum_s w_ns k_s G_s^T, then U = m_n U0 - sum_s h_ns k_s G_s^T.
  const index_t last = n - 1;
  const auto an = V::broadcast(buf.a[last]), cn = V::broadcast(buf.c[last]);
  const auto mn = V::broadcast(buf.m[last]);
  for (index_t i = 0; i < Dk * dvp; i += W)
    V::store(buf.memory + i,
             V::fma(cn, V::load(buf.momentum + i), V::mul(an, V::load(buf.memory + i))));
  for (index_t s = 0; s < n; ++s) {
    const auto f = V::broadcast(-buf.w[last * cp + s]);
    for (index_t e = 0; e < dkp; e += W)
      V::store(buf.kd + s * dkp + e, V::mul(f, V::load(buf.k + s * dkp + e)));
  }
  gemm_wide<A, Backend, RB, VB, true>(Dk, dvp / W, buf.kd, 1, dkp, buf.g, dvp, buf.memory, dvp, n);
  for (index_t i = 0; i < Dk * dvp; i += W)
    V::store(buf.momentum + i, V::mul(mn, V::load(buf.momentum + i)));
  for (index_t s = 0; s < n; ++s) {
    const auto f = V::broadcast(-buf.h[last * cp + s]);
    for (index_t e = 0; e < dkp; e += W)
      V::store(buf.kd + s * dkp + e, V::mul(f, V::load(buf.k + s * dkp + e)));
  }
  gemm_wide<A, Backend, RB, VB, true>(Dk, dvp / W, buf.kd, 1, dkp, buf.g, dvp, buf.momentum, dvp, n);
}

/// Columns [c0, c0 + N vectors) of the token step, the block's sums held in registers
/// across the Dk rows: the error M^T k - v in one walk, then the momentum and memory
/// updates with the first one or two query heads' reads in a second; further heads read
/// the updated block again (from L1).
template <int N, class Backend, class A>
inline void titans_token_columns(A* memory, A* momentum, index_t dvp, index_t Dk, index_t c0,
                                 const A* k, const A* v, const A* q, index_t group, A eta,
                                 A step, A keep, A* o) noexcept {
  using V = vec<A, Backend>;
  using R = typename V::type;
  constexpr int W = V::width;
  R err[N];
#pragma GCC unroll 4
  for (int x = 0; x < N; ++x) err[x] = V::sub(V::broadcast(A(0)), V::load(v + c0 + x * W));
  for (index_t e = 0; e < Dk; ++e) {
    const R ke = V::broadcast(k[e]);
#pragma GCC unroll 4
    for (int x = 0; x < N; ++x) err[x] = V::fma(ke, V::load(memory + e * dvp + c0 + x * W), err[x]);
  }
  const R e_v = V::broadcast(eta), k_v = V::broadcast(keep);
  auto walk = [&]<bool Two>(index_t g0, bool update) FOVEA_ALWAYS_INLINE {
    R o0[N], o1[N];
#pragma GCC unroll 4
    for (int x = 0; x < N; ++x) o0[x] = o1[x] = V::broadcast(A(0));
    for (index_t e = 0; e < Dk; ++e) {
      A* m_row = memory + e * dvp + c0;
      A* u_row = momentum + e * dvp + c0;
      const R sk = V::broadcast(-step * k[e]);
      const R q0 = V::broadcast(q[g0 * Dk + e]);
      const R q1 = V::broadcast(Two ? q[(g0 + 1) * Dk + e] : A(0));
#pragma GCC unroll 4
      for (int x = 0; x < N; ++x) {
        R m = V::load(m_row + x * W);
        if (update) {
          const R u = V::fma(sk, err[x], V::mul(e_v, V::load(u_row + x * W)));
          V::store(u_row + x * W, u);
          m = V::fma(k_v, m, u);
          V::store(m_row + x * W, m);
        }
        o0[x] = V::fma(q0, m, o0[x]);
        if constexpr (Two) o1[x] = V::fma(q1, m, o1[x]);
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

/// One token t for key/value head (b, hk) by the fused recurrence (chunks of one token):
/// two passes over the memory, one over the momentum.
template <class Backend, class T>
void titans_token_step(const titans_problem<T>& pr, index_t b, index_t hk, index_t t,
                       titans_buffers<accumulator_t<T>, Backend>& buf) noexcept {
  using A = accumulator_t<T>;
  constexpr int W = vec<A, Backend>::width;
  const index_t Dk = pr.k.extent(3), Dv = pr.v.extent(3), dvp = buf.dvp;
  const index_t group = pr.q.extent(1) / pr.k.extent(1);
  convert_row(pr.k.ptr(b, hk, t, 0), buf.k, Dk);
  convert_row(pr.v.ptr(b, hk, t, 0), buf.g, Dv);
  std::fill(buf.g + Dv, buf.g + dvp, A(0));
  for (index_t g = 0; g < group; ++g)
    convert_row(pr.q.ptr(b, hk * group + g, t, 0), buf.q + g * Dk, Dk);
  const A eta = gate<A>(pr.eta, b, hk, t, A(0)), step = 2 * gate<A>(pr.theta, b, hk, t, A(0));
  const A keep = A(1) - gate<A>(pr.alpha, b, hk, t, A(0));
  for_column_blocks<W>(dvp, [&]<int N>(index_t c0) {
    titans_token_columns<N, Backend>(buf.memory, buf.momentum, dvp, Dk, c0, buf.k, buf.g, buf.q,
                                     group, eta, step, keep, buf.o);
  });
  for (index_t g = 0; g < group; ++g)
    store_outputs<Backend>(pr.out, b, hk * group + g, t, 1, buf.o + g * dvp, dvp, A(pr.scale));
}

/// (B, Hk, Dk, Dv) fp32 state `in` (or zeros) into a task's Dk x dvp buffer.
template <class A>
void load_state(const tensor_view<const float, 4>& in, index_t b, index_t hk, index_t Dk,
                index_t Dv, index_t dvp, A* s) noexcept {
  std::fill(s, s + Dk * dvp, A(0));
  if (in.data())
    for (index_t e = 0; e < Dk; ++e)
      for (index_t c = 0; c < Dv; ++c) s[e * dvp + c] = A(in(b, hk, e, c));
}

template <class A>
void store_state(const A* s, index_t b, index_t hk, index_t Dk, index_t Dv, index_t dvp,
                 const tensor_view<float, 4>& out) noexcept {
  if (out.data())
    for (index_t e = 0; e < Dk; ++e)
      for (index_t c = 0; c < Dv; ++c) out(b, hk, e, c) = float(s[e * dvp + c]);
}

/// Runs the problem: one serial task per (batch, key/value head), so the bits do not
/// depend on the thread count. A task reads its states in before it writes them out, so
/// memory_out may be memory_in (and momentum_out momentum_in): decoding in place.
template <class Backend, class T>
void run_titans(const titans_problem<T>& pr, int threads) {
  using A = accumulator_t<T>;
  using buffers = titans_buffers<A, Backend>;
  const index_t B = pr.k.extent(0), Hk = pr.k.extent(1), S = pr.k.extent(2);
  const index_t Dk = pr.k.extent(3), Dv = pr.v.extent(3), tasks = B * Hk;
  if (tasks == 0) return;
  const index_t group = pr.q.extent(1) / Hk, C = std::max<index_t>(1, std::min(pr.chunk, S));
  const double flops = 2.0 * double(tasks) * double(S) * double(Dk) * double(Dv) * double(3 + 2 * group);
  const int used = threads_for_work(std::max(threads, 1), flops, tasks);
  const scratch_slices<A> scratch(used, buffers::size(C, group, Dk, Dv));
  parallel_for(tasks, used, [&](index_t task, int thread) {
    const index_t b = task / Hk, hk = task % Hk;
    buffers buf(scratch.slice(thread), C, group, Dk, Dv);
    load_state(pr.memory_in, b, hk, Dk, Dv, buf.dvp, buf.memory);
    load_state(pr.momentum_in, b, hk, Dk, Dv, buf.dvp, buf.momentum);
    for (index_t t0 = 0; t0 < S; t0 += C) {
      const index_t n = std::min(C, S - t0);
      if (n == 1)  // any one-token chunk (a tail too): the same arithmetic as a decode step
        titans_token_step<Backend>(pr, b, hk, t0, buf);
      else
        titans_chunk_step<Backend>(pr, b, hk, t0, n, buf);
    }
    store_state(buf.memory, b, hk, Dk, Dv, buf.dvp, pr.memory_out);
    store_state(buf.momentum, b, hk, Dk, Dv, buf.dvp, pr.momentum_out);
  });
}

}  // namespace fovea::detail
