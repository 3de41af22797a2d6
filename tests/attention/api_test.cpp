// What a new user reaches for first: views from braced lists, named extents, bool masks,
// and error messages that give every number.
#include <gtest/gtest.h>

#include <cstdint>
#include <fovea/fovea.hpp>
#include <string>
#include <vector>

#include "../common/random.hpp"

namespace fovea::test::api_test {

TEST(Api, ViewsFromBracedLists) {
  std::vector<float> x(24);
  const index_t B = 2;
  auto a = view(x.data(), {2, 3, 4}, {12, 4, 1});  // the README's form: rank deduced
  static_assert(std::is_same_v<decltype(a), tensor_view<float, 3>>);
  EXPECT_EQ(a.extent(2), 4);
  EXPECT_EQ(a.stride(0), 12);
  auto b = view<const float>(x.data(), {B, 12});  // dense, const data
  static_assert(std::is_same_v<decltype(b), tensor_view<const float, 2>>);
  EXPECT_EQ(b.stride(0), 12);
  auto c = view<const float, 4>(x.data(), {1, 2, 3, 4}, {24, 12, 4, 1});  // explicit, as before
  EXPECT_EQ(c.extent(3), 4);
}

TEST(Api, NamedExtentsGiveTheSameViewsAsPositional) {
  std::vector<float> x(2 * 3 * 5 * 7);
  const auto named = bhsd(x.data(), {.batch = 2, .heads = 3, .seq = 5, .dim = 7});
  const auto positional = bhsd(x.data(), 2, 3, 5, 7);
  EXPECT_EQ(named.extents(), positional.extents());
  EXPECT_EQ(named.strides(), positional.strides());
  const auto named_s = bshd(x.data(), {.batch = 2, .heads = 3, .seq = 5, .dim = 7});
  const auto positional_s = bshd(x.data(), 2, 5, 3, 7);
  EXPECT_EQ(named_s.extents(), positional_s.extents());
  EXPECT_EQ(named_s.strides(), positional_s.strides());
}

TEST(Api, BoolMasksEqualByteMasks) {
  const index_t H = 2, S = 40, D = 8;
  const auto q = normal<float>(H * S * D, 1), k = normal<float>(H * S * D, 2),
             v = normal<float>(H * S * D, 3);
  const auto keep = bernoulli(S * S, 4, 0.7);
  std::unique_ptr<bool[]> flags(new bool[S * S]);
  for (index_t i = 0; i < S * S; ++i) flags[i] = keep[i] != 0;
  std::vector<float> with_bytes(H * S * D), with_bools(H * S * D);
  const auto Q = bhsd<const float>(q.data(), 1, H, S, D), K = bhsd<const float>(k.data(), 1, H, S, D),
             V = bhsd<const float>(v.data(), 1, H, S, D);
  softmax_attention(Q, K, V, bhsd(with_bytes.data(), 1, H, S, D),
                    {.mask = view<const std::uint8_t>(keep.data(), {1, 1, S, S})});
  softmax_attention(Q, K, V, bhsd(with_bools.data(), 1, H, S, D),
                    {.mask = view<const bool>(flags.get(), {1, 1, S, S})});
  EXPECT_EQ(with_bytes, with_bools);
  std::vector<float> zero(H * S, 0.f);
  dynamic_mask_attention(Q, K, V, bhsd(with_bools.data(), 1, H, S, D),
                         bhsd<const float>(zero.data(), 1, H, 1, S),
                         {.keep = S, .mask = view<const bool>(flags.get(), {1, 1, S, S})});
  dynamic_mask_attention(Q, K, V, bhsd(with_bytes.data(), 1, H, S, D),
                         bhsd<const float>(zero.data(), 1, H, 1, S),
                         {.keep = S, .mask = view<const std::uint8_t>(keep.data(), {1, 1, S, S})});
  EXPECT_EQ(with_bytes, with_bools);
}

/// The message fovea::error gives for call().
template <class Call>
std::string message_of(Call&& call) {
  try {
    call();
  } catch (const fovea::error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Api, ErrorMessagesGiveEveryNumber) {
  const index_t H = 32, Hk = 8, Sq = 4, Sk = 16, D = 8;
  std::vector<float> q(H * Sq * D), k(Hk * Sk * D), v(Hk * Sk * D), o(H * Sq * D);
  std::vector<std::uint8_t> mask(2 * H * Sq * Sk, 1);
  std::vector<float> lse(H * (Sq + 1));
  const auto Q = bhsd<const float>(q.data(), 1, H, Sq, D);
  const auto K = bhsd<const float>(k.data(), 1, Hk, Sk, D);
  const auto V = bhsd<const float>(v.data(), 1, Hk, Sk, D);
  const auto O = bhsd(o.data(), 1, H, Sq, D);
  const std::string batch = message_of([&] {
    softmax_attention(Q, K, V, O, {.mask = view<const std::uint8_t>(mask.data(), {2, H, Sq, Sk})});
  });
  EXPECT_NE(batch.find("options.mask: extent 0 (batch) is 2, expected 1"), std::string::npos)
      << batch;
  EXPECT_EQ(batch.find("1 or 1"), std::string::npos) << batch;
  const std::string heads = message_of([&] {
    softmax_attention(Q, K, V, O, {.mask = view<const std::uint8_t>(mask.data(), {1, 4, Sq, Sk})});
  });
  EXPECT_NE(heads.find("extent 1 (heads) is 4, expected 1, 32 (query heads) or 8 (key/value heads)"),
            std::string::npos)
      << heads;
  const std::string rows = message_of([&] {
    softmax_attention(Q, K, V, O, {.lse = view<float>(lse.data(), {1, H, Sq + 1})});
  });
  EXPECT_NE(rows.find("options.lse: extent 2 (queries) is 5, expected 4"), std::string::npos)
      << rows;
}

}  // namespace fovea::test::api_test
