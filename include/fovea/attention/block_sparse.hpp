// fovea::block_sparse_attention: softmax attention over a block-sparse layout (CSR lists of
// key blocks per block of queries, as FlashInfer's BSR and FlexAttention's BlockMask).
#pragma once

#include <cstdint>
#include <span>

#include "../core/error.hpp"
#include "../core/parallel.hpp"
#include "../core/tensor_view.hpp"
#include "../engine/sparse/sparse.hpp"
#include "../engine/dense/variant.hpp"
#include "../simd/backend.hpp"
#include "softmax.hpp"

namespace fovea {

/// Which key blocks each block of queries visits. Row (b, h, qb) of the CSR lists, at
/// (b * heads + h) * ceil(Sq / block_q) + qb, holds the blocks of keys
/// [index * block_k, (index + 1) * block_k) that queries [qb * block_q, ...) may see.
struct block_sparse_layout {
  index_t block_q = 64;  ///< queries per row
  index_t block_k = 64;  ///< keys per block
  index_t batches = 1;   ///< 1 (shared by every batch row) or B
  index_t heads = 1;     ///< 1 (shared), Hk (per key/value head) or H (per query head)
  std::span<const std::int32_t> offsets;  ///< rows + 1 entries, 0 first, non-decreasing
  std::span<const std::int32_t> indices;  ///< per row: strictly increasing block indices
  /// Empty, or one flag per index: nonzero marks a partial block, in which the variant's
  /// mask_mod is evaluated; blocks marked 0 are full and skip it (FlexAttention's
  /// full/partial blocks). Empty: mask_mod is evaluated in every block.
  std::span<const std::uint8_t> partial{};
};

namespace detail {

/// Checks the layout against the problem's shapes; returns the longest row's length.
inline index_t check_layout(const block_sparse_layout& l, index_t B, index_t H, index_t Hk,
                            index_t Sq, index_t Sk) {
  require(l.block_q >= 1, "layout.block_q: is ", l.block_q, ", expected >= 1");
  require(l.block_k >= 1, "layout.block_k: is ", l.block_k, ", expected >= 1");
  require(l.batches == 1 || l.batches == B, "layout.batches: is ", l.batches, ", expected 1 or ",
          B);
  require(l.heads == 1 || l.heads == Hk || l.heads == H, "layout.heads: is ", l.heads,
          ", expected 1, ", Hk, " (key/value heads) or ", H, " (query heads)");
  const index_t rows = l.batches * l.heads * ((Sq + l.block_q - 1) / l.block_q);
  require(index_t(l.offsets.size()) == rows + 1, "layout.offsets: has ", l.offsets.size(),
          " entries, expected ", rows + 1, " (one per row and one more)");
  require(l.offsets[0] == 0, "layout.offsets: entry 0 is ", l.offsets[0], ", expected 0");
  require(index_t(l.offsets[rows]) == index_t(l.indices.size()), "layout.offsets: last entry is ",
          l.offsets[rows], ", expected the ", l.indices.size(), " indices");
  require(l.partial.empty() || l.partial.size() == l.indices.size(), "layout.partial: has ",
          l.partial.size(), " flags, expected none or one per index (", l.indices.size(), ")");
  index_t longest = 0;
  for (index_t r = 0; r < rows; ++r) {
    const index_t begin = l.offsets[r], end = l.offsets[r + 1];
    require(begin <= end, "layout.offsets: entry ", r + 1, " (", end, ") is below entry ", r, " (",
            begin, ")");
    longest = std::max(longest, end - begin);
  }
  const index_t key_blocks = (Sk + l.block_k - 1) / l.block_k;
  for (index_t r = 0; r < rows; ++r)
    for (index_t e = l.offsets[r]; e < l.offsets[r + 1]; ++e) {
      const index_t idx = l.indices[e];
      require(idx >= 0 && idx < key_blocks, "layout.indices: entry ", e, " is ", idx,
              ", expected a key block in [0, ", key_blocks, ")");
      require(e == l.offsets[r] || idx > l.indices[e - 1], "layout.indices: row ", r,
              " is not strictly increasing at entry ", e);
    }
  return longest;
}

}  // namespace detail

/// Softmax attention in which the queries of block qb see only the key blocks the layout
/// lists for them; inside those blocks every softmax_options modifier (causal, window,
/// bias, mask, ALiBi, soft-cap) and the variant apply as in softmax_attention, and sinks
/// and lse likewise. Key blocks not listed are never loaded. A full layout gives exactly
/// softmax_attention's result (without options.q8_0_products, which this call does not
/// read: it scores q8_0 keys dequantized, in fp32). Same shapes, storage types (k and v of any cache type,
/// options.k_scale / v_scale) and guarantees as softmax_attention.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO,
          class ScoreMod = identity_score_mod, class MaskMod = keep_all_mask_mod>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void block_sparse_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                            tensor_view<TO, 4> out, const block_sparse_layout& layout,
                            const softmax_options& options = {},
                            const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  const auto problem = detail::make_softmax_problem<TO>(q, k, v, out, options);
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), Hk = k.extent(1);
  const index_t Sk = k.extent(2);
  const index_t longest = detail::check_layout(layout, B, H, Hk, Sq, Sk);
  const bool per_query_head = layout.heads == H;
  const index_t query_blocks = (Sq + layout.block_q - 1) / layout.block_q;
  const detail::sparse_rows rows{layout.block_q, per_query_head, longest};
  auto select = [&](index_t b, index_t h, index_t block, detail::key_piece* pieces) {
    const index_t lb = layout.batches == 1 ? 0 : b;
    const index_t lh = layout.heads == 1 ? 0 : h;  // h is a query head iff per_query_head
    const index_t row = (lb * layout.heads + lh) * query_blocks + block;
    index_t count = 0;
    for (index_t e = layout.offsets[row]; e < layout.offsets[row + 1]; ++e) {
      const index_t first = index_t(layout.indices[e]) * layout.block_k;
      const bool partial = layout.partial.empty() || layout.partial[e] != 0;
      count =
          detail::append_piece(pieces, count, first, std::min(Sk, first + layout.block_k), partial);
    }
    return count;
  };
  detail::run_sparse<Backend>(problem, rows, select, custom,
                              detail::resolve_threads(options.threads));
}

}  // namespace fovea
