// One softmax-attention test case: shapes + a set of features, the inputs they need,
// and a check of fovea's output (and lse) against the f64 oracle under the tolerance rule.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <fovea/fovea.hpp>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "random.hpp"
#include "reference.hpp"
#include "tolerance.hpp"

namespace fovea::test {

namespace feature {
enum : unsigned {
  causal = 1u << 0,
  top_left = 1u << 1,
  window = 1u << 2,
  bias = 1u << 3,
  mask = 1u << 4,
  alibi = 1u << 5,
  softcap = 1u << 6,
  sinks = 1u << 7,
  lse = 1u << 8,
  score_mod = 1u << 9,
  mask_mod = 1u << 10,
  scale = 1u << 11,
  bshd = 1u << 12,
};
}  // namespace feature
inline constexpr unsigned all_features = (1u << 13) - 1;

inline std::string feature_names(unsigned f) {
  static const char* names[] = {"causal",   "top_left", "window", "bias", "mask",
                                "alibi",    "softcap",  "sinks",  "lse",  "score_mod",
                                "mask_mod", "scale",    "bshd"};
  std::string s;
  for (unsigned i = 0; i < 13; ++i)
    if (f & (1u << i)) s += std::string(s.empty() ? "" : "+") + names[i];
  return s.empty() ? "plain" : s;
}

struct shape {
  index_t B = 1, H = 1, Hk = 1, Sq = 1, Sk = 1, D = 1, Dv = 1;
};

inline std::string describe(const shape& s, unsigned features) {
  std::ostringstream o;
  o << "B=" << s.B << " H=" << s.H << " Hk=" << s.Hk << " Sq=" << s.Sq << " Sk=" << s.Sk
    << " D=" << s.D << " Dv=" << s.Dv << " [" << feature_names(features) << "]";
  return o.str();
}

/// Expects call() to throw fovea::error whose message names `name`, and every element of
/// `output` to still hold `sentinel` (nothing written before the error).
template <class Call, class T>
void expect_error_naming(Call&& call, const char* name, const std::vector<T>& output, T sentinel) {
  try {
    call();
    ADD_FAILURE() << "no error for " << name;
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
  }
  for (const T& x : output) ASSERT_EQ(x, sentinel) << name;
}

/// A score_mod and a mask_mod that depend on every index, for the custom-variant paths.
struct test_score_mod {
  template <class S>
  S operator()(S s, index_t b, index_t h, index_t i, index_t j) const {
    return s + S(0.125) * S((3 * i + 5 * j + 7 * h + b) % 5) - S(0.25);
  }
};
struct test_mask_mod {
  bool operator()(index_t b, index_t h, index_t i, index_t j) const {
    return (i + 2 * j + h + b) % 7 != 3;
  }
};

/// Inputs for one case, in storage type T, and the options that point into them.
template <class T>
struct attention_inputs {
  shape s;
  unsigned features;
  std::vector<T> q, k, v;
  std::vector<float> bias, alibi, sinks;
  std::vector<std::uint8_t> mask;

  attention_inputs(const shape& sh, unsigned f, std::uint64_t seed) : s(sh), features(f) {
    q = normal<T>(s.B * s.H * s.Sq * s.D, seed + 1);
    k = normal<T>(s.B * s.Hk * s.Sk * s.D, seed + 2);
    v = normal<T>(s.B * s.Hk * s.Sk * s.Dv, seed + 3);
    if (f & feature::bias) {  // per (batch, key head) with the query rows broadcast... varied
      bias = normal<float>(s.B * s.Sq * s.Sk, seed + 4, 0.5);
      for (std::size_t i = 0; i < bias.size(); i += 13)
        bias[i] = -std::numeric_limits<float>::infinity();
    }
    if (f & feature::mask) mask = bernoulli(s.H * s.Sq * s.Sk, seed + 5, 0.8);
    if (f & feature::alibi) alibi = uniform<float>(s.B * s.H, seed + 6, 0.01, 0.3);
    if (f & feature::sinks) sinks = normal<float>(s.H, seed + 7);
  }

  template <class U>
  tensor_view<U, 4> layout(U* p, index_t heads, index_t seq, index_t dim) const {
    return (features & feature::bshd) ? bshd(p, s.B, seq, heads, dim)
                                      : bhsd(p, s.B, heads, seq, dim);
  }
  tensor_view<const T, 4> qv() const { return layout<const T>(q.data(), s.H, s.Sq, s.D); }
  tensor_view<const T, 4> kv() const { return layout<const T>(k.data(), s.Hk, s.Sk, s.D); }
  tensor_view<const T, 4> vv() const { return layout<const T>(v.data(), s.Hk, s.Sk, s.Dv); }

  softmax_options options(float* lse_out) const {
    softmax_options o;
    o.causal = features & feature::causal;
    if (features & feature::top_left) o.align = diagonal::top_left;
    if (features & feature::window) {
      o.window_left = 19;
      o.window_right = (features & feature::causal) ? -1 : 7;
    }
    if (features & feature::scale) o.scale = 0.37;
    if (features & feature::softcap) o.softcap = 2.5;
    if (features & feature::bias)  // (B, 1, Sq, Sk): heads broadcast with stride 0
      o.bias = view<const float, 4>(bias.data(), {s.B, 1, s.Sq, s.Sk}, {s.Sq * s.Sk, 0, s.Sk, 1});
    if (features & feature::mask)  // (1, H, Sq, Sk): batch broadcast
      o.mask = view<const std::uint8_t, 4>(mask.data(), {1, s.H, s.Sq, s.Sk});
    if (features & feature::alibi) o.alibi_slopes = view<const float, 2>(alibi.data(), {s.B, s.H});
    if (features & feature::sinks) o.sinks = view<const float, 1>(sinks.data(), {s.H});
    if (features & feature::lse) o.lse = view<float, 3>(lse_out, {s.B, s.H, s.Sq});
    return o;
  }
};

/// Copies a (B, H, S, D) view into a dense double vector in logical order.
template <class T>
std::vector<double> to_dense(tensor_view<T, 4> x) {
  std::vector<double> r;
  r.reserve(x.size());
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t h = 0; h < x.extent(1); ++h)
      for (index_t i = 0; i < x.extent(2); ++i)
        for (index_t d = 0; d < x.extent(3); ++d) r.push_back(double(x(b, h, i, d)));
  return r;
}

