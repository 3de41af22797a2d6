// dynamic_mask_attention_backward against f64 gradients written from the definitions over
// the keys each row keeps (selected here, row by row, from the definition; the selection
// itself is not differentiated), with the tolerance rule of the softmax backward; against
// central differences of the forward in f64; thread invariance; dropped keys, masked rows
// and NaN; dynamic_mask_bias_backward against its definition and central differences;
// bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fovea/fovea.hpp>
#include <functional>
#include <limits>
#include <tuple>
#include <string>
#include <vector>

#include "../common/random.hpp"
#include "../common/reference_backward.hpp"
#include "../common/reference_dma.hpp"
#include "../common/tolerance.hpp"

namespace fovea::test::dynamic_mask_backward_test {

struct dma_shape {
  index_t B, H, Hk, Sq, Sk, D, Dv;
};

/// bias forms: 0 (B, Hk, 1, Sk) as dynamic_mask_bias makes it, 1 (B, H, 1, Sk),
/// 2 (B, H, Sq, Sk)
struct dma_problem {
  dma_shape s;
  index_t keep;
  bool causal, mask, softcap;
  int form;
  bool bshd;
  std::vector<float> q, k, v, out, dout, lse, bias;
  std::vector<std::uint8_t> mask_data;
  dynamic_mask_options o;

  index_t bias_heads() const { return form == 0 ? s.Hk : s.H; }
  index_t bias_rows() const { return form == 2 ? s.Sq : 1; }
  tensor_view<float, 4> view4(std::vector<float>& x, index_t h, index_t n, index_t d) {
    return bshd ? fovea::bshd(x.data(), s.B, n, h, d) : bhsd(x.data(), s.B, h, n, d);
  }
  tensor_view<const float, 4> Q() { return view4(q, s.H, s.Sq, s.D); }
  tensor_view<const float, 4> K() { return view4(k, s.Hk, s.Sk, s.D); }
  tensor_view<const float, 4> V() { return view4(v, s.Hk, s.Sk, s.Dv); }
  tensor_view<const float, 4> O() { return view4(out, s.H, s.Sq, s.Dv); }
  tensor_view<const float, 4> dO() { return view4(dout, s.H, s.Sq, s.Dv); }
  tensor_view<const float, 4> Bias() {
    return view<const float>(bias.data(), {s.B, bias_heads(), bias_rows(), s.Sk});
  }
  tensor_view<const float, 3> L() { return view<const float>(lse.data(), {s.B, s.H, s.Sq}); }

