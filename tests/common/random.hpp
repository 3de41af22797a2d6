// Seeded random inputs for tests.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace fovea::test {

template <class T>
std::vector<T> normal(std::size_t n, std::uint64_t seed, double stddev = 1.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> dist(0.0, stddev);
  std::vector<T> x(n);
  for (auto& e : x) e = T(dist(gen));
  return x;
}

template <class T>
std::vector<T> uniform(std::size_t n, std::uint64_t seed, double lo, double hi) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<T> x(n);
  for (auto& e : x) e = T(dist(gen));
  return x;
}

inline std::vector<std::uint8_t> bernoulli(std::size_t n, std::uint64_t seed, double p_keep) {
  std::mt19937_64 gen(seed);
  std::bernoulli_distribution dist(p_keep);
  std::vector<std::uint8_t> x(n);
  for (auto& e : x) e = dist(gen) ? 1 : 0;
  return x;
}

}  // namespace fovea::test
