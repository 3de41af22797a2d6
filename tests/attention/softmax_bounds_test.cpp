// Every read stays inside the views: q, k, v (and out) placed against an inaccessible
// page, before and after, over prefill and decode shapes with awkward sizes. A stray
// read past either end faults here deterministically; the results must equal the same
// call on ordinary buffers bit for bit.
#include <gtest/gtest.h>

#include <fovea/fovea.hpp>
#include <vector>

#include "../common/configs.hpp"
#include "../common/guarded.hpp"
#include "../common/random.hpp"

namespace fovea::test::softmax_bounds_test {

template <class C>
class SoftmaxBounds : public ::testing::Test {};
TYPED_TEST_SUITE(SoftmaxBounds, configs, config_names);

TYPED_TEST(SoftmaxBounds, ReadsNothingOutsideTheViews) {
  using T = typename TypeParam::value_type;
  using Backend = typename TypeParam::backend;
  struct shape_case {
    index_t H, Hk, Sq, Sk, D, Dv;
  };
  const shape_case shapes[] = {{1, 1, 97, 131, 128, 128}, {2, 1, 33, 67, 3, 5},
                               {1, 1, 1, 131, 128, 128},  {4, 2, 3, 515, 59, 17},
                               {2, 2, 70, 70, 1, 1},      {8, 1, 16, 100, 64, 64},
                               {1, 1, 200, 3, 16, 16},    {2, 1, 5, 1, 111, 111}};
  for (const auto& s : shapes)
    for (bool causal : {false, true})
      for (auto where : {guarded_buffer<T>::guard::after, guarded_buffer<T>::guard::before}) {
        SCOPED_TRACE("Sq " + std::to_string(s.Sq) + " Sk " + std::to_string(s.Sk) + " D " +
                     std::to_string(s.D) + " Dv " + std::to_string(s.Dv) +
                     (causal ? " causal" : "") +
                     (where == guarded_buffer<T>::guard::after ? " guard after" : " guard before"));
        const auto q = normal<T>(s.H * s.Sq * s.D, 1), k = normal<T>(s.Hk * s.Sk * s.D, 2),
                   v = normal<T>(s.Hk * s.Sk * s.Dv, 3);
        const guarded_buffer<T> gq(q, where), gk(k, where), gv(v, where);
        const guarded_buffer<T> gout(std::vector<T>(s.H * s.Sq * s.Dv), where);
        std::vector<T> plain(s.H * s.Sq * s.Dv);
        const softmax_options o{.causal = causal, .threads = 1};
        softmax_attention<Backend>(
            bhsd(gq.data(), 1, s.H, s.Sq, s.D), bhsd(gk.data(), 1, s.Hk, s.Sk, s.D),
            bhsd(gv.data(), 1, s.Hk, s.Sk, s.Dv), bhsd(gout.data(), 1, s.H, s.Sq, s.Dv), o);
        softmax_attention<Backend>(
            bhsd(q.data(), 1, s.H, s.Sq, s.D), bhsd(k.data(), 1, s.Hk, s.Sk, s.D),
            bhsd(v.data(), 1, s.Hk, s.Sk, s.Dv), bhsd(plain.data(), 1, s.H, s.Sq, s.Dv), o);
        EXPECT_EQ(gout.values(), plain);
      }
}

}  // namespace fovea::test::softmax_bounds_test
