// fovea::agent_attention (Han et al. 2023): m agent tokens first aggregate the values by
// softmax attention over the keys, then every query attends to the agents. Both stages
// are calls of the dense softmax engine; the cost is O(n m d) per head.
#pragma once

#include <cmath>
#include <vector>

#include "../core/error.hpp"
#include "../core/tensor_view.hpp"
#include "../core/validate.hpp"
#include "checks.hpp"
#include "softmax.hpp"

namespace fovea {

struct agent_options {
  bool causal = false;      ///< the causal agent variant is not implemented yet: must be false
  index_t num_agents = 64;  ///< m, when the agents are pooled from q
  std::optional<double> scale{};  ///< default 1/sqrt(D), both stages
  tensor_view<const float, 4>
      agent_bias{};  ///< B1, added to agent-key logits: (B|1, H|1, m|1, Sk|1)
  tensor_view<const float, 4>
      query_bias{};  ///< B2, added to query-agent logits: (B|1, H|1, Sq|1, m|1)
  int threads = 0;
};

namespace detail {

/// agents(b, h, t) = mean of q(b, h, i) over i in [floor(t n / m), ceil((t + 1) n / m)).
template <class T>
void pool_agents(const tensor_view<const T, 4>& q, index_t m, std::vector<T>& agents) {
  const index_t B = q.extent(0), H = q.extent(1), n = q.extent(2), D = q.extent(3);
  agents.assign(B * H * m * D, T(0));
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t t = 0; t < m; ++t) {
        const index_t lo = t * n / m, hi = ((t + 1) * n + m - 1) / m;
        T* a = agents.data() + ((b * H + h) * m + t) * D;
        for (index_t i = lo; i < hi; ++i)
          for (index_t d = 0; d < D; ++d) a[d] += q(b, h, i, d);
        for (index_t d = 0; d < D; ++d) a[d] /= T(hi - lo);
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
/// Hk divides H. float or double (bf16/fp16 too through the explicit-agents overload).
/// Both stages are softmax_attention calls, with its numerical contract (a query whose
/// agents all see no key gets 0). options.causal must be false for now.
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
  require(!options.causal, "options.causal: the causal agent variant is not implemented yet");
  require(options.threads >= 0, "options.threads: is ", options.threads, ", expected >= 0");
  check_no_alias(out, "out", ca, "agents");
  const index_t B = q.extent(0), H = q.extent(1), m = ca.extent(2);
  check_broadcast(options.agent_bias, "options.agent_bias", B, H, H, m, k.extent(2));
  check_broadcast(options.query_bias, "options.query_bias", B, H, H, q.extent(2), m);
  check_scalar_options(softmax_options{.scale = options.scale}, q.extent(3));
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
  const tensor_view<const T, 4> cq = q;
  detail::check_rows(cq, "q");
  std::vector<T> agents;
  detail::pool_agents(cq, options.num_agents, agents);
  agent_attention<Backend>(
      q, k, v, out, bhsd(agents.data(), q.extent(0), q.extent(1), options.num_agents, q.extent(3)),
      options);
}

}  // namespace fovea
