// fovea::linear_attention (Katharopoulos et al. 2020) and fovea::linear_state, its
// recurrent form for decoding.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/parallel.hpp"
#include "../core/tensor_view.hpp"
#include "../engine/linear/linear.hpp"
#include "../engine/linear/linear_backward.hpp"
#include "../simd/backend.hpp"
#include "checks.hpp"

namespace fovea {

/// The feature map phi applied to each row of q and k.
enum class feature_map {
  elu_plus_one,  ///< elu(x) + 1 (the paper's default)
  relu,          ///< max(x, 0); a row whose normaliser is 0 outputs 0
  identity,      ///< x, for callers that apply their own map
  favor,         ///< Performer's positive orthogonal random features (FAVOR+), seeded
};

constexpr const char* to_string(feature_map m) noexcept {
  return m == feature_map::elu_plus_one ? "elu_plus_one"
         : m == feature_map::relu       ? "relu"
         : m == feature_map::favor      ? "favor"
                                        : "identity";
}

struct linear_options {
  bool causal = false;  ///< query i sees keys j <= i + Sk - Sq (bottom-right)
  feature_map map = feature_map::elu_plus_one;
  double eps = 1e-6;             ///< added to the normaliser; finite, >= 0
  index_t favor_features = 256;  ///< m, features of the favor map (even, >= 2)
  std::uint64_t seed = 0;        ///< seeds the favor map's projections
  int threads = 0;               ///< 0: all OpenMP offers; 1: serial
};

/// The built-in maps as functors: void(const T* x, T* y, index_t n) writes phi(x) to y,
/// vectorised with Backend's vector API.
namespace feature_maps {
template <class Backend = default_backend>
struct elu_plus_one {
  template <class T>
  FOVEA_ALWAYS_INLINE void operator()(const T* x, T* y, index_t n) const noexcept {
    using V = detail::vec<T, Backend>;
    constexpr int W = V::width;
    const auto zero = V::broadcast(T(0)), one = V::broadcast(T(1));
    index_t i = 0;
    for (; i + W <= n; i += W) {
      const auto v = V::load(x + i);
      // elu(v) + 1 = v + 1 for v > 0, exp(v) otherwise (exp of min(v, 0) never overflows)
      const auto positive = V::not_equal(V::max(v, zero), zero);
      V::store(y + i, V::select(positive, V::add(v, one), V::exp(V::sub(v, V::max(v, zero)))));
    }
    for (; i < n; ++i) y[i] = x[i] > T(0) ? x[i] + T(1) : std::exp(x[i]);
  }
  /// dx = dy * phi'(x): 1 for x > 0, exp(x) otherwise.
  template <class T>
  void vjp(const T* x, const T* dy, T* dx, index_t n) const noexcept {
    using V = detail::vec<T, Backend>;
    constexpr int W = V::width;
    const auto zero = V::broadcast(T(0)), one = V::broadcast(T(1));
    index_t i = 0;
    for (; i + W <= n; i += W) {
      const auto v = V::load(x + i);
      const auto positive = V::not_equal(V::max(v, zero), zero);
      V::store(dx + i, V::mul(V::load(dy + i),
                              V::select(positive, one, V::exp(V::sub(v, V::max(v, zero))))));
    }
    for (; i < n; ++i) dx[i] = dy[i] * (x[i] > T(0) ? T(1) : std::exp(x[i]));
  }
};
template <class Backend = default_backend>
struct relu {
  template <class T>
  void operator()(const T* x, T* y, index_t n) const noexcept {
    for (index_t i = 0; i < n; ++i) y[i] = x[i] > T(0) ? x[i] : T(0);
  }
  /// dx = dy for x > 0, else 0 (the subgradient 0 at x = 0, as PyTorch's).
  template <class T>
  void vjp(const T* x, const T* dy, T* dx, index_t n) const noexcept {
    for (index_t i = 0; i < n; ++i) dx[i] = x[i] > T(0) ? dy[i] : T(0);
  }
};
template <class Backend = default_backend>
struct identity {
  template <class T>
  void operator()(const T* x, T* y, index_t n) const noexcept {
    for (index_t i = 0; i < n; ++i) y[i] = x[i];
  }
  template <class T>
  void vjp(const T*, const T* dy, T* dx, index_t n) const noexcept {
    for (index_t i = 0; i < n; ++i) dx[i] = dy[i];
  }
};

/// FAVOR+ (Choromanski et al., Performer): with x' = x / D^(1/4) and m/2 projections w,
///   phi(x) = [exp(w.x' - |x'|^2/2), exp(-w.x' - |x'|^2/2)] / sqrt(m),
/// positive features whose products estimate exp(q.k / sqrt(D)), i.e. softmax attention.
/// The projections are given ((m/2) x D, row-major) or drawn from a seed: blocks of
/// orthogonalised Gaussian rows rescaled to chi-distributed norms (orthogonal random
/// features), so the map is reproducible.
class favor {
 public:
  favor(index_t dim, std::vector<double> projections)
      : dim_(dim),
        half_(index_t(projections.size()) / std::max<index_t>(dim, 1)),
        w_(std::move(projections)) {
    detail::require(dim >= 1 && half_ >= 1 && index_t(w_.size()) == half_ * dim,
                    "favor: projections must be (m/2) x dim with m/2 >= 1 rows");
  }
  static favor random(index_t dim, index_t features, std::uint64_t seed, bool orthogonal = true) {
    detail::require(dim >= 1, "favor: dim is ", dim, ", expected >= 1");
    detail::require(features >= 2 && features % 2 == 0, "options.favor_features: is ", features,
                    ", expected an even number >= 2");
    const index_t half = features / 2;
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> g;
    std::vector<double> w(half * dim);
    for (index_t r0 = 0; r0 < half; r0 += dim) {  // one block of up to dim orthogonal rows
      const index_t rows = std::min(dim, half - r0);
      std::vector<double> block(dim * dim);
      for (double& x : block) x = g(gen);
      for (index_t r = 0; r < dim && orthogonal; ++r) {  // Gram-Schmidt
        double* row = block.data() + r * dim;
        for (index_t p = 0; p < r; ++p) {
          const double* prev = block.data() + p * dim;
          double dot = 0;
          for (index_t e = 0; e < dim; ++e) dot += row[e] * prev[e];
          for (index_t e = 0; e < dim; ++e) row[e] -= dot * prev[e];
        }
        double n = 0;
        for (index_t e = 0; e < dim; ++e) n += row[e] * row[e];
        for (index_t e = 0; e < dim; ++e) row[e] /= std::sqrt(n);
      }
      for (index_t r = 0; r < rows; ++r) {
        double chi = 0;  // the norm a Gaussian row would have
        for (index_t e = 0; e < dim; ++e) {
          const double x = g(gen);
          chi += x * x;
        }
        const double scale = orthogonal ? std::sqrt(chi) : 1.0;
        for (index_t e = 0; e < dim; ++e) w[(r0 + r) * dim + e] = block[r * dim + e] * scale;
      }
    }
    return favor(dim, std::move(w));
  }
  index_t features(index_t) const noexcept { return 2 * half_; }
  const std::vector<double>& projections() const noexcept { return w_; }

