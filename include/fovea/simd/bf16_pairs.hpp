// bf16 pairs: two bf16 values in one 32-bit lane, the operands of AVX512-BF16's vdpbf16ps,
// which multiplies two pair registers lane by lane and adds both (exact) products to an
// fp32 lane: twice the multiply-adds of an fp32 FMA per instruction. Rows of floats are
// rounded to nearest even (vcvtne2ps2bf16; like vdpbf16ps it treats denormal inputs as
// zero), bf16 rows are taken as they are. Available when the compiler targets AVX512-BF16
// (FOVEA_HAS_BF16_DOT); the kernels keep their fp32 path elsewhere.
#pragma once

#include <cstdint>
#include <cstring>

#include "../core/storage.hpp"
#include "../core/tensor_view.hpp"
#include "vec.hpp"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(FOVEA_FORCE_SCALAR)
#include <immintrin.h>
#define FOVEA_HAS_BF16_DOT 1
#else
#define FOVEA_HAS_BF16_DOT 0
#endif

namespace fovea::detail {

/// Two bf16 values, `bits` = first | second << 16 (the first at the lower address, as a
/// bf16 row holds them).
struct bf16_pair {
  std::uint32_t bits;
};

/// bf16 pairs per row of length d: rounded up to whole 32-element vectors.
constexpr index_t bf16_pairs(index_t d) noexcept { return (d + 31) / 32 * 16; }

/// Whether Backend computes float with 16-lane registers on an AVX512-BF16 target: the
/// only place the pair arithmetic runs.
template <class T, class Backend>
constexpr bool bf16_pairs_apply() noexcept {
  if constexpr (FOVEA_HAS_BF16_DOT && std::is_same_v<T, float> && !std::is_same_v<Backend, scalar>)
    return vec<T, Backend>::width == 16;
  return false;
}

#if FOVEA_HAS_BF16_DOT

/// Mask of the first min(16, max(0, left)) lanes.
inline __mmask16 first_lanes(index_t left) noexcept {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

/// dst[i] = the bf16 pair (x[2i], x[2i + 1]), i < bf16_pairs(n); zeros past n.
inline void to_bf16_pairs(const float* x, index_t n, std::uint32_t* dst) noexcept {
  for (index_t d = 0; d < n; d += 32) {
    const __m512 lo = _mm512_maskz_loadu_ps(first_lanes(n - d), x + d);
    const __m512 hi = _mm512_maskz_loadu_ps(first_lanes(n - d - 16), x + d + 16);
    _mm512_storeu_si512(dst + d / 2, __m512i(_mm512_cvtne2ps_pbh(hi, lo)));
  }
}
inline void to_bf16_pairs(const float* x, index_t n, bf16_pair* dst) noexcept {
  to_bf16_pairs(x, n, reinterpret_cast<std::uint32_t*>(dst));
}

/// dst[i] = the pair (first[i], second[i]) for i < n (second null: zeros), one pair per
/// column of two rows: the depth-wise pairs of a matrix whose rows are what the products
/// sum over (keys for P V, the head dim for a transposed Q). Floats are rounded, bf16 taken
/// as they are.
inline void interleave_bf16_pairs(const float* first, const float* second, index_t n,
                                  bf16_pair* dst) noexcept {
  // vcvtne2ps2bf16 puts its second operand's 16 values in the low words, then the first's;
  // the permutation interleaves them.
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                         8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (index_t i = 0; i < n; i += 16) {
    const __mmask16 m = first_lanes(n - i);
    const __m512 lo = _mm512_maskz_loadu_ps(m, first + i);
    const __m512 hi = second ? _mm512_maskz_loadu_ps(m, second + i) : _mm512_setzero_ps();
    const __m512i pairs = _mm512_permutexvar_epi16(order, __m512i(_mm512_cvtne2ps_pbh(hi, lo)));
    _mm512_mask_storeu_epi32(dst + i, m, pairs);
  }
}
inline void interleave_bf16_pairs(const bfloat16* first, const bfloat16* second, index_t n,
                                  bf16_pair* dst) noexcept {
  for (index_t i = 0; i < n; i += 16) {
    const __mmask16 m = first_lanes(n - i);
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, first + i));
    const __m512i hi = second ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, second + i))
                              : _mm512_setzero_si512();
    _mm512_mask_storeu_epi32(dst + i, m, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
}

/// The micro-kernel's products over bf16 pairs: B's rows are pair vectors, A's elements
/// pairs broadcast to every lane (vpbroadcastd, folded into vdpbf16ps as a memory operand).
template <class Backend>
struct pair_product {
  using V = vec<float, Backend>;
  using a_reg = __m512i;
  using b_reg = __m512i;
  static b_reg load_b(const bf16_pair* p) noexcept { return _mm512_loadu_si512(p); }
  static a_reg broadcast_a(const bf16_pair* p) noexcept {
    std::uint32_t bits;
    std::memcpy(&bits, p, sizeof bits);  // (a bf16 row read as pairs may be 2-byte aligned)
    return _mm512_set1_epi32(int(bits));
  }
  static typename V::type fma(a_reg a, b_reg b, typename V::type acc) noexcept {
    return typename V::type(_mm512_dpbf16_ps(__m512(acc), __m512bh(a), __m512bh(b)));
  }
  static void pin(b_reg& x) noexcept { FOVEA_PIN_VECTOR(x); }
};

#endif

}  // namespace fovea::detail
