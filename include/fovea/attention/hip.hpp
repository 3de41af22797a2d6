// fovea::hip_attention and fovea::hip_select: HiP attention (Lee et al., "HiP Attention:
// Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning", ICLR 2025;
// reference DeepAuto-AI/hip-attention v1.1). Training-free: each block of queries keeps
// top_k keys found by a hierarchical tree search, plus sink tokens and a sliding window,
// and attends to their union with one online softmax on the block-sparse engine.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "../core/error.hpp"
#include "../core/parallel.hpp"
#include "../core/scratch.hpp"
#include "../core/tensor_view.hpp"
#include "../engine/select/hip_select.hpp"
#include "../engine/sparse/sparse.hpp"
#include "../simd/backend.hpp"
#include "../simd/prefetch.hpp"
#include "softmax.hpp"

namespace fovea {

struct hip_options {
  bool causal = false;            ///< bottom-right aligned; LLM callers ask for it by name
  index_t top_k = 512;            ///< keys selected per query block (mask_k)
  index_t block_size_q = 64;      ///< queries per block
  index_t block_stride_q = 2;     ///< every n-th query of a block represents it
  index_t block_size_k = 2;       ///< keys per selected block; divides top_k
  index_t block_stride_k = 1;     ///< every n-th key of a block represents it
  index_t sliding_window = -1;    ///< -1: 256 when causal, 0 otherwise
  index_t sink_tokens = -1;       ///< -1: 16 when causal, 0 otherwise
  std::optional<double> scale{};  ///< attention logit scale; default 1/sqrt(D)
  tensor_view<float, 3> lse{};    ///< out, optional (B, H, Sq)
  tensor_view<const float, 3> k_scale{}, v_scale{};  ///< int8 / fp8 caches, as softmax_options
  int threads = 0;                ///< 0: all OpenMP offers; 1: serial
};

/// What hip_select chose: per (batch, query head, query block) the sorted first keys of up
/// to max_blocks key blocks of block_size_k keys. Reusable across decode steps.
struct hip_selection {
  hip_selection() = default;  // not an aggregate: {.member = ...} names the options
  index_t batches = 0, heads = 0, query_blocks = 0, max_blocks = 0;
  index_t block_size_q = 0, block_size_k = 0;
  std::vector<std::int32_t> starts;  ///< (batches, heads, query_blocks, max_blocks); -1 unused
  std::vector<std::int32_t> counts;  ///< (batches, heads, query_blocks)