  template <class T>
  void operator()(const T* x, T* y, index_t n) const noexcept {
    const double c = std::pow(double(n), -0.25), log_m = 0.5 * std::log(double(2 * half_));
    double sq = 0;
    for (index_t e = 0; e < n; ++e) sq += double(x[e]) * double(x[e]);
    const double base = -0.5 * sq * c * c - log_m;
    for (index_t f = 0; f < half_; ++f) {
      double dot = 0;
      const double* w = w_.data() + f * dim_;
      for (index_t e = 0; e < n; ++e) dot += w[e] * double(x[e]);
      y[f] = T(std::exp(dot * c + base));
      y[half_ + f] = T(std::exp(-dot * c + base));
    }
  }
  /// dx = J^T dy with dy_f over the m features: for y+_f = exp(c w_f.x + base) and
  /// y-_f = exp(-c w_f.x + base), base = -c^2 |x|^2 / 2 - log(m) / 2, c = n^(-1/4):
  /// dx = c sum_f w_f (dy+_f y+_f - dy-_f y-_f) - c^2 x sum_f (dy_f y_f), in double.
  template <class T>
  void vjp(const T* x, const T* dy, T* dx, index_t n) const noexcept {
    const double c = std::pow(double(n), -0.25), log_m = 0.5 * std::log(double(2 * half_));
    double sq = 0;
    for (index_t e = 0; e < n; ++e) sq += double(x[e]) * double(x[e]);
    const double base = -0.5 * sq * c * c - log_m;
    double total = 0;
    for (index_t e = 0; e < n; ++e) dx[e] = T(0);
    std::vector<double> acc(std::size_t(n), 0.0);
    for (index_t f = 0; f < half_; ++f) {
      double dot = 0;
      const double* w = w_.data() + f * dim_;
      for (index_t e = 0; e < n; ++e) dot += w[e] * double(x[e]);
      const double plus = double(dy[f]) * std::exp(dot * c + base);
      const double minus = double(dy[half_ + f]) * std::exp(-dot * c + base);
      total += plus + minus;
      for (index_t e = 0; e < n; ++e) acc[e] += w[e] * (plus - minus);
    }
    for (index_t e = 0; e < n; ++e) dx[e] = T(c * acc[e] - c * c * double(x[e]) * total);
  }

