// One long causal sequence through dense softmax attention, HiP and dynamic-mask
// attention: the time of each and, for a sample of queries, the fraction of the exact
// softmax mass the sparse selections keep. The input has retrieval structure: queries ask
// about one of 16 topics whose keys sit in two 128-token segments far back.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fovea/fovea.hpp>
#include <functional>
#include <random>
#include <vector>

int main() {
  std::printf("fovea: %s\n", fovea::build_info().c_str());  // backend, OpenMP, -O
  const long N = 16384, D = 128, topics = 16;
  std::mt19937_64 gen(77);
  std::normal_distribution<float> g;
  std::vector<float> q(N * D), k(N * D), v(N * D), dir(topics * D), out(N * D);
  for (float& e : dir) e = g(gen);
  for (float& e : k) e = 0.5f * g(gen);
  for (float& e : v) e = g(gen);
  for (long i = 0; i < N; ++i)
    for (long d = 0; d < D; ++d) q[i * D + d] = dir[(i / 64) % topics * D + d] + 0.3f * g(gen);
  std::uniform_int_distribution<long> where(16, N / 2 - 128);
  for (long t = 0; t < topics; ++t)
    for (int segment = 0; segment < 2; ++segment)
      for (long j = where(gen), end = j + 128; j < end; ++j)
        for (long d = 0; d < D; ++d) k[j * D + d] = 0.8f * dir[t * D + d] + 0.3f * g(gen);

  const auto Q = fovea::bhsd<const float>(q.data(), 1, 1, N, D);
  const auto K = fovea::bhsd<const float>(k.data(), 1, 1, N, D);
  const auto V = fovea::bhsd<const float>(v.data(), 1, 1, N, D);
  const auto O = fovea::bhsd(out.data(), 1, 1, N, D);
  auto time_ms = [](auto&& run) {
    const auto t0 = std::chrono::steady_clock::now();
    run();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };

  const double dense_ms = time_ms([&] { fovea::softmax_attention(Q, K, V, O, {.causal = true}); });
  const fovea::hip_options hip{.causal = true, .top_k = 512};
  const double hip_ms = time_ms([&] { fovea::hip_attention(Q, K, V, O, hip); });
  const auto selection = fovea::hip_select(Q, K, hip);
  // The dynamic mask's bias comes from the values (a random W_dt stands in for a trained one).
  std::vector<float> bias(N), w(D), a = {-1.f};
  for (float& e : w) e = 0.1f * g(gen);
  fovea::dynamic_mask_bias(V, fovea::view<const float, 2>(w.data(), {1, D}),
                           fovea::view<const float, 1>(a.data(), {1}),
                           fovea::bhsd(bias.data(), 1, 1, 1, N));
  const auto B = fovea::bhsd<const float>(bias.data(), 1, 1, 1, N);
  const double dma_ms = time_ms(
      [&] { fovea::dynamic_mask_attention(Q, K, V, O, B, {.causal = true, .keep = 2048}); });

  // Exact softmax mass on the keys each method lets a sampled query see.
  double hip_mass = 0, dma_mass = 0;
  long samples = 0;
  std::vector<double> s(N);
  for (long i = N / 2; i < N; i += 257, ++samples) {
    double m = -INFINITY, total = 0, kept_hip = 0, kept_dma = 0;
    for (long j = 0; j <= i; ++j) {
      double dot = 0;
      for (long d = 0; d < D; ++d) dot += double(q[i * D + d]) * k[j * D + d];
      m = std::max(m, s[j] = dot / std::sqrt(double(D)));
    }
    // DMA: the 2048 keys <= i of largest bias.
    std::vector<float> sorted(bias.begin(), bias.begin() + i + 1);
    std::nth_element(sorted.begin(), sorted.begin() + 2047, sorted.end(), std::greater<>());
    const float bar = sorted[2047];
    for (long j = 0; j <= i; ++j) {
      const double e = std::exp(s[j] - m);
      total += e;
      bool in_hip = j < 16 || j + 256 > i;  // sinks and window
      for (const std::int32_t start : selection.blocks(0, 0, i / 64))
        in_hip = in_hip || (j >= start && j < start + 2);
      if (in_hip) kept_hip += e;
      if (bias[j] >= bar) kept_dma += e;
    }
    hip_mass += kept_hip / total;
    dma_mass += kept_dma / total;
  }
  std::printf("causal attention over N=%ld tokens, D=%ld, %s\n", N, D,
              fovea::default_backend::name());
  std::printf("  dense softmax        %8.1f ms   keeps 100%% of the attention mass\n", dense_ms);
  std::printf("  HiP top_k=512        %8.1f ms   keeps %5.1f%% (sinks + 512 keys + window)\n",
              hip_ms, 100 * hip_mass / samples);
  std::printf("  dynamic mask (2048)  %8.1f ms   keeps %5.1f%% (its bias ignores q)\n", dma_ms,
              100 * dma_mass / samples);
  return 0;
}
