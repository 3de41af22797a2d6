// fovea::softmax_attention_paged: keys and values in fixed-size pages addressed by a
// per-sequence block table (vLLM / FlashInfer paged KV cache), for decode and prefill.
#pragma once

#include <cstdint>
#include <span>
#include <tuple>
#include <vector>

#include "softmax_varlen.hpp"

namespace fovea {

namespace detail {

/// Validates a paged cache and its block table for `B` sequences of seqlens_k keys.
template <class K, class V>
void check_paged_cache(const tensor_view<const K, 4>& ck, const tensor_view<const V, 4>& cv,
                       tensor_view<const std::int32_t, 2> block_table,
                       std::span<const std::int32_t> seqlens_k, index_t B, index_t H, index_t D) {
  check_rows(ck, "k_cache");
  check_rows(cv, "v_cache");
  check_blocks(ck, "k_cache");
  check_blocks(cv, "v_cache");
  const index_t pages = ck.extent(0), Hk = ck.extent(1), page_size = ck.extent(2);
  require(Hk >= 1 && H % Hk == 0, "k_cache: extent 1 (heads) is ", Hk,
          ", which does not divide the ", H, " heads of q");
  require(page_size >= 1, "k_cache: extent 2 (page size) is ", page_size, ", expected >= 1");
  require(ck.extent(3) == D, "k_cache: extent 3 (dim) is ", ck.extent(3), ", expected ", D);
  for (std::size_t r = 0; r < 3; ++r)
    require(cv.extent(r) == ck.extent(r), "v_cache: extent ", r, " is ", cv.extent(r),
            ", expected ", ck.extent(r), " as k_cache");
  check_data(block_table, "block_table");
  require(block_table.extent(0) == B, "block_table: extent 0 (sequences) is ",
          block_table.extent(0), ", expected ", B);
  require(index_t(seqlens_k.size()) == B, "seqlens_k: has ", seqlens_k.size(),
          " lengths, expected ", B);
  for (index_t b = 0; b < B; ++b) {
    const index_t sk = seqlens_k[b];
    require(sk >= 0 && sk <= block_table.extent(1) * page_size, "seqlens_k: length ", b, " is ", sk,
            ", expected 0 to ", block_table.extent(1) * page_size, " (block_table capacity)");
    for (index_t p = 0; p < (sk + page_size - 1) / page_size; ++p) {
      const index_t page = block_table(b, p);
      require(page >= 0 && page < pages, "block_table: entry (", b, ", ", p, ") is ", page,
              ", expected a page in [0, ", pages, ")");
    }
  }
}

/// One dense problem per sequence b over its pages: queries [q0(b), q0(b) + sq(b)) of
/// batch row qb(b) of q (and out, lse).
template <class Backend, class T, class K, class V, class ScoreMod, class MaskMod, class Rows>
void run_paged(const tensor_view<const T, 4>& cq, const tensor_view<const K, 4>& ck,
               const tensor_view<const V, 4>& cv, const tensor_view<T, 4>& out,
               tensor_view<const std::int32_t, 2> block_table,
               std::span<const std::int32_t> seqlens_k, const softmax_options& options,
               const custom_variant<ScoreMod, MaskMod>& custom, index_t B, Rows&& rows) {
  const index_t H = cq.extent(1), Hk = ck.extent(1);
  const double scale = check_scalar_options(options, cq.extent(3));
  check_scales<K, V>(options, ck.extent(0), Hk, ck.extent(2), ck.extent(3), cv.extent(3), out);
  std::vector<dense_problem<T, K, V>> problems(B);
  for (index_t b = 0; b < B; ++b) {
    const auto [qb, q0, sq] = rows(b);
    dense_problem<T, K, V>& pr = problems[b];
    pr.q = slice(slice(cq, 0, qb, 1), 2, q0, sq);
    pr.out = slice(slice(out, 0, qb, 1), 2, q0, sq);
    if (options.lse.data()) pr.lse = slice(slice(options.lse, 0, qb, 1), 2, q0, sq);
    pr.kv.k = ck;
    pr.kv.v = cv;
    pr.kv.table = slice(block_table, 0, b, 1);
    pr.kv.k_scale = options.k_scale;
    pr.kv.v_scale = options.v_scale;
    pr.kv.k_channel_scale = options.k_channel_scale;
    pr.kv.v_channel_scale = options.v_channel_scale;
    pr.batch_base = b;
    // bias and mask: batch row qb (unpacked calls) or the packed rows; keys from 0
    const index_t bias_row = cq.extent(0) == 1 ? -1 : qb;
    apply_options(pr, sequence_options(options, bias_row, q0, sq, 0, seqlens_k[b]), scale, H / Hk,
                  sq, seqlens_k[b]);
  }
  run_dense<Backend>(std::span<const dense_problem<T, K, V>>(problems), custom,
                     resolve_threads(options.threads));
}

}  // namespace detail

/// Softmax attention against a paged KV cache.
///
///   q: (B, H, Sq, D)    out: (B, H, Sq, Dv)    options.lse, if given: (B, H, Sq)
///   k_cache: (pages, Hk, page_size, D)   v_cache: (pages, Hk, page_size, Dv)
///     (fovea::paged_nhd / paged_hnd view the usual memory layouts)
///   block_table: (B, max_pages) page indices;  seqlens_k: B key counts
///
/// Key j of sequence b is slot j % page_size of page block_table(b, j / page_size); only
/// the first ceil(seqlens_k[b] / page_size) entries of a row are read. The causal
/// diagonal is bottom-right per sequence (its Sq queries are its last tokens). bias and
/// mask: (B|1, H|Hk|1, Sq|1, max_pages * page_size|1), key columns counted within each
/// sequence (a sequence of n keys reads columns [0, n)); score_mod / mask_mod receive the
/// batch index b. The result
/// equals softmax_attention on the same keys and values laid out contiguously, bit for bit,
/// for any page size: a tile that spans pages is gathered into the tile buffer first (a
/// copy per tile when pages are smaller than the tile: 64 keys for prefill, 256 for decode).
/// Storage types as softmax_attention; k_scale / v_scale (int8, fp8 caches): (pages|1,
/// Hk|1, page_size|1), indexed like the cache.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO,
          class ScoreMod = identity_score_mod, class MaskMod = keep_all_mask_mod>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void softmax_attention_paged(tensor_view<TQ, 4> q, tensor_view<TK, 4> k_cache,
                             tensor_view<TV, 4> v_cache, tensor_view<TO, 4> out,
                             tensor_view<const std::int32_t, 2> block_table,
                             std::span<const std::int32_t> seqlens_k,
                             const softmax_options& options = {},
                             const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  using T = TO;
  using namespace detail;
  const tensor_view<const T, 4> cq = q;
  const tensor_view<const std::remove_const_t<TK>, 4> ck = k_cache;
  const tensor_view<const std::remove_const_t<TV>, 4> cv = v_cache;
  check_rows(cq, "q");
  check_rows(out, "out");
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), D = q.extent(3);
  require(D >= 1, "q: extent 3 (dim) is ", D, ", expected at least 1");
  check_paged_cache(ck, cv, block_table, seqlens_k, B, H, D);
  check_output(out, cq, ck, "k_cache", cv, "v_cache");
  check_scalar_options(options, D);
  check_sequence_terms(options, B, H, ck.extent(1), Sq, block_table.extent(1) * ck.extent(2), out);
  check_head_options(options, B, H);
  check_lse(options, B, H, Sq, cq, ck, cv, out);
  run_paged<Backend>(cq, ck, cv, out, block_table, seqlens_k, options, custom, B,
                     [Sq](index_t b) { return std::tuple<index_t, index_t, index_t>{b, 0, Sq}; });
}

