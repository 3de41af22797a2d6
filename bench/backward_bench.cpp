// softmax_attention_backward against its forward in the same binary: fraction of the FMA
// peak counting 10 * Sq * Sk * D flops (halved when causal), the ratio to the forward's
// time, causal against full, and threads; linear_attention_backward (causal, N = 8192,
// D = 64) against its forward, counting the chunked form's flops; dynamic-mask attention's
// backward (causal, keep = 1024 of N = 8192) against its forward and against the dense
// backward with the same bias.
//
//   backward_bench [--quick] [google benchmark flags]
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <fovea/fovea.hpp>
#include <random>
#include <string>
#include <vector>

#include "peak.hpp"
#include "summary.hpp"

namespace {

using fovea::index_t;

struct inputs {
  std::vector<float> q, k, v, o, g, lse, dq, dk, dv;
  inputs(index_t n, index_t d)
      : q(n * d), k(n * d), v(n * d), o(n * d), g(n * d), lse(n), dq(n * d), dk(n * d), dv(n * d) {
    std::mt19937 gen(5);
    std::normal_distribution<float> dist;
    for (auto* x : {&q, &k, &v, &g})
      for (float& e : *x) e = dist(gen);
  }
};

void BM_forward(benchmark::State& state, index_t n, index_t d, bool causal, int threads) {
  inputs in(n, d);
  for (auto _ : state) {
    fovea::softmax_attention(fovea::bhsd<const float>(in.q.data(), 1, 1, n, d),
                             fovea::bhsd<const float>(in.k.data(), 1, 1, n, d),
                             fovea::bhsd<const float>(in.v.data(), 1, 1, n, d),
                             fovea::bhsd(in.o.data(), 1, 1, n, d),
                             {.causal = causal, .lse = fovea::view(in.lse.data(), {1, 1, n}),
                              .threads = threads});
    benchmark::DoNotOptimize(in.o.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(
      4.0 * double(n) * double(n) * double(d) * (causal ? 0.5 : 1.0),
      benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

void BM_backward(benchmark::State& state, index_t n, index_t d, bool causal, int threads) {
  inputs in(n, d);
  const auto Q = fovea::bhsd<const float>(in.q.data(), 1, 1, n, d);
  const auto K = fovea::bhsd<const float>(in.k.data(), 1, 1, n, d);
  const auto V = fovea::bhsd<const float>(in.v.data(), 1, 1, n, d);
  fovea::softmax_attention(Q, K, V, fovea::bhsd(in.o.data(), 1, 1, n, d),
                           {.causal = causal, .lse = fovea::view(in.lse.data(), {1, 1, n})});
  for (auto _ : state) {
    fovea::softmax_attention_backward(
        Q, K, V, fovea::bhsd<const float>(in.o.data(), 1, 1, n, d),
        fovea::bhsd<const float>(in.g.data(), 1, 1, n, d),
        fovea::view<const float>(in.lse.data(), {1, 1, n}), fovea::bhsd(in.dq.data(), 1, 1, n, d),
        fovea::bhsd(in.dk.data(), 1, 1, n, d), fovea::bhsd(in.dv.data(), 1, 1, n, d),
        {.causal = causal, .threads = threads});
    benchmark::DoNotOptimize(in.dq.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(
      10.0 * double(n) * double(n) * double(d) * (causal ? 0.5 : 1.0),
      benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

/// Flops of the causal linear backward's chunked form per token (C = 64 keys a chunk, E
/// features = D, M = D): the chunk's pair products and their masked uses, 8E + 6M per
/// (query, key) pair in a chunk, and the state products, 12 E M.
double linear_backward_flops(index_t n, index_t d) {
  const double C = double(fovea::detail::linear_chunk), E = double(d), M = double(d);
  return double(n) * (C * (8 * E + 6 * M) + 12 * E * M);
}

void BM_linear(benchmark::State& state, index_t n, index_t d, bool backward) {
  inputs in(n, d);
  const auto Q = fovea::bhsd<const float>(in.q.data(), 1, 1, n, d);
  const auto K = fovea::bhsd<const float>(in.k.data(), 1, 1, n, d);
  const auto V = fovea::bhsd<const float>(in.v.data(), 1, 1, n, d);
  const fovea::linear_options o{.causal = true, .threads = 1};
  fovea::linear_attention(Q, K, V, fovea::bhsd(in.o.data(), 1, 1, n, d), o);
  for (auto _ : state) {
    if (backward)
      fovea::linear_attention_backward(Q, K, V, fovea::bhsd<const float>(in.o.data(), 1, 1, n, d),
                                       fovea::bhsd<const float>(in.g.data(), 1, 1, n, d),
                                       fovea::bhsd(in.dq.data(), 1, 1, n, d),
                                       fovea::bhsd(in.dk.data(), 1, 1, n, d),
                                       fovea::bhsd(in.dv.data(), 1, 1, n, d), o);
    else
      fovea::linear_attention(Q, K, V, fovea::bhsd(in.o.data(), 1, 1, n, d), o);
    benchmark::DoNotOptimize(in.dq.data());
    benchmark::DoNotOptimize(in.o.data());
  }
  if (backward)
    state.counters["GFLOP/s"] = benchmark::Counter(linear_backward_flops(n, d),
                                                   benchmark::Counter::kIsIterationInvariantRate,
                                                   benchmark::Counter::kIs1000);
}

/// Dynamic mask attention, causal, one head, keeping `keep` keys per row by a random
/// per-key bias (the (B, Hk, 1, Sk) form dynamic_mask_bias makes): the forward, the
/// backward, or softmax attention's backward with the same bias (the dense baseline).
enum class dma_run { forward, backward, dense_backward };
void BM_dma(benchmark::State& state, index_t n, index_t d, index_t keep, dma_run run) {
  inputs in(n, d);
  std::vector<float> bias(n), dbias(n);
  std::mt19937 gen(6);
  std::normal_distribution<float> dist(0.f, 2.f);
  for (float& e : bias) e = dist(gen);
  const auto Q = fovea::bhsd<const float>(in.q.data(), 1, 1, n, d);
  const auto K = fovea::bhsd<const float>(in.k.data(), 1, 1, n, d);
  const auto V = fovea::bhsd<const float>(in.v.data(), 1, 1, n, d);
  const auto O = fovea::bhsd(in.o.data(), 1, 1, n, d);
  const auto Bias = fovea::view<const float>(bias.data(), {1, 1, 1, n});
  const auto L = fovea::view(in.lse.data(), {1, 1, n});
  const fovea::dynamic_mask_options o{.causal = true, .keep = keep, .lse = L, .threads = 1};
  fovea::softmax_options dense{.causal = true, .threads = 1};
  dense.bias = Bias;
  if (run == dma_run::dense_backward) {
    dense.lse = L;
    fovea::softmax_attention(Q, K, V, O, dense);
    dense.lse = {};
  } else {
    fovea::dynamic_mask_attention(Q, K, V, O, Bias, o);
  }
  const auto G = fovea::bhsd<const float>(in.g.data(), 1, 1, n, d);
  const auto dQ = fovea::bhsd(in.dq.data(), 1, 1, n, d), dK = fovea::bhsd(in.dk.data(), 1, 1, n, d),
             dV = fovea::bhsd(in.dv.data(), 1, 1, n, d);
  const auto dBias = fovea::view(dbias.data(), {1, 1, 1, n});
  for (auto _ : state) {
    if (run == dma_run::forward)
      fovea::dynamic_mask_attention(Q, K, V, O, Bias, o);
    else if (run == dma_run::backward)
      fovea::dynamic_mask_attention_backward(Q, K, V, fovea::tensor_view<const float, 4>(O), Bias, G,
                                             fovea::tensor_view<const float, 3>(L), dQ, dK, dV, o, dBias);
    else
      fovea::softmax_attention_backward(Q, K, V, fovea::tensor_view<const float, 4>(O), G,
                                        fovea::tensor_view<const float, 3>(L), dQ, dK, dV, dense,
                                        {.dbias = dBias});
    benchmark::DoNotOptimize(in.dq.data());
    benchmark::DoNotOptimize(in.o.data());
  }
  // the kept (query, key) pairs: row i keeps min(i + 1, keep) keys
  const double pairs = double(n) * double(keep) - 0.5 * double(keep) * double(keep - 1);
  const double per_pair = run == dma_run::forward ? 4.0 * double(d) : 10.0 * double(d);
  state.counters["GFLOP/s"] = benchmark::Counter(
      run == dma_run::dense_backward ? 10.0 * double(d) * 0.5 * double(n) * double(n) : pairs * per_pair,
      benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = fovea::bench::initialize(argc, argv);
  const double peak = fovea::bench::measure_fma_peak_gflops();
  const int max_threads = fovea::detail::resolve_threads(0);
  std::vector<int> thread_counts{1};
  if (max_threads > 1) thread_counts.push_back(max_threads);
  const index_t n = quick ? 2048 : 4096, d = 128;
  std::vector<std::string> shapes;
  for (bool causal : {false, true})
    for (int threads : thread_counts) {
      const std::string shape = "/N=" + std::to_string(n) + "/D=" + std::to_string(d) +
                                (causal ? "/causal" : "/full") + "/threads=" + std::to_string(threads);
      shapes.push_back(shape);
      fovea::bench::add("backward" + shape, BM_backward, n, d, causal, threads);
      fovea::bench::add("forward" + shape, BM_forward, n, d, causal, threads);
    }
  // the plot's sweep (scripts/plot_bench.py --backward): one thread, N below the table's
  for (index_t sweep_n : {index_t(512), index_t(1024), index_t(2048)}) {
    if (quick || sweep_n >= n) continue;
    for (bool causal : {false, true}) {
      const std::string shape = "/N=" + std::to_string(sweep_n) + "/D=" + std::to_string(d) +
                                (causal ? "/causal" : "/full") + "/threads=1";
      fovea::bench::add("backward" + shape, BM_backward, sweep_n, d, causal, 1);
      fovea::bench::add("forward" + shape, BM_forward, sweep_n, d, causal, 1);
    }
  }
  const index_t linear_n = quick ? 2048 : 8192;
  const std::string linear_shape = "/causal/elu/N=" + std::to_string(linear_n) + "/D=64/threads=1";
  fovea::bench::add("linear_backward" + linear_shape, BM_linear, linear_n, index_t(64), true);
  fovea::bench::add("linear_forward" + linear_shape, BM_linear, linear_n, index_t(64), false);
  const index_t dma_n = quick ? 2048 : 8192, dma_keep = quick ? 256 : 1024;
  const std::string dma_shape = "/causal/N=" + std::to_string(dma_n) + "/D=128/keep=" +
                                std::to_string(dma_keep) + "/threads=1";
  fovea::bench::add("dma_backward" + dma_shape, BM_dma, dma_n, d, dma_keep, dma_run::backward);
  fovea::bench::add("dma_forward" + dma_shape, BM_dma, dma_n, d, dma_keep, dma_run::forward);
  fovea::bench::add("dense_backward_with_bias" + dma_shape, BM_dma, dma_n, d, dma_keep,
                    dma_run::dense_backward);
  fovea::bench::summary_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  const auto& all = reporter.results();
  std::printf("\nFMA peak (fp32, one core, %s): %.1f GFLOP/s\n", fovea::default_backend::name(), peak);
  std::printf("\n| backward, fp32, one head | ms | GFLOP/s (10 N^2 D) | of peak | vs forward time |\n"
              "|---|---:|---:|---:|---:|\n");
  for (const auto& shape : shapes) {
    const auto b = all.find("backward" + shape), f = all.find("forward" + shape);
    if (b == all.end() || f == all.end()) continue;
    const int threads = std::stoi(shape.substr(shape.rfind('=') + 1));
    const double gflops = b->second.counter("GFLOP/s") / 1e9;
    std::printf("| %s | %.1f | %.1f | %.0f%% | %.2fx |\n", shape.substr(1).c_str(),
                b->second.seconds * 1e3, gflops, 100 * gflops / (peak * threads),
                b->second.seconds / f->second.seconds);
  }
  const std::string full = "/N=" + std::to_string(n) + "/D=128/full/threads=1";
  const std::string causal = "/N=" + std::to_string(n) + "/D=128/causal/threads=1";
  const auto bf = all.find("backward" + full), bc = all.find("backward" + causal);
  if (bf != all.end() && bc != all.end())
    std::printf("\ncausal backward %.2fx faster than full\n", bf->second.seconds / bc->second.seconds);
  if (max_threads > 1) {
    const auto b2 = all.find("backward/N=" + std::to_string(n) + "/D=128/full/threads=" +
                             std::to_string(max_threads));
    if (bf != all.end() && b2 != all.end())
      std::printf("%d threads %.2fx faster than 1 (full)\n", max_threads,
                  bf->second.seconds / b2->second.seconds);
  }
  const auto lb = all.find("linear_backward" + linear_shape), lf = all.find("linear_forward" + linear_shape);
  if (lb != all.end() && lf != all.end()) {
    const double gflops = lb->second.counter("GFLOP/s") / 1e9;
    std::printf("\n| linear backward, causal, elu+1, one head | ms | GFLOP/s (chunked form) | of peak | "
                "vs forward time |\n|---|---:|---:|---:|---:|\n| N=%ld D=64 | %.2f | %.1f | %.0f%% | %.2fx |\n",
                long(linear_n), lb->second.seconds * 1e3, gflops, 100 * gflops / peak,
                lb->second.seconds / lf->second.seconds);
  }
  const auto db = all.find("dma_backward" + dma_shape), df = all.find("dma_forward" + dma_shape),
             dd = all.find("dense_backward_with_bias" + dma_shape);
  if (db != all.end() && df != all.end() && dd != all.end()) {
    const double gflops = db->second.counter("GFLOP/s") / 1e9;
    std::printf("\n| dynamic-mask backward, causal, one head, d bias | ms | GFLOP/s (10 D per kept pair) | "
                "of peak | vs its forward | vs dense backward with the bias |\n"
                "|---|---:|---:|---:|---:|---:|\n| N=%ld D=128 keep=%ld | %.1f | %.1f | %.0f%% | %.2fx | "
                "%.1fx faster |\n",
                long(dma_n), long(dma_keep), db->second.seconds * 1e3, gflops, 100 * gflops / peak,
                db->second.seconds / df->second.seconds, dd->second.seconds / db->second.seconds);
  }
  return 0;
}
