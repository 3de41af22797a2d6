// tensor_view<T, Rank>: a non-owning pointer + extents + element strides, and the
// layout factories bhsd/bshd whose logical index order is always (batch, head, seq, dim).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace fovea {

using index_t = std::ptrdiff_t;

/// Values one element of storage type T holds: 1, except block types (block_q8_0: 32),
/// whose views count values in their extents and strides, so that a view of blocks has
/// the shape of the values it holds. Offsets are divided by this to address an element.
template <class T>
struct values_per_element {
  static constexpr index_t value = 1;
};
template <class T>
struct values_per_element<const T> : values_per_element<T> {};

template <class T, std::size_t Rank>
class tensor_view {
 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;
  using extents_type = std::array<index_t, Rank>;
  static constexpr std::size_t rank = Rank;

  constexpr tensor_view() = default;
  constexpr tensor_view(T* data, const extents_type& extents, const extents_type& strides)
      : data_(data), extents_(extents), strides_(strides) {}

  /// A view of const T converts implicitly from a view of T.
  template <class U>
  requires(std::is_same_v<const U, T> &&
           !std::is_same_v<U, T>) constexpr tensor_view(const tensor_view<U, Rank>& other)
      : data_(other.data()), extents_(other.extents()), strides_(other.strides()) {}

  /// A view of bool converts implicitly to a view of const std::uint8_t, so boolean masks
  /// (PyTorch's torch.bool, std::vector<char> of 0/1 read as bool) pass as they are.
  template <class U>
  requires(std::is_same_v<T, const std::uint8_t> && std::is_same_v<std::remove_const_t<U>, bool>)
  constexpr tensor_view(const tensor_view<U, Rank>& other)
      : data_(reinterpret_cast<T*>(other.data())), extents_(other.extents()),
        strides_(other.strides()) {
    static_assert(sizeof(bool) == 1, "bool masks are read as bytes");
  }

  constexpr T* data() const noexcept { return data_; }
  constexpr const extents_type& extents() const noexcept { return extents_; }
  constexpr const extents_type& strides() const noexcept { return strides_; }
  constexpr index_t extent(std::size_t r) const noexcept { return extents_[r]; }
  constexpr index_t stride(std::size_t r) const noexcept { return strides_[r]; }

  constexpr index_t size() const noexcept {
    index_t n = 1;
    for (index_t e : extents_) n *= e;
    return n;
  }
  constexpr bool empty() const noexcept { return size() == 0; }

  /// Elements between the first and one past the last addressable element (mdspan's
  /// required_span_size); 0 for an empty view.
  constexpr index_t required_span_size() const noexcept {
    if (empty()) return 0;
    index_t span = 1;
    for (std::size_t r = 0; r < Rank; ++r) span += (extents_[r] - 1) * strides_[r];
    return span;
  }

  template <class... I>
  requires(sizeof...(I) == Rank) constexpr index_t offset(I... i) const noexcept {
    // A fold, not a loop: -O2 leaves a loop over the rank rolled, and this runs per row.
    return [&]<std::size_t... R>(std::index_sequence<R...>) {
      return ((static_cast<index_t>(i) * strides_[R]) + ... + index_t(0));
    }(std::index_sequence_for<I...>{});
  }

  /// The element holding value (i...) (for block types: its block).
  template <class... I>
  requires(sizeof...(I) == Rank) constexpr T& operator()(I... i) const noexcept {
    return data_[offset(i...) / values_per_element<T>::value];
  }

  /// The address of element (i...): where a row starts (for block types: the block that
  /// holds value (i...)). An empty view may hold null data; then this is null rather than
  /// a reference formed through it.
  template <class... I>
  requires(sizeof...(I) == Rank) constexpr T* ptr(I... i) const noexcept {
    return data_ ? data_ + offset(i...) / values_per_element<T>::value : data_;
  }

 private:
  T* data_ = nullptr;
  extents_type extents_{};
  extents_type strides_{};
};

/// A view with explicit extents and strides (a stride may be 0 on an extent-1 dimension
/// to broadcast it).
template <class T, std::size_t Rank>
constexpr tensor_view<T, Rank> view(T* data, const std::array<index_t, Rank>& extents,
                                    const std::array<index_t, Rank>& strides) {
  return {data, extents, strides};
}

/// A dense row-major view (last index fastest).
template <class T, std::size_t Rank>
constexpr tensor_view<T, Rank> view(T* data, const std::array<index_t, Rank>& extents) {
  std::array<index_t, Rank> strides{};
  index_t s = 1;
  for (std::size_t r = Rank; r-- > 0;) {
    strides[r] = s;
    s *= extents[r];
  }
  return {data, extents, strides};
}

/// The same from braced lists, the rank deduced from them: `view(p, {2, 3}, {3, 1})`,
/// `view(p, {B, 1, Sq, Sk})`; `view<const float>(p, ...)` for a view of const data.
template <class T, std::size_t Rank>
constexpr tensor_view<T, Rank> view(T* data, const index_t (&extents)[Rank],
                                    const index_t (&strides)[Rank]) {
  std::array<index_t, Rank> e{}, s{};
  for (std::size_t r = 0; r < Rank; ++r) e[r] = extents[r], s[r] = strides[r];
  return {data, e, s};
}
template <class T, std::size_t Rank>
constexpr tensor_view<T, Rank> view(T* data, const index_t (&extents)[Rank]) {
  std::array<index_t, Rank> e{};
  for (std::size_t r = 0; r < Rank; ++r) e[r] = extents[r];
  return view(data, e);
}

