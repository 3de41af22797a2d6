// softmax_attention with fp32 queries and outputs over KV caches of every type (fp32,
// bf16, fp16, q8_0, int8, e4m3), in one binary so ratios come out of one run. Decode is
// read-bound: its figure is GB/s of cache read against a read micro-benchmark, and its
// speed-up over fp32. Prefill is compute-bound: each cache type against bf16 and fp32;
// and the bf16 arithmetic (all-bf16 calls, bf16_products) against fp32, as MLA decode.
//
//   cache_bench [--quick] [google benchmark flags]
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <fovea/fovea.hpp>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "peak.hpp"
#include "summary.hpp"

namespace {

using fovea::index_t;

/// x (1, Hk, S, D) as a cache of type C; int8 with one scale per row, fp8 per head.
template <class C>
struct cache {
  std::vector<C> data;
  std::vector<float> scales;
  fovea::tensor_view<const float, 3> scale_view{};
  cache(index_t Hk, index_t S, index_t D, unsigned seed) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> dist;
    std::vector<float> x(Hk * S * D);
    for (float& e : x) e = dist(gen);
    const auto X = fovea::bhsd<const float>(x.data(), 1, Hk, S, D);
    data.resize(x.size() / fovea::values_per_element<C>::value);
    const auto dst = fovea::bhsd(data.data(), 1, Hk, S, D);
    if constexpr (std::is_same_v<C, std::int8_t>) {
      scales.resize(Hk * S);
      const auto s = fovea::view(scales.data(), {1, Hk, S});
      fovea::quantize(X, dst, s);
      scale_view = s;
    } else if constexpr (fovea::is_scaled_v<C>) {
      scales.assign(Hk, 0.01f);
      scale_view = fovea::view<const float>(scales.data(), {1, Hk, 1}, {0, 1, 0});
      fovea::quantize(X, dst, scale_view);
    } else if constexpr (fovea::is_quantized_v<C>) {
      fovea::quantize(X, dst);
    } else {
      for (std::size_t i = 0; i < x.size(); ++i) data[i] = C(x[i]);
    }
  }
  fovea::tensor_view<const C, 4> view(index_t Hk, index_t S, index_t D) const {
    return fovea::bhsd(data.data(), 1, Hk, S, D);
  }
  /// Bytes of the cache plus its scales.
  double bytes() const {
    return double(data.size() * sizeof(C) + scales.size() * sizeof(float));
  }
};

/// The cache (1, Hk, S, D) of type C from `seed`, made once (see fovea::bench::kept).
template <class C>
const cache<C>& kept_cache(index_t Hk, index_t S, index_t D, unsigned seed) {
  return fovea::bench::kept<cache<C>>(std::tuple(Hk, S, D, seed),
                                      [&] { return cache<C>(Hk, S, D, seed); });
}

/// Decode: Sq queries of H = 32 heads against Sk keys of Hk = 8 heads, D = 128 (Q8Products:
/// with options.q8_0_products, integer logits against q quantized to q8_0).
template <class C, bool Q8Products = false>
void BM_decode(benchmark::State& state, index_t sq, index_t sk, int threads) {
  const index_t H = 32, Hk = 8, D = 128;
  std::vector<float> q(H * sq * D), o(H * sq * D);
  std::mt19937 gen(3);
  std::normal_distribution<float> dist;
  for (float& e : q) e = dist(gen);
  const auto& k = kept_cache<C>(Hk, sk, D, 1);
  const auto& v = kept_cache<C>(Hk, sk, D, 2);
  const auto Q = fovea::bhsd<const float>(q.data(), 1, H, sq, D);
  const auto O = fovea::bhsd(o.data(), 1, H, sq, D);
  const fovea::softmax_options opt{.causal = true, .k_scale = k.scale_view,
                                   .v_scale = v.scale_view, .q8_0_products = Q8Products,
                                   .threads = threads};
  for (auto _ : state) {
    fovea::softmax_attention(Q, k.view(Hk, sk, D), v.view(Hk, sk, D), O, opt);
    benchmark::DoNotOptimize(o.data());
  }
  state.counters["GB/s"] = benchmark::Counter(k.bytes() + v.bytes(),
                                              benchmark::Counter::kIsIterationInvariantRate,
                                              benchmark::Counter::kIs1000);
}

