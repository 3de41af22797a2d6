// HiP's mask estimation (Lee et al., ICLR 2025; reference v1.1): for one block of queries,
// pick `branches` key blocks out of the candidates by a tree search. The candidates start
// as `branches` equal-width branches; each round splits every branch in two, scores each
// half by its centre key block (the max of q.k over the block's representative queries
// and its keys, a query ignoring keys at or past its window start) and keeps the best
// `branches` halves, until every branch is one key block: ~log2(candidates / branches)
// rounds of one small GEMM each.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>

#include "../core/scratch.hpp"
#include "../core/tensor_view.hpp"
#include "../simd/vec.hpp"
#include "gemm_tile.hpp"
#include "kv_source.hpp"
#include "stage.hpp"
#include "tile_traits.hpp"

namespace fovea::detail {

struct hip_params {
  index_t branches = 256;  ///< key blocks kept per query block (top_k / block_size_k)
  index_t block_q = 64, stride_q = 2, block_k = 2, stride_k = 1;
  index_t window = 256, sink = 16;
  bool causal = true;
};

/// Keys [first, last) a query block may select from, in key blocks of p.block_k.
struct hip_candidates {
  index_t first = 0, last = 0;
  index_t blocks(index_t block_k) const noexcept { return (last - first + block_k - 1) / block_k; }
};

/// The candidates of queries [i0, i1) of Sq against Sk keys: [sink, P - window] for the
/// block's last position P (bottom-right causal), every key otherwise. The reference
/// writes [sink, P - window) with a window of [P - window, P]; with fovea's window
/// (P - window, P] the candidates include P - window, so that sinks + candidates + window
/// cover every causal key of every query (the spec's oracle 1).
inline hip_candidates hip_candidates_for(const hip_params& p, index_t i1, index_t Sq,
                                         index_t Sk) noexcept {
  if (!p.causal) return {0, Sk};
  const index_t first = std::min(p.sink, Sk);
  const index_t last_position = i1 - 1 + Sk - Sq;
  return {first, std::clamp<index_t>(last_position - p.window + 1, first, Sk)};
}

/// Per-thread buffers of one query block's search.
template <class T, class Backend>
struct hip_buffers {
  static constexpr int W = vec<T, Backend>::width;
  static index_t reps(const hip_params& p) noexcept {  // representative queries
    return (p.block_q + p.stride_q - 1) / p.stride_q;
  }
  static index_t columns(const hip_params& p) noexcept { return (reps(p) + W - 1) / W * W; }
  static index_t key_rows(const hip_params& p) noexcept {  // rows scored per round, at most
    return 2 * p.branches * ((p.block_k + p.stride_k - 1) / p.stride_k);
  }
  static index_t indices(const hip_params& p) noexcept { return 8 * p.branches + reps(p); }
  static index_t size(const hip_params& p, index_t D) noexcept {
    const index_t ld = columns(p), rows = key_rows(p);
    return round_to_line<T>(D * ld) + round_to_line<T>(rows * D) + round_to_line<T>(rows * ld) +
           round_to_line<T>(2 * p.branches) +
           round_to_line<T>((indices(p) * index_t(sizeof(index_t)) + index_t(sizeof(T)) - 1) /
                            index_t(sizeof(T)));
  }
  T *q_t, *keys, *scores, *child_score;
  index_t *first, *end;              ///< branches, in key blocks of the candidates
  index_t *child_first, *child_end;  ///< halves of this round
  index_t *pick, *position;          ///< ranked children; representative positions
  hip_buffers(T* work, const hip_params& p, index_t D) noexcept {
    const index_t ld = columns(p), rows = key_rows(p), kb = p.branches;
    q_t = work;
    keys = q_t + round_to_line<T>(D * ld);
    scores = keys + round_to_line<T>(rows * D);
    child_score = scores + round_to_line<T>(rows * ld);
    first = reinterpret_cast<index_t*>(child_score + round_to_line<T>(2 * kb));
    end = first + kb;
    child_first = end + kb;
    child_end = child_first + 2 * kb;
    pick = child_end + 2 * kb;
    position = pick + 2 * kb;
  }
};

/// Writes the sorted first keys of the selected key blocks of queries [i0, i1) (query
/// rows q_row(i), D long, at positions i + offset) to `starts` and returns their count.
template <class Backend, class T, class S, class QueryRow>
index_t hip_select_block(const hip_params& p, QueryRow&& q_row, index_t i0, index_t i1,
                         index_t offset, const kv_source<S>& kv, const hip_candidates& cand,
                         index_t D, hip_buffers<T, Backend>& buf, std::int32_t* starts) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width, RB = tile_traits<T, Backend>::row_block;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const index_t nb = cand.blocks(p.block_k), kb = p.branches;
  if (nb <= kb) {
    for (index_t m = 0; m < nb; ++m) starts[m] = std::int32_t(cand.first + m * p.block_k);
    return nb;
  }
  // Representative queries as columns; padding repeats the last one, so a max over whole
  // vectors is a max over the real columns.
  const index_t ld = hip_buffers<T, Backend>::columns(p);
  index_t* position = buf.position;
  index_t reps = 0;
  for (index_t i = i0; i < i1; i += p.stride_q) position[reps++] = i + offset;
  for (index_t c = 0; c < ld; ++c) {
    const auto* row = q_row(std::min(c, reps - 1) * p.stride_q + i0);
    for (index_t d = 0; d < D; ++d) buf.q_t[d * ld + c] = T(row[d]);
  }
  for (index_t m = 0; m < kb; ++m) buf.first[m] = m * nb / kb, buf.end[m] = (m + 1) * nb / kb;

