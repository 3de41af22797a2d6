// fovea::agent_attention (Han et al. 2023): m agent tokens first aggregate the values by
// softmax attention over the keys, then every query attends to the agents. Both stages
// are calls of the dense softmax engine; the cost is O(n m d) per head.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../core/error.hpp"
#include "../core/parallel.hpp"
#include "../core/storage.hpp"
#include "../core/tensor_view.hpp"
#include "../core/validate.hpp"
#include "../simd/backend.hpp"
#include "../simd/convert.hpp"
#include "../simd/row_math.hpp"
#include "checks.hpp"
#include "softmax.hpp"

namespace fovea {

struct agent_options {
  bool causal = false;            ///< causal variant: explicit (sequence-independent) agents only
  index_t num_agents = 64;        ///< m, when the agents are pooled from q
  std::optional<double> scale{};  ///< default 1/sqrt(D), both stages
  tensor_view<const float, 4>
      agent_bias{};  ///< B1, added to agent-key logits: (B|1, H|1, m|1, Sk|1)
  tensor_view<const float, 4>
      query_bias{};  ///< B2, added to query-agent logits: (B|1, H|1, Sq|1, m|1)
  /// Tokens on an (grid_h, grid_w) grid, row-major (0: no grid): agents pooled from q are
  /// then p x p (num_agents = p^2) by 2-D adaptive average pooling, and the conv term runs.
  index_t grid_h = 0, grid_w = 0;
  /// Optional depthwise 3x3 convolution of V over the grid (zero padding) added to out:
  /// weights (H, Dv, 3, 3) and bias (H, Dv); query head h convolves key/value head h / group.
  tensor_view<const float, 4> dwc_weight{};
  tensor_view<const float, 2> dwc_bias{};
  int threads = 0;
};

namespace detail {

/// agents(b, h, t) = mean of q(b, h, i) over i in [floor(t n / m), ceil((t + 1) n / m)),
/// summed in the accumulator type (f32 for bf16/fp16 q) and rounded to T once.
template <class T, class Backend>
void pool_agents(const tensor_view<const T, 4>& q, index_t m, std::vector<T>& agents) {
  using A = accumulator_t<T>;
  const index_t B = q.extent(0), H = q.extent(1), n = q.extent(2), D = q.extent(3);
  agents.assign(B * H * m * D, T(0));
  std::vector<A> sum(D);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t t = 0; t < m; ++t) {
        const index_t lo = t * n / m, hi = ((t + 1) * n + m - 1) / m;
        std::fill(sum.begin(), sum.end(), A(0));
        for (index_t i = lo; i < hi; ++i) add_row<A, Backend>(q.ptr(b, h, i, 0), sum.data(), D);
        T* a = agents.data() + ((b * H + h) * m + t) * D;
        for (index_t d = 0; d < D; ++d) a[d] = T(sum[d] / A(hi - lo));
      }
}

/// agents(b, h, r * p + c) = mean of q over the grid cell rows [floor(r H / p),
/// ceil((r + 1) H / p)) x columns likewise (2-D adaptive average pooling), summed as
/// pool_agents does.
template <class T, class Backend>
void pool_agents_2d(const tensor_view<const T, 4>& q, index_t gh, index_t gw, index_t p,
                    std::vector<T>& agents) {
  using A = accumulator_t<T>;
  const index_t B = q.extent(0), H = q.extent(1), D = q.extent(3);
  agents.assign(B * H * p * p * D, T(0));
  std::vector<A> sum(D);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t r = 0; r < p; ++r)
        for (index_t c = 0; c < p; ++c) {
          const index_t y0 = r * gh / p, y1 = ((r + 1) * gh + p - 1) / p;
          const index_t x0 = c * gw / p, x1 = ((c + 1) * gw + p - 1) / p;
          std::fill(sum.begin(), sum.end(), A(0));
          for (index_t y = y0; y < y1; ++y)
            for (index_t x = x0; x < x1; ++x)
              add_row<A, Backend>(q.ptr(b, h, y * gw + x, 0), sum.data(), D);
          T* a = agents.data() + ((b * H + h) * p * p + r * p + c) * D;
          for (index_t d = 0; d < D; ++d) a[d] = T(sum[d] / A((y1 - y0) * (x1 - x0)));
        }
}

