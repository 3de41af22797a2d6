// fovea::linear_recurrence: linear attention with decay and the delta rule (ONNX
// LinearAttention's update rules linear, gated, delta, gated_delta; the recurrences of
// RetNet/Mamba2-style gated linear attention, DeltaNet and Gated DeltaNet as in Qwen3-Next),
// computed in chunks at GEMM speed (engine/linear/recurrence.hpp), with a state object
// for decoding.
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../core/parallel.hpp"
#include "../core/storage.hpp"
#include "../core/tensor_view.hpp"
#include "../core/validate.hpp"
#include "../engine/linear/recurrence.hpp"
#include "../simd/backend.hpp"
#include "checks.hpp"

namespace fovea {

/// How the state is updated per token (ONNX LinearAttention's update_rule).
enum class update_rule { linear, gated, delta, gated_delta };

constexpr const char* to_string(update_rule r) noexcept {
  constexpr const char* names[] = {"linear", "gated", "delta", "gated_delta"};
  return names[int(r)];
}

struct linear_recurrence_options {
  update_rule rule = update_rule::linear;
  /// Gated rules: g_t in log space (the state is multiplied by exp(g_t)), (B, Hk, S, 1)
  /// one per head and token, or (B, Hk, S, Dk) one per key dimension; finite.
  tensor_view<const float, 4> decay{};
  /// Delta rules: beta_t, (B, Hk, S, 1) per head or (B, 1, S, 1) shared by all heads; finite.
  tensor_view<const float, 4> beta{};
  tensor_view<const float, 4> state_in{};  ///< optional (B, Hk, Dk, Dv); zero when absent
  /// optional out (B, Hk, Dk, Dv): the final state; state_in's own view (in place) or apart
  tensor_view<float, 4> state_out{};
  std::optional<double> scale{};           ///< default 1/sqrt(Dk); finite, > 0
  int threads = 0;                         ///< 0: all OpenMP offers; 1: serial
};

namespace detail {

/// The checks every recurrence front-end shares (q, k, v, out over one token count,
/// threads, scale); returns the scale, `default_scale` when none is given.
template <class T>
double check_recurrence_call(const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
                             const tensor_view<const T, 4>& v, const tensor_view<T, 4>& out,
                             int threads, std::optional<double> scale, double default_scale) {
  check_qkvo(q, k, v, out);
  require(k.extent(2) == q.extent(2), "k: extent 2 (seq) is ", k.extent(2), ", expected the ",
          q.extent(2), " tokens of q (a recurrence reads each token once)");
  require(threads >= 0, "options.threads: is ", threads, ", expected >= 0");
  const double s = scale ? *scale : default_scale;
  require(std::isfinite(s) && s > 0, "options.scale: is ", s, ", expected finite and > 0");
  return s;
}

template <class T>
recurrence_problem<T> make_recurrence_problem(const tensor_view<const T, 4>& q,
                                              const tensor_view<const T, 4>& k,
                                              const tensor_view<const T, 4>& v,
                                              const tensor_view<T, 4>& out,
                                              const linear_recurrence_options& o) {
  const index_t B = q.extent(0), S = q.extent(2), Dk = q.extent(3), Hk = k.extent(1);
  const index_t Dv = v.extent(3);
  const double scale =
      check_recurrence_call(q, k, v, out, o.threads, o.scale, 1.0 / std::sqrt(double(Dk)));
  const bool gated = o.rule == update_rule::gated || o.rule == update_rule::gated_delta;
  const bool delta = o.rule == update_rule::delta || o.rule == update_rule::gated_delta;
  const bool has_decay = is_given(o.decay), has_beta = is_given(o.beta);
  require(gated == has_decay, "options.decay: the ", to_string(o.rule), " rule ",
          gated ? "needs a decay" : "takes no decay");
  require(delta == has_beta, "options.beta: the ", to_string(o.rule), " rule ",
          delta ? "needs beta" : "takes no beta");
  if (gated) check_side_input(o.decay, "options.decay", B, Hk, false, S, Dk, Dk);
  if (delta) check_side_input(o.beta, "options.beta", B, Hk, true, S, 1, Dk);
  check_state(o.state_in, "options.state_in", B, Hk, Dk, Dv);
  check_state(o.state_out, "options.state_out", B, Hk, Dk, Dv);
  check_state_out(o.state_out, "options.state_out", q, k, v, out);
  check_no_alias(out, "out", o.decay, "options.decay");
  check_no_alias(out, "out", o.beta, "options.beta");
  check_no_alias(out, "out", o.state_in, "options.state_in");
  check_no_alias(o.state_out, "options.state_out", o.decay, "options.decay");
  check_no_alias(o.state_out, "options.state_out", o.beta, "options.beta");
  check_in_place(o.state_out, "options.state_out", o.state_in, "options.state_in");
  recurrence_problem<T> pr;
  pr.q = q, pr.k = k, pr.v = v, pr.out = out;
  pr.decay = o.decay, pr.beta = o.beta, pr.state_in = o.state_in, pr.state_out = o.state_out;
  pr.delta = delta;
  pr.scale = scale;
  return pr;
}

}  // namespace detail

/// Linear attention as a recurrence over the state S (Dk x Dv) of each (batch, key/value
/// head), zero or options.state_in at the start. For each token t in order:
///   gated rules:  S <- exp(g_t) S   (g_t per head, or per key dimension: row-wise)
///   delta rules:  v'_t = beta_t (v_t - S^T k_t)   (else v'_t = v_t)
///   S <- S + k_t v'_t^T;   o_t = scale S^T q_t   (read after the update)
/// Query heads share their key/value head's state (GQA); scale defaults to 1/sqrt(Dk).
///
///   q: (B, H, S, Dk)   k: (B, Hk, S, Dk)   v: (B, Hk, S, Dv)   out: (B, H, S, Dv)
///   options.decay: (B, Hk, S, 1 | Dk) log space;  options.beta: (B, Hk | 1, S, 1)
///   options.state_in / state_out: (B, Hk, Dk, Dv), exchanged in fp32
///
/// Semantics of ONNX's LinearAttention operator. Per-head decays are computed in chunks of
/// 16 tokens (the UT transform for the delta rules: T = (I + tril(diag(beta) K K^T, -1))^-1,
/// W = T diag(beta) K, U = T diag(beta) V; Yang et al. 2024, "Parallelizing Linear
/// Transformers with the Delta Rule over Sequence Length", and Gated DeltaNet), with the
/// cumulative decays kept in log space: for decays g <= 0 (the usual case; positive ones
/// are computed too, and grow the state as the definition does) every factor is exp of a
/// difference <= 0, so a decay of exp(-20) per token or stronger underflows to 0 and never
/// overflows. Per-key-
/// dimension decays (Kimi Linear's KDA) are chunked too: the pair factors exp(g_t + ... )
/// per dimension are folded into the keys and queries about the chunk's midpoint, and a
/// chunk ends early where a dimension's cumulative decay spreads more than 40 (in log
/// units; strong decays take shorter chunks down to the token step, never an infinite
/// factor). float or double, accumulated in that type. NaN in an
/// input reaches every later output of its head (the state carries it). Each (batch,
/// key/value head) is one serial task: bitwise the same for every thread count. Bad input
/// (shapes, a decay or beta the rule does not take or lacks, non-finite decay or beta)
/// throws fovea::error naming the argument, before anything is written.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO>
requires detail::attention_types<TQ, TK, TV, TO> &&
         (std::is_same_v<TO, float> || std::is_same_v<TO, double>)
void linear_recurrence(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                       tensor_view<TO, 4> out, const linear_recurrence_options& options = {}) {
  const auto pr = detail::make_recurrence_problem<TO>(q, k, v, out, options);
  detail::run_recurrence<Backend>(pr, detail::resolve_threads(options.threads));
}

/// The state of linear_recurrence for decoding: S per (batch, key/value head), kept
/// between calls in fp32 and updated in place. step() runs n new tokens from it (n = 1:
/// the fused token step, one pass over each state, two for the delta rules; n > 1: the
/// chunked form). Stepping in multiples of 16 tokens (the chunk) gives the batch call's bits
/// (float; for per-dimension decays, where no chunk was cut short by a strong decay); any
/// other stepping agrees within rounding.
template <class T>
class linear_recurrence_state {
 public:
  linear_recurrence_state(index_t batch, index_t kv_heads, index_t key_dim, index_t value_dim)
      : shape_{batch, kv_heads, key_dim, value_dim}, ld_((value_dim + 15) / 16 * 16) {
    detail::require(batch >= 0 && kv_heads >= 0 && key_dim >= 1 && value_dim >= 0,
                    "linear_recurrence_state: batch, kv_heads, value_dim must be >= 0 and "
                    "key_dim >= 1");
    data_.assign(std::size_t(batch * kv_heads * key_dim * ld_), 0.f);
  }
  void reset() { std::fill(data_.begin(), data_.end(), 0.f); }
  /// The state as (B, Hk, Dk, Dv), fp32 (rows padded in memory).
  tensor_view<const float, 4> view() const noexcept {
    return fovea::view<const float, 4>(
        data_.data(), shape_, {shape_[1] * shape_[2] * ld_, shape_[2] * ld_, ld_, 1});
  }