 private:
  index_t dim_, half_;
  std::vector<double> w_;
};
}  // namespace feature_maps

namespace detail {

inline void check_linear_options(const linear_options& o) {
  require(std::isfinite(o.eps) && o.eps >= 0, "options.eps: is ", o.eps,
          ", expected a finite value >= 0");
  require(o.threads >= 0, "options.threads: is ", o.threads, ", expected >= 0");
  require(o.map == feature_map::elu_plus_one || o.map == feature_map::relu ||
              o.map == feature_map::identity || o.map == feature_map::favor,
          "options.map: is not a feature_map value");
  require(o.map != feature_map::favor || (o.favor_features >= 2 && o.favor_features % 2 == 0),
          "options.favor_features: is ", o.favor_features, ", expected an even number >= 2");
}

/// Calls run(phi) with the map options.map names, for rows of dim d.
template <class Backend, class T, class Run>
void with_feature_map(const linear_options& o, index_t d, Run&& run) {
  const feature_map m = o.map;
  if (m == feature_map::favor)
    run(feature_maps::favor::random(std::max<index_t>(d, 1), o.favor_features, o.seed));
  else if (m == feature_map::relu)
    run(feature_maps::relu<Backend>{});
  else if (m == feature_map::identity)
    run(feature_maps::identity<Backend>{});
  else
    run(feature_maps::elu_plus_one<Backend>{});
}

template <class T>
inline constexpr bool is_linear_type_v =
    std::is_same_v<std::remove_const_t<T>, float> || std::is_same_v<std::remove_const_t<T>, double>;

}  // namespace detail

/// Linear attention: out_i = phi(q_i)^T S / (phi(q_i) . z + eps), where S = sum phi(k_j) v_j^T
/// and z = sum phi(k_j) over all keys, or (causal) over keys j <= i + Sk - Sq.
///
///   q: (B, H, Sq, D)   k: (B, Hk, Sk, D)   v: (B, Hk, Sk, Dv)   out: (B, H, Sq, Dv)
///
/// Hk divides H. float or double only (bf16/fp16 are rejected at compile time: see the
/// README's type table), accumulated in that type; any strides with innermost
/// stride 1. The causal form is computed in chunks of 64 keys (masked quadratic inside a
/// chunk, state products between chunks). A row whose normaliser (plus eps) is 0 outputs
/// 0. Keys a causal query cannot see are skipped, so NaN/Inf in them never reaches it.
/// Bitwise the same for every thread count. Bad arguments throw fovea::error first.
/// `phi` (optional) is a functor void(const T* x, T* y, index_t n) that replaces
/// options.map.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO>
requires(detail::attention_types<TQ, TK, TV, TO>&& detail::is_linear_type_v<
         TO>) void linear_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k,
                                    tensor_view<TV, 4> v, tensor_view<TO, 4> out,
                                    const linear_options& options = {}) {
  detail::check_linear_options(options);
  detail::with_feature_map<Backend, TO>(options, q.extent(3), [&](const auto& phi) {
    linear_attention<Backend>(q, k, v, out, options, phi);
  });
}