  for (bool split = true; split;) {
    index_t children = 0, rows = 0;
    for (index_t m = 0; m < kb; ++m) {
      const index_t a = buf.first[m], e = buf.end[m];
      if (e - a >= 2) {
        buf.child_first[children] = a, buf.child_end[children++] = a + (e - a) / 2;
        buf.child_first[children] = a + (e - a) / 2, buf.child_end[children++] = e;
      } else {
        buf.child_first[children] = a, buf.child_end[children++] = e;
      }
    }
    // Gather each child's representative keys (its centre block, every stride_k-th key).
    for (index_t c = 0; c < children; ++c) {
      const index_t centre = buf.child_first[c] + (buf.child_end[c] - buf.child_first[c]) / 2;
      const index_t k0 = cand.first + centre * p.block_k;
      const index_t k1 = std::min(cand.last, k0 + p.block_k);
      for (index_t j = k0; j < k1; j += p.stride_k)
        stage_rows(kv, true, j, 1, D, D, buf.keys + rows++ * D);
    }
    gemm_wide<T, Backend, RB, 4, false>(rows, ld / W, buf.keys, D, 1, buf.q_t, ld, buf.scores, ld,
                                        D);
    // Score: max over rows of the child and the columns that may see each key.
    rows = 0;
    for (index_t c = 0; c < children; ++c) {
      const index_t centre = buf.child_first[c] + (buf.child_end[c] - buf.child_first[c]) / 2;
      const index_t k0 = cand.first + centre * p.block_k;
      const index_t k1 = std::min(cand.last, k0 + p.block_k);
      T best = neg_inf;
      for (index_t j = k0; j < k1; j += p.stride_k, ++rows) {
        const T* s = buf.scores + rows * ld;
        index_t from = 0;  // the first column whose window starts past key j
        if (p.causal)
          while (from < reps && position[from] - p.window + 1 <= j) ++from;
        if (from == 0) {
          auto mx = V::load(s);
          for (index_t x = W; x < ld; x += W) mx = V::max(mx, V::load(s + x));
          best = std::max(best, V::reduce_max(mx));
        } else {
          for (index_t x = from; x < reps; ++x) best = std::max(best, s[x]);
        }
      }
      buf.child_score[c] = std::isnan(best) ? std::numeric_limits<T>::infinity() : best;
    }
    // Keep the best kb children (ties: the earlier one), in key order.
    index_t* pick = buf.pick;
    std::iota(pick, pick + children, index_t(0));
    std::nth_element(pick, pick + kb, pick + children, [&](index_t x, index_t y) {
      return buf.child_score[x] > buf.child_score[y] ||
             (buf.child_score[x] == buf.child_score[y] && x < y);
    });
    std::sort(pick, pick + kb);
    split = false;
    for (index_t m = 0; m < kb; ++m) {
      buf.first[m] = buf.child_first[pick[m]];
      buf.end[m] = buf.child_end[pick[m]];
      split = split || buf.end[m] - buf.first[m] >= 2;
    }
  }
  for (index_t m = 0; m < kb; ++m) starts[m] = std::int32_t(cand.first + buf.first[m] * p.block_k);
  return kb;
}

}  // namespace fovea::detail
