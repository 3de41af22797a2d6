// Reductions of rows with vector lanes: a scalar running sum is a chain of dependent adds,
// often slower than the GEMMs around it. Linear attention's chunk loops, agent attention's
// causal prefixes and the engines' finiteness checks use them.
#pragma once

#include "../core/tensor_view.hpp"
#include "convert.hpp"
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

/// acc[0, n) += x[0, n) converted to T, with vector lanes (each element's sum keeps the
/// order of the calls, as a scalar loop would).
template <class T, class Backend, class S>
void add_row(const S* x, T* acc, index_t n) noexcept {
  using V = vec<T, Backend>;
  index_t i = 0;
  for (; i + V::width <= n; i += V::width)
    V::store(acc + i, V::add(V::load(acc + i), load_as<T, Backend>(x + i)));
  for (; i < n; ++i) acc[i] += T(x[i]);
}

/// True when rows [0, rows) x [0, cols) of a strided matrix hold only finite values.
template <class T, class Backend, class S>
bool all_finite(const S* data, index_t row_stride, index_t rows, index_t cols) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width;
  const auto zero = V::broadcast(T(0));
  auto acc = zero;
  T tail = 0;
  for (index_t r = 0; r < rows; ++r) {
    const S* row = data + r * row_stride;
    index_t c = 0;
    for (; c + W <= cols; c += W) acc = V::fma(load_as<T, Backend>(row + c), zero, acc);
    for (; c < cols; ++c) tail += T(row[c]) * T(0);
  }
  return V::reduce_add(acc) + tail == T(0);
}

}  // namespace fovea::detail
