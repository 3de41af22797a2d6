// fovea::quantize / fovea::dequantize: rows of keys or values into a quantized cache
// (block_q8_0, int8 with scales, e4m3 / e5m2) and back. Scalar, deterministic code (the
// cache is written once per token; attention reads it many times): the same input gives
// the same bytes on every machine and thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../core/cache_types.hpp"
#include "../core/quantized_rows.hpp"
#include "../core/error.hpp"
#include "../core/tensor_view.hpp"
#include "../core/validate.hpp"
#include "checks.hpp"

namespace fovea {

namespace detail {

/// The scale of (a, h, t) in a broadcast (A|1, H|1, T|1) view; 1 when there is none.
inline float scale_at(const tensor_view<const float, 3>& s, index_t a, index_t h, index_t t) {
  if (s.data() == nullptr) return 1.0f;
  return s(s.extent(0) == 1 ? 0 : a, s.extent(1) == 1 ? 0 : h, s.extent(2) == 1 ? 0 : t);
}

/// src and cache of one shape; cache of whole blocks; writes never reach src.
template <class S, class C>
void check_quantize(const tensor_view<const S, 4>& src, const tensor_view<C, 4>& cache,
                    const char* src_name, const char* cache_name) {
  check_rows(src, src_name);
  check_rows(tensor_view<const C, 4>(cache), cache_name);
  check_blocks(cache, cache_name);
  for (std::size_t r = 0; r < 4; ++r)
    require(cache.extent(r) == src.extent(r), cache_name, ": extent ", r, " (", dim_name(r),
            ") is ", cache.extent(r), ", expected ", src.extent(r), " as ", src_name);
}

/// src and an int8 cache of one shape, one scale per row of src to write.
template <class S>
void check_int8_quantize(const tensor_view<const S, 4>& x, const tensor_view<std::int8_t, 4>& cache,
                         const tensor_view<float, 3>& scales) {
  check_quantize(x, cache, "src", "cache");
  check_no_alias(cache, "cache", x, "src");
  check_data(scales, "scales");
  for (std::size_t r = 0; r < 3; ++r)
    require(scales.extent(r) == x.extent(r), "scales: extent ", r, " is ", scales.extent(r),
            ", expected ", x.extent(r), " (one scale per (batch, head, token) of src)");
  check_one_to_one(scales, "scales");
  check_no_alias(scales, "scales", x, "src");
  check_no_alias(scales, "scales", cache, "cache");
}

}  // namespace detail

/// Quantizes src (B, H, S, D) of float / double / bf16 / fp16 into a block_q8_0 cache of
/// the same shape (D % 32 == 0; views of blocks count values: fovea::bhsd(blocks, B, H,
/// S, D)), or into an e4m3 / e5m2 cache with scale 1. Rounds to nearest, ties to even;
/// fp8 saturates at its largest finite value. Deterministic.
/// Throws fovea::error (nothing written) when the shapes differ or D is not whole blocks.
template <class SS, class C>
requires(is_storage_type_v<SS> &&
         (std::is_same_v<C, block_q8_0> || std::is_same_v<C, e4m3> || std::is_same_v<C, e5m2>))
void quantize(tensor_view<SS, 4> src, tensor_view<C, 4> cache) {
  using S = std::remove_const_t<SS>;
  const tensor_view<const S, 4> x = src;
  detail::check_quantize(x, cache, "src", "cache");
  detail::check_no_alias(cache, "cache", x, "src");
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t h = 0; h < x.extent(1); ++h)
      for (index_t t = 0; t < x.extent(2); ++t) {
        if constexpr (std::is_same_v<C, block_q8_0>)
          detail::quantize_row(x.ptr(b, h, t, 0), x.extent(3), cache.ptr(b, h, t, 0));
        else
          detail::quantize_row(x.ptr(b, h, t, 0), x.extent(3), 1.0f, cache.ptr(b, h, t, 0));
      }
}

