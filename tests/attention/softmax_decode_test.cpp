// The decode path (Sq <= 16: stacked GQA heads, split keys, ordered merge), varlen and
// paged KV, against the f64 oracle and against each other.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <fovea/fovea.hpp>
#include <numeric>
#include <random>
#include <vector>

#include "../common/attention_case.hpp"
#include "../common/configs.hpp"

namespace fovea::test::softmax_decode_test {

template <class C>
class SoftmaxDecode : public ::testing::Test {
 protected:
  using T = typename C::value_type;
  using Backend = typename C::backend;
};
TYPED_TEST_SUITE(SoftmaxDecode, configs, config_names);

TYPED_TEST(SoftmaxDecode, KeyLengthsAroundTheChunkSize) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  for (index_t sk : {1, 63, 511, 512, 513, 32768})
    for (index_t sq : {1, 3, 16}) {
      if (sk == 32768 && sq != 1) continue;
      const index_t d = sk == 32768 ? 16 : 40;
      check_features<T, Backend>({1, 8, 2, sq, sk, d, d}, feature::causal, sk + sq);
    }
}

TYPED_TEST(SoftmaxDecode, GroupRatiosAndHeadDims) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  for (index_t hk : {8, 2, 1})
    for (index_t d : {1, 3, 64, 111})
      check_features<T, Backend>({2, 8, hk, 2, 300, d, d == 111 ? 17 : d}, feature::causal,
                                 hk * 100 + d);
  // More stacked columns than one tile holds: 16 heads x 16 queries on one key head.
  check_features<T, Backend>({1, 16, 1, 16, 200, 32, 32}, feature::causal, 7);
}

TYPED_TEST(SoftmaxDecode, EveryFeature) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const shape s{2, 4, 2, 3, 700, 24, 20};
  for (unsigned f = 0; f < 13; ++f) {
    check_features<T, Backend>(s, 1u << f, f);
    check_features<T, Backend>(s, (1u << f) | feature::causal, 50 + f);
  }
  check_features<T, Backend>(s, all_features & ~feature::top_left, 99);
  // 32 heads on one key/value head x 2 queries: 64 stacked columns, the prefill tile
  const shape many{1, 32, 1, 2, 700, 24, 20};
  for (unsigned f = 0; f < 13; ++f)
    check_features<T, Backend>(many, (1u << f) | feature::causal, 150 + f);
  check_features<T, Backend>(many, all_features & ~feature::top_left, 199);
}

TYPED_TEST(SoftmaxDecode, ThreadCountNeverChangesABit) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  expect_thread_invariant<T, Backend>(
      attention_inputs<T>({2, 8, 2, 4, 5000, 32, 32}, feature::alibi | feature::sinks, 3));
  expect_thread_invariant<T, Backend>(  // 64 stacked columns: the prefill tile
      attention_inputs<T>({1, 128, 2, 1, 5000, 32, 32}, feature::alibi | feature::sinks, 4));
}

TYPED_TEST(SoftmaxDecode, NanInMaskedFutureKeysDoesNotLeak) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  for (const index_t H : {4, 16}) {  // 16 or 64 stacked columns (decode or prefill tile)
    const shape s{1, H, 1, 4, 600, 16, 16};
    attention_inputs<T> in(s, 0, 5);
    for (index_t j = 597; j < 600; ++j)  // hidden from all but the last queries
      for (index_t d = 0; d < 16; ++d)
        in.k[j * 16 + d] = in.v[j * 16 + d] = std::numeric_limits<T>::quiet_NaN();
    std::vector<T> out(s.H * s.Sq * s.Dv);
    auto ov = bhsd(out.data(), 1, s.H, s.Sq, s.Dv);
    softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), ov, {.causal = true, .threads = 1});
    for (index_t h = 0; h < s.H; ++h)
      for (index_t d = 0; d < s.Dv; ++d) {
        EXPECT_TRUE(std::isfinite(double(ov(0, h, 0, d))));  // sees keys < 597
        EXPECT_TRUE(std::isnan(double(ov(0, h, 3, d))));     // sees them all
      }
  }
}

// ---- varlen --------------------------------------------------------------------------

