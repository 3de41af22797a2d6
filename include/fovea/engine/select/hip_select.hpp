// HiP's mask estimation (Lee et al., ICLR 2025; reference v1.1): for one block of queries,
// pick `branches` key blocks out of the candidates by a tree search. The candidates start
// as `branches` equal-width branches; each round splits every branch in two, scores each
// half by its centre key block (the max of q.k over the block's representative queries
// and its keys, a query ignoring keys at or past its window start) and keeps the best
// `branches` halves, until every branch is one key block: ~log2(candidates / branches)
// rounds of one small GEMM each.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>

#include "../../core/scratch.hpp"
#include "../../core/tensor_view.hpp"
#include "../../simd/prefetch.hpp"
#include "../../simd/vec.hpp"
#include "../tile/gemm_tile.hpp"
#include "../kv/kv_source.hpp"
#include "score_int8.hpp"
#include "../kv/stage.hpp"
#include "../tile/tile_traits.hpp"
#include "topk.hpp"

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

/// Keys the search reads as float rows: float keys in place, quantized keys (q8_0, int8,
/// fp8) dequantized first, so a quantized cache is searched exactly as its dequantized
/// values would be. bf16 and fp16 keys are converted as the GEMM loads them.
template <class K>
inline constexpr bool hip_keys_as_float_v = std::is_same_v<K, float> || is_quantized_v<K>;

/// Whether the CPU and the types (compute T, queries Q, keys K) allow hip_select_block to
/// score in int8 (dot_int8).
template <class T, class Q, class K, class Backend>
constexpr bool hip_int8_capable() noexcept {
  return FOVEA_HAS_INT8_DOT && std::is_same_v<T, float> && std::is_same_v<Q, float> &&
         hip_keys_as_float_v<K> && !std::is_same_v<Backend, scalar>;
}

/// True when hip_select_block scores in int8 for these types and parameters, so that
/// keys quantised once can serve many query blocks.
template <class T, class Q, class K, class Backend>
constexpr bool hip_scores_in_int8(const hip_params& p) noexcept {
  constexpr int W = vec<T, Backend>::width;
  const index_t columns = ((p.block_q + p.stride_q - 1) / p.stride_q + W - 1) / W * W;
  return hip_int8_capable<T, Q, K, Backend>() && columns <= 64;
}

/// Quantized key rows dequantized per GEMM call of the search (a few KB per thread).
inline constexpr index_t hip_staged_rows = 32;

/// Prefetches the `bytes` of one row into L2.
inline void prefetch_row_l2(const void* row, index_t bytes) noexcept {
  for (index_t b = 0; b < bytes; b += 64) prefetch_l2(static_cast<const char*>(row) + b);
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
  /// index_t slots: branches (each list with one spare slot), children, ranks, positions,
  /// then one row pointer per row.
  static index_t indices(const hip_params& p) noexcept {
    static_assert(sizeof(void*) <= sizeof(index_t));
    return 12 * p.branches + 2 + reps(p) + key_rows(p);
  }
  static index_t size(const hip_params& p, index_t D) noexcept {
    const index_t ld = columns(p), rows = key_rows(p);
    return round_to_line<T>(D * ld) + round_to_line<T>(rows * ld) +
           round_to_line<T>(int8_quads(D) * ld + ld) + round_to_line<T>(int8_row_words(D) * rows) +
           round_to_line<T>(hip_staged_rows * D) + round_to_line<T>(rows) +
           round_to_line<T>(3 * p.branches + 1) +
           round_to_line<T>((indices(p) * index_t(sizeof(index_t)) + index_t(sizeof(T)) - 1) /
                            index_t(sizeof(T)));
  }
  T *q_t, *scores, *child_score, *branch_score;
  std::uint32_t *q_quads, *key_quads;  ///< int8 scoring: [quads][ld], [rows][int8_row_words]
  float* q_scale;                      ///< int8 scoring: [ld]
  T* staged;                           ///< quantized keys: [hip_staged_rows][D] dequantized
  float* row_scale;                    ///< quantized keys: the scale of each scored row
  index_t *first, *end;                ///< branches, in key blocks of the candidates (+1 spare)
  index_t *child_first, *child_end;    ///< halves of this round
  index_t *pick, *chosen, *position;   ///< ranked children, kept flags; query positions
  void* rows;                          ///< the scored key rows, as const S* pointers
  hip_buffers(T* work, const hip_params& p, index_t D) noexcept {
    const index_t ld = columns(p), n_rows = key_rows(p), kb = p.branches;
    q_t = work;
    scores = q_t + round_to_line<T>(D * ld);
    child_score = scores + round_to_line<T>(n_rows * ld);
    branch_score = child_score + 2 * kb;
    T* int8 = child_score + round_to_line<T>(3 * kb + 1);
    q_quads = reinterpret_cast<std::uint32_t*>(int8);
    q_scale = reinterpret_cast<float*>(q_quads + int8_quads(D) * ld);
    key_quads = reinterpret_cast<std::uint32_t*>(int8 + round_to_line<T>(int8_quads(D) * ld + ld));
    staged = reinterpret_cast<T*>(key_quads) + round_to_line<T>(int8_row_words(D) * n_rows);
    row_scale = reinterpret_cast<float*>(staged + round_to_line<T>(hip_staged_rows * D));
    first = reinterpret_cast<index_t*>(reinterpret_cast<T*>(row_scale) + round_to_line<T>(n_rows));
    end = first + kb + 1;
    child_first = end + kb + 1;
    child_end = child_first + 2 * kb;
    pick = child_end + 2 * kb;
    chosen = pick + 4 * kb;
    position = chosen + 2 * kb;
    this->rows = position + reps(p);
  }
};

