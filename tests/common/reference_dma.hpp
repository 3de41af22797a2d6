// Dynamic mask attention's definitions for the tests: which keys each query row keeps
// (its `keep` allowed keys of largest bias, ties to the earlier key), selected row by row
// from the definition, and the bias from value states in f64.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fovea/fovea.hpp>
#include <vector>

namespace fovea::test {

/// Which keys each (b, h, i) keeps: its `keep` allowed keys of largest bias.
struct kept_sets {
  index_t H, Sq, Sk;
  std::vector<std::uint8_t> in;  ///< (B, H, Sq, Sk)

  bool operator()(index_t b, index_t h, index_t i, index_t j) const {
    return in[((b * H + h) * Sq + i) * Sk + j] != 0;
  }
};

template <class E>
E at(const tensor_view<const E, 4>& x, index_t b, index_t h, index_t i, index_t j, index_t H,
     index_t group) {
  return x(x.extent(0) == 1 ? 0 : b, x.extent(1) == 1 ? 0 : (x.extent(1) == H ? h : h / group),
           x.extent(2) == 1 ? 0 : i, x.extent(3) == 1 ? 0 : j);
}

inline kept_sets select_top(index_t B, index_t H, index_t Hk, index_t Sq, index_t Sk, index_t keep,
                     bool causal, tensor_view<const float, 4> bias,
                     tensor_view<const std::uint8_t, 4> mask) {
  kept_sets s{H, Sq, Sk, std::vector<std::uint8_t>(B * H * Sq * Sk, 0)};
  const index_t group = Hk == 0 ? 1 : H / Hk;  // (no heads: no rows)
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Sq; ++i) {
        std::vector<index_t> allowed;
        for (index_t j = 0; j < Sk; ++j) {
          if (causal && j > i + Sk - Sq) continue;
          if (mask.data() && !at(mask, b, h, i, j, H, group)) continue;
          allowed.push_back(j);
        }
        std::stable_sort(allowed.begin(), allowed.end(), [&](index_t x, index_t y) {
          return at(bias, b, h, i, x, H, group) > at(bias, b, h, i, y, H, group);
        });
        allowed.resize(std::min<index_t>(keep, index_t(allowed.size())));
        for (index_t j : allowed) s.in[((b * H + h) * Sq + i) * Sk + j] = 1;
      }
  return s;
}

/// dynamic_mask_bias's definition in f64: (B, Hk, 1, Sk) as a dense vector.
template <class TV>
std::vector<double> reference_dma_bias(tensor_view<const TV, 4> v, tensor_view<const double, 2> w_dt,
                                       const std::vector<double>& a, const std::vector<double>& dt_bias,
                                       dynamic_mask_form form) {
  const index_t B = v.extent(0), Hk = v.extent(1), Sk = v.extent(2), Dv = v.extent(3);
  std::vector<double> bias(B * Hk * Sk);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < Hk; ++h)
      for (index_t t = 0; t < Sk; ++t) {
        double dt = dt_bias.empty() ? 0.0 : dt_bias[h];
        for (index_t g = 0; g < Hk; ++g)
          for (index_t d = 0; d < Dv; ++d) dt += double(v(b, g, t, d)) * w_dt(h, g * Dv + d);
        const double x = a[h] * std::log1p(std::exp(dt));
        bias[(b * Hk + h) * Sk + t] = form == dynamic_mask_form::softplus ? x : std::exp(x);
      }
  return bias;
}

}  // namespace fovea::test
