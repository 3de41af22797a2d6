// fovea::softmax_attention: exact softmax attention, flash-style (tiled, online softmax).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#include "../core/error.hpp"
#include "../core/parallel.hpp"
#include "../core/cache_types.hpp"
#include "../core/storage.hpp"
#include "../core/tensor_view.hpp"
#include "../core/validate.hpp"
#include "../engine/dense/dense.hpp"
#include "../engine/dense/variant.hpp"
#include "../simd/backend.hpp"
#include "checks.hpp"

namespace fovea {

/// Where the causal diagonal (and the window and ALiBi around it) is anchored when
/// Sq != Sk. bottom_right: query i lines up with key i + Sk - Sq (FlashAttention >= 2.1,
/// KV-cache decoding). top_left: query i lines up with key i (PyTorch's is_causal).
enum class diagonal { bottom_right, top_left };

constexpr const char* to_string(diagonal d) noexcept {
  return d == diagonal::bottom_right ? "bottom_right" : "top_left";
}

struct softmax_options {
  bool causal = false;  ///< hide keys after the diagonal
  diagonal align = diagonal::bottom_right;
  std::optional<double> scale{};       ///< logit scale; default 1/sqrt(D); must be finite, > 0
  index_t window_left = -1;            ///< keys before the diagonal a query sees; -1: all
  index_t window_right = -1;           ///< keys after the diagonal a query sees; -1: all
  double softcap = 0;                  ///< logits become softcap * tanh(s / softcap); 0: off
  /// Added to logits; (B|1, H|Hk|1, Sq|1, Sk|1); fp32, fp16 or bf16 (widened to fp32 once
  /// per call: extra memory of the view's elements in fp32 when not fp32).
  any_float_view<4> bias{};
  tensor_view<const std::uint8_t, 4> mask{};   ///< nonzero keeps a key; same shapes as bias
  any_float_view<2> alibi_slopes{};  ///< (B|1, H): adds -slope * |i + off - j|; fp32/fp16/bf16
  tensor_view<const float, 1> sinks{};         ///< (H): a sink logit per head, denominator only
  tensor_view<float, 3> lse{};                 ///< out, optional (B, H, Sq): log-sum-exp
  /// Scales of int8 and fp8 key / value caches (value = stored value * scale), indexed like
  /// the cache's (batch, head, key) (paged: (page, head, slot)), any dimension 1 to
  /// broadcast: per tensor (1, 1, 1), per head (1, Hk, 1) (vLLM's fp8), per token and
  /// head (B, Hk, Sk) (ONNX Runtime's and KIVI's int8). Required for int8; fp8 default 1.
  tensor_view<const float, 3> k_scale{}, v_scale{};
  /// Per-channel scales of int8 key / value caches, (Hk|1, D) and (Hk|1, Dv): value =
  /// stored value * scale(row) * channel_scale(head, column) (ONNX Runtime's per-channel
  /// k_scale of shape (Hk, 1, D) viewed as (Hk, D); KIVI quantizes keys per channel). With
  /// them, k_scale / v_scale may be left empty (1). Contiguous, varlen, paged and KV-cache
  /// calls and block_sparse_attention take them.
  tensor_view<const float, 2> k_channel_scale{}, v_channel_scale{};
  /// float q and out over bf16 keys and values: compute as a bf16 call on bf16(q) does
  /// (q rounded to bf16; Q K^T and P V in bf16 pairs, the probabilities rounded to bf16,
  /// exact products summed in fp32: AVX512-BF16 vdpbf16ps, twice the multiply-adds of fp32
  /// FMAs; denormal inputs count as 0) where the target has AVX512-BF16 and D is even; the
  /// output rounded to bf16 is then the bf16 call's bit for bit, and its error against the
  /// float q grows as ~2^-9 |q| |k| per logit. Ignored elsewhere (q not rounded), and for
  /// other types.
  bool bf16_products = false;
  /// Queries over block_q8_0 keys: decode (Sq <= 16) computes its logits as llama.cpp's
  /// CPU attention does over a q8_0 cache: each query row quantized to q8_0 blocks as
  /// fovea::quantize writes them (d_q = fp16(max |q| / 127) per 32 values), each block's
  /// dot product with the key block summed exactly in int32, the blocks combined in fp32 as
  /// logit = fma(isum_b, d_q,b * d_k,b, logit) in block order, an infinite d (a block
  /// beyond q8_0's range, |x| > 65504 * 127) taken as NaN. With AVX512-VNNI in an AVX-512
  /// build, vpdpbusd scores 16 keys at once; every other target (AVX-VNNI's 256-bit form
  /// included) computes the same integers one key at a time, slower than the default: the
  /// same logits, bit for bit. The result is softmax attention with q replaced by its
  /// q8_0 rounding, under the tolerance rule; each query value moves by up to half a step
  /// d_q / 2 plus fp16's rounding of d_q (see block_q8_0's bound in core/cache_types.hpp:
  /// blocks with max |q| below ~3.8e-6 become 0). A block of q holding NaN or Inf, or
  /// beyond q8_0's range, makes its row NaN; so does a key block whose scale is NaN or
  /// infinite, for the rows that see the key. Read by softmax_attention and its varlen,
  /// paged and KV-cache forms (decode problems with 64 or more stacked heads included);
  /// prefill, other key types, block_sparse_attention, prob_mod calls and the selection
  /// families (HiP, DHSA, Landmark, dynamic-mask) compute as without it.
  bool q8_0_products = false;
  int threads = 0;                             ///< 0: all OpenMP offers; 1: serial
};

namespace detail {

/// Checks the scalar options; returns the scale (default 1/sqrt(D)).
inline double check_scalar_options(const softmax_options& o, index_t D) {
  const double scale = o.scale.value_or(1.0 / std::sqrt(double(D)));
  require(std::isfinite(scale) && scale > 0, "options.scale: is ", scale,
          ", expected a finite value > 0");
  require(o.window_left >= -1, "options.window_left: is ", o.window_left, ", expected >= -1");
  require(o.window_right >= -1, "options.window_right: is ", o.window_right, ", expected >= -1");
  require(std::isfinite(o.softcap) && o.softcap >= 0, "options.softcap: is ", o.softcap,
          ", expected a finite value >= 0");
  require(o.threads >= 0, "options.threads: is ", o.threads, ", expected >= 0");
  return scale;
}

/// alibi_slopes (batches|1, H) and sinks (H).
inline void check_head_options(const softmax_options& o, index_t batches, index_t H) {
  if (o.alibi_slopes.data() != nullptr || !o.alibi_slopes.empty()) {
    check_data(o.alibi_slopes, "options.alibi_slopes");
    require(o.alibi_slopes.data() != nullptr, "options.alibi_slopes: data is null");
    const index_t e0 = o.alibi_slopes.extent(0);
    require(e0 == 1 || e0 == batches, "options.alibi_slopes: extent 0 (batch) is ", e0,
            ", expected 1 or ", batches);
    require(o.alibi_slopes.extent(1) == H, "options.alibi_slopes: extent 1 (heads) is ",
            o.alibi_slopes.extent(1), ", expected ", H);
  }
  if (o.sinks.data() != nullptr || !o.sinks.empty()) {
    check_data(o.sinks, "options.sinks");
    require(o.sinks.data() != nullptr, "options.sinks: data is null");
    require(o.sinks.extent(0) == H, "options.sinks: extent 0 (heads) is ", o.sinks.extent(0),
            ", expected ", H);
  }
}

/// lse: (B, H, Sq), not overlapping out or the inputs.
template <class T, class K, class V>
void check_lse(const softmax_options& o, index_t B, index_t H, index_t Sq,
               const tensor_view<const T, 4>& q, const tensor_view<const K, 4>& k,
               const tensor_view<const V, 4>& v, const tensor_view<T, 4>& out) {
  if (o.lse.data() == nullptr && o.lse.empty()) return;
  check_data(o.lse, "options.lse");
  require(o.lse.data() != nullptr, "options.lse: data is null");
  const index_t want[3] = {B, H, Sq};
  const char* what[3] = {"batch", "heads", "queries"};
  for (std::size_t r = 0; r < 3; ++r)
    require(o.lse.extent(r) == want[r], "options.lse: extent ", r, " (", what[r], ") is ",
            o.lse.extent(r), ", expected ", want[r], " as q (lse is (B, H, Sq))");
  check_one_to_one(o.lse, "options.lse");
  check_no_alias(o.lse, "options.lse", out, "out");
  check_no_alias(o.lse, "options.lse", q, "q");
  check_no_alias(o.lse, "options.lse", k, "k");
  check_no_alias(o.lse, "options.lse", v, "v");
}

/// The options as the engine wants them, for a problem of Sq queries and Sk keys.
template <class S, class K, class V>
void apply_options(dense_problem<S, K, V>& pr, const softmax_options& o, double scale, index_t group,
                   index_t Sq, index_t Sk) {
  using T = accumulator_t<S>;
  pr.keys = Sk;
  pr.band.keys = Sk;
  pr.band.offset = o.align == diagonal::bottom_right ? Sk - Sq : 0;
  pr.band.left = o.window_left;
  pr.band.right =
      o.causal ? (o.window_right < 0 ? 0 : std::min<index_t>(o.window_right, 0)) : o.window_right;
  pr.terms.scale = T(scale);
  pr.terms.softcap = T(o.softcap);
  pr.terms.bias = widen(o.bias, pr.terms.widened_bias);
  pr.terms.mask = o.mask;
  pr.terms.alibi = widen(o.alibi_slopes, pr.terms.widened_alibi);
  pr.terms.sinks = o.sinks;
  pr.terms.group = group;
  pr.bf16_products = o.bf16_products;
  pr.q8_0_products = o.q8_0_products;
}

/// k_scale and v_scale for caches of K and V with `rows` (batch or pages), Hk heads and
/// `slots` (keys or page size).
template <class K, class V, class T>
void check_scales(const softmax_options& o, index_t rows, index_t Hk, index_t slots, index_t D,
                  index_t Dv, const tensor_view<T, 4>& out) {
  check_no_alias(out, "out", o.k_scale, "options.k_scale");
  check_no_alias(out, "out", o.v_scale, "options.v_scale");
  check_no_alias(out, "out", o.k_channel_scale, "options.k_channel_scale");
  check_no_alias(out, "out", o.v_channel_scale, "options.v_channel_scale");
  check_channel_scales<K>(o.k_channel_scale, "options.k_channel_scale", Hk, D);
  check_channel_scales<V>(o.v_channel_scale, "options.v_channel_scale", Hk, Dv);
  check_cache_scales<K>(o.k_scale, "options.k_scale", rows, Hk, slots,
                        o.k_channel_scale.data() != nullptr);
  check_cache_scales<V>(o.v_scale, "options.v_scale", rows, Hk, slots,
                        o.v_channel_scale.data() != nullptr);
}

/// A scale view cut to batch row b (unless broadcast) from key `first` (unless
/// broadcast), for one sequence's problem.
inline tensor_view<const float, 3> sequence_scales(const tensor_view<const float, 3>& s, index_t b,
                                                   index_t first) {
  if (s.data() == nullptr) return s;
  auto cut = s;
  if (cut.extent(0) > 1) cut = slice(cut, 0, b, 1);
  if (cut.extent(2) > 1) cut = slice(cut, 2, first, cut.extent(2) - first);
  return cut;
}

/// The softmax_options of a sparse front-end's call (HiP, DHSA, Landmark): its causality,
/// scale, lse, cache scales and threads; no other modifier.
template <class Options>
softmax_options sparse_softmax_options(const Options& o, bool causal) {
  softmax_options so;
  so.causal = causal;
  so.scale = o.scale;
  so.lse = o.lse;
  so.k_scale = o.k_scale;
  so.v_scale = o.v_scale;
  so.threads = o.threads;
  return so;
}

template <class T, class KS, class VS, class K = std::remove_const_t<KS>,
          class V = std::remove_const_t<VS>>
dense_problem<T, K, V> make_softmax_problem(const tensor_view<const T, 4>& q,
                                            tensor_view<KS, 4> key, tensor_view<VS, 4> value,
                                            const tensor_view<T, 4>& out,
                                            const softmax_options& o) {
  const tensor_view<const K, 4> k = key;
  const tensor_view<const V, 4> v = value;
  const index_t group = check_qkvo(q, k, v, out);
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), D = q.extent(3);
  const index_t Hk = k.extent(1), Sk = k.extent(2);
  const double scale = check_scalar_options(o, D);
  check_broadcast(o.bias, "options.bias", B, H, Hk, Sq, Sk);
  check_broadcast(o.mask, "options.mask", B, H, Hk, Sq, Sk);
  check_head_options(o, B, H);
  check_lse(o, B, H, Sq, q, k, v, out);
  check_no_alias(out, "out", o.bias, "options.bias");
  check_no_alias(out, "out", o.mask, "options.mask");
  check_scales<K, V>(o, B, Hk, Sk, D, v.extent(3), out);

