// Copies rows of keys or values into a tile buffer in the compute type, zero-padded to a
// whole number of vectors, when the kernel cannot read them in place (another storage
// type, a row length that is not a multiple of the vector width, or a tile that spans
// pages of a paged cache).
#pragma once

#include <algorithm>

#include "../../core/tensor_view.hpp"
#include "../../simd/convert.hpp"
#include "kv_source.hpp"

namespace fovea::detail {

/// dst[r][0, padded) = src row j + r, converted; zeros past `cols`.
template <class S, class T>
void stage_rows(const kv_source<S>& kv, bool keys, index_t j, index_t rows, index_t cols,
                index_t padded, T* dst) noexcept {
  for (index_t r = 0; r < rows; ++r) {
    const S* src = keys ? kv.k_row(j + r) : kv.v_row(j + r);
    T* out = dst + r * padded;
    convert_row(src, out, cols);
    std::fill(out + cols, out + padded, T(0));
  }
}

/// A run of key (or value) rows the micro-kernels can read: pointer and row stride.
template <class T>
struct row_block {
  const T* data;
  index_t stride;
};

/// The rows [j, j + rows) in place when that is possible (same type, on one page, and
/// when `padded` > cols is asked for, never), else staged into `buffer`. A tile that spans
/// pages is gathered, so a paged cache is read in the same tiles as a contiguous one and
/// gives the same bits whatever the page size.
template <class T, class S>
row_block<T> rows_for_kernel(const kv_source<S>& kv, bool keys, index_t j, index_t rows,
                             index_t cols, index_t padded, T* buffer) noexcept {
  if constexpr (std::is_same_v<S, T>) {
    if (padded == cols && kv.run(j, rows) == rows)
      return keys ? row_block<T>{kv.k_row(j), kv.k_stride} : row_block<T>{kv.v_row(j), kv.v_stride};
  }
  stage_rows(kv, keys, j, rows, cols, padded, buffer);
  return {buffer, padded};
}

/// Calls f(rows, stride) with the rows [j, j + rows) where a kernel that converts as it
/// loads (load_as) can read them: in place, in the storage type, when rows are whole
/// vectors (`padded` == cols) on one page; copied as they are (storage type, rows back to
/// back) into `buffer` when they span pages, so the kernel and its bits are the same; else
/// staged into `buffer` in the compute type. `buffer` holds rows x padded values of T.
template <class T, class S, class F>
void with_rows(const kv_source<S>& kv, bool keys, index_t j, index_t rows, index_t cols,
               index_t padded, T* buffer, F&& f) noexcept {
  if (padded == cols) {
    if (kv.run(j, rows) == rows) {
      if (keys)
        f(kv.k_row(j), kv.k_stride);
      else
        f(kv.v_row(j), kv.v_stride);
      return;
    }
    static_assert(sizeof(S) <= sizeof(T), "gathered rows must fit the staging buffer");
    S* gathered = reinterpret_cast<S*>(buffer);
    for (index_t r = 0; r < rows; ++r)
      std::copy_n(keys ? kv.k_row(j + r) : kv.v_row(j + r), cols, gathered + r * cols);
    f(static_cast<const S*>(gathered), cols);
    return;
  }
  stage_rows(kv, keys, j, rows, cols, padded, buffer);
  f(static_cast<const T*>(buffer), padded);
}

}  // namespace fovea::detail
