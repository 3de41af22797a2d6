// Naive linear attention in accumulation type Acc, from the definition: the row-normalised
// (masked) phi(Q) phi(K)^T times V. Shares no code with the library's chunked engine.
#pragma once

#include <cmath>
#include <fovea/fovea.hpp>
#include <vector>

namespace fovea::test {

template <class Acc>
Acc apply_map(feature_map m, Acc x) {
  if (m == feature_map::relu) return x > 0 ? x : Acc(0);
  if (m == feature_map::identity) return x;
  return x > 0 ? x + 1 : std::exp(x);
}

template <class Acc, class T>
std::vector<double> reference_linear(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                                     tensor_view<const T, 4> v, const linear_options& o) {
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), D = q.extent(3);
  const index_t Hk = k.extent(1), Sk = k.extent(2), Dv = v.extent(3), group = Hk == 0 ? 1 : H / Hk;
  std::vector<double> out(B * H * Sq * Dv);
  std::vector<Acc> num(Dv);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Sq; ++i) {
        std::fill(num.begin(), num.end(), Acc(0));
        Acc den = 0;
        for (index_t j = 0; j < Sk; ++j) {
          if (o.causal && j > i + Sk - Sq) continue;
          Acc a = 0;
          for (index_t d = 0; d < D; ++d)
            a +=
                apply_map(o.map, Acc(q(b, h, i, d))) * apply_map(o.map, Acc(k(b, h / group, j, d)));
          den += a;
          for (index_t m = 0; m < Dv; ++m) num[m] += a * Acc(v(b, h / group, j, m));
        }
        const Acc d = den + Acc(o.eps);
        for (index_t m = 0; m < Dv; ++m)
          out[((b * H + h) * Sq + i) * Dv + m] = d == 0 ? 0.0 : double(num[m] / d);
      }
  return out;
}

}  // namespace fovea::test