  dense_problem<T, K, V> pr;
  pr.q = q;
  pr.out = out;
  pr.lse = o.lse;
  pr.kv.k = k;
  pr.kv.v = v;
  pr.kv.k_scale = o.k_scale;
  pr.kv.v_scale = o.v_scale;
  pr.kv.k_channel_scale = o.k_channel_scale;
  pr.kv.v_channel_scale = o.v_channel_scale;
  apply_options(pr, o, scale, group, Sq, Sk);
  return pr;
}

}  // namespace detail

/// Softmax attention: out = softmax(scale * q k^T + modifiers) v, per (batch, head).
///
///   q:   (B, H,  Sq, D)    k: (B, Hk, Sk, D)    v: (B, Hk, Sk, Dv)    out: (B, H, Sq, Dv)
///
/// Hk divides H (GQA/MQA: query head h reads key/value head h / (H / Hk)). Any strides
/// with innermost stride 1 (bhsd, bshd, ...). Storage: q and out in one type, float or
/// double (accumulated in that type), or fovea::bfloat16 / fovea::half (accumulated in
/// float). k and v each in its own cache type (with q and out in float, bf16 or fp16):
/// float, bf16, fp16, fovea::block_q8_0 (D and Dv multiples of 32), int8 (with
/// options.k_scale / v_scale) or fovea::e4m3 / e5m2 (optional scales); or all double.
/// Quantized rows are dequantized once per tile (64 keys prefill, 256 decode) into float;
/// the result is attention over the dequantized values (fovea::dequantize).
///
/// Paths: a call with at most 16 queries per sequence (decode_max_queries) takes the
/// decode path: the query heads of a key/value head are stacked as columns of one tile,
/// so K and V are read once for all of them, and the keys are split into fixed chunks
/// (>= 512 keys, enough of them for 64 tasks in the call, at most 64 per kv head) whose
/// states are merged in order. Any other call takes prefill tiles (64 keys x a few SIMD
/// vectors of queries). The path and the chunking depend on the shapes only: the result
/// is bitwise the same for every thread count.
///
/// A query that sees no key gets out = 0 and lse = -inf (with a sink: lse = the sink).
/// Keys hidden by the band, the mask, mask_mod or a -inf bias are skipped: NaN/Inf in
/// them never reach the output; a NaN logit a row sees makes its whole output row and
/// its lse NaN, on both paths. Bad arguments throw fovea::error (naming the argument,
/// the dimension, the value and what was expected) before any write.
///
/// `custom` is a user variant (see custom_variant / with_score_mod / with_mask_mod);
/// `Backend` selects scalar or simd<Arch> code (default: the best the flags allow).
template <class Backend = default_backend, class TQ, class TK, class TV, class TO,
          class ScoreMod = identity_score_mod, class MaskMod = keep_all_mask_mod>
requires detail::mixed_attention_types<TQ, TK, TV, TO>
void softmax_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                       tensor_view<TO, 4> out, const softmax_options& options = {},
                       const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  using T = TO;
  const auto problem = detail::make_softmax_problem<T>(q, k, v, out, options);
  detail::run_dense<Backend>(std::span(&problem, 1), custom,
                             detail::resolve_threads(options.threads));
}

}  // namespace fovea
