// KV caches in other types than the activations: float q/out over bf16, fp16, block_q8_0,
// int8 (with scales) and e4m3/e5m2 caches, K and V of different types. The codecs against
// definitions written here (bitwise), each type's error bound, and attention against the
// f64 oracle on the dequantized values under the tolerance rule, on every path (decode,
// prefill, paged, varlen, contiguous cache), with NaN, threads and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fovea/fovea.hpp>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../common/attention_case.hpp"
#include "../common/random.hpp"
#include "../common/reference.hpp"
#include "../common/sparse_case.hpp"
#include "../common/tolerance.hpp"

namespace fovea::test::cache_types_test {

constexpr float nan_f = std::numeric_limits<float>::quiet_NaN();

// ---- codecs, from their definitions -----------------------------------------------------

/// e4m3 / e5m2 values from the OCP definition (sign, exponent, mantissa, bias).
double fp8_definition(std::uint8_t c, int E, int M) {
  const int bias = (1 << (E - 1)) - 1, e = (c >> M) & ((1 << E) - 1), m = c & ((1 << M) - 1);
  const double sign = (c & 0x80) ? -1 : 1;
  if (E == 4 && e == 15 && m == 7) return nan_f;
  if (E == 5 && e == 31) return m ? nan_f : sign * HUGE_VAL;
  if (e == 0) return sign * std::ldexp(m, 1 - bias - M);
  return sign * std::ldexp((1 << M) + m, e - bias - M);
}

TEST(CacheTypes, Fp8CodesMatchTheOcpDefinition) {
  for (int c = 0; c < 256; ++c) {
    const double want4 = fp8_definition(std::uint8_t(c), 4, 3),
                 want5 = fp8_definition(std::uint8_t(c), 5, 2);
    const float got4 = to_float(e4m3{std::uint8_t(c)}), got5 = to_float(e5m2{std::uint8_t(c)});
    if (std::isnan(want4)) {
      EXPECT_TRUE(std::isnan(got4)) << c;
    } else {
      EXPECT_EQ(double(got4), want4) << c;
    }
    if (std::isnan(want5)) {
      EXPECT_TRUE(std::isnan(got5)) << c;
    } else {
      EXPECT_EQ(double(got5), want5) << c;
    }
    // every value encodes back to its code (both zeros keep their sign)
    if (!std::isnan(want4)) {
      EXPECT_EQ(to_e4m3(got4).bits, c) << c;
    }
    if (!std::isnan(want5) && !std::isinf(want5)) {
      EXPECT_EQ(to_e5m2(got5).bits, c) << c;
    }
  }
  EXPECT_EQ(to_float(e4m3{0x7E}), 448.0f);
  EXPECT_EQ(to_float(e4m3{0x01}), std::ldexp(1.0f, -9));
  EXPECT_EQ(to_float(e5m2{0x7B}), 57344.0f);
}

TEST(CacheTypes, Fp8RoundsToNearestEvenAndSaturates) {
  // the midpoint of two neighbouring codes goes to the even one; just off it, the nearer
  for (int c = 0; c < 0x7E; ++c) {
    const float a = to_float(e4m3{std::uint8_t(c)}), b = to_float(e4m3{std::uint8_t(c + 1)});
    const float mid = float((double(a) + double(b)) / 2);
    EXPECT_EQ(to_e4m3(mid).bits, (c % 2 == 0) ? c : c + 1) << c;
    EXPECT_EQ(to_e4m3(std::nextafter(mid, 0.0f)).bits, c) << c;
    EXPECT_EQ(to_e4m3(std::nextafter(mid, 1e9f)).bits, c + 1) << c;
  }
  for (int c = 0; c < 0x7B; ++c) {
    const float a = to_float(e5m2{std::uint8_t(c)}), b = to_float(e5m2{std::uint8_t(c + 1)});
    const float mid = float((double(a) + double(b)) / 2);
    EXPECT_EQ(to_e5m2(mid).bits, (c % 2 == 0) ? c : c + 1) << c;
    EXPECT_EQ(to_e5m2(-mid).bits, ((c % 2 == 0) ? c : c + 1) | 0x80) << c;
  }
  EXPECT_EQ(to_e4m3(1e6f).bits, 0x7E);
  EXPECT_EQ(to_e4m3(-HUGE_VALF).bits, 0xFE);
  EXPECT_EQ(to_e5m2(HUGE_VALF).bits, 0x7B);
  EXPECT_TRUE(std::isnan(to_float(to_e4m3(nan_f))));
  EXPECT_TRUE(std::isnan(to_float(to_e5m2(nan_f))));
}

/// x / d rounded (ties to even) as llama.cpp computes it, x times 1 / d, except where
/// 1 / d overflows: there x / d (0 * inf would be NaN).
std::int8_t quantized(float x, float d) {
  const float id = d ? 1 / d : 0;
  return std::int8_t(std::clamp(std::nearbyint(std::isinf(id) ? x / d : x * id), -127.f, 127.f));
}

/// llama.cpp's quantize_row_q8_0_ref, with ties to even: d = amax / 127 (stored fp16),
/// q = round(x / d) with d in fp32.
block_q8_0 q8_0_definition(const float* x) {
  float amax = 0;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127;
  block_q8_0 b;
  b.d = half(d);
  for (int i = 0; i < 32; ++i) b.qs[i] = quantized(x[i], d);
  return b;
}

TEST(CacheTypes, QuantizeMatchesTheDefinitionsBitwise) {
  const index_t B = 2, H = 3, S = 17, D = 64;
  auto x = normal<float>(B * H * S * D, 11, 2.0);
  x[5] = 0;  // zero rows and blocks
  std::fill(x.begin() + D * 3, x.begin() + D * 4, 0.0f);
  // Rows so small that 1 / scale overflows (scale ~1e-40, subnormal), holding a zero: the
  // reciprocal gave 0 * inf = NaN (undefined as an int8) and +-127 for every other value.
  for (index_t i = D * 4; i < D * 6; ++i) x[i] *= 1e-38f;
  x[D * 4 + 7] = 0;
  const auto X = bhsd<const float>(x.data(), B, H, S, D);

  std::vector<block_q8_0> q8(x.size() / 32);
  quantize(X, bhsd(q8.data(), B, H, S, D));
  for (std::size_t b = 0; b < q8.size(); ++b) {
    const block_q8_0 want = q8_0_definition(x.data() + 32 * b);
    ASSERT_EQ(0, std::memcmp(&want, &q8[b], sizeof(block_q8_0))) << "block " << b;
  }

  std::vector<std::int8_t> i8(x.size());
  std::vector<float> scales(B * H * S);
  quantize(X, bhsd(i8.data(), B, H, S, D), view(scales.data(), {B, H, S}));
  for (index_t r = 0; r < B * H * S; ++r) {
    float amax = 0;
    for (index_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(x[r * D + d]));
    ASSERT_EQ(scales[r], amax / 127) << r;
    for (index_t d = 0; d < D; ++d)
      ASSERT_EQ(i8[r * D + d], quantized(x[r * D + d], amax / 127)) << r << " " << d;
  }

  const std::vector<float> head_scales{0.01f, 0.02f, 0.5f};
  std::vector<e4m3> f8(x.size());
  quantize(X, bhsd(f8.data(), B, H, S, D), view<const float>(head_scales.data(), {1, H, 1}, {0, 1, 0}));
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < S * D; ++i) {
        const index_t at = (b * H + h) * S * D + i;
        ASSERT_EQ(f8[at].bits, to_e4m3(x[at] / head_scales[h]).bits);
      }
}

/// The quantization error of each type within its documented bound.
TEST(CacheTypes, ErrorBounds) {
  const index_t S = 64, D = 128;
  const auto x = normal<float>(S * D, 12, 3.0);
  const auto X = bhsd<const float>(x.data(), 1, 1, S, D);
  std::vector<float> back(x.size());
  const auto Back = bhsd(back.data(), 1, 1, S, D);

  std::vector<block_q8_0> q8(x.size() / 32);
  quantize(X, bhsd(q8.data(), 1, 1, S, D));
  dequantize(bhsd<const block_q8_0>(q8.data(), 1, 1, S, D), Back);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const float d = float(q8[i / 32].d);
    ASSERT_LE(std::fabs(x[i] - back[i]), d / 2 + std::fabs(x[i]) * std::ldexp(1.0f, -11)) << i;
  }

  std::vector<std::int8_t> i8(x.size());
  std::vector<float> scales(S);
  quantize(X, bhsd(i8.data(), 1, 1, S, D), view(scales.data(), {1, 1, S}));
  dequantize(bhsd<const std::int8_t>(i8.data(), 1, 1, S, D), Back,
             view<const float>(scales.data(), {1, 1, S}));
  for (std::size_t i = 0; i < x.size(); ++i)
    ASSERT_LE(std::fabs(x[i] - back[i]), scales[i / D] / 2 * (1 + 1e-6f)) << i;

  const float scale = 0.05f;  // |x| / scale up to ~300: inside e4m3's range
  const auto s = view<const float>(&scale, {1, 1, 1});
  std::vector<e4m3> f4(x.size());
  std::vector<e5m2> f5(x.size());
  quantize(X, bhsd(f4.data(), 1, 1, S, D), s);
  dequantize(bhsd<const e4m3>(f4.data(), 1, 1, S, D), Back, s);
  for (std::size_t i = 0; i < x.size(); ++i)
    ASSERT_LE(std::fabs(x[i] - back[i]),
              std::max(std::fabs(x[i]) * 0.0625f, scale * std::ldexp(1.0f, -10)) * 1.0001f) << i;
  quantize(X, bhsd(f5.data(), 1, 1, S, D), s);
  dequantize(bhsd<const e5m2>(f5.data(), 1, 1, S, D), Back, s);
  for (std::size_t i = 0; i < x.size(); ++i)
    ASSERT_LE(std::fabs(x[i] - back[i]),
              std::max(std::fabs(x[i]) * 0.125f, scale * std::ldexp(1.0f, -17)) * 1.0001f) << i;
}