/// out(b, h, token) += depthwise 3x3 conv of v(b, h / group) over the (gh, gw) grid.
template <class T>
void add_depthwise_conv(const tensor_view<const T, 4>& v, const tensor_view<T, 4>& out,
                        const agent_options& o) {
  const index_t B = out.extent(0), H = out.extent(1), Dv = out.extent(3);
  const index_t group = H / v.extent(1), gh = o.grid_h, gw = o.grid_w;
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t y = 0; y < gh; ++y)
        for (index_t x = 0; x < gw; ++x)
          for (index_t e = 0; e < Dv; ++e) {
            T sum = o.dwc_bias.data() ? T(o.dwc_bias(h, e)) : T(0);
            for (index_t dy = -1; dy <= 1; ++dy)
              for (index_t dx = -1; dx <= 1; ++dx) {
                const index_t yy = y + dy, xx = x + dx;
                if (yy < 0 || yy >= gh || xx < 0 || xx >= gw) continue;
                sum += T(o.dwc_weight(h, e, dy + 1, dx + 1)) * v(b, h / group, yy * gw + xx, e);
              }
            out(b, h, y * gw + x, e) += sum;
          }
}

/// The grid and conv options against q's and v's shapes.
inline void check_grid_options(const agent_options& o, index_t H, index_t Sq, index_t Sk,
                               index_t Dv) {
  require(o.grid_h >= 0 && o.grid_w >= 0 && (o.grid_h == 0) == (o.grid_w == 0),
          "options.grid_h, grid_w: are (", o.grid_h, ", ", o.grid_w,
          "), expected both 0 or both >= 1");
  const bool conv = o.dwc_weight.data() != nullptr || !o.dwc_weight.empty();
  if (!conv) {
    require(o.dwc_bias.data() == nullptr, "options.dwc_bias: given without dwc_weight");
    return;
  }
  require(!o.causal, "options.dwc_weight: the conv term mixes future tokens; not with causal");
  require(o.grid_h >= 1, "options.dwc_weight: needs the token grid (options.grid_h, grid_w)");
  require(Sq == o.grid_h * o.grid_w && Sk == Sq, "options.grid_h, grid_w: a ", o.grid_h, " x ",
          o.grid_w, " grid does not hold the ", Sq, " queries and ", Sk, " keys");
  check_data(o.dwc_weight, "options.dwc_weight");
  const index_t want[4] = {H, Dv, 3, 3};
  for (std::size_t r = 0; r < 4; ++r)
    require(o.dwc_weight.extent(r) == want[r], "options.dwc_weight: extent ", r, " is ",
            o.dwc_weight.extent(r), ", expected ", want[r], " (H, Dv, 3, 3)");
  if (o.dwc_bias.data() != nullptr || !o.dwc_bias.empty()) {
    check_data(o.dwc_bias, "options.dwc_bias");
    require(o.dwc_bias.extent(0) == H && o.dwc_bias.extent(1) == Dv, "options.dwc_bias: is (",
            o.dwc_bias.extent(0), ", ", o.dwc_bias.extent(1), "), expected (", H, ", ", Dv, ")");
  }
}

template <class T>
void agent_stages(const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
                  const tensor_view<const T, 4>& v, const tensor_view<T, 4>& out,
                  const tensor_view<const T, 4>& agents, const agent_options& o, auto run_softmax) {
  const index_t B = q.extent(0), H = q.extent(1), m = agents.extent(2), Dv = v.extent(3);
  std::vector<T> agent_values(B * H * m * Dv);
  const auto VA = bhsd(agent_values.data(), B, H, m, Dv);
  softmax_options first{.scale = o.scale, .threads = o.threads};
  first.bias = o.agent_bias;
  run_softmax(agents, k, v, VA, first);
  softmax_options second{.scale = o.scale, .threads = o.threads};
  second.bias = o.query_bias;
  run_softmax(q, agents, tensor_view<const T, 4>(VA), out, second);
  if (o.dwc_weight.data()) add_depthwise_conv(v, out, o);
}