template <class Backend = default_backend, class TQ, class TK, class TV, class TO, class FeatureMap>
requires(detail::attention_types<TQ, TK, TV, TO>&&
             detail::is_linear_type_v<TO>) void linear_attention(tensor_view<TQ, 4> q,
                                                                 tensor_view<TK, 4> k,
                                                                 tensor_view<TV, 4> v,
                                                                 tensor_view<TO, 4> out,
                                                                 const linear_options& options,
                                                                 const FeatureMap& phi) {
  using T = TO;
  const tensor_view<const T, 4> cq = q, ck = k, cv = v;
  detail::check_qkvo(cq, ck, cv, out);
  detail::check_linear_options(options);
  detail::linear_problem<T> pr{
      cq, ck, cv, out, options.causal, k.extent(2) - q.extent(2), T(options.eps)};
  pr.features = detail::feature_count(phi, q.extent(3));
  detail::run_linear<Backend>(pr, phi, detail::resolve_threads(options.threads));
}

/// The recurrent state's part of linear_attention_backward over one causal chunk (see
/// there): each span empty or (B, Hk) x [S (E x Dv), z (E)], linear_state's layout
/// (E the features per row: D, or FAVOR+'s count).
template <class T>
struct linear_state_grads {
  std::span<const T> state_in{};    ///< the state before the chunk; empty: zero
  std::span<const T> dstate_out{};  ///< d loss / d the state after the chunk; empty: zero
  std::span<T> dstate_in{};         ///< out: d loss / d state_in; empty: not wanted
};

namespace detail {

/// A chunk's state gradients: causal, Sq == Sk, each span empty or of the state's size,
/// dstate_in overlapping nothing it is computed from.
template <class T>
void check_state_grads(const linear_state_grads<T>& state, const linear_problem<T>& pr,
                       const linear_options& options, const tensor_view<T, 4>& dq,
                       const tensor_view<T, 4>& dk, const tensor_view<T, 4>& dv) {
  if (state.state_in.empty() && state.dstate_out.empty() && state.dstate_in.empty()) return;
  require(options.causal, "state: a state is carried by causal chunks only (options.causal)");
  require(pr.q.extent(2) == pr.k.extent(2), "state: a chunk from a state has Sq == Sk (q has ",
          pr.q.extent(2), " tokens, k ", pr.k.extent(2), ")");
  const index_t E = pr.feature_dim(), M = pr.v.extent(3);
  const std::size_t size = std::size_t(pr.k.extent(0) * pr.k.extent(1) * (E * M + E));
  auto sized = [&](std::size_t n, const char* name) {
    require(n == 0 || n == size, name, ": holds ", n, " values, expected ", size,
            " ((B, Hk) x [S (E x Dv), z (E)], E = ", E, ")");
  };
  sized(state.state_in.size(), "state.state_in");
  sized(state.dstate_out.size(), "state.dstate_out");
  sized(state.dstate_in.size(), "state.dstate_in");
  if (state.dstate_in.empty()) return;
  const T* lo = state.dstate_in.data();
  const T* hi = lo + state.dstate_in.size();
  auto apart = [&](std::span<const T> x, const char* name) {
    require(x.empty() || x.data() + x.size() <= lo || x.data() >= hi,
            "state.dstate_in: overlaps ", name);
  };
  apart(state.state_in, "state.state_in");
  apart(state.dstate_out, "state.dstate_out");
  const auto flat = view(state.dstate_in.data(), {index_t(state.dstate_in.size())});
  for (const auto& [g, name] : {std::pair{dq, "dq"}, {dk, "dk"}, {dv, "dv"}})
    check_no_alias(g, name, tensor_view<const T, 1>(flat), "state.dstate_in");
  for (const auto& [x, name] : {std::pair{pr.q, "q"}, {pr.k, "k"}, {pr.v, "v"}})
    check_no_alias(flat, "state.dstate_in", x, name);
}

}  // namespace detail