/// The vector dequantization gives the scalar twin's bits, NaN codes included, at every
/// length (tails past the vector width): every code in order (the NaN codes 0x7F and 0xFF
/// in the last lane of a 32-code step), then random ones.
TEST(CacheTypes, VectorDequantizationEqualsTheScalarTwin) {
  std::mt19937 gen(5);
  std::vector<std::uint8_t> bytes(300);
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = std::uint8_t(i < 256 ? i : gen());
  for (index_t n : {1, 7, 8, 15, 16, 17, 31, 32, 33, 64, 200, 256, 300}) {
    std::vector<float> got(n), want(n);
    for (const float scale : {1.0f, 0.37f, 3e-3f}) {
      auto check = [&](const auto* src) {
        detail::dequantize_row(src, scale, got.data(), n);
        for (index_t i = 0; i < n; ++i) want[i] = detail::dequantized(src[i], scale);
        for (index_t i = 0; i < n; ++i)
          ASSERT_TRUE(std::memcmp(&got[i], &want[i], 4) == 0)  // NaN: the same sign and payload
              << "n " << n << " element " << i << ": " << got[i] << " vs " << want[i];
      };
      check(reinterpret_cast<const e4m3*>(bytes.data()));
      check(reinterpret_cast<const e5m2*>(bytes.data()));
      check(reinterpret_cast<const std::int8_t*>(bytes.data()));
    }
  }
  std::vector<block_q8_0> blocks(4);
  for (auto& b : blocks) {
    b.d = half(std::ldexp(float(gen() % 1000) / 1000, -int(gen() % 10)));
    for (auto& q : b.qs) q = std::int8_t(gen());
  }
  std::vector<float> got(128);
  detail::dequantize_row(blocks.data(), 1.0f, got.data(), 128);
  for (int i = 0; i < 128; ++i)
    ASSERT_EQ(got[i], float(blocks[i / 32].d) * float(blocks[i / 32].qs[i % 32])) << i;
}

// ---- attention over the caches -------------------------------------------------------------

/// A cache of type C holding x (B, Hk, S, D) quantized, the scales it needs, and the
/// values attention must use (dequantized).
template <class C>
struct cache {
  std::vector<C> data;
  std::vector<float> scales;  ///< int8: (B, Hk, S); fp8: per head (Hk)
  std::vector<float> values;  ///< dequantized, (B, Hk, S, D) bhsd
  tensor_view<const float, 3> scale_view{};
};

template <class C>
cache<C> make_cache(const std::vector<float>& x, index_t B, index_t Hk, index_t S, index_t D,
                    bool bshd_layout) {
  cache<C> c;
  c.data.resize(x.size() / values_per_element<C>::value);
  const auto X = bhsd<const float>(x.data(), B, Hk, S, D);
  const auto view_of = [&](auto* p) {
    return bshd_layout ? bshd(p, B, S, Hk, D) : bhsd(p, B, Hk, S, D);
  };
  const auto dst = view_of(c.data.data());
  if constexpr (std::is_same_v<C, block_q8_0>) {
    quantize(X, dst);
  } else if constexpr (std::is_same_v<C, std::int8_t>) {
    c.scales.resize(B * Hk * S);
    const auto s = view(c.scales.data(), {B, Hk, S});
    quantize(X, dst, s);
    c.scale_view = s;
  } else if constexpr (is_scaled_v<C>) {
    for (index_t h = 0; h < Hk; ++h) c.scales.push_back(0.004f * float(h + 1));
    c.scale_view = view<const float>(c.scales.data(), {1, Hk, 1}, {0, 1, 0});
    quantize(X, dst, c.scale_view);
  } else {
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < Hk; ++h)
        for (index_t s = 0; s < S; ++s)
          for (index_t d = 0; d < D; ++d) dst(b, h, s, d) = C(X(b, h, s, d));
  }
  c.values.resize(x.size());
  const auto V = bhsd(c.values.data(), B, Hk, S, D);
  const tensor_view<const C, 4> stored = dst;
  if constexpr (is_quantized_v<C>) {
    dequantize(stored, V, c.scale_view);
  } else {
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < Hk; ++h)
        for (index_t s = 0; s < S; ++s)
          for (index_t d = 0; d < D; ++d) V(b, h, s, d) = float(stored(b, h, s, d));
  }
  return c;
}

template <class C>
tensor_view<const C, 4> view_of(const cache<C>& c, index_t B, index_t Hk, index_t S, index_t D,
                                bool bshd_layout) {
  return bshd_layout ? bshd(c.data.data(), B, S, Hk, D) : bhsd(c.data.data(), B, Hk, S, D);
}

/// The scales of one sequence: batch row b, keys [k0, k0 + n) (unless broadcast).
tensor_view<const float, 3> scales_of(const tensor_view<const float, 3>& s, index_t b, index_t k0,
                                      index_t n) {
  if (s.data() == nullptr) return s;
  auto cut = detail::sequence_scales(s, b, k0);
  return cut.extent(2) > 1 ? slice(cut, 2, 0, n) : cut;
}

template <class K, class V>
struct pair_types {
  using key = K;
  using value = V;
};
#if defined(FOVEA_TEST_SANITIZE) || defined(FOVEA_TEST_FEW_CACHE_PAIRS)
// Under ASan + UBSan, every reading path once as keys and once as values (q8_0, int8, fp8,
// float, fp16, bf16): the eight pairs took ~5 minutes of a CI run to compile there. (The
// AArch64 step, whose qemu run takes none of the typed sweeps, compiles these too.)
using cache_pairs =
    ::testing::Types<pair_types<block_q8_0, bfloat16>, pair_types<std::int8_t, std::int8_t>,
                     pair_types<half, block_q8_0>, pair_types<float, e4m3>>;
#else
using cache_pairs =
    ::testing::Types<pair_types<block_q8_0, block_q8_0>, pair_types<block_q8_0, bfloat16>,
                     pair_types<std::int8_t, std::int8_t>, pair_types<e4m3, e4m3>,
                     pair_types<e5m2, e5m2>, pair_types<bfloat16, bfloat16>,
                     pair_types<half, block_q8_0>, pair_types<float, e4m3>>;
#endif
struct pair_names {
  template <class P>
  static std::string GetName(int) {
    // (appended, not operator+: GCC 12's -Warray-bounds misreads that at -O1 with ASan)
    std::string name = detail::cache_type_name<typename P::key>();
    name += '_';
    name += detail::cache_type_name<typename P::value>();
    return name;
  }
};
template <class P>
class CacheAttention : public ::testing::Test {};
TYPED_TEST_SUITE(CacheAttention, cache_pairs, pair_names);

struct shape_case {
  index_t B, H, Hk, Sq, Sk, D, Dv;
};

/// Decode (Sq <= 16) and prefill shapes, GQA 1/4/8, Sk around the decode chunk, both
/// layouts, causal or not: fovea against the f64 oracle on the dequantized values.
TYPED_TEST(CacheAttention, MatchesTheOracleOnDequantizedValues) {
  using K = typename TypeParam::key;
  using V = typename TypeParam::value;
  for (const auto s : {shape_case{1, 8, 8, 1, 1, 64, 64}, shape_case{2, 8, 2, 1, 511, 64, 32},
                       shape_case{1, 8, 1, 3, 512, 128, 128}, shape_case{1, 16, 2, 1, 513, 32, 64},
                       shape_case{1, 4, 1, 100, 150, 64, 64}, shape_case{2, 4, 4, 65, 65, 32, 96},
                       shape_case{1, 8, 2, 1, 32768, 64, 64}})
    for (const bool layout : {false, true})
      for (const bool causal : {false, true}) {
        if (s.Sk > 4096 && (layout || !causal)) continue;  // the long decode: once per pair
        SCOPED_TRACE("H " + std::to_string(s.H) + " Hk " + std::to_string(s.Hk) + " Sq " +
                     std::to_string(s.Sq) + " Sk " + std::to_string(s.Sk) + " D " +
                     std::to_string(s.D) + (layout ? " bshd" : " bhsd") + (causal ? " causal" : ""));
        const auto q = normal<float>(s.B * s.H * s.Sq * s.D, 1);
        const auto kc = make_cache<K>(normal<float>(s.B * s.Hk * s.Sk * s.D, 2), s.B, s.Hk, s.Sk,
                                      s.D, layout);
        const auto vc = make_cache<V>(normal<float>(s.B * s.Hk * s.Sk * s.Dv, 3), s.B, s.Hk, s.Sk,
                                      s.Dv, layout);
        std::vector<float> out(s.B * s.H * s.Sq * s.Dv), serial;
        softmax_options o{.causal = causal, .k_scale = kc.scale_view, .v_scale = vc.scale_view};
        for (const int threads : {1, 2}) {
          o.threads = threads;
          softmax_attention(bhsd<const float>(q.data(), s.B, s.H, s.Sq, s.D),
                            view_of(kc, s.B, s.Hk, s.Sk, s.D, layout),
                            view_of(vc, s.B, s.Hk, s.Sk, s.Dv, layout),
                            bhsd(out.data(), s.B, s.H, s.Sq, s.Dv), o);
          if (threads == 1) serial = out;
        }
        EXPECT_EQ(0, std::memcmp(serial.data(), out.data(), 4 * out.size())) << "thread variant";
        const softmax_options ref{.causal = causal};
        const auto Q = bhsd<const float>(q.data(), s.B, s.H, s.Sq, s.D);
        const auto Kd = bhsd<const float>(kc.values.data(), s.B, s.Hk, s.Sk, s.D);
        const auto Vd = bhsd<const float>(vc.values.data(), s.B, s.Hk, s.Sk, s.Dv);
        const auto want = reference_softmax<double>(Q, Kd, Vd, ref);
        const auto naive = reference_softmax<float>(Q, Kd, Vd, ref);
        EXPECT_TRUE(within_tolerance<float>(std::vector<double>(out.begin(), out.end()), want.out,
                                            naive.out));
      }
}

