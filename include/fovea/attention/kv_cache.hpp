// The KV cache as serving engines hold it: a contiguous cache with spare capacity and a
// key count per sequence (FlashAttention's flash_attn_with_kvcache(cache_seqlens=...)),
// and the helpers that append new keys and values to a contiguous or paged cache
// (FlashAttention's k_new / v_new, FlashInfer's append_paged_kv_cache).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "quantize.hpp"
#include "softmax_paged.hpp"

namespace fovea {

/// Softmax attention against a contiguous cache with spare capacity: sequence b sees its
/// first seqlens_k[b] keys only.
///
///   q: (B, H, Sq, D)   out: (B, H, Sq, Dv)   options.lse, if given: (B, H, Sq)
///   k_cache: (B, Hk, capacity, D)   v_cache: (B, Hk, capacity, Dv)  (the whole buffer:
///     fovea::bshd(ptr, B, capacity, Hk, D) views FlashAttention's [B, capacity, Hk, D])
///   seqlens_k: B key counts, 0 to capacity
///
/// The causal diagonal is bottom-right per sequence (its Sq queries are its last tokens).
/// Each sequence is one problem of the dense engine: the result equals softmax_attention
/// on each sequence's keys alone, bit for bit. bias and mask: (B|1, H|Hk|1, Sq|1,
/// capacity|1), sequence b reading key columns [0, seqlens_k[b]). Storage types as
/// softmax_attention; k_scale / v_scale (int8, fp8 caches): (B|1, Hk|1, capacity|1).
template <class Backend = default_backend, class TQ, class TK, class TV, class TO,
          class ScoreMod = identity_score_mod, class MaskMod = keep_all_mask_mod>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void softmax_attention_kvcache(tensor_view<TQ, 4> q, tensor_view<TK, 4> k_cache,
                               tensor_view<TV, 4> v_cache, tensor_view<TO, 4> out,
                               std::span<const std::int32_t> seqlens_k,
                               const softmax_options& options = {},
                               const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  using T = TO;
  using K = std::remove_const_t<TK>;
  using V = std::remove_const_t<TV>;
  using namespace detail;
  const tensor_view<const T, 4> cq = q;
  const tensor_view<const K, 4> ck = k_cache;
  const tensor_view<const V, 4> cv = v_cache;
  const index_t group = check_qkvo(cq, ck, cv, out);
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), capacity = ck.extent(2);
  require(index_t(seqlens_k.size()) == B, "seqlens_k: has ", seqlens_k.size(),
          " lengths, expected ", B, " (one per sequence)");
  for (index_t b = 0; b < B; ++b)
    require(seqlens_k[b] >= 0 && seqlens_k[b] <= capacity, "seqlens_k: length ", b, " is ",
            seqlens_k[b], ", expected 0 to ", capacity, " (the cache's capacity, extent 2)");
  const double scale = check_scalar_options(options, q.extent(3));
  check_sequence_terms(options, B, H, ck.extent(1), Sq, capacity, out);
  check_head_options(options, B, H);
  check_lse(options, B, H, Sq, cq, ck, cv, out);
  check_scales<K, V>(options, B, ck.extent(1), capacity, ck.extent(3), cv.extent(3), out);
  std::vector<dense_problem<T, K, V>> problems(B);
  for (index_t b = 0; b < B; ++b) {
    const index_t sk = seqlens_k[b];
    dense_problem<T, K, V>& pr = problems[b];
    pr.q = slice(cq, 0, b, 1);
    pr.out = slice(out, 0, b, 1);
    if (options.lse.data()) pr.lse = slice(options.lse, 0, b, 1);
    pr.kv.k = slice(slice(ck, 0, b, 1), 2, 0, sk);
    pr.kv.v = slice(slice(cv, 0, b, 1), 2, 0, sk);
    pr.kv.k_scale = sequence_scales(options.k_scale, b, 0);
    pr.kv.v_scale = sequence_scales(options.v_scale, b, 0);
    pr.kv.k_channel_scale = options.k_channel_scale;
    pr.kv.v_channel_scale = options.v_channel_scale;
    pr.batch_base = b;
    apply_options(pr, sequence_options(options, b, 0, Sq, 0, sk), scale, group, Sq, sk);
  }
  run_dense<Backend>(std::span<const dense_problem<T, K, V>>(problems), custom,
                     resolve_threads(options.threads));
}

