// A llama2.c checkpoint (karpathy/llama2.c's run.c format) run through fovea: the part
// of the llama2c example to copy into an engine. Eigen does the projections and the MLP;
// fovea does attention: one causal call per layer over the whole prompt (prefill), then
// one decode call per layer and token against a KV cache (contiguous or paged, in f32,
// bf16 or fp16). The other attention families are offered as approximations of the
// trained model (it was trained with softmax attention).
//
// The format: seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
// seq_len; vocab_size < 0: the classifier is stored after the other weights), then fp32
// weights: token embedding (vocab, dim), rms_att (layers, dim), wq (layers, dim, dim),
// wk and wv (layers, kv_dim, dim), wo (layers, dim, dim), rms_ffn (layers, dim), w1
// (layers, hidden, dim), w2 (layers, dim, hidden), w3 (layers, hidden, dim), rms_final
// (dim), two legacy rotary tables (seq_len * head_size / 2 each, unused), and the
// classifier (vocab, dim) when not shared. Matrices are row-major (out, in). Rotary with
// base 10000 on consecutive pairs of each head; RMSNorm eps 1e-5; SwiGLU MLP.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fovea/fovea.hpp>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace llama2c {

using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using weight = Eigen::Map<const matrix>;

struct config {
  int dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0,
      seq_len = 0;
  bool shared_classifier = true;
  int head_size() const { return dim / n_heads; }
  int kv_dim() const { return n_kv_heads * head_size(); }
};

/// The checkpoint's weights, read whole; `load` throws std::runtime_error naming what is
/// wrong (a missing file, a header that cannot be, a size that disagrees with it).
struct checkpoint {
  config c;
  std::vector<float> data;
  const float *embedding = nullptr, *rms_att = nullptr, *wq = nullptr, *wk = nullptr,
              *wv = nullptr, *wo = nullptr, *rms_ffn = nullptr, *w1 = nullptr, *w2 = nullptr,
              *w3 = nullptr, *rms_final = nullptr, *classifier = nullptr;

  static checkpoint load(const std::string& path) {
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "rb"), std::fclose);
    if (!f) throw std::runtime_error(path + ": cannot open the checkpoint");
    std::int32_t h[7];
    if (std::fread(h, sizeof(h), 1, f.get()) != 1)
      throw std::runtime_error(path + ": shorter than the 28-byte header");
    checkpoint ck;
    config& c = ck.c;
    c.dim = h[0], c.hidden_dim = h[1], c.n_layers = h[2], c.n_heads = h[3], c.n_kv_heads = h[4];
    c.vocab_size = std::abs(h[5]), c.seq_len = h[6], c.shared_classifier = h[5] > 0;
    auto bad = [&](const std::string& what) {
      return std::runtime_error(path + ": header: " + what + " (dim " + std::to_string(c.dim) +
                                ", hidden " + std::to_string(c.hidden_dim) + ", layers " +
                                std::to_string(c.n_layers) + ", heads " +
                                std::to_string(c.n_heads) + ", kv heads " +
                                std::to_string(c.n_kv_heads) + ", vocab " +
                                std::to_string(c.vocab_size) + ", seq_len " +
                                std::to_string(c.seq_len) + ")");
    };
    const int limit = 1 << 20;
    for (int x : {c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len})
      if (x < 1 || x > limit) throw bad("every field must be 1 to 2^20");
    if (c.dim % c.n_heads != 0) throw bad("n_heads must divide dim");
    if (c.n_heads % c.n_kv_heads != 0) throw bad("n_kv_heads must divide n_heads");
    if (c.head_size() % 2 != 0) throw bad("the head size must be even (rotary pairs)");
    const std::size_t L = c.n_layers, d = c.dim, kv = c.kv_dim(), hid = c.hidden_dim;
    const std::size_t floats = c.vocab_size * d + L * d + L * d * d + 2 * L * kv * d +
                               L * d * d + L * d + 3 * L * hid * d + d +
                               std::size_t(c.seq_len) * c.head_size() +
                               (c.shared_classifier ? 0 : c.vocab_size * d);
    std::fseek(f.get(), 0, SEEK_END);
    const long bytes = std::ftell(f.get());
    if (bytes < 0 || std::size_t(bytes) != 28 + 4 * floats)
      throw bad("the file has " + std::to_string(bytes) + " bytes, the header implies " +
                std::to_string(28 + 4 * floats));
    std::fseek(f.get(), 28, SEEK_SET);
    ck.data.resize(floats);
    if (std::fread(ck.data.data(), 4, floats, f.get()) != floats)
      throw std::runtime_error(path + ": read failed");
    const float* p = ck.data.data();
    auto take = [&](std::size_t n) {
      const float* at = p;
      p += n;
      return at;
    };
    ck.embedding = take(c.vocab_size * d);
    ck.rms_att = take(L * d);
    ck.wq = take(L * d * d);
    ck.wk = take(L * kv * d);
    ck.wv = take(L * kv * d);
    ck.wo = take(L * d * d);
    ck.rms_ffn = take(L * d);
    ck.w1 = take(L * hid * d);
    ck.w2 = take(L * d * hid);
    ck.w3 = take(L * hid * d);
    ck.rms_final = take(d);
    take(std::size_t(c.seq_len) * c.head_size());  // the legacy rotary tables
    ck.classifier = c.shared_classifier ? ck.embedding : take(c.vocab_size * d);
    return ck;
  }
};

