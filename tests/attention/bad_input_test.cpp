// The bad-input matrix: every kernel fed every kind of bad (q, k, v, out) argument must
// throw fovea::error naming the argument, and write nothing (neither out nor, when out
// aliases an input, that input).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <fovea/fovea.hpp>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "../common/attention_case.hpp"

namespace fovea::test::bad_input_test {

using cview = tensor_view<const float, 4>;
using mview = tensor_view<float, 4>;
using kernel_call = std::function<void(cview, cview, cview, mview)>;

/// A full block-sparse layout for Sq x Sk, owned by the caller's vectors.
void full_layout(index_t Sq, index_t Sk, std::vector<std::int32_t>& offsets,
                 std::vector<std::int32_t>& indices, block_sparse_layout& l) {
  l = {16, 16, 1, 1, {}, {}, {}};
  offsets = {0};
  for (index_t r = 0; r < (Sq + 15) / 16; ++r) {
    for (index_t b = 0; b < (Sk + 15) / 16; ++b) indices.push_back(std::int32_t(b));
    offsets.push_back(std::int32_t(indices.size()));
  }
  l.offsets = offsets;
  l.indices = indices;
}

std::vector<std::pair<std::string, kernel_call>> kernels() {
  static const float one_bias[1] = {0.f};
  return {
      {"softmax", [](cview q, cview k, cview v, mview o) { softmax_attention(q, k, v, o); }},
      {"block_sparse",
       [](cview q, cview k, cview v, mview o) {
         std::vector<std::int32_t> offsets, indices;
         block_sparse_layout l;
         full_layout(std::max<index_t>(q.extent(2), 0), std::max<index_t>(k.extent(2), 0), offsets,
                     indices, l);
         block_sparse_attention(q, k, v, o, l);
       }},
      {"hip", [](cview q, cview k, cview v,
                 mview o) { hip_attention(q, k, v, o, {.causal = true, .top_k = 8}); }},
      {"dynamic_mask",
       [](cview q, cview k, cview v, mview o) {
         dynamic_mask_attention(q, k, v, o, view<const float, 4>(one_bias, {1, 1, 1, 1}),
                                {.keep = 8});
       }},
      {"routing", [](cview q, cview k, cview v,
                     mview o) { routing_attention(q, k, v, o, {.num_clusters = 2, .window = 8}); }},
      {"linear", [](cview q, cview k, cview v, mview o) { linear_attention(q, k, v, o); }},
      {"agent",
       [](cview q, cview k, cview v, mview o) { agent_attention(q, k, v, o, {.num_agents = 4}); }},
  };
}

struct bad_case {
  const char* what;
  const char* needle;
  std::function<void(std::vector<float>& q, std::vector<float>& k, std::vector<float>& v,
                     std::vector<float>& out, cview&, cview&, cview&, mview&)>
      edit;
  bool out_is_q = false;  ///< the output aliases q: q must stay untouched
};

TEST(BadInputMatrix, EveryKernelNamesTheArgumentAndWritesNothing) {
  const index_t B = 1, H = 4, Hk = 2, S = 32, D = 8;
  const std::vector<bad_case> cases = {
      {"k batch", "k: extent 0",
       [&](auto&, auto& k, auto&, auto&, cview&, cview& K, cview&, mview&) {
         K = bhsd<const float>(k.data(), 2, Hk, S / 2, D);
       }},
      {"k dim", "k: extent 3",
       [&](auto&, auto& k, auto&, auto&, cview&, cview& K, cview&, mview&) {
         K = bhsd<const float>(k.data(), B, Hk, S * 2, D / 2);
       }},
      {"heads not divisible", "k: extent 1",
       [&](auto&, auto& k, auto&, auto&, cview&, cview& K, cview& V, mview&) {
         K = bhsd<const float>(k.data(), B, 3, S / 2, D);
         V = bhsd<const float>(k.data(), B, 3, S / 2, D);
       }},
      {"v keys", "v: extent 2",
       [&](auto&, auto&, auto& v, auto&, cview&, cview&, cview& V, mview&) {
         V = bhsd<const float>(v.data(), B, Hk, S - 1, D);
       }},
      {"v heads", "v: extent 1",
       [&](auto&, auto&, auto& v, auto&, cview&, cview&, cview& V, mview&) {
         V = bhsd<const float>(v.data(), B, 1, S, D);
       }},
      {"out extents", "out: extent",
       [&](auto&, auto&, auto&, auto& out, cview&, cview&, cview&, mview& O) {
         O = bhsd(out.data(), B, H, S - 1, D);
       }},
      {"inner stride", "q: innermost stride",
       [&](auto& q, auto&, auto&, auto&, cview& Q, cview&, cview&, mview&) {
         Q = view<const float, 4>(q.data(), {B, H, S / 2, D}, {H * S * D, S * D, 2 * D, 2});
       }},
      {"null data", "q: data is null",
       [&](auto&, auto&, auto&, auto&, cview& Q, cview&, cview&, mview&) {
         Q = bhsd<const float>(nullptr, B, H, S, D);
       }},
      {"out aliases q", "out: memory overlaps q",
       [&](auto& q, auto&, auto&, auto&, cview&, cview&, cview&, mview& O) {
         O = bhsd(q.data(), B, H, S, D);
       },
       true},
      {"out aliases k", "out: memory overlaps k",
       [&](auto&, auto& k, auto&, auto&, cview&, cview&, cview&, mview& O) {
         O = bhsd(k.data(), B, H, S, D);  // k's buffer holds exactly that many
       }},
      {"out overlaps itself", "out: strides make distinct",
       [&](auto&, auto&, auto&, auto& out, cview&, cview&, cview&, mview& O) {
         O = view<float, 4>(out.data(), {B, H, S, D}, {H * S * D, S * D, 0, 1});
       }},
  };
  for (const auto& [name, call] : kernels())
    for (const bad_case& c : cases) {
      SCOPED_TRACE(name + ": " + c.what);
      std::vector<float> q(B * H * S * D * 2, 0.5f), k(B * Hk * S * D * 2, 0.25f),
          v(B * Hk * S * D * 2, 1.f), out(B * H * S * D * 2, -3.f);
      cview Q = bhsd<const float>(q.data(), B, H, S, D),
            K = bhsd<const float>(k.data(), B, Hk, S, D),
            V = bhsd<const float>(v.data(), B, Hk, S, D);
      mview O = bhsd(out.data(), B, H, S, D);
      c.edit(q, k, v, out, Q, K, V, O);
      if (c.out_is_q)
        expect_rejected(c.needle, q, 0.5f, [&] { call(Q, K, V, O); });
      else
        expect_rejected(c.needle, out, -3.f, [&] { call(Q, K, V, O); });
      for (float x : k) ASSERT_EQ(x, 0.25f);
      for (float x : v) ASSERT_EQ(x, 1.f);
    }
}

TEST(BadInputMatrix, ScalesAndKernelOptionsAreNamed) {
  const index_t S = 32, D = 8;
  std::vector<float> q(2 * S * D, 0.5f), out(q.size(), -3.f);
  const auto Q = bhsd<const float>(q.data(), 1, 2, S, D);
  const auto O = bhsd(out.data(), 1, 2, S, D);
  const float bias[1] = {0.f};
  const auto Bias = view<const float, 4>(bias, {1, 1, 1, 1});
  for (const double scale : {-1.0, 0.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
    SCOPED_TRACE(scale);
    expect_rejected("options.scale", out, -3.f,
                    [&] { softmax_attention(Q, Q, Q, O, {.scale = scale}); });
    expect_rejected("options.scale", out, -3.f,
                    [&] { hip_attention(Q, Q, Q, O, {.top_k = 8, .scale = scale}); });
    expect_rejected("options.scale", out, -3.f,
                    [&] { dynamic_mask_attention(Q, Q, Q, O, Bias, {.scale = scale}); });
    expect_rejected("options.scale", out, -3.f, [&] {
      routing_attention(Q, Q, Q, O, {.num_clusters = 2, .window = 4, .scale = scale});
    });
    expect_rejected("options.scale", out, -3.f,
                    [&] { agent_attention(Q, Q, Q, O, {.num_agents = 4, .scale = scale}); });
  }
  expect_rejected("options.window_left", out, -3.f,
                  [&] { softmax_attention(Q, Q, Q, O, {.window_left = -2}); });
  expect_rejected("options.keep", out, -3.f,
                  [&] { dynamic_mask_attention(Q, Q, Q, O, Bias, {.keep = 0}); });
  expect_rejected("options.top_k", out, -3.f,
                  [&] { hip_attention(Q, Q, Q, O, {.top_k = 9, .block_size_k = 2}); });
  expect_rejected("options.num_clusters", out, -3.f,
                  [&] { routing_attention(Q, Q, Q, O, {.num_clusters = 100, .shared_qk = true}); });
  expect_rejected("options.num_agents", out, -3.f,
                  [&] { agent_attention(Q, Q, Q, O, {.num_agents = 0}); });
  expect_rejected("options.eps", out, -3.f, [&] { linear_attention(Q, Q, Q, O, {.eps = -1}); });
  expect_rejected("options.threads", out, -3.f,
                  [&] { linear_attention(Q, Q, Q, O, {.threads = -1}); });
}

}  // namespace fovea::test::bad_input_test