/// The causal variant's state for one (batch, head): per agent t a running max, the
/// softmax denominator and the unnormalised value sum over the keys seen so far.
template <class T>
struct agent_prefix {
  T* max;  ///< [m]
  T* sum;  ///< [m]
  T* acc;  ///< [m][Dv]
};

/// Absorbs key j (row k, values v, both in A and padded) into every agent's prefix
/// softmax: logit scale * a_t . k + B1(t, j), rescaling when a new maximum arrives; -inf
/// logits skip. Agents are rows of dp, accumulators rows of dvp.
template <class A, class Backend, class Bias>
void absorb_key(const A* agents, index_t m, index_t dp, index_t dvp, A scale, const A* k,
                const A* v, Bias&& b1, index_t j, agent_prefix<A> st) noexcept {
  using V = vec<A, Backend>;
  for (index_t t = 0; t < m; ++t) {
    const A logit = scale * dot_row<A, Backend>(agents + t * dp, k, dp) + b1(t, j);
    if (logit == -std::numeric_limits<A>::infinity()) continue;
    A* acc = st.acc + t * dvp;
    A rescale = 1;
    if (logit > st.max[t]) {
      rescale = std::exp(st.max[t] - logit);
      st.max[t] = logit;
    }
    const A w = std::exp(logit - st.max[t]);
    st.sum[t] = st.sum[t] * rescale + w;
    const auto r = V::broadcast(rescale), wv = V::broadcast(w);
    for (index_t e = 0; e < dvp; e += V::width)
      V::store(acc + e, V::fma(wv, V::load(v + e), V::mul(V::load(acc + e), r)));
  }
}

/// out = softmax_t(scale * q . a_t + B2(i, t)) (acc_t / sum_t), agents without a key
/// counting as zero vectors; probs: m scratch, mix: dvp scratch.
template <class A, class Backend, class S, class Bias>
void agent_output(const A* agents, index_t m, index_t dp, index_t Dv, index_t dvp, A scale,
                  const A* q, Bias&& b2, index_t i, agent_prefix<A> st, A* probs, A* mix,
                  S* out) noexcept {
  using V = vec<A, Backend>;
  A top = -std::numeric_limits<A>::infinity();
  for (index_t t = 0; t < m; ++t) {
    probs[t] = scale * dot_row<A, Backend>(agents + t * dp, q, dp) + b2(i, t);
    top = std::max(top, probs[t]);
  }
  A total = 0;
  std::fill(mix, mix + dvp, A(0));
  for (index_t t = 0; t < m; ++t) {
    const A p = probs[t] == -std::numeric_limits<A>::infinity() ? A(0) : std::exp(probs[t] - top);
    total += p;
    if (!(st.sum[t] > A(0) || st.sum[t] != st.sum[t])) continue;  // no key yet (NaN: keep)
    const auto c = V::broadcast(p / st.sum[t]);
    for (index_t e = 0; e < dvp; e += V::width)
      V::store(mix + e, V::fma(c, V::load(st.acc + t * dvp + e), V::load(mix + e)));
  }
  for (index_t e = 0; e < Dv; ++e)
    out[e] = total == A(0) ? S(0) : S(mix[e] / total);  // NaN stays NaN
}

/// Row lengths padded to whole vectors of the accumulation type.
template <class S, class Backend>
index_t padded_row(index_t n) noexcept {
  constexpr index_t W = vec<accumulator_t<S>, Backend>::width;
  return (n + W - 1) / W * W;
}

