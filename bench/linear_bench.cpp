// Causal linear attention against the token-by-token recurrence that fast-transformers'
// CPU kernel uses (S += phi(k) v^T; out = phi(q)^T S / phi(q).z, one token at a time), in
// one binary. Also shows that time grows linearly with N.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdio>
#include <fovea/fovea.hpp>
#include <random>
#include <string>
#include <vector>

#include "peak.hpp"
#include "summary.hpp"

namespace {

using fovea::index_t;
constexpr index_t D = 64;

struct inputs {
  index_t n;
  std::vector<float> q, k, v, o;
  explicit inputs(index_t n_) : n(n_), q(n * D), k(n * D), v(n * D), o(n * D) {
    std::mt19937 gen(5);
    std::normal_distribution<float> dist;
    for (auto* x : {&q, &k, &v})
      for (float& e : *x) e = dist(gen);
  }
};

/// Times kernel(Q, K, V, O) on one head of n tokens.
template <class Kernel>
void time_kernel(benchmark::State& state, index_t n, Kernel&& kernel) {
  inputs in(n);
  const auto Q = fovea::bhsd(in.q.data(), 1, 1, n, D), K = fovea::bhsd(in.k.data(), 1, 1, n, D);
  const auto V = fovea::bhsd(in.v.data(), 1, 1, n, D), O = fovea::bhsd(in.o.data(), 1, 1, n, D);
  for (auto _ : state) {
    kernel(Q, K, V, O);
    benchmark::DoNotOptimize(in.o.data());
  }
}

/// Flops of fovea's chunked form per token: phi(Q) S, phi(Q) phi(K)^T, A V, S update.
double chunked_flops(index_t n) {
  const double C = double(fovea::detail::linear_chunk);
  return double(n) * (2.0 * D * D + 2 * C * D + 2 * C * D + 2.0 * D * D);
}

void BM_fovea_linear(benchmark::State& state, index_t n) {
  time_kernel(state, n, [](auto q, auto k, auto v, auto o) {
    fovea::linear_attention(q, k, v, o, {.causal = true, .threads = 1});
  });
  state.counters["GFLOP/s"] = benchmark::Counter(
      chunked_flops(n), benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

/// The recurrence, written as a C++ user would: rank-1 state update per token.
void BM_recurrence(benchmark::State& state, index_t n) {
  inputs in(n);
  std::vector<float> S(D * D), z(D), pq(D), pk(D);
  auto phi = [](float x) { return x > 0 ? x + 1 : std::exp(x); };
  for (auto _ : state) {
    std::fill(S.begin(), S.end(), 0.f);
    std::fill(z.begin(), z.end(), 0.f);
    for (index_t t = 0; t < n; ++t) {
      for (index_t e = 0; e < D; ++e) pq[e] = phi(in.q[t * D + e]), pk[e] = phi(in.k[t * D + e]);
      for (index_t e = 0; e < D; ++e) {
        z[e] += pk[e];
        for (index_t m = 0; m < D; ++m) S[e * D + m] += pk[e] * in.v[t * D + m];
      }
      float den = 1e-6f;
      for (index_t e = 0; e < D; ++e) den += pq[e] * z[e];
      for (index_t m = 0; m < D; ++m) {
        float acc = 0;
        for (index_t e = 0; e < D; ++e) acc += pq[e] * S[e * D + m];
        in.o[t * D + m] = acc / den;
      }
    }
    benchmark::DoNotOptimize(in.o.data());
  }
}

void BM_agent(benchmark::State& state, index_t n, int threads) {
  time_kernel(state, n, [threads](auto q, auto k, auto v, auto o) {
    fovea::agent_attention(q, k, v, o, {.num_agents = 64, .threads = threads});
  });
}

void BM_dense(benchmark::State& state, index_t n) {
  time_kernel(state, n, [](auto q, auto k, auto v, auto o) {
    fovea::softmax_attention(q, k, v, o, {.threads = 1});
  });
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  const double peak = fovea::bench::measure_fma_peak_gflops();
  for (index_t n : {4096, 8192, 32768}) {
    const std::string shape = "/N=" + std::to_string(n) + "/D=64/causal/threads=1";
    fovea::bench::add("linear" + shape, BM_fovea_linear, n);
    fovea::bench::add("recurrence" + shape, BM_recurrence, n);
  }
  for (index_t n : {4096, 16384, 32768}) {
    const std::string shape = "/N=" + std::to_string(n) + "/D=64/threads=1";
    fovea::bench::add("agent64" + shape, BM_agent, n, 1);
    if (n == 32768)  // one head: the first stage's keys are split between the threads
      fovea::bench::add("agent64/N=32768/D=64/threads=2", BM_agent, n, 2);
    if (n == 16384) fovea::bench::add("dense" + shape, BM_dense, n);
  }
  fovea::bench::summary_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  std::printf("\nFMA peak (fp32, one core): %.1f GFLOP/s\n\n", peak);
  std::printf(
      "| causal linear attention | fovea ms | GFLOP/s (chunked form) | of peak | recurrence ms | "
      "fovea vs recurrence |\n");
  std::printf("|---|---:|---:|---:|---:|---:|\n");
  double t4096 = 0;
  for (const auto& [shape, r] : reporter.pairs("linear", "recurrence")) {
    const double g = r.first.counter("GFLOP/s") / 1e9;
    if (shape.find("N=4096/") != std::string::npos) t4096 = r.first.seconds;
    std::printf("| %s | %.2f | %.1f | %.0f%% | %.2f | %.1fx |\n", shape.substr(1).c_str(),
                r.first.seconds * 1e3, g, 100 * g / peak, r.second.seconds * 1e3,
                r.second.seconds / r.first.seconds);
  }
  for (const auto& [shape, r] : reporter.pairs("linear", "recurrence"))
    if (shape.find("N=32768/") != std::string::npos && t4096 > 0)
      std::printf("\ntime(N=32768) / time(N=4096) = %.2f (linear growth: 8)\n",
                  r.first.seconds / t4096);
  const auto& all = reporter.results();
  std::printf("\n| agent attention, 64 agents, D=64, one head | ms |\n|---|---:|\n");
  for (const auto& [name, r] : all)
    if (name.rfind("agent64", 0) == 0)
      std::printf("| %s | %.2f |\n", name.c_str(), r.seconds * 1e3);
  const auto a16 = all.find("agent64/N=16384/D=64/threads=1"),
             d16 = all.find("dense/N=16384/D=64/threads=1");
  const auto a4 = all.find("agent64/N=4096/D=64/threads=1"),
             a32 = all.find("agent64/N=32768/D=64/threads=1");
  if (a16 != all.end() && d16 != all.end())
    std::printf("\nagent (64) vs dense softmax at N=16384: %.1fx faster\n",
                d16->second.seconds / a16->second.seconds);
  if (a4 != all.end() && a32 != all.end())
    std::printf("agent time(N=32768) / time(N=4096) = %.2f (linear growth: 8)\n",
                a32->second.seconds / a4->second.seconds);
  if (const auto a32x2 = all.find("agent64/N=32768/D=64/threads=2");
      a32 != all.end() && a32x2 != all.end())
    std::printf("agent at N=32768: 2 threads %.2fx faster than 1\n",
                a32->second.seconds / a32x2->second.seconds);
  return 0;
}
