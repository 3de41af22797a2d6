// Machine ceilings measured in the same binary as the kernels: the fp32 FMA peak of one
// core (independent FMA chains in registers) and the one-thread memory read bandwidth.
#pragma once

#include <chrono>
#include <cstddef>
#include <fovea/simd/vec.hpp>
#include <utility>
#include <vector>

namespace fovea::bench {

/// fp32 GFLOP/s of one core running independent FMAs (16 accumulators hide the latency).
inline double measure_fma_peak_gflops() {
  using V = detail::vec<float, default_backend>;
  using R = typename V::type;
  // Independent FMA chains held in registers: 16 with 32 vector registers (AVX-512), 12
  // with 16 (AVX2: 16 chains and the two operands would not fit, and the spills halve the
  // figure). Either covers the FMA latency times the FMA units of current cores.
  constexpr int chains = V::registers >= 32 ? 16 : 12;
  auto run = []<std::size_t... I>(std::index_sequence<I...>, long iters) {
    R acc[chains] = {V::broadcast(float(I) * 1e-3f)...};
    const R a = V::broadcast(0.999999f), b = V::broadcast(1e-7f);
    const auto t0 = std::chrono::steady_clock::now();
    for (long it = 0; it < iters; ++it) ((acc[I] = V::fma(acc[I], a, b)), ...);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    float total = 0;  // every chain's result is used (any compiler, any target)
    ((total += V::reduce_add(acc[I])), ...);
    volatile float sink = total;
    (void)sink;
    return double(iters) * chains * V::width * 2 / s / 1e9;
  };
  double best = 0;
  for (int rep = 0; rep < 5; ++rep)
    best = std::max(best, run(std::make_index_sequence<chains>{}, 20'000'000));
  return best;
}

/// GB/s of one thread reading a buffer much larger than the caches (best of 5 passes).
inline double measure_read_bandwidth_gbs(std::size_t bytes = std::size_t(512) << 20) {
  using V = detail::vec<float, default_backend>;
  constexpr int W = V::width;
  std::vector<float> data(bytes / sizeof(float), 1.0f);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    auto s0 = V::broadcast(0.f), s1 = s0, s2 = s0, s3 = s0;
    const auto t0 = std::chrono::steady_clock::now();
    for (std::size_t i = 0; i + 4 * W <= data.size(); i += 4 * W) {
      s0 = V::add(s0, V::load(&data[i]));
      s1 = V::add(s1, V::load(&data[i + W]));
      s2 = V::add(s2, V::load(&data[i + 2 * W]));
      s3 = V::add(s3, V::load(&data[i + 3 * W]));
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    volatile float sink = V::reduce_add(V::add(V::add(s0, s1), V::add(s2, s3)));
    (void)sink;
    best = std::max(best, double(bytes) / s / 1e9);
  }
  return best;
}

}  // namespace fovea::bench
