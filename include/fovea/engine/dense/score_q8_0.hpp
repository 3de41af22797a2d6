// Decode logits of q8_0 key rows in integers (softmax_options::q8_0_products), as
// llama.cpp's CPU attention scores a q8_0 cache: each query row is quantized to q8_0
// blocks exactly as fovea::quantize writes them (llama.cpp's vec_dot_type for q8_0 keys),
// each block's dot product is summed exactly in int32, and the blocks are combined in fp32,
// in block order:
//   logit = fma(float(isum_b), d_q,b * d_k,b, logit)   for b = 0, 1, ..., D / 32 - 1
// (from 0; the d's are the blocks' fp16 scales as fp32, an infinite one taken as NaN: so a
// block beyond q8_0's range poisons its logits, as its dequantized values, 0 * inf among
// them, would, instead of giving +-inf, which would hide the key or fill the row). The
// operations are the same on
// every target, so every target gives the same bits: AVX512-VNNI scores 16 keys at once
// (their 4-byte quads transposed in registers, the keys as vpdpbusd's unsigned operand:
// k XOR 0x80 = k + 128, with 128 times the query block's sum taken off); elsewhere
// q8_0_logit computes the same integers one key at a time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../../core/cache_types.hpp"
#include "../../core/quantized_rows.hpp"
#include "../../core/tensor_view.hpp"
#include "../../simd/dequantize.hpp"  // block_scale
#include "../../simd/vec.hpp"
#include "../select/score_int8.hpp"  // FOVEA_HAS_INT8_DOT