/// A dense (B, H, Sq, Dv) output over x.
template <class T>
tensor_view<T, 4> output_view(std::vector<T>& x, const shape& s) {
  return bhsd(x.data(), s.B, s.H, s.Sq, s.Dv);
}

/// An output as a dense double vector in logical order: a view, or a vector already dense.
template <class T>
std::vector<double> as_dense(const std::vector<T>& x) {
  return std::vector<double>(x.begin(), x.end());
}
template <class T>
std::vector<double> as_dense(tensor_view<T, 4> x) {
  return to_dense(x);
}

/// Expects `out` (B, H, Sq, Dv) and, when given, `lse` (B, H, Sq) to be softmax attention
/// of q, k, v with options o and variant `custom`: the f64 oracle under the tolerance rule.
/// The sparse kernels pass a mask_mod that hides exactly the keys their selection drops.
template <class T, class Out, class ScoreMod = identity_score_mod,
          class MaskMod = keep_all_mask_mod>
void expect_softmax_result(const Out& out, const std::vector<float>* lse, tensor_view<const T, 4> q,
                           tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                           const softmax_options& o,
                           const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  const auto want = reference_softmax<double>(q, k, v, o, custom);
  const auto naive = reference_softmax<T>(q, k, v, o, custom);
  EXPECT_TRUE(within_tolerance<T>(as_dense(out), want.out, naive.out)) << "out";
  if (lse) {
    EXPECT_TRUE(within_tolerance<float>(as_dense(*lse), want.lse, naive.lse)) << "lse";
  }
}

/// Runs fovea on a case and checks out (and lse) against the oracle.
template <class T, class Backend, class ScoreMod = identity_score_mod,
          class MaskMod = keep_all_mask_mod>
void check_case(const attention_inputs<T>& in, int threads = 1,
                const custom_variant<ScoreMod, MaskMod>& custom = {}) {
  const shape& s = in.s;
  std::vector<T> out(s.B * s.H * s.Sq * s.Dv, T(-7));
  std::vector<float> lse(s.B * s.H * s.Sq, -7.f);
  auto o = in.options(lse.data());
  o.threads = threads;
  auto out_view = in.template layout<T>(out.data(), s.H, s.Sq, s.Dv);
  softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), out_view, o, custom);
  expect_softmax_result<T>(out_view, in.features & feature::lse ? &lse : nullptr, in.qv(), in.kv(),
                           in.vv(), o, custom);
}

/// check_case with the custom variant the feature bits ask for.
template <class T, class Backend>
void check_features(const shape& s, unsigned features, std::uint64_t seed, int threads = 1) {
  SCOPED_TRACE(describe(s, features));
  const attention_inputs<T> in(s, features, seed);
  const bool sm = features & feature::score_mod, mm = features & feature::mask_mod;
  if (sm && mm)
    check_case<T, Backend>(in, threads, with_mods(test_score_mod{}, test_mask_mod{}));
  else if (sm)
    check_case<T, Backend>(in, threads, with_score_mod(test_score_mod{}));
  else if (mm)
    check_case<T, Backend>(in, threads, with_mask_mod(test_mask_mod{}));
  else
    check_case<T, Backend>(in, threads);
}

/// Expects call() to throw fovea::error whose message contains `needle`, with every
/// element of `out` still equal to `untouched`.
template <class T, class Call>
void expect_rejected(const char* needle, const std::vector<T>& out, T untouched, Call&& call) {
  try {
    call();
    ADD_FAILURE() << "no fovea::error for " << needle;
  } catch (const fovea::error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' does not name " << needle;
  }
  for (const T& x : out) ASSERT_EQ(x, untouched) << "output written before the error";
}

/// Calls run(threads) for 1, 2, 7 and all threads; every returned output must have the
/// same bits as the first.
template <class Run>
void expect_same_bits_for_threads(Run&& run) {
  const auto first = run(1);
  for (int threads : {2, 7, 0}) {
    const auto out = run(threads);
    ASSERT_EQ(out.size(), first.size());
    EXPECT_EQ(0, std::memcmp(first.data(), out.data(), out.size() * sizeof(out[0])))
        << threads << " threads";
  }
}

/// A causal softmax case (with its options) run through expect_same_bits_for_threads.
template <class T, class Backend>
void expect_thread_invariant(const attention_inputs<T>& in) {
  const shape& s = in.s;
  std::vector<float> lse(s.B * s.H * s.Sq);
  expect_same_bits_for_threads([&](int threads) {
    std::vector<T> out(s.B * s.H * s.Sq * s.Dv);
    auto o = in.options(lse.data());
    o.causal = true;
    o.threads = threads;
    softmax_attention<Backend>(in.qv(), in.kv(), in.vv(), bhsd(out.data(), s.B, s.H, s.Sq, s.Dv),
                               o);
    return out;
  });
}

}  // namespace fovea::test
