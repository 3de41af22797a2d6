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
  constexpr int chains = 16;
  auto run = []<std::size_t... I>(std::index_sequence<I...>, long iters) {
    R acc[chains] = {V::broadcast(float(I) * 1e-3f)...};
    const R a = V::broadcast(0.999999f), b = V::broadcast(1e-7f);
    const auto t0 = std::chrono::steady_clock::now();
    for (long it = 0; it < iters; ++it) ((acc[I] = V::fma(acc[I], a, b)), ...);
    auto keep = [](R& x) { asm volatile("" : "+v"(x)); };
    (keep(acc[I]), ...);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return double(iters) * chains * V::width * 2 / s / 1e9;
  };
  double best = 0;
  for (int rep = 0; rep < 5; ++rep)
    best = std::max(best, run(std::make_index_sequence<chains>{}, 20'000'000));
  return best;
}

}  // namespace fovea::bench
