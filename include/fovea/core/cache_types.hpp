// The KV cache storage types beyond float/bf16/fp16: llama.cpp's block_q8_0, int8 rows
// with separate scales, and the OCP fp8 formats e4m3 and e5m2. Each is a memory layout an
// engine's existing cache can be viewed as without a copy, with the scalar conversions
// that define its values (the vector paths in simd/dequantize.hpp give the same bits).
//
// Error bounds (x a value before quantization, x' after it):
//   block_q8_0  |x - x'| <= d / 2 + |x| * 2^-11 per block, d = fp16(max |x| / 127), for
//               d in fp16's normal range (max |x| >= 127 * 2^-14 ~ 7.8e-3): the values are
//               rounded with d in fp32 and read back with d in fp16. Below it d is an fp16
//               subnormal, off by up to 2^-25 absolute, so |x - x'| <= d / 2 + 127 * 2^-25;
//               a block with max |x| < ~3.8e-6 gets d = 0 and reads as zeros. Above
//               65504 * 127 ~ 8.3e6, d is infinite (values read as +-inf, 0 * inf = NaN).
//               The relative error of a block's largest value is <= 2^-8 (normal d).
//   int8 rows   |x - x'| <= scale / 2, scale = max |x| / 127 per (token, head).
//   e4m3        |x - x'| <= |x| * 2^-4 (3 mantissa bits) for |x| / scale in [2^-6, 448];
//               below, the absolute step is scale * 2^-10; beyond 448 * scale: saturates.
//   e5m2        |x - x'| <= |x| * 2^-3 (2 mantissa bits) in [2^-14, 57344]; absolute
//               step scale * 2^-17 below; saturates beyond 57344 * scale.
// Rounding is to nearest, ties to even, in every quantizer.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "storage.hpp"
#include "tensor_view.hpp"

namespace fovea {

/// llama.cpp's block_q8_0: 32 values d * qs[i], d an fp16 scale. A view of blocks counts
/// values in its extents and strides (a row of D values is D / 32 blocks; D % 32 == 0).
struct block_q8_0 {
  static constexpr int size = 32;  ///< values per block (llama.cpp's QK8_0)
  half d;
  std::int8_t qs[size];
};
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must match llama.cpp's 34-byte layout");

/// OCP 8-bit float E4M3 ("e4m3fn": bias 7, no infinities, NaN = S.1111.111, max 448),
/// vLLM's and PyTorch's float8_e4m3fn.
struct e4m3 {
  std::uint8_t bits;
};
/// OCP 8-bit float E5M2 (bias 15, IEEE-like: infinities and NaNs, max 57344).
struct e5m2 {
  std::uint8_t bits;
};

template <>
struct values_per_element<block_q8_0> {
  static constexpr index_t value = block_q8_0::size;
};

/// Storage types that hold a quantized cache.
template <class S>
inline constexpr bool is_quantized_v =
    std::is_same_v<std::remove_const_t<S>, block_q8_0> ||
    std::is_same_v<std::remove_const_t<S>, std::int8_t> ||
    std::is_same_v<std::remove_const_t<S>, e4m3> || std::is_same_v<std::remove_const_t<S>, e5m2>;

/// Quantized types whose values are multiplied by a scale given beside the cache (int8:
/// required, per (token, head) or broadcast; fp8: optional, default 1).
template <class S>
inline constexpr bool is_scaled_v = is_quantized_v<S> &&
                                    !std::is_same_v<std::remove_const_t<S>, block_q8_0>;

/// Storage types a key or value cache may have: float, double, bf16, fp16 and the above.
template <class S>
inline constexpr bool is_cache_type_v = is_storage_type_v<S> || is_quantized_v<S>;

/// Bytes that n values of storage type S take (n a multiple of the block for blocks).
template <class S>
constexpr index_t storage_bytes(index_t n) noexcept {
  using E = std::remove_const_t<S>;
  return n / values_per_element<E>::value * index_t(sizeof(E));
}

namespace detail {

/// The value of an fp8 code with E exponent bits, M mantissa bits (bias 2^(E-1) - 1);
/// e4m3 (E = 4): the all-ones code is NaN and there are no infinities.
template <int E, int M>
constexpr float fp8_value(std::uint8_t bits) noexcept {
  constexpr int bias = (1 << (E - 1)) - 1, max_exp = (1 << E) - 1;
  const bool negative = bits & 0x80;
  const int exp = (bits >> M) & max_exp, man = bits & ((1 << M) - 1);
  if ((E == 4 && exp == max_exp && man == (1 << M) - 1) || (E == 5 && exp == max_exp && man)) {
    // NaN with the bits the vector conversion gives (the code as an fp16 NaN, widened):
    // the code's sign, the quiet bit, fp16's mantissa (e4m3: all ones; e5m2: the code's)
    // at the top of float's, so a value dequantizes to the same bits wherever it sits
    // (fuzzing found a tail element and a vector lane differing in the NaN's sign).
    const std::uint32_t half_mantissa = E == 4 ? 0x3FFu : std::uint32_t(man) << 8;
    return std::bit_cast<float>((negative ? 0x80000000u : 0u) | 0x7FC00000u | (half_mantissa << 13));
  }
  float mag;
  if (E == 5 && exp == max_exp)
    mag = std::numeric_limits<float>::infinity();
  else if (exp == 0)
    mag = std::ldexp(float(man), 1 - bias - M);
  else
    mag = std::ldexp(float((1 << M) | man), exp - bias - M);
  return negative ? -mag : mag;
}

/// The fp8 code nearest to x (ties to even), saturated to the largest finite value
/// (infinities too, as vLLM's saturating conversion); NaN stays NaN.
template <int E, int M>
inline std::uint8_t fp8_code(float x) noexcept {
  constexpr int bias = (1 << (E - 1)) - 1;
  constexpr float largest = E == 4 ? 448.0f : 57344.0f;
  constexpr std::uint8_t nan = E == 4 ? 0x7F : 0x7E;
  const std::uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  if (std::isnan(x)) return sign | nan;
  float a = std::fabs(x);
  if (a >= largest) a = largest;
  int exp = std::ilogb(a);  // a normal: exponent field exp + bias >= 1
  if (a == 0 || exp < 1 - bias) exp = 1 - bias;  // subnormals step like the smallest normal
  // a in units of the last mantissa bit at this exponent, rounded to nearest even
  const float units = std::nearbyint(std::ldexp(a, M - exp));
  int code = int(units);  // < 2^(M+1); == 2^(M+1) carries into the exponent
  if (exp == 1 - bias) return sign | std::uint8_t(code);  // subnormal (or the first normal)
  const int field = exp + bias;
  return sign | std::uint8_t((field << M) + (code - (1 << M)));
}

}  // namespace detail

/// The values of the codes (exact in float).
inline float to_float(e4m3 x) noexcept { return detail::fp8_value<4, 3>(x.bits); }
inline float to_float(e5m2 x) noexcept { return detail::fp8_value<5, 2>(x.bits); }
/// The nearest code (ties to even), saturating: |x| beyond 448 (e4m3) or 57344 (e5m2),
/// infinities included, gives the largest finite code; NaN gives NaN.
inline e4m3 to_e4m3(float x) noexcept { return {detail::fp8_code<4, 3>(x)}; }
inline e5m2 to_e5m2(float x) noexcept { return {detail::fp8_code<5, 2>(x)}; }

}  // namespace fovea
