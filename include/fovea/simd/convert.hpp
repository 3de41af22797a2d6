// Conversion from a storage type to the compute type, with the hardware conversions where
// the flags allow them (AVX-512F / AVX2 for bf16, AVX-512F / F16C for fp16): whole rows
// (into a staging buffer) or one register at a time (kernels that read storage in place).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../core/storage.hpp"
#include "../core/tensor_view.hpp"
#include "vec.hpp"

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace fovea::detail {

/// dst[0, n) = src[0, n) converted to T.
template <class S, class T>
void convert_row(const S* src, T* dst, index_t n) noexcept {
  index_t i = 0;
  if constexpr (std::is_same_v<S, T>) {
    if (n > 0) std::memcpy(dst, src, sizeof(T) * std::size_t(n));  // (null rows of width 0)
    return;
  } else if constexpr (std::is_same_v<S, bfloat16> && std::is_same_v<T, float>) {
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16);
      _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(wide));
    }
#elif defined(__AVX2__)
    for (; i + 8 <= n; i += 8) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16);
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(wide));
    }
#endif
  } else if constexpr (std::is_same_v<S, half> && std::is_same_v<T, float>) {
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(
          dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  }
  for (; i < n; ++i) dst[i] = T(src[i]);
}

/// One register of vec<T, Backend>: the width elements of S at p, converted to T.
template <class T, class Backend, class S>
typename vec<T, Backend>::type load_as(const S* p) noexcept {
  using V = vec<T, Backend>;
  if constexpr (std::is_same_v<S, T>) {
    return V::load(p);
  } else {
    [[maybe_unused]] constexpr bool to_float = std::is_same_v<T, float>;
    [[maybe_unused]] constexpr bool from_bf16 = std::is_same_v<S, bfloat16>;
    [[maybe_unused]] constexpr bool from_half = std::is_same_v<S, half>;
#if defined(__AVX512F__)
    if constexpr (to_float && V::width == 16 && (from_bf16 || from_half)) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      if constexpr (from_bf16)
        return typename V::type(
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
      else
        return typename V::type(_mm512_cvtph_ps(raw));
    }
#endif
#if defined(__AVX2__)
    if constexpr (to_float && V::width == 8 && from_bf16) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return
          typename V::type(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
    }
#endif
#if defined(__F16C__)
    if constexpr (to_float && V::width == 8 && from_half)
      return
          typename V::type(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#endif
    alignas(64) T lanes[V::width];
    for (int i = 0; i < V::width; ++i) lanes[i] = T(p[i]);
    return V::load(lanes);
  }
}

}  // namespace fovea::detail