/// Writes the sorted first keys of the selected key blocks of queries [i0, i1) (query
/// rows q_row(i), D long, at positions i + offset) to `starts` and returns their count.
/// `key_quads`, if given, holds every key of `kv` already quantised (int8_row_words(D)
/// per key, as quantise_key_int8 writes them), for callers that select many blocks
/// against the same keys.
template <class Backend, class T, class K, class KV, class QueryRow>
index_t hip_select_block(const hip_params& p, QueryRow&& q_row, index_t i0, index_t i1,
                         index_t offset, const kv_source<K, KV>& kv, const hip_candidates& cand,
                         index_t D, hip_buffers<T, Backend>& buf, std::int32_t* starts,
                         const std::uint32_t* key_quads = nullptr) noexcept {
  using Q = std::remove_cv_t<std::remove_pointer_t<decltype(q_row(i0))>>;
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
  // Scores in int8 products where the CPU has them (only their order matters).
  [[maybe_unused]] constexpr bool int8_capable = hip_int8_capable<T, Q, K, Backend>();
  const bool int8 = hip_scores_in_int8<T, Q, K, Backend>(p);
  [[maybe_unused]] const index_t quads = int8_quads(D), words = int8_row_words(D);
  if (!int8) key_quads = nullptr;
  for (index_t c = 0; c < ld; ++c) {
    const auto* row = q_row(std::min(c, reps - 1) * p.stride_q + i0);
    if (!int8)
      for (index_t d = 0; d < D; ++d) buf.q_t[d * ld + c] = T(row[d]);
#if FOVEA_HAS_INT8_DOT
    if constexpr (int8_capable)
      if (int8) buf.q_scale[c] = quantise_query_int8(row, D, buf.q_quads, ld, c, buf.key_quads);
#endif
  }
  for (index_t m = 0; m < kb; ++m) buf.first[m] = m * nb / kb, buf.end[m] = (m + 1) * nb / kb;

  // A half whose centre is its parent's centre (the right half of a parent of width 2
  // or 3) and a branch of one block carried over keep their score; the rest are scored.
  index_t* known = buf.chosen;  // per child: 1 if its score is carried over
  for (bool first_round = true, split = true; split; first_round = false) {
    index_t children = 0, rows = 0;
    for (index_t m = 0; m < kb; ++m) {
      const index_t a = buf.first[m], e = buf.end[m], mid = a + (e - a) / 2;
      const T parent = buf.branch_score[m];
      if (e - a >= 2) {
        buf.child_first[children] = a, buf.child_end[children] = mid, known[children++] = 0;
        buf.child_first[children] = mid, buf.child_end[children] = e;
        known[children] = !first_round && e - mid == 1;
        buf.child_score[children++] = parent;
      } else {
        buf.child_first[children] = a, buf.child_end[children] = e;
        known[children] = !first_round;
        buf.child_score[children++] = parent;
      }
    }
    // The new children's representative keys (the centre block, every stride_k-th key),
    // read in place through a list of rows.
    auto keys_of = [&](index_t c) {
      const index_t centre = buf.child_first[c] + (buf.child_end[c] - buf.child_first[c]) / 2;
      const index_t k0 = cand.first + centre * p.block_k;
      return std::pair{k0, std::min(cand.last, k0 + p.block_k)};
    };
    const K** key_rows = static_cast<const K**>(buf.rows);
    auto** int8_rows = reinterpret_cast<const std::uint32_t**>(buf.rows);
    for (index_t c = 0; c < children; ++c) {
      if (known[c]) continue;
      const auto [k0, k1] = keys_of(c);
      for (index_t j = k0; j < k1; j += p.stride_k, ++rows)
        if (key_quads) {
          int8_rows[rows] = key_quads + j * words;
        } else {
          key_rows[rows] = kv.k_row(j);
          if constexpr (is_quantized_v<K>) buf.row_scale[rows] = kv.k_scale(j);
        }
    }
    // Row r as float: in place, or dequantized into `to`.
    [[maybe_unused]] auto float_row = [&](index_t r, T* to) -> const T* {
      if constexpr (std::is_same_v<K, T>) {
        return key_rows[r];
      } else {
        load_row(key_rows[r], is_quantized_v<K> ? buf.row_scale[r] : 1.0f, to, D);
        return to;
      }
    };
    if (!int8) {
      if constexpr (is_quantized_v<K>) {
        for (index_t r0 = 0; r0 < rows; r0 += hip_staged_rows) {
          const index_t n = std::min(hip_staged_rows, rows - r0);
          for (index_t r = 0; r < n; ++r) float_row(r0 + r, buf.staged + r * D);
          gemm_wide<T, Backend, RB, 4, false>(n, ld / W, buf.staged, D, 1, buf.q_t, ld,
                                              buf.scores + r0 * ld, ld, D);
        }
      } else {
        gemm_wide<T, Backend, RB, 4, false>(rows, ld / W, listed_rows<K>{key_rows}, 1, buf.q_t, ld,
                                            buf.scores, ld, D);
      }
    } else {
#if FOVEA_HAS_INT8_DOT
      if constexpr (int8_capable) {
        constexpr index_t ahead = 16;  // rows prefetched ahead
        const index_t bytes = storage_bytes<K>(D);
        for (index_t r = 0; r < std::min(ahead, rows) && !key_quads; ++r)
          prefetch_row_l2(key_rows[r], bytes);
        for (index_t r = 0; r < rows && !key_quads; ++r) {
          if (r + ahead < rows) prefetch_row_l2(key_rows[r + ahead], bytes);
          quantise_key_int8(float_row(r, buf.staged), D, buf.key_quads + r * words);
          int8_rows[r] = buf.key_quads + r * words;
        }
        dot_int8(rows, ld / 16, int8_rows, buf.q_quads, ld, buf.q_scale, quads, buf.scores, ld);
      }
#endif
    }
    // Score: the max over the child's rows and the columns that may see each key.
    rows = 0;
    for (index_t c = 0; c < children; ++c) {
      if (known[c]) continue;
      const auto [k0, k1] = keys_of(c);
      // A max passes over NaN, so NaN is looked for on the side (s * 0 is NaN for NaN
      // and Inf): a NaN score keeps its child, as the rule in the README says.
      T best = neg_inf, poison = 0;
      auto all = V::broadcast(neg_inf), poisoned = V::broadcast(T(0));
      const auto zero = V::broadcast(T(0));
      for (index_t j = k0; j < k1; j += p.stride_k, ++rows) {
        const T* s = buf.scores + rows * ld;
        index_t from = 0;  // the first column whose window starts past key j
        if (p.causal)
          while (from < reps && position[from] - p.window + 1 <= j) ++from;
        if (from == 0)
          for (index_t x = 0; x < ld; x += W) {
            const auto sx = V::load(s + x);
            all = V::max(all, sx);
            poisoned = V::fma(sx, zero, poisoned);
          }
        else
          for (index_t x = from; x < reps; ++x) best = std::max(best, s[x]), poison += s[x] * T(0);
      }
      best = std::max(best, V::reduce_max(all));
      const bool nan = poison + V::reduce_add(poisoned) != T(0);
      buf.child_score[c] = nan || std::isnan(best) ? std::numeric_limits<T>::infinity() : best;
    }
    // Keep the best kb children (ties: the earlier one), in key order.
    auto* rank = reinterpret_cast<std::uint64_t*>(buf.pick);
    for (index_t c = 0; c < children; ++c) rank[c] = rank_key(float(buf.child_score[c]), c);
    const std::uint64_t bar = kth_largest(rank, children, kb, rank + children);
    for (index_t c = 0; c < children; ++c) known[c] = rank[c] >= bar;  // reused as "kept"
    // Compacted without branches (which half is kept is a coin toss): every child is
    // written at the next slot, which only advances past kept ones (the spare slot takes
    // the writes after the last).
    split = false;
    for (index_t c = 0, m = 0; c < children; ++c) {
      buf.first[m] = buf.child_first[c];
      buf.end[m] = buf.child_end[c];
      buf.branch_score[m] = buf.child_score[c];
      split = split || (known[c] && buf.child_end[c] - buf.child_first[c] >= 2);
      m += known[c];
    }
  }
  for (index_t m = 0; m < kb; ++m) starts[m] = std::int32_t(cand.first + buf.first[m] * p.block_k);
  return kb;
}

}  // namespace fovea::detail