/// HiP over every cache pair: the search scores the dequantized keys (so it selects what
/// it selects on them, bit for bit, when it reads them as float), and attention over the
/// selection equals the f64 oracle on the dequantized values masked to exactly the
/// selection; decode and prefill, GQA, both layouts, 1 and 2 threads bitwise.
TYPED_TEST(CacheAttention, HipMatchesTheOracleOverItsSelection) {
  using K = typename TypeParam::key;
  using V = typename TypeParam::value;
  for (const auto s : {shape_case{1, 8, 2, 1, 700, 64, 64}, shape_case{2, 4, 4, 70, 300, 32, 96},
                       shape_case{1, 4, 1, 130, 130, 64, 32}})
    for (const bool layout : {false, true}) {
      SCOPED_TRACE("H " + std::to_string(s.H) + " Hk " + std::to_string(s.Hk) + " Sq " +
                   std::to_string(s.Sq) + " Sk " + std::to_string(s.Sk) +
                   (layout ? " bshd" : " bhsd"));
      const auto q = normal<float>(s.B * s.H * s.Sq * s.D, 31);
      const auto kc = make_cache<K>(normal<float>(s.B * s.Hk * s.Sk * s.D, 32), s.B, s.Hk, s.Sk,
                                    s.D, layout);
      const auto vc = make_cache<V>(normal<float>(s.B * s.Hk * s.Sk * s.Dv, 33), s.B, s.Hk, s.Sk,
                                    s.Dv, layout);
      const auto Q = bhsd<const float>(q.data(), s.B, s.H, s.Sq, s.D);
      const auto Kc = view_of(kc, s.B, s.Hk, s.Sk, s.D, layout);
      const auto Vc = view_of(vc, s.B, s.Hk, s.Sk, s.Dv, layout);
      const auto Kd = bhsd<const float>(kc.values.data(), s.B, s.Hk, s.Sk, s.D);
      const auto Vd = bhsd<const float>(vc.values.data(), s.B, s.Hk, s.Sk, s.Dv);
      hip_options o{.causal = true, .top_k = 32, .block_size_q = 16, .block_size_k = 4,
                    .sliding_window = 16, .sink_tokens = 4, .k_scale = kc.scale_view,
                    .v_scale = vc.scale_view};
      const hip_selection sel = hip_select(Q, Kc, o);
      if constexpr (detail::hip_keys_as_float_v<K>) {
        const hip_selection on_float = hip_select(Q, Kd, hip_options{.causal = true, .top_k = 32,
            .block_size_q = 16, .block_size_k = 4, .sliding_window = 16, .sink_tokens = 4});
        EXPECT_EQ(sel.starts, on_float.starts) << "selection differs from the dequantized keys'";
      }
      std::vector<float> out(s.B * s.H * s.Sq * s.Dv), serial;
      for (const int threads : {1, 2}) {
        o.threads = threads;
        hip_attention(Q, Kc, Vc, bhsd(out.data(), s.B, s.H, s.Sq, s.Dv), o);
        if (threads == 1) serial = out;
      }
      EXPECT_EQ(0, std::memcmp(serial.data(), out.data(), 4 * out.size())) << "thread variant";
      std::vector<float> again(out.size());
      hip_attention(Q, Kc, Vc, bhsd(again.data(), s.B, s.H, s.Sq, s.Dv), sel, o);
      EXPECT_EQ(0, std::memcmp(again.data(), out.data(), 4 * out.size())) << "select + attend";
      const auto visible = with_mask_mod(hip_visible(sel, o, s.Sq, s.Sk));
      const softmax_options ref{.causal = true};
      const auto want = reference_softmax<double>(Q, Kd, Vd, ref, visible);
      const auto naive = reference_softmax<float>(Q, Kd, Vd, ref, visible);
      EXPECT_TRUE(within_tolerance<float>(std::vector<double>(out.begin(), out.end()), want.out,
                                          naive.out));
    }
}

/// DHSA and Landmark over every cache pair: the selections are those made on the
/// dequantized keys, bit for bit (chunk sums and block means of the same float rows), and
/// attention equals the f64 oracle on the dequantized values over exactly the selection
/// (Landmark's flat softmax; its grouped form against the float call on the dequantized
/// values, bit for bit).
TYPED_TEST(CacheAttention, DhsaAndLandmarkSelectWhatTheDequantizedKeysGive) {
  using K = typename TypeParam::key;
  using V = typename TypeParam::value;
  const shape_case s{1, 4, 2, 96, 200, 64, 32};
  const auto q = normal<float>(s.B * s.H * s.Sq * s.D, 41);
  const auto kc = make_cache<K>(normal<float>(s.B * s.Hk * s.Sk * s.D, 42), s.B, s.Hk, s.Sk, s.D, false);
  const auto vc = make_cache<V>(normal<float>(s.B * s.Hk * s.Sk * s.Dv, 43), s.B, s.Hk, s.Sk, s.Dv, false);
  const auto Q = bhsd<const float>(q.data(), s.B, s.H, s.Sq, s.D);
  const auto Kc = view_of(kc, s.B, s.Hk, s.Sk, s.D, false);
  const auto Vc = view_of(vc, s.B, s.Hk, s.Sk, s.Dv, false);
  const auto Kd = bhsd<const float>(kc.values.data(), s.B, s.Hk, s.Sk, s.D);
  const auto Vd = bhsd<const float>(vc.values.data(), s.B, s.Hk, s.Sk, s.Dv);
  std::vector<float> out(s.B * s.H * s.Sq * s.Dv), on_float(out.size());
  const softmax_options ref{.causal = true};
  auto expect_oracle = [&](const auto& visible) {
    const auto want = reference_softmax<double>(Q, Kd, Vd, ref, with_mask_mod(visible));
    const auto naive = reference_softmax<float>(Q, Kd, Vd, ref, with_mask_mod(visible));
    EXPECT_TRUE(within_tolerance<float>(std::vector<double>(out.begin(), out.end()), want.out,
                                        naive.out));
  };

  dhsa_options d{.chunk_size = 24, .top_keys = 72, .k_scale = kc.scale_view, .v_scale = vc.scale_view};
  const dhsa_selection chosen = dhsa_select(Q, Kc, d);
  EXPECT_EQ(chosen.indices, dhsa_select(Q, Kd, dhsa_options{.chunk_size = 24, .top_keys = 72}).indices);
  dhsa_attention(Q, Kc, Vc, bhsd(out.data(), s.B, s.H, s.Sq, s.Dv), d);
  expect_oracle([&](index_t b, index_t h, index_t i, index_t j) {
    const auto c = chosen.kept(b, h, chosen.chunk_of(i + s.Sk - s.Sq));
    return std::binary_search(c.begin(), c.end(), std::int32_t(chosen.chunk_of(j)));
  });

  landmark_options l{.block_size = 16, .top_k = 3, .grouped = false, .k_scale = kc.scale_view,
                     .v_scale = vc.scale_view};
  const landmark_selection sel = landmark_select(Q, Kc, l);
  EXPECT_EQ(sel.blocks, landmark_select(Q, Kd, landmark_options{.block_size = 16, .top_k = 3}).blocks);
  landmark_attention(Q, Kc, Vc, bhsd(out.data(), s.B, s.H, s.Sq, s.Dv), l);
  expect_oracle([&](index_t b, index_t h, index_t i, index_t j) {
    const index_t local = (i + s.Sk - s.Sq) / 16;
    const auto r = sel.retrieved(b, h, i);
    return j >= local * 16 || std::binary_search(r.begin(), r.end(), std::int32_t(j / 16));
  });
  l.grouped = true;
  landmark_attention(Q, Kc, Vc, bhsd(out.data(), s.B, s.H, s.Sq, s.Dv), l);
  landmark_attention(Q, Kd, Vd, bhsd(on_float.data(), s.B, s.H, s.Sq, s.Dv),
                     landmark_options{.block_size = 16, .top_k = 3});
  EXPECT_EQ(0, std::memcmp(out.data(), on_float.data(), 4 * out.size())) << "grouped";
}

/// Paged caches with a scrambled table give the contiguous result bit for bit (both
/// paths), the scales of int8 caches indexed (page, head, slot).
TYPED_TEST(CacheAttention, PagedEqualsContiguous) {
  using K = typename TypeParam::key;
  using V = typename TypeParam::value;
  const index_t H = 8, Hk = 2, D = 64, page = 16, pages = 48;
  for (const index_t sq : {1, 40}) {
    const index_t sk = 700;
    const auto q = normal<float>(H * sq * D, 4);
    const auto kx = normal<float>(Hk * sk * D, 5), vx = normal<float>(Hk * sk * D, 6);
    const auto kc = make_cache<K>(kx, 1, Hk, sk, D, false);
    const auto vc = make_cache<V>(vx, 1, Hk, sk, D, false);
    std::vector<std::int32_t> table(pages);
    for (index_t p = 0; p < pages; ++p) table[p] = std::int32_t((p * 7 + 3) % pages);
    // the same rows, appended page by page through the table
    std::vector<K> kp(pages * page * Hk * D / values_per_element<K>::value);
    std::vector<V> vp(pages * page * Hk * D / values_per_element<V>::value);
    std::vector<float> kps(pages * Hk * page), vps(pages * Hk * page);
    const auto KP = paged_nhd(kp.data(), pages, page, Hk, D);
    const auto VP = paged_nhd(vp.data(), pages, page, Hk, D);
    const std::vector<std::int32_t> zero{0}, lens{std::int32_t(sk)};
    kv_scales appended;
    if constexpr (std::is_same_v<K, std::int8_t>) appended.k = view(kps.data(), {pages, Hk, page});
    if constexpr (std::is_same_v<V, std::int8_t>) appended.v = view(vps.data(), {pages, Hk, page});
    if constexpr (is_scaled_v<K> && !std::is_same_v<K, std::int8_t>)
      appended.k = view(const_cast<float*>(kc.scales.data()), {1, Hk, 1}, {0, 1, 0});
    if constexpr (is_scaled_v<V> && !std::is_same_v<V, std::int8_t>)
      appended.v = view(const_cast<float*>(vc.scales.data()), {1, Hk, 1}, {0, 1, 0});
    append_kv_paged(bhsd<const float>(kx.data(), 1, Hk, sk, D), bhsd<const float>(vx.data(), 1, Hk, sk, D),
                    KP, VP, view<const std::int32_t>(table.data(), {1, pages}), zero, appended);
    std::vector<float> contiguous(H * sq * D), paged(H * sq * D);
    softmax_attention(bhsd<const float>(q.data(), 1, H, sq, D), view_of(kc, 1, Hk, sk, D, false),
                      view_of(vc, 1, Hk, sk, D, false), bhsd(contiguous.data(), 1, H, sq, D),
                      {.causal = true, .k_scale = kc.scale_view, .v_scale = vc.scale_view});
    softmax_attention_paged(bhsd<const float>(q.data(), 1, H, sq, D), tensor_view<const K, 4>(KP),
                            tensor_view<const V, 4>(VP),
                            bhsd(paged.data(), 1, H, sq, D),
                            view<const std::int32_t>(table.data(), {1, pages}), lens,
                            {.causal = true, .k_scale = appended.k, .v_scale = appended.v});
    EXPECT_EQ(0, std::memcmp(contiguous.data(), paged.data(), 4 * paged.size())) << "Sq " << sq;
  }
}

