// An inference engine's scheduler steps over a paged KV cache, one attention call per
// layer per step, whatever mix of work the step holds:
//   sequence 0: a long prompt, prefilled in chunks of 96 tokens (chunked prefill);
//   sequence 1: decoding, one new token per step;
//   sequence 2: speculative decoding, verifying a tree of 6 draft tokens per step (each
//               draft sees the cached prefix and its ancestors: a tree mask, given as an
//               fp16 additive bias of 0 / -inf as llama.cpp builds its KQ mask), then
//               keeping the accepted path and dropping the rest from the cache.
// The new tokens of all sequences are packed along one axis (cu_q, FlashInfer's
// qo_indptr); each step appends their keys and values to the cache (pages handed out in a
// scrambled order) and runs one softmax_attention_paged per layer. Every output row is
// checked against softmax_attention on that sequence alone (contiguous K/V, the same
// mask): they must agree bit for bit. Exits 1 if they do not.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fovea/fovea.hpp>
#include <numeric>
#include <random>
#include <span>
#include <vector>

namespace {

constexpr long H = 16, Hk = 4, D = 64, page = 16, layers = 2, steps = 6;
constexpr long seqs = 3, max_pages = 64, pages = seqs * max_pages, width = max_pages * page;
constexpr long chunk = 96, prompt = 500, drafts = 6;

std::mt19937 gen(7);
std::vector<float> random_vector(long n) {
  std::normal_distribution<float> normal;
  std::vector<float> x(n);
  for (float& e : x) e = normal(gen);
  return x;
}

/// One layer's paged cache, [pages, page, Hk, D] (vLLM's layout).
struct layer_cache {
  std::vector<float> k = std::vector<float>(pages * page * Hk * D);
  std::vector<float> v = std::vector<float>(pages * page * Hk * D);
  auto K() { return fovea::paged_nhd(k.data(), pages, page, Hk, D); }
  auto V() { return fovea::paged_nhd(v.data(), pages, page, Hk, D); }
};

}  // namespace

