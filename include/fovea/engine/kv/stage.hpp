// Copies rows of keys or values into a tile buffer in the compute type, zero-padded to a
// whole number of vectors, when the kernel cannot read them in place (another storage
// type, a row length that is not a multiple of the vector width, or a tile that spans
// pages of a paged cache).
#pragma once

#include <algorithm>

#include "../../core/tensor_view.hpp"
#include "../../simd/dequantize.hpp"
#include "kv_source.hpp"

namespace fovea::detail {

/// Storage types a kernel that converts as it loads (load_as) reads in place; quantized
/// rows are always staged (dequantized once per tile).
template <class S>
inline constexpr bool readable_in_place_v = !is_quantized_v<S>;

/// Calls f(row(r), scale(r)) for r < rows: the key rows (keys) or value rows from j.
template <class K, class V, class F>
void for_rows(const kv_source<K, V>& kv, bool keys, index_t j, index_t rows, F&& f) noexcept {
  if (keys)
    for (index_t r = 0; r < rows; ++r) f(r, kv.k_row(j + r), kv.k_scale(j + r));
  else
    for (index_t r = 0; r < rows; ++r) f(r, kv.v_row(j + r), kv.v_scale(j + r));
}

/// dst[r][0, padded) = row j + r in T (converted or dequantized: q * row scale, times the
/// column's scale when the cache has per-channel scales); zeros past `cols`.
template <class K, class V, class T>
void stage_rows(const kv_source<K, V>& kv, bool keys, index_t j, index_t rows, index_t cols,
                index_t padded, T* dst) noexcept {
  const float* channels = keys ? kv.k_channels : kv.v_channels;
  for_rows(kv, keys, j, rows, [&](index_t r, const auto* src, float scale) {
    T* out = dst + r * padded;
    using S = std::remove_cv_t<std::remove_pointer_t<decltype(src)>>;
    if constexpr (std::is_same_v<S, std::int8_t>) {
      if (channels)
        dequantize_row(src, scale, channels, out, cols);
      else
        load_row(src, scale, out, cols);
    } else {
      load_row(src, scale, out, cols);
    }
    if (padded > cols) std::fill(out + cols, out + padded, T(0));
  });
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
template <class T, class K, class V>
row_block<T> rows_for_kernel(const kv_source<K, V>& kv, bool keys, index_t j, index_t rows,
                             index_t cols, index_t padded, T* buffer) noexcept {
  if (padded == cols && kv.run(j, rows) == rows) {
    if constexpr (std::is_same_v<K, T>)
      if (keys) return {kv.k_row(j), kv.k_stride};
    if constexpr (std::is_same_v<V, T>)
      if (!keys) return {kv.v_row(j), kv.v_stride};
  }
  stage_rows(kv, keys, j, rows, cols, padded, buffer);
  return {buffer, padded};
}

/// Calls f(rows, stride) with the rows [j, j + rows) where a kernel that converts as it
/// loads (load_as) can read them: in place, in the storage type, when rows are whole
/// vectors (`padded` == cols) on one page; copied as they are (storage type, rows back to
/// back) into `buffer` when they span pages, so the kernel and its bits are the same; else
/// (or for quantized rows) staged into `buffer` in the compute type. `buffer` holds
/// rows x padded values of T.
template <class T, class K, class V, class F>
void with_rows(const kv_source<K, V>& kv, bool keys, index_t j, index_t rows, index_t cols,
               index_t padded, T* buffer, F&& f) noexcept {
  auto in_place = [&](const auto* first, index_t stride) {
    using S = std::remove_cv_t<std::remove_pointer_t<decltype(first)>>;
    if constexpr (readable_in_place_v<S>) {
      if (padded != cols) return false;
      if (kv.run(j, rows) == rows) {
        f(first, stride);
        return true;
      }
      static_assert(sizeof(S) <= sizeof(T), "gathered rows must fit the staging buffer");
      S* gathered = reinterpret_cast<S*>(buffer);
      for_rows(kv, keys, j, rows, [&](index_t r, const auto* src, float) {
        if constexpr (std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(src)>>, S>)
          std::copy_n(src, cols, gathered + r * cols);
      });
      f(static_cast<const S*>(gathered), cols);
      return true;
    }
    return false;
  };
  if (keys ? in_place(kv.k_row(j), kv.k_stride) : in_place(kv.v_row(j), kv.v_stride)) return;
  stage_rows(kv, keys, j, rows, cols, padded, buffer);
  f(static_cast<const T*>(buffer), padded);
}

}  // namespace fovea::detail
