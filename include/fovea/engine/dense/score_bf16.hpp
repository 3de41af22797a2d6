// bf16 pairs for AVX512-BF16's vdpbf16ps (two multiply-adds per lane per instruction,
// exact products summed in fp32): decode scores bf16 keys against query rows converted
// to pairs once per chunk. Available when the compiler targets AVX512-BF16.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "../../core/tensor_view.hpp"
#include "../../simd/prefetch.hpp"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FOVEA_HAS_BF16_DOT 1
#else
#define FOVEA_HAS_BF16_DOT 0
#endif

namespace fovea::detail {

/// bf16 pairs per row of length d: rounded up to whole 32-element vectors.
constexpr index_t bf16_pairs(index_t d) noexcept { return (d + 31) / 32 * 16; }

#if FOVEA_HAS_BF16_DOT

/// dst[i] = the bf16 pair (x[2i], x[2i + 1]), i < bf16_pairs(n); zeros past n.
inline void to_bf16_pairs(const float* x, index_t n, std::uint32_t* dst) noexcept {
  for (index_t d = 0; d < n; d += 32) {
    auto lanes = [&](index_t from) {
      const index_t left = n - from;
      return left >= 16  ? __mmask16(0xFFFF)
             : left <= 0 ? __mmask16(0)
                         : __mmask16((1u << left) - 1);
    };
    const __m512 lo = _mm512_maskz_loadu_ps(lanes(d), x + d);
    const __m512 hi = _mm512_maskz_loadu_ps(lanes(d + 16), x + d + 16);
    _mm512_storeu_si512(dst + d / 2, __m512i(_mm512_cvtne2ps_pbh(hi, lo)));
  }
}

#endif

}  // namespace fovea::detail
