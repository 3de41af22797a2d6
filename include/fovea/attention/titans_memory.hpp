// fovea::titans_memory: the neural long-term memory of "Titans: Learning to Memorize at
// Test Time" (Behrouz, Zhong, Mirrokni 2024) with a linear memory: learned at test time by
// gradient descent with momentum (the paper's surprise) and forgetting, read by the
// queries; chunked as the paper parallelises it (engine/linear/titans.hpp).
#pragma once

#include <optional>

#include "../core/error.hpp"
#include "../core/parallel.hpp"
#include "../core/tensor_view.hpp"
#include "../core/validate.hpp"
#include "../engine/linear/titans.hpp"
#include "../simd/backend.hpp"
#include "checks.hpp"
#include "linear_recurrence.hpp"

namespace fovea {

struct titans_memory_options {
  /// Momentum eta_t (the paper's surprise decay), (B, Hk | 1, S, 1) in [0, 1]; absent: 0
  /// (plain gradient steps).
  tensor_view<const float, 4> eta{};
  /// Step size theta_t (the paper's learning rate), (B, Hk | 1, S, 1), finite, >= 0; required.
  tensor_view<const float, 4> theta{};
  /// Forgetting alpha_t (the paper's weight decay gate), (B, Hk | 1, S, 1) in [0, 1];
  /// absent: 0 (nothing forgotten).
  tensor_view<const float, 4> alpha{};
  /// Tokens whose gradients are all taken at the memory the chunk starts from (the paper's
  /// mini-batch b); chunks are counted from the call's first token. 1: the exact token
  /// recurrence. >= 1.
  index_t chunk = 16;
  tensor_view<const float, 4> memory_in{};    ///< optional (B, Hk, Dk, Dv); zero when absent
  tensor_view<const float, 4> momentum_in{};  ///< optional (B, Hk, Dk, Dv); zero when absent
  tensor_view<float, 4> memory_out{};    ///< optional out: the final memory (may be memory_in)
  tensor_view<float, 4> momentum_out{};  ///< optional out: the final momentum (may be momentum_in)
  std::optional<double> scale{};         ///< default 1 (the paper reads M q unscaled); finite, > 0
  int threads = 0;                       ///< 0: all OpenMP offers; 1: serial
};

namespace detail {


template <class T>
titans_problem<T> make_titans_problem(const tensor_view<const T, 4>& q,
                                      const tensor_view<const T, 4>& k,
                                      const tensor_view<const T, 4>& v,
                                      const tensor_view<T, 4>& out,
                                      const titans_memory_options& o) {
  const double scale = check_recurrence_call(q, k, v, out, o.threads, o.scale, 1.0);
  const index_t B = q.extent(0), S = q.extent(2), Dk = q.extent(3), Hk = k.extent(1);
  const index_t Dv = v.extent(3);
  require(o.chunk >= 1, "options.chunk: is ", o.chunk, ", expected >= 1");
  require(is_given(o.theta), "options.theta: the step size is required");
  check_side_input(o.theta, "options.theta", B, Hk, true, S, 1, Dk, 0.0);
  if (is_given(o.eta)) check_side_input(o.eta, "options.eta", B, Hk, true, S, 1, Dk, 0.0, 1.0);
  if (is_given(o.alpha)) check_side_input(o.alpha, "options.alpha", B, Hk, true, S, 1, Dk, 0.0, 1.0);
  check_state(o.memory_in, "options.memory_in", B, Hk, Dk, Dv);
  check_state(o.momentum_in, "options.momentum_in", B, Hk, Dk, Dv);
  check_state(o.memory_out, "options.memory_out", B, Hk, Dk, Dv);
  check_state(o.momentum_out, "options.momentum_out", B, Hk, Dk, Dv);
  check_state_out(o.memory_out, "options.memory_out", q, k, v, out);
  check_state_out(o.momentum_out, "options.momentum_out", q, k, v, out);
  check_no_alias(o.memory_out, "options.memory_out", o.momentum_out, "options.momentum_out");
  check_in_place(o.memory_out, "options.memory_out", o.memory_in, "options.memory_in");
  check_no_alias(o.memory_out, "options.memory_out", o.momentum_in, "options.momentum_in");
  check_in_place(o.momentum_out, "options.momentum_out", o.momentum_in, "options.momentum_in");
  check_no_alias(o.momentum_out, "options.momentum_out", o.memory_in, "options.memory_in");
  check_no_alias(out, "out", o.memory_in, "options.memory_in");
  check_no_alias(out, "out", o.momentum_in, "options.momentum_in");
  for (const auto& [x, name] : {std::pair{o.eta, "options.eta"}, {o.theta, "options.theta"},
                                {o.alpha, "options.alpha"}}) {
    check_no_alias(out, "out", x, name);
    check_no_alias(o.memory_out, "options.memory_out", x, name);
    check_no_alias(o.momentum_out, "options.momentum_out", x, name);
  }
  titans_problem<T> pr;
  pr.q = q, pr.k = k, pr.v = v, pr.out = out;
  pr.eta = o.eta, pr.theta = o.theta, pr.alpha = o.alpha;
  pr.memory_in = o.memory_in, pr.momentum_in = o.momentum_in;
  pr.memory_out = o.memory_out, pr.momentum_out = o.momentum_out;
  pr.chunk = o.chunk;
  pr.scale = scale;
  return pr;
}

}  // namespace detail

/// Titans' neural memory with a linear memory M (Dk x Dv per batch and key/value head,
/// stored as the transpose of the paper's matrix: it predicts M^T k) and momentum U. For
/// each token t, with M0 the memory at the start of t's chunk (options.chunk tokens from
/// the call's first token):
///   grad_t = 2 k_t (M0^T k_t - v_t)^T        (the gradient of ||M^T k_t - v_t||^2 at M0)
///   U_t = eta_t U_{t-1} - theta_t grad_t      (momentum: the paper's surprise, eq. 10)
///   M_t = (1 - alpha_t) M_{t-1} + U_t         (forgetting, eq. 13)
///   o_t = scale M_t^T q_t                     (the read after the update, eq. 15)
/// With options.chunk = 1 this is the paper's token recurrence (eqs. 8-14); larger chunks
/// are its parallel training form (section 3.2: gradients in a chunk taken at the chunk's
/// start), computed as GEMMs: per chunk, G = diag(2 theta)(K M0 - V), the within-chunk
/// products of eta and 1 - alpha as a lower-triangular weight on Q K^T, and two state
/// updates (the derivation heads engine/linear/titans.hpp). Every factor is in [0, 1]
/// and nothing is divided, so strong forgetting underflows to 0 and never overflows.
/// With eta = alpha = 0 and chunks of 1 it is the delta rule with beta = 2 theta.
///
///   q: (B, H, S, Dk)   k: (B, Hk, S, Dk)   v: (B, Hk, S, Dv)   out: (B, H, S, Dv)
///   options.eta / theta / alpha: (B, Hk | 1, S, 1);  the states (B, Hk, Dk, Dv) in fp32
///
/// Query heads share their key/value head's memory (GQA). The paper L2-normalises q and k
/// and makes eta, theta, alpha from the token by linear maps and sigmoids: the caller's
/// (the kernel takes the gates as they are). float or double (accumulated in that type);
/// bf16/fp16 are not taken. Decoding: pass memory_in = memory_out (and the momentum
/// likewise) and call with one token or a chunk at a time; stepping in whole chunks gives
/// the batch call's bits. NaN in an input reaches every later output of its head. Each
/// (batch, key/value head) is one serial task: bitwise the same for every thread count.
/// Bad input (shapes, theta missing, eta or alpha outside [0, 1], a negative or
/// non-finite gate, chunk < 1, overlapping states) throws fovea::error naming the
/// argument, before anything is written.
template <class Backend = default_backend, class TQ, class TK, class TV, class TO>
requires detail::attention_types<TQ, TK, TV, TO> &&
         (std::is_same_v<TO, float> || std::is_same_v<TO, double>)
void titans_memory(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                   tensor_view<TO, 4> out, const titans_memory_options& options) {
  const auto pr = detail::make_titans_problem<TO>(q, k, v, out, options);
  detail::run_titans<Backend>(pr, detail::resolve_threads(options.threads));
}

}  // namespace fovea
