// Recipes for three of the seed papers' model-level mechanisms that are not attention
// kernels of their own, each written with what fovea already has (or without it where no
// Q K^T is involved), and checked against its definition in tests/examples/recipes_test.cpp:
//
// 1. Gaussian Adaptive Attention (Ioannides et al., "Gaussian Adaptive Attention is All You
//    Need", 2024; reference gioannides/Gaussian-Adaptive-Attention): a feature-wise Gaussian
//    reweighting of x along the sequence. No Q K^T, no softmax over keys: element-wise
//    arithmetic on (S, F) arrays, which Eigen expressions do as well as any kernel would.
// 2. RCMHA (Sugiharto et al., "RCMHA: Relative Convolutional Multi-Head Attention for
//    Natural Language Modelling", 2023): Q, K and V go through a causal depthwise
//    convolution, and the logits gain Transformer-XL's relative-position terms
//    (Dai et al. 2019, terms (b)-(d)). Softmax attention with a score_mod: the terms are
//    GEMMs precomputed with Eigen, looked up by the score_mod.
// 3. Low-rank factorised attention with a learned global context query per head: every
//    token receives the same context, softmax(c_h K_h^T / sqrt(D)) V_h, which is one
//    softmax_attention call with Sq = 1 per head (cost O(S D), not O(S^2 D)).
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <fovea/fovea.hpp>
#include <numbers>
#include <vector>

namespace recipes {

using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using index = Eigen::Index;

/// Gaussian Adaptive Attention on x (S tokens, F features), F split into `heads` groups of
/// features; group h has G Gaussians with mean offsets delta(h, g) and scales c(h, g)
/// ((heads, G) each). Per feature f: mean mu_f and unbiased variance var_f over the tokens
/// (+ eps); for each Gaussian, y = (x - (mu_f + delta)) / sqrt(var_f) and
/// N(y) = exp(-y^2 / (2 c^2)) / sqrt(2 pi c^2); the mixture (their product) is divided by
/// its sum over the tokens (at least eps); the result is x times the mixture.
inline matrix gaussian_adaptive(const matrix& x, index heads, const matrix& delta, const matrix& c,
                                float eps = 1e-8f) {
  const index S = x.rows(), F = x.cols(), per_head = F / heads;
  matrix out(S, F);
  for (index f = 0; f < F; ++f) {
    const index h = f / per_head;
    const auto column = x.col(f).array();
    const float mean = column.mean();
    const float var = (column - mean).square().sum() / float(std::max<index>(S - 1, 1)) + eps;
    Eigen::ArrayXf mixture = Eigen::ArrayXf::Ones(S);
    for (index g = 0; g < delta.cols(); ++g) {
      const float cg = c(h, g);
      const Eigen::ArrayXf y = (column - (mean + delta(h, g))) / std::sqrt(var);
      mixture *=
          (-y.square() / (2 * cg * cg)).exp() / std::sqrt(2 * std::numbers::pi_v<float> * cg * cg);
    }
    mixture /= std::max(mixture.sum(), eps);
    out.col(f) = (column * mixture).matrix();
  }
  return out;
}

/// y_t = sum_{r < kernel} w(r, :) * x_{t - r} per feature (zeros before the first token):
/// a causal depthwise convolution, w (kernel, F).
inline matrix depthwise_causal_conv(const matrix& x, const matrix& w) {
  matrix y = matrix::Zero(x.rows(), x.cols());
  for (index t = 0; t < x.rows(); ++t)
    for (index r = 0; r < w.rows() && r <= t; ++r)
      y.row(t).array() += w.row(r).array() * x.row(t - r).array();
  return y;
}

/// Transformer-XL's sinusoidal embedding of the distances 0 .. S-1: (S, F).
inline matrix relative_embedding(index S, index F) {
  matrix r(S, F);
  for (index d = 0; d < S; ++d)
    for (index f = 0; f < F / 2; ++f) {
      const double freq = std::pow(10000.0, -2.0 * double(f) / double(F));
      r(d, f) = float(std::sin(double(d) * freq));
      r(d, F / 2 + f) = float(std::cos(double(d) * freq));
    }
  return r;
}

struct rcmha_weights {
  matrix wq, wk, wv;              ///< (F, F) projections, x W^T
  matrix conv_q, conv_k, conv_v;  ///< (kernel, F) depthwise filters
  matrix wr;                      ///< (F, F) projection of the relative embedding
  matrix u, v;                    ///< (heads, D) Transformer-XL's content and position biases
};

/// RCMHA's causal self-attention on x (S, F) with `heads` heads of D = F / heads: q, k, v =
/// conv(x W^T); logit(i, j) = (q_i . k_j + u_h . k_j + (q_i + v_h) . r_{i-j}) / sqrt(D) for
/// j <= i, r = relative_embedding W_r^T; softmax over j; returns the heads' outputs (S, F)
/// (before the output projection). fovea computes q_i . k_j / sqrt(D) and the softmax; the
/// score_mod adds the two precomputed terms.
inline matrix rcmha_attention(const matrix& x, const rcmha_weights& w, index heads) {
  const index S = x.rows(), F = x.cols(), D = F / heads;
  const matrix q = depthwise_causal_conv(x * w.wq.transpose(), w.conv_q);
  const matrix k = depthwise_causal_conv(x * w.wk.transpose(), w.conv_k);
  const matrix v = depthwise_causal_conv(x * w.wv.transpose(), w.conv_v);
  const matrix r = relative_embedding(S, F) * w.wr.transpose();
  const float scale = 1.0f / std::sqrt(float(D));
  std::vector<matrix> position(heads);  // (i, distance): (q_i + v_h) . r_distance, scaled
  matrix content(heads, S);             // (h, j): u_h . k_j, scaled
  for (index h = 0; h < heads; ++h) {
    const matrix qv = q.middleCols(h * D, D).rowwise() + w.v.row(h);
    position[h] = scale * (qv * r.middleCols(h * D, D).transpose());
    content.row(h) = scale * (k.middleCols(h * D, D) * w.u.row(h).transpose()).transpose();
  }
  // (The engine may ask for keys past the causal band before hiding them: no lookup there.)
  const auto relative = fovea::with_score_mod([&](float s, auto, auto h, auto i, auto j) {
    return j <= i ? s + content(h, j) + position[h](i, i - j) : s;
  });
  matrix out(S, F);
  auto view = [&](const matrix& m) { return fovea::bshd<const float>(m.data(), 1, S, heads, D); };
  fovea::softmax_attention(view(q), view(k), view(v), fovea::bshd(out.data(), 1, S, heads, D),
                           {.causal = true}, relative);
  return out;
}

/// Low-rank factorised attention's global context: for each head, the learned query
/// context(h, :) (heads, D) attends over all S tokens of k and v (S, F); returns (heads, D),
/// the context every token of the head receives. One Sq = 1 softmax_attention call.
inline matrix global_context(const matrix& context, const matrix& k, const matrix& v) {
  const index heads = context.rows(), D = context.cols(), S = k.rows();
  matrix out(heads, D);
  fovea::softmax_attention(fovea::bhsd<const float>(context.data(), 1, heads, 1, D),
                           fovea::bshd<const float>(k.data(), 1, S, heads, D),
                           fovea::bshd<const float>(v.data(), 1, S, heads, D),
                           fovea::bhsd(out.data(), 1, heads, 1, D));
  return out;
}

}  // namespace recipes
