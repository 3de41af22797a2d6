// The cache as serving engines hold it: a contiguous cache with a key count per sequence,
// ragged queries over a paged cache, and appends to both; every result against
// per-sequence softmax_attention calls, bit for bit (the tiles coincide).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fovea/fovea.hpp>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../common/random.hpp"

namespace fovea::test::kv_cache_test {

constexpr index_t H = 4, Hk = 2, D = 24, Dv = 20;

/// out of softmax_attention on one sequence's q rows (H, sq, D) and keys (Hk, sk, D).
std::vector<float> alone(const float* q, index_t sq, const float* k, const float* v, index_t sk,
                         bool causal) {
  std::vector<float> out(H * sq * Dv);
  softmax_attention(bhsd<const float>(q, 1, H, sq, D), bhsd<const float>(k, 1, Hk, sk, D),
                    bhsd<const float>(v, 1, Hk, sk, Dv), bhsd(out.data(), 1, H, sq, Dv),
                    {.causal = causal, .threads = 1});
  return out;
}

TEST(KvCache, PerSequenceLengthsOverACapacity) {
  const index_t capacity = 700, Sq = 3;
  const std::vector<std::int32_t> lens{700, 0, 1, 129, 513};
  const index_t B = index_t(lens.size());
  // [B, capacity, Hk, D], FlashAttention's cache layout, filled past each length too
  const auto kc = normal<float>(B * capacity * Hk * D, 1), vc = normal<float>(B * capacity * Hk * Dv, 2);
  const auto q = normal<float>(B * Sq * H * D, 3);
  for (bool causal : {false, true})
    for (int threads : {1, 2}) {
      std::vector<float> out(B * Sq * H * Dv, -7.f);
      softmax_attention_kvcache(bshd<const float>(q.data(), B, Sq, H, D),
                                bshd<const float>(kc.data(), B, capacity, Hk, D),
                                bshd<const float>(vc.data(), B, capacity, Hk, Dv),
                                bshd(out.data(), B, Sq, H, Dv), lens,
                                {.causal = causal, .threads = threads});
      for (index_t b = 0; b < B; ++b) {
        SCOPED_TRACE("sequence " + std::to_string(b) + (causal ? " causal" : ""));
        const index_t sk = lens[b];
        std::vector<float> qb(H * Sq * D), kb(Hk * sk * D), vb(Hk * sk * Dv);
        for (index_t h = 0; h < H; ++h)
          for (index_t i = 0; i < Sq; ++i)
            std::copy_n(q.data() + ((b * Sq + i) * H + h) * D, D, qb.data() + (h * Sq + i) * D);
        for (index_t h = 0; h < Hk; ++h)
          for (index_t j = 0; j < sk; ++j) {
            std::copy_n(kc.data() + ((b * capacity + j) * Hk + h) * D, D, kb.data() + (h * sk + j) * D);
            std::copy_n(vc.data() + ((b * capacity + j) * Hk + h) * Dv, Dv, vb.data() + (h * sk + j) * Dv);
          }
        const auto want = alone(qb.data(), Sq, kb.data(), vb.data(), sk, causal);
        for (index_t h = 0; h < H; ++h)
          for (index_t i = 0; i < Sq; ++i)
            for (index_t e = 0; e < Dv; ++e)
              ASSERT_EQ(out[((b * Sq + i) * H + h) * Dv + e], want[(h * Sq + i) * Dv + e])
                  << "h " << h << " i " << i << " e " << e;
      }
    }
  std::vector<float> out(B * Sq * H * Dv, -7.f);
  const std::vector<std::int32_t> too_long{700, 0, 1, 701, 3};
  try {
    softmax_attention_kvcache(bshd<const float>(q.data(), B, Sq, H, D),
                              bshd<const float>(kc.data(), B, capacity, Hk, D),
                              bshd<const float>(vc.data(), B, capacity, Hk, Dv),
                              bshd(out.data(), B, Sq, H, Dv), too_long);
    ADD_FAILURE() << "a length past the capacity was accepted";
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find("seqlens_k: length 3 is 701, expected 0 to 700"),
              std::string::npos)
        << e.what();
  }
  for (float x : out) ASSERT_EQ(x, -7.f);
}

