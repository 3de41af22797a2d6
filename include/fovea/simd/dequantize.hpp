// Rows of a quantized cache (block_q8_0, int8, e4m3, e5m2) converted to float, with the
// vector instructions the flags allow (AVX-512F, AVX2, F16C) and a portable loop beside
// them that defines the result: both give the same bits (one rounding, value * scale).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../core/cache_types.hpp"
#include "../core/tensor_view.hpp"
#include "convert.hpp"

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace fovea::detail {

/// A block's fp16 scale as float: with F16C's conversion where the flags allow it (Eigen's
/// portable conversion is a dozen branchy instructions; one per block was a fifth of q8_0
/// decode), the same value either way.
inline float block_scale(const half& d) noexcept {
#if defined(__F16C__)
  std::uint16_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  return _cvtsh_ss(bits);
#else
  return float(d);
#endif
}

/// One value of a quantized row, as the vector paths compute it (the portable twin).
inline float dequantized(std::int8_t q, float scale) noexcept { return float(q) * scale; }
inline float dequantized(e4m3 x, float scale) noexcept { return to_float(x) * scale; }
inline float dequantized(e5m2 x, float scale) noexcept { return to_float(x) * scale; }

/// The factor fp8 values read through fp16 (fp8_as_half) are multiplied by: the scale,
/// times 256 for e4m3 (its codes read as fp16 are the value / 256; the product is exact).
template <class F8>
constexpr float fp8_factor(float scale) noexcept {
  return std::is_same_v<F8, e4m3> ? scale * 256.0f : scale;
}

#if defined(__AVX2__) && defined(__F16C__)
/// 16 fp8 codes (zero-extended to 16 bits each) as fp16 bit patterns: e5m2 is fp16's top
/// byte; e4m3's exponent and mantissa shifted into fp16's give the value / 256 (normals
/// and subnormals alike), its NaN code made an fp16 NaN.
template <class F8>
inline __m256i fp8_as_half(__m256i bytes16) noexcept {
  if constexpr (std::is_same_v<F8, e5m2>) {
    return _mm256_slli_epi16(bytes16, 8);
  } else {
    const __m256i mag = _mm256_and_si256(bytes16, _mm256_set1_epi16(0x7F));
    const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(bytes16, _mm256_set1_epi16(0x80)), 8);
    const __m256i nan = _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7F));
    return _mm256_or_si256(_mm256_or_si256(sign, _mm256_slli_epi16(mag, 7)),
                           _mm256_and_si256(nan, _mm256_set1_epi16(0x7FFF)));
  }
}

/// 16 fp8 codes (16 bytes) as fp16 bit patterns, fp8_as_half's bits: with AVX-512BW/VL
/// fp8_as_half_32's sign-extending steps below (6 instructions where fp8_as_half takes 9;
/// e4m3 decode's keys convert through it).
template <class F8>
inline __m256i fp8_codes_as_half(__m128i codes16) noexcept {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (std::is_same_v<F8, e4m3>) {
    const __m256i wide = _mm256_cvtepi8_epi16(codes16);
    const __m256i half = _mm256_and_si256(_mm256_slli_epi16(wide, 7), _mm256_set1_epi16(short(0xBFFF)));
    const __mmask16 nan = _mm256_cmpeq_epi16_mask(_mm256_and_si256(wide, _mm256_set1_epi16(0x7F)),
                                                  _mm256_set1_epi16(0x7F));
    // The NaN code's S.01111.1110000000 plus 0x407F is S.11111.1111111111, fp8_as_half's NaN.
    return _mm256_mask_add_epi16(half, nan, half, _mm256_set1_epi16(0x407F));
  }
#endif
  return fp8_as_half<F8>(_mm256_cvtepu8_epi16(codes16));
}
#endif

#if defined(__AVX512BW__) && defined(__AVX512F__)
/// 32 fp8 codes as fp16 bit patterns, the same bits as above with half the instructions
/// per code: sign-extended to 16 bits, a shift by 7 puts S.EEEE.MMM under fp16's sign,
/// exponent and mantissa with a copy of S in fp16's top exponent bit, cleared by the mask
/// (e4m3 dequantize 1.9x faster than the 256-bit loop).
template <class F8>
inline __m512i fp8_as_half_32(__m256i codes32) noexcept {
  if constexpr (std::is_same_v<F8, e5m2>) {
    return _mm512_slli_epi16(_mm512_cvtepu8_epi16(codes32), 8);
  } else {
    const __m512i wide = _mm512_cvtepi8_epi16(codes32);
    const __m512i half = _mm512_and_si512(_mm512_slli_epi16(wide, 7), _mm512_set1_epi16(short(0xBFFF)));
    const __mmask32 nan = _mm512_cmpeq_epi16_mask(_mm512_and_si512(wide, _mm512_set1_epi16(0x7F)),
                                                  _mm512_set1_epi16(0x7F));
    return _mm512_mask_add_epi16(half, nan, half, _mm512_set1_epi16(0x407F));  // as above
  }
}
#endif

#if defined(__AVX512F__)
/// 16 int8 codes times `scale`, one rounding: the vector step of every int8 and q8_0 row
/// conversion (staged rows, and decode's keys and values converted in registers), so all
/// of them give the same bits.
inline __m512 scaled_int8x16(const std::int8_t* codes, __m512 scale) noexcept {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw)), scale);
}
#endif
#if defined(__AVX512F__) && defined(__AVX2__) && defined(__F16C__)
/// 16 fp8 codes through fp16 times `factor` (fp8_factor of the scale), as above for fp8.
template <class F8>
inline __m512 scaled_fp8x16(const F8* codes, __m512 factor) noexcept {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  return _mm512_mul_ps(_mm512_cvtph_ps(fp8_codes_as_half<F8>(raw)), factor);
}
#endif

