// Block-sparse layouts for tests: random CSR layouts and the mask_mod that says whether a
// (b, h, i, j) is inside one, so the dense oracle can run "masked dense" attention over
// exactly the set a layout or a selection allows.
#pragma once

#include <algorithm>
#include <cstdint>
#include <fovea/fovea.hpp>
#include <random>
#include <vector>

namespace fovea::test {

/// A layout that owns its arrays.
struct owned_layout {
  block_sparse_layout layout;
  std::vector<std::int32_t> offsets, indices;
  std::vector<std::uint8_t> partial;

  void point() {
    layout.offsets = offsets;
    layout.indices = indices;
    layout.partial = partial;
  }
};

/// Each key block listed with probability `density`; partial flags at random when asked.
inline owned_layout random_layout(index_t batches, index_t heads, index_t Sq, index_t Sk,
                                  index_t bq, index_t bk, double density, bool partial_flags,
                                  std::uint64_t seed) {
  owned_layout o;
  o.layout = {bq, bk, batches, heads, {}, {}, {}};
  std::mt19937_64 gen(seed);
  std::bernoulli_distribution pick(density), half(0.5);
  const index_t rows = batches * heads * ((Sq + bq - 1) / bq);
  const index_t blocks = (Sk + bk - 1) / bk;
  o.offsets.push_back(0);
  for (index_t r = 0; r < rows; ++r) {
    for (index_t kb = 0; kb < blocks; ++kb)
      if (pick(gen)) {
        o.indices.push_back(std::int32_t(kb));
        if (partial_flags) o.partial.push_back(half(gen) ? 1 : 0);
      }
    o.offsets.push_back(std::int32_t(o.indices.size()));
  }
  o.point();
  return o;
}

/// mask_mod for the oracle: true iff key j is in a block the layout lists for (b, h, i),
/// and, when `inner` is given, inner(b, h, i, j) holds wherever that block is partial.
template <class Inner = keep_all_mask_mod>
struct layout_mask {
  const block_sparse_layout* l;
  index_t H, Hk, Sq;
  Inner inner{};

  bool operator()(index_t b, index_t h, index_t i, index_t j) const {
    const index_t lb = l->batches == 1 ? 0 : b;
    const index_t lh = l->heads == 1 ? 0 : (l->heads == H ? h : h / (H / Hk));
    const index_t row =
        (lb * l->heads + lh) * ((Sq + l->block_q - 1) / l->block_q) + i / l->block_q;
    const auto begin = l->indices.begin() + l->offsets[row];
    const auto end = l->indices.begin() + l->offsets[row + 1];
    const auto it = std::lower_bound(begin, end, std::int32_t(j / l->block_k));
    if (it == end || *it != j / l->block_k) return false;
    if constexpr (std::is_same_v<Inner, keep_all_mask_mod>) {
      return true;
    } else {
      const bool partial = l->partial.empty() || l->partial[it - l->indices.begin()] != 0;
      return !partial || inner(b, h, i, j);
    }
  }
};

/// The keys query (b, h, i) may see under a HiP selection: the sinks, the selected
/// blocks and the sliding window (causality left to the oracle).
struct hip_visible {
  const hip_selection* sel;
  index_t window, sink, offset, block_k;

  hip_visible(const hip_selection& s, const hip_options& o, index_t Sq, index_t Sk)
      : sel(&s),
        window(o.sliding_window >= 0 ? o.sliding_window : (o.causal ? 256 : 0)),
        sink(o.sink_tokens >= 0 ? o.sink_tokens : (o.causal ? 16 : 0)),
        offset(o.causal ? Sk - Sq : 0),
        block_k(o.block_size_k) {}

  bool operator()(index_t b, index_t h, index_t i, index_t j) const {
    if (j < sink || (window > 0 && j + window > i + offset)) return true;
    for (const std::int32_t start : sel->blocks(b, h, i / sel->block_size_q))
      if (j >= start && j < start + block_k) return true;
    return false;
  }
};

}  // namespace fovea::test