namespace fovea::detail {

/// A block's scale as the integer products use it: fp32, NaN unless finite.
inline float product_scale(float d) noexcept {
  return std::isfinite(d) ? d : std::numeric_limits<float>::quiet_NaN();
}

/// Query rows quantized to q8_0, `blocks` blocks per row, with each block's scale as the
/// products use it (product_scale) and the sum of its 32 values.
struct q8_0_queries {
  const block_q8_0* rows;
  const float* scales;
  const std::int32_t* sums;
  index_t blocks;
};

/// Quantizes `columns` query rows (dq apart, D % 32 == 0 long) into q8_0 rows as
/// fovea::quantize does, with their scales and block sums. Blocks of finite values are
/// scaled and rounded in vector lanes (decode quantizes its queries once per key chunk,
/// 64 chunks per kv head then: the scalar loop, left unvectorised by GCC -O2, was ~10% of
/// q8_0 decode);
/// the others, and scales whose reciprocal overflows, go through quantize_row. The same
/// bytes either way (see int8_rounder).
template <class Backend>
void quantize_queries_q8_0(const float* q, index_t dq, index_t columns, index_t D,
                           block_q8_0* rows, float* scales, std::int32_t* sums) noexcept {
  using V = vec<float, Backend>;
  constexpr int B = block_q8_0::size, W = V::width;
  static_assert(B % W == 0);
  const index_t blocks = D / B;
  for (index_t c = 0; c < columns; ++c) {
    block_q8_0* row = rows + c * blocks;
    for (index_t b = 0; b < blocks; ++b) {
      const float* in = q + c * dq + b * B;
      block_q8_0& blk = row[b];
      auto amax = V::broadcast(0.0f);
      bool finite = true;
#pragma GCC unroll 4
      for (int i = 0; i < B; i += W) {
        const auto x = V::load(in + i);
        finite = finite && !V::any(V::not_equal(V::sub(x, x), V::broadcast(0.0f)));
        amax = V::max(amax, V::abs(x));
      }
      const float d = V::reduce_max(amax) / 127.0f, inverse = d != 0 ? 1.0f / d : 0.0f;
      if (finite && !std::isinf(inverse)) {
        blk.d = half(d);
        const auto scale = V::broadcast(inverse);
#pragma GCC unroll 4
        for (int i = 0; i < B; i += W) V::store_int8(blk.qs + i, V::mul(V::load(in + i), scale));
      } else {
        quantize_row(in, B, &blk);
      }
      scales[c * blocks + b] = product_scale(float(blk.d));
      std::int32_t sum = 0;
      for (int i = 0; i < B; ++i) sum += blk.qs[i];
      sums[c * blocks + b] = sum;
    }
  }
}

/// The logit of one key row against one quantized query row (the definition above).
inline float q8_0_logit(const block_q8_0* key, const block_q8_0* query, const float* query_scales,
                        index_t blocks) noexcept {
  float logit = 0;
  for (index_t b = 0; b < blocks; ++b) {
    std::int32_t sum = 0;
    for (int i = 0; i < block_q8_0::size; ++i)
      sum += std::int32_t(key[b].qs[i]) * std::int32_t(query[b].qs[i]);
    logit = std::fma(float(sum), product_scale(float(key[b].d)) * query_scales[b], logit);
  }
  return logit;
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(FOVEA_FORCE_SCALAR)
#include <immintrin.h>
#define FOVEA_HAS_Q8_0_DOT_AVX2 1

/// s[c * ld] = q8_0_logit of one key row against the quantized query rows c < columns,
/// four columns at a time with AVX2's byte products (no VNNI): per block, |k| (unsigned)
/// times the query's bytes with k's signs (vpmaddubsw: products of at most 128 * 127, pairs
/// below 2^15, so exact, also for a key byte of -128; queries never hold -128), pairs added
/// by vpmaddwd, the four columns' lanes reduced together by vphaddd; then each block's fma
/// in fp32, in block order: q8_0_logit's integers and operations, so the same bits.
inline void q8_0_logits_avx2(const block_q8_0* key, const q8_0_queries& q, index_t columns,
                             float* s, index_t ld) noexcept {
  const __m256i ones = _mm256_set1_epi16(1);
  for (index_t c0 = 0; c0 < columns; c0 += 4) {
    const index_t m = std::min<index_t>(4, columns - c0);
    __m128 logit = _mm_setzero_ps();
    // Lanes past the last column repeat it (computed, never stored), so that the four
    // columns' factors are one vector multiply: filled lane by lane through memory, the
    // 16-byte load waited for four scalar stores, a store-forwarding stall per block (AVX2
    // q8_0_products decode, Sk = 32768, D = 128, medians of 9 interleaved: 1 thread 15.8 ->
    // 9.88 ms, 2 threads 8.18 -> 5.05).
    auto at = [&](int c, index_t b) { return (c0 + std::min<index_t>(c, m - 1)) * q.blocks + b; };
    for (index_t b = 0; b < q.blocks; ++b) {
      const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key[b].qs));
      const __m256i magnitude = _mm256_sign_epi8(k, k);
      __m256i sum[4];
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.rows[at(c, b)].qs));
        sum[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, k)), ones);
      }
      const __m128 query_scales =
          _mm_setr_ps(q.scales[at(0, b)], q.scales[at(1, b)], q.scales[at(2, b)], q.scales[at(3, b)]);
      const __m128 factor = _mm_mul_ps(_mm_set1_ps(product_scale(block_scale(key[b].d))), query_scales);
      // [a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7]: the halves' sum is each column's.
      const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(sum[0], sum[1]), _mm256_hadd_epi32(sum[2], sum[3]));
      const __m128i isum = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
      logit = _mm_fmadd_ps(_mm_cvtepi32_ps(isum), factor, logit);
    }
    alignas(16) float lanes[4];
    _mm_store_ps(lanes, logit);
    for (index_t c = 0; c < m; ++c) s[(c0 + c) * ld] = lanes[c];
  }
}
#else
#define FOVEA_HAS_Q8_0_DOT_AVX2 0
#endif

#if FOVEA_HAS_INT8_DOT

/// t[i] = quad i of the 32-byte blocks of 16 rows, lane r = row r, XOR 0x80 per byte (the
/// unsigned operand of vpdpbusd), from the rows' block `b`. rows[8] loads are paired per
/// register as [rows 0-3, 8-11 | rows 4-7, 12-15] halves so that, after the 8 x 8 dword
/// transposes within each 256-bit half, one 128-bit shuffle per quad puts the rows in
/// lane order.
[[gnu::always_inline]] inline void transposed_quads(const block_q8_0* const* rows, index_t b,
                                                    __m512i (&t)[8]) noexcept {
  constexpr int low[8] = {0, 1, 2, 3, 8, 9, 10, 11}, high[8] = {4, 5, 6, 7, 12, 13, 14, 15};
  __m512i a[8], c[8];
#pragma GCC unroll 8
  for (int r = 0; r < 8; ++r)
    t[r] = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[low[r]][b].qs))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[high[r]][b].qs)), 1);