enum class family { softmax, hip, dma, routing, agent, linear };
enum class kv_type { f32, bf16, fp16, q8_0, int8, e4m3, e5m2 };

inline const char* to_string(family f) {
  constexpr const char* names[] = {"softmax", "hip", "dma", "routing", "agent", "linear"};
  return names[int(f)];
}
inline const char* to_string(kv_type t) {
  constexpr const char* names[] = {"f32", "bf16", "fp16", "q8_0", "int8", "e4m3", "e5m2"};
  return names[int(t)];
}

/// The kv_type of a cache storage type.
template <class C>
constexpr kv_type kv_type_of() {
  if constexpr (std::is_same_v<C, float>) return kv_type::f32;
  else if constexpr (std::is_same_v<C, fovea::bfloat16>) return kv_type::bf16;
  else if constexpr (std::is_same_v<C, fovea::half>) return kv_type::fp16;
  else if constexpr (std::is_same_v<C, fovea::block_q8_0>) return kv_type::q8_0;
  else if constexpr (std::is_same_v<C, std::int8_t>) return kv_type::int8;
  else if constexpr (std::is_same_v<C, fovea::e4m3>) return kv_type::e4m3;
  else return kv_type::e5m2;
}

struct run_options {
  family attention = family::softmax;
  bool paged = false;  ///< softmax only: the cache in 16-token pages, handed out scrambled
  int threads = 1;
};

/// y[r] = x[r] / rms(x[r]) * w, eps 1e-5 (llama2.c's rmsnorm).
inline matrix rms_norm(const matrix& x, const float* w, int dim) {
  matrix y(x.rows(), x.cols());
  const Eigen::Map<const Eigen::RowVectorXf> weight_row(w, dim);
  for (Eigen::Index r = 0; r < x.rows(); ++r)
    y.row(r) = x.row(r).cwiseProduct(weight_row) /
               std::sqrt(x.row(r).squaredNorm() / float(dim) + 1e-5f);
  return y;
}

/// Rotary embedding on consecutive pairs of each head, rows at positions first, first + 1, ...
inline void rotary(matrix& x, int heads, int head_size, int first) {
  for (Eigen::Index t = 0; t < x.rows(); ++t)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < head_size; i += 2) {
        const float freq = 1.0f / std::pow(10000.0f, float(i) / float(head_size));
        const float angle = float(first + t) * freq, c = std::cos(angle), s = std::sin(angle);
        float& a = x(t, h * head_size + i);
        float& b = x(t, h * head_size + i + 1);
        const float a0 = a;
        a = a0 * c - b * s;
        b = a0 * s + b * c;
      }
}

/// x (tokens, in) times the row-major (out, in) weight w, transposed: (tokens, out). One
/// token takes Eigen's matrix-vector product (the weights are read once, row by row).
inline matrix project(const matrix& x, const float* w, int out, int in) {
  const weight W(w, out, in);
  if (x.rows() == 1) return (W * x.row(0).transpose()).transpose();
  return x * W.transpose();
}

