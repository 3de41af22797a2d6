// libFuzzer harness for every public entry point. The input bytes choose a kernel, shapes
// (including 0 and mismatched ones), a layout (bhsd, bshd, inner stride 2, self-overlapping
// output, output aliasing q), options (NaN/negative/huge scales, windows, top_k, keep,
// clusters, agents, ...) and the values (raw float bit patterns: NaN, Inf, huge, denormal).
// The contract checked on every input:
//  - either fovea::error is thrown and the output buffer is untouched,
//  - or the call returns; then softmax, block-sparse (full layout) and linear attention
//    must match the f64 reference within the tolerance rule wherever it is finite, have
//    NaN wherever the f64 and naive f32 references both have NaN, and
//    every kernel's output must be finite when every input value is.
// Build and run: scripts/fuzz [seconds] (clang's -fsanitize=fuzzer,address,undefined).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fovea/fovea.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/reference.hpp"
#include "common/reference_backward.hpp"
#include "common/reference_dma.hpp"
#include "common/reference_linear.hpp"

namespace {

using fovea::index_t;

/// Reads bytes from the fuzz input; zeros once it runs out.
struct bytes {
  const std::uint8_t* data;
  std::size_t size, at = 0;
  std::uint8_t u8() { return at < size ? data[at++] : 0; }
  std::uint32_t u32() {
    std::uint32_t x = 0;
    for (int i = 0; i < 4; ++i) x |= std::uint32_t(u8()) << (8 * i);
    return x;
  }
  float value() {  // mostly ordinary numbers, sometimes any bit pattern
    const std::uint8_t kind = u8();
    if (kind < 200) return float(int(kind) - 100) / 32.f;
    const std::uint32_t bits = u32();
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};

/// The case being run (kernel, shapes, flags, ...), printed with a violation so a CI log
/// says which case broke even when the input itself is gone.
std::string fuzz_case;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "contract violated: %s\n  case: %s\n", what, fuzz_case.c_str());
  std::abort();
}

/// Appends `name=value` to fuzz_case.
template <class T>
void describe(const char* name, const T& value) {
  fuzz_case += std::string(fuzz_case.empty() ? "" : " ") + name + "=" + std::to_string(value);
}