#if defined(__AVX2__)
/// 8 int8 codes times `scale`, one rounding: scaled_int8x16's AVX2 twin (rows staged on
/// AVX2 and decode's keys converted in registers there give the same bits).
inline __m256 scaled_int8x8(const std::int8_t* codes, __m256 scale) noexcept {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), scale);
}

/// A register of int8 codes times a broadcast scale at the register's width (and, on
/// AVX-512, of fp8 codes times fp8_factor): the vector steps above, for code written once
/// for AVX2 and AVX-512.
inline __m256 scaled_codes(const std::int8_t* codes, __m256 scale) noexcept {
  return scaled_int8x8(codes, scale);
}
#endif
#if defined(__AVX512F__) && defined(__AVX2__) && defined(__F16C__)
inline __m512 scaled_codes(const std::int8_t* codes, __m512 scale) noexcept {
  return scaled_int8x16(codes, scale);
}
template <class F8>
inline __m512 scaled_codes(const F8* codes, __m512 factor) noexcept {
  return scaled_fp8x16(codes, factor);
}
#endif

/// dst[0, n) = the values of src (n values; for block_q8_0 n % 32 == 0), times `scale`
/// for the scaled types (int8, fp8); block_q8_0 carries its own scales and ignores it.
/// (The loops over a block's vectors are unrolled by pragma: -O2 does not unroll them,
/// and q8_0 decode ran 1.2x slower than at -O3.)
template <class S>
void dequantize_row(const S* src, float scale, float* dst, index_t n) noexcept {
  index_t i = 0;
  if constexpr (std::is_same_v<S, block_q8_0>) {
    for (index_t b = 0; b < n / block_q8_0::size; ++b) {
      const block_q8_0& blk = src[b];
      const float d = block_scale(blk.d);
      float* out = dst + b * block_q8_0::size;
#if defined(__AVX512F__)
      const __m512 vd = _mm512_set1_ps(d);
#pragma GCC unroll 2
      for (int k = 0; k < 32; k += 16) _mm512_storeu_ps(out + k, scaled_int8x16(blk.qs + k, vd));
#elif defined(__AVX2__)
      const __m256 vd = _mm256_set1_ps(d);
#pragma GCC unroll 4
      for (int k = 0; k < 32; k += 8) _mm256_storeu_ps(out + k, scaled_int8x8(blk.qs + k, vd));
#else
      for (int k = 0; k < 32; ++k) out[k] = float(blk.qs[k]) * d;
#endif
    }
    return;
  } else if constexpr (std::is_same_v<S, std::int8_t>) {
#if defined(__AVX512F__)
    const __m512 vs = _mm512_set1_ps(scale);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, scaled_int8x16(src + i, vs));
#elif defined(__AVX2__)
    const __m256 vs = _mm256_set1_ps(scale);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, scaled_int8x8(src + i, vs));
#endif
  } else {
    static_assert(std::is_same_v<S, e4m3> || std::is_same_v<S, e5m2>, "a quantized type");
#if defined(__AVX2__) && defined(__F16C__)
    // e4m3 through fp16 is the value / 256: the factor goes into the scale (exact).
    const float factor = fp8_factor<S>(scale);
#if defined(__AVX512F__)
    const __m512 vs16 = _mm512_set1_ps(factor);
#if defined(__AVX512BW__)
    for (; i + 32 <= n; i += 32) {  // 32 codes per step in 512-bit integer lanes
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      const __m512i halves = fp8_as_half_32<S>(raw);
      _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(halves)), vs16));
      _mm512_storeu_ps(dst + i + 16,
                       _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(halves, 1)), vs16));
    }
#endif
    for (; i + 16 <= n; i += 16)  // 16 codes per step in 256-bit integer lanes
      _mm512_storeu_ps(dst + i, scaled_fp8x16(src + i, vs16));
#endif
    const __m256 vs = _mm256_set1_ps(factor);
    for (; i + 16 <= n; i += 16) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m256i halves = fp8_codes_as_half<S>(raw);
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(halves)), vs));
      _mm256_storeu_ps(dst + i + 8,
                       _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1)), vs));
    }
    for (; i + 8 <= n; i += 8) {  // (the upper 8 lanes zero)
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
      const __m256i halves = fp8_codes_as_half<S>(raw);
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(halves)), vs));
    }
#endif
  }
  if constexpr (!std::is_same_v<S, block_q8_0>)
    for (; i < n; ++i) dst[i] = dequantized(src[i], scale);
}

/// dst[0, n) = (src * scale) * channels[0, n): an int8 row with per-channel scales, in one
/// pass (the same products, in the same order, as dequantizing then scaling each column).
inline void dequantize_row(const std::int8_t* src, float scale, const float* channels, float* dst,
                           index_t n) noexcept {
  index_t i = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(scale);
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_mul_ps(scaled_int8x16(src + i, vs), _mm512_loadu_ps(channels + i)));
#elif defined(__AVX2__)
  const __m256 vs = _mm256_set1_ps(scale);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(scaled_int8x8(src + i, vs), _mm256_loadu_ps(channels + i)));
#endif
  for (; i < n; ++i) dst[i] = dequantized(src[i], scale) * channels[i];
}

/// dst[0, n) = src[0, n) in T: converted (convert_row) or dequantized (times `scale` for
/// the scaled types).
template <class S, class T>
void load_row(const S* src, float scale, T* dst, index_t n) noexcept {
  if constexpr (is_quantized_v<S>) {
    static_assert(std::is_same_v<T, float>, "quantized caches are read in float");
    dequantize_row(src, scale, dst, n);
  } else {
    convert_row(src, dst, n);
  }
}

}  // namespace fovea::detail