/// The same with ragged queries (FlashInfer's qo_indptr, vLLM's scheduler): sequence b's
/// queries are rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of the packed q, so chunked
/// prefill and decode tokens share one call. Each sequence still picks its own path (at
/// most 16 queries: decode), so results are those of per-sequence calls, bit for bit,
/// whatever the thread count.
///
///   q: (1, H, total_q, D)   out: (1, H, total_q, Dv)   options.lse: (1, H, total_q)
///   cu_seqlens_q: B + 1 offsets, 0 first, total_q last;  the rest as above, with bias
///   and mask packed along the queries: (1, H|Hk|1, total_q|1, max_pages * page_size|1)
///   (a speculative tree mask: each draft token's row keeps its ancestors' columns).
template <class Backend = default_backend, class TQ, class TK, class TV, class TO,
          class ScoreMod = identity_score_mod, class MaskMod = keep_all_mask_mod>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void softmax_attention_paged(tensor_view<TQ, 4> q, tensor_view<TK, 4> k_cache,
                             tensor_view<TV, 4> v_cache, tensor_view<TO, 4> out,
                             tensor_view<const std::int32_t, 2> block_table,
                             std::span<const std::int32_t> seqlens_k,
                             std::span<const std::int32_t> cu_seqlens_q,
                             const softmax_options& options = {},
                             const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  using T = TO;
  using namespace detail;
  const tensor_view<const T, 4> cq = q;
  const tensor_view<const std::remove_const_t<TK>, 4> ck = k_cache;
  const tensor_view<const std::remove_const_t<TV>, 4> cv = v_cache;
  check_rows(cq, "q");
  check_rows(out, "out");
  const index_t H = q.extent(1), D = q.extent(3);
  require(q.extent(0) == 1, "q: extent 0 (batch) is ", q.extent(0),
          ", expected 1 (sequences are packed along seq)");
  require(D >= 1, "q: extent 3 (dim) is ", D, ", expected at least 1");
  check_offsets(cu_seqlens_q, q.extent(2), "cu_seqlens_q");
  const index_t B = index_t(cu_seqlens_q.size()) - 1;
  check_paged_cache(ck, cv, block_table, seqlens_k, B, H, D);
  check_output(out, cq, ck, "k_cache", cv, "v_cache");
  check_scalar_options(options, D);
  check_sequence_terms(options, 1, H, ck.extent(1), q.extent(2),
                       block_table.extent(1) * ck.extent(2), out);
  check_head_options(options, B, H);
  check_lse(options, 1, H, q.extent(2), cq, ck, cv, out);
  run_paged<Backend>(cq, ck, cv, out, block_table, seqlens_k, options, custom, B,
                     [&](index_t b) {
                       const index_t q0 = cu_seqlens_q[b];
                       return std::tuple<index_t, index_t, index_t>{0, q0,
                                                                    cu_seqlens_q[b + 1] - q0};
                     });
}

}  // namespace fovea
