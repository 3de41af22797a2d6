// Argument checks shared by the front-ends: each throws fovea::error naming the argument.
#pragma once

#include <cmath>
#include <string_view>
#include <type_traits>

#include "any_float_view.hpp"
#include "error.hpp"
#include "tensor_view.hpp"

namespace fovea::detail {

template <class T, std::size_t Rank>
void check_data(const tensor_view<T, Rank>& v, std::string_view name) {
  require(v.data() != nullptr || v.empty(), name, ": data is null but the view has ", v.size(),
          " elements");
  for (std::size_t r = 0; r < Rank; ++r)
    require(v.extent(r) >= 0, name, ": extent ", r, " is negative (", v.extent(r), ")");
}

template <std::size_t Rank>
void check_data(const any_float_view<Rank>& v, std::string_view name) {
  v.visit([&](const auto& typed) { check_data(typed, name); });
}

/// q/k/v/out: innermost stride 1 (unless the last extent is 0 or 1).
template <class T>
void check_rows(const tensor_view<T, 4>& v, std::string_view name) {
  check_data(v, name);
  require(v.extent(3) <= 1 || v.stride(3) == 1, name, ": innermost stride is ", v.stride(3),
          ", expected 1");
}

inline const char* dim_name(std::size_t r) {
  constexpr const char* names[] = {"batch", "heads", "seq", "dim"};
  return names[r];
}

template <class T>
void check_extent(const tensor_view<T, 4>& v, std::size_t r, index_t expected,
                  std::string_view name, std::string_view because) {
  require(v.extent(r) == expected, name, ": extent ", r, " (", dim_name(r), ") is ", v.extent(r),
          ", expected ", expected, " (", because, ")");
}

/// An output must not overlap any input nor itself.
template <class O, std::size_t RO, class I, std::size_t RI>
void check_no_alias(const tensor_view<O, RO>& out, std::string_view out_name,
                    const tensor_view<I, RI>& in, std::string_view in_name) {
  require(!overlaps(out, in), out_name, ": memory overlaps ", in_name);
}

template <class O, std::size_t RO, std::size_t RI>
void check_no_alias(const tensor_view<O, RO>& out, std::string_view out_name,
                    const any_float_view<RI>& in, std::string_view in_name) {
  in.visit([&](const auto& typed) { check_no_alias(out, out_name, typed, in_name); });
}

template <class T, std::size_t Rank>
void check_one_to_one(const tensor_view<T, Rank>& out, std::string_view name) {
  require(is_one_to_one(out), name, ": strides make distinct elements share memory");
}

/// A (B|1, H|Hk|1, Sq|1, Sk|1) broadcastable view.
template <class E>
void check_broadcast(const tensor_view<const E, 4>& v, std::string_view name, index_t B, index_t H,
                     index_t Hk, index_t Sq, index_t Sk) {
  if (v.data() == nullptr && v.empty()) return;
  check_data(v, name);
  require(v.data() != nullptr, name, ": data is null");
  const index_t full[4] = {B, H, Sq, Sk};
  for (std::size_t r = 0; r < 4; ++r) {
    const index_t e = v.extent(r);
    const bool ok = e == 1 || e == full[r] || (r == 1 && e == Hk);
    const char* what = r == 0 ? "batch" : r == 1 ? "heads" : r == 2 ? "queries" : "keys";
    if (full[r] == 1) {
      require(ok, name, ": extent ", r, " (", what, ") is ", e, ", expected 1");
    } else if (r == 1 && Hk != H) {
      require(ok, name, ": extent 1 (heads) is ", e, ", expected 1, ", H, " (query heads) or ", Hk,
              " (key/value heads)");
    } else {
      require(ok, name, ": extent ", r, " (", what, ") is ", e, ", expected 1 (broadcast) or ",
              full[r]);
    }
  }
}

inline void check_broadcast(const any_float_view<4>& v, std::string_view name, index_t B,
                            index_t H, index_t Hk, index_t Sq, index_t Sk) {
  v.visit([&](const auto& typed) { check_broadcast(typed, name, B, H, Hk, Sq, Sk); });
}

}  // namespace fovea::detail