/// A paged cache [pages, page, Hk, D] and its table, filled by append_kv_paged from
/// contiguous per-sequence keys, in steps: the prompt, then single tokens.
struct paged_cache {
  index_t page, pages;
  std::vector<float> k, v;
  std::vector<std::int32_t> table, lens;
  index_t max_pages;
  paged_cache(index_t page_, const std::vector<std::int32_t>& capacity) : page(page_) {
    max_pages = 0;
    for (auto c : capacity) max_pages = std::max<index_t>(max_pages, (c + page - 1) / page);
    pages = index_t(capacity.size()) * max_pages + 2;
    k.assign(pages * page * Hk * D, 0.f);
    v.assign(pages * page * Hk * Dv, 0.f);
    table.assign(capacity.size() * max_pages, -1);
    std::vector<std::int32_t> order(pages);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937(page));
    index_t next = 0;
    for (std::size_t b = 0; b < capacity.size(); ++b)
      for (index_t p = 0; p < (capacity[b] + page - 1) / page; ++p)
        table[b * max_pages + p] = order[next++];
    lens.assign(capacity.size(), 0);
  }
  tensor_view<float, 4> kview() { return paged_nhd(k.data(), pages, page, Hk, D); }
  tensor_view<float, 4> vview() { return paged_nhd(v.data(), pages, page, Hk, Dv); }
  tensor_view<const std::int32_t, 2> tview() const {
    return view<const std::int32_t, 2>(table.data(), {index_t(lens.size()), max_pages});
  }
};

TEST(KvCache, RaggedQueriesOverAPagedCacheEqualPerSequenceCalls) {
  // Sequences with 0, 1, 5, 17 and 40 new queries (decode and prefill paths in one call)
  // over caches of 0 to 600 keys, filled by appends: the prompt, then one token at a time.
  const std::vector<std::int32_t> keys{3, 600, 257, 17, 120}, new_q{0, 1, 5, 17, 40};
  const index_t B = index_t(keys.size());
  std::vector<std::vector<float>> ks(B), vs(B);
  for (index_t b = 0; b < B; ++b) {  // per-sequence contiguous copies: (Hk, sk, D)
    ks[b] = normal<float>(Hk * keys[b] * D, 10 + b);
    vs[b] = normal<float>(Hk * keys[b] * Dv, 20 + b);
  }
  for (index_t page : {16, 7, 256}) {
    SCOPED_TRACE("page " + std::to_string(page));
    paged_cache cache(page, keys);
    // Append: each sequence's first half at once, then the rest token by token (all
    // sequences together while they have tokens left: a batch of one row each).
    for (index_t b = 0; b < B; ++b) {
      const index_t half = keys[b] / 2;
      std::vector<std::int32_t> one_len{cache.lens[b]};
      const auto table_b = slice(cache.tview(), 0, b, 1);
      append_kv_paged(slice(bhsd<const float>(ks[b].data(), 1, Hk, keys[b], D), 2, 0, half),
                      slice(bhsd<const float>(vs[b].data(), 1, Hk, keys[b], Dv), 2, 0, half),
                      cache.kview(), cache.vview(), table_b, one_len);
      cache.lens[b] += half;
      for (index_t t = half; t < keys[b]; ++t) {
        one_len[0] = cache.lens[b];
        append_kv_paged(slice(bhsd<const float>(ks[b].data(), 1, Hk, keys[b], D), 2, t, 1),
                        slice(bhsd<const float>(vs[b].data(), 1, Hk, keys[b], Dv), 2, t, 1),
                        cache.kview(), cache.vview(), table_b, one_len);
        ++cache.lens[b];
      }
    }
    std::vector<std::int32_t> cu{0};
    for (auto n : new_q) cu.push_back(cu.back() + n);
    const index_t total = cu.back();
    const auto q = normal<float>(H * total * D, 5);
    std::vector<float> out(H * total * Dv, -7.f);
    for (int threads : {1, 2}) {
      softmax_attention_paged(bhsd<const float>(q.data(), 1, H, total, D),
                              tensor_view<const float, 4>(cache.kview()),
                              tensor_view<const float, 4>(cache.vview()),
                              bhsd(out.data(), 1, H, total, Dv), cache.tview(), cache.lens, cu,
                              {.causal = true, .threads = threads});
      for (index_t b = 0; b < B; ++b) {
        const index_t sq = new_q[b], sk = keys[b];
        std::vector<float> qb(H * sq * D);
        for (index_t h = 0; h < H; ++h)
          std::copy_n(q.data() + (h * total + cu[b]) * D, sq * D, qb.data() + h * sq * D);
        const auto want = alone(qb.data(), sq, ks[b].data(), vs[b].data(), sk, true);
        for (index_t h = 0; h < H; ++h)
          for (index_t i = 0; i < sq; ++i)
            for (index_t e = 0; e < Dv; ++e)
              ASSERT_EQ(out[(h * total + cu[b] + i) * Dv + e], want[(h * sq + i) * Dv + e])
                  << "sequence " << b << " h " << h << " i " << i << " threads " << threads;
      }
    }
  }
}

