// linear_recurrence (gated DeltaNet's rule, Qwen3-Next's shape: 16 heads of 128 x 128
// states, L2-normalised keys) against the token-by-token recurrence a C++ user would
// write (the loop llama.cpp's gated_delta_net runs), in one binary; how time grows with
// N; the decode step against reading and writing every state once; and titans_memory
// (momentum and forgetting, chunks of 16) against the same update written token by token.
#include <benchmark/benchmark.h>

#include <cmath>
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
constexpr index_t H = 16, D = 128;

struct inputs {
  index_t n, heads;
  bool per_dim;  ///< KDA's decays, one per key dimension
  std::vector<float> q, k, v, o, g, beta;
  inputs(index_t n_, index_t heads_, bool per_dim_ = false)
      : n(n_), heads(heads_), per_dim(per_dim_), q(heads * n * D), k(heads * n * D),
        v(heads * n * D), o(heads * n * D), g(heads * n * (per_dim ? D : 1)), beta(heads * n) {
    std::mt19937 gen(5);
    std::normal_distribution<float> normal;
    std::uniform_real_distribution<float> unit(0.f, 1.f);
    for (auto* x : {&q, &k, &v})
      for (float& e : *x) e = normal(gen);
    for (index_t r = 0; r < heads * n; ++r) {  // L2-normalised q and k rows
      for (auto* x : {&q, &k}) {
        float s = 0;
        for (index_t e = 0; e < D; ++e) s += (*x)[r * D + e] * (*x)[r * D + e];
        for (index_t e = 0; e < D; ++e) (*x)[r * D + e] /= std::sqrt(s);
      }
      g[r] = -0.1f * unit(gen);
      beta[r] = unit(gen);
    }
    if (per_dim)  // log decays in [-0.2, 0] per dimension
      for (float& x : g) x = -0.2f * unit(gen);
  }
  fovea::linear_recurrence_options options() const {
    return {.rule = fovea::update_rule::gated_delta,
            .decay = fovea::bhsd<const float>(g.data(), 1, heads, n, per_dim ? D : 1),
            .beta = fovea::bhsd<const float>(beta.data(), 1, heads, n, 1),
            .threads = 1};
  }
};

/// Flops of the chunked form per token and head (C = recurrence_chunk): K K^T, W, U, W S, Q K^T,
/// (Gamma Q) S, P U' and the state update; the triangular inverse (C^3 / 3 per chunk) left out.
double chunked_flops(index_t n, index_t heads) {
  const double C = double(fovea::detail::recurrence_chunk);
  return double(n) * double(heads) * (2 * C * D * 5 + 2.0 * D * D * 3);
}

