// Storage types and the type each is accumulated in: float and double compute in
// themselves; bf16 and fp16 (Eigen::bfloat16, Eigen::half) are converted on load and
// accumulated in float.
#pragma once

#include <Eigen/Core>
#include <type_traits>

namespace fovea {

using bfloat16 = Eigen::bfloat16;
using half = Eigen::half;

/// The arithmetic type a kernel computes in for storage type S (at least fp32).
template <class S>
struct accumulator {
  using type = S;
};
template <>
struct accumulator<bfloat16> {
  using type = float;
};
template <>
struct accumulator<half> {
  using type = float;
};
template <class S>
using accumulator_t = typename accumulator<std::remove_const_t<S>>::type;

template <class S>
inline constexpr bool is_storage_type_v = std::is_same_v<std::remove_const_t<S>, float> ||
                                          std::is_same_v<std::remove_const_t<S>, double> ||
                                          std::is_same_v<std::remove_const_t<S>, bfloat16> ||
                                          std::is_same_v<std::remove_const_t<S>, half>;

}  // namespace fovea
