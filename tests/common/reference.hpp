// Naive softmax attention over materialised scores, in accumulation type Acc: Acc =
// double is the oracle; Acc = float is the "naive f32" whose error sets the tolerance.
// Written from the definitions, sharing no code with the library's engine.
#pragma once

#include <cmath>
#include <cstdint>
#include <fovea/fovea.hpp>
#include <limits>
#include <type_traits>
#include <vector>

namespace fovea::test {

struct attention_result {
  std::vector<double> out;  ///< (B, H, Sq, Dv) dense
  std::vector<double> lse;  ///< (B, H, Sq) dense
};

/// The logit of query (b, h, i) for key j from the definitions (scale, soft-cap, ALiBi,
/// bias, score_mod, then the band, mask and mask_mod hide it): {logit, visible, q . k}.
template <class Acc>
struct reference_logit {
  Acc x;
  bool visible;
  Acc dot;
};

template <class Acc, class T, class ScoreMod, class MaskMod>
reference_logit<Acc> logit_of(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                              const softmax_options& o, const custom_variant<ScoreMod, MaskMod>& custom,
                              index_t b, index_t h, index_t i, index_t j) {
  constexpr Acc inf = std::numeric_limits<Acc>::infinity();
  const index_t H = q.extent(1), Sq = q.extent(2), D = q.extent(3);
  const index_t Hk = k.extent(1), Sk = k.extent(2);
  const index_t group = Hk == 0 ? 1 : H / Hk, hk = h / group;
  const Acc scale = o.scale ? Acc(*o.scale) : Acc(1) / std::sqrt(Acc(D));
  const index_t off = o.align == diagonal::bottom_right ? Sk - Sq : 0;
  auto pick = [](index_t extent, index_t idx) { return extent == 1 ? 0 : idx; };
  auto head_of = [&](index_t extent, index_t h) {
    return extent == 1 ? 0 : (extent == H ? h : h / group);
  };
  bool visible = true;
  if (o.causal && j > i + off) visible = false;
  if (o.window_left >= 0 && j < i + off - o.window_left) visible = false;
  if (o.window_right >= 0 && j > i + off + o.window_right) visible = false;
  Acc dot = 0;
  for (index_t d = 0; d < D; ++d) dot += Acc(q(b, h, i, d)) * Acc(k(b, hk, j, d));
  Acc x = scale * dot;
  if (o.softcap > 0) x = Acc(o.softcap) * std::tanh(x / Acc(o.softcap));
  if (o.alibi_slopes.data())
    x -= Acc(o.alibi_slopes(pick(o.alibi_slopes.extent(0), b), h)) *
         Acc(std::abs(double(i + off - j)));
  if (o.bias.data()) {
    const auto& bv = o.bias;
    const Acc bias = Acc(bv(pick(bv.extent(0), b), head_of(bv.extent(1), h),
                            pick(bv.extent(2), i), pick(bv.extent(3), j)));
    if (bias == -inf) visible = false;
    x += bias;
  }
  if constexpr (!std::is_same_v<ScoreMod, identity_score_mod>)
    x = Acc(custom.score_mod(x, b, h, i, j));
  if (o.mask.data()) {
    const auto& mv = o.mask;
    if (!mv(pick(mv.extent(0), b), head_of(mv.extent(1), h), pick(mv.extent(2), i),
            pick(mv.extent(3), j)))
      visible = false;
  }
  if constexpr (!std::is_same_v<MaskMod, keep_all_mask_mod>)
    if (!custom.mask_mod(b, h, i, j)) visible = false;
  return {x, visible && x != -inf, dot};
}

/// One row's softmax weights: e[j] = exp(logit_j - m) for the keys it sees (0 for the
/// others), sink_e the sink's term, l = their sum (0: the row sees nothing), dot[j] = q . k.
template <class Acc>
struct reference_row {
  std::vector<Acc> e, dot;
  std::vector<bool> keep;
  Acc sink_e = 0, l = 0, m = 0;  ///< m: the largest logit (sink included) e is relative to
};

template <class Acc, class T, class ScoreMod, class MaskMod>
void row_weights(tensor_view<const T, 4> q, tensor_view<const T, 4> k, const softmax_options& o,
                 const custom_variant<ScoreMod, MaskMod>& custom, index_t b, index_t h, index_t i,
                 reference_row<Acc>& row) {
  constexpr Acc inf = std::numeric_limits<Acc>::infinity();
  const index_t Sk = k.extent(2);
  row.e.resize(Sk);
  row.dot.resize(Sk);
  row.keep.resize(Sk);
  Acc m = -inf;
  for (index_t j = 0; j < Sk; ++j) {
    const auto z = logit_of<Acc>(q, k, o, custom, b, h, i, j);
    row.keep[j] = z.visible;
    row.e[j] = z.x;
    row.dot[j] = z.dot;
    if (z.visible && z.x > m) m = z.x;  // a NaN logit poisons l below, not m
  }
  const bool sink = o.sinks.data() != nullptr;
  const Acc sink_logit = sink ? Acc(o.sinks(h)) : -inf;
  const Acc m_all = sink && sink_logit > m ? sink_logit : m;
  row.m = m_all;
  row.sink_e = sink ? std::exp(sink_logit - m_all) : Acc(0);
  row.l = row.sink_e;
  for (index_t j = 0; j < Sk; ++j) {
    row.e[j] = row.keep[j] ? std::exp(row.e[j] - m_all) : Acc(0);
    row.l += row.e[j];
  }
}

template <class Acc, class T, class ScoreMod = identity_score_mod,
          class MaskMod = keep_all_mask_mod>
attention_result reference_softmax(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                                   tensor_view<const T, 4> v, const softmax_options& o,
                                   const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  constexpr Acc inf = std::numeric_limits<Acc>::infinity();
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2);
  const index_t Hk = k.extent(1), Sk = k.extent(2), Dv = v.extent(3);
  const index_t group = Hk == 0 ? 1 : H / Hk;

  attention_result r{std::vector<double>(B * H * Sq * Dv), std::vector<double>(B * H * Sq)};
  reference_row<Acc> row;
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Sq; ++i) {
        const index_t hk = h / group;
        row_weights<Acc>(q, k, o, custom, b, h, i, row);
        const auto& s = row.e;
        const auto& keep = row.keep;
        const Acc l = row.l;
        double* out = r.out.data() + ((b * H + h) * Sq + i) * Dv;  // Dv may be 0
        for (index_t d = 0; d < Dv; ++d) {
          Acc acc = 0;
          for (index_t j = 0; j < Sk; ++j)
            if (keep[j]) acc += s[j] * Acc(v(b, hk, j, d));
          out[d] = l == 0 ? 0.0 : double(acc / l);
        }
        r.lse[(b * H + h) * Sq + i] = l == 0 ? -double(inf) : double(row.m + std::log(l));
      }
  return r;
}

}  // namespace fovea::test