/// Varlen with empty sequences and a contiguous cache with per-sequence lengths equal
/// per-sequence calls, bit for bit, with per-token scales cut per sequence.
TYPED_TEST(CacheAttention, VarlenAndCacheEqualPerSequenceCalls) {
  using K = typename TypeParam::key;
  using V = typename TypeParam::value;
  const index_t H = 4, Hk = 2, D = 32;
  const std::vector<std::int32_t> cu_q{0, 3, 3, 80, 81}, cu_k{0, 300, 300, 380, 381};
  const index_t tq = cu_q.back(), tk = cu_k.back();
  const auto q = normal<float>(H * tq * D, 7);
  const auto kc = make_cache<K>(normal<float>(Hk * tk * D, 8), 1, Hk, tk, D, true);
  const auto vc = make_cache<V>(normal<float>(Hk * tk * D, 9), 1, Hk, tk, D, true);
  std::vector<float> out(H * tq * D, -1.f);
  softmax_attention_varlen(bshd<const float>(q.data(), 1, tq, H, D), view_of(kc, 1, Hk, tk, D, true),
                           view_of(vc, 1, Hk, tk, D, true), bshd(out.data(), 1, tq, H, D), cu_q, cu_k,
                           {.causal = true, .k_scale = kc.scale_view, .v_scale = vc.scale_view});
  for (std::size_t b = 0; b + 1 < cu_q.size(); ++b) {
    const index_t q0 = cu_q[b], sq = cu_q[b + 1] - q0, k0 = cu_k[b], sk = cu_k[b + 1] - k0;
    std::vector<float> alone(H * sq * D);
    softmax_attention(slice(bshd<const float>(q.data(), 1, tq, H, D), 2, q0, sq),
                      slice(view_of(kc, 1, Hk, tk, D, true), 2, k0, sk),
                      slice(view_of(vc, 1, Hk, tk, D, true), 2, k0, sk),
                      bhsd(alone.data(), 1, H, sq, D),
                      {.causal = true, .k_scale = scales_of(kc.scale_view, 0, k0, sk),
                       .v_scale = scales_of(vc.scale_view, 0, k0, sk)});
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < sq; ++i)
        ASSERT_EQ(0, std::memcmp(alone.data() + (h * sq + i) * D,
                                 out.data() + ((q0 + i) * H + h) * D, 4 * D))
            << "sequence " << b;
  }
  // a contiguous cache of capacity 400 holding 381, 0 and 120 keys
  const index_t B = 3, capacity = 400, Sq = 2;
  const std::vector<std::int32_t> lens{381, 0, 120};
  const auto kb = make_cache<K>(normal<float>(B * Hk * capacity * D, 10), B, Hk, capacity, D, true);
  const auto vb = make_cache<V>(normal<float>(B * Hk * capacity * D, 11), B, Hk, capacity, D, true);
  const auto qb = normal<float>(B * H * Sq * D, 12);
  std::vector<float> ob(B * H * Sq * D);
  softmax_attention_kvcache(bhsd<const float>(qb.data(), B, H, Sq, D), view_of(kb, B, Hk, capacity, D, true),
                            view_of(vb, B, Hk, capacity, D, true), bhsd(ob.data(), B, H, Sq, D), lens,
                            {.causal = true, .k_scale = kb.scale_view, .v_scale = vb.scale_view});
  for (index_t b = 0; b < B; ++b) {
    std::vector<float> alone(H * Sq * D);
    softmax_attention(slice(bhsd<const float>(qb.data(), B, H, Sq, D), 0, b, 1),
                      slice(slice(view_of(kb, B, Hk, capacity, D, true), 0, b, 1), 2, 0, lens[b]),
                      slice(slice(view_of(vb, B, Hk, capacity, D, true), 0, b, 1), 2, 0, lens[b]),
                      bhsd(alone.data(), 1, H, Sq, D),
                      {.causal = true, .k_scale = scales_of(kb.scale_view, b, 0, lens[b]),
                       .v_scale = scales_of(vb.scale_view, b, 0, lens[b])});
    EXPECT_EQ(0, std::memcmp(alone.data(), ob.data() + b * H * Sq * D, 4 * alone.size()))
        << "cache sequence " << b;
  }
}

/// Each quantized cache gives the bits of the same call on its dequantized values (float
/// K and V): dense prefill and decode, the block-sparse executor, dynamic-mask and HiP
/// attention read dequantized rows in the same tiles (and HiP's search scores them).
TEST(CacheAttention, EveryEngineEqualsItsCallOnDequantizedValues) {
  const index_t H = 4, Hk = 2, D = 64;
  for (const index_t sq : {1, 5, 130}) {
    const index_t sk = 600;
    SCOPED_TRACE("Sq " + std::to_string(sq));
    const auto q = normal<float>(H * sq * D, 20);
    const auto kc = make_cache<block_q8_0>(normal<float>(Hk * sk * D, 21), 1, Hk, sk, D, false);
    const auto vc = make_cache<std::int8_t>(normal<float>(Hk * sk * D, 22), 1, Hk, sk, D, false);
    const auto Q = bhsd<const float>(q.data(), 1, H, sq, D);
    const auto K = view_of(kc, 1, Hk, sk, D, false);
    const auto V = view_of(vc, 1, Hk, sk, D, false);
    const auto Kd = bhsd<const float>(kc.values.data(), 1, Hk, sk, D);
    const auto Vd = bhsd<const float>(vc.values.data(), 1, Hk, sk, D);
    std::vector<float> got(H * sq * D), want(H * sq * D);
    const auto O = bhsd(got.data(), 1, H, sq, D), W = bhsd(want.data(), 1, H, sq, D);
    auto same = [&](const char* what) {
      EXPECT_EQ(0, std::memcmp(got.data(), want.data(), 4 * got.size())) << what;
    };
    softmax_attention(Q, K, V, O, {.causal = true, .v_scale = vc.scale_view});
    softmax_attention(Q, Kd, Vd, W, {.causal = true});
    same("softmax_attention");
    // every other key block of 64, per key/value head
    const index_t blocks = (sk + 63) / 64, rows = Hk * ((sq + 63) / 64);
    std::vector<std::int32_t> offsets{0}, indices;
    for (index_t r = 0; r < rows; ++r) {
      for (index_t b = r % 2; b < blocks; b += 2) indices.push_back(std::int32_t(b));
      offsets.push_back(std::int32_t(indices.size()));
    }
    const block_sparse_layout layout{.heads = Hk, .offsets = offsets, .indices = indices};
    block_sparse_attention(Q, K, V, O, layout, {.causal = true, .v_scale = vc.scale_view});
    block_sparse_attention(Q, Kd, Vd, W, layout, {.causal = true});
    same("block_sparse_attention");
    const auto bias = normal<float>(Hk * sk, 23);
    const auto Bias = view<const float>(bias.data(), {1, Hk, 1, sk});
    dynamic_mask_attention(Q, K, V, O, Bias, {.causal = true, .keep = 100, .v_scale = vc.scale_view});
    dynamic_mask_attention(Q, Kd, Vd, W, Bias, {.causal = true, .keep = 100});
    same("dynamic_mask_attention");
    const hip_options hip{.causal = true, .top_k = 32, .block_size_q = 16, .block_size_k = 4,
                          .sliding_window = 16, .sink_tokens = 4};
    hip_options scaled = hip;
    scaled.v_scale = vc.scale_view;
    EXPECT_EQ(hip_select(Q, K, scaled).starts, hip_select(Q, Kd, hip).starts) << "hip_select";
    hip_attention(Q, K, V, O, scaled);
    hip_attention(Q, Kd, Vd, W, hip);
    same("hip_attention");
  }
}