/// Memory laid out as [batch, heads, seq, dim]; the view is (batch, head, seq, dim).
template <class T>
constexpr tensor_view<T, 4> bhsd(T* data, index_t batch, index_t heads, index_t seq, index_t dim) {
  return {data, {batch, heads, seq, dim}, {heads * seq * dim, seq * dim, dim, 1}};
}

/// Memory laid out as [batch, seq, heads, dim]; the view is still (batch, head, seq, dim).
template <class T>
constexpr tensor_view<T, 4> bshd(T* data, index_t batch, index_t seq, index_t heads, index_t dim) {
  return {data, {batch, heads, seq, dim}, {seq * heads * dim, dim, heads * dim, 1}};
}

/// The four extents by name, for the layout factories: `bhsd(p, {.batch = B, .heads = H,
/// .seq = S, .dim = D})` and `bshd(p, {...})` read the same in both layouts, so a swapped
/// argument cannot compile into a wrong view (the positional forms take heads and seq in
/// their memory order, which differs between bhsd and bshd).
struct dims {
  index_t batch = 1, heads = 1, seq = 1, dim = 1;
};
template <class T>
constexpr tensor_view<T, 4> bhsd(T* data, const dims& d) {
  return bhsd(data, d.batch, d.heads, d.seq, d.dim);
}
template <class T>
constexpr tensor_view<T, 4> bshd(T* data, const dims& d) {
  return bshd(data, d.batch, d.seq, d.heads, d.dim);
}

/// The sub-view of indices [start, start + count) along dimension `dim`.
template <class T, std::size_t Rank>
constexpr tensor_view<T, Rank> slice(const tensor_view<T, Rank>& v, std::size_t dim, index_t start,
                                     index_t count) {
  auto extents = v.extents();
  extents[dim] = count;
  return {count > 0 ? v.data() + start * v.stride(dim) / values_per_element<T>::value : v.data(),
          extents, v.strides()};
}

/// Paged caches in vLLM's layout [pages, page_size, heads, dim], viewed as (page, head,
/// slot, dim) for softmax_attention_paged.
template <class T>
constexpr tensor_view<T, 4> paged_nhd(T* data, index_t pages, index_t page_size, index_t heads,
                                      index_t dim) {
  return {data, {pages, heads, page_size, dim}, {page_size * heads * dim, dim, heads * dim, 1}};
}

/// Paged caches laid out [pages, heads, page_size, dim] (FlashInfer's HND).
template <class T>
constexpr tensor_view<T, 4> paged_hnd(T* data, index_t pages, index_t page_size, index_t heads,
                                      index_t dim) {
  return {data, {pages, heads, page_size, dim}, {heads * page_size * dim, page_size * dim, dim, 1}};
}

namespace detail {

/// Byte range [first, last) a view can touch.
template <class T, std::size_t Rank>
std::pair<const std::byte*, const std::byte*> byte_range(const tensor_view<T, Rank>& v) {
  if (v.empty() || v.data() == nullptr) return {nullptr, nullptr};
  index_t lo = 0, hi = 0;
  for (std::size_t r = 0; r < Rank; ++r) {
    const index_t reach = (v.extent(r) - 1) * v.stride(r);
    (reach < 0 ? lo : hi) += reach;
  }
  const auto* base = reinterpret_cast<const std::byte*>(v.data());
  constexpr index_t per = values_per_element<T>::value, size = sizeof(T);
  return {base + lo / per * size, base + (hi / per + 1) * size};
}

template <class A, std::size_t RA, class B, std::size_t RB>
bool overlaps(const tensor_view<A, RA>& a, const tensor_view<B, RB>& b) {
  const auto [a0, a1] = byte_range(a);
  const auto [b0, b1] = byte_range(b);
  return a0 != nullptr && b0 != nullptr && a0 < b1 && b0 < a1;
}

/// True when distinct indices always address distinct elements (strides sorted by size
/// each step over the whole span of the smaller ones).
template <class T, std::size_t Rank>
bool is_one_to_one(const tensor_view<T, Rank>& v) {
  if (v.empty()) return true;
  std::array<std::pair<index_t, index_t>, Rank> dims{};  // (|stride|, extent)
  std::size_t n = 0;
  for (std::size_t r = 0; r < Rank; ++r)
    if (v.extent(r) > 1) dims[n++] = {v.stride(r) < 0 ? -v.stride(r) : v.stride(r), v.extent(r)};
  for (std::size_t a = 1; a < n; ++a)  // insertion sort: n <= Rank
    for (std::size_t b = a; b > 0 && dims[b] < dims[b - 1]; --b) std::swap(dims[b], dims[b - 1]);
  index_t span = 1;
  for (std::size_t r = 0; r < n; ++r) {
    if (dims[r].first < span) return false;
    span = dims[r].first * (dims[r].second - 1) + span;
  }
  return true;
}

}  // namespace detail
}  // namespace fovea
