// One row at a time, the quantization fovea::quantize writes and the values it reads back:
// block_q8_0 (llama.cpp's rounding, ties to even), int8 rows with a scale, fp8 against a
// scale. Scalar and deterministic: the same input gives the same bytes on every machine.
// Also used to quantize query rows for the q8_0 integer products of decode.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cache_types.hpp"
#include "tensor_view.hpp"

namespace fovea::detail {

/// The value of a stored element as float (double narrows to float first).
template <class S>
float as_float(S x) noexcept {
  return float(x);
}

/// Round to nearest, ties to even (the default rounding mode), as an int8 in [-127, 127].
inline std::int8_t round_int8(float x) noexcept {
  return std::int8_t(std::clamp(std::nearbyint(x), -127.0f, 127.0f));
}

/// x / scale rounded to an int8, the way llama.cpp rounds: x times the reciprocal of the
/// scale. A scale so small that its reciprocal overflows (below ~2.9e-39, i.e. rows whose
/// largest magnitude is below ~3.7e-37) divides instead, where x * inf would give NaN for
/// x = 0 and +-127 for every nonzero x. A zero scale (an all-zero row) gives 0.
class int8_rounder {
 public:
  explicit int8_rounder(float scale) noexcept
      : scale_(scale), inverse_(scale != 0 ? 1.0f / scale : 0.0f) {}
  std::int8_t operator()(float x) const noexcept {
    return round_int8(std::isinf(inverse_) ? x / scale_ : x * inverse_);
  }

 private:
  float scale_, inverse_;
};

/// Quantizes n values (n % 32 == 0) into n / 32 blocks as llama.cpp's
/// quantize_row_q8_0_ref does (d = max |x| / 127 stored as fp16; q = x / d rounded with
/// d in fp32), except that ties round to even. A block holding NaN or Inf gets d = NaN:
/// its values dequantize to NaN, as they would read unquantized.
template <class S>
void quantize_row(const S* x, index_t n, block_q8_0* out) noexcept {
  for (index_t b = 0; b < n / block_q8_0::size; ++b) {
    const S* in = x + b * block_q8_0::size;
    float amax = 0;
    bool finite = true;
    for (int i = 0; i < block_q8_0::size; ++i) {
      const float v = as_float(in[i]);
      finite = finite && std::isfinite(v);
      amax = std::max(amax, std::fabs(v));
    }
    block_q8_0& blk = out[b];
    if (!finite) {
      blk.d = half(std::numeric_limits<float>::quiet_NaN());
      std::fill(blk.qs, blk.qs + block_q8_0::size, std::int8_t(0));
      continue;
    }
    const float d = amax / 127.0f;
    const int8_rounder round(d);
    blk.d = half(d);
    for (int i = 0; i < block_q8_0::size; ++i) blk.qs[i] = round(as_float(in[i]));
  }
}

/// Quantizes one int8 row: scale = max |x| / 127, q = x / scale rounded (ties to even);
/// a row holding NaN or Inf gets scale NaN (its values read as NaN).
template <class S>
float quantize_row(const S* x, index_t n, std::int8_t* out) noexcept {
  float amax = 0;
  bool finite = true;
  for (index_t i = 0; i < n; ++i) {
    const float v = as_float(x[i]);
    finite = finite && std::isfinite(v);
    amax = std::max(amax, std::fabs(v));
  }
  if (!finite) {
    std::fill(out, out + n, std::int8_t(0));
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float scale = amax / 127.0f;
  const int8_rounder round(scale);
  for (index_t i = 0; i < n; ++i) out[i] = round(as_float(x[i]));
  return scale;
}

/// Quantizes one fp8 row against a given scale: code = nearest(x / scale), saturating.
template <class S, class F8>
requires(std::is_same_v<F8, e4m3> || std::is_same_v<F8, e5m2>)
void quantize_row(const S* x, index_t n, float scale, F8* out) noexcept {
  for (index_t i = 0; i < n; ++i) {
    const float v = as_float(x[i]) / scale;
    if constexpr (std::is_same_v<F8, e4m3>)
      out[i] = to_e4m3(v);
    else
      out[i] = to_e5m2(v);
  }
}

/// dst[0, n) = the values of a quantized row (scale for int8 / fp8), converted to D.
template <class C, class D>
void dequantize_row(const C* row, float scale, index_t n, D* dst) noexcept {
  if constexpr (std::is_same_v<C, block_q8_0>) {
    for (index_t i = 0; i < n; ++i) {
      const block_q8_0& blk = row[i / block_q8_0::size];
      dst[i] = D(float(blk.d) * float(blk.qs[i % block_q8_0::size]));
    }
  } else if constexpr (std::is_same_v<C, std::int8_t>) {
    for (index_t i = 0; i < n; ++i) dst[i] = D(float(row[i]) * scale);
  } else {
    for (index_t i = 0; i < n; ++i) dst[i] = D(to_float(row[i]) * scale);
  }
}

}  // namespace fovea::detail