/// int8 caches with per-channel scales (ONNX Runtime's (Hk, 1, D) k_scale, KIVI's keys):
/// quantize by its definition bit for bit; attention over them equals the same call on
/// their dequantized values bit for bit (prefill and decode, GQA, broadcast channels, row
/// scales or none, varlen, paged, KV cache, block-sparse); bad channel scales are named.
TEST(CacheAttention, PerChannelInt8Scales) {
  const index_t H = 4, Hk = 2, D = 64, Dv = 32, sk = 300;
  auto channels = uniform<float>(Hk * D, 51, 0.05, 3.0);
  const auto C = view<const float>(channels.data(), {Hk, D});
  const auto x = normal<float>(Hk * sk * D, 52);
  const auto X = bhsd<const float>(x.data(), 1, Hk, sk, D);
  std::vector<std::int8_t> k8(Hk * sk * D);
  std::vector<float> k_rows(Hk * sk), kd(Hk * sk * D);
  quantize(X, bhsd(k8.data(), 1, Hk, sk, D), view<float>(k_rows.data(), {1, Hk, sk}), C);
  for (index_t h = 0; h < Hk; ++h)  // the definition: y = x / channel, then int8 rows of y
    for (index_t t = 0; t < sk; ++t) {
      float amax = 0, y[64];
      for (index_t d = 0; d < D; ++d) {
        y[d] = x[(h * sk + t) * D + d] / channels[h * D + d];
        amax = std::max(amax, std::fabs(y[d]));
      }
      const float scale = amax / 127.0f;
      ASSERT_EQ(k_rows[h * sk + t], scale);
      for (index_t d = 0; d < D; ++d)
        ASSERT_EQ(k8[(h * sk + t) * D + d], quantized(y[d], scale));
    }
  const auto K8 = bhsd<const std::int8_t>(k8.data(), 1, Hk, sk, D);
  const auto KS = view<const float>(k_rows.data(), {1, Hk, sk});
  dequantize(K8, bhsd(kd.data(), 1, Hk, sk, D), KS, C);
  // Values: int8 codes with one channel row broadcast over the heads and no row scales.
  const auto v8 = [&] {
    std::vector<std::int8_t> v(Hk * sk * Dv);
    const auto r = normal<float>(v.size(), 53, 40.0);
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = std::int8_t(std::clamp(r[i], -127.f, 127.f));
    return v;
  }();
  const auto v_channels = uniform<float>(Dv, 54, 0.01, 0.05);
  const auto VC = view<const float>(v_channels.data(), {1, Dv});
  const auto V8 = bhsd<const std::int8_t>(v8.data(), 1, Hk, sk, Dv);
  std::vector<float> vd(Hk * sk * Dv);
  dequantize(V8, bhsd(vd.data(), 1, Hk, sk, Dv), {}, VC);
  for (index_t d = 0; d < Dv; ++d) ASSERT_EQ(vd[d], float(v8[d]) * v_channels[d]);
  const auto Kd = bhsd<const float>(kd.data(), 1, Hk, sk, D);
  const auto Vd = bhsd<const float>(vd.data(), 1, Hk, sk, Dv);
  softmax_options o{.causal = true, .k_scale = KS, .k_channel_scale = C, .v_channel_scale = VC};
  for (const index_t sq : {1, 5, 130}) {
    SCOPED_TRACE("Sq " + std::to_string(sq));
    const auto q = normal<float>(H * sq * D, 55);
    const auto Q = bhsd<const float>(q.data(), 1, H, sq, D);
    std::vector<float> got(H * sq * Dv, -1.f), want(got.size(), -2.f);
    const auto O = bhsd(got.data(), 1, H, sq, Dv), W = bhsd(want.data(), 1, H, sq, Dv);
    auto same = [&](const char* what) {
      EXPECT_EQ(0, std::memcmp(got.data(), want.data(), 4 * got.size())) << what;
    };
    softmax_attention(Q, K8, V8, O, o);
    softmax_attention(Q, Kd, Vd, W, {.causal = true});
    same("softmax_attention");
    const std::int32_t cu_q[] = {0, std::int32_t(sq)}, cu_k[] = {0, std::int32_t(sk)};
    softmax_attention_varlen(slice(Q, 0, 0, 1), slice(K8, 0, 0, 1), slice(V8, 0, 0, 1), O, cu_q,
                             cu_k, o);
    same("varlen");
    const std::int32_t lengths[] = {std::int32_t(sk)};
    softmax_attention_kvcache(Q, K8, V8, O, lengths, o);
    same("kvcache");
    const std::vector<std::int32_t> offsets{0, 2, 4}, indices{0, 2, 1, 3};
    const block_sparse_layout layout{.block_q = 256, .block_k = 64, .heads = Hk,
                                     .offsets = offsets, .indices = indices};
    block_sparse_attention(Q, K8, V8, O, layout, o);
    block_sparse_attention(Q, Kd, Vd, W, layout, {.causal = true});
    same("block_sparse_attention");
  }
  // Paged: pages of 50 keys, scrambled; row scales indexed (page, head, slot).
  const index_t page = 50, pages = sk / page;
  std::vector<std::int8_t> kp(pages * Hk * page * D), vp(pages * Hk * page * Dv);
  std::vector<float> kps(pages * Hk * page);
  std::vector<std::int32_t> table(pages);
  for (index_t p = 0; p < pages; ++p) table[p] = std::int32_t((p * 5 + 2) % pages);
  for (index_t p = 0; p < pages; ++p)
    for (index_t h = 0; h < Hk; ++h)
      for (index_t s = 0; s < page; ++s) {
        const index_t t = p * page + s, slot = (table[p] * Hk + h) * page + s;
        std::copy_n(&k8[(h * sk + t) * D], D, &kp[slot * D]);
        std::copy_n(&v8[(h * sk + t) * Dv], Dv, &vp[slot * Dv]);
        kps[slot] = k_rows[h * sk + t];
      }
  const auto q = normal<float>(H * D, 56);
  const auto Q = bhsd<const float>(q.data(), 1, H, 1, D);
  std::vector<float> got(H * Dv), want(H * Dv);
  softmax_options paged = o;
  paged.k_scale = view<const float>(kps.data(), {pages, Hk, page});
  const std::int32_t lengths[] = {std::int32_t(sk)};
  softmax_attention_paged(Q, bhsd<const std::int8_t>(kp.data(), pages, Hk, page, D),
                          bhsd<const std::int8_t>(vp.data(), pages, Hk, page, Dv),
                          bhsd(got.data(), 1, H, 1, Dv),
                          view<const std::int32_t>(table.data(), {1, pages}), lengths, paged);
  softmax_attention(Q, Kd, Vd, bhsd(want.data(), 1, H, 1, Dv), {.causal = true});
  EXPECT_EQ(0, std::memcmp(got.data(), want.data(), 4 * got.size())) << "paged";

  // Bad channel scales: named, nothing written.
  std::vector<float> out(H * Dv, -7.f);
  const auto O = bhsd(out.data(), 1, H, 1, Dv);
  auto expect_error = [&](auto&& call, const char* name) {
    expect_error_naming(call, name, out, -7.f);
  };
  softmax_options bad = o;
  bad.k_channel_scale = view<const float>(channels.data(), {Hk, D - 1});
  expect_error([&] { softmax_attention(Q, K8, V8, O, bad); }, "options.k_channel_scale");
  bad.k_channel_scale = view<const float>(channels.data(), {3, D});
  expect_error([&] { softmax_attention(Q, K8, V8, O, bad); }, "options.k_channel_scale");
  bad.k_channel_scale = view<const float>(channels.data(), {Hk, D / 2}, {D, 2});
  expect_error([&] { softmax_attention(Q, K8, V8, O, bad); }, "options.k_channel_scale");
  bad = o;
  bad.v_channel_scale = {};
  expect_error([&] { softmax_attention(Q, K8, V8, O, bad); }, "options.v_scale");
  expect_error([&] { softmax_attention(Q, Kd, Vd, O, {.k_channel_scale = C}); },
               "options.k_channel_scale");
  // Scales inside out's memory (out would overwrite what it reads): named.
  std::vector<float> shared(H * Dv + Hk * D + Hk * sk, -7.f);
  const auto O2 = bhsd(shared.data(), 1, H, 1, Dv);
  std::copy(channels.begin(), channels.end(), shared.begin() + H * Dv / 2);
  bad = o;
  bad.k_channel_scale = view<const float>(shared.data() + H * Dv / 2, {Hk, D});
  try {
    softmax_attention(Q, K8, V8, O2, bad);
    ADD_FAILURE() << "out over k_channel_scale accepted";
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find("options.k_channel_scale"), std::string::npos);
  }
  bad = o;
  bad.k_scale = view<const float>(shared.data() + 1, {1, Hk, sk});
  try {
    softmax_attention(Q, K8, V8, O2, bad);
    ADD_FAILURE() << "out over k_scale accepted";
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find("options.k_scale"), std::string::npos);
  }
  // quantize writing its scales over the channels it reads; dequantize over its scales
  std::vector<float> both(Hk * sk + Hk * D);
  std::copy(channels.begin(), channels.end(), both.begin());
  std::vector<std::int8_t> codes(k8.size(), 5);
  try {
    quantize(X, bhsd(codes.data(), 1, Hk, sk, D), view<float>(both.data(), {1, Hk, sk}),
             view<const float>(both.data(), {Hk, D}));
    ADD_FAILURE() << "scales over channels accepted";
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find("channels"), std::string::npos) << e.what();
  }
  for (std::int8_t c : codes) ASSERT_EQ(c, 5);
  std::vector<float> dst_and_scales(Hk * sk * D);
  std::copy(k_rows.begin(), k_rows.end(), dst_and_scales.begin());
  try {
    dequantize(K8, bhsd(dst_and_scales.data(), 1, Hk, sk, D),
               view<const float>(dst_and_scales.data(), {1, Hk, sk}), C);
    ADD_FAILURE() << "dst over scales accepted";
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find("scales"), std::string::npos) << e.what();
  }
  channels[3] = 0.f;
  std::vector<std::int8_t> spare(k8.size(), 5);
  try {
    quantize(X, bhsd(spare.data(), 1, Hk, sk, D), view<float>(k_rows.data(), {1, Hk, sk}), C);
    ADD_FAILURE() << "a zero channel scale was accepted";
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find("channels"), std::string::npos) << e.what();
  }
  for (std::int8_t c : spare) ASSERT_EQ(c, 5);
}

/// MLA-shaped decode: H query heads over one key/value head whose rows hold 576 values;
/// V is the first 512 columns of the same rows (two views of one buffer).
TEST(CacheAttention, MlaRowsSharedByKeysAndValues) {
  const index_t Dqk = 576, Dv = 512, sk = 700;
  for (const index_t H : {16, 128}) {
    const auto q = normal<float>(H * Dqk, 24), x = normal<float>(sk * Dqk, 25);
    const std::vector<bfloat16> rows(x.begin(), x.end());
    const std::vector<float> widened(rows.begin(), rows.end());
    std::vector<float> out(H * Dv);
    const auto Q = bhsd<const float>(q.data(), 1, H, 1, Dqk);
    softmax_attention(Q, bhsd<const bfloat16>(rows.data(), 1, 1, sk, Dqk),
                      view<const bfloat16>(rows.data(), {1, 1, sk, Dv}, {sk * Dqk, sk * Dqk, Dqk, 1}),
                      bhsd(out.data(), 1, H, 1, Dv), {.causal = true, .threads = 2});
    const auto Kd = bhsd<const float>(widened.data(), 1, 1, sk, Dqk);
    const auto Vd = view<const float>(widened.data(), {1, 1, sk, Dv}, {sk * Dqk, sk * Dqk, Dqk, 1});
    const auto want = reference_softmax<double>(Q, Kd, Vd, {.causal = true});
    const auto naive = reference_softmax<float>(Q, Kd, Vd, {.causal = true});
    EXPECT_TRUE(within_tolerance<float>(std::vector<double>(out.begin(), out.end()), want.out,
                                        naive.out))
        << "H " << H;
  }
}

/// bf16 and fp16 queries and outputs over a q8_0 cache: within the tolerance plus the
/// rounding of the output.
TEST(CacheAttention, LowPrecisionQueriesOverQ80) {
  const index_t H = 4, Hk = 2, D = 64;
  for (const index_t sq : {1, 70}) {
    const index_t sk = 300;
    const auto qf = normal<float>(H * sq * D, 13);
    std::vector<bfloat16> q(qf.begin(), qf.end()), out(H * sq * D);
    std::vector<float> qr(q.begin(), q.end());
    const auto kc = make_cache<block_q8_0>(normal<float>(Hk * sk * D, 14), 1, Hk, sk, D, false);
    const auto vc = make_cache<block_q8_0>(normal<float>(Hk * sk * D, 15), 1, Hk, sk, D, false);
    softmax_attention(bhsd<const bfloat16>(q.data(), 1, H, sq, D), view_of(kc, 1, Hk, sk, D, false),
                      view_of(vc, 1, Hk, sk, D, false), bhsd(out.data(), 1, H, sq, D), {.causal = true});
    const auto Q = bhsd<const float>(qr.data(), 1, H, sq, D);
    const auto Kd = bhsd<const float>(kc.values.data(), 1, Hk, sk, D);
    const auto Vd = bhsd<const float>(vc.values.data(), 1, Hk, sk, D);
    const auto want = reference_softmax<double>(Q, Kd, Vd, {.causal = true});
    const auto naive = reference_softmax<float>(Q, Kd, Vd, {.causal = true});
    EXPECT_TRUE(within_tolerance<float>(std::vector<double>(out.begin(), out.end()), want.out,
                                        naive.out, 1.0 / 256));
  }
}

// ---- q8_0 integer products (softmax_options::q8_0_products) -----------------------------