/// A model with its KV cache in storage type S: float, fovea::bfloat16 or fovea::half, or
/// a quantized cache (fovea::block_q8_0, int8 with a scale per (token, head), e4m3 / e5m2
/// with scale 1). Softmax, HiP and dynamic-mask attention read a quantized cache as it is
/// under float q and out; the other families take q, k, v and out in one type (S,
/// converted around the call), so they need an unquantized cache. New keys and values are appended (and quantized) by
/// fovea::append_kv / append_kv_paged. prefill() runs a block of tokens, decode() one
/// token; both return the logits of each token run.
template <class S>
class model {
 public:
  static constexpr int page_size = 16;
  static constexpr bool quantized = fovea::is_quantized_v<S>;
  static constexpr bool row_scales = std::is_same_v<S, std::int8_t>;

  model(const checkpoint& ck, const run_options& o) : ck_(ck), c_(ck.c), o_(o) {
    Eigen::setNbThreads(std::max(1, o.threads));  // Eigen's GEMMs on as many threads as fovea
    const int hs = c_.head_size();
    constexpr int block = int(fovea::values_per_element<S>::value);
    if (hs % block != 0)
      throw std::runtime_error(std::string("--kv ") + to_string(kv_type_of<S>()) + ": head size " +
                               std::to_string(hs) + " is not whole blocks of " +
                               std::to_string(block) + " values");
    if (quantized && o.attention != family::softmax && o.attention != family::hip &&
        o.attention != family::dma)
      throw std::runtime_error(std::string("--kv ") + to_string(kv_type_of<S>()) +
                               ": only softmax, hip and dma attention read a quantized cache here");
    const std::size_t per_layer = std::size_t(c_.n_kv_heads) * c_.seq_len * hs;
    k_.resize(c_.n_layers * per_layer / block);
    v_.resize(c_.n_layers * per_layer / block);
    if constexpr (row_scales) {  // one per (layer, token slot, kv head)
      k_scales_.assign(std::size_t(c_.n_layers) * c_.n_kv_heads * c_.seq_len, 0.f);
      v_scales_.assign(k_scales_.size(), 0.f);
    }
    const int pages = (c_.seq_len + page_size - 1) / page_size;
    table_.resize(pages);
    std::iota(table_.begin(), table_.end(), 0);
    std::shuffle(table_.begin(), table_.end(), std::mt19937(7));  // any order works
    if (o_.paged && o_.attention != family::softmax)
      throw std::runtime_error("--paged: only softmax attention reads a paged cache here");
    linear_.assign(c_.n_layers, fovea::linear_state<float>(1, c_.n_kv_heads, hs, hs));
    centroids_.resize(c_.n_layers);
    routes_.resize(c_.n_layers);
    agents_.resize(c_.n_layers);
  }

  int position() const { return pos_; }
  const config& cfg() const { return c_; }

  /// Runs tokens at positions position() ... and returns their logits (tokens x vocab).
  matrix prefill(std::span<const int> tokens) { return forward(tokens); }
  /// One token: its logits.
  Eigen::RowVectorXf decode(int token) { return forward(std::span<const int>(&token, 1)).row(0); }

  /// Seconds spent inside fovea's attention calls so far.
  double attention_seconds() const { return attention_s_; }

