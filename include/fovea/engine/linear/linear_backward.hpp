// The backward of linear attention (engine/linear/linear.hpp's forward), per (batch,
// key/value head), on the same micro-kernel. With a_ij = phi(q_i) . phi(k_j) over the
// visible pairs, den_i = sum_j a_ij + eps, out_i = sum_j a_ij v_j / den_i and dO_i given:
//   g_i = dO_i / den_i,  c_i = -(dO_i . out_i) / den_i,  r_ij = v_j . g_i + c_i
//   d phi(q_i) = sum_j r_ij phi(k_j) = S g_i + z c_i (+ the chunk's own keys)
//   d phi(k_j) = sum_i r_ij phi(q_i) = P v_j + y     (+ the chunk's own queries)
//   d v_j      = sum_i a_ij g_i      = P^T phi(k_j)  (+ the chunk's own queries)
// where S = sum phi(k) v^T and z = sum phi(k) run forward over earlier keys (the forward's
// state), and P = sum phi(q) g^T and y = sum c phi(q) run backward over later queries (the
// reverse scan). Non-causal: both sums over everything. Causal: keys in chunks of 64 as
// the forward; one forward pass writes dq (and keeps den per query), one reverse pass
// writes dk and dv. dq, dk, dv = the feature map's vector-Jacobian product of d phi. A
// row whose den is 0 (it output 0) gives and gets nothing.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../../core/parallel.hpp"
#include "../../core/scratch.hpp"
#include "../../core/tensor_view.hpp"
#include "../../simd/row_math.hpp"
#include "../../simd/vec.hpp"
#include "../tile/gemm_tile.hpp"
#include "../tile/tile_traits.hpp"
#include "linear.hpp"