/// Quantizes src into an fp8 cache against the given scales (value = code * scale;
/// (B|1, H|1, S|1), e.g. one per head: fovea::view(s, {1, H, 1})), every scale finite
/// and nonzero.
template <class SS, class C>
requires(is_storage_type_v<SS> && (std::is_same_v<C, e4m3> || std::is_same_v<C, e5m2>))
void quantize(tensor_view<SS, 4> src, tensor_view<C, 4> cache, tensor_view<const float, 3> scales) {
  using S = std::remove_const_t<SS>;
  const tensor_view<const S, 4> x = src;
  detail::check_quantize(x, cache, "src", "cache");
  detail::check_no_alias(cache, "cache", x, "src");
  detail::check_cache_scales<C>(scales, "scales", x.extent(0), x.extent(1), x.extent(2));
  for (index_t b = 0; b < scales.extent(0); ++b)
    for (index_t h = 0; h < scales.extent(1); ++h)
      for (index_t t = 0; t < scales.extent(2); ++t)
        detail::require(scales(b, h, t) != 0, "scales: scale (", b, ", ", h, ", ", t, ") is 0");
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t h = 0; h < x.extent(1); ++h)
      for (index_t t = 0; t < x.extent(2); ++t)
        detail::quantize_row(x.ptr(b, h, t, 0), x.extent(3), detail::scale_at(scales, b, h, t),
                             cache.ptr(b, h, t, 0));
}

/// Quantizes src into an int8 cache, one scale per row written to scales (B, H, S):
/// scale = max |x| / 127, q = x / scale rounded to nearest (ties to even).
template <class SS>
requires is_storage_type_v<SS>
void quantize(tensor_view<SS, 4> src, tensor_view<std::int8_t, 4> cache,
              tensor_view<float, 3> scales) {
  using S = std::remove_const_t<SS>;
  const tensor_view<const S, 4> x = src;
  detail::check_int8_quantize(x, cache, scales);
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t h = 0; h < x.extent(1); ++h)
      for (index_t t = 0; t < x.extent(2); ++t)
        scales(b, h, t) = detail::quantize_row(x.ptr(b, h, t, 0), x.extent(3), cache.ptr(b, h, t, 0));
}

/// Quantizes src into an int8 cache with given per-channel scales channels (H|1, D), every
/// one finite and nonzero (ONNX Runtime's per-channel k_scale, KIVI's per-channel keys), and
/// one scale per row written to scales (B, H, S): with y = x / channel (in float), scale =
/// max |y| / 127 and q = y / scale rounded to nearest (ties to even); value = q * scale *
/// channel. A row whose y holds NaN or Inf (x non-finite, or x / channel beyond the float
/// range for a tiny channel) gets scale NaN, as int8 rows do. Read it with options.k_channel_scale = channels and k_scale = scales.
template <class SS>
requires is_storage_type_v<SS>
void quantize(tensor_view<SS, 4> src, tensor_view<std::int8_t, 4> cache,
              tensor_view<float, 3> scales, tensor_view<const float, 2> channels) {
  using S = std::remove_const_t<SS>;
  const tensor_view<const S, 4> x = src;
  const index_t D = x.extent(3);
  detail::check_channel_scales<std::int8_t>(channels, "channels", x.extent(1), D);
  detail::require(channels.data() != nullptr, "channels: not given");
  detail::check_no_alias(scales, "scales", channels, "channels");
  detail::check_no_alias(cache, "cache", channels, "channels");
  for (index_t h = 0; h < channels.extent(0); ++h)
    for (index_t d = 0; d < D; ++d)
      detail::require(std::isfinite(channels(h, d)) && channels(h, d) != 0, "channels: scale (", h,
                      ", ", d, ") is ", channels(h, d), ", expected finite and nonzero");
  detail::check_int8_quantize(x, cache, scales);
  std::vector<float> y(static_cast<std::size_t>(D));
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t h = 0; h < x.extent(1); ++h) {
      const float* c = channels.ptr(channels.extent(0) == 1 ? 0 : h, 0);
      for (index_t t = 0; t < x.extent(2); ++t) {
        const S* in = x.ptr(b, h, t, 0);
        for (index_t d = 0; d < D; ++d) y[d] = detail::as_float(in[d]) / c[d];
        scales(b, h, t) = detail::quantize_row(y.data(), D, cache.ptr(b, h, t, 0));
      }
    }
}

