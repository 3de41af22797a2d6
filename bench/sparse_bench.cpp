// HiP and dynamic-mask attention against dense fovea softmax in one binary (causal
// prefill and KV-cache decode), how HiP's time grows with N, and a recall benchmark: on
// inputs with planted structure, the fraction of the exact softmax mass each selection keeps.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fovea/fovea.hpp>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "summary.hpp"

namespace {

using fovea::index_t;
constexpr index_t D = 128;

/// Uniform(-1.7, 1.7) (unit variance) from a 64-bit LCG: fast enough for GiB of cache.
void fill(std::vector<float>& x, std::uint64_t seed) {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (float& e : x) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    e = (float(s >> 40) / float(1 << 24) - 0.5f) * 3.46f;
  }
}

struct problem {
  index_t H, Hk, Sq, Sk;
  std::vector<float> q, k, v, o, bias;
  problem(index_t h, index_t hk, index_t sq, index_t sk)
      : H(h),
        Hk(hk),
        Sq(sq),
        Sk(sk),
        q(h * sq * D),
        k(hk * sk * D),
        v(hk * sk * D),
        o(h * sq * D),
        bias(hk * sk) {
    fill(q, 1), fill(k, 2), fill(v, 3);
    // The DMA bias from the value states, as the reference model computes it.
    std::vector<float> w(hk * hk * D), a(hk, -1.f);
    fill(w, 4);
    for (float& e : w) e *= 0.1f;
    fovea::dynamic_mask_bias(fovea::bhsd<const float>(v.data(), 1, hk, sk, D),
                             fovea::view<const float, 2>(w.data(), {hk, hk * D}),
                             fovea::view<const float, 1>(a.data(), {hk}),
                             fovea::bhsd(bias.data(), 1, hk, 1, sk));
  }
  auto Q() const { return fovea::bhsd<const float>(q.data(), 1, H, Sq, D); }
  auto K() const { return fovea::bhsd<const float>(k.data(), 1, Hk, Sk, D); }
  auto V() const { return fovea::bhsd<const float>(v.data(), 1, Hk, Sk, D); }
  auto O() { return fovea::bhsd(o.data(), 1, H, Sq, D); }
  auto B() const { return fovea::bhsd<const float>(bias.data(), 1, Hk, 1, Sk); }
};

template <class Kernel>
void run(benchmark::State& state, problem& p, Kernel&& kernel) {
  for (auto _ : state) {
    kernel(p);
    benchmark::DoNotOptimize(p.o.data());
  }
}

void BM_dense(benchmark::State& state, index_t n) {
  problem p(1, 1, n, n);
  run(state, p, [](problem& p) {
    fovea::softmax_attention(p.Q(), p.K(), p.V(), p.O(), {.causal = true, .threads = 1});
  });
}

void BM_hip(benchmark::State& state, index_t n) {
  problem p(1, 1, n, n);
  run(state, p, [](problem& p) {
    fovea::hip_attention(p.Q(), p.K(), p.V(), p.O(), {.causal = true, .top_k = 512, .threads = 1});
  });
}

void BM_dma(benchmark::State& state, index_t n, index_t keep) {
  problem p(1, 1, n, n);
  run(state, p, [keep](problem& p) {
    fovea::dynamic_mask_attention(p.Q(), p.K(), p.V(), p.O(), p.B(),
                                  {.causal = true, .keep = keep, .threads = 1});
  });
}

// Decode: one new token of 32 query heads against a 262144-token cache of 8 kv heads.
constexpr index_t decode_keys = 262144;
problem& decode_problem() {
  static problem p(32, 8, 1, decode_keys);
  return p;
}