/// Bits of a float, with every NaN the same (NaN payloads are not part of the definition).
std::uint32_t bits_of(float x) {
  if (x != x) return 0x7FC00000u;
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

/// The decode logits of q8_0_scores (16 keys at once with AVX512-VNNI on an AVX-512
/// backend, one at a time on the others) are the definition in score_q8_0.hpp bit for bit:
/// key counts around the 16-key groups, column counts, head dims, contiguous and paged rows
/// (scrambled table, pages of 8), zero, subnormal, huge and NaN block scales, zero query
/// blocks.
template <class Backend>
void expect_q8_0_logits_are_the_definition() {
  const index_t ld = 256;
  std::uint64_t seed = 70;
  for (const index_t D : {32, 96, 128})
    for (const index_t keys : {1, 15, 16, 17, 50, 256})
      for (const index_t columns : {1, 4, 7})
        for (const int layout : {0, 1, 2}) {  // contiguous, paged, reversed (a negative stride)
          const bool paged = layout == 1;
          SCOPED_TRACE("D " + std::to_string(D) + " keys " + std::to_string(keys) + " columns " +
                       std::to_string(columns) + (paged ? " paged" : layout == 2 ? " reversed" : ""));
          const index_t blocks = D / 32, page = 8, pages = (keys + page - 1) / page;
          auto x = normal<float>(pages * page * D, ++seed, 3.0);
          std::vector<block_q8_0> rows(pages * page * blocks);
          quantize(bhsd<const float>(x.data(), 1, 1, pages * page, D),
                   bhsd(rows.data(), 1, 1, pages * page, D));
          rows[0].d = half(0.0f);  // a zero scale, then subnormal, huge and NaN ones
          if (rows.size() > 5) rows[5].d = half(3e-6f);
          if (rows.size() > 9) rows[9].d = half(60000.0f);
          if (rows.size() > 40) rows[40].d = half(nan_f);
          if (rows.size() > 22) rows[22].d = half(HUGE_VALF);  // beyond q8_0's range: NaN
          if (rows.size() > 3)  // -128 (which quantize never writes) against full-scale queries
            std::fill(rows[3].qs, rows[3].qs + 32, std::int8_t(-128));
          auto qx = normal<float>(columns * D, ++seed);
          std::fill(qx.begin(), qx.begin() + 32, 0.0f);  // column 0's first block: zeros
          std::vector<block_q8_0> q_rows(columns * blocks);
          std::vector<float> q_scales(columns * blocks);
          std::vector<std::int32_t> q_sums(columns * blocks);
          detail::quantize_queries_q8_0<default_backend>(qx.data(), D, columns, D, q_rows.data(), q_scales.data(),
                                        q_sums.data());
          const detail::q8_0_queries q{q_rows.data(), q_scales.data(), q_sums.data(), blocks};
          std::vector<std::int32_t> table(pages);
          for (index_t p = 0; p < pages; ++p) table[p] = std::int32_t((p * 5 + 2) % pages);
          detail::kv_source<block_q8_0> kv{.k = rows.data(), .v = rows.data(), .k_stride = blocks,
                                           .v_stride = blocks};
          if (paged) {  // slot s of page p at rows[(p * page + s) * blocks]
            kv.k_page_stride = kv.v_page_stride = page * blocks;
            kv.pages = table.data();
            kv.page_size = page;
          }
          if (layout == 2) {  // key j at rows[(keys - 1 - j) * blocks]
            kv.k = kv.v = rows.data() + (keys - 1) * blocks;
            kv.k_stride = kv.v_stride = -blocks;
          }
          std::vector<float> s(columns * ld, -7.0f);
          detail::q8_0_scores<Backend>(kv, 0, keys, q, columns, s.data(), ld,
                                       detail::spread_prefetch<block_q8_0, block_q8_0, 16>(
                                           kv, 16, keys, D, D, true, false));
          for (index_t c = 0; c < columns; ++c)
            for (index_t j = 0; j < keys; ++j) {
              const float want = detail::q8_0_logit(kv.k_row(j), q_rows.data() + c * blocks,
                                                    q_scales.data() + c * blocks, blocks);
              ASSERT_EQ(bits_of(s[c * ld + j]), bits_of(want)) << "column " << c << " key " << j;
            }
        }
}

TEST(Q8_0Products, LogitsAreTheDefinitionBitwise) {
  expect_q8_0_logits_are_the_definition<default_backend>();
  expect_q8_0_logits_are_the_definition<scalar>();
}

/// Decode's query quantization (blocks rounded in vector lanes) writes fovea::quantize's
/// bytes, with its scales (NaN unless finite) and block sums: random blocks, zeros, exact
/// halves (ties to even), a NaN or Inf in any lane, scales whose reciprocal overflows, and
/// blocks whose scale exceeds fp16.
template <class Backend>
void expect_quantized_queries_are_quantize() {
  const index_t D = 256, blocks = D / 32, columns = 5;
  auto x = normal<float>(columns * D, 77);
  for (index_t i = 0; i < 32; ++i) x[32 + i] = 0.0f;                          // zeros
  for (index_t i = 0; i < 32; ++i) x[64 + i] = float(i - 16) * 0.5f;          // halves: ties
  x[96 + 31] = 127.0f;                                                         // d = 1 exactly
  x[128 + 17] = std::numeric_limits<float>::quiet_NaN();
  x[160 + 0] = -INFINITY;
  for (index_t i = 0; i < 32; ++i) x[192 + i] = 1e-38f * float(i % 5);         // tiny scale
  for (index_t i = 0; i < 32; ++i) x[224 + i] = 1e7f * float(i - 3);          // d beyond fp16
  for (index_t c = 1; c < columns; ++c)
    for (index_t lane = 0; lane < 32; lane += 7) x[c * D + (c % blocks) * 32 + lane] *= 1e30f;
  std::vector<block_q8_0> got(columns * blocks), want(columns * blocks);
  std::vector<float> scales(columns * blocks);
  std::vector<std::int32_t> sums(columns * blocks);
  detail::quantize_queries_q8_0<Backend>(x.data(), D, columns, D, got.data(), scales.data(), sums.data());
  quantize(bhsd<const float>(x.data(), 1, 1, columns, D), bhsd(want.data(), 1, 1, columns, D));
  for (index_t i = 0; i < columns * blocks; ++i) {
    ASSERT_EQ(std::memcmp(&got[i], &want[i], sizeof(block_q8_0)), 0) << "block " << i;
    const float d = float(want[i].d);
    ASSERT_EQ(bits_of(scales[i]), bits_of(std::isfinite(d) ? d : std::numeric_limits<float>::quiet_NaN()))
        << "block " << i;
    std::int32_t sum = 0;
    for (auto v : want[i].qs) sum += v;
    ASSERT_EQ(sums[i], sum) << "block " << i;
  }
}

TEST(Q8_0Products, QueriesQuantizeAsTheCacheDoes) {
  expect_quantized_queries_are_quantize<default_backend>();
  expect_quantized_queries_are_quantize<scalar>();
}

#if FOVEA_HAS_QUANTIZED_VALUES
/// Decode's P V over quantized value rows converted in registers equals the staged path
/// (dequantize_row into a buffer, then gemm_wide) bit for bit, for q8_0 blocks, int8 rows
/// with a scale each (and with per-column scales), e4m3 and e5m2 rows with one scale
/// (AVX-512): column counts 1 to 9, odd group counts, rows from anywhere, huge scales (and
/// fp8 NaN codes, which reach the sums).
template <class S, bool Channels = false>
void expect_quantized_values_are_the_staged_path() {
  using B = simd<>;
  std::uint64_t seed = 90;
  for (const index_t Dv : {32, 96, 128, 512})
    for (const index_t columns : {1, 3, 4, 5, 9})
      for (const index_t keys : {1, 7, 32}) {
        SCOPED_TRACE("Dv " + std::to_string(Dv) + " columns " + std::to_string(columns) +
                     " keys " + std::to_string(keys));
        const index_t per_row = Dv / values_per_element<S>::value, ld = 40;
        auto x = normal<float>(2 * keys * Dv, ++seed);
        std::vector<S> v(2 * keys * per_row);
        std::vector<float> row_scales(2 * keys, 0.02f);
        const auto X = bhsd<const float>(x.data(), 1, 1, 2 * keys, Dv);
        const auto dst = bhsd(v.data(), 1, 1, 2 * keys, Dv);
        if constexpr (std::is_same_v<S, block_q8_0>) {
          quantize(X, dst);
          v[per_row].d = half(65000.0f);
        } else if constexpr (std::is_same_v<S, std::int8_t>) {
          quantize(X, dst, view(row_scales.data(), {1, 1, 2 * keys}));
          row_scales[1] = 3e30f;
        } else {
          quantize(X, dst, view<const float>(row_scales.data(), {1, 1, 1}, {0, 0, 0}));
          std::memset(&v[Dv + 5], 0x7F, 1);  // a NaN code in row 1
        }
        std::vector<const S*> rows(keys);
        std::vector<float> scales(keys);
        for (index_t j = 0; j < keys; ++j) {
          const index_t at = (j * 7) % (2 * keys);
          rows[j] = v.data() + at * per_row;
          scales[j] = row_scales[std::is_same_v<S, std::int8_t> ? at : 0];
        }
        const auto p = uniform<float>(columns * ld, ++seed, 0.0, 1.0);
        const auto start = normal<float>(columns * Dv, ++seed);
        std::vector<float> fused = start, staged = start, stage(keys * Dv);
        std::vector<float> channels;  // int8 with Channels: a scale per column
        if (Channels)
          for (index_t d = 0; d < Dv; ++d) channels.push_back(0.25f + float(d % 9) / 8);
        detail::quantized_values<B>(rows.data(), scales.data(), keys, Dv, p.data(), ld, columns,
                                    fused.data(), Dv, Channels ? channels.data() : nullptr);
        for (index_t j = 0; j < keys; ++j)
          if constexpr (std::is_same_v<S, std::int8_t>) {
            if (Channels)
              detail::dequantize_row(rows[j], scales[j], channels.data(), stage.data() + j * Dv, Dv);
            else
              detail::dequantize_row(rows[j], scales[j], stage.data() + j * Dv, Dv);
          } else {
            detail::dequantize_row(rows[j], scales[j], stage.data() + j * Dv, Dv);
          }
        detail::gemm_wide<float, B, 2, 8, true>(columns, Dv / detail::vec<float, B>::width, p.data(), ld, 1,
                                                stage.data(), Dv, staged.data(), Dv, keys);
        for (std::size_t i = 0; i < fused.size(); ++i)
          ASSERT_TRUE(bits_of(fused[i]) == bits_of(staged[i]) || (std::isnan(fused[i]) && std::isnan(staged[i])))
              << i << ": " << fused[i] << " vs " << staged[i];
      }
}

TEST(QuantizedValues, EqualTheStagedPathBitwise) {
  expect_quantized_values_are_the_staged_path<block_q8_0>();
  expect_quantized_values_are_the_staged_path<std::int8_t>();
  expect_quantized_values_are_the_staged_path<std::int8_t, true>();
  if constexpr (detail::quantized_in_registers<float, simd<>, e4m3>()) {  // (AVX-512)
    expect_quantized_values_are_the_staged_path<e4m3>();
    expect_quantized_values_are_the_staged_path<e5m2>();
  }
}
#endif

/// Decode over q8_0, int8 and fp8 keys (converted in registers where the rows are whole
/// vectors and fp8's head has one scale; staged otherwise) equals decode over their
/// dequantized values bit for bit: head dims 16/64/128 and 40 (the staged case; q8_0:
/// 32/64/128/96), per-head and per-token scales (int8: per row, with and without
/// per-channel scales), both layouts, Sq 1 and
/// 3 (causal: masked tiles), Sk around the tiles, GQA 4, a NaN code (fp8), block scale
/// (q8_0) or row scale (int8) in one head's keys (the other head's outputs stay numbers,
/// both paths give the same NaN).
template <class S>
void expect_quantized_keys_are_their_values() {
  constexpr bool q8 = std::is_same_v<S, block_q8_0>;
  const index_t B = 1, H = 8, Hk = 2;
  for (const index_t D : q8 ? std::vector<index_t>{32, 64, 128, 96} : std::vector<index_t>{16, 64, 128, 40})
    for (const index_t sk : {1, 300, 600})
      for (const index_t sq : {1, 3})
        for (const bool bshd_layout : {false, true})
          for (const bool per_token : {false, true}) {
            constexpr bool int8 = std::is_same_v<S, std::int8_t>;
            if (q8 && per_token) continue;  // (q8_0 carries its scales in its blocks)
            const bool channels = int8 && !per_token;  // int8: per row, with or without per-channel scales
            SCOPED_TRACE("D " + std::to_string(D) + " Sk " + std::to_string(sk) + " Sq " +
                         std::to_string(sq) + (bshd_layout ? " bshd" : " bhsd") +
                         (per_token ? " per-token scales" : channels ? " channel scales" : " per-head scales"));
            const auto x = normal<float>(B * Hk * sk * D, 40 + D + sk);
            std::vector<S> codes(q8 ? x.size() / block_q8_0::size : x.size());
            std::vector<float> scales;
            for (index_t h = 0; h < Hk; ++h)
              for (index_t t = 0; t < (per_token ? sk : 1); ++t) scales.push_back(0.01f * float(h + 1) + 1e-4f * float(t % 7));
            if (int8) scales.resize(std::size_t(Hk * sk));
            const auto scale = per_token || int8 ? view<const float>(scales.data(), {1, Hk, sk})
                                                 : view<const float>(scales.data(), {1, Hk, 1});
            std::vector<float> column_scales(std::size_t(Hk * D));
            for (std::size_t i = 0; i < column_scales.size(); ++i) column_scales[i] = 0.5f + float(i % 5) / 4;
            const auto column_scale = channels ? view<const float>(column_scales.data(), {Hk, D})
                                               : tensor_view<const float, 2>{};
            const auto X = bhsd<const float>(x.data(), B, Hk, sk, D);
            const auto K = bshd_layout ? bshd(codes.data(), B, sk, Hk, D) : bhsd(codes.data(), B, Hk, sk, D);
            const tensor_view<const float, 3> no_scale{};
            const auto key_scale = q8 ? no_scale : scale;
            if constexpr (q8)
              quantize(X, K);
            else if constexpr (int8) {  // (the scales made)
              if (channels)
                quantize(X, K, view<float>(scales.data(), {1, Hk, sk}), column_scale);
              else
                quantize(X, K, view<float>(scales.data(), {1, Hk, sk}));
            }
            else
              quantize(X, K, scale);
            if (sk > 200) {  // head 1, mid-tile, the last lane (fp8), block (q8_0) or row's scale (int8)
              if constexpr (int8) {
                scales[std::size_t(sk + 137)] = std::numeric_limits<float>::quiet_NaN();
              } else if constexpr (q8) {
                const index_t blocks = D / block_q8_0::size, token = bshd_layout ? 137 * Hk + 1 : sk + 137;
                codes[std::size_t(token * blocks + blocks - 1)].d = half(std::numeric_limits<float>::quiet_NaN());
              } else {
                K(0, 1, 137, D - 1).bits = std::is_same_v<S, e4m3> ? 0xFF : 0x7E;
              }
            }
            std::vector<float> keys(x.size());
            const auto dequantized = bhsd(keys.data(), B, Hk, sk, D);
            if constexpr (q8)
              dequantize(tensor_view<const S, 4>(K), dequantized);
            else if constexpr (int8)
              dequantize(tensor_view<const S, 4>(K), dequantized, scale, column_scale);
            else
              dequantize(tensor_view<const S, 4>(K), dequantized, scale);
            const auto q = normal<float>(B * H * sq * D, 41), v = normal<float>(B * Hk * sk * D, 42);
            const auto Q = bhsd<const float>(q.data(), B, H, sq, D);
            const auto V = bhsd<const float>(v.data(), B, Hk, sk, D);
            std::vector<float> got(B * H * sq * D), want(got.size());
            softmax_attention(Q, tensor_view<const S, 4>(K), V, bhsd(got.data(), B, H, sq, D),
                              {.causal = true, .k_scale = key_scale, .k_channel_scale = column_scale});
            softmax_attention(Q, bhsd<const float>(keys.data(), B, Hk, sk, D), V,
                              bhsd(want.data(), B, H, sq, D), {.causal = true});
            EXPECT_EQ(0, std::memcmp(got.data(), want.data(), 4 * got.size()));
            EXPECT_TRUE(std::isfinite(got[0]));  // head 0 (no NaN key)
          }
}

TEST(CacheAttention, QuantizedKeysEqualTheirDequantizedValuesBitwise) {
  expect_quantized_keys_are_their_values<block_q8_0>();
  expect_quantized_keys_are_their_values<std::int8_t>();
  expect_quantized_keys_are_their_values<e4m3>();
  expect_quantized_keys_are_their_values<e5m2>();
}

/// A query row quantized to q8_0 and read back: the query the q8_0 products score.
std::vector<float> q8_0_rounded(const std::vector<float>& q, index_t rows, index_t D) {
  std::vector<block_q8_0> blocks(q.size() / 32);
  std::vector<float> back(q.size());
  quantize(bhsd<const float>(q.data(), 1, 1, rows, D), bhsd(blocks.data(), 1, 1, rows, D));
  dequantize(bhsd<const block_q8_0>(blocks.data(), 1, 1, rows, D), bhsd(back.data(), 1, 1, rows, D));
  return back;
}

/// Decode with q8_0_products equals the f64 oracle on q rounded to q8_0 and the
/// dequantized cache, under the tolerance rule: GQA 1/4/8 and 64 stacked columns (which
/// would take the prefill tile without the option), Sq 1 and 3, Sk around the 16-key groups
/// and the chunks, both layouts, causal or not, q8_0 and bf16 values; 1 and 2 threads
/// bitwise; paged bitwise equal to contiguous. Prefill (Sq > 16) is the call without the
/// option, bit for bit.
TEST(Q8_0Products, DecodeMatchesTheOracleOnQuantizedQueries) {
  for (const auto s : {shape_case{1, 8, 8, 1, 1, 64, 64}, shape_case{2, 8, 2, 1, 17, 64, 32},
                       shape_case{1, 8, 1, 3, 513, 128, 128}, shape_case{1, 64, 1, 1, 300, 32, 32},
                       shape_case{1, 32, 8, 1, 4099, 128, 128}, shape_case{1, 4, 1, 40, 150, 64, 64}})
    for (const bool layout : {false, true})
      for (const bool causal : {false, true})
        for (const bool bf16_values : {false, true}) {
          SCOPED_TRACE("H " + std::to_string(s.H) + " Hk " + std::to_string(s.Hk) + " Sq " +
                       std::to_string(s.Sq) + " Sk " + std::to_string(s.Sk) + " D " +
                       std::to_string(s.D) + (layout ? " bshd" : " bhsd") +
                       (causal ? " causal" : "") + (bf16_values ? " bf16 values" : ""));
          const auto q = normal<float>(s.B * s.H * s.Sq * s.D, 21, 2.0);
          const auto kc = make_cache<block_q8_0>(normal<float>(s.B * s.Hk * s.Sk * s.D, 22), s.B,
                                                 s.Hk, s.Sk, s.D, layout);
          const auto vx = normal<float>(s.B * s.Hk * s.Sk * s.Dv, 23);
          const auto Q = bhsd<const float>(q.data(), s.B, s.H, s.Sq, s.D);
          const auto K = view_of(kc, s.B, s.Hk, s.Sk, s.D, layout);
          std::vector<float> out(s.B * s.H * s.Sq * s.Dv), serial, plain(out.size());
          std::vector<float> values;
          auto run = [&](const auto& vc, softmax_options o, std::vector<float>& dst) {
            softmax_attention(Q, K, view_of(vc, s.B, s.Hk, s.Sk, s.Dv, layout),
                              bhsd(dst.data(), s.B, s.H, s.Sq, s.Dv), o);
          };
          auto calls = [&](const auto& vc) {
            values = vc.values;
            for (const int threads : {1, 2}) {
              run(vc, {.causal = causal, .q8_0_products = true, .threads = threads}, out);
              if (threads == 1) serial = out;
            }
            run(vc, {.causal = causal, .threads = 1}, plain);
          };
          if (bf16_values)
            calls(make_cache<bfloat16>(vx, s.B, s.Hk, s.Sk, s.Dv, layout));
          else
            calls(make_cache<block_q8_0>(vx, s.B, s.Hk, s.Sk, s.Dv, layout));
          EXPECT_EQ(0, std::memcmp(serial.data(), out.data(), 4 * out.size())) << "thread variant";
          if (s.Sq > detail::decode_max_queries) {
            EXPECT_EQ(0, std::memcmp(plain.data(), out.data(), 4 * out.size())) << "prefill";
            continue;
          }
          const auto qr = q8_0_rounded(q, s.B * s.H * s.Sq, s.D);
          const auto Qr = bhsd<const float>(qr.data(), s.B, s.H, s.Sq, s.D);
          const auto Kd = bhsd<const float>(kc.values.data(), s.B, s.Hk, s.Sk, s.D);
          const auto Vd = bhsd<const float>(values.data(), s.B, s.Hk, s.Sk, s.Dv);
          const softmax_options ref{.causal = causal};
          const auto want = reference_softmax<double>(Qr, Kd, Vd, ref);
          const auto naive = reference_softmax<float>(Qr, Kd, Vd, ref);
          EXPECT_TRUE(within_tolerance<float>(std::vector<double>(out.begin(), out.end()),
                                              want.out, naive.out));
          // and it is not the call without the option (q is rounded; one key gives its value)
          if (s.Sk > 1) {
            EXPECT_NE(0, std::memcmp(plain.data(), out.data(), 4 * out.size()));
          }
        }
}

/// q8_0_products over a paged cache (scrambled table) is the contiguous call bit for bit;
/// a NaN block scale poisons the rows that see it and nothing else; a NaN in q poisons its
/// row; a masked key's NaN scale changes nothing.
TEST(Q8_0Products, PagedNanAndMasks) {
  const index_t H = 8, Hk = 2, D = 64, page = 16, pages = 48, sk = 700;
  const auto q = normal<float>(H * D, 31);
  const auto kx = normal<float>(Hk * sk * D, 32), vx = normal<float>(Hk * sk * D, 33);
  auto kc = make_cache<block_q8_0>(kx, 1, Hk, sk, D, false);
  const auto vc = make_cache<block_q8_0>(vx, 1, Hk, sk, D, false);
  std::vector<std::int32_t> table(pages);
  for (index_t p = 0; p < pages; ++p) table[p] = std::int32_t((p * 7 + 3) % pages);
  std::vector<block_q8_0> kp(pages * page * Hk * D / 32), vp(pages * page * Hk * D / 32);
  const auto KP = paged_nhd(kp.data(), pages, page, Hk, D);
  const auto VP = paged_nhd(vp.data(), pages, page, Hk, D);
  const std::vector<std::int32_t> zero{0}, lens{std::int32_t(sk)};
  append_kv_paged(bhsd<const float>(kx.data(), 1, Hk, sk, D), bhsd<const float>(vx.data(), 1, Hk, sk, D),
                  KP, VP, view<const std::int32_t>(table.data(), {1, pages}), zero);
  const auto Q = bhsd<const float>(q.data(), 1, H, 1, D);
  std::vector<float> contiguous(H * D), paged(H * D);
  const softmax_options o{.q8_0_products = true};
  softmax_attention(Q, view_of(kc, 1, Hk, sk, D, false), view_of(vc, 1, Hk, sk, D, false),
                    bhsd(contiguous.data(), 1, H, 1, D), o);
  softmax_attention_paged(Q, tensor_view<const block_q8_0, 4>(KP), tensor_view<const block_q8_0, 4>(VP),
                          bhsd(paged.data(), 1, H, 1, D),
                          view<const std::int32_t>(table.data(), {1, pages}), lens, o);
  EXPECT_EQ(0, std::memcmp(contiguous.data(), paged.data(), 4 * paged.size()));

  // key 650 of kv head 1: a NaN or infinite scale in its second block (an infinite one
  // counts as NaN: its dequantized values, 0 * inf among them, would poison the logit too)
  std::vector<float> out(H * D);
  std::vector<std::uint8_t> keep(sk, 1);
  for (const float bad : {nan_f, HUGE_VALF, -HUGE_VALF})
  for (const bool masked : {false, true}) {
    kc.data[(1 * sk + 650) * (D / 32) + 1].d = half(bad);
    keep[650] = masked ? 0 : 1;
    softmax_attention(Q, view_of(kc, 1, Hk, sk, D, false), view_of(vc, 1, Hk, sk, D, false),
                      bhsd(out.data(), 1, H, 1, D),
                      {.mask = view<const std::uint8_t>(keep.data(), {1, 1, 1, sk}, {0, 0, 0, 1}),
                       .q8_0_products = true});
    for (index_t h = 0; h < H; ++h)
      for (index_t d = 0; d < D; ++d) {
        const bool poisoned = !masked && h >= 4;  // the query heads of kv head 1
        ASSERT_EQ(std::isnan(out[h * D + d]), poisoned)
            << "head " << h << " scale " << bad << (masked ? " masked" : "");
      }
  }
  kc.data[(1 * sk + 650) * (D / 32) + 1].d = half(1.0f);
  auto qn = q;
  qn[2 * D + 40] = nan_f;  // head 2's query
  softmax_attention(bhsd<const float>(qn.data(), 1, H, 1, D), view_of(kc, 1, Hk, sk, D, false),
                    view_of(vc, 1, Hk, sk, D, false), bhsd(out.data(), 1, H, 1, D), o);
  for (index_t h = 0; h < H; ++h)
    EXPECT_EQ(std::isnan(out[h * D]), h == 2) << "head " << h;
  // a query block beyond q8_0's range (|q| > 65504 * 127: its fp16 scale is infinite)
  // poisons its row, as its dequantized values would; it does not look masked
  qn = q;
  qn[5 * D + 3] = 2e7f;
  softmax_attention(bhsd<const float>(qn.data(), 1, H, 1, D), view_of(kc, 1, Hk, sk, D, false),
                    view_of(vc, 1, Hk, sk, D, false), bhsd(out.data(), 1, H, 1, D), o);
  for (index_t h = 0; h < H; ++h)
    EXPECT_EQ(std::isnan(out[h * D]), h == 5) << "head " << h;
}

/// A NaN block scale (q8_0) or row scale (int8) poisons the rows that see its key, on
/// both paths; hidden by the causal band, it leaks nowhere.
TEST(CacheAttention, NanScalesPoisonTheRowsThatSeeThem) {
  const index_t H = 2, Hk = 1, D = 64, sk = 600;
  for (const index_t sq : {1, 4, 80}) {
    const auto q = normal<float>(H * sq * D, 16);
    auto kc = make_cache<block_q8_0>(normal<float>(Hk * sk * D, 17), 1, Hk, sk, D, false);
    auto vc = make_cache<std::int8_t>(normal<float>(Hk * sk * D, 18), 1, Hk, sk, D, false);
    const index_t bad_key = sk - 2;  // seen by the last two queries only (causal)
    kc.data[bad_key * D / 32 + 1].d = half(nan_f);
    std::vector<float> out(H * sq * D);
    softmax_attention(bhsd<const float>(q.data(), 1, H, sq, D), view_of(kc, 1, Hk, sk, D, false),
                      view_of(vc, 1, Hk, sk, D, false), bhsd(out.data(), 1, H, sq, D),
                      {.causal = true, .v_scale = vc.scale_view});
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < sq; ++i)
        for (index_t d = 0; d < D; ++d)
          ASSERT_EQ(std::isnan(out[(h * sq + i) * D + d]), i >= sq - 2) << sq << " " << i;
    vc.scales[sk - 1] = nan_f;  // the last key's value row: the last query only
    kc = make_cache<block_q8_0>(normal<float>(Hk * sk * D, 17), 1, Hk, sk, D, false);
    softmax_attention(bhsd<const float>(q.data(), 1, H, sq, D), view_of(kc, 1, Hk, sk, D, false),
                      view_of(vc, 1, Hk, sk, D, false), bhsd(out.data(), 1, H, sq, D),
                      {.causal = true, .v_scale = vc.scale_view});
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < sq; ++i)
        ASSERT_EQ(std::isnan(out[(h * sq + i) * D]), i == sq - 1) << sq << " " << i;
  }
}

