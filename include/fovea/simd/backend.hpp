// Backend tags: `scalar`, or `simd<Arch>` over an xsimd architecture (default: the best
// one the compiler flags allow). Kernels take the tag as a template parameter.
#pragma once

#include <type_traits>

#if !defined(FOVEA_FORCE_SCALAR)
#include <xsimd/xsimd.hpp>
#endif

namespace fovea {

/// Plain C++ arithmetic, one element at a time (the compiler may still vectorize).
struct scalar {
  static constexpr const char* name() noexcept { return "scalar"; }
};

#if !defined(FOVEA_FORCE_SCALAR)
/// Explicit SIMD through xsimd for the architecture tag `Arch`.
template <class Arch = xsimd::default_arch>
struct simd {
  using arch = Arch;
  static constexpr const char* name() noexcept { return Arch::name(); }
};

inline constexpr bool has_simd = !std::is_same_v<xsimd::default_arch, xsimd::unavailable>;
#else
inline constexpr bool has_simd = false;
#endif

/// The backend the public entry points use unless told otherwise: simd<default_arch>, or
/// scalar when the flags allow no SIMD or FOVEA_FORCE_SCALAR is defined.
#if !defined(FOVEA_FORCE_SCALAR)
using default_backend = std::conditional_t<has_simd, simd<>, scalar>;
#else
using default_backend = scalar;
#endif

}  // namespace fovea
