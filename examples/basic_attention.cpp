// Causal softmax attention with grouped-query heads on random data: times fovea, checks
// it against a plain double-precision loop, prints a checksum.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fovea/fovea.hpp>
#include <random>
#include <vector>

int main() {
  std::printf("fovea: %s\n", fovea::build_info().c_str());  // backend, OpenMP, -O
  const long B = 1, H = 8, Hk = 2, S = 1024, D = 64;
  std::vector<float> q(B * H * S * D), k(B * Hk * S * D), v(B * Hk * S * D), o(B * H * S * D);
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) e = normal(gen);

  const auto Q = fovea::bhsd(q.data(), B, H, S, D);
  const auto K = fovea::bhsd(k.data(), B, Hk, S, D);
  const auto V = fovea::bhsd(v.data(), B, Hk, S, D);
  const auto O = fovea::bhsd(o.data(), B, H, S, D);

  fovea::softmax_attention(Q, K, V, O, {.causal = true});  // warm-up
  const auto t0 = std::chrono::steady_clock::now();
  fovea::softmax_attention(Q, K, V, O, {.causal = true});
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // The same thing, naively: every score, a stable softmax per row, in double.
  double max_error = 0, checksum = 0;
  std::vector<double> p(S);
  for (long h = 0; h < H; ++h)
    for (long i = 0; i < S; ++i) {
      double m = -INFINITY, l = 0;
      for (long j = 0; j <= i; ++j) {
        double s = 0;
        for (long d = 0; d < D; ++d) s += double(Q(0, h, i, d)) * K(0, h / (H / Hk), j, d);
        p[j] = s / std::sqrt(double(D));
        m = std::max(m, p[j]);
      }
      for (long j = 0; j <= i; ++j) l += (p[j] = std::exp(p[j] - m));
      for (long d = 0; d < D; ++d) {
        double acc = 0;
        for (long j = 0; j <= i; ++j) acc += p[j] * V(0, h / (H / Hk), j, d);
        max_error = std::max(max_error, std::abs(acc / l - O(0, h, i, d)));
        checksum += O(0, h, i, d);
      }
    }

  const double flops = 4.0 * H * S * S * D / 2;
  std::printf("softmax_attention B=%ld H=%ld Hk=%ld S=%ld D=%ld causal (%s)\n", B, H, Hk, S, D,
              fovea::default_backend::name());
  std::printf("  time %.3f ms, %.1f GFLOP/s\n", seconds * 1e3, flops / seconds / 1e9);
  std::printf("  checksum %.6f, max |fovea - naive double| = %.2e\n", checksum, max_error);
  return max_error < 1e-4 ? 0 : 1;
}