  std::span<const std::int32_t> blocks(index_t b, index_t h, index_t qb) const {
    const index_t row = (b * heads + h) * query_blocks + qb;
    return {starts.data() + row * max_blocks, std::size_t(counts[row])};
  }
};

namespace detail {

inline hip_params check_hip_options(const hip_options& o) {
  require(o.top_k >= 1, "options.top_k: is ", o.top_k, ", expected >= 1");
  require(o.block_size_q >= 1, "options.block_size_q: is ", o.block_size_q, ", expected >= 1");
  require(o.block_stride_q >= 1, "options.block_stride_q: is ", o.block_stride_q,
          ", expected >= 1");
  require(o.block_size_k >= 1, "options.block_size_k: is ", o.block_size_k, ", expected >= 1");
  require(o.block_stride_k >= 1, "options.block_stride_k: is ", o.block_stride_k,
          ", expected >= 1");
  require(o.top_k % o.block_size_k == 0, "options.top_k: is ", o.top_k,
          ", expected a multiple of block_size_k (", o.block_size_k, ")");
  require(o.sliding_window >= -1, "options.sliding_window: is ", o.sliding_window,
          ", expected >= -1");
  require(o.sink_tokens >= -1, "options.sink_tokens: is ", o.sink_tokens, ", expected >= -1");
  require(o.causal || o.sliding_window <= 0, "options.sliding_window: is ", o.sliding_window,
          ", but a window needs causal = true");
  require(o.causal || o.sink_tokens <= 0, "options.sink_tokens: is ", o.sink_tokens,
          ", but sinks need causal = true");
  require(o.threads >= 0, "options.threads: is ", o.threads, ", expected >= 0");
  hip_params p;
  p.branches = o.top_k / o.block_size_k;
  p.block_q = o.block_size_q;
  p.stride_q = o.block_stride_q;
  p.block_k = o.block_size_k;
  p.stride_k = o.block_stride_k;
  p.causal = o.causal;
  p.window = o.sliding_window >= 0 ? o.sliding_window : (o.causal ? 256 : 0);
  p.sink = o.sink_tokens >= 0 ? o.sink_tokens : (o.causal ? 16 : 0);
  return p;
}

/// The search reads keys of any cache type (quantized rows dequantized as they are
/// scored), with their scales as the problem's kv_layout holds them.
template <class Backend, class S, class K>
hip_selection run_hip_select(const tensor_view<const S, 4>& q, const kv_layout<K, K>& kv,
                             const hip_params& p, int threads) {
  using T = accumulator_t<S>;
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), D = q.extent(3);
  const index_t Hk = kv.k.extent(1), Sk = kv.k.extent(2);
  hip_selection sel;
  sel.batches = B;
  sel.heads = H;
  sel.query_blocks = (Sq + p.block_q - 1) / p.block_q;
  sel.max_blocks = p.branches;
  sel.block_size_q = p.block_q;
  sel.block_size_k = p.block_k;
  const index_t rows = B * H * sel.query_blocks;
  sel.starts.assign(rows * p.branches, -1);
  sel.counts.assign(rows, 0);
  if (rows == 0) return sel;
  const index_t group = H / Hk;
  const int used = int(std::min<index_t>(std::max(threads, 1), rows));
  // With several query blocks per head, every key is scored many times: quantise the keys
  // once (a quarter of the bytes of K) when the search scores in int8.
  const index_t words = int8_row_words(D);
  std::unique_ptr<std::uint32_t[]> key_quads;  // every word written below: not zeroed
  if (hip_scores_in_int8<T, S, K, Backend>(p) && sel.query_blocks >= 4) {
    key_quads.reset(new std::uint32_t[std::size_t(B * Hk * Sk * words)]);
#if FOVEA_HAS_INT8_DOT
    if constexpr (hip_int8_capable<T, S, K, Backend>()) {
      const scratch_slices<float> rows(used, is_quantized_v<K> ? D : 0);
      parallel_for(B * Hk, used, [&](index_t bh, int thread) {
        const auto src = kv.source(bh / Hk, bh % Hk);
        float* const staged = rows.slice(thread);
        for (index_t j = 0; j < Sk; ++j) {
          const float* key = staged;
          if constexpr (is_quantized_v<K>)
            load_row(src.k_row(j), src.k_scale(j), staged, D);
          else
            key = src.k_row(j);
          quantise_key_int8(key, D, key_quads.get() + (bh * Sk + j) * words);
        }
      });
    }
#endif
  }
  const scratch_slices<T> buffers(used, hip_buffers<T, Backend>::size(p, D));
  parallel_for(rows, used, [&](index_t row, int thread) {
    const index_t b = row / (H * sel.query_blocks), h = row / sel.query_blocks % H;
    const index_t i0 = row % sel.query_blocks * p.block_q, i1 = std::min(Sq, i0 + p.block_q);
    hip_buffers<T, Backend> buf(buffers.slice(thread), p, D);
    const auto cand = hip_candidates_for(p, i1, Sq, Sk);
    const std::uint32_t* quantised =
        key_quads ? key_quads.get() + (b * Hk + h / group) * Sk * words : nullptr;
    // The next block's representative queries are fetched while this block searches.
    for (index_t i = i1; i < std::min(Sq, i1 + p.block_q); i += p.stride_q)
      for (index_t d = 0; d < D; d += 64 / index_t(sizeof(S))) prefetch_l2(q.ptr(b, h, i, d));
    sel.counts[row] = std::int32_t(hip_select_block(
        p, [&](index_t i) { return q.ptr(b, h, i, 0); }, i0, i1, p.causal ? Sk - Sq : 0,
        kv.source(b, h / group), cand, D, buf, sel.starts.data() + row * p.branches, quantised));
  });
  return sel;
}

/// A selection made for these shapes and options: the same rows, block sizes, and
/// blocks inside the keys.
inline void check_selection(const hip_selection& s, const hip_params& p, index_t B, index_t H,
                            index_t Sq, index_t Sk) {
  const index_t blocks = (Sq + p.block_q - 1) / p.block_q;
  require(s.batches == B && s.heads == H && s.query_blocks == blocks, "selection: is for (",
          s.batches, ", ", s.heads, ", ", s.query_blocks, ") query blocks, expected (", B, ", ", H,
          ", ", blocks, ")");
  require(s.block_size_q == p.block_q && s.block_size_k == p.block_k, "selection: block sizes (",
          s.block_size_q, ", ", s.block_size_k, ") differ from the options' (", p.block_q, ", ",
          p.block_k, ")");
  require(s.max_blocks >= 0 && index_t(s.counts.size()) == B * H * blocks &&
              index_t(s.starts.size()) == B * H * blocks * s.max_blocks,
          "selection: starts/counts sizes do not match its extents");
  for (index_t r = 0; r < index_t(s.counts.size()); ++r) {
    require(s.counts[r] >= 0 && s.counts[r] <= s.max_blocks, "selection: count ", r, " is ",
            s.counts[r], ", expected 0 to ", s.max_blocks);
    const std::int32_t* st = s.starts.data() + r * s.max_blocks;
    for (index_t m = 0; m < s.counts[r]; ++m)
      require(st[m] >= 0 && st[m] < Sk && (m == 0 || st[m] > st[m - 1]), "selection: block ", m,
              " of row ", r, " starts at ", st[m], ", expected increasing starts in [0, ", Sk, ")");
  }
}

/// Attends every query block to sinks + its selected blocks + the sliding window.
template <class Backend, class S, class K, class V>
void run_hip_attention(const dense_problem<S, K, V>& pr, const hip_selection& sel,
                       const hip_params& p, int threads) {
  const index_t Sq = pr.queries(), Sk = pr.keys, off = pr.band.offset;
  const index_t longest = sel.max_blocks + 2 * (sel.max_blocks + 2);
  const sparse_rows rows{p.block_q, true, longest};
  auto select = [&](index_t b, index_t h, index_t block, key_piece* pieces) {
    const auto chosen = sel.blocks(b, h, block);
    const index_t i0 = block * p.block_q, i1 = std::min(Sq, i0 + p.block_q);
    // The window's hull over the block: (first position - window, last position].
    const index_t w0 = p.window > 0 ? std::max<index_t>(0, i0 + off - p.window + 1) : Sk;
    const index_t w1 = p.window > 0 ? std::min(Sk, i1 + off) : Sk;
    // Window keys from every_row on are inside every row's window (causality aside).
    const index_t every_row = i1 - 1 + off - p.window + 1;
    index_t count = 0, cursor = w0;  // window keys not yet emitted start at cursor
    auto emit_window = [&](index_t first, index_t last) {
      const index_t split = std::clamp(every_row, first, last);
      count = append_piece(pieces, count, first, split, true);
      count = append_piece(pieces, count, split, last, false);
    };
    auto emit_whole = [&](index_t first, index_t last) {  // a sink or selected block
      last = std::min(last, Sk);
      if (first >= last) return;
      if (cursor < std::min(first, w1)) emit_window(cursor, std::min(first, w1));
      count = append_piece(pieces, count, std::max(first, count ? pieces[count - 1].last : 0), last,
                           false);
      cursor = std::max(cursor, last);
    };
    emit_whole(0, std::min(p.sink, Sk));
    for (const std::int32_t start : chosen) emit_whole(start, start + p.block_k);
    if (cursor < w1) emit_window(cursor, w1);
    return count;
  };
  // Inside window pieces: a key is seen by the queries whose window reaches it.
  const index_t window = p.window;
  auto in_window = [off, window](index_t, index_t, index_t i, index_t j) {
    return j + window > i + off;
  };
  run_sparse<Backend>(pr, rows, select, with_mask_mod(in_window), threads);
}

}  // namespace detail

