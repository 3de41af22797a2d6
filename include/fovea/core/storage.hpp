// Storage types and the type each is accumulated in.
#pragma once

#include <type_traits>

namespace fovea {

/// The arithmetic type a kernel computes in for storage type S (at least fp32).
template <class S>
struct accumulator {
  using type = S;
};
template <class S>
using accumulator_t = typename accumulator<std::remove_const_t<S>>::type;

template <class S>
inline constexpr bool is_storage_type_v =
    std::is_same_v<std::remove_const_t<S>, float> || std::is_same_v<std::remove_const_t<S>, double>;

}  // namespace fovea
