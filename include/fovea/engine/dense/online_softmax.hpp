// The online-softmax state of a query tile: running max m and sum l per query column,
// updated one key tile at a time (logits laid out [keys][queries], queries contiguous, or
// [queries][keys] for decode's few queries).
//
// The -inf case (FlashInfer's attention/state.cuh): while a query has seen no visible
// key, m = -inf; exponents are then taken against 0 instead of m, so exp(-inf - -inf)
// never produces NaN and the row's p, l and accumulator stay exactly 0.
#pragma once

#include <cmath>
#include <limits>

#include "../../core/tensor_view.hpp"
#include "../../simd/vec.hpp"

namespace fovea::detail {

/// Updates m and l for one tile of `keys` logit rows, writes p = exp(s - m_new) and
/// alpha = exp(m_old - m_new) (the factor the accumulator must be rescaled by).
/// Returns false when every alpha is exactly 1, so the rescale can be skipped.
template <class T, class Backend, int Vectors>
inline bool online_softmax_update(const T* s, T* p, index_t ld, index_t keys, T* m, T* l,
                                  T* alpha) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width;
  const auto neg_inf = V::broadcast(-std::numeric_limits<T>::infinity());
  const auto zero = V::broadcast(T(0));
  const auto one = V::broadcast(T(1));
  typename V::type tile_max[Vectors], m_ref[Vectors], sum[Vectors];
#pragma GCC unroll 8
  for (int x = 0; x < Vectors; ++x) tile_max[x] = neg_inf;
  for (index_t j = 0; j < keys; ++j)
#pragma GCC unroll 8
    for (int x = 0; x < Vectors; ++x)
      tile_max[x] = V::max(tile_max[x], V::load(s + j * ld + x * W));
  bool rescale = false;
#pragma GCC unroll 8
  for (int x = 0; x < Vectors; ++x) {
    const auto m_old = V::load(m + x * W);
    const auto m_new = V::max(m_old, tile_max[x]);
    m_ref[x] = V::select(V::equal(m_new, neg_inf), zero, m_new);
    const auto a = V::exp(V::sub(m_old, m_ref[x]));
    rescale = rescale || !V::all(V::equal(a, one));
    V::store(alpha + x * W, a);
    V::store(m + x * W, m_new);
    sum[x] = zero;
  }
  for (index_t j = 0; j < keys; ++j)
#pragma GCC unroll 8
    for (int x = 0; x < Vectors; ++x) {
      const auto e = V::exp(V::sub(V::load(s + j * ld + x * W), m_ref[x]));
      V::store(p + j * ld + x * W, e);
      sum[x] = V::add(sum[x], e);
    }
#pragma GCC unroll 8
  for (int x = 0; x < Vectors; ++x)
    V::store(l + x * W, V::fma(V::load(l + x * W), V::load(alpha + x * W), sum[x]));
  return rescale;
}

/// p = exp(s - m) * inv for one tile of `keys` logit rows whose rows' max m and 1 / sum
/// `inv` are final (a prob_mod tile's second walk: p is the normalised probability; -inf
/// logits give exactly 0).
template <class T, class Backend, int Vectors>
inline void normalised_probabilities(const T* s, T* p, index_t ld, index_t keys, const T* m,
                                     const T* inv) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width;
  typename V::type ref[Vectors], scale[Vectors];
#pragma GCC unroll 8
  for (int x = 0; x < Vectors; ++x) ref[x] = V::load(m + x * W), scale[x] = V::load(inv + x * W);
  for (index_t j = 0; j < keys; ++j)
#pragma GCC unroll 8
    for (int x = 0; x < Vectors; ++x)
      V::store(p + j * ld + x * W,
               V::mul(V::exp(V::sub(V::load(s + j * ld + x * W), ref[x])), scale[x]));
}