/// HiP's key-block selection for every (batch, query head, block of queries), made from
/// q and k only; pass it to hip_attention to reuse it (e.g. across decode steps).
///
///   q: (B, H, Sq, D)   k: (B, Hk, Sk, D), Hk dividing H
///
/// k may be in any cache type softmax_attention reads (bf16 / fp16 under a float q,
/// block_q8_0, int8 or fp8 with options.k_scale): quantized keys are dequantized as the
/// search scores them, so the selection is the one made on the dequantized float keys.
/// Throws fovea::error naming the argument for misshapen q, k or scales.
template <class Backend = default_backend, class TQ, class TK>
requires detail::mixed_attention_types<TQ, TK, TK, std::remove_const_t<TQ>>
hip_selection hip_select(tensor_view<TQ, 4> q, tensor_view<TK, 4> k,
                         const hip_options& options = {}) {
  using S = std::remove_const_t<TQ>;
  using K = std::remove_const_t<TK>;
  const detail::hip_params p = detail::check_hip_options(options);
  const tensor_view<const S, 4> qc = q;
  const tensor_view<const K, 4> kc = k;
  const auto kv = detail::check_selection_inputs(qc, kc, options.k_scale);
  return detail::run_hip_select<Backend>(qc, kv, p, detail::resolve_threads(options.threads));
}

/// HiP attention with a given selection: each query attends to the sink tokens, the key
/// blocks selected for its block, and its sliding window (p - window, p], all clipped by
/// causality, with one online softmax. Same shapes, types (k and v in any cache type, with
/// options.k_scale / v_scale for int8 and fp8) and guarantees as softmax_attention.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void hip_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                   tensor_view<TO, 4> out, const hip_selection& selection,
                   const hip_options& options = {}) {
  const detail::hip_params p = detail::check_hip_options(options);
  const auto pr = detail::make_softmax_problem<TO>(
      q, k, v, out, detail::sparse_softmax_options(options, options.causal));
  detail::check_selection(selection, p, q.extent(0), q.extent(1), q.extent(2), k.extent(2));
  detail::run_hip_attention<Backend>(pr, selection, p, detail::resolve_threads(options.threads));
}

/// HiP attention: hip_select, then attention over what it chose. The reference applies
/// no 1/sqrt(D) (its callers pre-scale q); fovea uses options.scale (default 1/sqrt(D)),
/// which does not change the selection.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void hip_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                   tensor_view<TO, 4> out, const hip_options& options = {}) {
  const detail::hip_params p = detail::check_hip_options(options);
  const auto pr = detail::make_softmax_problem<TO>(
      q, k, v, out, detail::sparse_softmax_options(options, options.causal));
  const int threads = detail::resolve_threads(options.threads);
  using K = std::remove_const_t<TK>;
  const detail::kv_layout<K, K> keys{pr.kv.k, pr.kv.k, {}, pr.kv.k_scale, {}};
  const hip_selection sel = detail::run_hip_select<Backend>(pr.q, keys, p, threads);
  detail::run_hip_attention<Backend>(pr, sel, p, threads);
}

}  // namespace fovea
