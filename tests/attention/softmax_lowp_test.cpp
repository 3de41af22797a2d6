// bf16 and fp16 storage with fp32 accumulation: the output must be within the tolerance
// of an fp32 computation on the same rounded inputs (2x its error against the f64
// oracle), plus the rounding of the output itself to the storage type.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fovea/fovea.hpp>
#include <limits>
#include <vector>

#include "../common/random.hpp"
#include "../common/reference.hpp"
#include "../common/tolerance.hpp"

namespace fovea::test::softmax_lowp_test {

template <class S, class Backend>
struct lowp_config {
  using storage = S;
  using backend = Backend;
};

#if defined(FOVEA_FORCE_SCALAR)
using lowp_configs = ::testing::Types<lowp_config<bfloat16, scalar>, lowp_config<half, scalar>>;
#else
using lowp_configs =
    ::testing::Types<lowp_config<bfloat16, default_backend>, lowp_config<half, default_backend>,
                     lowp_config<bfloat16, scalar>, lowp_config<half, scalar>>;
#endif

struct lowp_names {
  template <class C>
  static std::string GetName(int) {
    return std::string(std::is_same_v<typename C::storage, bfloat16> ? "bf16_" : "f16_") +
           C::backend::name();
  }
};

template <class C>
class SoftmaxLowPrecision : public ::testing::Test {};
TYPED_TEST_SUITE(SoftmaxLowPrecision, lowp_configs, lowp_names);

template <class S>
std::vector<S> rounded(std::size_t n, std::uint64_t seed) {
  const auto x = normal<float>(n, seed);
  return std::vector<S>(x.begin(), x.end());
}

template <class S>
constexpr double storage_rounding() {  // twice the half-ulp of the storage type near 1
  return std::is_same_v<S, bfloat16> ? 1.0 / 256 : 1.0 / 2048;
}

TYPED_TEST(SoftmaxLowPrecision, MatchesFp32OnTheSameRoundedInputs) {
  using S = typename TypeParam::storage;
  using Backend = typename TypeParam::backend;
  struct shape_case {
    index_t B, H, Hk, Sq, Sk, D, Dv;
  };
  const float slopes[] = {0.1f, 0.2f, 0.05f, 0.3f};
  for (const auto [B, H, Hk, Sq, Sk, D, Dv] :
       {shape_case{1, 4, 2, 100, 150, 64, 64}, shape_case{2, 4, 1, 1, 1000, 128, 128},
        shape_case{1, 4, 4, 37, 37, 59, 33}, shape_case{1, 4, 2, 4, 700, 40, 24}}) {
    for (int variant = 0; variant < 2; ++variant) {
      SCOPED_TRACE("Sq " + std::to_string(Sq) + " Sk " + std::to_string(Sk) + " variant " +
                   std::to_string(variant));
      const auto q = rounded<S>(B * H * Sq * D, 1), k = rounded<S>(B * Hk * Sk * D, 2),
                 v = rounded<S>(B * Hk * Sk * Dv, 3);
      std::vector<S> out(B * H * Sq * Dv);
      softmax_options o{.causal = true, .threads = 2};
      if (variant == 1) {
        o.softcap = 5;
        o.alibi_slopes = view<const float, 2>(slopes, {1, H});
        o.sinks = view<const float, 1>(slopes, {H});
      }
      const tensor_view<const S, 4> Q = bhsd(q.data(), B, H, Sq, D),
                                    K = bhsd(k.data(), B, Hk, Sk, D),
                                    V = bhsd(v.data(), B, Hk, Sk, Dv);
      const auto O = bhsd(out.data(), B, H, Sq, Dv);
      softmax_attention<Backend>(Q, K, V, O, o);
      const auto want = reference_softmax<double>(Q, K, V, o);
      const auto naive = reference_softmax<float>(Q, K, V, o);
      std::vector<double> got(out.begin(), out.end());
      EXPECT_TRUE(within_tolerance<float>(got, want.out, naive.out, storage_rounding<S>()));
    }
  }
}

// Decode reads bf16/fp16 keys and values in place (converted in registers; bf16 keys
// scored with AVX512-BF16 pairs where available): head dims on and off the 32-element
// step, GQA groups that fill one or several score blocks, and a masked key holding NaN.
TYPED_TEST(SoftmaxLowPrecision, DecodeInPlaceMatchesFp32AndIgnoresMaskedNan) {
  using S = typename TypeParam::storage;
  using Backend = typename TypeParam::backend;
  for (const index_t D : {32, 48, 64, 128})
    for (const index_t group : {1, 4, 7}) {
      SCOPED_TRACE("D " + std::to_string(D) + " group " + std::to_string(group));
      const index_t H = 2 * group, Hk = 2, Sq = 3, Sk = 777;
      const auto q = rounded<S>(H * Sq * D, 7);
      auto k = rounded<S>(Hk * Sk * D, 8), v = rounded<S>(Hk * Sk * D, 9);
      auto nan_k = k, nan_v = v;
      for (index_t h = 0; h < Hk; ++h)  // the last key: seen by the last query only
        for (index_t d = 0; d < D; ++d)
          nan_k[(h * Sk + Sk - 1) * D + d] = nan_v[(h * Sk + Sk - 1) * D + d] =
              S(std::numeric_limits<float>::quiet_NaN());
      const softmax_options o{.causal = true, .threads = 1};
      const auto Q = bhsd<const S>(q.data(), 1, H, Sq, D);
      const auto K = bhsd<const S>(k.data(), 1, Hk, Sk, D),
                 V = bhsd<const S>(v.data(), 1, Hk, Sk, D);
      std::vector<S> out(H * Sq * D), nan_out(H * Sq * D);
      softmax_attention<Backend>(Q, K, V, bhsd(out.data(), 1, H, Sq, D), o);
      softmax_attention<Backend>(Q, bhsd<const S>(nan_k.data(), 1, Hk, Sk, D),
                                 bhsd<const S>(nan_v.data(), 1, Hk, Sk, D),
                                 bhsd(nan_out.data(), 1, H, Sq, D), o);
      const auto want = reference_softmax<double>(Q, K, V, o);
      const auto naive = reference_softmax<float>(Q, K, V, o);
      std::vector<double> got(out.begin(), out.end()), got_nan, want_seen, naive_seen;
      EXPECT_TRUE(within_tolerance<float>(got, want.out, naive.out, storage_rounding<S>()));
      for (index_t h = 0; h < H; ++h)
        for (index_t i = 0; i < Sq; ++i)
          for (index_t d = 0; d < D; ++d) {
            const index_t at = (h * Sq + i) * D + d;
            if (i == Sq - 1) {
              EXPECT_TRUE(std::isnan(float(nan_out[at])));
            } else {
              got_nan.push_back(double(nan_out[at]));
              want_seen.push_back(want.out[at]);
              naive_seen.push_back(naive.out[at]);
            }
          }
      EXPECT_TRUE(within_tolerance<float>(got_nan, want_seen, naive_seen, storage_rounding<S>()));
    }
}

TYPED_TEST(SoftmaxLowPrecision, PagedDecodeMatchesContiguous) {
  using S = typename TypeParam::storage;
  using Backend = typename TypeParam::backend;
  const index_t H = 8, Hk = 2, D = 64, page = 16, pages = 40, sk = 600;
  const auto q = rounded<S>(H * D, 4), kc = rounded<S>(pages * page * Hk * D, 5),
             vc = rounded<S>(pages * page * Hk * D, 6);
  std::vector<std::int32_t> table(pages);
  for (index_t p = 0; p < pages; ++p) table[p] = std::int32_t((p * 7) % pages);
  const std::vector<std::int32_t> lens{std::int32_t(sk)};
  std::vector<S> paged(H * D), contiguous(H * D), k(Hk * sk * D), v(Hk * sk * D);
  const auto kview = paged_hnd(kc.data(), pages, page, Hk, D),
             vview = paged_hnd(vc.data(), pages, page, Hk, D);
  for (index_t h = 0; h < Hk; ++h)
    for (index_t j = 0; j < sk; ++j)
      for (index_t d = 0; d < D; ++d) {
        k[(h * sk + j) * D + d] = kview(table[j / page], h, j % page, d);
        v[(h * sk + j) * D + d] = vview(table[j / page], h, j % page, d);
      }
  softmax_attention<Backend>(bhsd(q.data(), 1, H, 1, D), bhsd(k.data(), 1, Hk, sk, D),
                             bhsd(v.data(), 1, Hk, sk, D), bhsd(contiguous.data(), 1, H, 1, D));
  // One thread runs P V in groups that prefetch the next tile's values across pages (bf16
  // with vdpbf16ps scores, see decode_value_group); more threads do not: the same bits.
  std::vector<S> serial(H * D);
  for (const int threads : {1, 2}) {
    softmax_attention_paged<Backend>(bhsd(q.data(), 1, H, 1, D), kview, vview,
                                     bhsd(paged.data(), 1, H, 1, D),
                                     view<const std::int32_t, 2>(table.data(), {1, pages}),
                                     std::span<const std::int32_t>(lens), {.threads = threads});
    // 16-key pages are gathered into the contiguous call's 256-key tiles: the same bits.
    EXPECT_EQ(0, std::memcmp(contiguous.data(), paged.data(), sizeof(S) * paged.size()))
        << threads << " threads";
    if (threads == 1)
      serial = paged;
    else
      EXPECT_EQ(0, std::memcmp(serial.data(), paged.data(), sizeof(S) * serial.size()));
  }
}

// bf16 arithmetic (AVX512-BF16 targets): an all-bf16 call, or a float one over bf16 keys
// and values with options.bf16_products, computes Q K^T and P V in bf16 pairs (vdpbf16ps;
// the probabilities rounded to bf16 for P V). Elsewhere the same calls run in fp32.
constexpr bool pairs_here = detail::bf16_pairs_apply<float, default_backend>();

struct pair_shape {
  index_t B, H, Hk, Sq, Sk, D, Dv;
  bool bshd;
};

template <class S>
tensor_view<S, 4> laid_out(S* p, index_t B, index_t H, index_t S_, index_t D, bool by_seq) {
  return by_seq ? bshd(p, B, S_, H, D) : bhsd(p, B, H, S_, D);
}

// Odd key counts (a last key pair with one key), D = 2 (one pair), pair counts off the
// tile (D = 34), value widths off the vector (24, 33), GQA, both layouts, causal or not,
// the lse; 1 and 2 threads bitwise; against the f64 oracle with the bf16 rule.
TEST(SoftmaxBf16Pairs, PrefillMatchesTheOracleOverAwkwardShapes) {
  for (const auto s : {pair_shape{1, 4, 2, 100, 101, 64, 64, false},
                       pair_shape{1, 2, 1, 70, 33, 2, 24, false},
                       pair_shape{2, 4, 4, 65, 65, 34, 33, true},
                       pair_shape{1, 8, 2, 130, 200, 128, 128, true},
                       pair_shape{1, 2, 2, 17, 1, 16, 16, false}})
    for (const bool causal : {false, true}) {
      SCOPED_TRACE("Sq " + std::to_string(s.Sq) + " Sk " + std::to_string(s.Sk) + " D " +
                   std::to_string(s.D) + " Dv " + std::to_string(s.Dv) + (causal ? " causal" : ""));
      const auto q = rounded<bfloat16>(s.B * s.H * s.Sq * s.D, 11),
                 k = rounded<bfloat16>(s.B * s.Hk * s.Sk * s.D, 12),
                 v = rounded<bfloat16>(s.B * s.Hk * s.Sk * s.Dv, 13);
      const auto Q = laid_out<const bfloat16>(q.data(), s.B, s.H, s.Sq, s.D, s.bshd);
      const auto K = laid_out<const bfloat16>(k.data(), s.B, s.Hk, s.Sk, s.D, s.bshd);
      const auto V = laid_out<const bfloat16>(v.data(), s.B, s.Hk, s.Sk, s.Dv, s.bshd);
      std::vector<bfloat16> out(s.B * s.H * s.Sq * s.Dv), serial;
      std::vector<float> lse(s.B * s.H * s.Sq), serial_lse;
      for (const int threads : {1, 2}) {
        softmax_attention(Q, K, V, laid_out(out.data(), s.B, s.H, s.Sq, s.Dv, s.bshd),
                          {.causal = causal,
                           .lse = view<float, 3>(lse.data(), {s.B, s.H, s.Sq}),
                           .threads = threads});
        if (threads == 1) {
          serial = out, serial_lse = lse;
        } else {
          EXPECT_EQ(0, std::memcmp(serial.data(), out.data(), 2 * out.size())) << "thread variant";
          EXPECT_EQ(0, std::memcmp(serial_lse.data(), lse.data(), 4 * lse.size()));
        }
      }
      const softmax_options o{.causal = causal};
      const auto want = reference_softmax<double>(Q, K, V, o);
      const auto naive = reference_softmax<float>(Q, K, V, o);
      // out in bhsd order, as the oracle gives it
      std::vector<double> got;
      const auto O = laid_out<const bfloat16>(out.data(), s.B, s.H, s.Sq, s.Dv, s.bshd);
      for (index_t b = 0; b < s.B; ++b)
        for (index_t h = 0; h < s.H; ++h)
          for (index_t i = 0; i < s.Sq; ++i)
            for (index_t d = 0; d < s.Dv; ++d) got.push_back(double(float(O(b, h, i, d))));
      EXPECT_TRUE(within_tolerance<float>(got, want.out, naive.out, storage_rounding<bfloat16>()));
      // exact bf16 products summed in fp32: the lse is as accurate as an fp32 call's
      for (std::size_t r = 0; r < lse.size(); ++r)
        if (std::isinf(want.lse[r]))
          EXPECT_EQ(lse[r], want.lse[r]) << "row " << r;  // sees no key: -inf
        else
          EXPECT_NEAR(lse[r], want.lse[r], 1e-5 * (1 + std::abs(want.lse[r]))) << "row " << r;
    }
}

// Where the target has AVX512-BF16, a float call over bf16 keys and values with
// bf16_products is the bf16 call's arithmetic on bf16(q) exactly (prefill and decode: its
// output rounded to bf16 is the bf16 call's) and differs from the call without it, which
// is the fp32 call's arithmetic; elsewhere bf16_products changes nothing.
TEST(SoftmaxBf16Pairs, TakenWhereTheTargetHasThemAndOnlyWhenAsked) {
  const index_t H = 8, Hk = 2, Sk = 300;
  // D = 48 and 2: decode scores them in fp32 (not whole 32-element pair steps), on q
  // rounded to bf16 all the same (a new-user trial found it unrounded there)
  for (const index_t D : {64, 48, 2})
    for (const index_t Sq : {1, 3, 200}) {
      SCOPED_TRACE("D " + std::to_string(D) + " Sq " + std::to_string(Sq));
      const auto qf = normal<float>(H * Sq * D, 21);  // not bf16 values: rounded by the calls
      const std::vector<bfloat16> q(qf.begin(), qf.end());
      const auto k = rounded<bfloat16>(Hk * Sk * D, 22), v = rounded<bfloat16>(Hk * Sk * D, 23);
      const std::vector<float> kf(k.begin(), k.end()), vf(v.begin(), v.end());
      const auto K = bhsd<const bfloat16>(k.data(), 1, Hk, Sk, D),
                 V = bhsd<const bfloat16>(v.data(), 1, Hk, Sk, D);
      std::vector<bfloat16> out16(H * Sq * D);
      std::vector<float> out32(H * Sq * D), opted(H * Sq * D), mixed(H * Sq * D);
      const softmax_options o{.causal = true, .threads = 1};
      softmax_attention(bhsd<const bfloat16>(q.data(), 1, H, Sq, D), K, V,
                        bhsd(out16.data(), 1, H, Sq, D), o);
      softmax_attention(bhsd<const float>(qf.data(), 1, H, Sq, D),
                        bhsd<const float>(kf.data(), 1, Hk, Sk, D),
                        bhsd<const float>(vf.data(), 1, Hk, Sk, D), bhsd(out32.data(), 1, H, Sq, D), o);
      softmax_options with = o;
      with.bf16_products = true;
      softmax_attention(bhsd<const float>(qf.data(), 1, H, Sq, D), K, V,
                        bhsd(opted.data(), 1, H, Sq, D), with);
      softmax_attention(bhsd<const float>(qf.data(), 1, H, Sq, D), K, V,
                        bhsd(mixed.data(), 1, H, Sq, D), o);
      index_t opted_as_bf16 = 0;
      for (std::size_t i = 0; i < out16.size(); ++i) {
        const auto bits = [](bfloat16 x) { return Eigen::numext::bit_cast<std::uint16_t>(x); };
        opted_as_bf16 += bits(out16[i]) == bits(bfloat16(opted[i]));
      }
      if (pairs_here) {  // (elsewhere the option changes nothing: checked below)
        EXPECT_EQ(opted_as_bf16, index_t(out16.size())) << "bf16_products is not the bf16 arithmetic";
      }
      EXPECT_EQ(0, std::memcmp(mixed.data(), out32.data(), 4 * out32.size()))
          << "a float call over bf16 keys computes as the fp32 call unless asked";
      const bool differs = std::memcmp(opted.data(), mixed.data(), 4 * mixed.size()) != 0;
      EXPECT_EQ(differs, pairs_here) << "bf16 pairs taken where the target has them, only there";
    }
}

// A paged bf16 prefill gathers the tiles that span pages and computes the same pairs as
// a contiguous call; a masked key's NaN value never reaches a row, a visible one does.
TEST(SoftmaxBf16Pairs, PagedGathersTheSamePairsAndMaskedNanStaysOut) {
  const index_t H = 4, Hk = 2, D = 64, page = 16, pages = 40, Sk = 600, Sq = 70;
  const auto q = rounded<bfloat16>(H * Sq * D, 31), kc = rounded<bfloat16>(pages * page * Hk * D, 32),
             vc = rounded<bfloat16>(pages * page * Hk * D, 33);
  std::vector<std::int32_t> table(pages);
  for (index_t p = 0; p < pages; ++p) table[p] = std::int32_t((p * 7) % pages);
  const std::vector<std::int32_t> lens{std::int32_t(Sk)};
  const auto kview = paged_hnd(kc.data(), pages, page, Hk, D),
             vview = paged_hnd(vc.data(), pages, page, Hk, D);
  std::vector<bfloat16> k(Hk * Sk * D), v(Hk * Sk * D);
  for (index_t h = 0; h < Hk; ++h)
    for (index_t j = 0; j < Sk; ++j)
      for (index_t d = 0; d < D; ++d) {
        k[(h * Sk + j) * D + d] = kview(table[j / page], h, j % page, d);
        v[(h * Sk + j) * D + d] = vview(table[j / page], h, j % page, d);
      }
  std::vector<bfloat16> paged(H * Sq * D), contiguous(H * Sq * D);
  const auto Q = bhsd<const bfloat16>(q.data(), 1, H, Sq, D);
  softmax_attention(Q, bhsd<const bfloat16>(k.data(), 1, Hk, Sk, D),
                    bhsd<const bfloat16>(v.data(), 1, Hk, Sk, D), bhsd(contiguous.data(), 1, H, Sq, D),
                    {.causal = true});
  softmax_attention_paged(Q, kview, vview, bhsd(paged.data(), 1, H, Sq, D),
                          view<const std::int32_t, 2>(table.data(), {1, pages}),
                          std::span<const std::int32_t>(lens), {.causal = true});
  EXPECT_EQ(0, std::memcmp(contiguous.data(), paged.data(), 2 * paged.size()));

  // The last key's value NaN: causal, only the last query sees it and its rows are NaN;
  // the others (some of which meet that key masked in their last tile) match the oracle.
  auto nan_v = v;
  for (index_t h = 0; h < Hk; ++h)
    for (index_t d = 0; d < D; ++d)
      nan_v[(h * Sk + Sk - 1) * D + d] = bfloat16(std::numeric_limits<float>::quiet_NaN());
  const auto K = bhsd<const bfloat16>(k.data(), 1, Hk, Sk, D);
  const auto V = bhsd<const bfloat16>(v.data(), 1, Hk, Sk, D);
  std::vector<bfloat16> nan_out(H * Sq * D);
  softmax_attention(Q, K, bhsd<const bfloat16>(nan_v.data(), 1, Hk, Sk, D),
                    bhsd(nan_out.data(), 1, H, Sq, D), {.causal = true});
  const auto want = reference_softmax<double>(Q, K, V, {.causal = true});
  const auto naive = reference_softmax<float>(Q, K, V, {.causal = true});
  std::vector<double> got, want_seen, naive_seen;
  for (index_t h = 0; h < H; ++h)
    for (index_t i = 0; i < Sq; ++i)
      for (index_t d = 0; d < D; ++d) {
        const index_t at = (h * Sq + i) * D + d;
        if (i == Sq - 1) {
          EXPECT_TRUE(std::isnan(float(nan_out[at]))) << "row " << h << "," << i;
        } else {
          got.push_back(double(float(nan_out[at])));
          want_seen.push_back(want.out[at]);
          naive_seen.push_back(naive.out[at]);
        }
      }
  EXPECT_TRUE(within_tolerance<float>(got, want_seen, naive_seen, storage_rounding<bfloat16>()));
}

}  // namespace fovea::test::softmax_lowp_test