namespace detail {

/// A stored value in a type every storage type converts from: double stays double,
/// the rest become float.
template <class S>
auto widened(S x) noexcept {
  if constexpr (std::is_same_v<S, double>)
    return x;
  else
    return float(x);
}

/// New rows (B, Hk, n, dim) against a cache's heads and dim; returns n.
template <class S, class C>
index_t check_new_rows(const tensor_view<const S, 4>& x, const char* name,
                       const tensor_view<C, 4>& cache, const char* cache_name, index_t B) {
  check_rows(x, name);
  require(x.extent(0) == B, name, ": extent 0 (batch) is ", x.extent(0), ", expected ", B);
  require(x.extent(1) == cache.extent(1), name, ": extent 1 (heads) is ", x.extent(1),
          ", expected the ", cache.extent(1), " heads of ", cache_name);
  require(x.extent(3) == cache.extent(3), name, ": extent 3 (dim) is ", x.extent(3),
          ", expected the ", cache.extent(3), " of ", cache_name);
  check_one_to_one(cache, cache_name);
  check_no_alias(cache, cache_name, x, name);
  return x.extent(2);
}

/// New keys and values against their caches (B sequences): returns the token count n.
template <class K, class V, class CK, class CV>
index_t check_new_kv(const tensor_view<const K, 4>& kn, const tensor_view<const V, 4>& vn,
                     const tensor_view<CK, 4>& k_cache, const tensor_view<CV, 4>& v_cache,
                     index_t B) {
  const index_t n = check_new_rows(kn, "k_new", k_cache, "k_cache", B);
  check_new_rows(vn, "v_new", v_cache, "v_cache", B);
  require(vn.extent(2) == n, "v_new: extent 2 (tokens) is ", vn.extent(2), ", expected ", n,
          " as k_new");
  check_no_alias(k_cache, "k_cache", v_cache, "v_cache");
  return n;
}

/// The scales of a cache append writes (int8: one per new (token, head), so the view has
/// the cache's (batch or pages, Hk, capacity or page size)) or reads (fp8: broadcast
/// allowed, default 1); empty for the other types.
template <class C>
void check_append_scales(const tensor_view<float, 3>& s, const char* name,
                         const tensor_view<C, 4>& cache) {
  if constexpr (std::is_same_v<C, std::int8_t>) {
    check_data(s, name);
    require(s.data() != nullptr, name, ": an int8 cache needs a view to write its scales to");
    for (std::size_t r = 0; r < 3; ++r)
      require(s.extent(r) == cache.extent(r), name, ": extent ", r, " is ", s.extent(r),
              ", expected ", cache.extent(r), " as the cache (one scale per row)");
    check_one_to_one(s, name);
  } else {
    check_cache_scales<C>(s, name, cache.extent(0), cache.extent(1), cache.extent(2));
  }
}

/// Stores rows r of x (b, h) at cache(where(b, r) = (row, slot), h): converted to the
/// cache's type, or quantized (block_q8_0; int8 writing its scale; fp8 against its scale).
template <class S, class C, class Where>
void store_rows(const tensor_view<const S, 4>& x, const tensor_view<C, 4>& cache,
                const tensor_view<float, 3>& scales, Where&& where) {
  const index_t n = x.extent(3);
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t h = 0; h < x.extent(1); ++h)
      for (index_t r = 0; r < x.extent(2); ++r) {
        const auto [a, t] = where(b, r);
        const S* src = x.ptr(b, h, r, 0);
        C* out = cache.ptr(a, h, t, 0);
        if constexpr (std::is_same_v<C, block_q8_0>)
          quantize_row(src, n, out);
        else if constexpr (std::is_same_v<C, std::int8_t>)
          scales(a, h, t) = quantize_row(src, n, out);
        else if constexpr (is_scaled_v<C>)
          quantize_row(src, n, scale_at(scales, a, h, t), out);
        else
          for (index_t e = 0; e < n; ++e) out[e] = C(widened(src[e]));
      }
}

}  // namespace detail

/// The scales of int8 and fp8 caches for append_kv / append_kv_paged, indexed like the
/// cache's (batch or page, head, slot): int8 scales are written (one per new row), fp8
/// scales read (broadcast allowed; default 1).
struct kv_scales {
  tensor_view<float, 3> k{}, v{};
};

/// Appends n new tokens per sequence to a contiguous cache: k_new(b, h, i) goes to
/// k_cache(b, h, seqlens_k[b] + i), likewise v. The caller then counts n more keys for
/// each sequence. Any storage types: rows are converted to the cache's type, or quantized
/// (fovea::quantize's rules: block_q8_0; int8 writing scales.k / scales.v at the same
/// (b, h, slot); e4m3 / e5m2 against the scales given). Deterministic.
///
///   k_new: (B, Hk, n, D)   v_new: (B, Hk, n, Dv)   k_cache: (B, Hk, capacity, D)
///   v_cache: (B, Hk, capacity, Dv)   seqlens_k: B current key counts
///
/// Throws fovea::error, writing nothing, when a sequence would pass the capacity or the
/// shapes disagree.
template <class SK, class SV, class CK, class CV>
void append_kv(tensor_view<SK, 4> k_new, tensor_view<SV, 4> v_new, tensor_view<CK, 4> k_cache,
               tensor_view<CV, 4> v_cache, std::span<const std::int32_t> seqlens_k,
               const kv_scales& scales = {}) {
  using namespace detail;
  using K = std::remove_const_t<SK>;
  using V = std::remove_const_t<SV>;
  const tensor_view<const K, 4> kn = k_new;
  const tensor_view<const V, 4> vn = v_new;
  const index_t B = k_cache.extent(0), capacity = k_cache.extent(2);
  check_rows(tensor_view<const CK, 4>(k_cache), "k_cache");
  check_rows(tensor_view<const CV, 4>(v_cache), "v_cache");
  check_blocks(k_cache, "k_cache");
  check_blocks(v_cache, "v_cache");
  check_append_scales(scales.k, "scales.k", k_cache);
  check_append_scales(scales.v, "scales.v", v_cache);
  require(v_cache.extent(0) == B && v_cache.extent(1) == k_cache.extent(1) &&
              v_cache.extent(2) == capacity,
          "v_cache: extents (", v_cache.extent(0), ", ", v_cache.extent(1), ", ", v_cache.extent(2),
          ", _) differ from k_cache's (", B, ", ", k_cache.extent(1), ", ", capacity, ", _)");
  const index_t n = check_new_kv(kn, vn, k_cache, v_cache, B);
  require(index_t(seqlens_k.size()) == B, "seqlens_k: has ", seqlens_k.size(),
          " lengths, expected ", B);
  for (index_t b = 0; b < B; ++b)
    require(seqlens_k[b] >= 0 && seqlens_k[b] + n <= capacity, "seqlens_k: sequence ", b, " holds ",
            seqlens_k[b], " tokens; ", n, " more pass the capacity of ", capacity);
  auto slot = [&](index_t b, index_t r) {
    return std::pair<index_t, index_t>{b, seqlens_k[b] + r};
  };
  store_rows(kn, k_cache, scales.k, slot);
  store_rows(vn, v_cache, scales.v, slot);
}