 private:
  matrix forward(std::span<const int> tokens) {
    const int n = int(tokens.size()), d = c_.dim, hs = c_.head_size(), kvd = c_.kv_dim();
    if (pos_ + n > c_.seq_len)
      throw std::runtime_error("the context of " + std::to_string(c_.seq_len) +
                               " tokens is full");
    for (int t : tokens)
      if (t < 0 || t >= c_.vocab_size)
        throw std::runtime_error("token " + std::to_string(t) + " is outside the vocabulary");
    matrix x(n, d);
    for (int t = 0; t < n; ++t) x.row(t) = weight(ck_.embedding + std::size_t(tokens[t]) * d, 1, d);
    for (int l = 0; l < c_.n_layers; ++l) {
      const matrix h = rms_norm(x, ck_.rms_att + std::size_t(l) * d, d);
      matrix q = project(h, ck_.wq + std::size_t(l) * d * d, d, d);
      matrix k = project(h, ck_.wk + std::size_t(l) * kvd * d, kvd, d);
      matrix v = project(h, ck_.wv + std::size_t(l) * kvd * d, kvd, d);
      rotary(q, c_.n_heads, hs, pos_);
      rotary(k, c_.n_kv_heads, hs, pos_);
      matrix out(n, d);
      attend(l, q, k, v, out);
      x += project(out, ck_.wo + std::size_t(l) * d * d, d, d);
      const matrix g = rms_norm(x, ck_.rms_ffn + std::size_t(l) * d, d);
      const int hid = c_.hidden_dim;
      matrix a = project(g, ck_.w1 + std::size_t(l) * hid * d, hid, d);
      const matrix b = project(g, ck_.w3 + std::size_t(l) * hid * d, hid, d);
      for (Eigen::Index i = 0; i < a.size(); ++i) {
        const float z = a.data()[i];
        a.data()[i] = z / (1.f + std::exp(-z)) * b.data()[i];  // SwiGLU
      }
      x += project(a, ck_.w2 + std::size_t(l) * d * hid, d, hid);
    }
    pos_ += n;
    return project(rms_norm(x, ck_.rms_final, d), ck_.classifier, c_.vocab_size, d);
  }

  // Cache row of (layer, kv head, position): contiguous [layer][kv head][seq_len][hs], or
  // paged [layer][page][slot][kv head][hs] (paged_nhd) through the block table.
  std::size_t slot(int l, int hk, int t) const {
    const std::size_t hs = c_.head_size(), per_layer = std::size_t(c_.n_kv_heads) * c_.seq_len * hs;
    if (!o_.paged) return l * per_layer + (std::size_t(hk) * c_.seq_len + t) * hs;
    const std::size_t page = table_[t / page_size], s = t % page_size;
    return l * per_layer + ((page * page_size + s) * c_.n_kv_heads + hk) * hs;
  }

  /// Layer l's cache of keys (or values) as (1, Hk, seq_len, hs) or, paged, as
  /// (pages, Hk, page_size, hs); the scales of an int8 cache likewise, (1|pages, Hk, slots).
  template <class C>
  fovea::tensor_view<C, 4> cache_view(C* base, int l) const {
    const int Hk = c_.n_kv_heads, hs = c_.head_size();
    const std::size_t per_layer = std::size_t(Hk) * c_.seq_len * hs / fovea::values_per_element<S>::value;
    if (o_.paged)
      return fovea::paged_nhd(base + l * per_layer, int(table_.size()), page_size, Hk, hs);
    return fovea::bhsd(base + l * per_layer, 1, Hk, c_.seq_len, hs);
  }
  fovea::tensor_view<float, 3> scale_view(std::vector<float>& s, int l) {
    if (s.empty()) return {};
    const int Hk = c_.n_kv_heads;
    float* base = s.data() + std::size_t(l) * Hk * c_.seq_len;
    if (o_.paged)  // memory [page][slot][kv head], like the paged cache's rows
      return fovea::view(base, {int(table_.size()), Hk, page_size}, {page_size * Hk, 1, Hk});
    return fovea::view(base, {1, Hk, c_.seq_len});
  }