/// Runs the causal variant over q's tokens for every (batch, head): keys [0, first_key)
/// are absorbed first; then token i absorbs key first_key + i (when present) and emits its
/// output. `state(b, h)` gives the prefix state (accumulators of padded_row(Dv)); agents
/// (B, H, m, D).
template <class Backend, class S, class GetState>
void run_agent_causal(const tensor_view<const S, 4>& q, const tensor_view<const S, 4>& k,
                      const tensor_view<const S, 4>& v, const tensor_view<S, 4>& out,
                      const tensor_view<const S, 4>& agents, index_t first_key,
                      const agent_options& o, GetState&& state) {
  using A = accumulator_t<S>;
  const index_t B = q.extent(0), H = q.extent(1), Sq = q.extent(2), D = q.extent(3);
  const index_t Hk = k.extent(1), Sk = k.extent(2), Dv = v.extent(3), m = agents.extent(2);
  const index_t group = Hk == 0 ? 1 : H / Hk;
  const index_t dp = padded_row<S, Backend>(D), dvp = padded_row<S, Backend>(Dv);
  const A scale = A(o.scale.value_or(1.0 / std::sqrt(double(D))));
  const int threads = resolve_threads(o.threads);
  const int used = int(std::min<index_t>(std::max(threads, 1), std::max<index_t>(1, B * H)));
  const index_t per_thread = m * dp + m + 2 * dp + 2 * dvp;
  std::vector<A> scratch(std::size_t(used) * per_thread);
  parallel_for(B * H, used, [&](index_t bh, int thread) {
    const index_t b = bh / H, h = bh % H, hk = h / group;
    A* a = scratch.data() + std::size_t(thread) * per_thread;
    A* probs = a + m * dp;
    A* row = probs + m;   // a key or query row, padded
    A* vrow = row + dp;   // a value row, padded
    A* mix = vrow + dvp;  // the output row being mixed
    auto load = [](const S* src, index_t n, index_t padded, A* dst) {
      convert_row(src, dst, n);
      std::fill(dst + n, dst + padded, A(0));
    };
    for (index_t t = 0; t < m; ++t) load(agents.ptr(b, h, t, 0), D, dp, a + t * dp);
    const auto b1 = bind_plane(o.agent_bias, b, h, H, 1);
    const auto b2 = bind_plane(o.query_bias, b, h, H, 1);
    auto bias1 = [&](index_t t, index_t j) { return b1.base ? A(b1(t, j)) : A(0); };
    auto bias2 = [&](index_t i, index_t t) { return b2.base ? A(b2(i, t)) : A(0); };
    const agent_prefix<A> st = state(b, h);
    auto absorb = [&](index_t j) {
      load(k.ptr(b, hk, j, 0), D, dp, row);
      load(v.ptr(b, hk, j, 0), Dv, dvp, vrow);
      absorb_key<A, Backend>(a, m, dp, dvp, scale, row, vrow, bias1, j, st);
    };
    for (index_t j = 0; j < std::min(first_key, Sk); ++j) absorb(j);
    for (index_t i = 0; i < Sq; ++i) {
      if (first_key + i >= 0 && first_key + i < Sk) absorb(first_key + i);  // Sq > Sk: none yet
      load(q.ptr(b, h, i, 0), D, dp, row);
      agent_output<A, Backend>(a, m, dp, Dv, dvp, scale, row, bias2, i, st, probs, mix,
                               out.ptr(b, h, i, 0));
    }
  });
}

}  // namespace detail

