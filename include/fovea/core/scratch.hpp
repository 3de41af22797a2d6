// Aligned scratch memory: one allocation per call, sliced per thread before any thread
// starts, so an allocation failure throws in the caller and nothing is half written.
#pragma once

#include <cstddef>
#include <memory>
#include <new>

#include "tensor_view.hpp"

namespace fovea::detail {

inline constexpr std::size_t scratch_alignment = 64;

template <class T>
struct aligned_delete {
  void operator()(T* p) const noexcept {
    ::operator delete[](p, std::align_val_t{scratch_alignment});
  }
};

/// Rounds n up to a whole number of cache lines of T.
template <class T>
constexpr index_t round_to_line(index_t n) noexcept {
  constexpr index_t per_line = scratch_alignment / sizeof(T);
  return (n + per_line - 1) / per_line * per_line;
}

/// `slots` equal slices of `per_slot` elements, each 64-byte aligned.
template <class T>
class scratch_slices {
 public:
  scratch_slices(index_t slots, index_t per_slot)
      : stride_(round_to_line<T>(per_slot)),
        data_(static_cast<T*>(::operator new[](
            sizeof(T) * static_cast<std::size_t>(slots * stride_ > 0 ? slots * stride_ : 1),
            std::align_val_t{scratch_alignment}))) {}

  T* slice(index_t slot) const noexcept { return data_.get() + slot * stride_; }

 private:
  index_t stride_;
  std::unique_ptr<T, aligned_delete<T>> data_;
};

}  // namespace fovea::detail