TEST(KvCache, AppendsToAContiguousCacheConvertingTypes) {
  const index_t B = 2, capacity = 10, n = 3;
  std::vector<bfloat16> kc(B * Hk * capacity * D, bfloat16(0.f)), vc(B * Hk * capacity * Dv, bfloat16(0.f));
  const auto kn = normal<float>(B * Hk * n * D, 1), vn = normal<float>(B * Hk * n * Dv, 2);
  const std::vector<std::int32_t> lens{0, 7};
  append_kv(bhsd<const float>(kn.data(), B, Hk, n, D), bhsd<const float>(vn.data(), B, Hk, n, Dv),
            bhsd(kc.data(), B, Hk, capacity, D), bhsd(vc.data(), B, Hk, capacity, Dv), lens);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < Hk; ++h)
      for (index_t t = 0; t < capacity; ++t)
        for (index_t e = 0; e < D; ++e) {
          const bool fresh = t >= lens[b] && t < lens[b] + n;
          const float want = fresh ? float(bfloat16(kn[((b * Hk + h) * n + t - lens[b]) * D + e])) : 0.f;
          ASSERT_EQ(float(kc[((b * Hk + h) * capacity + t) * D + e]), want)
              << "b " << b << " h " << h << " t " << t;
        }
  // Past the capacity: an error that names it, nothing written.
  const auto before = kc;
  const std::vector<std::int32_t> full{0, 8};
  try {
    append_kv(bhsd<const float>(kn.data(), B, Hk, n, D), bhsd<const float>(vn.data(), B, Hk, n, Dv),
              bhsd(kc.data(), B, Hk, capacity, D), bhsd(vc.data(), B, Hk, capacity, Dv), full);
    ADD_FAILURE() << "no error past the capacity";
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find("sequence 1 holds 8 tokens; 3 more pass the capacity of 10"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(0, std::memcmp(before.data(), kc.data(), kc.size() * sizeof(bfloat16)));
}

TEST(KvCache, PagedAppendsRejectMissingPages) {
  paged_cache cache(4, {8, 8});
  cache.table[1 * cache.max_pages + 1] = -1;  // sequence 1's second page not allocated
  const auto kn = normal<float>(2 * Hk * 3 * D, 1), vn = normal<float>(2 * Hk * 3 * Dv, 2);
  const std::vector<std::int32_t> lens{0, 2};
  const auto before = cache.k;
  try {
    append_kv_paged(bhsd<const float>(kn.data(), 2, Hk, 3, D), bhsd<const float>(vn.data(), 2, Hk, 3, Dv),
                    cache.kview(), cache.vview(), cache.tview(), lens);
    ADD_FAILURE() << "no error for a missing page";
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find("block_table: entry (1, 1) is -1"), std::string::npos)
        << e.what();
  }
  EXPECT_EQ(before, cache.k);
  const std::vector<std::int32_t> long_lens{0, 7};  // tokens 7..9 need a third page column
  try {
    append_kv_paged(bhsd<const float>(kn.data(), 2, Hk, 3, D), bhsd<const float>(vn.data(), 2, Hk, 3, Dv),
                    cache.kview(), cache.vview(), cache.tview(), long_lens);
    ADD_FAILURE() << "no error past the table";
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find("needs 3 pages for 10 tokens, the table has 2 columns"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(before, cache.k);
}


/// out of softmax_attention on one sequence with a mask (1, 1, sq, sk) and bias (1, H, sq, sk).
std::vector<float> alone_with(const float* q, index_t sq, const float* k, const float* v, index_t sk,
                              const std::uint8_t* mask, const float* bias) {
  std::vector<float> out(H * sq * Dv);
  softmax_options o{.causal = true, .threads = 1};
  if (mask) o.mask = view<const std::uint8_t>(mask, {1, 1, sq, sk});
  if (bias) o.bias = view<const float>(bias, {1, H, sq, sk});
  softmax_attention(bhsd<const float>(q, 1, H, sq, D), bhsd<const float>(k, 1, Hk, sk, D),
                    bhsd<const float>(v, 1, Hk, sk, Dv), bhsd(out.data(), 1, H, sq, Dv), o);
  return out;
}

// Speculative decoding: each sequence verifies a tree of draft tokens in one paged call;
// draft token i sees the cached prefix and its ancestors only (a packed tree mask), and
// a per-head bias rides along. Equal to per-sequence calls with the same mask, bit for bit.
TEST(KvCache, TreeMaskedDraftsOverAPagedCache) {
  const std::vector<std::int32_t> prefix{40, 300, 0}, drafts{5, 1, 7};
  const index_t B = 3, page = 16;
  std::vector<std::int32_t> keys(B), cu{0};
  for (index_t b = 0; b < B; ++b) keys[b] = prefix[b] + drafts[b], cu.push_back(cu.back() + drafts[b]);
  const index_t total = cu.back();
  paged_cache cache(page, keys);
  const index_t width = cache.max_pages * page;
  std::vector<std::vector<float>> ks(B), vs(B);
  for (index_t b = 0; b < B; ++b) {
    ks[b] = normal<float>(Hk * keys[b] * D, 30 + b);
    vs[b] = normal<float>(Hk * keys[b] * Dv, 40 + b);
    const std::int32_t start = 0;
    append_kv_paged(bhsd<const float>(ks[b].data(), 1, Hk, keys[b], D),
                    bhsd<const float>(vs[b].data(), 1, Hk, keys[b], Dv), cache.kview(), cache.vview(),
                    slice(cache.tview(), 0, b, 1), std::span<const std::int32_t>(&start, 1));
    cache.lens[b] = keys[b];
  }
  // The packed tree mask (1, 1, total, width) and a bias (1, H, total, width).
  std::vector<std::uint8_t> mask(total * width, 0);
  const auto bias = normal<float>(H * total * width, 7, 0.5);
  std::mt19937 gen(3);
  for (index_t b = 0; b < B; ++b) {
    std::vector<index_t> parent(drafts[b], -1);
    for (index_t i = 1; i < drafts[b]; ++i) parent[i] = index_t(gen() % i);
    for (index_t i = 0; i < drafts[b]; ++i) {
      std::uint8_t* row = mask.data() + (cu[b] + i) * width;
      for (index_t j = 0; j < prefix[b]; ++j) row[j] = 1;
      for (index_t a = i; a >= 0; a = parent[a]) row[prefix[b] + a] = 1;
    }
  }
  const auto q = normal<float>(H * total * D, 9);
  std::vector<float> out(H * total * Dv);
  softmax_attention_paged(bhsd<const float>(q.data(), 1, H, total, D),
                          tensor_view<const float, 4>(cache.kview()),
                          tensor_view<const float, 4>(cache.vview()), bhsd(out.data(), 1, H, total, Dv),
                          cache.tview(), cache.lens, cu,
                          {.causal = true,
                           .bias = view<const float>(bias.data(), {1, H, total, width}),
                           .mask = view<const std::uint8_t>(mask.data(), {1, 1, total, width})});
  for (index_t b = 0; b < B; ++b) {
    const index_t sq = drafts[b], sk = keys[b];
    std::vector<float> qb(H * sq * D), bb(H * sq * sk);
    std::vector<std::uint8_t> mb(sq * sk);
    for (index_t h = 0; h < H; ++h) std::copy_n(q.data() + (h * total + cu[b]) * D, sq * D, qb.data() + h * sq * D);
    for (index_t i = 0; i < sq; ++i) {
      std::copy_n(mask.data() + (cu[b] + i) * width, sk, mb.data() + i * sk);
      for (index_t h = 0; h < H; ++h)
        std::copy_n(bias.data() + (h * total + cu[b] + i) * width, sk, bb.data() + (h * sq + i) * sk);
    }
    const auto want = alone_with(qb.data(), sq, ks[b].data(), vs[b].data(), sk, mb.data(), bb.data());
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < sq; ++i)
        for (index_t e = 0; e < Dv; ++e)
          ASSERT_EQ(out[(h * total + cu[b] + i) * Dv + e], want[(h * sq + i) * Dv + e])
              << "sequence " << b << " h " << h << " draft " << i;
  }
}

// varlen with a packed bias and mask: sequence b reads its block of the packed matrix.
TEST(KvCache, VarlenBiasAndMaskAreBlockDiagonal) {
  const std::vector<std::int32_t> cu_q{0, 3, 3, 43, 44}, cu_k{0, 10, 15, 215, 216};
  const index_t tq = cu_q.back(), tk = cu_k.back();
  const auto q = normal<float>(H * tq * D, 1), k = normal<float>(Hk * tk * D, 2),
             v = normal<float>(Hk * tk * Dv, 3), bias = normal<float>(H * tq * tk, 4, 0.5);
  const auto mask = bernoulli(tq * tk, 5, 0.8);
  std::vector<float> out(H * tq * Dv);
  softmax_attention_varlen(bhsd<const float>(q.data(), 1, H, tq, D), bhsd<const float>(k.data(), 1, Hk, tk, D),
                           bhsd<const float>(v.data(), 1, Hk, tk, Dv), bhsd(out.data(), 1, H, tq, Dv), cu_q,
                           cu_k,
                           {.causal = true,
                            .bias = view<const float>(bias.data(), {1, H, tq, tk}),
                            .mask = view<const std::uint8_t>(mask.data(), {1, 1, tq, tk})});
  for (index_t b = 0; b + 1 < index_t(cu_q.size()); ++b) {
    const index_t q0 = cu_q[b], sq = cu_q[b + 1] - q0, k0 = cu_k[b], sk = cu_k[b + 1] - k0;
    std::vector<float> qb(H * sq * D), kb(Hk * sk * D), vb(Hk * sk * Dv), bb(H * sq * sk);
    std::vector<std::uint8_t> mb(sq * sk);
    for (index_t h = 0; h < H; ++h) std::copy_n(q.data() + (h * tq + q0) * D, sq * D, qb.data() + h * sq * D);
    for (index_t h = 0; h < Hk; ++h) {
      std::copy_n(k.data() + (h * tk + k0) * D, sk * D, kb.data() + h * sk * D);
      std::copy_n(v.data() + (h * tk + k0) * Dv, sk * Dv, vb.data() + h * sk * Dv);
    }
    for (index_t i = 0; i < sq; ++i) {
      std::copy_n(mask.data() + (q0 + i) * tk + k0, sk, mb.data() + i * sk);
      for (index_t h = 0; h < H; ++h)
        std::copy_n(bias.data() + (h * tq + q0 + i) * tk + k0, sk, bb.data() + (h * sq + i) * sk);
    }
    const auto want = alone_with(qb.data(), sq, kb.data(), vb.data(), sk, mb.data(), bb.data());
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < sq; ++i)
        for (index_t e = 0; e < Dv; ++e)
          ASSERT_EQ(out[(h * tq + q0 + i) * Dv + e], want[(h * sq + i) * Dv + e])
              << "sequence " << b << " h " << h << " i " << i;
  }
}