/// Gradients of linear_attention: given the forward's inputs, its output `out` and dout =
/// d loss / d out, writes dq, dk, dv = d loss / d q, k, v (overwritten).
///
///   q: (B, H, Sq, D)   k: (B, Hk, Sk, D)   v: (B, Hk, Sk, Dv)   out, dout: (B, H, Sq, Dv)
///   dq like q, dk like k, dv like v
///
/// `options` are the forward's (causal bottom-right, map, eps, favor's features and seed).
/// With a_ij = phi(q_i).phi(k_j) over the visible pairs, den_i = sum_j a_ij + eps,
/// g_i = dO_i / den_i and c_i = -(dO_i . out_i) / den_i: d phi(q_i) = sum_j (v_j . g_i + c_i)
/// phi(k_j), d phi(k_j) = sum_i (v_j . g_i + c_i) phi(q_i), dv_j = sum_i a_ij g_i, and dq, dk
/// through the map's derivative (elu+1: 1 or exp(x); relu: 1 for x > 0, else 0; FAVOR+:
/// its exponentials' chain rule; a user map supplies `vjp(x, dy, dx, n)`: dx = J(x)^T dy).
/// Non-causal: through the states S, z and P = sum phi(q) g^T, y = sum c phi(q). Causal: in
/// chunks of 64 keys, a forward pass for dq and a reverse scan of P, y for dk, dv, at GEMM
/// speed. GQA: dk, dv summed over each group's query heads, in order. Each (batch,
/// key/value head) is one serial task: bitwise the same for every thread count. A row
/// whose normaliser is 0 (it output 0) gives zero gradients; hidden keys get nothing from
/// a causal query (NaN/Inf in them never reach it). float or double; extra memory: a few
/// chunks per thread plus one value per causal query. Bad arguments throw fovea::error
/// before any write.
///
/// Chunked training through the recurrent state (`state`, linear_state_grads): a causal
/// chunk of Sq == Sk tokens that started from state_in (linear_state::data() before the
/// chunk's step) gets the gradients of its queries, keys and values and, with the
/// gradient of the state after it (dstate_out, from the next chunk's call; empty: none),
/// writes dstate_in, the gradient of the state before it: the reverse scan's P and y
/// started at dstate_out and run over the chunk's queries. Calls chunk by chunk from the
/// last equal one call over the whole sequence (within rounding).
template <class Backend = default_backend, class T, class FeatureMap>
requires detail::is_linear_type_v<T> && (!std::is_same_v<FeatureMap, linear_state_grads<T>>)
void linear_attention_backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                               tensor_view<const T, 4> v, tensor_view<const T, 4> out,
                               tensor_view<const T, 4> dout, tensor_view<T, 4> dq,
                               tensor_view<T, 4> dk, tensor_view<T, 4> dv,
                               const linear_options& options, const FeatureMap& phi,
                               const linear_state_grads<T>& state = {}) {
  static_assert(requires(const T* x, T* y) { phi.vjp(x, x, y, index_t(0)); },
                "linear_attention_backward: the feature map needs a vjp(x, dy, dx, n) member "
                "(dx = J(x)^T dy) to be differentiated");
  using namespace detail;
  const tensor_view<T, 4> out_shape(const_cast<T*>(out.data()), out.extents(), out.strides());
  check_qkvo(q, k, v, out_shape);
  check_linear_options(options);
  check_gradients(q, k, v, out, dout, dq, dk, dv);
  linear_backward_problem<T> bp{
      {q, k, v, out_shape, options.causal, k.extent(2) - q.extent(2), T(options.eps)},
      out, dout, dq, dk, dv};
  bp.forward.features = feature_count(phi, q.extent(3));
  check_state_grads(state, bp.forward, options, dq, dk, dv);
  bp.state_in = state.state_in.empty() ? nullptr : state.state_in.data();
  bp.dstate_out = state.dstate_out.empty() ? nullptr : state.dstate_out.data();
  bp.dstate_in = state.dstate_in.empty() ? nullptr : state.dstate_in.data();
  run_linear_backward<Backend>(bp, phi, resolve_threads(options.threads));
}