/// Appending to a q8_0 cache stores what quantize stores; an append to int8 writes the
/// scales of the new rows.
TEST(CacheAttention, AppendQuantizesLikeQuantize) {
  const index_t B = 2, Hk = 2, D = 32, capacity = 10, n = 3;
  const auto x = normal<float>(B * Hk * n * D, 19);
  const auto X = bhsd<const float>(x.data(), B, Hk, n, D);
  std::vector<block_q8_0> direct(B * Hk * n * D / 32), cache(B * capacity * Hk * D / 32);
  quantize(X, bhsd(direct.data(), B, Hk, n, D));
  const std::vector<std::int32_t> lens{4, 7};
  const auto C = bshd(cache.data(), B, capacity, Hk, D);
  append_kv(X, X, C, bshd(std::vector<block_q8_0>(cache.size()).data(), B, capacity, Hk, D), lens);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < Hk; ++h)
      for (index_t r = 0; r < n; ++r)
        ASSERT_EQ(0, std::memcmp(C.ptr(b, h, lens[b] + r, 0),
                                 direct.data() + ((b * Hk + h) * n + r), sizeof(block_q8_0)));
  std::vector<std::int8_t> k8(B * Hk * capacity * D), v8(k8.size());
  std::vector<float> ks(B * Hk * capacity, -1.f), vs(ks.size(), -1.f);
  append_kv(X, X, bhsd(k8.data(), B, Hk, capacity, D), bhsd(v8.data(), B, Hk, capacity, D), lens,
            {.k = view(ks.data(), {B, Hk, capacity}), .v = view(vs.data(), {B, Hk, capacity})});
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < Hk; ++h)
      for (index_t t = 0; t < capacity; ++t) {
        const bool written = t >= lens[b] && t < lens[b] + n;
        EXPECT_EQ(ks[(b * Hk + h) * capacity + t] != -1.f, written);
      }
}

