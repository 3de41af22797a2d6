// The recipes of examples/recipes.hpp against their definitions computed in double from
// the same inputs, written out term by term (no Eigen, no fovea): Gaussian Adaptive
// Attention, RCMHA's convolved Q/K/V and Transformer-XL relative logits, and the global
// context query.
#include "../../examples/recipes.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numbers>
#include <random>
#include <vector>

namespace {

using recipes::index;
using recipes::matrix;

matrix random_matrix(index rows, index cols, float sd, std::mt19937& gen) {
  std::normal_distribution<float> normal(0.f, sd);
  matrix m(rows, cols);
  for (index r = 0; r < rows; ++r)
    for (index c = 0; c < cols; ++c) m(r, c) = normal(gen);
  return m;
}

using table = std::vector<std::vector<double>>;

/// Largest |got - want| over the largest |want| (1 at least).
double relative_error(const matrix& got, const table& want) {
  double err = 0, top = 1;
  for (index r = 0; r < got.rows(); ++r)
    for (index c = 0; c < got.cols(); ++c) {
      err = std::max(err, std::abs(double(got(r, c)) - want[r][c]));
      top = std::max(top, std::abs(want[r][c]));
    }
  return err / top;
}

TEST(Recipes, GaussianAdaptiveAttentionIsItsDefinition) {
  std::mt19937 gen(1);
  const index S = 37, F = 12, heads = 3, G = 2;
  const matrix x = random_matrix(S, F, 1.f, gen), delta = random_matrix(heads, G, 0.3f, gen);
  const matrix c = random_matrix(heads, G, 1.f, gen);
  const matrix got = recipes::gaussian_adaptive(x, heads, delta, c);
  table want(S, std::vector<double>(F));
  for (index f = 0; f < F; ++f) {
    const index h = f / (F / heads);
    double mean = 0, var = 0;
    for (index t = 0; t < S; ++t) mean += x(t, f);
    mean /= double(S);
    for (index t = 0; t < S; ++t) var += (x(t, f) - mean) * (x(t, f) - mean);
    var = var / double(S - 1) + 1e-8;
    std::vector<double> mixture(S, 1.0);
    double total = 0;
    for (index t = 0; t < S; ++t) {
      for (index g = 0; g < G; ++g) {
        const double y = (x(t, f) - (mean + delta(h, g))) / std::sqrt(var), cg = c(h, g);
        mixture[t] *= std::exp(-y * y / (2 * cg * cg)) / std::sqrt(2 * std::numbers::pi * cg * cg);
      }
      total += mixture[t];
    }
    for (index t = 0; t < S; ++t) want[t][f] = x(t, f) * mixture[t] / std::max(total, 1e-8);
  }
  EXPECT_LT(relative_error(got, want), 1e-5);
}

TEST(Recipes, RcmhaIsConvolvedAttentionWithTransformerXlTerms) {
  std::mt19937 gen(2);
  const index S = 70, F = 32, heads = 4, D = F / heads, kernel = 3;
  const matrix x = random_matrix(S, F, 1.f, gen);
  const float ws = 1.f / std::sqrt(float(F));
  const recipes::rcmha_weights w{
      random_matrix(F, F, ws, gen),        random_matrix(F, F, ws, gen),
      random_matrix(F, F, ws, gen),        random_matrix(kernel, F, 0.5f, gen),
      random_matrix(kernel, F, 0.5f, gen), random_matrix(kernel, F, 0.5f, gen),
      random_matrix(F, F, ws, gen),        random_matrix(heads, D, 0.5f, gen),
      random_matrix(heads, D, 0.5f, gen)};
  const matrix got = recipes::rcmha_attention(x, w, heads);

  auto project_conv = [&](const matrix& W, const matrix& filter) {
    table p(S, std::vector<double>(F, 0.0)), y(S, std::vector<double>(F, 0.0));
    for (index t = 0; t < S; ++t)
      for (index o = 0; o < F; ++o)
        for (index i = 0; i < F; ++i) p[t][o] += double(x(t, i)) * W(o, i);
    for (index t = 0; t < S; ++t)
      for (index f = 0; f < F; ++f)
        for (index r = 0; r < kernel && r <= t; ++r) y[t][f] += double(filter(r, f)) * p[t - r][f];
    return y;
  };
  const table q = project_conv(w.wq, w.conv_q), k = project_conv(w.wk, w.conv_k),
              v = project_conv(w.wv, w.conv_v);
  table rel(S, std::vector<double>(F, 0.0));  // sinusoid(distance) W_r^T
  for (index d = 0; d < S; ++d)
    for (index o = 0; o < F; ++o)
      for (index i = 0; i < F; ++i) {
        const double freq = std::pow(10000.0, -2.0 * double(i % (F / 2)) / double(F));
        const double e = i < F / 2 ? std::sin(double(d) * freq) : std::cos(double(d) * freq);
        rel[d][o] += e * w.wr(o, i);
      }
  table want(S, std::vector<double>(F, 0.0));
  for (index h = 0; h < heads; ++h)
    for (index i = 0; i < S; ++i) {
      std::vector<double> logit(i + 1);
      double top = -INFINITY, z = 0;
      for (index j = 0; j <= i; ++j) {
        double s = 0;
        for (index d = 0; d < D; ++d) {
          const index f = h * D + d;
          s += q[i][f] * k[j][f] + double(w.u(h, d)) * k[j][f] +
               (q[i][f] + w.v(h, d)) * rel[i - j][f];
        }
        logit[j] = s / std::sqrt(double(D));
        top = std::max(top, logit[j]);
      }
      for (index j = 0; j <= i; ++j) z += std::exp(logit[j] - top);
      for (index j = 0; j <= i; ++j)
        for (index d = 0; d < D; ++d)
          want[i][h * D + d] += std::exp(logit[j] - top) / z * v[j][h * D + d];
    }
  EXPECT_LT(relative_error(got, want), 2e-5);
}

TEST(Recipes, GlobalContextIsOneQueryPerHead) {
  std::mt19937 gen(3);
  const index S = 300, heads = 4, D = 16;
  const matrix context = random_matrix(heads, D, 1.f, gen);
  const matrix k = random_matrix(S, heads * D, 1.f, gen), v = random_matrix(S, heads * D, 1.f, gen);
  const matrix got = recipes::global_context(context, k, v);
  table want(heads, std::vector<double>(D, 0.0));
  for (index h = 0; h < heads; ++h) {
    std::vector<double> logit(S);
    double top = -INFINITY, z = 0;
    for (index j = 0; j < S; ++j) {
      double s = 0;
      for (index d = 0; d < D; ++d) s += double(context(h, d)) * k(j, h * D + d);
      logit[j] = s / std::sqrt(double(D));
      top = std::max(top, logit[j]);
    }
    for (index j = 0; j < S; ++j) z += std::exp(logit[j] - top);
    for (index j = 0; j < S; ++j)
      for (index d = 0; d < D; ++d) want[h][d] += std::exp(logit[j] - top) / z * v(j, h * D + d);
  }
  EXPECT_LT(relative_error(got, want), 1e-5);
}

}  // namespace