TYPED_TEST(SoftmaxDecode, VarlenEqualsEachSequenceAlone) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const std::vector<index_t> lq{0, 1, 17, 5, 0, 130, 3}, lk{0, 3, 17, 40, 9, 130, 0};
  std::vector<std::int32_t> cq{0}, ck{0};
  for (std::size_t b = 0; b < lq.size(); ++b)
    cq.push_back(cq.back() + lq[b]), ck.push_back(ck.back() + lk[b]);
  const index_t H = 4, Hk = 2, D = 24, Dv = 16, tq = cq.back(), tk = ck.back();
  const auto q = normal<T>(tq * H * D, 1), k = normal<T>(tk * Hk * D, 2),
             v = normal<T>(tk * Hk * Dv, 3);
  const auto slopes = uniform<float>(lq.size() * H, 4, 0.05, 0.3);
  std::vector<T> out(tq * H * Dv, T(9));
  std::vector<float> lse(H * tq, 9.f);
  softmax_options o{.causal = true, .threads = 2};
  o.alibi_slopes = view<const float, 2>(slopes.data(), {index_t(lq.size()), H});
  o.lse = view<float, 3>(lse.data(), {1, H, tq});
  // FlashAttention's packed (total, heads, dim) layout.
  softmax_attention_varlen<Backend>(bshd(q.data(), 1, tq, H, D), bshd(k.data(), 1, tk, Hk, D),
                                    bshd(v.data(), 1, tk, Hk, Dv), bshd(out.data(), 1, tq, H, Dv),
                                    std::span<const std::int32_t>(cq),
                                    std::span<const std::int32_t>(ck), o);
  for (std::size_t b = 0; b < lq.size(); ++b) {
    SCOPED_TRACE("sequence " + std::to_string(b));
    const auto qb = slice(bshd(q.data(), 1, tq, H, D), 2, cq[b], lq[b]);
    const auto kb = slice(bshd(k.data(), 1, tk, Hk, D), 2, ck[b], lk[b]);
    const auto vb = slice(bshd(v.data(), 1, tk, Hk, Dv), 2, ck[b], lk[b]);
    std::vector<T> alone(lq[b] * H * Dv);
    std::vector<float> lse_alone(H * lq[b]);
    softmax_options ob{.causal = true, .threads = 1};
    ob.alibi_slopes = view<const float, 2>(slopes.data() + b * H, {1, H});
    ob.lse = view<float, 3>(lse_alone.data(), {1, H, lq[b]});
    auto av = bhsd(alone.data(), 1, H, lq[b], Dv);
    softmax_attention<Backend>(qb, kb, vb, av, ob);
    const auto got = slice(bshd(out.data(), 1, tq, H, Dv), 2, cq[b], lq[b]);
    EXPECT_EQ(to_dense(got), to_dense(av));
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < lq[b]; ++i)
        EXPECT_EQ(lse[h * tq + cq[b] + i], lse_alone[h * lq[b] + i]);
    const auto want = reference_softmax<double>(qb, kb, vb, ob);
    const auto naive = reference_softmax<T>(qb, kb, vb, ob);
    EXPECT_TRUE(within_tolerance<T>(to_dense(got), want.out, naive.out));
  }
}

TYPED_TEST(SoftmaxDecode, VarlenRejectsBadOffsets) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  std::vector<T> q(10 * 8), k(10 * 8), v(10 * 8), out(10 * 8, T(3));
  auto call = [&](std::vector<std::int32_t> cq, std::vector<std::int32_t> ck,
                  softmax_options o = {}) {
    softmax_attention_varlen<Backend>(bhsd(q.data(), 1, 1, 10, 8), bhsd(k.data(), 1, 1, 10, 8),
                                      bhsd(v.data(), 1, 1, 10, 8), bhsd(out.data(), 1, 1, 10, 8),
                                      std::span<const std::int32_t>(cq),
                                      std::span<const std::int32_t>(ck), o);
  };
  auto expect_error = [&](const char* needle, auto&& call) {
    expect_rejected(needle, out, T(3), call);
  };
  expect_error("cu_seqlens_q", [&] { call({0, 5, 4, 10}, {0, 3, 6, 10}); });
  expect_error("cu_seqlens_q", [&] { call({0, 5, 9}, {0, 3, 10}); });
  expect_error("cu_seqlens_k", [&] { call({0, 5, 10}, {1, 3, 10}); });
  expect_error("cu_seqlens_k", [&] { call({0, 5, 10}, {0, 10}); });
  // A bias must span the packed queries and keys (or broadcast): 4 key columns are neither.
  const std::vector<float> bias(10 * 4, 0.f);
  softmax_options with_bias;
  with_bias.bias = view<const float, 4>(bias.data(), {1, 1, 10, 4});
  expect_error("options.bias: extent 3 (keys) is 4", [&] { call({0, 5, 10}, {0, 3, 10}, with_bias); });
}

// ---- paged KV ------------------------------------------------------------------------