/// NaN wherever both references have NaN (the NaN pattern); and
/// max |got - want| <= 2 max |naive - want| + floor over the elements where the f64
/// reference and the naive f32 computation are finite (where even the naive f32 one
/// overflows, f32 kernels may too); got must be finite there. The floor scales with the
/// output's magnitude, as in the unit tests' rule (tests/common/tolerance.hpp): with an
/// output of 2.6e9 one float ulp is 256, and a naive sum that happens to land within a
/// quarter ulp must not make a kernel's 0.75 ulp a failure (fuzzing found that case).
void check_tolerance(const std::vector<float>& got, const std::vector<double>& want,
                     const std::vector<double>& naive, double floor = 0) {
  double err = 0, naive_err = 0, magnitude = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    // NaN from the inputs (both references agree on it) must reach the output.
    if (std::isnan(want[i]) && std::isnan(naive[i]) && !std::isnan(got[i]))
      fail("a NaN that both references have did not reach the output");
    if (!std::isfinite(want[i]) || !std::isfinite(naive[i])) continue;
    if (!std::isfinite(got[i])) fail("non-finite output where the references are finite");
    err = std::max(err, std::abs(double(got[i]) - want[i]));
    naive_err = std::max(naive_err, std::abs(naive[i] - want[i]));
    magnitude = std::max(magnitude, std::abs(want[i]));
  }
  if (err > 2 * naive_err + std::max({1e-5, 2e-6 * magnitude, floor})) {
    std::fprintf(stderr, "error %g, naive error %g, largest |reference| %g\n", err, naive_err,
                 magnitude);
    fail("output off the f64 reference by more than the tolerance");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  bytes in{data, size};
  const int kernel = in.u8() % 26;
  const index_t B = in.u8() % 3, H = in.u8() % 5, Sq = in.u8() % 41, Sk = in.u8() % 41;
  // Head dims up to 9; the quantized-cache kernel also 32 and 64 (q8_0 wants whole blocks)
  auto head_dim = [&](std::uint8_t pick) -> index_t {
    return kernel == 14 && pick >= 200 ? 32 * (1 + pick % 2) : pick % 10;
  };
  const index_t D = head_dim(in.u8()), Dv = head_dim(in.u8());
  const std::uint8_t hk_pick = in.u8(), layout = in.u8() % 8, flags = in.u8();
  const index_t Hk = hk_pick % 4 == 0 ? H : hk_pick % 4 == 1 ? 1 : (hk_pick % 4 == 2 ? 2 : 3);

  // Buffers with slack, so odd strides and mismatched views stay inside them.
  const std::size_t slack = 64;
  std::vector<float> q(B * H * Sq * D * 2 + slack), k(B * Hk * Sk * D * 2 + slack),
      v(B * Hk * Sk * Dv * 2 + slack);
  bool moderate = true;  // every value finite and small enough that nothing can overflow
  bool tame = true;      // small enough that no float product or sum of D products overflows
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) {
      e = in.value();
      moderate = std::abs(e) < 1e3f && moderate;
      tame = !(std::abs(e) >= 1e15f) && tame;  // NaN stays tame: it must propagate exactly
    }
  std::vector<float> out(B * H * Sq * Dv * 2 + slack, -12345.f);

  auto make = [&](float* p, index_t heads, index_t seq, index_t dim) {
    switch (layout) {
      case 1:
        return fovea::bshd(p, B, seq, heads, dim);
      case 2:
        return fovea::view<float, 4>(p, {B, heads, seq, dim},  // inner stride 2
                                     {heads * seq * dim * 2, seq * dim * 2, dim * 2, 2});
      default:
        return fovea::bhsd(p, B, heads, seq, dim);
    }
  };
  const fovea::tensor_view<const float, 4> Q = make(q.data(), H, Sq, D);
  const fovea::tensor_view<const float, 4> K = make(k.data(), Hk, Sk, D);
  const fovea::tensor_view<const float, 4> V = make(v.data(), Hk, Sk, Dv);
  fovea::tensor_view<float, 4> O = make(out.data(), H, Sq, Dv);
  if (layout == 3) O = fovea::view<float, 4>(out.data(), {B, H, Sq, Dv}, {0, 0, Dv, 1});
  if (layout == 4) O = fovea::bhsd(q.data(), B, H, Sq, Dv);  // aliases q
  const bool aliased = layout == 4;

  double scale_pick[] = {-1.0, 0.0, 1e30, std::nan(""), 0.125, 1.0};
  std::optional<double> scale;
  if (flags & 1) scale = scale_pick[in.u8() % 6];
  const bool causal = flags & 2;
  const index_t knob = index_t(in.u8()) - 2;  // -2 .. 253: windows, keep, top_k, ...
  fuzz_case.clear();
  for (auto [name, value] : {std::pair<const char*, index_t>{"kernel", kernel}, {"B", B}, {"H", H},
                             {"Hk", Hk}, {"Sq", Sq}, {"Sk", Sk}, {"D", D}, {"Dv", Dv},
                             {"layout", layout}, {"flags", flags}, {"knob", knob}})
    describe(name, value);
  describe("scale", scale ? *scale : -2.0);

  // A bias (fp32 or fp16) and a mask for the per-sequence calls: (1|B, H|Hk|1|other,
  // rows|1, cols|1) from the bytes (a wrong extent: an error), values from the bytes.
  std::vector<float> bias_store;
  std::vector<fovea::half> bias_half;
  std::vector<std::uint8_t> mask_store;
  auto sequence_terms = [&](fovea::softmax_options o, index_t batch, index_t rows, index_t cols) {
    const std::uint8_t pick = in.u8();
    if (!(pick & 3)) return o;
    auto extent = [&](std::uint8_t bits, index_t full) -> index_t {
      return bits % 4 == 0 ? 1 : bits % 4 == 3 ? full + 1 : full;
    };
    const std::array<index_t, 4> shape{extent(pick >> 2, batch),
                                       (pick & 16) ? Hk : extent(pick >> 3, H),
                                       extent(pick >> 4, rows), extent(pick >> 5, cols)};
    const index_t n = shape[0] * shape[1] * shape[2] * shape[3];
    if (pick & 1) {
      bias_store.resize(n + 1);
      for (float& e : bias_store) {
        e = in.value();
        moderate = std::abs(e) < 1e3f && moderate;
      }
      if (pick & 64) {
        bias_half.resize(bias_store.size());
        for (std::size_t i = 0; i < bias_store.size(); ++i) bias_half[i] = fovea::half(bias_store[i]);
        o.bias = fovea::view<const fovea::half, 4>(bias_half.data(), shape,
                                                   {shape[1] * shape[2] * shape[3],
                                                    shape[2] * shape[3], shape[3], 1});
      } else {
        o.bias = fovea::view<const float, 4>(bias_store.data(), shape,
                                             {shape[1] * shape[2] * shape[3], shape[2] * shape[3],
                                              shape[3], 1});
      }
    }
    if (pick & 2) {
      mask_store.resize(n + 1);
      for (auto& e : mask_store) e = in.u8() & 1;
      o.mask = fovea::view<const std::uint8_t, 4>(mask_store.data(), shape,
                                                  {shape[1] * shape[2] * shape[3],
                                                   shape[2] * shape[3], shape[3], 1});
    }
    return o;
  };

  const std::vector<float> q_before = q;
  std::vector<float> quantized_k, quantized_v, scale_store, dout, grad_q, grad_k, grad_v;
  // A backward call after its forward: dout from the bytes, gradients with a sentinel
  // that must survive an error untouched.
  auto checked_backward = [&](auto&& call) {
    dout.resize(B * H * Sq * Dv + 1);
    for (float& e : dout) e = in.value();
    grad_q.assign(B * H * Sq * D + 1, -7.f);
    grad_k.assign(B * Hk * Sk * D + 1, -7.f);
    grad_v.assign(B * Hk * Sk * Dv + 1, -7.f);
    try {
      call(fovea::bhsd<const float>(dout.data(), B, H, Sq, Dv), fovea::bhsd(grad_q.data(), B, H, Sq, D),
           fovea::bhsd(grad_k.data(), B, Hk, Sk, D), fovea::bhsd(grad_v.data(), B, Hk, Sk, Dv));
    } catch (const fovea::error&) {
      for (auto* g : {&grad_q, &grad_k, &grad_v})
        for (float x : *g)
          if (x != -7.f) fail("a gradient written before fovea::error");
      throw;
    }
  };
  fovea::softmax_options softmax_options_used;
  fovea::dynamic_mask_options dma_options_used;
  std::optional<fovea::hip_options> hip_over_cache;  // kernel 14 ran HiP: its options
  bool q8_0_queries = false;  // kernel 14: decode logits against q rounded to q8_0
  bool q8_0_beyond_range = false;  // ... and q or k beyond q8_0's fp16 scales (65504 * 127)
  std::vector<float> dma_bias, row_weights;
  bool identity_calibration = false;  // kernel 22 with beta 1 / p 0: softmax attention itself
  std::optional<fovea::dhsa_selection> dhsa_chosen;          // kernel 23: what DHSA kept
  std::optional<fovea::landmark_options> landmark_used;      // kernel 24: its options
  std::vector<index_t> chunk_starts;
  std::vector<fovea::bfloat16> bf16_q, bf16_k, bf16_v, bf16_out;  // kernel 25's storage
  bool bf16_ran = false;
  bool backward_ran = false;
  bool threw = false;
  try {
    switch (kernel) {
      case 0: {
        fovea::softmax_options o{.causal = causal, .scale = scale, .threads = 1};
        if (flags & 4) o.window_left = knob;
        if (flags & 8) o.softcap = double(in.u8()) / 16;
        fovea::softmax_attention(Q, K, V, O, o);
        break;
      }
      case 1: {  // a full layout
        std::vector<std::int32_t> offsets = {0}, indices;
        const index_t bq = 1 + in.u8() % 20, bk = 1 + in.u8() % 20;
        for (index_t r = 0; r < (Sq + bq - 1) / bq; ++r) {
          for (index_t b = 0; b < (Sk + bk - 1) / bk; ++b) indices.push_back(std::int32_t(b));
          offsets.push_back(std::int32_t(indices.size()));
        }
        if (flags & 16 && !indices.empty()) indices.back() = std::int32_t(knob);  // maybe bad
        const fovea::block_sparse_layout l{bq, bk, 1, 1, offsets, indices, {}};
        fovea::block_sparse_attention(Q, K, V, O, l, {.causal = causal, .scale = scale});
        break;
      }
      case 2:
        fovea::hip_attention(Q, K, V, O,
                             {.causal = causal,
                              .top_k = knob,
                              .block_size_q = 1 + in.u8() % 16,
                              .block_size_k = 1 + in.u8() % 4,
                              .scale = scale});
        break;
      case 3: {
        std::vector<float> bias(B * Hk * Sk + 1);
        for (float& e : bias) moderate = std::abs(e = in.value()) < 1e3f && moderate;
        fovea::dynamic_mask_attention(Q, K, V, O,
                                      fovea::bhsd<const float>(bias.data(), B, Hk, 1, Sk),
                                      {.causal = causal, .keep = knob, .scale = scale});
        break;
      }
      case 4:
        fovea::routing_attention(Q, K, V, O,
                                 {.causal = causal,
                                  .num_clusters = knob % 8,
                                  .window = 1 + in.u8() % 40,
                                  .shared_qk = bool(flags & 4),
                                  .scale = scale});
        break;
      case 5:
        fovea::linear_attention(Q, K, V, O, {.causal = causal, .eps = flags & 4 ? -1.0 : 1e-6});
        break;
      case 6:
        fovea::agent_attention(Q, K, V, O, {.num_agents = knob % 10, .scale = scale});
        break;
      case 7: {  // varlen: B = 1 views, cumulative lengths from the bytes (maybe invalid)
        std::vector<std::int32_t> cq = {0}, ck = {0};
        const int seqs = in.u8() % 4;
        for (int i = 0; i < seqs; ++i) {
          cq.push_back(cq.back() + in.u8() % 12 - (flags & 16 ? 2 : 0));
          ck.push_back(ck.back() + in.u8() % 12);
        }
        fovea::softmax_attention_varlen(
            Q, K, V, O, cq, ck,
            sequence_terms({.causal = causal, .scale = scale}, 1, Q.extent(2), K.extent(2)));
        break;
      }
      case 8: {  // paged: K/V as (pages, Hk, page, D) with a block table from the bytes
        const index_t page = 1 + in.u8() % 8, pages = std::max<index_t>(1, (Sk + page - 1) / page);
        std::vector<std::int32_t> table(B * pages), lens(B);
        for (auto& t : table) t = std::int32_t(in.u8() % (pages + 1)) - (flags & 16 ? 1 : 0);
        for (auto& l : lens) l = std::int32_t(in.u8() % (Sk + 2));
        const auto Kp = fovea::paged_hnd<const float>(k.data(), pages, page, Hk, D);
        const auto Vp = fovea::paged_hnd<const float>(v.data(), pages, page, Hk, Dv);
        const auto T = fovea::view<const std::int32_t, 2>(table.data(), {B, pages});
        if (flags & 32) {  // ragged packed queries: offsets from the bytes (maybe invalid)
          std::vector<std::int32_t> cu(B + 1, 0);
          for (index_t b = 1; b <= B; ++b) cu[b] = cu[b - 1] + std::int32_t(in.u8() % 4);
          if (flags & 64) cu[B] = std::int32_t(Sq);
          fovea::softmax_attention_paged(
              Q, Kp, Vp, O, T, lens, cu,
              sequence_terms({.causal = causal, .scale = scale}, 1, Sq, pages * page));
        } else if (flags & 128) {  // appends into the cache (its own buffers), then attend
          std::vector<float> kc(pages * page * Hk * D + 1, 0.f), vc(pages * page * Hk * Dv + 1, 0.f);
          const auto Kw = fovea::paged_hnd(kc.data(), pages, page, Hk, D);
          const auto Vw = fovea::paged_hnd(vc.data(), pages, page, Hk, Dv);
          fovea::append_kv_paged(K, V, Kw, Vw, T, lens);
          fovea::softmax_attention_paged(Q, fovea::tensor_view<const float, 4>(Kw),
                                         fovea::tensor_view<const float, 4>(Vw), O, T, lens,
                                         {.causal = causal, .scale = scale});
        } else {
          fovea::softmax_attention_paged(
              Q, Kp, Vp, O, T, lens,
              sequence_terms({.causal = causal, .scale = scale}, B, Sq, pages * page));
        }
        break;
      }
      case 12: {  // a contiguous cache with per-sequence key counts (maybe past capacity),
                  // optionally filled by append_kv first
        std::vector<std::int32_t> lens(B);
        for (auto& l : lens) l = std::int32_t(in.u8() % (Sk + 2));
        if (flags & 64) {
          std::vector<float> kc(B * Hk * Sk * D + 1, 0.f), vc(B * Hk * Sk * Dv + 1, 0.f);
          const auto Kw = fovea::bhsd(kc.data(), B, Hk, Sk, D);
          const auto Vw = fovea::bhsd(vc.data(), B, Hk, Sk, Dv);
          std::vector<std::int32_t> start(B, 0);
          fovea::append_kv(K, V, Kw, Vw, start);
          fovea::softmax_attention_kvcache(Q, fovea::tensor_view<const float, 4>(Kw),
                                           fovea::tensor_view<const float, 4>(Vw), O, lens,
                                           {.causal = causal, .scale = scale});
        } else {
          fovea::softmax_attention_kvcache(
              Q, K, V, O, lens, sequence_terms({.causal = causal, .scale = scale}, B, Sq, Sk));
        }
        break;
      }
      case 9: {  // the recurrent linear state, stepped with the call's tokens
        fovea::linear_state<float> state(B, Hk, D, Dv);
        state.step(Q, K, V, O, {.eps = flags & 4 ? -1.0 : 1e-6});
        break;
      }
      case 10: {  // the causal agent variant and its decode state
        std::vector<float> agents(B * H * 3 * D + 1);
        for (float& e : agents) moderate = std::abs(e = in.value()) < 1e3f && moderate;
        const auto A = fovea::bhsd<const float>(agents.data(), B, H, 3, D);
        if (flags & 4) {
          fovea::agent_state<float> state(A, Dv);
          state.step(Q, K, V, O, {.scale = scale});
        } else {
          fovea::agent_attention(Q, K, V, O, A, {.causal = true, .scale = scale});
        }
        break;
      }
      case 11: {  // the DMA bias helper, or HiP's selection alone
        if (flags & 4) {
          (void)fovea::hip_select(Q, K, {.causal = causal, .top_k = knob});
          return 0;
        }
        std::vector<float> w(Hk * Hk * Dv + 1), a(Hk + 1), bias(B * Hk * Sk + 1, -7.f);
        for (float& e : w) e = in.value();
        try {
          fovea::dynamic_mask_bias(V, fovea::view<const float, 2>(w.data(), {Hk, Hk * Dv}),
                                   fovea::view<const float, 1>(a.data(), {Hk}),
                                   fovea::bhsd(bias.data(), B, Hk, 1, Sk));
        } catch (const fovea::error&) {
          for (float x : bias)
            if (x != -7.f) fail("bias written before fovea::error");
          return 0;
        }
        if (flags & 8) {  // and its backward, d bias from the bytes (maybe misshapen)
          std::vector<float> dbias(B * Hk * Sk + 1), dv(v.size(), -7.f), dw(w.size(), -7.f), da(Hk + 1, -7.f);
          for (float& e : dbias) e = in.value();
          const index_t keys = flags & 16 ? Sk + (knob % 3 == 0) : Sk;
          try {
            fovea::dynamic_mask_bias_backward(
                V, fovea::view<const float, 2>(w.data(), {Hk, Hk * Dv}), fovea::view<const float, 1>(a.data(), {Hk}),
                fovea::bhsd<const float>(dbias.data(), B, Hk, 1, keys), fovea::bhsd(dv.data(), B, Hk, Sk, Dv),
                fovea::view<float, 2>(dw.data(), {Hk, Hk * Dv}), fovea::view<float, 1>(da.data(), {Hk}));
            if (keys != Sk && B * Hk > 0) fail("a misshapen d bias was accepted");
          } catch (const fovea::error&) {
            for (const auto* g : {&dv, &dw, &da})
              for (float x : *g)
                if (x != -7.f) fail("a bias gradient written before fovea::error");
          }
        }
        return 0;  // no attention output to check
      }
      case 13: {  // linear_recurrence: every rule, decay and beta from the bytes (maybe
                  // non-finite or misshapen: an error), optional initial and final state
        const auto rule = fovea::update_rule(flags % 4);
        const bool gated = rule == fovea::update_rule::gated || rule == fovea::update_rule::gated_delta;
        const bool delta = rule == fovea::update_rule::delta || rule == fovea::update_rule::gated_delta;
        const index_t width = flags & 16 ? D : 1;
        std::vector<float> g(B * Hk * Sq * std::max<index_t>(width, 1) + 1),
            beta(B * Hk * Sq + 1), state(B * Hk * D * Dv + 1), state_out(B * Hk * D * Dv + 1);
        for (auto* x : {&g, &beta, &state}) for (float& e : *x) e = in.value();
        fovea::linear_recurrence_options o{.rule = rule, .scale = scale};
        if (gated || (flags & 32)) o.decay = fovea::bhsd<const float>(g.data(), B, Hk, Sq, width);
        if (delta || (flags & 64)) o.beta = fovea::bhsd<const float>(beta.data(), B, Hk, Sq, 1);
        if (flags & 128) o.state_in = fovea::bhsd<const float>(state.data(), B, Hk, D, Dv);
        if (flags & 8) o.state_out = fovea::bhsd(state_out.data(), B, Hk, D, Dv);
        fovea::linear_recurrence(Q, K, V, O, o);
        // Decays above 0 and the delta rule on keys of any norm may grow without bound.
        moderate = moderate && rule == fovea::update_rule::linear && !(flags & 128);
        break;
      }
      case 14: {  // quantized caches: K and V as q8_0 (D % 32: else an error), int8 (scales
                  // maybe misshapen or missing: an error) or fp8; softmax checked below
                  // against the reference on the dequantized values, HiP (flags & 32)
                  // against itself on them, bit for bit
        // The cache types: flags' low bits mixed with a byte of their own, so any type
        // meets causal, a scale and two threads (bits 0-1); the input's end reads 0.
        const int types = flags ^ in.u8(), kt = types % 4, vt = (types / 4) % 4;
        describe("k_type", kt);  // q8_0, int8, e4m3, e5m2
        describe("v_type", vt);
        quantized_k.assign(k.size(), 0.f);
        quantized_v.assign(v.size(), 0.f);
        fovea::softmax_options o{.causal = causal, .scale = scale, .threads = 1 + (flags & 1)};
        o.q8_0_products = flags & 16;  // decode over q8_0 keys scores q rounded to q8_0
        q8_0_queries = (flags & 16) && kt == 0 && Sq <= 16;
        for (index_t b = 0; b < B && q8_0_queries; ++b)
          for (index_t h = 0; h < H; ++h)
            for (index_t i = 0; i < Sq; ++i)
              for (index_t d = 0; d < D; ++d) q8_0_beyond_range |= std::abs(Q(b, h, i, d)) >= 8e6f;
        for (index_t b = 0; b < B && q8_0_queries; ++b)  // keys too: an infinite key scale
          for (index_t h = 0; h < Hk; ++h)                // is NaN to the integer products,
            for (index_t j = 0; j < Sk; ++j)              // +-inf or NaN to the dequantized
              for (index_t d = 0; d < D; ++d) q8_0_beyond_range |= std::abs(K(b, h, j, d)) >= 8e6f;
        auto quantized = [&](int type, const fovea::tensor_view<const float, 4>& x,
                             std::vector<float>& values, fovea::tensor_view<const float, 3>& scale_view,
                             auto&& attend) {
          const index_t n = x.extent(0) * x.extent(1) * x.extent(2) * x.extent(3);
          const auto dst = fovea::bhsd(values.data(), x.extent(0), x.extent(1), x.extent(2), x.extent(3));
          auto run = [&](auto tag, fovea::tensor_view<const float, 3> sv) {
            using C = decltype(tag);
            std::vector<C> cache(std::max<index_t>(n, 32) / fovea::values_per_element<C>::value + 1);
            const auto view = fovea::bhsd(cache.data(), x.extent(0), x.extent(1), x.extent(2), x.extent(3));
            if constexpr (std::is_same_v<C, std::int8_t>)
              fovea::quantize(x, view, fovea::view(scale_store.data(), {x.extent(0), x.extent(1), x.extent(2)}));
            else if constexpr (std::is_same_v<C, fovea::block_q8_0>)
              fovea::quantize(x, view);
            else
              fovea::quantize(x, view, sv);
            fovea::dequantize(fovea::tensor_view<const C, 4>(view), dst, sv);
            scale_view = sv;
            attend(fovea::tensor_view<const C, 4>(view));
          };
          scale_store.assign(x.extent(0) * x.extent(1) * std::max<index_t>(x.extent(2), 1) + 1, 1.f);
          const auto row_scales = fovea::view<const float>(scale_store.data(), {x.extent(0), x.extent(1), x.extent(2)});
          const float head_scale = 0.5f + float(knob & 7);
          scale_store.back() = head_scale;
          const auto one_scale = fovea::view<const float>(&scale_store.back(), {1, 1, 1});
          if (type == 0) run(fovea::block_q8_0{}, {});
          else if (type == 1) run(std::int8_t{}, row_scales);
          else if (type == 2) run(fovea::e4m3{}, one_scale);
          else run(fovea::e5m2{}, one_scale);
        };
        std::vector<float> k_scales, v_scales, k_channels, v_channels;
        quantized(kt, K, quantized_k, o.k_scale, [&](auto Kq) {
          k_scales = scale_store;
          if (o.k_scale.data() && kt == 1) o.k_scale = fovea::view<const float>(k_scales.data(), {K.extent(0), K.extent(1), K.extent(2)});
          else if (o.k_scale.data()) o.k_scale = fovea::view<const float>(&k_scales.back(), {1, 1, 1});
          if ((flags & 64) && !(flags & 32) && D > 0) {  // per-channel scales (int8; else an error)
            k_channels.resize(D);
            for (index_t d = 0; d < D; ++d) k_channels[d] = 0.25f * float(1 + in.u8() % 8);
            o.k_channel_scale = fovea::view<const float>(k_channels.data(), {1, D});
            for (index_t i = 0; i < B * Hk * Sk * D; ++i) quantized_k[i] *= k_channels[i % D];
          }
          quantized(vt, V, quantized_v, o.v_scale, [&](auto Vq) {
            v_scales = scale_store;
            if (o.v_scale.data() && vt == 1) o.v_scale = fovea::view<const float>(v_scales.data(), {V.extent(0), V.extent(1), V.extent(2)});
            else if (o.v_scale.data()) o.v_scale = fovea::view<const float>(&v_scales.back(), {1, 1, 1});
            if ((flags & 64) && !(flags & 32) && vt == 1 && Dv > 0) {  // int8 values' per-channel scales
              v_channels.resize(Dv);
              for (index_t d = 0; d < Dv; ++d) v_channels[d] = 0.25f * float(1 + (5 * d + 3) % 8);
              o.v_channel_scale = fovea::view<const float>(v_channels.data(), {1, Dv});
              for (index_t i = 0; i < B * Hk * Sk * Dv; ++i) quantized_v[i] *= v_channels[i % Dv];
            }
            if ((flags & 128) && kt == 1) o.k_scale = {};  // int8 without scales: an error
            if (flags & 32) {
              hip_over_cache = fovea::hip_options{.causal = causal,
                                                  .top_k = knob,
                                                  .block_size_q = 1 + in.u8() % 16,
                                                  .block_size_k = 1 + in.u8() % 4,
                                                  .scale = scale,
                                                  .k_scale = o.k_scale,
                                                  .v_scale = o.v_scale,
                                                  .threads = o.threads};
              describe("block_size_q", hip_over_cache->block_size_q);
              describe("block_size_k", hip_over_cache->block_size_k);
              fovea::hip_attention(Q, Kq, Vq, O, *hip_over_cache);
            } else {
              fovea::softmax_attention(Q, Kq, Vq, O, o);
            }
          });
        });
        break;
      }
      case 25: {  // bf16 arithmetic: q, k, v and out bf16 (flags & 4, or an aliased out: float
                  // q and out over bf16 k and v with bf16_products); the inputs rounded to
                  // bf16 first, checked below against the references on the rounded values
        for (auto* x : {&k, &v})
          for (float& e : *x) e = float(fovea::bfloat16(e));
        if (!aliased)  // (an aliased call must throw before writing q: q_before is checked)
          for (float& e : q) e = float(fovea::bfloat16(e));
        auto to_bf16 = [](const std::vector<float>& x, std::vector<fovea::bfloat16>& to) {
          to.resize(x.size());
          for (std::size_t i = 0; i < x.size(); ++i) to[i] = fovea::bfloat16(x[i]);
        };
        to_bf16(k, bf16_k);
        to_bf16(v, bf16_v);
        // the float view's layout over the bf16 copy
        auto like = [](const auto& view, const float* base, auto* copy) {
          using T = std::remove_pointer_t<decltype(copy)>;
          return fovea::view<T, 4>(
              copy + (view.data() - base), {view.extent(0), view.extent(1), view.extent(2), view.extent(3)},
              {view.stride(0), view.stride(1), view.stride(2), view.stride(3)});
        };
        const auto Kb = like(K, k.data(), static_cast<const fovea::bfloat16*>(bf16_k.data()));
        const auto Vb = like(V, v.data(), static_cast<const fovea::bfloat16*>(bf16_v.data()));
        const bool all_bf16 = !(flags & 4) && !aliased;
        const fovea::softmax_options o{.causal = causal, .scale = scale,
                                       .bf16_products = !all_bf16, .threads = 1 + (flags & 8 ? 1 : 0)};
        if (all_bf16) {
          to_bf16(q, bf16_q);
          bf16_out.assign(out.size(), fovea::bfloat16(-2.0f));  // a sentinel bf16 holds exactly
          fovea::softmax_attention(like(Q, q.data(), static_cast<const fovea::bfloat16*>(bf16_q.data())),
                                   Kb, Vb, like(O, out.data(), bf16_out.data()), o);
          for (std::size_t i = 0; i < out.size(); ++i) out[i] = float(bf16_out[i]);  // read via O
        } else {
          fovea::softmax_attention(Q, Kb, Vb, O, o);
        }
        bf16_ran = true;
        break;
      }
      case 15: {  // the backward, after fovea's forward; checked below against the f64 gradients
        std::vector<float> lse(B * H * Sq + 1);
        fovea::softmax_options o{.causal = causal, .scale = scale};
        if (flags & 4) o.window_left = knob;
        if (flags & 8) o.softcap = double(in.u8()) / 16;
        softmax_options_used = o;
        fovea::softmax_options forward = o;
        forward.lse = fovea::view(lse.data(), {B, H, Sq});
        fovea::softmax_attention(Q, K, V, O, forward);
        checked_backward([&](auto dO, auto dQ, auto dK, auto dV) {
          fovea::softmax_attention_backward(Q, K, V, fovea::tensor_view<const float, 4>(O), dO,
                                            fovea::view<const float>(lse.data(), {B, H, Sq}), dQ,
                                            dK, dV, o);
        });
        backward_ran = true;
        break;
      }
      case 16: {  // titans_memory: gates from the bytes (outside [0, 1], negative or
                  // non-finite: an error), chunk from the knob (0: an error), optional
                  // states in, out and in place
        // (gates shared by the heads hold B x 1 x Sq values even when Hk is 0)
        const index_t gate_heads = flags & 4 ? 1 : Hk, gates = B * gate_heads * Sq + 1;
        std::vector<float> eta(gates), theta(gates), alpha(gates), memory(B * Hk * D * Dv + 1),
            momentum(B * Hk * D * Dv + 1);
        for (auto* x : {&eta, &theta, &alpha, &memory, &momentum}) for (float& e : *x) e = in.value();
        fovea::titans_memory_options o{.chunk = knob, .scale = scale};
        if (!(flags & 8)) o.theta = fovea::bhsd<const float>(theta.data(), B, gate_heads, Sq, 1);
        if (flags & 16) o.eta = fovea::bhsd<const float>(eta.data(), B, gate_heads, Sq, 1);
        if (flags & 32) o.alpha = fovea::bhsd<const float>(alpha.data(), B, gate_heads, Sq, 1);
        if (flags & 64) o.memory_in = fovea::bhsd<const float>(memory.data(), B, Hk, D, Dv);
        if (flags & 128) {
          o.memory_out = fovea::bhsd(memory.data(), B, Hk, D, Dv);  // in place when given
          o.momentum_in = fovea::bhsd<const float>(momentum.data(), B, Hk, D, Dv);
          o.momentum_out = fovea::bhsd(momentum.data(), B, Hk, D, Dv);
        }
        fovea::titans_memory(Q, K, V, O, o);
        moderate = false;  // gradient steps on any keys may grow without bound
        break;
      }
      case 17: {  // linear_attention_backward after its forward (elu+1 or relu, causal or
                  // not); gradients untouched on an error, finite for moderate inputs
        const fovea::linear_options o{.causal = causal,
                                      .map = flags & 4 ? fovea::feature_map::relu
                                                       : fovea::feature_map::elu_plus_one,
                                      .eps = flags & 8 ? 0.0 : 1e-6};
        fovea::linear_attention(Q, K, V, O, o);
        // with flags & 16, through a state (causal, Sq == Sk and sizes right, else an error)
        const std::size_t state_size = std::size_t(B * Hk * (D * Dv + D)) + (knob % 5 == 0);
        std::vector<float> state_in(state_size), dstate_out(state_size), dstate_in(state_size, -7.f);
        for (auto* x : {&state_in, &dstate_out}) for (float& e : *x) e = in.value();
        fovea::linear_state_grads<float> sg;
        if (flags & 16) sg = {.state_in = state_in, .dstate_out = dstate_out, .dstate_in = dstate_in};
        try {
          checked_backward([&](auto dO, auto dQ, auto dK, auto dV) {
            fovea::linear_attention_backward(Q, K, V, fovea::tensor_view<const float, 4>(O), dO, dQ,
                                             dK, dV, o, sg);
          });
        } catch (const fovea::error&) {
          for (float x : dstate_in)
            if (x != -7.f) fail("d state written before fovea::error");
          if (!(flags & 16)) throw;
          return 0;  // the forward's output stays: not an output written by the failed call
        }
        if (flags & 16) moderate = false;  // states from the bytes may be anything
        bool small = moderate && !(flags & 8);  // eps = 0 may divide by a vanishing den
        for (float e : dout) small = small && std::abs(e) < 1e3f;
        for (float e : q) small = small && std::abs(e) < 8.f;  // phi(q).phi(k) stays far from 0
        for (float e : k) small = small && std::abs(e) < 8.f;
        if (small && !(flags & 4))
          for (const auto* g : {&grad_q, &grad_k, &grad_v})
            for (std::size_t i = 0; i + 1 < g->size(); ++i)
              if (!std::isfinite((*g)[i]) && (*g)[i] != -7.f)
                fail("a non-finite linear gradient from moderate inputs");
        break;
      }
      case 19: {  // dynamic_mask_attention_backward after its forward, d bias when asked
                  // (a wrong-sized d bias from the knob: an error); checked below
        dma_bias.resize(B * Hk * Sk + 1);
        for (float& e : dma_bias) moderate = std::abs(e = in.value()) < 1e3f && moderate;
        std::vector<float> lse(B * H * Sq + 1), dbias(B * Hk * Sk + 2, -7.f);
        const auto bias = fovea::bhsd<const float>(dma_bias.data(), B, Hk, 1, Sk);
        dma_options_used = {.causal = causal, .keep = knob, .scale = scale};
        fovea::dynamic_mask_options forward = dma_options_used;
        forward.lse = fovea::view(lse.data(), {B, H, Sq});
        fovea::dynamic_mask_attention(Q, K, V, O, bias, forward);
        const bool wrong = (flags & 4) && knob % 7 == 0;
        auto backward = [&](index_t bias_keys) {
          checked_backward([&](auto dO, auto dQ, auto dK, auto dV) {
            fovea::dynamic_mask_attention_backward(
                Q, K, V, fovea::tensor_view<const float, 4>(O), bias, dO,
                fovea::view<const float>(lse.data(), {B, H, Sq}), dQ, dK, dV, dma_options_used,
                flags & 4 ? fovea::bhsd(dbias.data(), B, Hk, 1, bias_keys) : fovea::tensor_view<float, 4>{});
          });
        };
        if (wrong) {  // the error names d bias and writes nothing (checked_backward)
          try {
            backward(Sk + 1);
            fail("a wrong-sized dbias was accepted");
          } catch (const fovea::error& e) {
            if (!std::strstr(e.what(), "dbias")) fail("the dbias error does not name it");
          }
          for (float x : dbias)
            if (x != -7.f) fail("dbias written before fovea::error");
        }
        backward(Sk);
        backward_ran = true;
        break;
      }
      case 20: {  // the head-sparse mode: row weights from the bytes (0, NaN: an error, ...)
        row_weights.resize(B * H * Sq + 1);
        for (float& e : row_weights) {
          e = (in.u8() & 3) == 0 ? 0.f : in.value();
          moderate = !(std::abs(e) >= 1e3f) && moderate;
        }
        softmax_options_used = {.causal = causal, .scale = scale, .threads = 1 + (flags & 1)};
        fovea::head_sparse_attention(Q, K, V, O, fovea::view<const float, 3>(row_weights.data(), {B, H, Sq}),
                                     softmax_options_used);
        break;
      }
      case 21: {  // prob_mod: the identity (checked below against softmax) or a reweighting
        softmax_options_used = {.causal = causal, .scale = scale, .threads = 1 + (flags & 1)};
        if (flags & 4)
          fovea::softmax_attention_prob_mod(
              Q, K, V, O, [](float p, index_t, index_t, index_t, index_t j) { return j % 2 ? p : 2 * p; },
              softmax_options_used);
        else
          fovea::softmax_attention_prob_mod(
              Q, K, V, O, [](float p, index_t, index_t, index_t, index_t) { return p; },
              softmax_options_used);
        break;
      }
      case 22: {  // ACT (threshold and beta from the bytes, maybe invalid) or VAR (sinks and
                  // targets from the bytes, maybe out of range or overlapping)
        const double beta = flags & 8 ? 1.0 : double(in.u8()) / 200;  // > 1: an error
        softmax_options_used = {.causal = causal, .scale = scale, .threads = 1 + (flags & 1)};
        if (flags & 4) {
          fovea::act_attention(Q, K, V, O, {.threshold = double(in.u8()) / 255, .beta = beta,
                                            .attention = softmax_options_used});
          identity_calibration = beta == 1.0;
        } else {
          std::vector<index_t> sinks;
          for (int i = in.u8() % 3; i > 0; --i) sinks.push_back(in.u8() % 48);
          std::vector<std::uint8_t> targets(Sk + (flags & 16 ? 1 : 0));
          for (auto& t : targets) t = in.u8() & 1;
          const double p = flags & 8 ? 0.0 : double(in.u8()) / 200;
          fovea::var_attention(Q, K, V, O, {.p = p, .sink_keys = sinks, .target_keys = targets,
                                            .attention = softmax_options_used});
          identity_calibration = p == 0.0;
        }
        break;
      }
      case 23: {  // DHSA: equal chunks or boundaries from the bytes (maybe invalid), N_b
        fovea::dhsa_options o{.causal = causal, .chunk_size = index_t(in.u8() % 12) - 1,
                              .top_keys = index_t(in.u8() % 40) - 1, .scale = scale,
                              .threads = 1 + (flags & 1)};
        if (flags & 4) {
          for (index_t at = 0; at < Sk; at += 1 + in.u8() % 9) chunk_starts.push_back(at);
          if (!(flags & 8)) chunk_starts.push_back(Sk);  // else an error (no last entry)
          o.boundaries = chunk_starts;
        }
        fovea::dhsa_attention(Q, K, V, O, o);
        dhsa_chosen = fovea::dhsa_select(Q, K, o);
        break;
      }
      case 24: {  // Landmark: block size, top_k, local blocks from the bytes (maybe invalid)
        fovea::landmark_options o{.block_size = index_t(in.u8() % 9) - 1,
                                  .top_k = index_t(in.u8() % 6) - 1,
                                  .local_blocks = index_t(in.u8() % 3), .grouped = (flags & 4) != 0,
                                  .scale = scale, .threads = 1 + (flags & 1)};
        fovea::landmark_attention(Q, K, V, O, o);
        landmark_used = o;
        break;
      }
      default: {  // routing's strictly causal decode over a cache of K
        fovea::routing_centroids mu(std::max<index_t>(H, 1), 1 + in.u8() % 4,
                                    std::max<index_t>(D, 1));
        for (index_t h = 0; h < mu.heads(); ++h)
          for (index_t c = 0; c < mu.clusters(); ++c) mu.centroid(h, c)[0] = 1.f;
        fovea::routing_cache cache(mu, std::max<index_t>(B, 1), std::max<index_t>(Hk, 1));
        cache.append(K);
        fovea::routing_decode(Q, K, V, O, cache, {.scale = scale});
        break;
      }
    }
  } catch (const fovea::error&) {
    threw = true;
  }
  if (threw) {
    for (float x : out)
      if (x != -12345.f) fail("output written before fovea::error");
    for (fovea::bfloat16 x : bf16_out)
      if (float(x) != -2.0f) fail("bf16 output written before fovea::error");
    if (aliased && std::memcmp(q.data(), q_before.data(), q.size() * 4) != 0)
      fail("aliased input written before fovea::error");
    return 0;
  }
  const bool out_empty = B * H * Sq * Dv == 0;
  if (aliased && !out_empty && B * H * Sq * D > 0) fail("an output aliasing q was accepted");
  if (layout == 3 && !out_empty && B * H > 1) fail("a self-overlapping output was accepted");
  std::vector<float> got;
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Sq; ++i)
        for (index_t e = 0; e < Dv; ++e) got.push_back(O(b, h, i, e));
  if (kernel <= 1) {
    const fovea::softmax_options o{.causal = causal, .scale = scale};
    const auto want = fovea::test::reference_softmax<double>(Q, K, V, o);
    const auto naive = fovea::test::reference_softmax<float>(Q, K, V, o);
    const bool other_options = kernel == 0 ? (flags & 12) != 0 : (flags & 16) != 0;
    // Near the float range, summation order alone decides what overflows: compare there
    // only inputs whose products and sums stay far from it.
    if (!other_options && tame && (!scale || *scale < 1e6))
      check_tolerance(got, want.out, naive.out);
  } else if ((kernel == 20 || (kernel == 21 && !(flags & 4)) || (kernel == 22 && identity_calibration)) &&
             tame && (!scale || *scale < 1e6)) {
    // the head-sparse mode: weight x softmax (0 exactly where the weight is 0); prob_mod's
    // identity and ACT / VAR that move nothing: softmax attention
    auto want = fovea::test::reference_softmax<double>(Q, K, V, softmax_options_used);
    auto naive = fovea::test::reference_softmax<float>(Q, K, V, softmax_options_used);
    if (kernel == 20)
      for (std::size_t r = 0; r < std::size_t(B * H * Sq); ++r)
        for (index_t e = 0; e < Dv; ++e) {
          const std::size_t at = r * std::size_t(Dv) + std::size_t(e);
          if (row_weights[r] == 0.f && got[at] != 0.f) fail("a skipped row was written nonzero");
          want.out[at] *= row_weights[r];
          naive.out[at] *= row_weights[r];
        }
    if (kernel != 20 || moderate) check_tolerance(got, want.out, naive.out);
  } else if (kernel == 23 && dhsa_chosen && tame && (!scale || *scale < 1e6)) {
    // DHSA: dense attention over exactly the chunks it kept
    const fovea::dhsa_selection& sel = *dhsa_chosen;
    const index_t off = Sk - Sq;
    const auto kept = fovea::with_mask_mod([&](index_t b, index_t h, index_t i, index_t j) {
      if (i + off < 0) return false;
      const auto c = sel.kept(b, h, sel.chunk_of(i + off));
      return std::binary_search(c.begin(), c.end(), std::int32_t(sel.chunk_of(j)));
    });
    const fovea::softmax_options o{.causal = causal, .scale = scale};
    check_tolerance(got, fovea::test::reference_softmax<double>(Q, K, V, o, kept).out,
                    fovea::test::reference_softmax<float>(Q, K, V, o, kept).out);
  } else if (kernel == 24 && landmark_used) {
    // a reused selection gives the same bits; the flat softmax is dense attention over
    // the retrieved blocks and the local keys
    const fovea::landmark_options& o = *landmark_used;
    const fovea::landmark_selection sel = fovea::landmark_select(Q, K, o);
    std::vector<float> again(out.size(), -12345.f);
    const auto A2 = make(again.data(), H, Sq, Dv);
    fovea::landmark_attention(Q, K, V, A2, sel, o);
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < H; ++h)
        for (index_t i = 0; i < Sq; ++i)
          for (index_t e = 0; e < Dv; ++e)
            if (std::memcmp(&A2(b, h, i, e), &O(b, h, i, e), sizeof(float)) != 0)
              fail("Landmark with its own selection differs from one call");
    if (!o.grouped && tame && (!scale || *scale < 1e6)) {
      const index_t off = Sk - Sq, L = o.block_size;
      const auto seen = fovea::with_mask_mod([&](index_t b, index_t h, index_t i, index_t j) {
        const index_t p = i + off;
        const index_t local = p < 0 ? 0 : std::max<index_t>(0, p / L - (o.local_blocks - 1));
        if (j >= local * L) return true;
        const auto r = sel.retrieved(b, h, i);
        return std::binary_search(r.begin(), r.end(), std::int32_t(j / L));
      });
      const fovea::softmax_options so{.causal = true, .scale = scale};
      check_tolerance(got, fovea::test::reference_softmax<double>(Q, K, V, so, seen).out,
                      fovea::test::reference_softmax<float>(Q, K, V, so, seen).out);
    }
  } else if (kernel == 25 && bf16_ran && tame && (!scale || *scale < 1e6)) {
    // bf16 arithmetic on the rounded values: the probabilities rounded to bf16 move an
    // output by at most 2^-9 max |v| (they sum to 1), a bf16 output by 2^-9 of itself
    const fovea::softmax_options o{.causal = causal, .scale = scale};
    const auto want = fovea::test::reference_softmax<double>(Q, K, V, o);
    const auto naive = fovea::test::reference_softmax<float>(Q, K, V, o);
    double v_max = 0, out_max = 0;
    for (float e : v)
      if (std::isfinite(e)) v_max = std::max(v_max, double(std::abs(e)));
    for (double e : want.out)
      if (std::isfinite(e)) out_max = std::max(out_max, std::abs(e));
    check_tolerance(got, want.out, naive.out, std::ldexp(v_max + out_max, -8));
  } else if (kernel == 14 && hip_over_cache) {  // the same call on the dequantized values
    fovea::hip_options o = *hip_over_cache;
    o.k_scale = o.v_scale = {};
    std::vector<float> again(got.size());
    fovea::hip_attention(Q, fovea::bhsd<const float>(quantized_k.data(), B, Hk, Sk, D),
                         fovea::bhsd<const float>(quantized_v.data(), B, Hk, Sk, Dv),
                         fovea::bhsd(again.data(), B, H, Sq, Dv), o);
    if (!got.empty() && std::memcmp(got.data(), again.data(), got.size() * sizeof(float)) != 0) {
      for (std::size_t i = 0; i < got.size(); ++i)
        if (std::memcmp(&got[i], &again[i], sizeof(float)) != 0) {
          describe("first_difference_at", i);
          describe("over_cache", got[i]);
          describe("over_values", again[i]);
          break;
        }
      fail("HiP over a quantized cache differs from HiP over its dequantized values");
    }
  } else if (kernel == 14 && tame && (!scale || *scale < 1e6) &&
             !q8_0_beyond_range) {  // on the dequantized values
    const fovea::softmax_options o{.causal = causal, .scale = scale};
    const auto Kd = fovea::bhsd<const float>(quantized_k.data(), B, Hk, Sk, D);
    const auto Vd = fovea::bhsd<const float>(quantized_v.data(), B, Hk, Sk, Dv);
    std::vector<fovea::block_q8_0> q_blocks(q8_0_queries ? B * H * Sq * D / 32 : 0);
    std::vector<float> q_rounded(q8_0_queries ? B * H * Sq * D : 0);
    const auto Qr = fovea::bhsd<const float>(q_rounded.data(), B, H, Sq, D);
    if (q8_0_queries) {  // the query the q8_0 products score: q rounded to q8_0
      fovea::quantize(Q, fovea::bhsd(q_blocks.data(), B, H, Sq, D));
      fovea::dequantize(fovea::bhsd<const fovea::block_q8_0>(q_blocks.data(), B, H, Sq, D),
                        fovea::bhsd(q_rounded.data(), B, H, Sq, D));
    }
    const auto want = fovea::test::reference_softmax<double>(q8_0_queries ? Qr : Q, Kd, Vd, o);
    const auto naive = fovea::test::reference_softmax<float>(q8_0_queries ? Qr : Q, Kd, Vd, o);
    check_tolerance(got, want.out, naive.out);
  } else if ((kernel == 15 || kernel == 19) && backward_ran && moderate && (!scale || *scale < 1e3)) {
    const auto dO = fovea::bhsd<const float>(dout.data(), B, H, Sq, Dv);
    bool small = true;  // gradients of moderate inputs may still overflow with large dO
    for (float e : dout) small = small && std::abs(e) < 1e3f;
    if (small) {
      // dynamic-mask: softmax attention with the bias, over the keys each row keeps
      fovea::softmax_options o = softmax_options_used;
      fovea::test::kept_sets kept{H, Sq, Sk, std::vector<std::uint8_t>(B * H * Sq * Sk, 1)};
      if (kernel == 19) {
        const auto bias = fovea::bhsd<const float>(dma_bias.data(), B, Hk, 1, Sk);
        o = {.causal = causal, .scale = scale, .bias = bias};
        kept = fovea::test::select_top(B, H, Hk, Sq, Sk, dma_options_used.keep, causal, bias, {});
      }
      const auto mask = fovea::with_mask_mod(kept);
      const auto want = fovea::test::reference_softmax_backward<double>(Q, K, V, dO, o, mask);
      const auto naive = fovea::test::reference_softmax_backward<float>(Q, K, V, dO, o, mask);
      auto dense = [&](const std::vector<float>& g, index_t b, index_t h, index_t n, index_t d) {
        return std::vector<float>(g.begin(), g.begin() + b * h * n * d);
      };
      // delta = dO . O carries O's rounding (a few ulp of |dO| |V|) into every dS: where the
      // exact gradient cancels to ~0 that is the error's scale, not the gradient's
      auto largest = [](const std::vector<float>& x) {
        double m = 0;
        for (float e : x) m = std::max(m, double(std::abs(e)));
        return m;
      };
      const double logit_scale = scale ? *scale : 1.0 / std::sqrt(double(std::max<index_t>(D, 1)));
      // (dq sums over keys; dk and dv over the query rows of a key/value head's group)
      const index_t summed = std::max({Sk, Sq * (Hk > 0 ? H / Hk : 1), index_t(1)});
      const double terms = largest(dout) * largest(v) * double(summed) *
                           std::max({1.0, largest(q), largest(k)}) * std::max(1.0, logit_scale);
      const double floor = 1e-6 * terms;
      check_tolerance(dense(grad_q, B, H, Sq, D), want.dq, naive.dq, floor);
      check_tolerance(dense(grad_k, B, Hk, Sk, D), want.dk, naive.dk, floor);
      check_tolerance(dense(grad_v, B, Hk, Sk, Dv), want.dv, naive.dv, floor);
    }
  } else if (kernel == 5 && moderate) {  // (kernel-specific overflow order otherwise)
    const fovea::linear_options o{.causal = causal};
    check_tolerance(got, fovea::test::reference_linear<double>(Q, K, V, o),
                    fovea::test::reference_linear<float>(Q, K, V, o));
  }
  if (moderate && (!scale || *scale < 1e3))
    for (float x : got)
      if (!std::isfinite(x)) fail("non-finite output from moderate inputs");
  return 0;
}