// A bias and ALiBi slopes in fp16 or bf16 (llama.cpp's KQ mask is fp16, with -inf for
// masked keys) give the bits of the same call with their values in fp32: dense prefill
// and decode, a strided per-head bias and a broadcast mask-like one, varlen's packed bias.
template <class L>
void lowp_bias_case() {
  SCOPED_TRACE((std::is_same_v<L, half> ? "fp16" : "bf16"));
  for (const auto& shape : {std::pair<index_t, index_t>{70, 130}, {3, 600}, {1, 1}}) {
    const index_t sq = shape.first, sk = shape.second;  // (clang 14: no lambda captures of bindings)
    SCOPED_TRACE("Sq " + std::to_string(sq) + " Sk " + std::to_string(sk));
    const auto q = normal<float>(2 * H * sq * D, 1), k = normal<float>(2 * Hk * sk * D, 2),
               v = normal<float>(2 * Hk * sk * Dv, 3);
    // Per (batch, head) in a (B, Sq, H, Sk) buffer (strided), and a (1, 1, Sq, Sk) mask.
    std::vector<L> per_head(2 * sq * H * sk), mask(sq * sk);
    const auto values = normal<float>(per_head.size(), 4, 0.7);
    for (std::size_t i = 0; i < per_head.size(); ++i) per_head[i] = L(values[i]);
    for (index_t i = 0; i < sq; ++i)
      for (index_t j = 0; j < sk; ++j)
        mask[i * sk + j] = (i * 7 + j * 3) % 5 == 0 && j > 0 ? L(-INFINITY) : L(float(j % 3) * 0.25f);
    std::vector<float> per_head_f(per_head.begin(), per_head.end()), mask_f(mask.begin(), mask.end());
    const std::vector<L> slopes{L(0.5f), L(0.25f), L(0.125f), L(0.0625f)};
    const std::vector<float> slopes_f(slopes.begin(), slopes.end());
    auto strided = [&](auto* p) {
      return view(p, {2, H, sq, sk}, {sq * H * sk, sk, H * sk, 1});
    };
    auto run = [&](softmax_options o) {
      std::vector<float> out(2 * H * sq * Dv);
      softmax_attention(bhsd<const float>(q.data(), 2, H, sq, D), bhsd<const float>(k.data(), 2, Hk, sk, D),
                        bhsd<const float>(v.data(), 2, Hk, sk, Dv), bhsd(out.data(), 2, H, sq, Dv), o);
      return out;
    };
    EXPECT_EQ(run({.causal = true, .bias = tensor_view<const L, 4>(strided(per_head.data()))}),
              run({.causal = true, .bias = tensor_view<const float, 4>(strided(per_head_f.data()))}));
    EXPECT_EQ(run({.bias = view<const L>(mask.data(), {1, 1, sq, sk}),
                   .alibi_slopes = view<const L>(slopes.data(), {1, H})}),
              run({.bias = view<const float>(mask_f.data(), {1, 1, sq, sk}),
                   .alibi_slopes = view<const float>(slopes_f.data(), {1, H})}));
  }
  // varlen: a packed (1, 1, total_q, total_k) bias, each sequence its block.
  const std::vector<std::int32_t> cu_q{0, 3, 3, 43, 44}, cu_k{0, 10, 15, 215, 216};
  const index_t tq = cu_q.back(), tk = cu_k.back();
  const auto q = normal<float>(H * tq * D, 5), k = normal<float>(Hk * tk * D, 6),
             v = normal<float>(Hk * tk * Dv, 7), values = normal<float>(tq * tk, 8);
  std::vector<L> bias(values.begin(), values.end());
  const std::vector<float> bias_f(bias.begin(), bias.end());
  auto varlen = [&](any_float_view<4> b) {
    std::vector<float> out(H * tq * Dv);
    softmax_attention_varlen(bhsd<const float>(q.data(), 1, H, tq, D), bhsd<const float>(k.data(), 1, Hk, tk, D),
                             bhsd<const float>(v.data(), 1, Hk, tk, Dv), bhsd(out.data(), 1, H, tq, Dv),
                             cu_q, cu_k, {.causal = true, .bias = b});
    return out;
  };
  EXPECT_EQ(varlen(view<const L>(bias.data(), {1, 1, tq, tk})),
            varlen(view<const float>(bias_f.data(), {1, 1, tq, tk})));
}

TEST(KvCache, BiasAndSlopesInHalfAndBf16) {
  lowp_bias_case<half>();
  lowp_bias_case<bfloat16>();
  // Wrong shapes are reported as for fp32.
  std::vector<half> b(8);
  std::vector<float> x(H * 2 * D), out(H * 2 * Dv);
  try {
    softmax_attention(bhsd<const float>(x.data(), 1, H, 2, D), bhsd<const float>(x.data(), 1, Hk, 2, D),
                      bhsd<const float>(x.data(), 1, Hk, 2, Dv), bhsd(out.data(), 1, H, 2, Dv),
                      {.bias = view<const half>(b.data(), {1, 1, 2, 4})});
    ADD_FAILURE() << "no error";
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find("options.bias: extent 3 (keys) is 4"), std::string::npos) << e.what();
  }
}

}  // namespace fovea::test::kv_cache_test