template <class Backend = default_backend, class T>
requires detail::is_linear_type_v<T>
void linear_attention_backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                               tensor_view<const T, 4> v, tensor_view<const T, 4> out,
                               tensor_view<const T, 4> dout, tensor_view<T, 4> dq,
                               tensor_view<T, 4> dk, tensor_view<T, 4> dv,
                               const linear_options& options = {},
                               const linear_state_grads<T>& state = {}) {
  detail::check_linear_options(options);
  detail::with_feature_map<Backend, T>(options, q.extent(3), [&](const auto& phi) {
    linear_attention_backward<Backend>(q, k, v, out, dout, dq, dk, dv, options, phi, state);
  });
}

/// The recurrent state of causal linear attention for decoding: S (D x Dv) and z (D) per
/// (batch, key/value head). step() appends tokens; running it token by token equals the
/// causal batch result on the whole sequence.
template <class T>
class linear_state {
 public:
  linear_state(index_t batch, index_t kv_heads, index_t dim, index_t value_dim)
      : batch_(batch), heads_(kv_heads), dim_(dim), value_dim_(value_dim) {
    detail::require(batch >= 0 && kv_heads >= 0 && dim >= 1 && value_dim >= 0,
                    "linear_state: batch, kv_heads, value_dim must be >= 0 and dim >= 1");
    data_.assign(std::size_t(batch * kv_heads * (dim * value_dim + dim)), T(0));
  }

  void reset() {
    std::fill(data_.begin(), data_.end(), T(0));
    tokens_ = 0;
  }
  index_t tokens() const noexcept { return tokens_; }
  /// S then z for each (batch, kv head): [B][Hk][D * Dv + D].
  const std::vector<T>& data() const noexcept { return data_; }
  /// The same, writable: to restore a saved state (the values, not the size, may change).
  std::span<T> data() noexcept { return data_; }

  /// Appends n tokens: q (B, H, n, D), k (B, Hk, n, D), v (B, Hk, n, Dv) -> out
  /// (B, H, n, Dv); token t of the step sees every earlier token and itself.
  /// options.causal is ignored (a step is causal by nature).
  template <class Backend = default_backend, class TQ, class TK, class TV, class FeatureMap>
  void step(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v, tensor_view<T, 4> out,
            const linear_options& options, const FeatureMap& phi) {
    const tensor_view<const T, 4> cq = q, ck = k, cv = v;
    detail::check_qkvo(cq, ck, cv, out);
    detail::check_linear_options(options);
    detail::require(q.extent(2) == k.extent(2), "k: extent 2 (seq) is ", k.extent(2),
                    ", expected the ", q.extent(2), " tokens of q");
    detail::require(k.extent(0) == batch_ && k.extent(1) == heads_ &&
                        detail::feature_count(phi, k.extent(3)) == dim_,
                    "k: shape does not match the state (batch ", batch_, ", kv heads ", heads_,
                    ", features ", dim_, ")");
    detail::require(v.extent(3) == value_dim_, "v: extent 3 (dim) is ", v.extent(3), ", expected ",
                    value_dim_, " as the state");
    detail::linear_problem<T> pr{cq, ck, cv, out, true, 0, T(options.eps), data_.data()};
    pr.features = dim_;
    detail::run_linear<Backend>(pr, phi, detail::resolve_threads(options.threads));
    tokens_ += q.extent(2);
  }

  template <class Backend = default_backend, class TQ, class TK, class TV>
  void step(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v, tensor_view<T, 4> out,
            const linear_options& options = {}) {
    detail::check_linear_options(options);
    detail::with_feature_map<Backend, T>(
        options, k.extent(3), [&](const auto& phi) { step<Backend>(q, k, v, out, options, phi); });
  }

 private:
  index_t batch_, heads_, dim_, value_dim_, tokens_ = 0;
  std::vector<T> data_;
};

}  // namespace fovea
