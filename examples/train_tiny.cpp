// Trains a one-layer attention model on associative recall, on the CPU, in seconds:
// fovea's attention forward and its backward (softmax_attention_backward, or
// linear_attention_backward with --attention linear), Eigen for the projections and for
// Adam.
//
// The task: a sequence of n (key, value) pairs, each shown as one token (the key's
// embedding plus the value's), then a query key; the answer is the value paired with it.
// One attention head solves it by matching the query to the keys: the query token
// attends over the pair tokens, and a linear read-out of the attended value gives the
// answer's logits. Prints the loss curve and the accuracy on fresh sequences; exits with
// status 1 below 95%. Linear attention (elu+1) matches keys less sharply than softmax's
// exp, so it trains for 900 steps by default (600 for softmax): 97-99% over seeds 1-4.
//
//   train_tiny [--attention softmax|linear] [--steps N] [--pairs n] [--threads N] [--seed S]
#include <Eigen/Dense>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fovea/fovea.hpp>
#include <random>
#include <string>
#include <vector>

namespace {

using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// One parameter matrix with its Adam moments.
struct parameter {
  matrix w, grad, m, v;
  parameter(Eigen::Index rows, Eigen::Index cols, float scale, std::mt19937& gen)
      : w(rows, cols), grad(matrix::Zero(rows, cols)), m(matrix::Zero(rows, cols)),
        v(matrix::Zero(rows, cols)) {
    std::normal_distribution<float> dist(0.f, scale);
    for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = dist(gen);
  }
  /// Adam (Kingma & Ba), bias-corrected, step t >= 1.
  void adam(float lr, int t, float b1 = 0.9f, float b2 = 0.999f, float eps = 1e-8f) {
    m = b1 * m + (1 - b1) * grad;
    v = b2 * v + (1 - b2) * grad.cwiseProduct(grad);
    const float c1 = 1 - std::pow(b1, float(t)), c2 = 1 - std::pow(b2, float(t));
    w.array() -= lr * (m.array() / c1) / ((v.array() / c2).sqrt() + eps);
    grad.setZero();
  }
};

struct batch {
  std::vector<int> keys, values;  ///< (sequences, pairs)
  std::vector<int> query, answer;  ///< (sequences)
};

/// Sequences of `pairs` distinct keys (of `vocab`), each with a random value.
batch make_batch(int sequences, int pairs, int vocab, std::mt19937& gen) {
  batch b;
  std::vector<int> pool(vocab);
  for (int i = 0; i < vocab; ++i) pool[i] = i;
  std::uniform_int_distribution<int> value(0, vocab - 1), pick(0, pairs - 1);
  for (int s = 0; s < sequences; ++s) {
    std::shuffle(pool.begin(), pool.end(), gen);
    const int asked = pick(gen);
    for (int p = 0; p < pairs; ++p) {
      b.keys.push_back(pool[p]);
      b.values.push_back(value(gen));
    }
    b.query.push_back(b.keys[s * pairs + asked]);
    b.answer.push_back(b.values[s * pairs + asked]);
  }
  return b;
}

struct model {
  bool linear;  ///< linear attention (elu + 1) instead of softmax
  int vocab, dim;
  parameter key_embed, value_embed, wq, wk, wv, readout;
  model(bool linear_, int vocab_, int dim_, std::mt19937& gen)
      : linear(linear_), vocab(vocab_), dim(dim_), key_embed(vocab, dim, 1.f, gen), value_embed(vocab, dim, 1.f, gen),
        wq(dim, dim, 1.f / std::sqrt(float(dim)), gen), wk(dim, dim, 1.f / std::sqrt(float(dim)), gen),
        wv(dim, dim, 1.f / std::sqrt(float(dim)), gen), readout(dim, vocab, 1.f / std::sqrt(float(dim)), gen) {}