int main() {
  std::printf("fovea: %s\n", fovea::build_info().c_str());  // backend, OpenMP, -O
  std::vector<std::int32_t> block_table(seqs * max_pages);  // the engine's page allocator
  std::iota(block_table.begin(), block_table.end(), 0);
  std::shuffle(block_table.begin(), block_table.end(), std::mt19937(3));
  const auto table = fovea::view<const std::int32_t>(block_table.data(), {seqs, max_pages});
  std::vector<layer_cache> caches(layers);
  std::vector<std::int32_t> lens = {0, 200, 150};  // keys cached per sequence
  for (auto& c : caches)  // sequences 1 and 2 arrive with their prompts already cached
    for (long b = 1; b < seqs; ++b) {
      const auto k = random_vector(Hk * lens[b] * D), v = random_vector(Hk * lens[b] * D);
      const std::int32_t start = 0;
      fovea::append_kv_paged(fovea::bhsd<const float>(k.data(), 1, Hk, lens[b], D),
                             fovea::bhsd<const float>(v.data(), 1, Hk, lens[b], D), c.K(), c.V(),
                             fovea::slice(table, 0, b, 1), std::span<const std::int32_t>(&start, 1));
    }

  long prefilled = 0, mismatches = 0, rows = 0;
  double seconds = 0;
  for (long step = 0; step < steps; ++step) {
    // The scheduler's batch: new tokens per sequence, packed.
    const long prefill_now = std::min(chunk, prompt - prefilled);
    const std::vector<long> new_tokens = {prefill_now, 1, drafts};
    std::vector<std::int32_t> cu_q = {0};
    for (long n : new_tokens) cu_q.push_back(cu_q.back() + std::int32_t(n));
    const long total = cu_q.back();
    // Keys per sequence once this step's tokens are in the cache.
    std::vector<std::int32_t> after(seqs);
    for (long b = 0; b < seqs; ++b) after[b] = lens[b] + std::int32_t(new_tokens[b]);
    // The tree mask as an fp16 bias, (1, 1, total, width): 0 keeps a key, -inf hides it.
    // Rows of sequences 0 and 1 keep everything (causality does the rest).
    std::vector<fovea::half> bias(total * width, fovea::half(0.f));
    std::vector<long> parent(drafts, -1);
    for (long i = 1; i < drafts; ++i) parent[i] = long(gen() % i);
    for (long i = 0; i < drafts; ++i) {
      fovea::half* row = bias.data() + (cu_q[2] + i) * width;
      for (long j = 0; j < drafts; ++j) row[lens[2] + j] = fovea::half(-INFINITY);
      for (long a = i; a >= 0; a = parent[a]) row[lens[2] + a] = fovea::half(0.f);
    }
    const auto mask = fovea::view<const fovea::half>(bias.data(), {1, 1, total, width});

    for (long l = 0; l < layers; ++l) {
      auto& c = caches[l];
      // The model's projections of the new tokens (random here), packed (1, heads, total, D).
      const auto q = random_vector(H * total * D), k = random_vector(Hk * total * D),
                 v = random_vector(Hk * total * D);
      std::vector<float> out(H * total * D);
      const auto t0 = std::chrono::steady_clock::now();
      for (long b = 0; b < seqs; ++b)  // each sequence's new keys and values into its pages
        fovea::append_kv_paged(
            fovea::slice(fovea::bhsd<const float>(k.data(), 1, Hk, total, D), 2, cu_q[b], new_tokens[b]),
            fovea::slice(fovea::bhsd<const float>(v.data(), 1, Hk, total, D), 2, cu_q[b], new_tokens[b]),
            c.K(), c.V(), fovea::slice(table, 0, b, 1), std::span<const std::int32_t>(&lens[b], 1));
      // One attention call for the whole step of this layer.
      fovea::softmax_attention_paged(fovea::bhsd<const float>(q.data(), 1, H, total, D),
                                     fovea::tensor_view<const float, 4>(c.K()),
                                     fovea::tensor_view<const float, 4>(c.V()),
                                     fovea::bhsd(out.data(), 1, H, total, D), table, after, cu_q,
                                     {.causal = true, .bias = mask});
      seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

      // Check: each sequence alone, its keys gathered from the pages into (1, Hk, n, D).
      for (long b = 0; b < seqs; ++b) {
        const long sq = new_tokens[b], sk = after[b];
        std::vector<float> kb(Hk * sk * D), vb(Hk * sk * D), qb(H * sq * D), want(H * sq * D);
        std::vector<float> bb(sq * sk);
        for (long j = 0; j < sk; ++j)
          for (long h = 0; h < Hk; ++h) {
            const long slot = (long(block_table[b * max_pages + j / page]) * page + j % page) * Hk + h;
            std::copy_n(&c.k[slot * D], D, &kb[(h * sk + j) * D]);
            std::copy_n(&c.v[slot * D], D, &vb[(h * sk + j) * D]);
          }
        for (long h = 0; h < H; ++h) std::copy_n(&q[(h * total + cu_q[b]) * D], sq * D, &qb[h * sq * D]);
        for (long i = 0; i < sq; ++i)
          for (long j = 0; j < sk; ++j) bb[i * sk + j] = float(bias[(cu_q[b] + i) * width + j]);
        fovea::softmax_attention(fovea::bhsd<const float>(qb.data(), 1, H, sq, D),
                                 fovea::bhsd<const float>(kb.data(), 1, Hk, sk, D),
                                 fovea::bhsd<const float>(vb.data(), 1, Hk, sk, D),
                                 fovea::bhsd(want.data(), 1, H, sq, D),
                                 {.causal = true, .bias = fovea::view<const float>(bb.data(), {1, 1, sq, sk})});
        for (long h = 0; h < H; ++h)
          for (long i = 0; i < sq; ++i, ++rows)
            if (std::memcmp(&out[(h * total + cu_q[b] + i) * D], &want[(h * sq + i) * D], D * 4) != 0)
              ++mismatches;
      }
    }
    // The step's bookkeeping: the prefill advances, the decode token stays, and of the
    // drafts the accepted path (the chain of first children, here drafts 0, 1, ...) stays
    // while the rest is dropped by not counting it (its slots are overwritten next step).
    prefilled += prefill_now;
    lens[0] += std::int32_t(prefill_now);
    lens[1] += 1;
    long accepted = 0;
    while (accepted < drafts && parent[accepted] == accepted - 1) ++accepted;
    lens[2] += std::int32_t(accepted);
    std::printf("step %ld: %3ld prefill + 1 decode + %ld drafts (%ld accepted) -> keys %d, %d, %d\n",
                step, prefill_now, drafts, accepted, lens[0], lens[1], lens[2]);
  }
  std::printf("%ld layer-steps, %.2f ms per layer-step (appends + one attention call); "
              "%ld of %ld output rows differ from per-sequence calls\n",
              layers * steps, 1e3 * seconds / double(layers * steps), mismatches, rows);
  return mismatches == 0 ? 0 : 1;
}
