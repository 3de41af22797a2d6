// A read-only view of fp32, fp16 or bf16 values, for inputs that engines hold in any of
// the three (llama.cpp's KQ mask is fp16; PyTorch passes a bf16 attn_mask to a bf16
// model): an additive bias, ALiBi slopes. Assigned from any tensor_view of those types;
// the kernels widen it to fp32 once per call (detail::widen).
#pragma once

#include <array>
#include <memory>
#include <type_traits>
#include <vector>

#include "storage.hpp"
#include "tensor_view.hpp"

namespace fovea {

enum class float_type { f32, f16, bf16 };

constexpr const char* to_string(float_type t) noexcept {
  return t == float_type::f32 ? "f32" : t == float_type::f16 ? "f16" : "bf16";
}

template <std::size_t Rank>
class any_float_view {
 public:
  any_float_view() = default;
  any_float_view(tensor_view<const float, Rank> v) noexcept : f32_(v) {}
  any_float_view(tensor_view<float, Rank> v) noexcept : f32_(v) {}
  any_float_view(tensor_view<const half, Rank> v) noexcept : f16_(v), type_(float_type::f16) {}
  any_float_view(tensor_view<half, Rank> v) noexcept : f16_(v), type_(float_type::f16) {}
  any_float_view(tensor_view<const bfloat16, Rank> v) noexcept
      : bf16_(v), type_(float_type::bf16) {}
  any_float_view(tensor_view<bfloat16, Rank> v) noexcept : bf16_(v), type_(float_type::bf16) {}

  float_type type() const noexcept { return type_; }
  /// Calls f with the typed view (tensor_view<const float | half | bfloat16, Rank>).
  template <class F>
  decltype(auto) visit(F&& f) const {
    switch (type_) {
      case float_type::f16: return f(f16_);
      case float_type::bf16: return f(bf16_);
      default: return f(f32_);
    }
  }
  const void* data() const noexcept {
    return visit([](const auto& v) -> const void* { return v.data(); });
  }
  index_t extent(std::size_t r) const noexcept {
    return visit([r](const auto& v) { return v.extent(r); });
  }
  index_t stride(std::size_t r) const noexcept {
    return visit([r](const auto& v) { return v.stride(r); });
  }
  std::array<index_t, Rank> extents() const noexcept {
    return visit([](const auto& v) { return v.extents(); });
  }
  bool empty() const noexcept {
    return visit([](const auto& v) { return v.empty(); });
  }
  /// Element (i...) as float.
  template <class... I>
  float operator()(I... i) const noexcept {
    return visit([&](const auto& v) { return float(v(i...)); });
  }

 private:
  tensor_view<const float, Rank> f32_{};
  tensor_view<const half, Rank> f16_{};
  tensor_view<const bfloat16, Rank> bf16_{};
  float_type type_ = float_type::f32;
};

namespace detail {

/// The view as fp32: itself when it is fp32, else a dense copy widened into `storage`
/// (same extents, row-major), which must outlive the returned view.
template <std::size_t Rank>
tensor_view<const float, Rank> widen(const any_float_view<Rank>& x,
                                     std::shared_ptr<const std::vector<float>>& storage) {
  return x.visit([&](const auto& v) -> tensor_view<const float, Rank> {
    using E = std::remove_const_t<typename std::remove_reference_t<decltype(v)>::element_type>;
    if constexpr (std::is_same_v<E, float>) {
      return v;
    } else {
      if (v.data() == nullptr) return {};
      auto values = std::make_shared<std::vector<float>>(std::size_t(v.size()));
      std::array<index_t, Rank> strides{};
      index_t step = 1;
      for (std::size_t r = Rank; r-- > 0;) strides[r] = step, step *= v.extent(r);
      std::array<index_t, Rank> at{};
      for (index_t n = 0; n < v.size(); ++n) {  // row-major walk over the extents
        index_t off = 0;
        for (std::size_t r = 0; r < Rank; ++r) off += at[r] * v.stride(r);
        (*values)[std::size_t(n)] = float(v.data()[off]);
        for (std::size_t r = Rank; r-- > 0;) {
          if (++at[r] < v.extent(r)) break;
          at[r] = 0;
        }
      }
      storage = values;
      return tensor_view<const float, Rank>(values->data(), v.extents(), strides);
    }
  });
}

}  // namespace detail
}  // namespace fovea