#pragma GCC unroll 4
  for (int r = 0; r < 8; r += 2) {  // [x0 y0 x1 y1] per 128-bit lane
    a[r] = _mm512_unpacklo_epi32(t[r], t[r + 1]);
    a[r + 1] = _mm512_unpackhi_epi32(t[r], t[r + 1]);
  }
#pragma GCC unroll 2
  for (int g = 0; g < 8; g += 4) {  // quads 0..3 (and 4..7 in the upper 128-bit lanes)
    c[g + 0] = _mm512_unpacklo_epi64(a[g + 0], a[g + 2]);
    c[g + 1] = _mm512_unpackhi_epi64(a[g + 0], a[g + 2]);
    c[g + 2] = _mm512_unpacklo_epi64(a[g + 1], a[g + 3]);
    c[g + 3] = _mm512_unpackhi_epi64(a[g + 1], a[g + 3]);
  }
  const __m512i offset = _mm512_set1_epi32(int(0x80808080u));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_xor_si512(_mm512_shuffle_i32x4(c[i], c[i + 4], 0x88), offset);
    t[i + 4] = _mm512_xor_si512(_mm512_shuffle_i32x4(c[i], c[i + 4], 0xDD), offset);
  }
}

/// The byte offsets of 16 rows from rows[0], as two vectors of 8 (for the scale gathers).
struct row_offsets {
  __m512i low, high;
  /// Rows anywhere (paged): from the pointers.
  static row_offsets of(const block_q8_0* const* rows) noexcept {
    alignas(64) std::int64_t at[16];
    const char* base = reinterpret_cast<const char*>(rows[0]);
    for (int r = 0; r < 16; ++r) at[r] = reinterpret_cast<const char*>(rows[r]) - base;
    return {_mm512_load_si512(at), _mm512_load_si512(at + 8)};
  }
  /// Rows `bytes` apart, lanes from n on repeating row n - 1: in registers (through memory,
  /// as above, the vector loads wait for the scalar stores to retire).
  static row_offsets strided(index_t bytes, index_t n) noexcept {
    const __m512i last = _mm512_set1_epi64(n - 1), step = _mm512_set1_epi64(bytes);
    const __m512i low = _mm512_min_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), last);
    const __m512i high = _mm512_min_epi64(_mm512_set_epi64(15, 14, 13, 12, 11, 10, 9, 8), last);
    return {_mm512_mul_epu32(low, step), _mm512_mul_epu32(high, step)};
  }
};

/// s[c * ld + r] (r < 16; lanes past the real rows are written too) = the logits of the 16
/// key rows `rows` (at `offsets` bytes from rows[0]) against the quantized query rows c <
/// columns. prefetch.step() is called once per block.
template <class Prefetch>
void q8_0_logits_16(const block_q8_0* const* rows, const row_offsets& offsets, const q8_0_queries& q,
                    index_t columns, float* s, index_t ld, Prefetch& prefetch) noexcept {
  const char* base = reinterpret_cast<const char*>(rows[0]);
  for (index_t b = 0; b < q.blocks; ++b) {
    prefetch.step();
    __m512i t[8];
    transposed_quads(rows, b, t);
    const char* at = base + b * index_t(sizeof(block_q8_0));  // d is each block's first field
    const __m512i d = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_i64gather_epi32(offsets.low, at, 1)),
                                         _mm512_i64gather_epi32(offsets.high, at, 1), 1);
    __m512 key_scales = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(d));
    key_scales = _mm512_mask_mov_ps(  // product_scale: infinities become NaN
        key_scales, _mm512_cmp_ps_mask(_mm512_sub_ps(key_scales, key_scales), _mm512_setzero_ps(), _CMP_UNORD_Q),
        _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
    for (index_t c = 0; c < columns; ++c) {
      const block_q8_0& qb = q.rows[c * q.blocks + b];
      __m512i sum = _mm512_set1_epi32(-128 * q.sums[c * q.blocks + b]);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        std::int32_t quad;
        std::memcpy(&quad, qb.qs + 4 * i, sizeof quad);
        dpbusd(sum, t[i], _mm512_set1_epi32(quad));
      }
      const __m512 factor = _mm512_mul_ps(key_scales, _mm512_set1_ps(q.scales[c * q.blocks + b]));
      float* out = s + c * ld;
      const __m512 before = b == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(out);
      _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), factor, before));
    }
  }
}

#endif

}  // namespace fovea::detail