void BM_dense_decode(benchmark::State& state) {
  run(state, decode_problem(), [](problem& p) {
    fovea::softmax_attention(p.Q(), p.K(), p.V(), p.O(), {.causal = true, .threads = 1});
  });
  state.counters["GB/s"] = benchmark::Counter(
      double(decode_problem().k.size() + decode_problem().v.size()) * sizeof(float),
      benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

void BM_dma_decode(benchmark::State& state) {
  run(state, decode_problem(), [](problem& p) {
    fovea::dynamic_mask_attention(p.Q(), p.K(), p.V(), p.O(), p.B(),
                                  {.causal = true, .keep = 1024, .threads = 1});
  });
}

void BM_hip_decode(benchmark::State& state) {  // selection made once, reused every step
  problem& p = decode_problem();
  const fovea::hip_options o{.causal = true, .top_k = 512, .threads = 1};
  const auto selection = fovea::hip_select(p.Q(), p.K(), o);
  run(state, p,
      [&](problem& p) { fovea::hip_attention(p.Q(), p.K(), p.V(), p.O(), selection, o); });
}

// Long context: one layer's decode step (H=32, Hk=8, D=128, Sq=1) against a 2^20-token
// cache: bf16 (q and out bf16 too, 4 GiB of K/V) and q8_0 (fp32 q and out, 2.1 GiB).
constexpr index_t long_keys = index_t(1) << 20;
struct long_context {
  static constexpr index_t H = 32, Hk = 8;
  std::vector<fovea::bfloat16> q, k, v, o;
  std::vector<float> qf, of, bias;
  std::vector<fovea::block_q8_0> k8, v8;
  long_context() : q(H * D), k(Hk * long_keys * D), v(k.size()), o(H * D), qf(H * D), of(H * D) {
    auto fill_bf16 = [](std::vector<fovea::bfloat16>& x, std::uint64_t seed) {
      std::vector<float> chunk(std::size_t(1) << 20);
      for (std::size_t at = 0; at < x.size(); at += chunk.size()) {
        fill(chunk, seed++ * 7919);
        for (std::size_t i = 0; i < chunk.size() && at + i < x.size(); ++i)
          x[at + i] = fovea::bfloat16(chunk[i]);
      }
    };
    fill_bf16(q, 11), fill_bf16(k, 12), fill_bf16(v, 13);
    for (std::size_t i = 0; i < q.size(); ++i) qf[i] = float(q[i]);
    k8.resize(k.size() / 32), v8.resize(v.size() / 32);
    fovea::quantize(K(), fovea::bhsd(k8.data(), 1, Hk, long_keys, D));
    fovea::quantize(V(), fovea::bhsd(v8.data(), 1, Hk, long_keys, D));
    bias.resize(Hk * long_keys);
    fill(bias, 14);
  }
  auto Q() const { return fovea::bhsd<const fovea::bfloat16>(q.data(), 1, H, 1, D); }
  fovea::tensor_view<const fovea::bfloat16, 4> K() const {
    return fovea::bhsd<const fovea::bfloat16>(k.data(), 1, Hk, long_keys, D);
  }
  fovea::tensor_view<const fovea::bfloat16, 4> V() const {
    return fovea::bhsd<const fovea::bfloat16>(v.data(), 1, Hk, long_keys, D);
  }
  auto O() { return fovea::bhsd(o.data(), 1, H, 1, D); }
  auto Qf() const { return fovea::bhsd<const float>(qf.data(), 1, H, 1, D); }
  auto K8() const { return fovea::bhsd<const fovea::block_q8_0>(k8.data(), 1, Hk, long_keys, D); }
  auto V8() const { return fovea::bhsd<const fovea::block_q8_0>(v8.data(), 1, Hk, long_keys, D); }
  auto Of() { return fovea::bhsd(of.data(), 1, H, 1, D); }
  auto B() const { return fovea::bhsd<const float>(bias.data(), 1, Hk, 1, long_keys); }
  double bf16_bytes() const { return double(k.size() + v.size()) * sizeof(fovea::bfloat16); }
  double q8_bytes() const { return double(k8.size() + v8.size()) * sizeof(fovea::block_q8_0); }
};
long_context& long_problem() {
  static long_context p;
  return p;
}

template <class Step>
void run_long(benchmark::State& state, Step&& step, double bytes = 0) {
  long_context& p = long_problem();
  for (auto _ : state) {
    step(p);
    benchmark::DoNotOptimize(p.o.data());
    benchmark::DoNotOptimize(p.of.data());
  }
  if (bytes > 0)
    state.counters["GB/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate,
                                                benchmark::Counter::kIs1000);
}

void BM_long_dense(benchmark::State& state, bool q8, int threads) {
  const fovea::softmax_options o{.causal = true, .threads = threads};
  if (q8)
    run_long(state, [&](long_context& p) { fovea::softmax_attention(p.Qf(), p.K8(), p.V8(), p.Of(), o); },
             long_problem().q8_bytes());
  else
    run_long(state, [&](long_context& p) { fovea::softmax_attention(p.Q(), p.K(), p.V(), p.O(), o); },
             long_problem().bf16_bytes());
}

void BM_long_dma(benchmark::State& state, bool q8, int threads) {
  const fovea::dynamic_mask_options o{.causal = true, .keep = 1024, .threads = threads};
  if (q8)
    run_long(state, [&](long_context& p) {
      fovea::dynamic_mask_attention(p.Qf(), p.K8(), p.V8(), p.Of(), p.B(), o);
    });
  else
    run_long(state, [&](long_context& p) {
      fovea::dynamic_mask_attention(p.Q(), p.K(), p.V(), p.O(), p.B(), o);
    });
}

void BM_long_hip(benchmark::State& state, bool refresh, bool q8, int threads) {
  const fovea::hip_options o{.causal = true, .top_k = 512, .threads = threads};
  long_context& lp = long_problem();
  auto attend = [&](auto q, auto k, auto v, auto out) {
    if (refresh) {  // the selection made again every step
      run_long(state, [&](long_context&) { fovea::hip_attention(q, k, v, out, o); });
    } else {  // made once, reused
      const auto selection = fovea::hip_select(q, k, o);
      run_long(state, [&](long_context&) { fovea::hip_attention(q, k, v, out, selection, o); });
    }
  };
  if (q8)
    attend(lp.Qf(), lp.K8(), lp.V8(), lp.Of());
  else
    attend(lp.Q(), lp.K(), lp.V(), lp.O());
}

// Routing: non-causal, D=64, num_clusters = window = sqrt(N), against dense non-causal.
template <class Kernel>
void run64(benchmark::State& state, index_t n, Kernel&& kernel) {
  constexpr index_t d = 64;
  std::vector<float> q(n * d), k(n * d), v(n * d), o(n * d);
  fill(q, 5), fill(k, 6), fill(v, 7);
  const auto Q = fovea::bhsd<const float>(q.data(), 1, 1, n, d);
  const auto K = fovea::bhsd<const float>(k.data(), 1, 1, n, d);
  const auto V = fovea::bhsd<const float>(v.data(), 1, 1, n, d);
  const auto O = fovea::bhsd(o.data(), 1, 1, n, d);
  for (auto _ : state) {
    kernel(Q, K, V, O);
    benchmark::DoNotOptimize(o.data());
  }
}

void BM_routing(benchmark::State& state, index_t n) {
  const index_t c = index_t(std::lround(std::sqrt(double(n))));
  run64(state, n, [c](auto q, auto k, auto v, auto o) {
    fovea::routing_attention(q, k, v, o, {.num_clusters = c, .window = c, .threads = 1});
  });
}

void BM_dense64(benchmark::State& state, index_t n) {
  run64(state, n, [](auto q, auto k, auto v, auto o) {
    fovea::softmax_attention(q, k, v, o, {.threads = 1});
  });
}

// ---- recall on planted structure ----------------------------------------------------

/// A retrieval-style head: 16 topics, each with two segments of 128 keys somewhere in
/// the first half of the sequence that point along the topic's direction; each block of 64 queries
/// asks about one topic. Queries and keys share a component that changes every 32 positions
/// (locality), 4 sink keys align with a direction every query shares, and the remaining
/// keys are noise.
struct planted {
  index_t n;
  std::vector<float> q, k, v;
  explicit planted(index_t n_) : n(n_), q(n * D), k(n * D), v(n * D) {
    std::mt19937_64 gen(77);
    std::normal_distribution<float> g;
    constexpr int topics = 16;
    std::vector<float> common(D), dir(topics * D);
    for (float& e : common) e = 0.5f * g(gen);
    for (float& e : dir) e = g(gen);
    for (float& e : k) e = 0.5f * g(gen);
    for (float& e : v) e = g(gen);
    std::vector<float> local((n / 32 + 1) * D);
    for (float& e : local) e = 0.7f * g(gen);
    for (index_t i = 0; i < n; ++i)
      for (index_t d = 0; d < D; ++d)
        q[i * D + d] =
            dir[(i / 64) % topics * D + d] + common[d] + local[i / 32 * D + d] + 0.3f * g(gen);
    std::uniform_int_distribution<index_t> where(16, n / 2 - 128);  // all before the queries
    for (int t = 0; t < topics; ++t)
      for (int segment = 0; segment < 2; ++segment)
        for (index_t j = where(gen), end = j + 128; j < end; ++j)
          for (index_t d = 0; d < D; ++d) k[j * D + d] = 0.8f * dir[t * D + d] + 0.3f * g(gen);
    for (index_t j = 0; j < n; ++j)
      for (index_t d = 0; d < D; ++d) k[j * D + d] += 0.7f * local[j / 32 * D + d];
    for (index_t j = 0; j < 4; ++j)
      for (index_t d = 0; d < D; ++d) k[j * D + d] = 2.f * common[d];
  }
};

/// Mean over sampled queries of the exact causal softmax mass on the keys keep(i, j) allows.
template <class Keep>
double recall(const planted& p, Keep&& keep) {
  const double scale = 1.0 / std::sqrt(double(D));
  double total = 0;
  index_t count = 0;
  std::vector<double> s(p.n);
  for (index_t i = p.n / 2; i < p.n; i += 31) {  // queries in the second half
    double m = -INFINITY;
    for (index_t j = 0; j <= i; ++j) {
      double dot = 0;
      for (index_t d = 0; d < D; ++d) dot += double(p.q[i * D + d]) * p.k[j * D + d];
      s[j] = scale * dot;
      m = std::max(m, s[j]);
    }
    double all = 0, kept = 0;
    for (index_t j = 0; j <= i; ++j) {
      const double e = std::exp(s[j] - m);
      all += e;
      if (keep(i, j, s)) kept += e;
    }
    total += kept / all;
    ++count;
  }
  return total / double(count);
}

void print_recall() {
  const index_t n = 16384;
  const planted p(n);
  const auto Q = fovea::bhsd<const float>(p.q.data(), 1, 1, n, D);
  const auto K = fovea::bhsd<const float>(p.k.data(), 1, 1, n, D);
  std::printf("\n| recall on planted structure, N=%td, D=%td, causal | exact softmax mass kept |\n",
              n, D);
  std::printf("|---|---:|\n");
  for (index_t top_k : {128, 512}) {
    const fovea::hip_options o{.causal = true, .top_k = top_k, .threads = 0};
    const auto sel = fovea::hip_select(Q, K, o);
    const double r = recall(p, [&](index_t i, index_t j, const std::vector<double>&) {
      if (j < 16 || j + 256 > i) return true;
      for (const std::int32_t b : sel.blocks(0, 0, i / 64))
        if (j >= b && j < b + 2) return true;
      return false;
    });
    // The best any selection of top_k keys can do: the exact top scores.
    const double best = recall(p, [&, last = index_t(-1), bar = 0.0](
                                      index_t i, index_t j, const std::vector<double>& s) mutable {
      if (j < 16 || j + 256 > i) return true;
      if (i != last) {
        std::vector<double> c(s.begin() + 16, s.begin() + std::max<index_t>(16, i - 255));
        const index_t m = std::min<index_t>(top_k, index_t(c.size()));
        std::nth_element(c.begin(), c.begin() + (m - 1), c.end(), std::greater<>());
        bar = m > 0 ? c[m - 1] : INFINITY;
        last = i;
      }
      return s[j] >= bar;
    });
    std::printf("| HiP top_k=%td (+16 sinks, 256 window) | %.1f%% (exact top-%td: %.1f%%) |\n",
                top_k, 100 * r, top_k, 100 * best);
  }
  // DMA keeps the top keys by its value-derived bias, which does not look at q: with a
  // bias that ignores the planted structure, its recall is what its key count allows.
  std::vector<float> bias(n), w(D), a = {-1.f};
  std::mt19937 gen(3);
  std::normal_distribution<float> g;
  for (float& e : w) e = 0.1f * g(gen);
  fovea::dynamic_mask_bias(fovea::bhsd<const float>(p.v.data(), 1, 1, n, D),
                           fovea::view<const float, 2>(w.data(), {1, D}),
                           fovea::view<const float, 1>(a.data(), {1}),
                           fovea::bhsd(bias.data(), 1, 1, 1, n));
  for (index_t keep : {1024, 2048}) {
    // Row i keeps the `keep` keys <= i of largest bias.
    std::vector<index_t> order(n);
    double r = recall(p, [&, last = index_t(-1), kept = std::vector<char>(n)](
                             index_t i, index_t j, const std::vector<double>&) mutable {
      if (i != last) {
        std::vector<index_t> idx(i + 1);
        for (index_t t = 0; t <= i; ++t) idx[t] = t;
        const index_t m = std::min<index_t>(keep, i + 1);
        std::partial_sort(idx.begin(), idx.begin() + m, idx.end(),
                          [&](index_t x, index_t y) { return bias[x] > bias[y]; });
        std::fill(kept.begin(), kept.end(), 0);
        for (index_t t = 0; t < m; ++t) kept[idx[t]] = 1;
        last = i;
      }
      return kept[j] != 0;
    });
    std::printf("| DMA keep=%td (bias from V, random W_dt) | %.1f%% |\n", keep, 100 * r);
  }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  using fovea::bench::add;
  for (index_t n : {16384, 32768}) add("dense/N=" + std::to_string(n), BM_dense, n);
  for (index_t n : {16384, 32768, 65536}) add("hip512/N=" + std::to_string(n), BM_hip, n);
  for (index_t keep : {2048, 1024})
    add("dma" + std::to_string(keep) + "/N=32768", BM_dma, index_t(32768), keep);
  for (index_t n : {16384, 65536}) add("routing/N=" + std::to_string(n), BM_routing, n);
  add("dense64/N=16384", BM_dense64, index_t(16384));
  add("dense/decode", BM_dense_decode);
  add("dma1024/decode", BM_dma_decode);
  add("hip512/decode", BM_hip_decode);
  for (int t : {1, 2}) {
    const std::string threads = "/threads=" + std::to_string(t);
    add("long/dense/bf16" + threads, BM_long_dense, false, t);
    add("long/dense/q8_0" + threads, BM_long_dense, true, t);
    add("long/hip512_reused/bf16" + threads, BM_long_hip, false, false, t);
    add("long/hip512_reused/q8_0" + threads, BM_long_hip, false, true, t);
    add("long/hip512_refresh/bf16" + threads, BM_long_hip, true, false, t);
    add("long/hip512_refresh/q8_0" + threads, BM_long_hip, true, true, t);
    add("long/dma1024/bf16" + threads, BM_long_dma, false, t);
    add("long/dma1024/q8_0" + threads, BM_long_dma, true, t);
  }
  fovea::bench::summary_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();

  const auto& r = reporter.results();
  auto ms = [&](const std::string& name) {
    const auto it = r.find(name);
    return it == r.end() ? 0.0 : it->second.seconds * 1e3;
  };
  std::printf(
      "\n| sparse attention, 1 thread (D=128 causal unless noted) | ms | dense ms | faster |\n");
  std::printf("|---|---:|---:|---:|\n");
  auto row = [&](const char* label, const std::string& name, const std::string& dense) {
    if (ms(name) > 0 && ms(dense) > 0)
      std::printf("| %s | %.1f | %.1f | %.1fx |\n", label, ms(name), ms(dense),
                  ms(dense) / ms(name));
  };
  row("HiP top_k=512, N=16384", "hip512/N=16384", "dense/N=16384");
  row("HiP top_k=512, N=32768", "hip512/N=32768", "dense/N=32768");
  row("DMA keep=2048, N=32768", "dma2048/N=32768", "dense/N=32768");
  row("DMA keep=1024, N=32768", "dma1024/N=32768", "dense/N=32768");
  row("DMA keep=1024, decode Sk=262144 (H=32, Hk=8)", "dma1024/decode", "dense/decode");
  row("HiP top_k=512, decode Sk=262144, selection reused", "hip512/decode", "dense/decode");
  if (ms("routing/N=16384") > 0 && ms("dense64/N=16384") > 0)
    std::printf("| Routing, non-causal, D=64, c = w = 128, N=16384 | %.1f | %.1f | %.1fx |\n",
                ms("routing/N=16384"), ms("dense64/N=16384"),
                ms("dense64/N=16384") / ms("routing/N=16384"));
  if (ms("routing/N=65536") > 0 && ms("routing/N=16384") > 0)
    std::printf("\nRouting time(N=65536, c = w = 256) / time(N=16384) = %.2f (O(N^1.5): 8)\n",
                ms("routing/N=65536") / ms("routing/N=16384"));
  if (ms("hip512/N=65536") > 0 && ms("hip512/N=16384") > 0)
    std::printf("\nHiP time(N=65536) / time(N=16384) = %.2f (O(T log T); O(T^2) would be 16)\n",
                ms("hip512/N=65536") / ms("hip512/N=16384"));
  if (ms("dense/decode") > 0)
    std::printf("dense decode reads K and V at %.1f GB/s\n",
                r.at("dense/decode").counter("GB/s") / 1e9);
  std::printf(
      "\n| decode at 1M tokens (2^20; H=32, Hk=8, D=128) | cache | 1 thread ms | 2 threads ms | "
      "2 threads vs 1 | GB/s of cache (1 / 2 threads) |\n|---|---|---:|---:|---:|---:|\n");
  for (const char* kernel : {"dense", "hip512_reused", "hip512_refresh", "dma1024"})
    for (const char* type : {"bf16", "q8_0"}) {
      const std::string base = std::string("long/") + kernel + "/" + type + "/threads=";
      const double t1 = ms(base + "1"), t2 = ms(base + "2");
      if (t1 <= 0 || t2 <= 0) continue;
      std::string rate = "";
      if (r.at(base + "1").counter("GB/s") > 0) {
        char text[64];
        std::snprintf(text, sizeof text, "%.1f / %.1f", r.at(base + "1").counter("GB/s") / 1e9,
                      r.at(base + "2").counter("GB/s") / 1e9);
        rate = text;
      }
      std::printf("| %s | %s | %.2f | %.2f | %.2fx | %s |\n", kernel, type, t1, t2, t1 / t2,
                  rate.c_str());
    }
  print_recall();
}