  dma_problem(const dma_shape& sh, index_t keep_, bool causal_, bool mask_, bool softcap_,
              int form_, bool bshd_, std::uint64_t seed)
      : s(sh), keep(keep_), causal(causal_), mask(mask_), softcap(softcap_), form(form_), bshd(bshd_) {
    q = normal<float>(s.B * s.H * s.Sq * s.D, seed + 1);
    k = normal<float>(s.B * s.Hk * s.Sk * s.D, seed + 2);
    v = normal<float>(s.B * s.Hk * s.Sk * s.Dv, seed + 3);
    dout = normal<float>(s.B * s.H * s.Sq * s.Dv, seed + 4);
    bias = normal<float>(s.B * bias_heads() * bias_rows() * s.Sk, seed + 5, 2.0);
    out.assign(dout.size(), 0.f);
    lse.assign(s.B * s.H * s.Sq, 0.f);
    o.causal = causal;
    o.keep = keep;
    if (softcap) o.softcap = 2.5;
    if (mask) {
      mask_data = bernoulli(s.B * s.Sk, seed + 6, 0.8);
      o.mask = view<const std::uint8_t>(mask_data.data(), {s.B, 1, 1, s.Sk});
    }
    forward();
  }
  void forward() {
    dynamic_mask_options f = o;
    f.lse = view(lse.data(), {s.B, s.H, s.Sq});
    dynamic_mask_attention(Q(), K(), V(), view4(out, s.H, s.Sq, s.Dv), Bias(), f);
  }
  /// fovea's gradients (dq, dk, dv, dbias), dense bhsd, and the raw buffers for bitwise
  /// comparisons.
  gradients run(int threads, std::vector<float>* raw = nullptr) {
    std::vector<float> dq(q.size(), 9.f), dk(k.size(), 9.f), dv(v.size(), 9.f), db(bias.size(), 9.f);
    dynamic_mask_options bo = o;
    bo.threads = threads;
    dynamic_mask_attention_backward(Q(), K(), V(), O(), Bias(), dO(), L(), view4(dq, s.H, s.Sq, s.D),
                                    view4(dk, s.Hk, s.Sk, s.D), view4(dv, s.Hk, s.Sk, s.Dv), bo,
                                    view(db.data(), {s.B, bias_heads(), bias_rows(), s.Sk}));
    if (raw) {
      raw->clear();
      for (auto* x : {&dq, &dk, &dv, &db}) raw->insert(raw->end(), x->begin(), x->end());
    }
    gradients g;
    g.dq = dense(dq, s.H, s.Sq, s.D);
    g.dk = dense(dk, s.Hk, s.Sk, s.D);
    g.dv = dense(dv, s.Hk, s.Sk, s.Dv);
    g.dz.assign(db.begin(), db.end());
    return g;
  }
  std::vector<double> dense(std::vector<float>& x, index_t h, index_t n, index_t d) {
    const auto X = view4(x, h, n, d);
    std::vector<double> r;
    for (index_t i0 = 0; i0 < s.B; ++i0)
      for (index_t i1 = 0; i1 < h; ++i1)
        for (index_t i2 = 0; i2 < n; ++i2)
          for (index_t i3 = 0; i3 < d; ++i3) r.push_back(X(i0, i1, i2, i3));
    return r;
  }
  /// The reference's options and kept sets: dense softmax attention masked to the kept keys.
  softmax_options reference_options() {
    softmax_options r;
    r.causal = causal;
    r.bias = Bias();
    r.mask = o.mask;
    r.softcap = o.softcap;
    return r;
  }
  kept_sets kept() {
    return select_top(s.B, s.H, s.Hk, s.Sq, s.Sk, keep, causal, Bias(), o.mask);
  }
  /// d logit (B, H, Sq, Sk) reduced onto the bias's shape.
  std::vector<double> reduce(const std::vector<double>& dz) {
    std::vector<double> r(bias.size());
    const index_t group = s.H / s.Hk;
    for (index_t b = 0; b < s.B; ++b)
      for (index_t h = 0; h < s.H; ++h)
        for (index_t i = 0; i < s.Sq; ++i)
          for (index_t j = 0; j < s.Sk; ++j)
            r[((b * bias_heads() + (form == 0 ? h / group : h)) * bias_rows() + (form == 2 ? i : 0)) *
                  s.Sk + j] += dz[((b * s.H + h) * s.Sq + i) * s.Sk + j];
    return r;
  }
  std::string name() const {
    return "B" + std::to_string(s.B) + " H" + std::to_string(s.H) + " Hk" + std::to_string(s.Hk) +
           " Sq" + std::to_string(s.Sq) + " Sk" + std::to_string(s.Sk) + " D" + std::to_string(s.D) +
           " Dv" + std::to_string(s.Dv) + " keep" + std::to_string(keep) + (causal ? " causal" : "") +
           (mask ? " mask" : "") + (softcap ? " softcap" : "") + " form" + std::to_string(form) +
           (bshd ? " bshd" : "");
  }
};

void expect_matches_reference(dma_problem& pb, int threads) {
  SCOPED_TRACE(pb.name() + " threads " + std::to_string(threads));
  const gradients got = pb.run(threads);
  const auto kept = pb.kept();
  const auto ro = pb.reference_options();
  const auto want = reference_softmax_backward<double>(pb.Q(), pb.K(), pb.V(), pb.dO(), ro, with_mask_mod(kept));
  const auto naive = reference_softmax_backward<float>(pb.Q(), pb.K(), pb.V(), pb.dO(), ro, with_mask_mod(kept));
  EXPECT_TRUE(within_tolerance<float>(got.dq, want.dq, naive.dq, 1e-5)) << "dq";
  EXPECT_TRUE(within_tolerance<float>(got.dk, want.dk, naive.dk, 1e-5)) << "dk";
  EXPECT_TRUE(within_tolerance<float>(got.dv, want.dv, naive.dv, 1e-5)) << "dv";
  // d bias sums d logit over the rows it broadcasts across: fp32 rounding grows with them
  const double summed = double(pb.form == 2 ? 1 : pb.s.Sq * (pb.form == 0 ? pb.s.H / std::max<index_t>(pb.s.Hk, 1) : 1));
  EXPECT_TRUE(within_tolerance<float>(got.dz, pb.reduce(want.dz), pb.reduce(naive.dz),
                                      1e-5 * std::sqrt(std::max(summed, 1.0))))
      << "dbias";
}

TEST(DynamicMaskBackward, MatchesTheReferenceOverTheKeptKeys) {
  const dma_shape shapes[] = {{1, 1, 1, 1, 1, 1, 1},       {1, 2, 1, 37, 91, 13, 7},
                              {2, 4, 2, 130, 130, 32, 32}, {1, 4, 2, 1, 700, 16, 16},
                              {1, 2, 2, 3, 300, 8, 9},     {1, 2, 1, 70, 0, 8, 8},
                              {1, 2, 1, 0, 20, 8, 8},      {1, 3, 1, 65, 200, 20, 12}};
  std::uint64_t seed = 100;
  for (const dma_shape& s : shapes)
    for (index_t keep : {1, 5, 64, 100})
      for (bool causal : {false, true}) {
        seed += 10;
        dma_problem plain(s, keep, causal, false, false, 0, false, seed);
        expect_matches_reference(plain, 1);
        dma_problem mixed(s, keep, causal, seed % 3 == 0, seed % 20 == 0, int(seed / 10 % 3),
                          seed % 30 == 0, seed);
        expect_matches_reference(mixed, int(seed / 10 % 3) + 1);
      }
}

// Long sequences with few kept keys: the key ranges of the dK/dV pass hold keys of many
// query blocks, and rows keep scattered keys; per-row biases make every piece partial.
TEST(DynamicMaskBackward, LongSequencesWithScatteredKeptKeys) {
#if defined(FOVEA_TEST_SANITIZE)  // the f64 reference is O(Sq Sk D): shorter under ASan
  const index_t Sk = 1200, long_q = 500;
#else
  const index_t Sk = 2500, long_q = 1100;
#endif
  for (int form : {0, 2}) {
    dma_problem pb({1, 2, 1, form == 2 ? 300 : long_q, Sk, 16, 16}, 48, true, true, false, form,
                   false, 300 + form);
    expect_matches_reference(pb, 2);
  }
}

TEST(DynamicMaskBackward, BitwiseTheSameForEveryThreadCount) {
  for (int form : {0, 1, 2}) {
    dma_problem pb({2, 4, 2, 200, 1500, 24, 16}, 40, form != 1, form == 1, form == 2, form, false,
                   400 + form);
    std::vector<float> serial, parallel;
    pb.run(1, &serial);
    for (int threads : {2, 3}) {
      pb.run(threads, &parallel);
      EXPECT_EQ(0, std::memcmp(serial.data(), parallel.data(), 4 * serial.size()))
          << "form " << form << ", threads " << threads;
    }
  }
}

// With every key kept the result is softmax attention's backward with the same bias.
TEST(DynamicMaskBackward, KeepingEveryKeyIsTheSoftmaxBackward) {
  dma_problem pb({2, 4, 2, 90, 120, 32, 24}, 120, true, true, true, 0, false, 500);
  const gradients got = pb.run(2);
  std::vector<float> dq(pb.q.size()), dk(pb.k.size()), dv(pb.v.size()), db(pb.bias.size());
  softmax_options so = pb.reference_options();
  softmax_attention_backward(pb.Q(), pb.K(), pb.V(), pb.O(), pb.dO(), pb.L(),
                             bhsd(dq.data(), 2, 4, 90, 32), bhsd(dk.data(), 2, 2, 120, 32),
                             bhsd(dv.data(), 2, 2, 120, 24), so,
                             {.dbias = view(db.data(), {2, 2, 1, 120})});
  auto close = [](const std::vector<double>& a, const std::vector<float>& b) {
    double err = 0, mag = 1e-30;
    for (std::size_t i = 0; i < a.size(); ++i) {
      err = std::max(err, std::abs(a[i] - double(b[i])));
      mag = std::max(mag, std::abs(double(b[i])));
    }
    return err / mag;
  };
  EXPECT_LT(close(got.dq, dq), 1e-5);
  EXPECT_LT(close(got.dk, dk), 1e-5);
  EXPECT_LT(close(got.dv, dv), 1e-5);
  EXPECT_LT(close(got.dz, db), 1e-5);
}

// The backward equals central differences of the forward itself (in double): with the
// selection fixed, as the reference implementation's backward defines it. Steps are far
// below the gaps between the biases, so no difference step changes a selection.
TEST(DynamicMaskBackward, CentralDifferencesOfTheForward) {
  const index_t B = 1, H = 2, Hk = 1, Sq = 5, Sk = 9, D = 4, keep = 4;
  auto q = normal<double>(B * H * Sq * D, 61), k = normal<double>(B * Hk * Sk * D, 62),
       v = normal<double>(B * Hk * Sk * D, 63);
  const auto G = normal<double>(B * H * Sq * D, 64);
  std::vector<float> bias = normal<float>(Sk, 65, 2.0);
  const dynamic_mask_options o{.causal = true, .keep = keep, .softcap = 3.0};
  auto loss = [&] {
    std::vector<double> out(B * H * Sq * D);
    dynamic_mask_attention(bhsd<const double>(q.data(), B, H, Sq, D), bhsd<const double>(k.data(), B, Hk, Sk, D),
                           bhsd<const double>(v.data(), B, Hk, Sk, D), bhsd(out.data(), B, H, Sq, D),
                           view<const float>(bias.data(), {B, Hk, 1, Sk}), o);
    double l = 0;
    for (std::size_t i = 0; i < out.size(); ++i) l += out[i] * G[i];
    return l;
  };
  std::vector<double> out(B * H * Sq * D), dq(q.size()), dk(k.size()), dv(v.size());
  std::vector<float> lse(B * H * Sq), db(Sk);
  dynamic_mask_options fwd = o;
  fwd.lse = view(lse.data(), {B, H, Sq});
  dynamic_mask_attention(bhsd<const double>(q.data(), B, H, Sq, D), bhsd<const double>(k.data(), B, Hk, Sk, D),
                         bhsd<const double>(v.data(), B, Hk, Sk, D), bhsd(out.data(), B, H, Sq, D),
                         view<const float>(bias.data(), {B, Hk, 1, Sk}), fwd);
  dynamic_mask_attention_backward(
      bhsd<const double>(q.data(), B, H, Sq, D), bhsd<const double>(k.data(), B, Hk, Sk, D),
      bhsd<const double>(v.data(), B, Hk, Sk, D), bhsd<const double>(out.data(), B, H, Sq, D),
      view<const float>(bias.data(), {B, Hk, 1, Sk}), bhsd<const double>(G.data(), B, H, Sq, D),
      view<const float>(lse.data(), {B, H, Sq}), bhsd(dq.data(), B, H, Sq, D), bhsd(dk.data(), B, Hk, Sk, D),
      bhsd(dv.data(), B, Hk, Sk, D), o, view(db.data(), {B, Hk, 1, Sk}));
  const double h = 1e-6;
  for (auto [x, g, name] : {std::tuple{&q, &dq, "dq"}, {&k, &dk, "dk"}, {&v, &dv, "dv"}})
    for (std::size_t e = 0; e < x->size(); ++e) {
      const double keep_value = (*x)[e];
      (*x)[e] = keep_value + h;
      const double up = loss();
      (*x)[e] = keep_value - h;
      const double down = loss();
      (*x)[e] = keep_value;
      EXPECT_NEAR((*g)[e], (up - down) / (2 * h), 1e-6) << name << " " << e;
    }
  int dropped = 0;
  for (index_t j = 0; j < Sk; ++j) {  // the bias is float: a step exact in float
    const float keep_value = bias[j];
    const float step = 1.0f / 4096;
    bias[j] = keep_value + step;
    const double up = loss();
    bias[j] = keep_value - step;
    const double down = loss();
    bias[j] = keep_value;
    EXPECT_NEAR(db[j], (up - down) / (2.0 * double(step)), 1e-5) << "dbias " << j;
    dropped += db[j] == 0.f;
  }
  EXPECT_GT(dropped, 0);  // some keys no row keeps: zero gradient, as the forward ignores them
}

// Keys no row keeps, NaN and Inf in them included, get zero gradients; a row whose keys are
// all masked (a padded batch row) gets zero dq; NaN in a kept key makes the gradients it
// reaches NaN.
TEST(DynamicMaskBackward, DroppedKeysMaskedRowsAndNaN) {
  const index_t B = 2, H = 2, Sq = 20, Sk = 64, D = 8;
  dma_problem pb({B, H, 1, Sq, Sk, D, D}, 8, false, false, false, 0, false, 700);
  for (index_t j = 0; j < Sk; ++j) pb.bias[j] = float(j % 3 == 0 ? 1 + j : -1 - j);  // batch 0
  std::fill(pb.k.begin() + D, pb.k.begin() + 2 * D, NAN);  // key 1 of batch 0: dropped
  pb.v[2 * D] = INFINITY;                                    // key 2 of batch 0: dropped
  pb.mask_data.assign(B * Sk, 1);
  std::fill(pb.mask_data.begin() + Sk, pb.mask_data.end(), 0);  // batch 1 sees no key
  pb.o.mask = view<const std::uint8_t>(pb.mask_data.data(), {B, 1, 1, Sk});
  pb.mask = true;
  pb.forward();
  std::vector<float> raw;
  const gradients g = pb.run(2, &raw);
  for (index_t j = 0; j < Sk; ++j) {
    const bool kept = j % 3 == 0 && j >= Sk - 3 * 8;  // the 8 largest biases
    for (index_t d = 0; d < D; ++d) {
      const double dk = g.dk[j * D + d], dv = g.dv[j * D + d];
      EXPECT_TRUE(std::isfinite(dk) && std::isfinite(dv)) << j;
      if (!kept) {
        EXPECT_TRUE(dk == 0 && dv == 0) << j;
      }
    }
    if (!kept) {
      EXPECT_EQ(g.dz[j], 0.0) << j;
    }
  }
  for (std::size_t e = std::size_t(H * Sq * D); e < g.dq.size(); ++e) EXPECT_EQ(g.dq[e], 0.0);
  for (std::size_t e = std::size_t(Sk * D); e < g.dk.size(); ++e) EXPECT_EQ(g.dk[e], 0.0);
  expect_matches_reference(pb, 1);
  // NaN in a kept key: its dk, dv and every dq of batch 0 become NaN
  pb.k[(Sk - 1) * D] = NAN;
  pb.forward();
  const gradients n = pb.run(1);
  EXPECT_TRUE(std::isnan(n.dq[0]));
  EXPECT_TRUE(std::isnan(n.dk[(Sk - 1) * D]));
  EXPECT_EQ(n.dk[D], 0.0);  // the dropped NaN key still gets nothing
}

TEST(DynamicMaskBackward, Bf16StorageAndTheScalarBackend) {
  const index_t B = 1, H = 2, Hk = 1, Sq = 40, Sk = 150, D = 16;
  const auto qf = normal<float>(B * H * Sq * D, 81), kf = normal<float>(B * Hk * Sk * D, 82),
             vf = normal<float>(B * Hk * Sk * D, 83), gf = normal<float>(B * H * Sq * D, 84);
  const auto bias = normal<float>(Sk, 85, 2.0);
  auto to_bf16 = [](const std::vector<float>& x) {
    std::vector<bfloat16> r(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) r[i] = bfloat16(x[i]);
    return r;
  };
  auto to_float = [](const auto& x) {
    std::vector<float> r(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) r[i] = float(x[i]);
    return r;
  };
  const auto q = to_bf16(qf), k = to_bf16(kf), v = to_bf16(vf), g = to_bf16(gf);
  const dynamic_mask_options o{.causal = true, .keep = 30};
  const auto Bias = view<const float>(bias.data(), {B, Hk, 1, Sk});
  // bf16 storage against the same (rounded) values in float
  std::vector<bfloat16> out(q.size()), dq(q.size()), dk(k.size()), dv(v.size());
  std::vector<float> lse(B * H * Sq), db(Sk);
  dynamic_mask_options fwd = o;
  fwd.lse = view(lse.data(), {B, H, Sq});
  dynamic_mask_attention(bhsd<const bfloat16>(q.data(), B, H, Sq, D), bhsd<const bfloat16>(k.data(), B, Hk, Sk, D),
                         bhsd<const bfloat16>(v.data(), B, Hk, Sk, D), bhsd(out.data(), B, H, Sq, D), Bias, fwd);
  dynamic_mask_attention_backward(
      bhsd<const bfloat16>(q.data(), B, H, Sq, D), bhsd<const bfloat16>(k.data(), B, Hk, Sk, D),
      bhsd<const bfloat16>(v.data(), B, Hk, Sk, D), bhsd<const bfloat16>(out.data(), B, H, Sq, D), Bias,
      bhsd<const bfloat16>(g.data(), B, H, Sq, D), view<const float>(lse.data(), {B, H, Sq}),
      bhsd(dq.data(), B, H, Sq, D), bhsd(dk.data(), B, Hk, Sk, D), bhsd(dv.data(), B, Hk, Sk, D), o,
      view(db.data(), {B, Hk, 1, Sk}));
  const auto q2 = to_float(q), k2 = to_float(k), v2 = to_float(v), g2 = to_float(g), o2 = to_float(out);
  softmax_options ro{.causal = true, .bias = Bias};
  const auto kept = select_top(B, H, Hk, Sq, Sk, o.keep, true, Bias, {});
  const auto want = reference_softmax_backward<double>(
      bhsd<const float>(q2.data(), B, H, Sq, D), bhsd<const float>(k2.data(), B, Hk, Sk, D),
      bhsd<const float>(v2.data(), B, Hk, Sk, D), bhsd<const float>(g2.data(), B, H, Sq, D), ro,
      with_mask_mod(kept));
  auto err = [](const std::vector<bfloat16>& got, const std::vector<double>& ref) {
    return relative_error(std::vector<double>(got.begin(), got.end()), ref);
  };
  EXPECT_LT(err(dq, want.dq), 2e-2);
  EXPECT_LT(err(dk, want.dk), 2e-2);
  EXPECT_LT(err(dv, want.dv), 2e-2);
  // the scalar backend: the same algorithm, the same kept keys
  std::vector<float> out_f(q.size()), dq_f(q.size()), dk_f(k.size()), dv_f(v.size()), db_f(Sk);
  dynamic_mask_attention_backward<scalar>(
      bhsd<const float>(q2.data(), B, H, Sq, D), bhsd<const float>(k2.data(), B, Hk, Sk, D),
      bhsd<const float>(v2.data(), B, Hk, Sk, D), bhsd<const float>(o2.data(), B, H, Sq, D), Bias,
      bhsd<const float>(g2.data(), B, H, Sq, D), view<const float>(lse.data(), {B, H, Sq}),
      bhsd(dq_f.data(), B, H, Sq, D), bhsd(dk_f.data(), B, Hk, Sk, D), bhsd(dv_f.data(), B, Hk, Sk, D), o,
      view(db_f.data(), {B, Hk, 1, Sk}));
  EXPECT_LT(relative_error(std::vector<double>(dk_f.begin(), dk_f.end()), want.dk), 2e-2);
  EXPECT_LT(relative_error(std::vector<double>(db_f.begin(), db_f.end()),
                           std::vector<double>(db.begin(), db.end())), 2e-2);
}

// dynamic_mask_bias_backward: against the definition's derivatives and against central
// differences of dynamic_mask_bias (double storage for v), both forms, with and without
// dt_bias; dv receives v's share on top of what it held.
TEST(DynamicMaskBackward, BiasFromValueStates) {
  const index_t B = 2, Hk = 2, Sk = 7, Dv = 3;
  auto v = normal<double>(B * Hk * Sk * Dv, 91);
  auto w = normal<float>(Hk * Hk * Dv, 92, 0.5);
  auto a = std::vector<float>{-0.7f, -1.3f};
  auto dt_bias = std::vector<float>{0.3f, -0.2f};
  const auto G = normal<float>(B * Hk * Sk, 93);
  for (auto form : {dynamic_mask_form::softplus, dynamic_mask_form::zoh_exp})
    for (bool with_dt_bias : {false, true}) {
      SCOPED_TRACE(std::string(form == dynamic_mask_form::softplus ? "softplus" : "zoh_exp") +
                   (with_dt_bias ? " dt_bias" : ""));
      auto loss = [&] {
        std::vector<float> bias(B * Hk * Sk);
        dynamic_mask_bias(bhsd<const double>(v.data(), B, Hk, Sk, Dv), view<const float>(w.data(), {Hk, Hk * Dv}),
                          view<const float>(a.data(), {Hk}), view(bias.data(), {B, Hk, 1, Sk}), form,
                          with_dt_bias ? view<const float>(dt_bias.data(), {Hk}) : tensor_view<const float, 1>{});
        double l = 0;
        for (std::size_t i = 0; i < bias.size(); ++i) l += double(bias[i]) * G[i];
        return l;
      };
      std::vector<double> dv(v.size(), 0.5);
      std::vector<float> dw(w.size(), 9.f), da(Hk, 9.f), ddt(Hk, 9.f);
      dynamic_mask_bias_backward(bhsd<const double>(v.data(), B, Hk, Sk, Dv), view<const float>(w.data(), {Hk, Hk * Dv}),
                                 view<const float>(a.data(), {Hk}), view<const float>(G.data(), {B, Hk, 1, Sk}),
                                 bhsd(dv.data(), B, Hk, Sk, Dv), view(dw.data(), {Hk, Hk * Dv}),
                                 view(da.data(), {Hk}), form,
                                 with_dt_bias ? view<const float>(dt_bias.data(), {Hk}) : tensor_view<const float, 1>{},
                                 with_dt_bias ? view(ddt.data(), {Hk}) : tensor_view<float, 1>{});
      // the forward rounds the bias to float: steps large enough for that rounding
      auto central = [&](auto& x, std::size_t e, double h) {
        const auto keep_value = x[e];
        x[e] = keep_value + h;
        const double up = loss();
        x[e] = keep_value - h;
        const double down = loss();
        x[e] = keep_value;
        return (up - down) / (2 * h);
      };
      for (std::size_t e = 0; e < v.size(); ++e)
        EXPECT_NEAR(dv[e] - 0.5, central(v, e, 1e-3), 2e-3) << "dv " << e;
      for (std::size_t e = 0; e < w.size(); ++e)
        EXPECT_NEAR(dw[e], central(w, e, 1.0 / 512), 2e-3) << "dw_dt " << e;
      for (index_t h = 0; h < Hk; ++h) {
        EXPECT_NEAR(da[h], central(a, h, 1.0 / 512), 2e-3) << "da " << h;
        if (with_dt_bias) {
          EXPECT_NEAR(ddt[h], central(dt_bias, h, 1.0 / 512), 2e-3) << "ddt_bias " << h;
        }
      }
      if (!with_dt_bias) {
        EXPECT_EQ(ddt[0], 9.f);  // not asked for: untouched
      }
      // and the forward against its f64 definition
      std::vector<double> wd(w.begin(), w.end()), ad(a.begin(), a.end()), bd;
      if (with_dt_bias) bd.assign(dt_bias.begin(), dt_bias.end());
      const auto want = reference_dma_bias(bhsd<const double>(v.data(), B, Hk, Sk, Dv),
                                           view<const double>(wd.data(), {Hk, Hk * Dv}), ad, bd, form);
      std::vector<float> bias(B * Hk * Sk);
      dynamic_mask_bias(bhsd<const double>(v.data(), B, Hk, Sk, Dv), view<const float>(w.data(), {Hk, Hk * Dv}),
                        view<const float>(a.data(), {Hk}), view(bias.data(), {B, Hk, 1, Sk}), form,
                        with_dt_bias ? view<const float>(dt_bias.data(), {Hk}) : tensor_view<const float, 1>{});
      for (std::size_t e = 0; e < bias.size(); ++e) EXPECT_NEAR(bias[e], want[e], 1e-6 * (1 + std::abs(want[e])));
    }
}

TEST(DynamicMaskBackward, BadInputNamesTheArgumentAndWritesNothing) {
  dma_problem pb({1, 2, 1, 10, 30, 8, 8}, 5, true, false, false, 0, false, 900);
  std::vector<float> dq(pb.q.size(), 7.f), dk(pb.k.size(), 7.f), dv(pb.v.size(), 7.f), db(30, 7.f);
  auto call = [&](dynamic_mask_options o, tensor_view<float, 4> dbias, tensor_view<const float, 4> bias,
                  tensor_view<const float, 3> lse) {
    dynamic_mask_attention_backward(pb.Q(), pb.K(), pb.V(), pb.O(), bias, pb.dO(), lse,
                                    bhsd(dq.data(), 1, 2, 10, 8), bhsd(dk.data(), 1, 1, 30, 8),
                                    bhsd(dv.data(), 1, 1, 30, 8), o, dbias);
  };
  auto expect_error = [&](auto&& f, const std::string& what) {
    try {
      f();
      ADD_FAILURE() << "no error for " << what;
    } catch (const error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
    for (const auto* x : {&dq, &dk, &dv, &db})
      for (float e : *x) ASSERT_EQ(e, 7.f) << what;
  };
  const auto dbias = view(db.data(), {1, 1, 1, 30});
  expect_error([&] { call(pb.o, view(db.data(), {1, 1, 1, 29}), pb.Bias(), pb.L()); }, "dbias");
  expect_error([&] { call(pb.o, dbias, {}, pb.L()); }, "bias");
  expect_error([&] { call(pb.o, dbias, pb.Bias(), {}); }, "lse");
  expect_error([&] {
    dynamic_mask_options o = pb.o;
    o.keep = 0;
    call(o, dbias, pb.Bias(), pb.L());
  }, "options.keep");
  expect_error([&] {
    dynamic_mask_options o = pb.o;
    o.k_scale = view<const float>(pb.bias.data(), {1, 1, 1});
    call(o, dbias, pb.Bias(), pb.L());
  }, "options.k_scale");
  std::vector<float> wide(300), dwide(300, 7.f);
  expect_error([&] {  // a per-row bias shared by the heads has no gradient here
    call(pb.o, view(dwide.data(), {1, 1, 10, 30}), view<const float>(wide.data(), {1, 1, 10, 30}), pb.L());
  }, "dbias");
  expect_error([&] {  // dbias over dq
    call(pb.o, view(dq.data(), {1, 1, 1, 30}), pb.Bias(), pb.L());
  }, "dbias");
  // dynamic_mask_bias_backward
  std::vector<float> v(30 * 8), w(8), a(1), g(30), dw(8, 7.f), da(1, 7.f);
  std::vector<float> dvv(v.size(), 7.f);
  auto bias_call = [&](tensor_view<float, 2> dw_view, tensor_view<const float, 4> g_view) {
    dynamic_mask_bias_backward(bhsd<const float>(v.data(), 1, 1, 30, 8), view<const float>(w.data(), {1, 8}),
                               view<const float>(a.data(), {1}), g_view, bhsd(dvv.data(), 1, 1, 30, 8),
                               dw_view, view(da.data(), {1}));
  };
  for (auto [f, what] : {std::pair<std::function<void()>, std::string>{
                             [&] { bias_call(view(dw.data(), {1, 7}), view<const float>(g.data(), {1, 1, 1, 30})); },
                             "dw_dt"},
                         {[&] { bias_call(view(dw.data(), {1, 8}), view<const float>(g.data(), {1, 1, 1, 29})); },
                          "dbias"}}) {
    try {
      f();
      ADD_FAILURE() << "no error for " << what;
    } catch (const error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
    for (float e : dvv) ASSERT_EQ(e, 7.f);
    for (float e : dw) ASSERT_EQ(e, 7.f);
  }
}

}  // namespace fovea::test::dynamic_mask_backward_test