/// int8 keys and values (1, Hk, S, D) with a scale per (token, head) and per channel.
struct channel_cache {
  std::vector<float> channels, scales[2];
  std::vector<std::int8_t> codes[2];
  channel_cache(index_t Hk, index_t sk, index_t D) : channels(Hk * D) {
    std::mt19937 gen(3);
    std::normal_distribution<float> dist;
    for (index_t i = 0; i < Hk * D; ++i) channels[i] = 0.5f + float(i % 7) / 4;
    std::vector<float> x(Hk * sk * D);
    for (int m = 0; m < 2; ++m) {
      for (float& e : x) e = dist(gen);
      codes[m].resize(x.size());
      scales[m].resize(Hk * sk);
      fovea::quantize(fovea::bhsd<const float>(x.data(), 1, Hk, sk, D),
                      fovea::bhsd(codes[m].data(), 1, Hk, sk, D),
                      fovea::view(scales[m].data(), {1, Hk, sk}),
                      fovea::view<const float>(channels.data(), {Hk, D}));
    }
  }
};

/// Decode over int8 K/V with per-channel scales (and row scales): value = q * row * channel.
void BM_decode_channels(benchmark::State& state, index_t sk, int threads) {
  const index_t H = 32, Hk = 8, D = 128;
  const auto& c = fovea::bench::kept<channel_cache>(sk, [&] { return channel_cache(Hk, sk, D); });
  std::vector<float> q(H * D), o(H * D);
  std::mt19937 gen(3);
  std::normal_distribution<float> dist;
  for (float& e : q) e = dist(gen);
  const auto C = fovea::view<const float>(c.channels.data(), {Hk, D});
  const fovea::softmax_options opt{.causal = true,
                                   .k_scale = fovea::view<const float>(c.scales[0].data(), {1, Hk, sk}),
                                   .v_scale = fovea::view<const float>(c.scales[1].data(), {1, Hk, sk}),
                                   .k_channel_scale = C, .v_channel_scale = C, .threads = threads};
  const auto Q = fovea::bhsd<const float>(q.data(), 1, H, 1, D);
  for (auto _ : state) {
    fovea::softmax_attention(Q, fovea::bhsd<const std::int8_t>(c.codes[0].data(), 1, Hk, sk, D),
                             fovea::bhsd<const std::int8_t>(c.codes[1].data(), 1, Hk, sk, D),
                             fovea::bhsd(o.data(), 1, H, 1, D), opt);
    benchmark::DoNotOptimize(o.data());
  }
  state.counters["GB/s"] = benchmark::Counter(2.0 * double(Hk * sk * (D + 4)),
                                              benchmark::Counter::kIsIterationInvariantRate,
                                              benchmark::Counter::kIs1000);
}