/// The values of a quantized cache (B, H, S, D) into dst of the same shape (float,
/// double, bf16 or fp16): value = d * q (block_q8_0), q * scale (int8, fp8; scales as
/// for softmax_options::k_scale, required for int8, default 1 for fp8). Exactly the
/// values softmax_attention computes with.
template <class CC, class D>
requires(is_quantized_v<CC> && is_storage_type_v<D> && !std::is_const_v<D>)
void dequantize(tensor_view<CC, 4> cache, tensor_view<D, 4> dst,
                tensor_view<const float, 3> scales = {}) {
  using C = std::remove_const_t<CC>;
  const tensor_view<const C, 4> c = cache;
  detail::check_quantize(tensor_view<const D, 4>(dst), c, "dst", "cache");
  detail::check_one_to_one(dst, "dst");
  detail::check_no_alias(dst, "dst", c, "cache");
  detail::check_cache_scales<C>(scales, "scales", c.extent(0), c.extent(1), c.extent(2));
  detail::check_no_alias(dst, "dst", scales, "scales");
  for (index_t b = 0; b < c.extent(0); ++b)
    for (index_t h = 0; h < c.extent(1); ++h)
      for (index_t t = 0; t < c.extent(2); ++t)
        detail::dequantize_row(c.ptr(b, h, t, 0), detail::scale_at(scales, b, h, t), c.extent(3),
                               dst.ptr(b, h, t, 0));
}

/// The values of an int8 cache with per-channel scales channels (H|1, D) (and per-row
/// scales, optional: 1): value = q * scale * channel, the values softmax_attention
/// computes with under options.k_channel_scale / v_channel_scale.
template <class CC, class D>
requires(std::is_same_v<std::remove_const_t<CC>, std::int8_t> && is_storage_type_v<D> &&
         !std::is_const_v<D>)
void dequantize(tensor_view<CC, 4> cache, tensor_view<D, 4> dst, tensor_view<const float, 3> scales,
                tensor_view<const float, 2> channels) {
  const tensor_view<const std::int8_t, 4> c = cache;
  detail::check_quantize(tensor_view<const D, 4>(dst), c, "dst", "cache");
  detail::check_one_to_one(dst, "dst");
  detail::check_no_alias(dst, "dst", c, "cache");
  detail::check_channel_scales<std::int8_t>(channels, "channels", c.extent(1), c.extent(3));
  detail::check_no_alias(dst, "dst", scales, "scales");
  detail::check_no_alias(dst, "dst", channels, "channels");
  detail::check_cache_scales<std::int8_t>(scales, "scales", c.extent(0), c.extent(1), c.extent(2),
                                          channels.data() != nullptr);
  for (index_t b = 0; b < c.extent(0); ++b)
    for (index_t h = 0; h < c.extent(1); ++h)
      for (index_t t = 0; t < c.extent(2); ++t) {
        const std::int8_t* row = c.ptr(b, h, t, 0);
        const float scale = detail::scale_at(scales, b, h, t);
        const float* ch =
            channels.data() ? channels.ptr(channels.extent(0) == 1 ? 0 : h, 0) : nullptr;
        for (index_t d = 0; d < c.extent(3); ++d) {
          const float value = float(row[d]) * scale;
          dst(b, h, t, d) = D(ch ? value * ch[d] : value);
        }
      }
}

}  // namespace fovea
