// The tiny vector API every kernel is written against: vec<T, Backend> gives a register
// type and load/store/broadcast/fma/max/exp/tanh/select/reductions for it. This header
// is the only place that knows xsimd 8.1's names and quirks (hadd, no reduce_max).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "backend.hpp"

/// For lambdas in hot loops whose register blocks must stay in registers: GCC at -O2
/// does not always inline a generic lambda called twice (the recurrences' token steps ran
/// 1.6x slower at -O2 than at -O3 for that).
#if defined(__GNUC__)
#define FOVEA_ALWAYS_INLINE __attribute__((always_inline))
#else
#define FOVEA_ALWAYS_INLINE
#endif

/// An empty asm that says it reads and writes a vector register holding x: the compiler
/// keeps x there instead of re-loading it. The register class is the target's ("v" on
/// x86, "w" on AArch64); elsewhere nothing (only a missed optimisation).
#if defined(__x86_64__) || defined(__i386__)
#define FOVEA_PIN_VECTOR(x) asm("" : "+v"(x))
#elif defined(__aarch64__)
#define FOVEA_PIN_VECTOR(x) asm("" : "+w"(x))
#else
#define FOVEA_PIN_VECTOR(x) ((void)0)
#endif

namespace fovea::detail {

/// The bits of a float as an unsigned key of the same order (a < b iff order_key(a) <
/// order_key(b); -0 just below +0); NaN becomes all ones, above everything. Branch-free:
/// negative floats flip every bit, others only the sign bit.
inline std::uint32_t order_key(float x) noexcept {
  const auto bits = std::bit_cast<std::uint32_t>(x);
  const std::uint32_t flip = std::uint32_t(std::int32_t(bits) >> 31) | 0x80000000u;
  const std::uint32_t nan = 0u - std::uint32_t((bits & 0x7FFFFFFFu) > 0x7F800000u);
  return (bits ^ flip) | nan;
}

template <class T, class Backend>
struct vec;

template <class T>
struct vec<T, scalar> {
  using type = T;
  using mask = bool;
  static constexpr int width = 1;
  static constexpr int registers = 16;

  static type load(const T* p) noexcept { return *p; }
  static void store(T* p, type x) noexcept { *p = x; }
  static type broadcast(T x) noexcept { return x; }
  static type fma(type a, type b, type c) noexcept { return a * b + c; }
  static type add(type a, type b) noexcept { return a + b; }
  static type sub(type a, type b) noexcept { return a - b; }
  static type mul(type a, type b) noexcept { return a * b; }
  static type div(type a, type b) noexcept { return a / b; }
  static type max(type a, type b) noexcept { return a < b ? b : a; }
  static type abs(type a) noexcept { return std::abs(a); }
  static type exp(type a) noexcept { return std::exp(a); }
  static type tanh(type a) noexcept { return std::tanh(a); }
  static mask equal(type a, type b) noexcept { return a == b; }
  static mask not_equal(type a, type b) noexcept { return a != b; }
  static mask greater(type a, type b) noexcept { return a > b; }
  static type select(mask m, type a, type b) noexcept { return m ? a : b; }
  static bool any(mask m) noexcept { return m; }
  static bool all(mask m) noexcept { return m; }
  static T reduce_add(type a) noexcept { return a; }
  static T reduce_max(type a) noexcept { return a; }
  /// Lane i of the result is the sum of the lanes of rows[i] (width rows).
  static type reduce_add_lanes(const type* rows) noexcept { return rows[0]; }
  /// {base, base + 1, ...}
  static type iota(T base) noexcept { return base; }
  static void pin(type&) noexcept {}
  /// p[i] = order_key(lane i of x) (float lanes).
  static void store_order_keys(std::uint32_t* p, type x) noexcept {
    static_assert(std::is_same_v<T, float>);
    *p = order_key(x);
  }
  /// p[i] = lane i of x clamped to [-127, 127] and rounded to nearest, ties to even (the
  /// default rounding mode), as int8 (finite float lanes).
  static void store_int8(std::int8_t* p, type x) noexcept {
    static_assert(std::is_same_v<T, float>);
    *p = std::int8_t(std::nearbyint(std::clamp(x, -127.0f, 127.0f)));
  }
};

#if !defined(FOVEA_FORCE_SCALAR)
template <class T, class Arch>
struct vec<T, simd<Arch>> {
  using type = xsimd::batch<T, Arch>;
  using mask = xsimd::batch_bool<T, Arch>;
  static constexpr int width = static_cast<int>(type::size);
  static constexpr int registers = (sizeof(T) * type::size == 64) ? 32 : 16;