void BM_chunked(benchmark::State& state, index_t n, bool per_dim) {
  inputs in(n, H, per_dim);
  const auto o = in.options();
  for (auto _ : state) {
    fovea::linear_recurrence(fovea::bhsd<const float>(in.q.data(), 1, H, n, D),
                             fovea::bhsd<const float>(in.k.data(), 1, H, n, D),
                             fovea::bhsd<const float>(in.v.data(), 1, H, n, D),
                             fovea::bhsd(in.o.data(), 1, H, n, D), o);
    benchmark::DoNotOptimize(in.o.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(chunked_flops(n, H),
                                                 benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}

/// KDA's decays through the state object one token at a time: the fused token
/// recurrence (how per-dimension decays ran before they had a chunked form).
void BM_token_steps(benchmark::State& state, index_t n) {
  inputs in(n, H, true);
  fovea::linear_recurrence_state<float> s(1, H, D, D);
  for (auto _ : state) {
    s.reset();
    for (index_t t = 0; t < n; ++t) {
      auto o = in.options();
      o.decay = fovea::slice(o.decay, 2, t, 1);
      o.beta = fovea::slice(o.beta, 2, t, 1);
      s.step(fovea::slice(fovea::bhsd<const float>(in.q.data(), 1, H, n, D), 2, t, 1),
             fovea::slice(fovea::bhsd<const float>(in.k.data(), 1, H, n, D), 2, t, 1),
             fovea::slice(fovea::bhsd<const float>(in.v.data(), 1, H, n, D), 2, t, 1),
             fovea::slice(fovea::bhsd(in.o.data(), 1, H, n, D), 2, t, 1), o);
    }
    benchmark::DoNotOptimize(in.o.data());
  }
}

/// The recurrence as written by hand: per token and head, decay, S^T k, the delta, the
/// rank-1 update and S^T q, over a row-major state.
void BM_recurrence(benchmark::State& state, index_t n) {
  inputs in(n, H);
  std::vector<float> S(D * D), ks(D), vn(D);
  const float scale = 1 / std::sqrt(float(D));
  for (auto _ : state) {
    for (index_t h = 0; h < H; ++h) {
      std::fill(S.begin(), S.end(), 0.f);
      for (index_t t = 0; t < n; ++t) {
        const float* k = &in.k[(h * n + t) * D];
        const float* v = &in.v[(h * n + t) * D];
        const float* q = &in.q[(h * n + t) * D];
        const float a = std::exp(in.g[h * n + t]), b = in.beta[h * n + t];
        for (float& x : S) x *= a;
        std::fill(ks.begin(), ks.end(), 0.f);
        for (index_t e = 0; e < D; ++e)
          for (index_t c = 0; c < D; ++c) ks[c] += k[e] * S[e * D + c];
        for (index_t c = 0; c < D; ++c) vn[c] = b * (v[c] - ks[c]);
        for (index_t e = 0; e < D; ++e)
          for (index_t c = 0; c < D; ++c) S[e * D + c] += k[e] * vn[c];
        float* o = &in.o[(h * n + t) * D];
        std::fill(o, o + D, 0.f);
        for (index_t e = 0; e < D; ++e)
          for (index_t c = 0; c < D; ++c) o[c] += q[e] * S[e * D + c];
        for (index_t c = 0; c < D; ++c) o[c] *= scale;
      }
    }
    benchmark::DoNotOptimize(in.o.data());
  }
}

/// Titans' gates for `in`: momentum eta in [0.5, 1], step theta in [0, 0.1], forgetting
/// alpha in [0, 0.05], per head and token.
struct titans_gates {
  std::vector<float> eta, theta, alpha;
  explicit titans_gates(const inputs& in) : eta(in.g.size()), theta(eta.size()), alpha(eta.size()) {
    for (std::size_t i = 0; i < eta.size(); ++i) {
      eta[i] = 0.5f + 0.5f * in.beta[i];
      theta[i] = 0.1f * in.beta[(i * 7) % eta.size()];
      alpha[i] = -0.5f * in.g[i];
    }
  }
  fovea::titans_memory_options options(index_t n, index_t heads, index_t chunk) const {
    return {.eta = fovea::bhsd<const float>(eta.data(), 1, heads, n, 1),
            .theta = fovea::bhsd<const float>(theta.data(), 1, heads, n, 1),
            .alpha = fovea::bhsd<const float>(alpha.data(), 1, heads, n, 1),
            .chunk = chunk,
            .threads = 1};
  }
};

/// Flops of titans_memory's chunked form per token and head: K M0, (a Q) M0, (c Q) U0, the
/// two state updates (10 Dk Dv) and the chunk's Q K^T and P G (4 C D).
double titans_flops(index_t n, index_t heads, index_t chunk) {
  return double(n) * double(heads) * (10.0 * D * D + 4.0 * double(chunk) * D);
}

void BM_titans(benchmark::State& state, index_t n, index_t chunk) {
  inputs in(n, H);
  const titans_gates gates(in);
  const auto o = gates.options(n, H, chunk);
  for (auto _ : state) {
    fovea::titans_memory(fovea::bhsd<const float>(in.q.data(), 1, H, n, D),
                         fovea::bhsd<const float>(in.k.data(), 1, H, n, D),
                         fovea::bhsd<const float>(in.v.data(), 1, H, n, D),
                         fovea::bhsd(in.o.data(), 1, H, n, D), o);
    benchmark::DoNotOptimize(in.o.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(titans_flops(n, H, chunk),
                                                 benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}

/// The same update token by token, as written by hand: the error of M0 (the memory at the
/// chunk's start) on k, the momentum's rank-1 step, forgetting, the read.
void BM_titans_recurrence(benchmark::State& state, index_t n, index_t chunk) {
  inputs in(n, H);
  const titans_gates gates(in);
  std::vector<float> M(D * D), U(D * D), M0(D * D), err(D);
  for (auto _ : state) {
    for (index_t h = 0; h < H; ++h) {
      std::fill(M.begin(), M.end(), 0.f);
      std::fill(U.begin(), U.end(), 0.f);
      for (index_t t = 0; t < n; ++t) {
        if (t % chunk == 0) M0 = M;
        const float* k = &in.k[(h * n + t) * D];
        const float* v = &in.v[(h * n + t) * D];
        const float* q = &in.q[(h * n + t) * D];
        const index_t i = h * n + t;
        const float eta = gates.eta[i], step = 2 * gates.theta[i], keep = 1 - gates.alpha[i];
        for (index_t c = 0; c < D; ++c) err[c] = -v[c];
        for (index_t e = 0; e < D; ++e)
          for (index_t c = 0; c < D; ++c) err[c] += k[e] * M0[e * D + c];
        for (index_t e = 0; e < D; ++e)
          for (index_t c = 0; c < D; ++c) {
            float& u = U[e * D + c];
            u = eta * u - step * k[e] * err[c];
            M[e * D + c] = keep * M[e * D + c] + u;
          }
        float* o = &in.o[(h * n + t) * D];
        std::fill(o, o + D, 0.f);
        for (index_t e = 0; e < D; ++e)
          for (index_t c = 0; c < D; ++c) o[c] += q[e] * M[e * D + c];
      }
    }
    benchmark::DoNotOptimize(in.o.data());
  }
}

constexpr index_t decode_heads = 32;

/// One decode token for 32 heads of 128 x 128 fp32 states (the state object's fused step).
void BM_decode_step(benchmark::State& state) {
  inputs in(1, decode_heads);
  fovea::linear_recurrence_state<float> s(1, decode_heads, D, D);
  const auto o = in.options();
  for (auto _ : state) {
    s.step(fovea::bhsd<const float>(in.q.data(), 1, decode_heads, 1, D),
           fovea::bhsd<const float>(in.k.data(), 1, decode_heads, 1, D),
           fovea::bhsd<const float>(in.v.data(), 1, decode_heads, 1, D),
           fovea::bhsd(in.o.data(), 1, decode_heads, 1, D), o);
    benchmark::DoNotOptimize(in.o.data());
  }
}

/// Reading and writing the same states once: the floor of a decode step.
void BM_state_copy(benchmark::State& state) {
  std::vector<float> a(decode_heads * D * D, 1.f), b(a.size());
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), a.size() * 4);
    benchmark::DoNotOptimize(b.data());
    std::swap(a, b);
  }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  const double peak = fovea::bench::measure_fma_peak_gflops();
  const std::string tail = "/H=16/D=128/threads=1";
  for (index_t n : {4096, 8192, 32768})
    fovea::bench::add("chunked/gated_delta/N=" + std::to_string(n) + tail, BM_chunked, n, false);
  fovea::bench::add("recurrence/gated_delta/N=8192" + tail, BM_recurrence, index_t(8192));
  fovea::bench::add("chunked/kda/N=8192" + tail, BM_chunked, index_t(8192), true);
  fovea::bench::add("token_steps/kda/N=8192" + tail, BM_token_steps, index_t(8192));
  for (index_t n : {4096, 8192, 32768})
    fovea::bench::add("titans/chunk=16/N=" + std::to_string(n) + tail, BM_titans, n, index_t(16));
  fovea::bench::add("titans/chunk=1/N=8192" + tail, BM_titans, index_t(8192), index_t(1));
  fovea::bench::add("titans_recurrence/chunk=16/N=8192" + tail, BM_titans_recurrence,
                    index_t(8192), index_t(16));
  fovea::bench::add("decode_step/gated_delta/H=32/D=128", BM_decode_step)
      ->Unit(benchmark::kMicrosecond);
  fovea::bench::add("state_copy/H=32/D=128", BM_state_copy)->Unit(benchmark::kMicrosecond);
  fovea::bench::summary_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  const auto& all = reporter.results();
  auto at = [&](const std::string& name) {
    const auto it = all.find(name);
    return it == all.end() ? fovea::bench::result{} : it->second;
  };
  std::printf("\nFMA peak (fp32, one core, %s): %.1f GFLOP/s\n\n", fovea::default_backend::name(),
              peak);
  std::printf("| gated_delta, 16 heads, D=128, 1 thread | ms | GFLOP/s (chunked form) | of peak |\n");
  std::printf("|---|---:|---:|---:|\n");
  for (index_t n : {4096, 8192, 32768}) {
    const auto r = at("chunked/gated_delta/N=" + std::to_string(n) + tail);
    const double g = r.counter("GFLOP/s") / 1e9;
    std::printf("| N=%ld | %.1f | %.1f | %.0f%% |\n", long(n), r.seconds * 1e3, g, 100 * g / peak);
  }
  const auto c4 = at("chunked/gated_delta/N=4096" + tail), c8 = at("chunked/gated_delta/N=8192" + tail),
             c32 = at("chunked/gated_delta/N=32768" + tail), rec = at("recurrence/gated_delta/N=8192" + tail);
  if (c8.seconds > 0 && rec.seconds > 0)
    std::printf("\nchunked vs the token-by-token recurrence at N=8192: %.1fx (recurrence %.0f ms)\n",
                rec.seconds / c8.seconds, rec.seconds * 1e3);
  if (c4.seconds > 0 && c32.seconds > 0)
    std::printf("time(N=32768) / time(N=4096) = %.2f (linear growth: 8)\n", c32.seconds / c4.seconds);
  const auto kda = at("chunked/kda/N=8192" + tail), kda_steps = at("token_steps/kda/N=8192" + tail);
  if (kda.seconds > 0 && kda_steps.seconds > 0)
    std::printf("KDA (gated_delta, decays per key dimension) at N=8192: chunked %.1f ms (%.0f%% of "
                "peak), %.1fx faster than the fused token steps (%.0f ms)\n",
                kda.seconds * 1e3, 100 * kda.counter("GFLOP/s") / 1e9 / peak,
                kda_steps.seconds / kda.seconds, kda_steps.seconds * 1e3);
  const auto step = at("decode_step/gated_delta/H=32/D=128"), copy = at("state_copy/H=32/D=128");
  if (step.seconds > 0 && copy.seconds > 0)
    std::printf("decode step, 32 heads of 128 x 128: %.1f us per token = %.2fx reading and writing "
                "the states once (%.1f us)\n",
                step.seconds * 1e6, step.seconds / copy.seconds, copy.seconds * 1e6);
  std::printf("\n| titans_memory, 16 heads, D=128, 1 thread | ms | GFLOP/s (chunked form) | of peak |\n");
  std::printf("|---|---:|---:|---:|\n");
  for (index_t n : {4096, 8192, 32768}) {
    const auto r = at("titans/chunk=16/N=" + std::to_string(n) + tail);
    const double g = r.counter("GFLOP/s") / 1e9;
    std::printf("| chunk=16 N=%ld | %.1f | %.1f | %.0f%% |\n", long(n), r.seconds * 1e3, g, 100 * g / peak);
  }
  const auto t1 = at("titans/chunk=1/N=8192" + tail), t16 = at("titans/chunk=16/N=8192" + tail);
  const auto trec = at("titans_recurrence/chunk=16/N=8192" + tail);
  std::printf("| chunk=1 (the exact recurrence) N=8192 | %.1f | %.1f | %.0f%% |\n", t1.seconds * 1e3,
              t1.counter("GFLOP/s") / 1e9, 100 * t1.counter("GFLOP/s") / 1e9 / peak);
  if (t16.seconds > 0 && trec.seconds > 0)
    std::printf("\ntitans chunk=16 vs the same update token by token at N=8192: %.1fx (loop %.0f ms)\n",
                trec.seconds / t16.seconds, trec.seconds * 1e3);
  return 0;
}
