// fovea::softmax_attention_varlen: a ragged batch of sequences packed end to end, given
// by cumulative offsets (FlashAttention's varlen API).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "softmax.hpp"

namespace fovea {

namespace detail {

inline void check_offsets(std::span<const std::int32_t> cu, index_t total, const char* name) {
  require(!cu.empty(), name, ": is empty, expected sequences + 1 offsets");
  require(cu.front() == 0, name, ": starts at ", cu.front(), ", expected 0");
  for (std::size_t b = 1; b < cu.size(); ++b)
    require(cu[b] >= cu[b - 1], name, ": offset ", b, " (", cu[b], ") is below offset ", b - 1,
            " (", cu[b - 1], ")");
  require(cu.back() == total, name, ": ends at ", cu.back(), ", expected the ", total,
          " packed tokens");
}

/// Checks bias and mask for a call of per-sequence problems: (B|1, H|Hk|1, rows|1,
/// keys|1), as one call of B batch rows, `rows` query rows and `keys` key columns would.
template <class T>
void check_sequence_terms(const softmax_options& o, index_t B, index_t H, index_t Hk, index_t rows,
                          index_t keys, const tensor_view<T, 4>& out) {
  check_broadcast(o.bias, "options.bias", B, H, Hk, rows, keys);
  check_broadcast(o.mask, "options.mask", B, H, Hk, rows, keys);
  check_no_alias(out, "out", o.bias, "options.bias");
  check_no_alias(out, "out", o.mask, "options.mask");
}

/// x along dimension d cut to [first, first + n), unless broadcast there (extent 1).
template <class E>
tensor_view<const E, 4> sequence_part(const tensor_view<const E, 4>& x, std::size_t d,
                                      index_t first, index_t n) {
  if (x.data() == nullptr || x.extent(d) == 1) return x;
  return slice(x, d, first, n);
}

inline any_float_view<4> sequence_part(const any_float_view<4>& x, std::size_t d, index_t first,
                                       index_t n) {
  return x.visit([&](const auto& v) { return any_float_view<4>(sequence_part(v, d, first, n)); });
}

/// What a checked varlen call knows: the GQA group, the sequences, the scale.
struct varlen_call {
  index_t group, sequences;
  double scale;
};

/// The checks a packed varlen call (forward or backward) makes before any write: q, k, v,
/// out packed along seq (batch 1), the offsets, the options as one call of `sequences`
/// batch rows would take them.
template <class T, class K, class V>
varlen_call check_varlen_call(const tensor_view<const T, 4>& q, const tensor_view<const K, 4>& k,
                              const tensor_view<const V, 4>& v, const tensor_view<T, 4>& out,
                              std::span<const std::int32_t> cu_seqlens_q,
                              std::span<const std::int32_t> cu_seqlens_k, const softmax_options& o) {
  const index_t group = check_qkvo(q, k, v, out);
  require(q.extent(0) == 1, "q: extent 0 (batch) is ", q.extent(0),
          ", expected 1 (sequences are packed along seq)");
  check_offsets(cu_seqlens_q, q.extent(2), "cu_seqlens_q");
  check_offsets(cu_seqlens_k, k.extent(2), "cu_seqlens_k");
  require(cu_seqlens_k.size() == cu_seqlens_q.size(), "cu_seqlens_k: has ", cu_seqlens_k.size(),
          " offsets, expected ", cu_seqlens_q.size(), " like cu_seqlens_q");
  const index_t sequences = index_t(cu_seqlens_q.size()) - 1;
  const double scale = check_scalar_options(o, q.extent(3));
  check_sequence_terms(o, 1, q.extent(1), k.extent(1), q.extent(2), k.extent(2), out);
  check_head_options(o, sequences, q.extent(1));
  return {group, sequences, scale};
}

/// The options of one sequence's problem: bias and mask cut to its batch row `b` (-1:
/// packed, batch extent 1), query rows [q0, q0 + sq) and key columns [k0, k0 + sk).
inline softmax_options sequence_options(const softmax_options& o, index_t b, index_t q0, index_t sq,
                                        index_t k0, index_t sk) {
  softmax_options s = o;
  auto cut = [&](const auto& x) {
    auto y = b >= 0 ? sequence_part(x, 0, b, 1) : x;
    return sequence_part(sequence_part(y, 2, q0, sq), 3, k0, sk);
  };
  s.bias = cut(o.bias);
  s.mask = cut(o.mask);
  return s;
}

}  // namespace detail

/// Softmax attention over a ragged batch. Sequence b has queries [cu_q[b], cu_q[b+1]) and
/// keys [cu_k[b], cu_k[b+1]) of the packed tensors (zero-length sequences allowed):
///
///   q: (1, H, total_q, D)   k: (1, Hk, total_k, D)   v: (1, Hk, total_k, Dv)
///   out: (1, H, total_q, Dv)     options.lse, if given: (1, H, total_q)
///
/// (fovea::bshd(ptr, 1, total, heads, dim) views FlashAttention's packed (total, heads, dim)
/// tensors.) Each sequence is attended on its own, with the causal diagonal, window and
/// ALiBi anchored per sequence; options.alibi_slopes may be (sequences|1, H). bias and
/// mask are packed like q and k: (1, H|Hk|1, total_q|1, total_k|1), sequence b reading
/// rows [cu_q[b], cu_q[b+1]) and columns [cu_k[b], cu_k[b+1]) (the block diagonal).
/// score_mod / mask_mod receive b = the sequence index and positions within the
/// sequence. k_scale / v_scale (int8, fp8 caches): (1, Hk|1, total_k|1). Everything else
/// (the storage types too) is as softmax_attention.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO,
          class ScoreMod = identity_score_mod, class MaskMod = keep_all_mask_mod>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void softmax_attention_varlen(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                              tensor_view<TO, 4> out, std::span<const std::int32_t> cu_seqlens_q,
                              std::span<const std::int32_t> cu_seqlens_k,
                              const softmax_options& options = {},
                              const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  using T = TO;
  using K = std::remove_const_t<TK>;
  using V = std::remove_const_t<TV>;
  using namespace detail;
  const tensor_view<const T, 4> cq = q;
  const tensor_view<const K, 4> ck = k;
  const tensor_view<const V, 4> cv = v;
  const auto [group, sequences, scale] =
      check_varlen_call(cq, ck, cv, out, cu_seqlens_q, cu_seqlens_k, options);
  check_lse(options, 1, q.extent(1), q.extent(2), cq, ck, cv, out);
  check_scales<K, V>(options, 1, k.extent(1), k.extent(2), k.extent(3), v.extent(3), out);

  std::vector<dense_problem<T, K, V>> problems(sequences);
  for (index_t b = 0; b < sequences; ++b) {
    const index_t q0 = cu_seqlens_q[b], sq = cu_seqlens_q[b + 1] - q0;
    const index_t k0 = cu_seqlens_k[b], sk = cu_seqlens_k[b + 1] - k0;
    dense_problem<T, K, V>& pr = problems[b];
    pr.q = slice(cq, 2, q0, sq);
    pr.out = slice(out, 2, q0, sq);
    if (options.lse.data()) pr.lse = slice(options.lse, 2, q0, sq);
    pr.kv.k = slice(ck, 2, k0, sk);
    pr.kv.v = slice(cv, 2, k0, sk);
    pr.kv.k_scale = sequence_scales(options.k_scale, 0, k0);
    pr.kv.v_scale = sequence_scales(options.v_scale, 0, k0);
    pr.kv.k_channel_scale = options.k_channel_scale;
    pr.kv.v_channel_scale = options.v_channel_scale;
    pr.batch_base = b;
    apply_options(pr, sequence_options(options, -1, q0, sq, k0, sk), scale, group, sq, sk);
  }
  run_dense<Backend>(std::span<const dense_problem<T, K, V>>(problems), custom,
                     resolve_threads(options.threads));
}

}  // namespace fovea
