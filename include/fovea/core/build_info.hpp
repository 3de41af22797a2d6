// What the including translation unit was compiled for: the SIMD backend the kernels run
// on, whether OpenMP threads are there, and whether the compiler optimised. fovea's speed
// depends on all three, and a build that gets one wrong runs 3-250x slower without any
// other sign (no -O: a GQA prefill took 4.3 s instead of 17 ms; no -march: SSE2 only).
// Headers compiled without optimisation warn once; define FOVEA_NO_OPTIMIZATION_WARNING
// to silence it (a debug build that knows).
#pragma once

#include <string>

#include "../simd/backend.hpp"

#if !defined(__OPTIMIZE__) && !defined(FOVEA_NO_OPTIMIZATION_WARNING)
#warning "fovea is compiled without optimisation (no -O2/-O3): its kernels run 10-250x slower. Build Release, or define FOVEA_NO_OPTIMIZATION_WARNING."
#endif

namespace fovea {

/// One line such as "backend fma3+avx2, OpenMP on, optimised": the backend of
/// default_backend ("scalar" when the flags allow no SIMD: add -march=native or -mavx2
/// -mfma), whether OpenMP is compiled in (-fopenmp), and whether the compiler optimised.
inline std::string build_info() {
  std::string s = "backend ";
  s += default_backend::name();
#if defined(_OPENMP)
  s += ", OpenMP on";
#else
  s += ", OpenMP off (serial)";
#endif
#if defined(__OPTIMIZE__)
  s += ", optimised";
#else
  s += ", NOT optimised (build with -O2 or -O3)";
#endif
  return s;
}

}  // namespace fovea