/// Agent attention with m agents pooled from q (1-D adaptive average pooling of the
/// unscaled queries over the sequence), or given explicitly (the overload with `agents`):
///
///   VA  = softmax(scale * A K^T + B1) V        (B, H, m, Dv)
///   out = softmax(scale * Q A^T + B2) VA       (B, H, Sq, Dv)
///
///   q: (B, H, Sq, D)   k: (B, Hk, Sk, D)   v: (B, Hk, Sk, Dv)   agents: (B, H, m, D)
///
/// Hk divides H. float, double, bf16 or fp16 (accumulated in at least float).
/// Both stages are softmax_attention calls, with its numerical contract (an agent that
/// sees no key contributes a zero vector).
///
/// Causal (options.causal, explicit agents only, as they must not depend on future
/// queries): query i (at key position i + Sk - Sq) uses each agent's softmax aggregate over
/// the keys j <= i + Sk - Sq only, kept as an online-softmax state per agent (O(m Dv) per
/// head, see agent_state for decoding); O(n m (D + Dv)) per head.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO, class TA>
requires detail::attention_types<TQ, TK, TV, TO> && std::is_same_v<std::remove_const_t<TA>, TO>
void agent_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                     tensor_view<TO, 4> out, tensor_view<TA, 4> agents,
                     const agent_options& options = {}) {
  using T = TO;
  using namespace detail;
  const tensor_view<const T, 4> cq = q, ck = k, cv = v, ca = agents;
  check_qkvo(cq, ck, cv, out);
  check_rows(ca, "agents");
  check_extent(ca, 0, q.extent(0), "agents", "batch of q");
  check_extent(ca, 1, q.extent(1), "agents", "heads of q");
  check_extent(ca, 3, q.extent(3), "agents", "head dim of q");
  require(options.threads >= 0, "options.threads: is ", options.threads, ", expected >= 0");
  check_no_alias(out, "out", ca, "agents");
  const index_t B = q.extent(0), H = q.extent(1), m = ca.extent(2);
  check_broadcast(options.agent_bias, "options.agent_bias", B, H, H, m, k.extent(2));
  check_broadcast(options.query_bias, "options.query_bias", B, H, H, q.extent(2), m);
  check_scalar_options(softmax_options{.scale = options.scale}, q.extent(3));
  check_grid_options(options, H, q.extent(2), k.extent(2), v.extent(3));
  check_no_alias(out, "out", options.dwc_weight, "options.dwc_weight");
  if (options.causal) {
    using A = accumulator_t<T>;
    const index_t dvp = padded_row<T, Backend>(v.extent(3)), n = B * H * m;
    std::vector<A> prefix(std::size_t(n * (dvp + 2)), A(0));
    std::fill(prefix.begin(), prefix.begin() + n, -std::numeric_limits<A>::infinity());
    run_agent_causal<Backend>(
        cq, ck, cv, out, ca, ck.extent(2) - cq.extent(2), options, [&](index_t b, index_t h) {
          A* base = prefix.data();
          const index_t at = (b * H + h) * m;
          return agent_prefix<A>{base + at, base + n + at, base + 2 * n + at * dvp};
        });
    return;
  }
  agent_stages<T>(cq, ck, cv, out, ca, options,
                  [](auto a, auto b, auto c, auto d, const softmax_options& o) {
                    softmax_attention<Backend>(a, b, c, d, o);
                  });
}

template <class Backend = default_backend, class TQ, class TK, class TV, class TO>
requires detail::attention_types<TQ, TK, TV, TO>
void agent_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                     tensor_view<TO, 4> out, const agent_options& options = {}) {
  using T = TO;
  detail::require(options.num_agents >= 1, "options.num_agents: is ", options.num_agents,
                  ", expected >= 1");
  detail::require(!options.causal,
                  "options.causal: agents pooled from q would see future queries; pass "
                  "sequence-independent agents explicitly for the causal variant");
  const tensor_view<const T, 4> cq = q;
  detail::check_rows(cq, "q");
  detail::check_grid_options(options, q.extent(1), q.extent(2), k.extent(2), v.extent(3));
  std::vector<T> agents;
  if (options.grid_h > 0) {  // p x p agents over the grid
    const auto p = index_t(std::lround(std::sqrt(double(options.num_agents))));
    detail::require(p * p == options.num_agents, "options.num_agents: is ", options.num_agents,
                    ", expected a square (p x p agents) with a token grid");
    detail::require(options.grid_h * options.grid_w == q.extent(2), "options.grid_h, grid_w: a ",
                    options.grid_h, " x ", options.grid_w, " grid does not hold the ", q.extent(2),
                    " queries");
    detail::pool_agents_2d<T, Backend>(cq, options.grid_h, options.grid_w, p, agents);
  } else {
    detail::pool_agents<T, Backend>(cq, options.num_agents, agents);
  }
  agent_attention<Backend>(
      q, k, v, out, bhsd(agents.data(), q.extent(0), q.extent(1), options.num_agents, q.extent(3)),
      options);
}