namespace fovea::detail {

template <class T>
struct linear_backward_problem {
  linear_problem<T> forward;  ///< q, k, v, causal, offset, eps, features
  tensor_view<const T, 4> out, dout;
  tensor_view<T, 4> dq, dk, dv;
  /// Causal chunks that start from a state, each (B, Hk) x [S (E x M), z (E)] as the
  /// forward's: the state before the chunk, d loss / d the state after it (the reverse
  /// scan's start: P = dS, y = dz), and out: d loss / d the state before it (P and y at
  /// the scan's end). Null: a zero state, no gradient from later chunks, not wanted.
  const T* state_in = nullptr;
  const T* dstate_out = nullptr;
  T* dstate_in = nullptr;
};

template <class T, class Backend>
struct linear_backward_buffers {
  static constexpr int W = vec<T, Backend>::width;
  static constexpr index_t C = linear_chunk;
  static index_t padded(index_t n) noexcept { return (n + W - 1) / W * W; }
  static index_t size(index_t E, index_t M, index_t dens) noexcept {
    const index_t ep = padded(E), mp = padded(M);
    return round_to_line<T>(mp * ep) * 2 + round_to_line<T>(E * mp) + round_to_line<T>(ep) * 2 +
           round_to_line<T>(C * ep) * 4 + round_to_line<T>(ep * C) + round_to_line<T>(C * mp) * 3 +
           round_to_line<T>(mp * C) + round_to_line<T>(C * C) * 2 + round_to_line<T>(C) * 2 +
           round_to_line<T>(dens);
  }
  index_t ep, mp;
  T *st, *pe, *pt, *z, *y, *fk, *fkt, *fq, *dfq, *dfk, *vv, *vt, *g, *dvv, *a, *r, *c, *den, *dens;
  linear_backward_buffers(T* w, index_t E, index_t M) noexcept
      : ep(padded(E)), mp(padded(M)) {
    T* p = w;
    auto take = [&](index_t n) {
      T* x = p;
      p += round_to_line<T>(n);
      return x;
    };
    st = take(mp * ep);   // [mp][ep] S^T
    pt = take(mp * ep);   // [mp][ep] P^T
    pe = take(E * mp);    // [E][mp]  P
    z = take(ep);         // [ep]     z
    y = take(ep);         // [ep]     y
    fk = take(C * ep);    // [C][ep]  phi(K) of the key chunk
    fq = take(C * ep);    // [C][ep]  phi(Q) of the query block
    dfq = take(C * ep);   // [C][ep]  d phi(Q)
    dfk = take(C * ep);   // [C][ep]  d phi(K), summed over the group's heads
    fkt = take(ep * C);  // [ep][C]  phi(K)^T
    vv = take(C * mp);   // [C][mp]  V
    g = take(C * mp);    // [C][mp]  G
    dvv = take(C * mp);  // [C][mp]  dV, summed over the group's heads
    vt = take(mp * C);   // [mp][C]  V^T
    a = take(C * C);     // [C][C]   A, masked
    r = take(C * C);     // [C][C]   R, masked
    c = take(C);         // [C]
    den = take(C);       // [C]
    dens = p;            // [group][Sq] den per query (causal)
  }
};

/// Runs one (b, hk): dq for the group's query heads, dk and dv for the key/value head.
template <class Backend, class T, class FeatureMap>
void linear_backward_task(const linear_backward_problem<T>& bp, const FeatureMap& phi, index_t b,
                          index_t hk, linear_backward_buffers<T, Backend>& buf) noexcept {
  constexpr index_t C = linear_chunk;
  constexpr int W = vec<T, Backend>::width;
  constexpr int RB = tile_traits<T, Backend>::row_block;
  constexpr int VB = vec<T, Backend>::registers >= 32 ? 4 : 2;
  const auto& pr = bp.forward;
  const index_t H = pr.q.extent(1), Hk = pr.k.extent(1), group = H / Hk;
  const index_t Sq = pr.q.extent(2), Sk = pr.k.extent(2), M = pr.v.extent(3);
  const index_t D = pr.q.extent(3), E = pr.feature_dim(), ep = buf.ep, mp = buf.mp;
  const bool causal = pr.causal;
  // Keys [0, seen(i)) of a chunk starting at j0 are visible to query i.
  auto seen = [&](index_t i, index_t j0, index_t nk) {
    return causal ? std::clamp<index_t>(i + pr.offset - j0 + 1, 0, nk) : nk;
  };

  auto load_keys = [&](index_t j0, index_t nk) {  // phi(K) (rows and transposed), V, V^T
    for (index_t j = 0; j < C; ++j) {
      T* f = buf.fk + j * ep;
      if (j < nk) phi(pr.k.ptr(b, hk, j0 + j, 0), f, D);
      std::fill(f + (j < nk ? E : 0), f + ep, T(0));
      for (index_t e = 0; e < ep; ++e) buf.fkt[e * C + j] = f[e];
      T* v = buf.vv + j * mp;
      if (j < nk) std::copy(pr.v.ptr(b, hk, j0 + j, 0), pr.v.ptr(b, hk, j0 + j, 0) + M, v);
      std::fill(v + (j < nk ? M : 0), v + mp, T(0));
      for (index_t m = 0; m < mp; ++m) buf.vt[m * C + j] = v[m];
    }
  };
  auto load_phi_q = [&](index_t h, index_t i0, index_t nq) {  // phi(Q) of queries [i0, i0 + nq)
    for (index_t r = 0; r < nq; ++r) {
      T* f = buf.fq + r * ep;
      phi(pr.q.ptr(b, h, i0 + r, 0), f, D);
      std::fill(f + E, f + ep, T(0));
    }
    std::fill(buf.fq + nq * ep, buf.fq + C * ep, T(0));
  };
  // G and c of queries [i0, i0 + nq) of head h, given their den.
  auto load_grads = [&](index_t h, index_t i0, index_t nq, const T* den) {
    for (index_t r = 0; r < nq; ++r) {
      T* g = buf.g + r * mp;
      const T* dout = bp.dout.ptr(b, h, i0 + r, 0);
      const T* out = bp.out.ptr(b, h, i0 + r, 0);
      const T d = den[r];
      T dot = 0;
      for (index_t m = 0; m < M; ++m) dot += dout[m] * out[m];
      for (index_t m = 0; m < M; ++m) g[m] = d == T(0) ? T(0) : dout[m] / d;
      std::fill(g + M, g + mp, T(0));
      buf.c[r] = d == T(0) ? T(0) : -dot / d;
    }
    std::fill(buf.g + nq * mp, buf.g + C * mp, T(0));
  };
  // A = phi(Q) phi(K)^T over the visible pairs (0 elsewhere).
  auto pair_a = [&](index_t i0, index_t nq, index_t j0, index_t nk) {
    gemm_wide<T, Backend, RB, VB, false>(nq, C / W, buf.fq, ep, 1, buf.fkt, C, buf.a, C, E);
    for (index_t r = 0; r < nq; ++r) {
      T* ar = buf.a + r * C;
      std::fill(ar + seen(i0 + r, j0, nk), ar + C, T(0));
    }
  };
  // R = G V^T + c over the visible pairs (0 elsewhere).
  auto pair_r = [&](index_t i0, index_t nq, index_t j0, index_t nk) {
    gemm_wide<T, Backend, RB, VB, false>(nq, C / W, buf.g, mp, 1, buf.vt, C, buf.r, C, M);
    for (index_t r = 0; r < nq; ++r) {
      const index_t n = seen(i0 + r, j0, nk);
      T* rr = buf.r + r * C;
      for (index_t j = 0; j < n; ++j) rr[j] += buf.c[r];
      std::fill(rr + n, rr + C, T(0));
    }
  };
  // Whether the rows the masked products multiply by zero are all finite: else the
  // products go pair by pair (a hidden NaN must not reach a row through 0 * NaN).
  auto finite_block = [&](index_t nq, index_t nk) {
    return all_finite<T, Backend>(buf.fq, ep, nq, ep) && all_finite<T, Backend>(buf.g, mp, nq, mp) &&
           all_finite<T, Backend>(buf.fk, ep, nk, ep) && all_finite<T, Backend>(buf.vv, mp, nk, mp);
  };
  auto write_dq = [&](index_t h, index_t i0, index_t nq) {
    for (index_t r = 0; r < nq; ++r) {
      T* dq = bp.dq.ptr(b, h, i0 + r, 0);
      phi.vjp(pr.q.ptr(b, h, i0 + r, 0), buf.dfq + r * ep, dq, D);
    }
  };
  auto absorb_keys = [&](index_t nk) {  // S^T += V^T phi(K), z += sum phi(K)
    gemm_wide<T, Backend, RB, VB, true>(M, ep / W, buf.vv, 1, mp, buf.fk, ep, buf.st, ep, nk);
    for (index_t j = 0; j < nk; ++j)
      for (index_t e = 0; e < E; ++e) buf.z[e] += buf.fk[j * ep + e];
  };
  auto absorb_queries = [&](index_t nq) {  // P += phi(Q)^T G, P^T += G^T phi(Q), y += c phi(Q)
    gemm_wide<T, Backend, RB, VB, true>(E, mp / W, buf.fq, 1, ep, buf.g, mp, buf.pe, mp, nq);
    gemm_wide<T, Backend, RB, VB, true>(M, ep / W, buf.g, 1, mp, buf.fq, ep, buf.pt, ep, nq);
    for (index_t r = 0; r < nq; ++r)
      for (index_t e = 0; e < E; ++e) buf.y[e] += buf.c[r] * buf.fq[r * ep + e];
  };
  // d phi(Q) = G S^T + c z for queries [0, nq) of the block (the earlier keys' part).
  auto dq_from_state = [&](index_t nq) {
    gemm_wide<T, Backend, RB, VB, false>(nq, ep / W, buf.g, mp, 1, buf.st, ep, buf.dfq, ep, M);
    for (index_t r = 0; r < nq; ++r)
      for (index_t e = 0; e < E; ++e) buf.dfq[r * ep + e] += buf.c[r] * buf.z[e];
  };
  // d phi(K) = V P^T + y, dV = phi(K) P for keys [0, nk) (the later queries' part).
  auto dk_from_state = [&](index_t nk) {
    gemm_wide<T, Backend, RB, VB, false>(nk, ep / W, buf.vv, mp, 1, buf.pt, ep, buf.dfk, ep, M);
    for (index_t j = 0; j < nk; ++j)
      for (index_t e = 0; e < E; ++e) buf.dfk[j * ep + e] += buf.y[e];
    gemm_wide<T, Backend, RB, VB, false>(nk, mp / W, buf.fk, ep, 1, buf.pe, mp, buf.dvv, mp, E);
  };
  auto write_dk_dv = [&](index_t j0, index_t nk) {
    for (index_t j = 0; j < nk; ++j) {
      phi.vjp(pr.k.ptr(b, hk, j0 + j, 0), buf.dfk + j * ep, bp.dk.ptr(b, hk, j0 + j, 0), D);
      std::copy(buf.dvv + j * mp, buf.dvv + j * mp + M, bp.dv.ptr(b, hk, j0 + j, 0));
    }
  };
  auto zero_rows = [&](const tensor_view<T, 4>& x, index_t h, index_t i0, index_t n) {
    for (index_t i = i0; i < i0 + n; ++i) std::fill(x.ptr(b, h, i, 0), x.ptr(b, h, i, 0) + x.extent(3), T(0));
  };
  std::fill(buf.st, buf.st + mp * ep, T(0));
  std::fill(buf.pt, buf.pt + mp * ep, T(0));
  std::fill(buf.pe, buf.pe + E * mp, T(0));
  std::fill(buf.z, buf.z + ep, T(0));
  std::fill(buf.y, buf.y + ep, T(0));
  const index_t state_size = E * M + E, at = (b * Hk + hk) * state_size;
  if (bp.state_in) {  // S^T and z of the earlier chunks
    const T* s0 = bp.state_in + at;
    for (index_t e = 0; e < E; ++e)
      for (index_t m = 0; m < M; ++m) buf.st[m * ep + e] = s0[e * M + m];
    std::copy(s0 + E * M, s0 + state_size, buf.z);
  }
  if (bp.dstate_out) {  // the later chunks' gradient: P, P^T and y start from it
    const T* ds = bp.dstate_out + at;
    for (index_t e = 0; e < E; ++e)
      for (index_t m = 0; m < M; ++m) buf.pe[e * mp + m] = buf.pt[m * ep + e] = ds[e * M + m];
    std::copy(ds + E * M, ds + state_size, buf.y);
  }
  auto write_dstate = [&] {  // d state_in = P, y after every query of the chunk
    if (!bp.dstate_in) return;
    T* ds = bp.dstate_in + at;
    for (index_t e = 0; e < E; ++e)
      for (index_t m = 0; m < M; ++m) ds[e * M + m] = buf.pe[e * mp + m];
    std::copy(buf.y, buf.y + E, ds + E * M);
  };

  if (!causal) {
    for (index_t j0 = 0; j0 < Sk; j0 += C) {
      const index_t nk = std::min(C, Sk - j0);
      load_keys(j0, nk);
      absorb_keys(nk);
    }
    for (index_t gq = 0; gq < group; ++gq) {
      const index_t h = hk * group + gq;
      for (index_t i0 = 0; i0 < Sq; i0 += C) {
        const index_t nq = std::min(C, Sq - i0);
        load_phi_q(h, i0, nq);
        for (index_t r = 0; r < nq; ++r)
          buf.den[r] = Sk == 0 ? T(0) : dot_row<T, Backend>(buf.fq + r * ep, buf.z, E) + pr.eps;
        load_grads(h, i0, nq, buf.den);
        dq_from_state(nq);
        write_dq(h, i0, nq);
        absorb_queries(nq);
      }
    }
    for (index_t j0 = 0; j0 < Sk; j0 += C) {
      const index_t nk = std::min(C, Sk - j0);
      load_keys(j0, nk);
      dk_from_state(nk);
      write_dk_dv(j0, nk);
    }
    return;
  }

  // Causal. Queries that see no key (i + offset < 0) get zero gradients (with a state,
  // offset is 0: every query sees the state).
  const index_t blind = std::clamp<index_t>(-pr.offset, 0, Sq);
  for (index_t gq = 0; gq < group; ++gq) zero_rows(bp.dq, hk * group + gq, 0, blind);
  // Forward pass: dq, and den per query kept for the reverse pass.
  for (index_t j0 = 0; j0 < Sk; j0 += C) {
    const index_t nk = std::min(C, Sk - j0);
    const index_t i0 = std::max<index_t>(0, j0 - pr.offset);
    const index_t i1 = std::min<index_t>(Sq, j0 + nk - pr.offset);
    load_keys(j0, nk);
    for (index_t gq = 0; gq < group && i1 > i0; ++gq) {
      const index_t h = hk * group + gq, nq = i1 - i0;
      T* den = buf.dens + gq * Sq + i0;
      load_phi_q(h, i0, nq);
      pair_a(i0, nq, j0, nk);
      for (index_t r = 0; r < nq; ++r)  // den from z and the chunk's visible keys
        den[r] = dot_row<T, Backend>(buf.fq + r * ep, buf.z, E) +
                 sum_row<T, Backend>(buf.a + r * C, seen(i0 + r, j0, nk)) + pr.eps;
      load_grads(h, i0, nq, den);
      pair_r(i0, nq, j0, nk);
      dq_from_state(nq);
      if (finite_block(nq, nk)) {
        gemm_wide<T, Backend, RB, VB, true>(nq, ep / W, buf.r, C, 1, buf.fk, ep, buf.dfq, ep, nk);
      } else {
        for (index_t r = 0; r < nq; ++r)
          for (index_t j = 0; j < seen(i0 + r, j0, nk); ++j)
            for (index_t e = 0; e < E; ++e) buf.dfq[r * ep + e] += buf.r[r * C + j] * buf.fk[j * ep + e];
      }
      write_dq(h, i0, nq);
    }
    absorb_keys(nk);
  }
  // Reverse pass: dk and dv, chunk by chunk from the last, with P and y of later queries.
  const index_t chunks = (Sk + C - 1) / C;
  for (index_t chunk = chunks - 1; chunk >= 0; --chunk) {
    const index_t j0 = chunk * C, nk = std::min(C, Sk - j0);
    const index_t i0 = std::max<index_t>(0, j0 - pr.offset);
    const index_t i1 = std::min<index_t>(Sq, j0 + nk - pr.offset);
    load_keys(j0, nk);
    dk_from_state(nk);
    for (index_t gq = 0; gq < group && i1 > i0; ++gq) {
      const index_t h = hk * group + gq, nq = i1 - i0;
      load_phi_q(h, i0, nq);
      load_grads(h, i0, nq, buf.dens + gq * Sq + i0);
      pair_a(i0, nq, j0, nk);
      pair_r(i0, nq, j0, nk);
      if (finite_block(nq, nk)) {
        gemm_wide<T, Backend, RB, VB, true>(nk, ep / W, buf.r, 1, C, buf.fq, ep, buf.dfk, ep, nq);
        gemm_wide<T, Backend, RB, VB, true>(nk, mp / W, buf.a, 1, C, buf.g, mp, buf.dvv, mp, nq);
      } else {
        for (index_t r = 0; r < nq; ++r)
          for (index_t j = 0; j < seen(i0 + r, j0, nk); ++j) {
            for (index_t e = 0; e < E; ++e) buf.dfk[j * ep + e] += buf.r[r * C + j] * buf.fq[r * ep + e];
            for (index_t m = 0; m < M; ++m) buf.dvv[j * mp + m] += buf.a[r * C + j] * buf.g[r * mp + m];
          }
      }
      absorb_queries(nq);
    }
    write_dk_dv(j0, nk);
  }
  write_dstate();
}

template <class Backend, class T, class FeatureMap>
void run_linear_backward(const linear_backward_problem<T>& bp, const FeatureMap& phi, int threads) {
  const auto& pr = bp.forward;
  const index_t B = pr.q.extent(0), H = pr.q.extent(1), Hk = pr.k.extent(1);
  const index_t tasks = B * Hk;
  if (tasks == 0 || H == 0) return;
  const int used = static_cast<int>(std::min<index_t>(std::max(threads, 1), tasks));
  const index_t E = pr.feature_dim(), M = pr.v.extent(3);
  const index_t dens = pr.causal ? (H / Hk) * pr.q.extent(2) : 0;
  const scratch_slices<T> scratch(used, linear_backward_buffers<T, Backend>::size(E, M, dens));
  parallel_for(tasks, used, [&](index_t t, int thread) {
    linear_backward_buffers<T, Backend> buf(scratch.slice(thread), E, M);
    linear_backward_task<Backend>(bp, phi, t / Hk, t % Hk, buf);
  });
}

}  // namespace fovea::detail