  static type load(const T* p) noexcept { return type::load_unaligned(p); }
  static void store(T* p, type x) noexcept { x.store_unaligned(p); }
  static type broadcast(T x) noexcept { return type(x); }
  /// a * b + c with one rounding. xsimd 8.1 has no AVX-512 fma: its generic one is
  /// a * b + c, which GCC contracts into vfmadd (from -O2) but clang (fp-contract=on, which
  /// stops at function boundaries) leaves as a multiply and an add: twice the arithmetic
  /// and another rounding in every AVX-512 clang build (q8_0 decode 22-25% slower than
  /// GCC's). So AVX-512 calls the instruction; elsewhere xsimd's fma (fma3 on AVX2, NEON's).
  static type fma(type a, type b, type c) noexcept {
#if defined(__AVX512F__)
    if constexpr (sizeof(T) * type::size == 64 && std::is_same_v<T, float>)
      return type(_mm512_fmadd_ps(a, b, c));
    else if constexpr (sizeof(T) * type::size == 64 && std::is_same_v<T, double>)
      return type(_mm512_fmadd_pd(a, b, c));
    else
#endif
      return xsimd::fma(a, b, c);
  }
  static type add(type a, type b) noexcept { return a + b; }
  static type sub(type a, type b) noexcept { return a - b; }
  static type mul(type a, type b) noexcept { return a * b; }
  static type div(type a, type b) noexcept { return a / b; }
  static type max(type a, type b) noexcept { return xsimd::max(a, b); }
  static type abs(type a) noexcept { return xsimd::abs(a); }
  static type exp(type a) noexcept { return xsimd::exp(a); }
  static type tanh(type a) noexcept { return xsimd::tanh(a); }
  static mask equal(type a, type b) noexcept { return a == b; }
  // IEEE != (true when either is NaN), as the scalar backend's: xsimd 8.1's AVX and
  // AVX-512 operator!= is the ordered compare (false for NaN), its SSE one unordered.
  static mask not_equal(type a, type b) noexcept { return !(a == b); }
  static mask greater(type a, type b) noexcept { return a > b; }  // false when either is NaN
  static type select(mask m, type a, type b) noexcept { return xsimd::select(m, a, b); }
  static bool any(mask m) noexcept { return xsimd::any(m); }
  static bool all(mask m) noexcept { return xsimd::all(m); }
  static T reduce_add(type a) noexcept { return xsimd::hadd(a); }  // xsimd 8.1 name
  static type reduce_add_lanes(const type* rows) noexcept {
    const type sums = xsimd::haddp(rows);
#if XSIMD_VERSION_MAJOR == 8 && defined(__AVX512F__)
    // xsimd 8.1's avx512f haddp for float returns lanes 2-3 and 4-5 of each half swapped.
    if constexpr (std::is_same_v<T, float> && std::is_base_of_v<xsimd::avx512f, Arch>) {
      const __m512i order = _mm512_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15);
      return type(_mm512_permutexvar_ps(order, sums));
    }
#endif
    return sums;
  }
  static T reduce_max(type a) noexcept {  // xsimd 8.1 has no reduce_max
    alignas(64) T lanes[width];
    a.store_aligned(lanes);
    T m = lanes[0];
    for (int i = 1; i < width; ++i) m = lanes[i] > m ? lanes[i] : m;
    return m;
  }
  /// Keeps x in a register: stops the compiler from re-loading it at every use.
  static void pin(type& x) noexcept { FOVEA_PIN_VECTOR(x.data); }
  static type iota(T base) noexcept {
    alignas(64) T lanes[width];
    for (int i = 0; i < width; ++i) lanes[i] = base + T(i);
    return type::load_aligned(lanes);
  }
  /// p[i] = order_key(lane i of x) (float lanes), in integer lanes.
  static void store_order_keys(std::uint32_t* p, type x) noexcept {
    static_assert(std::is_same_v<T, float>);
    using ints = xsimd::batch<std::int32_t, Arch>;
    const ints bits = xsimd::bitwise_cast<ints>(x);
    const ints flip = (bits >> 31) | ints(std::numeric_limits<std::int32_t>::min());
    // NaN: magnitude bits above infinity's, so the difference is negative; its sign
    // smeared over the lane (xsimd 8.1's integer select does not compile at -O0 with
    // AVX-512BW: GCC's blend intrinsics are macros there).
    const ints nan = (ints(0x7F800000) - (bits & ints(0x7FFFFFFF))) >> 31;
    ((bits ^ flip) | nan).store_unaligned(reinterpret_cast<std::int32_t*>(p));
  }
  /// p[i] = lane i of x clamped to [-127, 127] and rounded to nearest, ties to even, as
  /// int8 (finite float lanes): rounded in lanes, narrowed through a small array.
  static void store_int8(std::int8_t* p, type x) noexcept {
    static_assert(std::is_same_v<T, float>);
    alignas(64) std::int32_t lanes[width];
    xsimd::nearbyint_as_int(xsimd::min(xsimd::max(x, type(-127.0f)), type(127.0f))).store_aligned(lanes);
    for (int i = 0; i < width; ++i) p[i] = std::int8_t(lanes[i]);
  }
};
#endif

}  // namespace fovea::detail