/// Prefill: N queries and keys of one head, D = 128, causal.
template <class C>
void BM_prefill(benchmark::State& state, index_t n, int threads) {
  const index_t D = 128;
  std::vector<float> q(n * D), o(n * D);
  std::mt19937 gen(4);
  std::normal_distribution<float> dist;
  for (float& e : q) e = dist(gen);
  const auto& k = kept_cache<C>(1, n, D, 5);
  const auto& v = kept_cache<C>(1, n, D, 6);
  const auto Q = fovea::bhsd<const float>(q.data(), 1, 1, n, D);
  const auto O = fovea::bhsd(o.data(), 1, 1, n, D);
  const fovea::softmax_options opt{.causal = true, .k_scale = k.scale_view,
                                   .v_scale = v.scale_view, .threads = threads};
  for (auto _ : state) {
    fovea::softmax_attention(Q, k.view(1, n, D), v.view(1, n, D), O, opt);
    benchmark::DoNotOptimize(o.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * double(n) * double(n) * D,
                                                 benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}

/// Prefill in one storage type Q (q, k, v and out), N queries and keys of one head, D = 128,
/// non-causal; or (Mixed) fp32 q and out over bf16 keys and values with bf16_products.
template <class Q, bool Mixed = false>
void BM_prefill_arith(benchmark::State& state, index_t n) {
  const index_t D = 128;
  using KV = std::conditional_t<Mixed, fovea::bfloat16, Q>;
  std::mt19937 gen(8);
  std::normal_distribution<float> dist;
  std::vector<Q> q(n * D), o(n * D);
  std::vector<KV> k(n * D), v(n * D);
  for (Q& e : q) e = Q(dist(gen));
  for (KV& e : k) e = KV(dist(gen));
  for (KV& e : v) e = KV(dist(gen));
  const fovea::softmax_options opt{.bf16_products = Mixed, .threads = 1};
  for (auto _ : state) {
    fovea::softmax_attention(fovea::bhsd<const Q>(q.data(), 1, 1, n, D),
                             fovea::bhsd<const KV>(k.data(), 1, 1, n, D),
                             fovea::bhsd<const KV>(v.data(), 1, 1, n, D),
                             fovea::bhsd(o.data(), 1, 1, n, D), opt);
    benchmark::DoNotOptimize(o.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(4.0 * double(n) * double(n) * D,
                                                 benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}

/// MLA-shaped decode (DeepSeek's latent attention with absorbed weights): H query heads
/// over one key/value head whose rows hold 576 values (512 latent + 64 rotary); V is the
/// first 512 columns of the same rows (one buffer, two views).
template <class C, bool Bf16Products = false>
void BM_mla(benchmark::State& state, index_t H, index_t sk, int threads) {
  const index_t Dqk = 576, Dv = 512;
  std::vector<float> q(H * Dqk), o(H * Dv);
  std::mt19937 gen(7);
  std::normal_distribution<float> dist;
  for (float& e : q) e = dist(gen);
  const auto& rows = fovea::bench::kept<std::vector<C>>(sk, [&] {
    std::vector<C> r(sk * Dqk);
    for (C& e : r) e = C(dist(gen));
    return r;
  });
  const auto K = fovea::bhsd<const C>(rows.data(), 1, 1, sk, Dqk);
  const auto V = fovea::view<const C>(rows.data(), {1, 1, sk, Dv}, {sk * Dqk, sk * Dqk, Dqk, 1});
  const auto Q = fovea::bhsd<const float>(q.data(), 1, H, 1, Dqk);
  const auto O = fovea::bhsd(o.data(), 1, H, 1, Dv);
  for (auto _ : state) {
    fovea::softmax_attention(Q, K, V, O,
                             {.causal = true, .bf16_products = Bf16Products, .threads = threads});
    benchmark::DoNotOptimize(o.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * double(H) * double(sk) * (Dqk + Dv),
                                                 benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}

template <class C>
void add_type(const std::string& type, const std::vector<int>& thread_counts, index_t n) {
  for (int threads : thread_counts)
    fovea::bench::add("decode/" + type + "/Sq=1/Sk=32768/H=32/Hk=8/D=128/threads=" +
                          std::to_string(threads),
                      BM_decode<C>, index_t(1), index_t(32768), threads);
  fovea::bench::add("prefill/" + type + "/N=" + std::to_string(n) + "/D=128/causal/threads=1",
                    BM_prefill<C>, n, 1);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = fovea::bench::initialize(argc, argv);

  const int max_threads = fovea::detail::resolve_threads(0);
  const double read_gbs = fovea::bench::measure_read_bandwidth_gbs();
  const double peak = fovea::bench::measure_fma_peak_gflops();
  std::vector<int> thread_counts{1};
  if (max_threads > 1) thread_counts.push_back(max_threads);
  const index_t n = quick ? 2048 : 4096;
  const char* types[] = {"fp32", "bf16", "fp16", "q8_0", "int8", "e4m3"};
  add_type<float>(types[0], thread_counts, n);
  add_type<fovea::bfloat16>(types[1], thread_counts, n);
  add_type<fovea::half>(types[2], thread_counts, n);
  add_type<fovea::block_q8_0>(types[3], thread_counts, n);
  for (int threads : thread_counts)
    fovea::bench::add("decode/q8_0_products/Sq=1/Sk=32768/H=32/Hk=8/D=128/threads=" +
                          std::to_string(threads),
                      BM_decode<fovea::block_q8_0, true>, index_t(1), index_t(32768), threads);
  add_type<std::int8_t>(types[4], thread_counts, n);
  add_type<fovea::e4m3>(types[5], thread_counts, n);
  fovea::bench::add("decode/int8_channel/Sq=1/Sk=32768/H=32/Hk=8/D=128/threads=1",
                    BM_decode_channels, index_t(32768), 1);
  const index_t mla_keys = quick ? 8192 : 32768;
  const std::string mla = "/H=128/Sk=" + std::to_string(mla_keys) + "/threads=1";
  fovea::bench::add("mla/fp32" + mla, BM_mla<float>, index_t(128), mla_keys, 1);
  fovea::bench::add("mla/bf16" + mla, BM_mla<fovea::bfloat16>, index_t(128), mla_keys, 1);
  fovea::bench::add("mla/bf16_products" + mla, BM_mla<fovea::bfloat16, true>, index_t(128),
                    mla_keys, 1);
  const std::string arith = "/N=" + std::to_string(n) + "/D=128/full/threads=1";
  fovea::bench::add("arith/fp32" + arith, BM_prefill_arith<float>, n);
  fovea::bench::add("arith/bf16" + arith, BM_prefill_arith<fovea::bfloat16>, n);
  fovea::bench::add("arith/bf16_products" + arith, BM_prefill_arith<float, true>, n);

  fovea::bench::summary_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  const auto& all = reporter.results();
  auto find = [&](const std::string& name) -> const fovea::bench::result* {
    const auto it = all.find(name);
    return it == all.end() ? nullptr : &it->second;
  };

  std::printf("\nOne-thread read bandwidth: %.1f GB/s\n\n", read_gbs);
  std::printf(
      "| decode, fp32 q, Sq=1, Sk=32768, H=32, Hk=8, D=128 | threads | ms | GB/s of cache | of "
      "1-thread read | vs fp32 | vs bf16 | vs 1 thread |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const char* type :
       {"fp32", "bf16", "fp16", "q8_0", "q8_0_products", "int8", "int8_channel", "e4m3"})
    for (int threads : thread_counts) {
      const std::string tail = "/Sq=1/Sk=32768/H=32/Hk=8/D=128/threads=" + std::to_string(threads);
      const auto* r = find(std::string("decode/") + type + tail);
      const auto* f = find("decode/fp32" + tail);
      const auto* b = find("decode/bf16" + tail);
      const auto* one = find(std::string("decode/") + type +
                             "/Sq=1/Sk=32768/H=32/Hk=8/D=128/threads=1");
      if (!r || !f || !b || !one) continue;
      std::printf("| %s K/V | %d | %.2f | %.1f | %.0f%% | %.2fx | %.2fx | %.2fx |\n", type, threads,
                  r->seconds * 1e3, r->counter("GB/s") / 1e9,
                  100.0 * r->counter("GB/s") / 1e9 / read_gbs, f->seconds / r->seconds,
                  b->seconds / r->seconds, one->seconds / r->seconds);
    }
  std::printf("\n| prefill, fp32 q, N=%ld, D=128, causal, 1 thread | ms | GFLOP/s | vs fp32 K/V | vs bf16 K/V |\n|---|---:|---:|---:|---:|\n",
              long(n));
  const std::string tail = "/N=" + std::to_string(n) + "/D=128/causal/threads=1";
  for (const char* type : types) {
    const auto* r = find(std::string("prefill/") + type + tail);
    const auto* f = find("prefill/fp32" + tail);
    const auto* b = find("prefill/bf16" + tail);
    if (!r || !f || !b) continue;
    std::printf("| %s K/V | %.2f | %.1f | %.2fx | %.2fx |\n", type, r->seconds * 1e3,
                r->counter("GFLOP/s") / 1e9, f->seconds / r->seconds, b->seconds / r->seconds);
  }
  std::printf("\nFMA peak (fp32, one core, %s): %.1f GFLOP/s\n", fovea::default_backend::name(),
              peak);
  std::printf("\n| MLA decode, fp32 q, D_qk=576, D_v=512, 1 thread | cache | ms | GFLOP/s | of peak |\n"
              "|---|---|---:|---:|---:|\n");
  for (const char* type : {"fp32", "bf16", "bf16_products"}) {
    const auto* r = find(std::string("mla/") + type + mla);
    if (!r) continue;
    std::printf("| %s | %s | %.2f | %.1f | %.0f%% |\n", mla.substr(1).c_str(), type,
                r->seconds * 1e3, r->counter("GFLOP/s") / 1e9,
                100.0 * r->counter("GFLOP/s") / 1e9 / peak);
  }
  std::printf("\n| prefill, one head, N=%ld, D=128, non-causal, 1 thread | ms | GFLOP/s | of fp32 "
              "peak | vs fp32 |\n|---|---:|---:|---:|---:|\n",
              long(n));
  const char* arith_rows[][2] = {{"fp32", "fp32 q, k, v, out"},
                                 {"bf16", "bf16 q, k, v, out"},
                                 {"bf16_products", "fp32 q, out over bf16 k, v, bf16_products"}};
  for (const auto& [type, what] : arith_rows) {
    const auto* r = find(std::string("arith/") + type + arith);
    const auto* f = find("arith/fp32" + arith);
    if (!r || !f) continue;
    std::printf("| %s | %.2f | %.1f | %.0f%% | %.2fx |\n", what, r->seconds * 1e3,
                r->counter("GFLOP/s") / 1e9, 100.0 * r->counter("GFLOP/s") / 1e9 / peak,
                f->seconds / r->seconds);
  }
  return 0;
}
