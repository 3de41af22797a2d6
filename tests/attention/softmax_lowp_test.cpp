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

namespace fovea::test {
namespace {

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

}  // namespace
}  // namespace fovea::test
