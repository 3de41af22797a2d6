// User variants, FlexAttention style: a score_mod that writes ALiBi by hand (checked
// against the built-in alibi_slopes option) and a mask_mod that keeps packed documents
// apart (checked against running each document on its own). Both are plain lambdas,
// inlined into the kernel.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fovea/fovea.hpp>
#include <random>
#include <vector>

int main() {
  std::printf("fovea: %s\n", fovea::build_info().c_str());  // backend, OpenMP, -O
  const long H = 4, S = 1000, D = 64;
  std::mt19937 gen(3);
  std::normal_distribution<float> normal;
  std::vector<float> q(H * S * D), k(H * S * D), v(H * S * D), a(H * S * D), b(H * S * D);
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) e = normal(gen);
  const auto Q = fovea::bhsd<const float>(q.data(), 1, H, S, D);
  const auto K = fovea::bhsd<const float>(k.data(), 1, H, S, D);
  const auto V = fovea::bhsd<const float>(v.data(), 1, H, S, D);
  auto max_diff = [&] {
    double m = 0;
    for (long i = 0; i < H * S * D; ++i) m = std::max(m, double(std::abs(a[i] - b[i])));
    return m;
  };

  // 1. ALiBi: slope_h = 2^(-8 (h + 1) / H), logit -= slope_h * (i - j) under a causal mask.
  std::vector<float> slopes(H);
  for (long h = 0; h < H; ++h) slopes[h] = std::pow(2.f, -8.f * float(h + 1) / float(H));
  const auto alibi = fovea::with_score_mod(
      [&](float s, auto, auto h, auto i, auto j) { return s - slopes[h] * float(i - j); });
  fovea::softmax_attention(Q, K, V, fovea::bhsd(a.data(), 1, H, S, D), {.causal = true}, alibi);
  fovea::softmax_options builtin{.causal = true};
  builtin.alibi_slopes = fovea::view<const float, 2>(slopes.data(), {1, H});
  fovea::softmax_attention(Q, K, V, fovea::bhsd(b.data(), 1, H, S, D), builtin);
  const double alibi_diff = max_diff();

  // 2. Packed documents: tokens attend (causally) only inside their own document.
  const long starts[] = {0, 170, 420, 421, 800, S};  // five documents, one of length 1
  std::vector<int> doc(S);
  for (int d = 0; d < 5; ++d) std::fill(doc.begin() + starts[d], doc.begin() + starts[d + 1], d);
  const auto same_document =
      fovea::with_mask_mod([&](auto, auto, auto i, auto j) { return doc[i] == doc[j]; });
  fovea::softmax_attention(Q, K, V, fovea::bhsd(a.data(), 1, H, S, D), {.causal = true},
                           same_document);
  for (int d = 0; d < 5; ++d) {  // each document on its own
    const long s0 = starts[d], n = starts[d + 1] - starts[d];
    auto part = [&](auto view) { return fovea::slice(view, 2, s0, n); };
    fovea::softmax_attention(part(Q), part(K), part(V), part(fovea::bhsd(b.data(), 1, H, S, D)),
                             {.causal = true});
  }
  const double document_diff = max_diff();

  std::printf("custom variants (H=%ld, S=%ld, D=%ld)\n", H, S, D);
  std::printf("  ALiBi as a score_mod vs the alibi_slopes option: max diff %.2e\n", alibi_diff);
  std::printf("  document mask as a mask_mod vs one call per document: max diff %.2e\n",
              document_diff);
  return alibi_diff < 1e-4 && document_diff < 1e-5 ? 0 : 1;
}