/// The causal agent variant's decoding state: the agents (B, H, m, D) and, per agent, the
/// online-softmax aggregate of the keys seen so far. step() appends tokens and returns
/// their outputs; stepping token by token gives the causal batch result bit for bit.
template <class T, class Backend = default_backend>
class agent_state {
  using A = accumulator_t<T>;

 public:
  template <class TA>
  explicit agent_state(tensor_view<TA, 4> agents, index_t value_dim)
      : B_(agents.extent(0)),
        H_(agents.extent(1)),
        m_(agents.extent(2)),
        D_(agents.extent(3)),
        Dv_(value_dim),
        agents_(std::size_t(B_ * H_ * m_ * D_)) {
    const tensor_view<const T, 4> a = agents;
    detail::check_rows(a, "agents");
    detail::require(value_dim >= 0, "value_dim: is ", value_dim, ", expected >= 0");
    for (index_t b = 0; b < B_; ++b)
      for (index_t h = 0; h < H_; ++h)
        for (index_t t = 0; t < m_; ++t)
          for (index_t d = 0; d < D_; ++d)
            agents_[((b * H_ + h) * m_ + t) * D_ + d] = a(b, h, t, d);
    reset();
  }
  void reset() {
    const index_t dvp = detail::padded_row<T, Backend>(Dv_);
    prefix_.assign(std::size_t(B_ * H_ * m_ * (dvp + 2)), A(0));
    std::fill(prefix_.begin(), prefix_.begin() + B_ * H_ * m_, -std::numeric_limits<A>::infinity());
    tokens_ = 0;
  }
  index_t tokens() const noexcept { return tokens_; }

  /// Appends n tokens: q (B, H, n, D), k (B, Hk, n, D), v (B, Hk, n, Dv) -> out (B, H, n, Dv).
  /// Token t of the step sees every earlier token and itself. Biases index the step's own
  /// rows (B1: (B|1, H|1, m|1, n|1), B2: (B|1, H|1, n|1, m|1)); options.causal is implied.
  template <class TQ, class TK, class TV>
  void step(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v, tensor_view<T, 4> out,
            const agent_options& options = {}) {
    const tensor_view<const T, 4> cq = q, ck = k, cv = v;
    detail::check_qkvo(cq, ck, cv, out);
    detail::require(
        q.extent(0) == B_ && q.extent(1) == H_ && q.extent(3) == D_ && v.extent(3) == Dv_,
        "q: shape does not match the state (batch ", B_, ", heads ", H_, ", dim ", D_,
        ", value dim ", Dv_, ")");
    detail::require(q.extent(2) == k.extent(2), "k: extent 2 (seq) is ", k.extent(2),
                    ", expected the ", q.extent(2), " tokens of q");
    detail::check_broadcast(options.agent_bias, "options.agent_bias", B_, H_, H_, m_, k.extent(2));
    detail::check_broadcast(options.query_bias, "options.query_bias", B_, H_, H_, q.extent(2), m_);
    detail::check_scalar_options(softmax_options{.scale = options.scale}, D_);
    detail::require(options.threads >= 0, "options.threads: is ", options.threads,
                    ", expected >= 0");
    const auto agents = bhsd<const T>(agents_.data(), B_, H_, m_, D_);
    const index_t n = B_ * H_ * m_, dvp = detail::padded_row<T, Backend>(Dv_);
    detail::run_agent_causal<Backend>(
        cq, ck, cv, out, agents, 0, options, [&](index_t b, index_t h) {
          const index_t at = (b * H_ + h) * m_;
          return detail::agent_prefix<A>{prefix_.data() + at, prefix_.data() + n + at,
                                         prefix_.data() + 2 * n + at * dvp};
        });
    tokens_ += q.extent(2);
  }

 private:
  index_t B_, H_, m_, D_, Dv_, tokens_ = 0;
  std::vector<T> agents_;
  std::vector<A> prefix_;  ///< per agent: max [m], sum [m], then acc [m][padded Dv]
};

}  // namespace fovea
