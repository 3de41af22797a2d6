// A decode loop: a prompt is prefilled into a KV cache, then tokens are generated one at
// a time, each appending its key/value to the cache and attending to all of it (GQA: 32
// query heads share 8 key/value heads). The same loop runs on a contiguous cache and on a
// paged one (vLLM layout, pages handed out in a scrambled order); both must agree.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fovea/fovea.hpp>
#include <numeric>
#include <random>
#include <span>
#include <vector>

int main() {
  std::printf("fovea: %s\n", fovea::build_info().c_str());  // backend, OpenMP, -O
  const long H = 32, Hk = 8, D = 128, prompt = 4096, steps = 64, page = 256;
  const long capacity = prompt + steps, pages = (capacity + page - 1) / page;
  std::mt19937 gen(11);
  std::normal_distribution<float> normal;
  auto random_vector = [&](long n) {
    std::vector<float> x(n);
    for (float& e : x) e = normal(gen);
    return x;
  };
  // The "model": per step, fresh q, k, v for the new token (a real model projects them).
  const auto prompt_k = random_vector(Hk * prompt * D), prompt_v = random_vector(Hk * prompt * D);
  const auto step_q = random_vector(steps * H * D), step_k = random_vector(steps * Hk * D),
             step_v = random_vector(steps * Hk * D);

  // Contiguous cache: (1, Hk, capacity, D), filled up to `length`.
  std::vector<float> k_cache(Hk * capacity * D), v_cache(Hk * capacity * D);
  // Paged cache: [pages, page, Hk, D] with a block table mapping logical to physical pages.
  std::vector<float> k_pages(pages * page * Hk * D), v_pages(pages * page * Hk * D);
  std::vector<std::int32_t> table(pages);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(5));
  auto store = [&](long pos, long hk, const float* k, const float* v) {
    std::copy(k, k + D, &k_cache[(hk * capacity + pos) * D]);
    std::copy(v, v + D, &v_cache[(hk * capacity + pos) * D]);
    const long slot = (long(table[pos / page]) * page + pos % page) * Hk + hk;
    std::copy(k, k + D, &k_pages[slot * D]);
    std::copy(v, v + D, &v_pages[slot * D]);
  };
  for (long hk = 0; hk < Hk; ++hk)
    for (long pos = 0; pos < prompt; ++pos)
      store(pos, hk, &prompt_k[(hk * prompt + pos) * D], &prompt_v[(hk * prompt + pos) * D]);

  std::vector<float> out(H * D), out_paged(H * D);
  double seconds = 0, seconds_paged = 0, max_diff = 0;
  for (long t = 0; t < steps; ++t) {
    const long length = prompt + t + 1;  // the new token's key joins the cache first
    for (long hk = 0; hk < Hk; ++hk)
      store(length - 1, hk, &step_k[(t * Hk + hk) * D], &step_v[(t * Hk + hk) * D]);
    const auto q = fovea::bhsd<const float>(&step_q[t * H * D], 1, H, 1, D);

    const auto t0 = std::chrono::steady_clock::now();
    fovea::softmax_attention(
        q, fovea::view<const float, 4>(k_cache.data(), {1, Hk, length, D}, {0, capacity * D, D, 1}),
        fovea::view<const float, 4>(v_cache.data(), {1, Hk, length, D}, {0, capacity * D, D, 1}),
        fovea::bhsd(out.data(), 1, H, 1, D), {.causal = true});
    const auto t1 = std::chrono::steady_clock::now();
    const std::int32_t lengths[1] = {std::int32_t(length)};
    fovea::softmax_attention_paged(
        q, fovea::paged_nhd<const float>(k_pages.data(), pages, page, Hk, D),
        fovea::paged_nhd<const float>(v_pages.data(), pages, page, Hk, D),
        fovea::bhsd(out_paged.data(), 1, H, 1, D),
        fovea::view<const std::int32_t, 2>(table.data(), {1, pages}),
        std::span<const std::int32_t>(lengths, 1), {.causal = true});
    const auto t2 = std::chrono::steady_clock::now();
    seconds += std::chrono::duration<double>(t1 - t0).count();
    seconds_paged += std::chrono::duration<double>(t2 - t1).count();
    for (long i = 0; i < H * D; ++i)
      max_diff = std::max(max_diff, double(std::abs(out[i] - out_paged[i])));
  }
  const double bytes = 2.0 * Hk * (prompt + steps / 2.0) * D * sizeof(float);  // K+V per step
  std::printf("kv-cache decode: %ld steps after a %ld-token prompt, H=%ld, Hk=%ld, D=%ld\n", steps,
              prompt, H, Hk, D);
  std::printf("  contiguous cache: %.0f tokens/s (%.1f GB/s of K+V)\n", steps / seconds,
              bytes * steps / seconds / 1e9);
  std::printf("  paged cache (%ld-token pages, scrambled): %.0f tokens/s\n", page,
              steps / seconds_paged);
  std::printf("  max |contiguous - paged| = %.2e\n", max_diff);
  return max_diff < 1e-5 ? 0 : 1;
}