TYPED_TEST(SoftmaxDecode, PagedEqualsContiguous) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  const index_t B = 3, H = 8, Hk = 2, D = 32, Dv = 24;
  const std::vector<std::int32_t> lens{700, 0, 129};
  for (index_t page_size : {1, 16, 64, 100, 256}) {
    for (index_t sq : {1, 5, 40}) {
      SCOPED_TRACE("page_size " + std::to_string(page_size) + " Sq " + std::to_string(sq));
      const index_t max_pages = (700 + page_size - 1) / page_size, pages = B * max_pages + 3;
      // Pages handed out in a shuffled order; the contiguous copy holds the same keys.
      std::vector<std::int32_t> order(pages);
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), std::mt19937(page_size));
      std::vector<std::int32_t> table(B * max_pages, -1);
      const auto kc = normal<T>(pages * page_size * Hk * D, 5),
                 vc = normal<T>(pages * page_size * Hk * Dv, 6);
      const auto kview = paged_nhd(kc.data(), pages, page_size, Hk, D);
      const auto vview = paged_nhd(vc.data(), pages, page_size, Hk, Dv);
      const auto q = normal<T>(B * H * sq * D, 7);
      std::vector<T> out(B * H * sq * Dv);
      index_t next = 0;
      for (index_t b = 0; b < B; ++b)
        for (index_t p = 0; p < (lens[b] + page_size - 1) / page_size; ++p)
          table[b * max_pages + p] = order[next++];
      const softmax_options o{.causal = true, .threads = 2};
      softmax_attention_paged<Backend>(bhsd(q.data(), B, H, sq, D), kview, vview,
                                       bhsd(out.data(), B, H, sq, Dv),
                                       view<const std::int32_t, 2>(table.data(), {B, max_pages}),
                                       std::span<const std::int32_t>(lens), o);
      for (index_t b = 0; b < B; ++b) {
        const index_t sk = lens[b];
        std::vector<T> k(Hk * sk * D), v(Hk * sk * Dv), alone(H * sq * Dv);
        for (index_t h = 0; h < Hk; ++h)
          for (index_t j = 0; j < sk; ++j) {
            const index_t page = table[b * max_pages + j / page_size], slot = j % page_size;
            for (index_t d = 0; d < D; ++d) k[(h * sk + j) * D + d] = kview(page, h, slot, d);
            for (index_t d = 0; d < Dv; ++d) v[(h * sk + j) * Dv + d] = vview(page, h, slot, d);
          }
        const auto qb = slice(bhsd(q.data(), B, H, sq, D), 0, b, 1);
        auto av = bhsd(alone.data(), 1, H, sq, Dv);
        softmax_attention<Backend>(qb, bhsd(k.data(), 1, Hk, sk, D), bhsd(v.data(), 1, Hk, sk, Dv),
                                   av, o);
        const auto got = to_dense(slice(bhsd(out.data(), B, H, sq, Dv), 0, b, 1));
        // Tiles that span pages are gathered: the same tiles, the same bits, any page size.
        EXPECT_EQ(got, to_dense(av)) << "batch " << b;
        const tensor_view<const T, 4> kb = bhsd(k.data(), 1, Hk, sk, D),
                                      vb = bhsd(v.data(), 1, Hk, sk, Dv);
        const auto want = reference_softmax<double>(qb, kb, vb, o);
        const auto naive = reference_softmax<T>(qb, kb, vb, o);
        EXPECT_TRUE(within_tolerance<T>(got, want.out, naive.out)) << "batch " << b;
      }
    }
  }
}

TYPED_TEST(SoftmaxDecode, PagedRejectsBadTables) {
  using T = typename TestFixture::T;
  using Backend = typename TestFixture::Backend;
  std::vector<T> q(2 * 8), kc(4 * 16 * 8), vc(4 * 16 * 8), out(2 * 8, T(3));
  const std::vector<std::int32_t> table{0, 1, 2, 7};
  auto call = [&](std::vector<std::int32_t> lens) {
    softmax_attention_paged<Backend>(
        bhsd(q.data(), 2, 1, 1, 8), paged_nhd(kc.data(), 4, 16, 1, 8),
        paged_nhd(vc.data(), 4, 16, 1, 8), bhsd(out.data(), 2, 1, 1, 8),
        view<const std::int32_t, 2>(table.data(), {2, 2}), std::span<const std::int32_t>(lens));
  };
  for (auto [lens, needle] :
       {std::pair{std::vector<std::int32_t>{10, 20}, "block_table: entry (1, 1)"},
        std::pair{std::vector<std::int32_t>{40, 3}, "seqlens_k: length 0"},
        std::pair{std::vector<std::int32_t>{3}, "seqlens_k: has 1"}}) {
    try {
      call(lens);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const fovea::error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    for (T x : out) ASSERT_EQ(x, T(3));
  }
  call({10, 16});  // valid: only the first page of row 1 is read
}

}  // namespace fovea::test::softmax_decode_test