  /// q (B, H, n, Dk), k (B, Hk, n, Dk), v (B, Hk, n, Dv) -> out (B, H, n, Dv). options'
  /// decay and beta are for these n tokens; its state_in and state_out must be empty.
  template <class Backend = default_backend, class TQ, class TK, class TV>
  void step(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v, tensor_view<T, 4> out,
            linear_recurrence_options options) {
    detail::require(!options.state_in.data() && !options.state_out.data(),
                    "options.state_in, state_out: the state object keeps the state; leave them empty");
    detail::require(k.extent(0) == shape_[0] && k.extent(1) == shape_[1] &&
                        k.extent(3) == shape_[2] && v.extent(3) == shape_[3],
                    "k, v: shapes do not match the state (batch ", shape_[0], ", kv heads ",
                    shape_[1], ", key dim ", shape_[2], ", value dim ", shape_[3], ")");
    const tensor_view<const T, 4> cq = q, ck = k, cv = v;
    if constexpr (std::is_same_v<accumulator_t<T>, float>) {
      auto pr = detail::make_recurrence_problem<T>(cq, ck, cv, out, options);
      detail::require(!detail::overlaps(out, view()), "out: memory overlaps the state");
      pr.state = data_.data();
      pr.state_ld = ld_;
      detail::run_recurrence<Backend>(pr, detail::resolve_threads(options.threads));
    } else {  // double: through fp32 state views
      std::vector<float> next(data_.size());
      options.state_in = view();
      options.state_out = fovea::view<float, 4>(
          next.data(), shape_, {shape_[1] * shape_[2] * ld_, shape_[2] * ld_, ld_, 1});
      linear_recurrence<Backend>(cq, ck, cv, out, options);
      data_.swap(next);
    }
  }

 private:
  std::array<index_t, 4> shape_;
  index_t ld_;
  std::vector<float> data_;
};

}  // namespace fovea