/// A prob_mod tile's rows after its first walk over the keys (m, l: the online state):
/// m becomes the reference the probabilities are taken against (the max with the sink,
/// 0 for a row that saw nothing), inv 1 / sum (sink included; 0 for a row that saw
/// nothing), and l the row's lse.
template <class T>
inline void normalisers(index_t columns, const T* sink, T* m, T* l, T* inv) noexcept {
  constexpr T inf = std::numeric_limits<T>::infinity();
  for (index_t c = 0; c < columns; ++c) {
    T m_all = m[c], total = l[c];
    if (sink[c] != -inf) {
      m_all = m[c] > sink[c] ? m[c] : (m[c] != m[c] ? m[c] : sink[c]);
      total = (m[c] == -inf ? T(0) : l[c] * std::exp(m[c] - m_all)) + std::exp(sink[c] - m_all);
    }
    m[c] = m_all == -inf ? T(0) : m_all;
    inv[c] = total == T(0) ? T(0) : T(1) / total;
    l[c] = total == T(0) ? -inf : m_all + std::log(total);
  }
}

/// The same update for logits laid out [column][key] (keys contiguous): row c is
/// s[c * ld + j], j < keys (lanes past `keys` are ignored), with state m[c], l[c] and
/// alpha[c]; p has the same layout.
template <class T, class Backend>
inline bool online_softmax_by_column(const T* s, T* p, index_t ld, index_t columns, index_t keys,
                                     T* m, T* l, T* alpha) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const index_t whole = keys / W * W;
  bool rescale = false;
  for (index_t c = 0; c < columns; ++c) {
    const T* row = s + c * ld;
    T* out = p + c * ld;
    auto lanes_max = V::broadcast(neg_inf);
    for (index_t j = 0; j < whole; j += W) lanes_max = V::max(lanes_max, V::load(row + j));
    T tile_max = V::reduce_max(lanes_max);
    for (index_t j = whole; j < keys; ++j) tile_max = row[j] > tile_max ? row[j] : tile_max;
    const T m_new = tile_max > m[c] ? tile_max : m[c];
    const T m_ref = m_new == neg_inf ? T(0) : m_new;
    const T a = std::exp(m[c] - m_ref);
    rescale = rescale || a != T(1);
    alpha[c] = a;
    m[c] = m_new;
    const auto ref = V::broadcast(m_ref);
    auto lanes_sum = V::broadcast(T(0));
    for (index_t j = 0; j < whole; j += W) {
      const auto e = V::exp(V::sub(V::load(row + j), ref));
      V::store(out + j, e);
      lanes_sum = V::add(lanes_sum, e);
    }
    T sum = V::reduce_add(lanes_sum);
    for (index_t j = whole; j < keys; ++j) sum += out[j] = std::exp(row[j] - m_ref);
    l[c] = l[c] * a + sum;
  }
  return rescale;
}

/// acc[r][:] *= alpha[:] for `rows` rows of a [rows][queries] accumulator.
template <class T, class Backend, int Vectors>
inline void rescale_rows(T* acc, index_t ld, index_t rows, const T* alpha) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width;
  typename V::type a[Vectors];
#pragma GCC unroll 8
  for (int x = 0; x < Vectors; ++x) a[x] = V::load(alpha + x * W);
  for (index_t r = 0; r < rows; ++r)
#pragma GCC unroll 8
    for (int x = 0; x < Vectors; ++x)
      V::store(acc + r * ld + x * W, V::mul(V::load(acc + r * ld + x * W), a[x]));
}

/// What a finished row becomes: out = acc * factor, and its log-sum-exp. A sink logit
/// (sink = -inf for none) joins the denominator only. A row that saw no key (and no
/// sink) gets factor 0 and lse -inf; NaN in m or l carries through to both. Without
/// `with_lse` the logarithm is skipped and lse is left 0.
template <class T>
struct row_result {
  T factor;
  T lse;
};

template <class T>
inline row_result<T> finish_row(T m, T l, T sink, bool with_lse = true) noexcept {
  constexpr T inf = std::numeric_limits<T>::infinity();
  if (sink != -inf) {
    const T m_all = m > sink ? m : (m != m ? m : sink);
    const T kept = m == -inf ? T(0) : std::exp(m - m_all);
    const T total = l * kept + std::exp(sink - m_all);
    return {kept / total, with_lse ? m_all + std::log(total) : T(0)};
  }
  if (l == T(0)) return {T(0), with_lse ? -inf : T(0)};
  return {T(1) / l, with_lse ? m + std::log(l) : T(0)};
}

}  // namespace fovea::detail
