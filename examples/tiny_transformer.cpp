// A small decoder-only transformer forward pass (random weights): token embedding, then
// layers of RMSNorm -> q/k/v projections -> rotary embedding -> causal attention -> output
// projection -> RMSNorm -> SiLU MLP, each with a residual, and tied output logits. The
// attention layer is picked on the command line, which is the part to copy into a model:
//   tiny_transformer [softmax|linear|agent|routing|hip|dma]   (default: all of them)
// Projections and the MLP use Eigen; q, k, v and the attention output are row-major
// (tokens, heads * head_dim) matrices that fovea reads in place as bshd views.
#include <Eigen/Core>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fovea/fovea.hpp>
#include <random>
#include <string>
#include <vector>

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct config {
  long vocab = 1000, tokens = 2048, width = 256, heads = 4, kv_heads = 2, layers = 2, mlp = 768;
  long head_dim() const { return width / heads; }
};

Matrix random_matrix(long rows, long cols, std::mt19937& gen, float scale) {
  std::normal_distribution<float> normal(0.f, scale);
  Matrix m(rows, cols);
  for (long i = 0; i < m.size(); ++i) m.data()[i] = normal(gen);
  return m;
}

Matrix rms_norm(const Matrix& x) {
  Matrix y(x.rows(), x.cols());
  for (long r = 0; r < x.rows(); ++r)
    y.row(r) = x.row(r) / std::sqrt(x.row(r).squaredNorm() / float(x.cols()) + 1e-6f);
  return y;
}

/// Rotary position embedding on each head's (2i, 2i + 1) pairs.
void rotary(Matrix& x, long heads, long dim) {
  for (long t = 0; t < x.rows(); ++t)
    for (long h = 0; h < heads; ++h)
      for (long i = 0; i < dim / 2; ++i) {
        const float angle = float(t) * std::pow(10000.f, -2.f * float(i) / float(dim));
        float& a = x(t, h * dim + 2 * i);
        float& b = x(t, h * dim + 2 * i + 1);
        const float c = std::cos(angle), s = std::sin(angle), a0 = a;
        a = a0 * c - b * s;
        b = a0 * s + b * c;
      }
}

struct layer {
  Matrix wq, wk, wv, wo, w1, w2, agents, w_dt;
  std::vector<float> a_dt;
};

/// The attention layer, by name: out (tokens, heads * dim) from q, k, v in bshd views.
void attend(const std::string& kind, const config& c, const layer& l, const Matrix& q,
            const Matrix& k, const Matrix& v, Matrix& out) {
  const long N = c.tokens, H = c.heads, Hk = c.kv_heads, d = c.head_dim();
  const auto Q = fovea::bshd<const float>(q.data(), 1, N, H, d);
  const auto K = fovea::bshd<const float>(k.data(), 1, N, Hk, d);
  const auto V = fovea::bshd<const float>(v.data(), 1, N, Hk, d);
  const auto O = fovea::bshd(out.data(), 1, N, H, d);
  if (kind == "softmax") {
    fovea::softmax_attention(Q, K, V, O, {.causal = true});
  } else if (kind == "linear") {
    fovea::linear_attention(Q, K, V, O, {.causal = true});
  } else if (kind == "agent") {  // causal: learned (sequence-independent) agents
    fovea::agent_attention(Q, K, V, O, fovea::bhsd<const float>(l.agents.data(), 1, H, 64, d),
                           {.causal = true});
  } else if (kind == "routing") {
    fovea::routing_attention(Q, K, V, O, {.causal = true, .num_clusters = 8, .window = N / 8});
  } else if (kind == "hip") {
    fovea::hip_attention(Q, K, V, O, {.causal = true, .top_k = 256});
  } else if (kind == "dma") {  // bias from the value states, as the Doge models do
    std::vector<float> bias(Hk * N);
    fovea::dynamic_mask_bias(V, fovea::view<const float, 2>(l.w_dt.data(), {Hk, Hk * d}),
                             fovea::view<const float, 1>(l.a_dt.data(), {Hk}),
                             fovea::bhsd(bias.data(), 1, Hk, 1, N));
    fovea::dynamic_mask_attention(Q, K, V, O, fovea::bhsd<const float>(bias.data(), 1, Hk, 1, N),
                                  {.causal = true, .keep = 512});
  }
}

int main(int argc, char** argv) {
  std::printf("fovea: %s\n", fovea::build_info().c_str());  // backend, OpenMP, -O
  const config c;
  const long d = c.head_dim();
  std::mt19937 gen(2024);
  const Matrix embedding = random_matrix(c.vocab, c.width, gen, 1.f);
  std::vector<layer> layers(c.layers);
  for (layer& l : layers) {
    const float s = 1.f / std::sqrt(float(c.width));
    l.wq = random_matrix(c.width, c.heads * d, gen, s);
    l.wk = random_matrix(c.width, c.kv_heads * d, gen, s);
    l.wv = random_matrix(c.width, c.kv_heads * d, gen, s);
    l.wo = random_matrix(c.heads * d, c.width, gen, s);
    l.w1 = random_matrix(c.width, c.mlp, gen, s);
    l.w2 = random_matrix(c.mlp, c.width, gen, 1.f / std::sqrt(float(c.mlp)));
    l.agents = random_matrix(c.heads * 64, d, gen, 1.f);
    l.w_dt = random_matrix(c.kv_heads, c.kv_heads * d, gen, 0.1f);
    l.a_dt.assign(c.kv_heads, -1.f);
  }
  std::uniform_int_distribution<long> token(0, c.vocab - 1);
  std::vector<long> tokens(c.tokens);
  for (long& t : tokens) t = token(gen);

  std::vector<std::string> kinds = {"softmax", "linear", "agent", "routing", "hip", "dma"};
  if (argc > 1) kinds = {argv[1]};
  std::printf("tiny transformer: %ld layers, width %ld, %ld heads (%ld kv), %ld tokens\n", c.layers,
              c.width, c.heads, c.kv_heads, c.tokens);
  for (const std::string& kind : kinds) {
    if (kind != "softmax" && kind != "linear" && kind != "agent" && kind != "routing" &&
        kind != "hip" && kind != "dma") {
      std::fprintf(stderr, "unknown attention '%s'\n", kind.c_str());
      return 2;
    }
    Matrix x(c.tokens, c.width);
    for (long t = 0; t < c.tokens; ++t) x.row(t) = embedding.row(tokens[t]);
    double attention_ms = 0;
    const auto start = std::chrono::steady_clock::now();
    for (const layer& l : layers) {
      const Matrix h = rms_norm(x);
      Matrix q = h * l.wq, k = h * l.wk, v = h * l.wv, out(c.tokens, c.heads * d);
      rotary(q, c.heads, d);
      rotary(k, c.kv_heads, d);
      const auto t0 = std::chrono::steady_clock::now();
      attend(kind, c, l, q, k, v, out);
      attention_ms +=
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      x += out * l.wo;
      Matrix up = rms_norm(x) * l.w1;
      for (long i = 0; i < up.size(); ++i) up.data()[i] /= 1.f + std::exp(-up.data()[i]);  // SiLU
      x += up * l.w2;
    }
    const Eigen::RowVectorXf logits = rms_norm(x).row(c.tokens - 1) * embedding.transpose();
    Eigen::Index next = 0;
    logits.maxCoeff(&next);
    const double total_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::printf("  %-8s forward %7.1f ms (attention %6.1f ms), next token %4ld, logit %.4f\n",
                kind.c_str(), total_ms, attention_ms, long(next), logits(next));
    if (!std::isfinite(logits(next))) return 1;
  }
  return 0;
}