/// Appends n new tokens per sequence to a paged cache: token seqlens_k[b] + i of sequence b
/// goes to slot (seqlens_k[b] + i) % page_size of page block_table(b, (seqlens_k[b] + i) /
/// page_size). The caller allocates the pages first (their table entries must be valid).
///
///   k_new: (B, Hk, n, D)   v_new: (B, Hk, n, Dv)
///   k_cache: (pages, Hk, page_size, D)   v_cache: (pages, Hk, page_size, Dv)
///   block_table: (B, max_pages)   seqlens_k: B current key counts
///
/// Storage types and scales as append_kv (scales indexed (page, head, slot)).
///
/// Throws fovea::error, writing nothing, when a page the new tokens need is missing from
/// the table (past its width or not a valid page index) or the shapes disagree.
template <class SK, class SV, class CK, class CV>
void append_kv_paged(tensor_view<SK, 4> k_new, tensor_view<SV, 4> v_new,
                     tensor_view<CK, 4> k_cache, tensor_view<CV, 4> v_cache,
                     tensor_view<const std::int32_t, 2> block_table,
                     std::span<const std::int32_t> seqlens_k, const kv_scales& scales = {}) {
  using namespace detail;
  using K = std::remove_const_t<SK>;
  using V = std::remove_const_t<SV>;
  const tensor_view<const K, 4> kn = k_new;
  const tensor_view<const V, 4> vn = v_new;
  check_rows(tensor_view<const CK, 4>(k_cache), "k_cache");
  check_rows(tensor_view<const CV, 4>(v_cache), "v_cache");
  check_blocks(k_cache, "k_cache");
  check_blocks(v_cache, "v_cache");
  check_append_scales(scales.k, "scales.k", k_cache);
  check_append_scales(scales.v, "scales.v", v_cache);
  const index_t pages = k_cache.extent(0), page_size = k_cache.extent(2);
  require(v_cache.extent(0) == pages && v_cache.extent(1) == k_cache.extent(1) &&
              v_cache.extent(2) == page_size,
          "v_cache: extents (", v_cache.extent(0), ", ", v_cache.extent(1), ", ", v_cache.extent(2),
          ", _) differ from k_cache's (", pages, ", ", k_cache.extent(1), ", ", page_size, ", _)");
  check_data(block_table, "block_table");
  const index_t B = block_table.extent(0);
  const index_t n = check_new_kv(kn, vn, k_cache, v_cache, B);
  require(index_t(seqlens_k.size()) == B, "seqlens_k: has ", seqlens_k.size(),
          " lengths, expected ", B, " (the block table's rows)");
  for (index_t b = 0; b < B; ++b) {
    require(seqlens_k[b] >= 0, "seqlens_k: length ", b, " is ", seqlens_k[b], ", expected >= 0");
    const index_t last = seqlens_k[b] + n;
    require(n == 0 || (last - 1) / page_size < block_table.extent(1), "block_table: sequence ", b,
            " needs ", (last + page_size - 1) / page_size, " pages for ", last, " tokens, the table has ",
            block_table.extent(1), " columns");
    for (index_t t = seqlens_k[b]; t < last; t += page_size - t % page_size) {
      const index_t page = block_table(b, t / page_size);
      require(page >= 0 && page < pages, "block_table: entry (", b, ", ", t / page_size, ") is ",
              page, ", expected a page in [0, ", pages, ") for token ", t);
    }
  }
  auto slot = [&](index_t b, index_t r) {
    const index_t t = seqlens_k[b] + r;
    return std::pair<index_t, index_t>{block_table(b, t / page_size), t % page_size};
  };
  store_rows(kn, k_cache, scales.k, slot);
  store_rows(vn, v_cache, scales.v, slot);
}

}  // namespace fovea
