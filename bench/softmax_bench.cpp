// softmax_attention against a careful Eigen baseline, in one binary so ratios come out of
// one run. Prints Google Benchmark's table, then a summary: GFLOP/s, fraction of the FMA
// peak measured here, and the speed-up over Eigen, for each shape.
//
//   softmax_bench [--quick] [google benchmark flags]
#include <benchmark/benchmark.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <Eigen/Dense>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fovea/fovea.hpp>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "peak.hpp"
#include "summary.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using fovea::index_t;
using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct inputs {
  index_t n, d;
  std::vector<float> q, k, v, o;
  inputs(index_t n_, index_t d_) : n(n_), d(d_), q(n * d), k(n * d), v(n * d), o(n * d) {
    std::mt19937 gen(42);
    std::normal_distribution<float> dist;
    for (auto* x : {&q, &k, &v})
      for (float& e : *x) e = dist(gen);
  }
};

double attention_flops(index_t n, index_t d, bool causal) {
  return 4.0 * double(n) * double(n) * double(d) * (causal ? 0.5 : 1.0);
}

void BM_fovea(benchmark::State& state, index_t n, index_t d, bool causal, int threads) {
  inputs in(n, d);
  const auto Q = fovea::bhsd(in.q.data(), 1, 1, n, d), K = fovea::bhsd(in.k.data(), 1, 1, n, d);
  const auto V = fovea::bhsd(in.v.data(), 1, 1, n, d);
  const auto O = fovea::bhsd(in.o.data(), 1, 1, n, d);
  for (auto _ : state) {
    fovea::softmax_attention(Q, K, V, O, {.causal = causal, .threads = threads});
    benchmark::DoNotOptimize(in.o.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(attention_flops(n, d, causal),
                                                 benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}

/// Logits that climb by 1.4 per key (q = 8 e0, k_j = 1.4 j e0 + noise): every key tile
/// raises the running max by ~90, so each rescale factor exp(m_old - m_new) and many
/// probabilities are denormal. Same shape as BM_fovea's inputs for the comparison.
void BM_denormal_rescale(benchmark::State& state, index_t n, index_t d) {
  inputs in(n, d);
  for (index_t i = 0; i < n; ++i) {
    in.q[i * d] = 8.f;
    for (index_t e = 1; e < d; ++e) in.q[i * d + e] = 0.f;
    in.k[i * d] = 1.4f * float(i);
  }
  const auto Q = fovea::bhsd(in.q.data(), 1, 1, n, d), K = fovea::bhsd(in.k.data(), 1, 1, n, d);
  const auto V = fovea::bhsd(in.v.data(), 1, 1, n, d);
  const auto O = fovea::bhsd(in.o.data(), 1, 1, n, d);
  for (auto _ : state) {
    fovea::softmax_attention(Q, K, V, O, {.threads = 1});
    benchmark::DoNotOptimize(in.o.data());
  }
}

/// The careful Eigen version: S = scale * Q K^T as one GEMM (scalar on the left, so Eigen
/// folds it into the GEMM), a causal mask, a stable per-row softmax, O = P V, then the
/// rows divided by their sums. Materialises the N x N matrix.
void BM_eigen(benchmark::State& state, index_t n, index_t d, bool causal, int threads) {
  inputs in(n, d);
  Eigen::setNbThreads(threads);
  const Eigen::Map<const matrix> Q(in.q.data(), n, d), K(in.k.data(), n, d), V(in.v.data(), n, d);
  Eigen::Map<matrix> O(in.o.data(), n, d);
  matrix S(n, n);
  const float scale = 1.0f / std::sqrt(float(d));
  for (auto _ : state) {
    S.noalias() = scale * Q * K.transpose();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (index_t i = 0; i < n; ++i) {
      auto row = S.row(i);
      if (causal) row.tail(n - i - 1).setConstant(-INFINITY);
      const float m = row.head(causal ? i + 1 : n).maxCoeff();
      row = (row.array() - m).exp();
    }
    O.noalias() = S * V;
    const Eigen::VectorXf sums = S.rowwise().sum();
    O.array().colwise() /= sums.array();
    benchmark::DoNotOptimize(in.o.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(attention_flops(n, d, causal),
                                                 benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}

/// KV-cache decode: Sq queries of H heads against Sk cached keys of Hk heads; the figure
/// of merit is the K and V bytes read per second.
template <class S>
void BM_decode(benchmark::State& state, index_t sq, index_t sk, int threads) {
  const index_t H = 32, Hk = 8, D = 128;
  std::vector<S> q(H * sq * D), k(Hk * sk * D), v(Hk * sk * D), o(H * sq * D);
  std::mt19937 gen(3);
  std::normal_distribution<float> dist;
  for (auto* x : {&q, &k, &v})
    for (S& e : *x) e = S(dist(gen));
  const auto Q = fovea::bhsd(q.data(), 1, H, sq, D), O = fovea::bhsd(o.data(), 1, H, sq, D);
  const auto K = fovea::bhsd(k.data(), 1, Hk, sk, D), V = fovea::bhsd(v.data(), 1, Hk, sk, D);
  for (auto _ : state) {
    fovea::softmax_attention(Q, K, V, O, {.causal = true, .threads = threads});
    benchmark::DoNotOptimize(o.data());
  }
  state.counters["GB/s"] = benchmark::Counter(2.0 * Hk * sk * D * sizeof(S),
                                              benchmark::Counter::kIsIterationInvariantRate,
                                              benchmark::Counter::kIs1000);
}

/// Peak RSS growth (KiB) of a child process that runs one softmax_attention call at
/// N x D on `threads` threads, beyond the inputs and output it allocated first. Call it
/// before this process starts any OpenMP thread: a forked child cannot use the pool.
long extra_memory_kib(index_t n, index_t d, int threads) {
  int pipe_fd[2];
  if (pipe(pipe_fd) != 0) return -1;
  const pid_t pid = fork();
  if (pid == 0) {
    inputs in(n, d);
    const auto Q = fovea::bhsd(in.q.data(), 1, 1, n, d), K = fovea::bhsd(in.k.data(), 1, 1, n, d);
    const auto V = fovea::bhsd(in.v.data(), 1, 1, n, d);
    const auto O = fovea::bhsd(in.o.data(), 1, 1, n, d);
    fovea::softmax_attention(Q, K, V, O, {.threads = threads});  // warm: threads, code pages
    rusage before{}, after{};
    getrusage(RUSAGE_SELF, &before);
    fovea::softmax_attention(Q, K, V, O, {.causal = true, .threads = threads});
    getrusage(RUSAGE_SELF, &after);
    const long extra = after.ru_maxrss - before.ru_maxrss;
    (void)!write(pipe_fd[1], &extra, sizeof extra);
    _exit(0);
  }
  long extra = -1;
  (void)!read(pipe_fd[0], &extra, sizeof extra);
  waitpid(pid, nullptr, 0);
  close(pipe_fd[0]);
  close(pipe_fd[1]);
  return extra;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = fovea::bench::initialize(argc, argv);

  const int max_threads = fovea::detail::resolve_threads(0);
  const index_t n_mem = quick ? 8192 : 16384;
  const long extra_kib = extra_memory_kib(n_mem, 128, max_threads);
  const double peak = fovea::bench::measure_fma_peak_gflops();
  const double read_gbs = fovea::bench::measure_read_bandwidth_gbs();
  const std::vector<index_t> lengths =
      quick ? std::vector<index_t>{1024, 4096} : std::vector<index_t>{512, 1024, 2048, 4096, 8192};
  std::vector<int> thread_counts{1};
  if (max_threads > 1) thread_counts.push_back(max_threads);
  for (index_t d : {64, 128})
    for (bool causal : {false, true})
      for (int threads : thread_counts)
        for (index_t n : lengths) {
          const std::string shape = "/N=" + std::to_string(n) + "/D=" + std::to_string(d) +
                                    (causal ? "/causal" : "/full") +
                                    "/threads=" + std::to_string(threads);
          fovea::bench::add("fovea" + shape, BM_fovea, n, d, causal, threads);
          fovea::bench::add("eigen" + shape, BM_eigen, n, d, causal, threads);
        }

  for (int threads : thread_counts)
    for (index_t sq : {1, 4}) {
      const std::string shape = "/Sq=" + std::to_string(sq) +
                                "/Sk=32768/H=32/Hk=8/D=128/threads=" + std::to_string(threads);
      fovea::bench::add("decode/fp32" + shape, BM_decode<float>, sq, 32768, threads);
      fovea::bench::add("decode/bf16" + shape, BM_decode<fovea::bfloat16>, sq, 32768, threads);
    }

  fovea::bench::add("extremes/denormal/N=2048/D=64/full/threads=1", BM_denormal_rescale,
                    index_t(2048), index_t(64));

  fovea::bench::summary_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();

  std::printf("\nFMA peak (fp32, one core, %s): %.1f GFLOP/s\n", fovea::default_backend::name(),
              peak);
  std::printf("\n| shape | fovea GFLOP/s | of peak | eigen GFLOP/s | fovea vs eigen |\n");
  std::printf("|---|---:|---:|---:|---:|\n");
  for (const auto& [shape, r] : reporter.pairs("fovea", "eigen")) {
    const int threads = std::stoi(shape.substr(shape.rfind('=') + 1));
    const double fovea_gflops = r.first.counter("GFLOP/s") / 1e9;
    std::printf("| %s | %.1f | %.0f%% | %.1f | %.2fx |\n", shape.substr(1).c_str(), fovea_gflops,
                100.0 * fovea_gflops / (peak * threads), r.second.counter("GFLOP/s") / 1e9,
                r.second.seconds / r.first.seconds);
  }
  std::printf("\nOne-thread read bandwidth: %.1f GB/s\n\n", read_gbs);
  std::printf(
      "| decode (causal) | fp32 ms | fp32 GB/s of K+V | of 1-thread read | bf16 ms | bf16 vs fp32 "
      "|\n");
  std::printf("|---|---:|---:|---:|---:|---:|\n");
  for (const auto& [shape, r] : reporter.pairs("decode/fp32", "decode/bf16"))
    std::printf("| %s | %.2f | %.1f | %.0f%% | %.2f | %.2fx |\n", shape.substr(1).c_str(),
                r.first.seconds * 1e3, r.first.counter("GB/s") / 1e9,
                100.0 * r.first.counter("GB/s") / 1e9 / read_gbs, r.second.seconds * 1e3,
                r.first.seconds / r.second.seconds);
  const auto& all = reporter.results();
  const auto ordinary = all.find("fovea/N=2048/D=64/full/threads=1");
  const auto denormal = all.find("extremes/denormal/N=2048/D=64/full/threads=1");
  if (ordinary != all.end() && denormal != all.end())
    std::printf(
        "\nDenormal rescale factors (logits climbing ~90 per key tile), N=2048, D=64: %.2f ms vs "
        "%.2f ms on ordinary inputs (%.2fx)\n",
        denormal->second.seconds * 1e3, ordinary->second.seconds * 1e3,
        denormal->second.seconds / ordinary->second.seconds);
  std::printf(
      "\nExtra memory of one causal call at N=%ld, D=128, %d threads: %ld KiB "
      "(the N x N matrix would be %ld MiB)\n",
      long(n_mem), max_threads, extra_kib, long(n_mem * n_mem * 4 / (1 << 20)));
  return 0;
}
