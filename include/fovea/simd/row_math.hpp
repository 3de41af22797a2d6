// Reductions of one contiguous row with vector lanes: a scalar running sum is a chain of
// dependent adds, often slower than the GEMMs around it. Linear attention's chunk loops
// and agent attention's causal prefixes use them.
#pragma once

#include "../core/tensor_view.hpp"
#include "vec.hpp"

namespace fovea::detail {

/// x[0, n) summed with vector lanes.
template <class T, class Backend>
T sum_row(const T* x, index_t n) noexcept {
  using V = vec<T, Backend>;
  auto acc = V::broadcast(T(0));
  index_t i = 0;
  for (; i + V::width <= n; i += V::width) acc = V::add(acc, V::load(x + i));
  T total = V::reduce_add(acc);
  for (; i < n; ++i) total += x[i];
  return total;
}

/// x[0, n) . y[0, n) with vector lanes.
template <class T, class Backend>
T dot_row(const T* x, const T* y, index_t n) noexcept {
  using V = vec<T, Backend>;
  auto acc = V::broadcast(T(0));
  index_t i = 0;
  for (; i + V::width <= n; i += V::width) acc = V::fma(V::load(x + i), V::load(y + i), acc);
  T total = V::reduce_add(acc);
  for (; i < n; ++i) total += x[i] * y[i];
  return total;
}

}  // namespace fovea::detail
