// Linear attention, chunked: per (batch, key/value head), keys are taken C at a time; a
// chunk's queries get phi(Q) S (the state of all earlier keys) plus the masked
// quadratic phi(Q) phi(K)^T V inside the chunk, then S += phi(K)^T V and z += sum phi(K).
// Every product is the dense engine's micro-kernel, so the causal form runs at GEMM
// speed rather than token by token. The state (S, z) can be read in and written out,
// which is what a recurrent decode step is.
#pragma once

#include <algorithm>
#include <cmath>

#include "../../core/parallel.hpp"
#include "../../core/scratch.hpp"
#include "../../core/tensor_view.hpp"
#include "../../simd/prefetch.hpp"
#include "../../simd/row_math.hpp"
#include "../../simd/vec.hpp"
#include "../tile/gemm_tile.hpp"

namespace fovea::detail {

/// How many features phi makes of a row of d: phi.features(d) if it says, else d.
template <class FeatureMap>
index_t feature_count(const FeatureMap& phi, index_t d) noexcept {
  if constexpr (requires { phi.features(d); })
    return phi.features(d);
  else
    return d;
}

template <class T>
struct linear_problem {
  tensor_view<const T, 4> q, k, v;  ///< (B, H, Sq, D), (B, Hk, Sk, D), (B, Hk, Sk, M)
  tensor_view<T, 4> out;            ///< (B, H, Sq, M)
  bool causal = false;
  index_t offset = 0;  ///< causal: query i sees keys j <= i + offset
  T eps = T(1e-6);
  T* state = nullptr;    ///< optional (B, Hk) x [S (E x M), z (E)], read then written
  index_t features = 0;  ///< E, the features phi makes of a row; 0: D
  index_t feature_dim() const noexcept { return features > 0 ? features : q.extent(3); }
};

inline constexpr index_t linear_chunk = 64;

template <class T, class Backend>
struct linear_buffers {
  static constexpr int W = vec<T, Backend>::width;
  static constexpr index_t C = linear_chunk;
  static index_t padded(index_t n) noexcept { return (n + W - 1) / W * W; }
  static index_t size(index_t E, index_t M) noexcept {
    const index_t mp = padded(M);
    return round_to_line<T>(E * C) + round_to_line<T>(C * mp) + round_to_line<T>(C * E) +
           round_to_line<T>(C * C) + round_to_line<T>(C * mp) + round_to_line<T>(E * mp) +
           round_to_line<T>(E) + round_to_line<T>(C);
  }
  index_t mp;
  T *phi_kt, *v, *phi_q, *a, *num, *s, *z, *den;
  linear_buffers(T* w, index_t E, index_t M) noexcept : mp(padded(M)) {
    phi_kt = w;                            // [E][C]   phi(K)^T of the chunk
    v = phi_kt + round_to_line<T>(E * C);  // [C][mp]  the chunk's values, zero-padded
    phi_q = v + round_to_line<T>(C * mp);  // [C][E]
    a = phi_q + round_to_line<T>(C * E);   // [C][C]   phi(Q) phi(K)^T, masked
    num = a + round_to_line<T>(C * C);     // [C][mp]
    s = num + round_to_line<T>(C * mp);    // [E][mp]  state S
    z = s + round_to_line<T>(E * mp);      // [E]      state z
    den = z + round_to_line<T>(E);         // [C]
  }
};

/// Runs one (b, hk): all query heads of the group against all keys.
template <class Backend, class T, class FeatureMap>
void linear_task(const linear_problem<T>& pr, const FeatureMap& phi, index_t b, index_t hk,
                 linear_buffers<T, Backend>& buf) noexcept {
  constexpr index_t C = linear_chunk;
  constexpr int W = vec<T, Backend>::width;
  const index_t H = pr.q.extent(1), Hk = pr.k.extent(1), group = H / Hk;
  const index_t Sq = pr.q.extent(2), Sk = pr.k.extent(2), M = pr.v.extent(3);
  const index_t D = pr.q.extent(3), E = pr.feature_dim();
  const index_t mp = buf.mp;
  T* state = pr.state ? pr.state + (b * Hk + hk) * (E * M + E) : nullptr;
  std::fill(buf.s, buf.s + E * mp, T(0));
  std::fill(buf.z, buf.z + E, T(0));
  if (state) {
    for (index_t e = 0; e < E; ++e) std::copy(state + e * M, state + e * M + M, buf.s + e * mp);
    std::copy(state + E * M, state + E * M + E, buf.z);
  }

  auto load_chunk = [&](index_t j0, index_t nk) {  // phi(K)^T and V of keys [j0, j0 + nk)
    T* row = buf.phi_q;                            // scratch for one phi(k) row
    for (index_t j = 0; j < C; ++j) {
      if (j < nk) phi(pr.k.ptr(b, hk, j0 + j, 0), row, D);
      for (index_t e = 0; e < E; ++e) buf.phi_kt[e * C + j] = j < nk ? row[e] : T(0);
      T* v = buf.v + j * mp;
      if (j < nk) std::copy(pr.v.ptr(b, hk, j0 + j, 0), pr.v.ptr(b, hk, j0 + j, 0) + M, v);
      std::fill(v + (j < nk ? M : 0), v + mp, T(0));
    }
  };
  // The next chunk's key, value and query rows, asked for while this one computes, a
  // share between each of its products' micro-kernel calls (at N=32768, D=64 they come
  // from DRAM; asked for at once, the time grew 8.8x from N=4096, paced 8.2x; asking for
  // the output rows too cost 2% at N=4096 and gained nothing).
  paced_prefetch next;
  auto prefetch_chunk = [&](index_t j0, index_t nk) {
    next = paced_prefetch{};
    constexpr index_t size = sizeof(T);
    next.add(pr.k.ptr(b, hk, j0, 0), D * size, pr.k.stride(2) * size, nk, prefetch_kind::l2);
    next.add(pr.v.ptr(b, hk, j0, 0), M * size, pr.v.stride(2) * size, nk, prefetch_kind::l2);
    const index_t i0 = std::clamp<index_t>(j0 - pr.offset, 0, Sq);  // the queries on the diagonal
    const index_t i1 = std::clamp<index_t>(j0 + nk - pr.offset, i0, Sq);
    for (index_t g = 0; g < group && i1 > i0; ++g) {
      const index_t h = hk * group + g;
      next.add(pr.q.ptr(b, h, i0, 0), D * size, pr.q.stride(2) * size, i1 - i0, prefetch_kind::l2);
    }
    next.pace((E + 3 * group * C) / 4);  // micro-kernel calls of a chunk (row blocks of 4)
  };
  auto absorb_chunk = [&](index_t nk) {  // S += phi(K)^T V, z += sum phi(K)
    gemm_wide<T, Backend, 4, 4, true>(E, mp / W, buf.phi_kt, C, 1, buf.v, mp, buf.s, mp, nk, &next);
    for (index_t e = 0; e < E; ++e) buf.z[e] += sum_row<T, Backend>(buf.phi_kt + e * C, nk);
  };
  // Queries [i0, i0 + nq) of head h: num = phi(Q) S (+ masked intra-chunk part), out.
  auto emit = [&](index_t h, index_t i0, index_t nq, index_t j0, index_t nk) {
    for (index_t r = 0; r < nq; ++r) phi(pr.q.ptr(b, h, i0 + r, 0), buf.phi_q + r * E, D);
    gemm_wide<T, Backend, 4, 4, false>(nq, mp / W, buf.phi_q, E, 1, buf.s, mp, buf.num, mp, E,
                                       &next);
    for (index_t r = 0; r < nq; ++r) buf.den[r] = dot_row<T, Backend>(buf.phi_q + r * E, buf.z, E);
    if (nk > 0) {
      gemm_wide<T, Backend, 4, 4, false>(nq, C / W, buf.phi_q, E, 1, buf.phi_kt, C, buf.a, C, E,
                                         &next);
      bool skipped = false;
      for (index_t r = 0; r < nq; ++r) {  // keys [0, seen) of the chunk are visible
        const index_t seen = std::clamp<index_t>(i0 + r + pr.offset - j0 + 1, 0, nk);
        T* row = buf.a + r * C;
        std::fill(row + seen, row + C, T(0));
        skipped = skipped || seen < nk;
        buf.den[r] += sum_row<T, Backend>(row, seen);
      }
      if (skipped && !all_finite<T, Backend>(buf.v, mp, nk, M)) {
        for (index_t r = 0; r < nq; ++r)  // hidden keys skipped, not multiplied by 0
          for (index_t m = 0; m < M; ++m) {
            T acc = buf.num[r * mp + m];
            for (index_t j = 0; j < nk && j0 + j <= i0 + r + pr.offset; ++j)
              acc += buf.a[r * C + j] * buf.v[j * mp + m];
            buf.num[r * mp + m] = acc;
          }
      } else {
        gemm_wide<T, Backend, 4, 4, true>(nq, mp / W, buf.a, C, 1, buf.v, mp, buf.num, mp, nk,
                                          &next);
      }
    }
    for (index_t r = 0; r < nq; ++r) {
      const T d = buf.den[r] + pr.eps;
      T* o = pr.out.ptr(b, h, i0 + r, 0);
      for (index_t m = 0; m < M; ++m) o[m] = d == T(0) ? T(0) : buf.num[r * mp + m] / d;
    }
  };

  if (!pr.causal && Sk == 0) {  // no key at all: every row sees none and outputs 0
    for (index_t g = 0; g < group; ++g)
      for (index_t i = 0; i < Sq; ++i)
        std::fill(pr.out.ptr(b, hk * group + g, i, 0), pr.out.ptr(b, hk * group + g, i, 0) + M,
                  T(0));
  } else if (!pr.causal) {
    for (index_t j0 = 0; j0 < Sk; j0 += C) {
      const index_t nk = std::min(C, Sk - j0);
      load_chunk(j0, nk);
      absorb_chunk(nk);
    }
    for (index_t g = 0; g < group; ++g)
      for (index_t i0 = 0; i0 < Sq; i0 += C) emit(hk * group + g, i0, std::min(C, Sq - i0), 0, 0);
  } else {
    // Queries that see no key at all (offset < 0) get 0.
    for (index_t g = 0; g < group; ++g)
      for (index_t i = 0; i < std::min(Sq, -pr.offset); ++i)
        std::fill(pr.out.ptr(b, hk * group + g, i, 0), pr.out.ptr(b, hk * group + g, i, 0) + M,
                  T(0));
    for (index_t j0 = 0; j0 < Sk; j0 += C) {
      const index_t nk = std::min(C, Sk - j0);
      const index_t i0 = std::max<index_t>(0, j0 - pr.offset);  // last visible key in the chunk
      const index_t i1 = std::min<index_t>(Sq, j0 + nk - pr.offset);
      if (j0 + nk < Sk) prefetch_chunk(j0 + nk, std::min(C, Sk - j0 - nk));
      load_chunk(j0, nk);
      if (i1 > i0)
        for (index_t g = 0; g < group; ++g) emit(hk * group + g, i0, i1 - i0, j0, nk);
      absorb_chunk(nk);
      next.finish();
    }
  }
  if (state) {
    for (index_t e = 0; e < E; ++e) std::copy(buf.s + e * mp, buf.s + e * mp + M, state + e * M);
    std::copy(buf.z, buf.z + E, state + E * M);
  }
}

template <class Backend, class T, class FeatureMap>
void run_linear(const linear_problem<T>& pr, const FeatureMap& phi, int threads) {
  const index_t B = pr.q.extent(0), Hk = pr.k.extent(1);
  const index_t tasks = B * Hk;
  if (tasks == 0 || pr.q.extent(1) == 0) return;
  const int used = static_cast<int>(std::min<index_t>(std::max(threads, 1), tasks));
  const index_t E = pr.feature_dim(), M = pr.v.extent(3);
  const scratch_slices<T> scratch(used, linear_buffers<T, Backend>::size(E, M));
  parallel_for(tasks, used, [&](index_t t, int thread) {
    linear_buffers<T, Backend> buf(scratch.slice(thread), E, M);
    linear_task<Backend>(pr, phi, t / Hk, t % Hk, buf);
  });
}

}  // namespace fovea::detail
