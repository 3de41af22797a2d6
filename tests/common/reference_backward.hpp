// Gradients of softmax attention from the definitions, in accumulation type Acc (double:
// the oracle; float: the naive computation whose error sets the tolerance). Materialises
// each row's probabilities; shares the forward reference's logits (logit_of).
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "reference.hpp"

namespace fovea::test {

struct gradients {
  std::vector<double> dq, dk, dv;  ///< dense (B, H, Sq, D), (B, Hk, Sk, D), (B, Hk, Sk, Dv)
  std::vector<double> dsinks;      ///< (H)
  std::vector<double> dz;          ///< (B, H, Sq, Sk): d loss / d logit (d bias before broadcast)
};

/// d loss / d (q, k, v, sinks) for d loss / d out = dout.
template <class Acc, class T, class ScoreMod = identity_score_mod, class MaskMod = keep_all_mask_mod>
gradients reference_softmax_backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                                     tensor_view<const T, 4> v, tensor_view<const T, 4> dout,
                                     const softmax_options& o,
                                     const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), D = q.extent(3);
  const index_t Hk = k.extent(1), Sk = k.extent(2), Dv = v.extent(3);
  const index_t group = Hk == 0 ? 1 : H / Hk;
  const Acc scale = o.scale ? Acc(*o.scale) : Acc(1) / std::sqrt(Acc(D));
  gradients g{std::vector<double>(B * H * Sq * D), std::vector<double>(B * Hk * Sk * D),
              std::vector<double>(B * Hk * Sk * Dv), std::vector<double>(H),
              std::vector<double>(B * H * Sq * Sk)};
  std::vector<Acc> dq(D), p(Sk), dp(Sk);
  std::vector<Acc> dk(B * Hk * Sk * D), dv(B * Hk * Sk * Dv), dsinks(H);
  reference_row<Acc> row;
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Sq; ++i) {
        const index_t hk = h / group;
        row_weights<Acc>(q, k, o, custom, b, h, i, row);
        const auto& keep = row.keep;
        const auto& raw = row.dot;
        const Acc l = row.l;
        std::fill(dq.begin(), dq.end(), Acc(0));
        if (l == 0) continue;  // saw no key: no gradient
        // delta = dO . O (FlashAttention's D_i; equal to sum_j p_j dp_j), O in Acc
        for (index_t j = 0; j < Sk; ++j) {
          p[j] = row.e[j] / l;
          dp[j] = 0;
          if (!keep[j]) continue;
          for (index_t e = 0; e < Dv; ++e) dp[j] += Acc(dout(b, h, i, e)) * Acc(v(b, hk, j, e));
        }
        Acc delta = 0;
        for (index_t e = 0; e < Dv; ++e) {
          Acc out = 0;
          for (index_t j = 0; j < Sk; ++j)
            if (keep[j]) out += p[j] * Acc(v(b, hk, j, e));
          delta += Acc(dout(b, h, i, e)) * out;
        }
        if (o.sinks.data()) dsinks[h] -= row.sink_e / l * delta;
        for (index_t j = 0; j < Sk; ++j) {
          if (!keep[j]) continue;
          g.dz[((b * H + h) * Sq + i) * Sk + j] = double(p[j] * (dp[j] - delta));
          Acc dx = p[j] * (dp[j] - delta) * scale;
          if (o.softcap > 0) {
            const Acc t = std::tanh(scale * raw[j] / Acc(o.softcap));
            dx *= Acc(1) - t * t;
          }
          for (index_t d = 0; d < D; ++d) {
            dq[d] += dx * Acc(k(b, hk, j, d));
            dk[((b * Hk + hk) * Sk + j) * D + d] += dx * Acc(q(b, h, i, d));
          }
          for (index_t e = 0; e < Dv; ++e)
            dv[((b * Hk + hk) * Sk + j) * Dv + e] += p[j] * Acc(dout(b, h, i, e));
        }
        for (index_t d = 0; d < D; ++d) g.dq[((b * H + h) * Sq + i) * D + d] = double(dq[d]);
      }
  g.dk.assign(dk.begin(), dk.end());
  g.dv.assign(dv.begin(), dv.end());
  g.dsinks.assign(dsinks.begin(), dsinks.end());
  return g;
}

}  // namespace fovea::test