  void attend(int l, const matrix& q, const matrix& k, const matrix& v, matrix& out) {
    const int n = int(q.rows()), H = c_.n_heads, Hk = c_.n_kv_heads, hs = c_.head_size();
    const int total = pos_ + n;  // keys in the cache after this step
    const std::int32_t len = pos_;
    const auto table = fovea::view<const std::int32_t, 2>(table_.data(), {1, int(table_.size())});
    const fovea::kv_scales scales{scale_view(k_scales_, l), scale_view(v_scales_, l)};
    const auto k_new = fovea::bshd<const float>(k.data(), 1, n, Hk, hs);
    const auto v_new = fovea::bshd<const float>(v.data(), 1, n, Hk, hs);
    if (o_.paged)
      fovea::append_kv_paged(k_new, v_new, cache_view(k_.data(), l), cache_view(v_.data(), l), table,
                             std::span<const std::int32_t>(&len, 1), scales);
    else
      fovea::append_kv(k_new, v_new, cache_view(k_.data(), l), cache_view(v_.data(), l),
                       std::span<const std::int32_t>(&len, 1), scales);
    // The contiguous cache holds seq_len rows per head; the call sees the first `total`.
    const auto K = fovea::slice(cache_view<const S>(k_.data(), l), 2, 0, total);
    const auto V = fovea::slice(cache_view<const S>(v_.data(), l), 2, 0, total);
    // (the contiguous cache's scales cut to the keys the call sees, as K and V)
    auto seen = [&](fovea::tensor_view<const float, 3> s) {
      return o_.paged || s.data() == nullptr ? s : fovea::slice(s, 2, 0, total);
    };
    const auto k_scale = seen(scales.k), v_scale = seen(scales.v);
    const auto Qf = fovea::bshd<const float>(q.data(), 1, n, H, hs);
    const auto Of = fovea::bshd(out.data(), 1, n, H, hs);
    if (o_.attention == family::softmax) {  // float q and out over the cache as it is
      const double t0 = now();
      const fovea::softmax_options so{.causal = true, .k_scale = k_scale, .v_scale = v_scale,
                                      .threads = o_.threads};
      const std::int32_t keys = total;
      if (o_.paged)
        fovea::softmax_attention_paged(Qf, cache_view<const S>(k_.data(), l),
                                       cache_view<const S>(v_.data(), l), Of, table,
                                       std::span<const std::int32_t>(&keys, 1), so);
      else
        fovea::softmax_attention(Qf, K, V, Of, so);
      attention_s_ += now() - t0;
      return;
    }
    if constexpr (quantized) {  // hip or dma over the cache as it is
      const double t0 = now();
      attend_selected(Qf, K, V, Of, total, k_scale, v_scale);
      attention_s_ += now() - t0;
    } else {
      attend_other(l, q, k, v, out, K, V, total);
    }
  }

  /// HiP or dynamic-mask attention over the first `total` keys of the cache (any types
  /// fovea takes; the scales of an int8 or fp8 cache, if any).
  template <class TQ, class TK, class TV, class TO>
  void attend_selected(fovea::tensor_view<TQ, 4> Q, fovea::tensor_view<TK, 4> K,
                       fovea::tensor_view<TV, 4> V, fovea::tensor_view<TO, 4> O, int total,
                       fovea::tensor_view<const float, 3> k_scale = {},
                       fovea::tensor_view<const float, 3> v_scale = {}) {
    const int Hk = c_.n_kv_heads, hs = c_.head_size(), threads = o_.threads;
    if (o_.attention == family::hip) {  // keys in blocks of 2, 64 kept per query block
      fovea::hip_attention(Q, K, V, O,
                           {.causal = true, .top_k = 64, .sliding_window = 32, .sink_tokens = 4,
                            .k_scale = k_scale, .v_scale = v_scale, .threads = threads});
      return;
    }
    // dma: per-key importance is the value row's norm (the model has no W_dt)
    std::vector<float> values(std::size_t(Hk) * total * hs), bias(std::size_t(Hk) * total);
    const auto Vf = fovea::bhsd(values.data(), 1, Hk, total, hs);
    if constexpr (fovea::is_quantized_v<std::remove_const_t<TV>>)
      fovea::dequantize(V, Vf, v_scale);
    else
      for (int hk = 0; hk < Hk; ++hk)
        for (int t = 0; t < total; ++t)
          for (int e = 0; e < hs; ++e) Vf(0, hk, t, e) = float(V(0, hk, t, e));
    for (std::size_t r = 0; r < bias.size(); ++r) {
      float sum = 0;
      for (int e = 0; e < hs; ++e) sum += values[r * hs + e] * values[r * hs + e];
      bias[r] = std::sqrt(sum);
    }
    fovea::dynamic_mask_attention(Q, K, V, O,
                                  fovea::view<const float, 4>(bias.data(), {1, Hk, 1, total}),
                                  {.causal = true, .keep = 64, .k_scale = k_scale,
                                   .v_scale = v_scale, .threads = threads});
  }

