// Every public entry point instantiated for float and bf16, for the warning-clean consumer
// check (-Wall -Wextra -Werror, also compiled for AVX-512 targets this machine may lack).
#include <fovea/fovea.hpp>
#include <vector>

template <class T>
void every_family() {
  const long B = 1, H = 4, Hk = 2, S = 64, D = 32;
  std::vector<T> q(B * H * S * D), k(B * Hk * S * D), v(B * Hk * S * D), o(B * H * S * D);
  const auto Q = fovea::bhsd<const T>(q.data(), B, H, S, D);
  const auto K = fovea::bhsd<const T>(k.data(), B, Hk, S, D);
  const auto V = fovea::bhsd<const T>(v.data(), B, Hk, S, D);
  const auto O = fovea::bhsd(o.data(), B, H, S, D);
  fovea::softmax_attention(Q, K, V, O, {.causal = true});
  fovea::softmax_attention(fovea::bhsd<const T>(q.data(), B, H, 1, D), K, V,
                           fovea::bhsd(o.data(), B, H, 1, D));
  fovea::hip_attention(Q, K, V, O, {.causal = true, .top_k = 32});
  const std::vector<float> gamma(H, 0.5f);
  fovea::zero_tuning_attention(Q, K, V, O, std::span<const float>(gamma), {.causal = true});
  std::vector<float> bias(B * Hk * S);
  fovea::dynamic_mask_attention(Q, K, V, O, fovea::bhsd<const float>(bias.data(), B, Hk, 1, S),
                                {.causal = true, .keep = 16});
  fovea::routing_attention(Q, K, V, O, {.num_clusters = 4, .window = 16});
  std::vector<T> a(B * H * 8 * D);
  fovea::agent_attention(Q, K, V, O, fovea::bhsd<const T>(a.data(), B, H, 8, D), {.causal = true});
  std::vector<fovea::half> mask(S * S);
  fovea::softmax_attention(Q, K, V, O,
                           {.bias = fovea::view<const fovea::half>(mask.data(), {1, 1, S, S})});
  if constexpr (std::is_same_v<T, float>) {
    fovea::linear_attention(Q, K, V, O, {.causal = true});
    std::vector<float> g(B * Hk * S, -0.1f), beta(B * Hk * S, 0.5f);
    const auto G = fovea::bhsd<const float>(g.data(), B, Hk, S, 1);
    const auto Beta = fovea::bhsd<const float>(beta.data(), B, Hk, S, 1);
    fovea::linear_recurrence(Q, K, V, O, {.rule = fovea::update_rule::gated_delta, .decay = G,
                                          .beta = Beta});
    fovea::titans_memory(Q, K, V, O, {.eta = Beta, .theta = Beta, .alpha = Beta});
    std::vector<float> lse(B * H * S), dq(q.size()), dk(k.size()), dv(v.size());
    const auto L = fovea::view(lse.data(), {B, H, S});
    fovea::softmax_attention(Q, K, V, O, {.causal = true, .lse = L});
    fovea::softmax_attention_backward(Q, K, V, fovea::tensor_view<const float, 4>(O),
                                      fovea::tensor_view<const float, 4>(O),
                                      fovea::tensor_view<const float, 3>(L),
                                      fovea::bhsd(dq.data(), B, H, S, D),
                                      fovea::bhsd(dk.data(), B, Hk, S, D),
                                      fovea::bhsd(dv.data(), B, Hk, S, D), {.causal = true});
    // dynamic-mask training: the attention's backward, then the bias's
    std::vector<float> w_dt(Hk * Hk * D), A(Hk, -1.f), dbias(bias.size()), dw(w_dt.size()), da(Hk);
    const auto Bias = fovea::bhsd<const float>(bias.data(), B, Hk, 1, S);
    fovea::dynamic_mask_bias(V, fovea::view<const float>(w_dt.data(), {Hk, Hk * D}),
                             fovea::view<const float>(A.data(), {Hk}), fovea::bhsd(bias.data(), B, Hk, 1, S));
    fovea::dynamic_mask_attention(Q, K, V, O, Bias, {.causal = true, .keep = 16, .lse = L});
    fovea::dynamic_mask_attention_backward(
        Q, K, V, fovea::tensor_view<const float, 4>(O), Bias, fovea::tensor_view<const float, 4>(O),
        fovea::tensor_view<const float, 3>(L), fovea::bhsd(dq.data(), B, H, S, D),
        fovea::bhsd(dk.data(), B, Hk, S, D), fovea::bhsd(dv.data(), B, Hk, S, D),
        {.causal = true, .keep = 16}, fovea::bhsd(dbias.data(), B, Hk, 1, S));
    fovea::dynamic_mask_bias_backward(V, fovea::view<const float>(w_dt.data(), {Hk, Hk * D}),
                                      fovea::view<const float>(A.data(), {Hk}),
                                      fovea::bhsd<const float>(dbias.data(), B, Hk, 1, S),
                                      fovea::bhsd(dv.data(), B, Hk, S, D),
                                      fovea::view(dw.data(), {Hk, Hk * D}), fovea::view(da.data(), {Hk}));
  }
}

int main() {
  every_family<float>();
  every_family<fovea::bfloat16>();
  return 0;
}
