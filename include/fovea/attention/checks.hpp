// The argument checks every (q, k, v, out) front-end shares.
#pragma once

#include <type_traits>

#include "../core/error.hpp"
#include "../core/storage.hpp"
#include "../core/tensor_view.hpp"
#include "../core/validate.hpp"

namespace fovea::detail {

template <class TQ, class TK, class TV, class TO>
concept attention_types = is_storage_type_v<TQ> && !std::is_const_v<TO> &&
                          std::is_same_v<std::remove_const_t<TQ>, std::remove_const_t<TK>> &&
                          std::is_same_v<std::remove_const_t<TQ>, std::remove_const_t<TV>> &&
                          std::is_same_v<std::remove_const_t<TQ>, TO>;

/// out: (B, H, Sq, Dv) of q and v, one-to-one, overlapping none of the inputs.
template <class T>
void check_output(const tensor_view<T, 4>& out, const tensor_view<const T, 4>& q,
                  const tensor_view<const T, 4>& k, const char* k_name,
                  const tensor_view<const T, 4>& v, const char* v_name) {
  check_extent(out, 0, q.extent(0), "out", "batch of q");
  check_extent(out, 1, q.extent(1), "out", "heads of q");
  check_extent(out, 2, q.extent(2), "out", "queries of q");
  check_extent(out, 3, v.extent(3), "out", "value dim of v");
  check_one_to_one(out, "out");
  check_no_alias(out, "out", q, "q");
  check_no_alias(out, "out", k, k_name);
  check_no_alias(out, "out", v, v_name);
}

/// The shape checks every (q, k, v, out) front-end shares; returns the GQA group size.
template <class T>
index_t check_qkvo(const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
                   const tensor_view<const T, 4>& v, const tensor_view<T, 4>& out) {
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  check_rows(out, "out");
  const index_t B = q.extent(0), H = q.extent(1), D = q.extent(3);
  const index_t Hk = k.extent(1), Sk = k.extent(2);
  require(D >= 1, "q: extent 3 (dim) is ", D, ", expected at least 1");
  check_extent(k, 0, B, "k", "batch of q");
  check_extent(k, 3, D, "k", "head dim of q");
  require(Hk >= 1 || H == 0, "k: extent 1 (heads) is 0 but q has ", H, " heads");
  require(Hk == 0 || H % Hk == 0, "k: extent 1 (heads) is ", Hk, ", which does not divide the ", H,
          " heads of q");
  check_extent(v, 0, B, "v", "batch of q");
  check_extent(v, 1, Hk, "v", "heads of k");
  check_extent(v, 2, Sk, "v", "keys of k");
  check_output(out, q, k, "k", v, "v");
  return Hk == 0 || H == 0 ? 1 : H / Hk;  // >= 1: callers divide by it
}

}  // namespace fovea::detail