  /// The other families, q, k, v and out in S.
  void attend_other(int l, const matrix& q, const matrix& k, const matrix& v, matrix& out,
                    fovea::tensor_view<const S, 4> K, fovea::tensor_view<const S, 4> V, int total) {
    const int n = int(q.rows()), H = c_.n_heads, Hk = c_.n_kv_heads, hs = c_.head_size();
    std::vector<S> qs(std::size_t(n) * H * hs), os(qs.size());
    std::transform(q.data(), q.data() + q.size(), qs.begin(), [](float x) { return S(x); });
    const auto Q = fovea::bshd<const S>(qs.data(), 1, n, H, hs);
    const auto O = fovea::bshd(os.data(), 1, n, H, hs);
    const int threads = o_.threads;
    const double t0 = now();
    switch (o_.attention) {
      case family::softmax:
        break;  // (attend)
      case family::hip:
      case family::dma:
        attend_selected(Q, K, V, O, total);
        break;
      case family::routing: {
        // Centroids from the cached keys (per query head: its group's key head) once 16
        // keys are there; until then the few keys are attended exactly.
        constexpr int clusters = 4, first_keys = 16;
        if (!centroids_[l] && total >= first_keys) {
          std::vector<float> x(std::size_t(H) * total * hs);
          for (int h = 0; h < H; ++h)
            for (int t = 0; t < total; ++t)
              for (int e = 0; e < hs; ++e)
                x[(std::size_t(h) * total + t) * hs + e] = float(K(0, h / (H / Hk), t, e));
          centroids_[l] = std::make_unique<fovea::routing_centroids>(H, clusters, hs);
          centroids_[l]->init(fovea::bhsd<const float>(x.data(), 1, H, total, hs));
          routes_[l] = std::make_unique<fovea::routing_cache>(*centroids_[l], 1, Hk);
        }
        if (!routes_[l]) {
          fovea::softmax_attention(Q, K, V, O, {.causal = true, .threads = threads});
          break;
        }
        routes_[l]->append(K);
        fovea::routing_decode(Q, K, V, O, *routes_[l], {.threads = threads});
        break;
      }
      case family::agent: {  // agents: the first 16 queries of the prompt, per head
        const auto Qf = fovea::bshd<const float>(q.data(), 1, n, H, hs);
        if (!agents_[l]) {
          const int m = 16;
          std::vector<float> a(std::size_t(H) * m * hs);
          for (int h = 0; h < H; ++h)
            for (int t = 0; t < m; ++t)
              for (int e = 0; e < hs; ++e)
                a[(std::size_t(h) * m + t) * hs + e] = Qf(0, h, std::min(t, n - 1), e);
          agents_[l] = std::make_unique<fovea::agent_state<float>>(
              fovea::bhsd<const float>(a.data(), 1, H, m, hs), hs);
        }
        // The state holds what it needs of the keys: this step's rows only, in f32.
        agents_[l]->step(Qf, fovea::bshd<const float>(k.data(), 1, n, Hk, hs),
                         fovea::bshd<const float>(v.data(), 1, n, Hk, hs),
                         fovea::bshd(out.data(), 1, n, H, hs));
        attention_s_ += now() - t0;
        return;
      }
      case family::linear:  // the recurrent state replaces the cache (elu + 1 feature map)
        linear_[l].step(fovea::bshd<const float>(q.data(), 1, n, H, hs),
                        fovea::bshd<const float>(k.data(), 1, n, Hk, hs),
                        fovea::bshd<const float>(v.data(), 1, n, Hk, hs),
                        fovea::bshd(out.data(), 1, n, H, hs), {.threads = threads});
        attention_s_ += now() - t0;
        return;
    }
    attention_s_ += now() - t0;
    std::transform(os.begin(), os.end(), out.data(), [](S x) { return float(x); });
  }

  static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  const checkpoint& ck_;
  config c_;
  run_options o_;
  int pos_ = 0;
  std::vector<S> k_, v_;
  std::vector<float> k_scales_, v_scales_;  ///< int8: (layer, kv head, slot) or paged (layer, page, slot, kv head)
  std::vector<std::int32_t> table_;
  std::vector<fovea::linear_state<float>> linear_;
  std::vector<std::unique_ptr<fovea::routing_centroids>> centroids_;
  std::vector<std::unique_ptr<fovea::routing_cache>> routes_;
  std::vector<std::unique_ptr<fovea::agent_state<float>>> agents_;
  double attention_s_ = 0;
};

/// The index of the largest logit (ties: the lower index).
inline int argmax(const Eigen::RowVectorXf& logits) {
  Eigen::Index best = 0;
  logits.maxCoeff(&best);
  return int(best);
}

}  // namespace llama2c