  /// Loss (mean cross-entropy) and accuracy of a batch; with `train`, the gradients too.
  std::pair<float, float> step(const batch& b, int pairs, int threads, bool train) {
    const int S = int(b.query.size()), n = pairs, d = dim;
    matrix x(S * n, d), xq(S, d);
    for (int r = 0; r < S * n; ++r)
      x.row(r) = key_embed.w.row(b.keys[r]) + value_embed.w.row(b.values[r]);
    for (int s = 0; s < S; ++s) xq.row(s) = key_embed.w.row(b.query[s]);
    const matrix q = xq * wq.w, k = x * wk.w, v = x * wv.w;
    matrix o(S, d);
    std::vector<float> lse(S);
    // one query per sequence over its n pair tokens: (S, 1 head, 1, d) against (S, 1, n, d)
    const auto Q = fovea::bhsd<const float>(q.data(), S, 1, 1, d);
    const auto K = fovea::bhsd<const float>(k.data(), S, 1, n, d);
    const auto V = fovea::bhsd<const float>(v.data(), S, 1, n, d);
    const fovea::linear_options linear_options{.threads = threads};
    if (linear)
      fovea::linear_attention(Q, K, V, fovea::bhsd(o.data(), S, 1, 1, d), linear_options);
    else
      fovea::softmax_attention(Q, K, V, fovea::bhsd(o.data(), S, 1, 1, d),
                               {.lse = fovea::view(lse.data(), {S, 1, 1}), .threads = threads});
    const matrix logits = o * readout.w;
    float loss = 0;
    int right = 0;
    matrix dlogits(S, vocab);
    for (int s = 0; s < S; ++s) {
      Eigen::Index best;
      const float top = logits.row(s).maxCoeff(&best);
      right += best == b.answer[s];
      const Eigen::RowVectorXf e = (logits.row(s).array() - top).exp();
      const float z = e.sum();
      loss += std::log(z) - (logits(s, b.answer[s]) - top);
      dlogits.row(s) = e / z / float(S);
      dlogits(s, b.answer[s]) -= 1.f / float(S);
    }
    if (train) {
      readout.grad += o.transpose() * dlogits;
      const matrix dout = dlogits * readout.w.transpose();
      matrix dq(S, d), dk(S * n, d), dv(S * n, d);
      const auto O = fovea::bhsd<const float>(o.data(), S, 1, 1, d);
      const auto dO = fovea::bhsd<const float>(dout.data(), S, 1, 1, d);
      const auto dQ = fovea::bhsd(dq.data(), S, 1, 1, d);
      const auto dK = fovea::bhsd(dk.data(), S, 1, n, d), dV = fovea::bhsd(dv.data(), S, 1, n, d);
      if (linear)
        fovea::linear_attention_backward(Q, K, V, O, dO, dQ, dK, dV, linear_options);
      else
        fovea::softmax_attention_backward(Q, K, V, O, dO, fovea::view<const float>(lse.data(), {S, 1, 1}),
                                          dQ, dK, dV, {.threads = threads});
      wq.grad += xq.transpose() * dq;
      wk.grad += x.transpose() * dk;
      wv.grad += x.transpose() * dv;
      const matrix dx = dk * wk.w.transpose() + dv * wv.w.transpose();
      const matrix dxq = dq * wq.w.transpose();
      for (int r = 0; r < S * n; ++r) {
        key_embed.grad.row(b.keys[r]) += dx.row(r);
        value_embed.grad.row(b.values[r]) += dx.row(r);
      }
      for (int s = 0; s < S; ++s) key_embed.grad.row(b.query[s]) += dxq.row(s);
    }
    return {loss / float(S), float(right) / float(S)};
  }
  void update(float lr, int t) {
    for (parameter* p : {&key_embed, &value_embed, &wq, &wk, &wv, &readout}) p->adam(lr, t);
  }
};

}  // namespace

int main(int argc, char** argv) {
  int steps = 0, pairs = 16, threads = 1, vocab = 32, dim = 32, sequences = 64;
  unsigned seed = 1;
  bool linear = false;
  for (int i = 1; i < argc; ++i) {
    auto value = [&] {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", argv[i]);
        std::exit(2);
      }
      return std::stoi(argv[++i]);
    };
    if (!std::strcmp(argv[i], "--attention") && i + 1 < argc &&
        (!std::strcmp(argv[i + 1], "softmax") || !std::strcmp(argv[i + 1], "linear")))
      linear = !std::strcmp(argv[++i], "linear");
    else if (!std::strcmp(argv[i], "--steps")) steps = value();
    else if (!std::strcmp(argv[i], "--pairs")) pairs = value();
    else if (!std::strcmp(argv[i], "--threads")) threads = value();
    else if (!std::strcmp(argv[i], "--seed")) seed = unsigned(value());
    else {
      std::fprintf(stderr, "usage: train_tiny [--attention softmax|linear] [--steps N] [--pairs n] "
                           "[--threads N] [--seed S]\n");
      return 2;
    }
  }
  if (steps == 0) steps = linear ? 900 : 600;
  if (pairs < 1 || pairs > vocab || steps < 1) {
    std::fprintf(stderr, "train_tiny: need 1 <= pairs <= %d and steps >= 1\n", vocab);
    return 2;
  }
  std::mt19937 gen(seed);
  model m(linear, vocab, dim, gen);
  std::printf("associative recall: %d pairs of %d keys and values, dim %d, batch %d, Adam, %s attention\n",
              pairs, vocab, dim, sequences, linear ? "linear" : "softmax");
  for (int t = 1; t <= steps; ++t) {
    const batch b = make_batch(sequences, pairs, vocab, gen);
    const auto [loss, accuracy] = m.step(b, pairs, threads, true);
    m.update(3e-3f, t);
    if (t == 1 || t % 50 == 0)
      std::printf("step %4d  loss %.4f  batch accuracy %.2f\n", t, loss, accuracy);
  }
  const batch test = make_batch(2000, pairs, vocab, gen);
  const auto [loss, accuracy] = m.step(test, pairs, threads, false);
  std::printf("held-out: loss %.4f, accuracy %.1f%% on 2000 fresh sequences\n", loss,
              100 * accuracy);
  return accuracy >= 0.95f ? 0 : 1;
}