TEST(CacheAttention, BadInputNamesTheArgumentAndWritesNothing) {
  const index_t H = 2, Hk = 1, S = 8;
  std::vector<float> q(H * S * 64), out(H * S * 64, 5.f);
  std::vector<block_q8_0> kq(Hk * S * 64 / 32), vq(Hk * S * 64 / 32);
  std::vector<std::int8_t> k8(Hk * S * 64);
  std::vector<e4m3> k4(Hk * S * 64);
  const std::vector<float> scales(Hk * S, 1.f);
  const float inf = HUGE_VALF;
  auto expect_error = [&](auto&& call, const std::string& name) {
    try {
      call();
      ADD_FAILURE() << "no error for " << name;
    } catch (const error& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
    for (float x : out) ASSERT_EQ(x, 5.f);
  };
  const auto Q = bhsd<const float>(q.data(), 1, H, S, 64);
  const auto O = bhsd(out.data(), 1, H, S, 64);
  const auto Kq = bhsd<const block_q8_0>(kq.data(), 1, Hk, S, 64);
  expect_error(  // D = 48: not whole blocks
      [&] {
        softmax_attention(bhsd<const float>(q.data(), 1, H, S, 48), bhsd<const block_q8_0>(kq.data(), 1, Hk, S, 48),
                          bhsd<const block_q8_0>(vq.data(), 1, Hk, S, 48), bhsd(out.data(), 1, H, S, 48));
      },
      "k: extent 3");
  expect_error(  // a stride of half a block
      [&] {
        softmax_attention(Q, view<const block_q8_0>(kq.data(), {1, Hk, S, 64}, {Hk * S * 64, S * 64, 48, 1}),
                          Kq, O);
      },
      "k: stride 2");
  expect_error([&] { softmax_attention(Q, bhsd<const std::int8_t>(k8.data(), 1, Hk, S, 64), Kq, O); },
               "options.k_scale");
  expect_error(
      [&] {
        softmax_attention(Q, bhsd<const e4m3>(k4.data(), 1, Hk, S, 64), Kq, O,
                          {.k_scale = view<const float>(&inf, {1, 1, 1})});
      },
      "options.k_scale");
  expect_error(
      [&] {
        softmax_attention(Q, bhsd<const std::int8_t>(k8.data(), 1, Hk, S, 64), Kq, O,
                          {.k_scale = view<const float>(scales.data(), {1, Hk, S - 1})});
      },
      "options.k_scale: extent 2");
  expect_error(
      [&] {
        softmax_attention(Q, Kq, Kq, O, {.v_scale = view<const float>(scales.data(), {1, Hk, S})});
      },
      "options.v_scale");
  expect_error(
      [&] {
        quantize(bhsd<const float>(q.data(), 1, Hk, S, 64), bhsd(kq.data(), 1, Hk, S - 1, 64));
      },
      "cache: extent 2");
  // HiP's search and attention check the caches as softmax_attention does
  const auto K8 = bhsd<const std::int8_t>(k8.data(), 1, Hk, S, 64);
  expect_error([&] { hip_select(Q, K8); }, "options.k_scale");
  expect_error([&] { hip_attention(Q, K8, Kq, O); }, "options.k_scale");
  expect_error([&] { hip_attention(Q, Kq, K8, O); }, "options.v_scale");
  expect_error(
      [&] { hip_select(Q, K8, {.k_scale = view<const float>(scales.data(), {1, Hk, S - 1})}); },
      "options.k_scale: extent 2");
  expect_error(
      [&] {
        hip_select(bhsd<const float>(q.data(), 1, H, S, 48),
                   bhsd<const block_q8_0>(kq.data(), 1, Hk, S, 48));
      },
      "k: extent 3");
  // q and out of different types do not compile
  static_assert(!detail::mixed_attention_types<const float, const block_q8_0, const block_q8_0, bfloat16>);
  static_assert(!detail::mixed_attention_types<const double, const block_q8_0, const block_q8_0, double>);
  static_assert(detail::mixed_attention_types<const half, const e5m2, const std::int8_t, half>);
}

}  // namespace fovea::test::cache_types_test
