// The recipes of examples/recipes.hpp on random weights: Gaussian Adaptive Attention,
// RCMHA (depthwise-convolved Q/K/V with Transformer-XL relative terms as a score_mod), and
// a low-rank global context query per head (one Sq = 1 call). tests/examples/
// recipes_test.cpp checks each against its definition in double precision.
#include "recipes.hpp"

#include <chrono>
#include <cstdio>
#include <random>

int main() {
  std::printf("fovea: %s\n", fovea::build_info().c_str());
  const recipes::index S = 512, F = 256, heads = 4, D = F / heads;
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  auto random = [&](recipes::index rows, recipes::index cols, float sd) {
    recipes::matrix m(rows, cols);
    for (float& e : m.reshaped()) e = sd * normal(gen);
    return m;
  };
  const recipes::matrix x = random(S, F, 1.f);
  auto seconds = [](auto&& f) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };

  recipes::matrix y;
  const double gaam = seconds([&] {
    y = recipes::gaussian_adaptive(x, heads, random(heads, 2, 0.1f), random(heads, 2, 1.f));
  });
  std::printf(
      "Gaussian Adaptive Attention, S=%ld F=%ld, 2 Gaussians per head: %.2f ms, "
      "|y| mean %.4f\n",
      long(S), long(F), gaam * 1e3, y.cwiseAbs().mean());

  const float w_scale = 1.f / std::sqrt(float(F));
  const recipes::rcmha_weights w{
      random(F, F, w_scale), random(F, F, w_scale),  random(F, F, w_scale),
      random(3, F, 0.5f),    random(3, F, 0.5f),     random(3, F, 0.5f),
      random(F, F, w_scale), random(heads, D, 0.1f), random(heads, D, 0.1f)};
  const double rcmha = seconds([&] { y = recipes::rcmha_attention(x, w, heads); });
  std::printf("RCMHA, S=%ld F=%ld H=%ld, kernel 3, causal: %.2f ms, output |y| mean %.4f\n",
              long(S), long(F), long(heads), rcmha * 1e3, y.cwiseAbs().mean());

  const recipes::matrix context = random(heads, D, 1.f);
  const double low_rank = seconds([&] { y = recipes::global_context(context, x, x); });
  std::printf("global context query per head over S=%ld tokens: %.3f ms, (%ld, %ld) context\n",
              long(S), low_rank * 1e3, long(y.rows()), long(y.cols()));
  return 0;
}
