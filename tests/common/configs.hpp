// The (storage type x backend) configurations every typed test runs over, with readable
// names such as f32_avx512bw or f64_scalar. Each test executable is compiled with other
// -m flags, so together they cover scalar, AVX2 and AVX-512 code.
#pragma once

#include <gtest/gtest.h>

#include <fovea/fovea.hpp>
#include <string>
#include <type_traits>

namespace fovea::test {

template <class T, class Backend>
struct config {
  using value_type = T;
  using backend = Backend;
  static std::string name() {
    return std::string(std::is_same_v<T, float> ? "f32_" : "f64_") + Backend::name();
  }
};

#if defined(FOVEA_TEST_SANITIZE)  // the sanitizer build: the main configuration only
using configs = ::testing::Types<config<float, default_backend>>;
#elif defined(FOVEA_FORCE_SCALAR)
using configs = ::testing::Types<config<float, scalar>, config<double, scalar>>;
#elif defined(FOVEA_TEST_SIMD_ONLY)
using configs = ::testing::Types<config<float, default_backend>, config<double, default_backend>>;
#else  // double on the scalar backend runs in the no-xsimd build (fovea_tests_scalar)
using configs = ::testing::Types<config<float, default_backend>, config<double, default_backend>,
                                 config<float, scalar>>;
#endif

struct config_names {
  template <class C>
  static std::string GetName(int) {
    return C::name();
  }
};

}  // namespace fovea::test
