// Decode: few queries (Sq <= 16) against a long key/value sequence. The query heads that
// share a key/value head are stacked as columns of one tile, so K and V are read once for
// all of them; scores are dot products along the head dim (keys land in the SIMD lanes,
// then in the usual [key][column] tile, so the logit modifiers and online softmax are
// the prefill ones); P V runs with the output rows along the lanes. The keys are split
// into chunks of a size fixed by Sk alone; each chunk leaves a partial state (m, l, acc)
// and the chunks are merged in order, so any thread count gives the same bits.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../../core/scratch.hpp"
#include "../../core/tensor_view.hpp"
#include "../../simd/prefetch.hpp"
#include "../tile/gemm_tile.hpp"
#include "key_band.hpp"
#include "../kv/kv_source.hpp"
#include "logits.hpp"
#include "online_softmax.hpp"
#include "prefill.hpp"
#include "dot_scores.hpp"
#include "query_columns.hpp"
#include "score_q8_0.hpp"
#include "quantized_values.hpp"
#include "../../simd/bf16_pairs.hpp"
#include "../kv/stage.hpp"
#include "../tile/tile_traits.hpp"

namespace fovea::detail {

/// Queries per problem up to which the decode path is taken.
inline constexpr index_t decode_max_queries = 16;
/// Keys per decode tile: larger than prefill's, since a decode tile has few columns and
/// its per-tile work (rescale, calls, prefetch) is then spread over more keys.
inline constexpr index_t decode_block_k = 256;
/// How far ahead of the keys being scored their successors' rows are asked for (spread
/// through the scoring loop, see spread_prefetch): the hardware prefetcher alone leaves
/// the scoring loop waiting on memory (Sk = 32768, D = 128, fp32 on the reference machine:
/// ~1.4x faster with; 8 or 64 keys ahead are slower).
inline constexpr index_t decode_prefetch_keys = 16;
/// Rows up to this many bytes (bf16 D = 128, fp32 D = 64) are asked for further ahead,
/// keys and values into L2 (bf16: 25% faster than keys into L1; 32 to 96 keys ahead
/// measured the same on one thread, 16 slower, 64 7% slower on two); values with the keys while
/// scoring, or during P V after the short scoring loop of bf16 pairs (see decode_value_group).
/// Longer rows: keys into L1 only, values left to the hardware prefetcher (fp32 D = 128: 14% slower
/// with values, 20% with keys into L2).
inline constexpr index_t decode_prefetch_value_bytes = 256;
inline constexpr index_t decode_prefetch_short_keys = 32;
/// dot_scores steps the prefetch once per this many vector steps along the key rows, so
/// each step asks for about a line of each stream: its bookkeeping cost as much as the
/// FMAs when it ran with every step (AVX2, 8 FMAs per step). Decode, Sk = 32768, H = 32,
/// Hk = 8, D = 128, AVX2, against every step: fp32 rows (2 steps) 1.03x, bf16 (4 steps)
/// 1.35x faster, q8_0 1.3x; fp32 with 4 was 8% slower than with 2 (bytes per value decide:
/// a q8_0 block is 34 bytes for 32 values).
template <class K>
inline constexpr index_t decode_prefetch_parts = storage_bytes<K>(64) >= 256 ? 2 : 4;
/// Short bf16 value rows scored by vdpbf16ps are asked for a tile ahead during P V, which
/// then runs in groups of this many keys per four columns, each group pacing its share of
/// the requests through its micro-kernel calls: so the memory is kept busy in both halves
/// of a tile (the scoring loop is then the shorter one), neither issuing its requests in a
/// burst (bf16, Sk = 32768, D = 128, 4 columns: 8-14% faster than values asked for with the
/// keys while scoring; D = 64 the same; groups of 4, 24 or 32 keys were slower, of 8 or 12
/// a little slower; in cache, the groups' calls cost 4-5%). Where scoring takes longer
/// (fp32 rows, fp16 converted in the scoring loop) this was up to 9% slower (D = 64), and
/// with two threads 10-20% slower: while one thread's P V leaves the memory idle, the
/// other's scoring uses it.
inline constexpr index_t decode_value_group = 16;

/// Quantized key and value rows are dequantized this many at a time into the first rows
/// of the stage and used at once, so they are read back from L1 (a whole tile of float
/// rows, 128 KB at D = 128, went out to L2 and back).
inline constexpr index_t decode_strip = 32;

/// Per-thread buffers of a decode tile: up to `capacity` columns.
template <class T, class Backend>
struct decode_buffers {
  static constexpr index_t capacity = query_columns<T>::capacity;
  static constexpr index_t BK = decode_block_k;
  static constexpr int W = vec<T, Backend>::width;

  static index_t padded(index_t n) noexcept { return (n + W - 1) / W * W; }
  /// Elements of T holding the query rows as q8_0 (blocks, their scales and sums).
  static index_t q8_0_size(index_t D) noexcept {
    const index_t blocks = capacity * (D / block_q8_0::size);
    const index_t bytes = blocks * index_t(sizeof(block_q8_0) + sizeof(float) + sizeof(std::int32_t));
    return round_to_line<T>((bytes + index_t(sizeof(T)) - 1) / index_t(sizeof(T)));
  }
  /// The regions' lengths in elements of T, in their order in the buffer (see the members).
  static std::array<index_t, 11> regions(index_t D, index_t Dv) noexcept {
    const index_t dq = padded(D), dvp = padded(Dv);
    return {round_to_line<T>(capacity * dq),  BK * capacity, BK * capacity,
            round_to_line<T>(capacity * dvp), capacity,      capacity,
            capacity,                         round_to_line<T>(BK * dq),
            round_to_line<T>(BK * dvp),       round_to_line<T>(capacity * bf16_pairs(dq)),
            q8_0_size(D)};
  }
  static index_t size(index_t D, index_t Dv) noexcept {
    index_t total = 0;
    for (index_t n : regions(D, Dv)) total += n;
    return total;
  }
  index_t dq, dvp;
  T* q;                    ///< [capacity][dq] query rows
  T *s, *p;                ///< [capacity][BK] logits, probabilities
  T* acc;                  ///< [capacity][dvp] unnormalised output rows
  T *m, *l, *alpha;        ///< [capacity] running maxima, sums, rescale factors
  T *stage_k, *stage_v;    ///< [BK][dq], [BK][dvp] converted key and value rows
  std::uint32_t* q_pairs;  ///< [capacity][bf16_pairs(dq)] query rows for bf16_pair_dot
  float* q8_0_scales;      ///< [capacity][D / 32] the query rows as q8_0 (q8_0_products)
  std::int32_t* q8_0_sums;
  block_q8_0* q8_0_rows;
  index_t q8_0_blocks;
  decode_buffers(T* work, index_t D, index_t Dv) noexcept
      : dq(padded(D)), dvp(padded(Dv)), q8_0_blocks(D / block_q8_0::size) {
    const auto lengths = regions(D, Dv);
    std::size_t i = 0;
    auto next = [&] {
      T* region = work;
      work += lengths[i++];
      return region;
    };
    q = next();
    s = next();
    p = next();
    acc = next();
    m = next();
    l = next();
    alpha = next();
    stage_k = next();
    stage_v = next();
    q_pairs = reinterpret_cast<std::uint32_t*>(next());
    const index_t blocks = capacity * q8_0_blocks;
    q8_0_scales = reinterpret_cast<float*>(next());
    q8_0_sums = reinterpret_cast<std::int32_t*>(q8_0_scales + blocks);
    q8_0_rows = reinterpret_cast<block_q8_0*>(q8_0_sums + blocks);
  }
  q8_0_queries q8_0() const noexcept { return {q8_0_rows, q8_0_scales, q8_0_sums, q8_0_blocks}; }
};

/// A partial state as stored between the chunk pass and the merge: m, l, acc[Dv].
template <class T>
constexpr index_t partial_size(index_t Dv) noexcept {
  return Dv + 2;
}

/// The products a decode tile may use instead of fp32 ones on converted rows.
struct decode_products {
  bool bf16_pairs = false;  ///< bf16 keys in bf16 pairs (queries rounded to bf16), D % 32 == 0
  bool q8_0 = false;        ///< q8_0 keys in integers against q8_0 queries (score_q8_0.hpp)
};

/// Logits of the q8_0 key rows [j0, j0 + keys) against the quantized query rows c <
/// columns into s[c * ld + r]: 16 keys at a time with AVX512-VNNI on an AVX-512 backend
/// (prefetch.start(r, n, blocks) before keys [r, r + n), step() per block), one at a time
/// with AVX2 (four columns per pass) or in plain C++ elsewhere; the same bits every way.
template <class Backend, class VS, class Prefetch>
void q8_0_scores(const kv_source<block_q8_0, VS>& kv, index_t j0, index_t keys,
                 const q8_0_queries& q, index_t columns, float* s, index_t ld,
                 [[maybe_unused]] Prefetch&& prefetch) noexcept {
#if FOVEA_HAS_INT8_DOT
  if constexpr (sizeof(typename vec<float, Backend>::type) == 64) {
    // Scale offsets from one stride where the rows are evenly spaced in 32 bits, else
    // from each row's pointer (paged, negative or huge strides)
    const index_t row_bytes = kv.k_stride * index_t(sizeof(block_q8_0));
    const bool gathered = kv.pages || row_bytes < 0 || row_bytes >= (index_t(1) << 32);
    for (index_t r0 = 0; r0 < keys; r0 += 16) {
      const index_t n = std::min<index_t>(16, keys - r0);
      prefetch.start(r0, n, q.blocks);
      const block_q8_0* rows[16];
      for (index_t r = 0; r < 16; ++r) rows[r] = kv.k_row(j0 + r0 + std::min(r, n - 1));
      const row_offsets offsets =
          gathered ? row_offsets::of(rows) : row_offsets::strided(row_bytes, n);
      q8_0_logits_16(rows, offsets, q, columns, s + r0, ld, prefetch);
    }
    return;
  }
#endif
#if FOVEA_HAS_Q8_0_DOT_AVX2
  // One key at a time, four columns per pass (score_q8_0.hpp), asking for the rows ahead
  // as the 16-key path does: start per vector width of keys (the prefetch's row limit), a
  // step per key for the first blocks. (The scalar backend keeps the plain loop.)
  if constexpr (vec<float, Backend>::width >= 8) {
    constexpr index_t group = vec<float, Backend>::width;
    for (index_t r0 = 0; r0 < keys; r0 += group) {
      const index_t n = std::min<index_t>(group, keys - r0);
      prefetch.start(r0, n, q.blocks);
      for (index_t r = r0; r < r0 + n; ++r) {
        if (r - r0 < q.blocks) prefetch.step();
        q8_0_logits_avx2(kv.k_row(j0 + r), q, columns, s + r, ld);
      }
    }
    return;
  }
#endif
  for (index_t r = 0; r < keys; ++r) {
    const block_q8_0* row = kv.k_row(j0 + r);
    for (index_t c = 0; c < columns; ++c)
      s[c * ld + r] = q8_0_logit(row, q.rows + c * q.blocks, q.scales + c * q.blocks, q.blocks);
  }
}

/// Attends the columns `cols` (query rows already in buf.q) over keys [first, last) and
/// stores each column's partial state at partials + c * partial_size(Dv). Keys up to
/// `stream_end` may be prefetched (the next chunks of the same stream); `alone`: no other
/// thread is reading memory for this call (see decode_value_group); `products`: bf16 keys
/// are scored in bf16 pairs (the queries rounded to bf16) when D is a multiple of 32, q8_0
/// keys in integers against the queries quantized to q8_0.
template <class Backend, class T, class KS, class VS, class ScoreMod, class MaskMod>
void decode_chunk(const query_columns<T>& cols, const kv_source<KS, VS>& kv, const key_band& band,
                  const custom_variant<ScoreMod, MaskMod>& custom, index_t D, index_t Dv,
                  index_t first, index_t last, index_t stream_end, bool alone,
                  [[maybe_unused]] decode_products products, decode_buffers<T, Backend>& buf,
                  T* partials) noexcept {
  using V = vec<T, Backend>;
  constexpr int W = V::width;
  constexpr index_t ld = decode_buffers<T, Backend>::BK;
  const index_t n = cols.count, dq = buf.dq, dvp = buf.dvp;
  std::fill(buf.acc, buf.acc + n * dvp, T(0));
  std::fill(buf.m, buf.m + n, -std::numeric_limits<T>::infinity());
  std::fill(buf.l, buf.l + n, T(0));
  [[maybe_unused]] bool pairs_ready = false;  // bf16 keys read in place in whole 32-element steps
#if FOVEA_HAS_BF16_DOT
  if constexpr (bf16_dot_applies<T, Backend, KS>()) {
    pairs_ready = products.bf16_pairs && D % bf16_pair_dot<Backend>::step == 0;
    constexpr index_t CQ = score_block_columns<T, Backend>();
    if (pairs_ready)
      for (index_t c = 0; c < (n + CQ - 1) / CQ * CQ; ++c)
        to_bf16_pairs(buf.q + c * dq, D, buf.q_pairs + c * bf16_pairs(dq));
  }
#endif
  constexpr bool q8_0_keys = std::is_same_v<KS, block_q8_0> && std::is_same_v<T, float>;
  if constexpr (q8_0_keys)
    if (products.q8_0) quantize_queries_q8_0<Backend>(buf.q, dq, n, D, buf.q8_0_rows, buf.q8_0_scales, buf.q8_0_sums);

  // With 16 registers (AVX2) P V keeps 8 accumulators, not 16: with 16, 9 of them went to
  // the stack and back with every key (staged q8_0 rows, Sk = 32768, D = 128: 9% faster
  // with 8; fp32 rows read in place, half rows per pass: 1 thread 15.8 -> 14.1 ms, 2
  // threads 7.81 -> 7.14, in L2 11% faster; medians of 7 interleaved).
  constexpr int half = V::registers >= 32 ? 1 : 2;
  const bool short_rows = storage_bytes<VS>(Dv) <= decode_prefetch_value_bytes;
  const bool values_in_pv = short_rows && pairs_ready && alone && !is_quantized_v<VS>;
  // Value rows P V reads in more than one piece (its blocks are 8 vectors wide: AVX2 at
  // D = 128, AVX-512 at D = 256) are no sequential stream for the hardware prefetcher:
  // asked for into L2 with the keys (Sk = 32768, H = 32, Hk = 8, 1 thread: AVX2 fp32
  // D = 128 19.9 -> 13.6 ms, 2 threads 9.5 -> 7.6; AVX-512 bf16 D = 256 9.8 -> 8.2 ms,
  // fp32 D = 256 the same within noise).
  const bool split_rows = !is_quantized_v<VS> && dvp > 8 * W;
  const index_t distance = short_rows ? decode_prefetch_short_keys : decode_prefetch_keys;
  for (index_t j0 = first; j0 < last;) {
    const index_t keys = std::min(ld, last - j0);  // pages are gathered: the same tiles
    auto prefetch_from = [&](index_t j) {
      return spread_prefetch<KS, VS, W>(kv, j + distance, stream_end, D, Dv, !short_rows,
                                        (short_rows || split_rows) && !values_in_pv);
    };
    if (q8_0_keys && products.q8_0) {
      if constexpr (q8_0_keys)
        q8_0_scores<Backend>(kv, j0, keys, buf.q8_0(), n, buf.s, ld, prefetch_from(j0));
    } else if constexpr (is_quantized_v<KS>) {
      bool in_registers = false;
#if FOVEA_HAS_QUANTIZED_VALUES
      // q8_0 rows, int8 rows, and fp8 rows with one scale for the head, of whole vectors:
      // converted as dot_scores loads them (the same logits), one call per run of rows on
      // a page, with the dot dot_for(j) makes for the run starting at key j.
      auto score_runs = [&](auto dot_for) {
        for (index_t r0 = 0, run; r0 < keys; r0 += run) {
          run = kv.run(j0 + r0, keys - r0);
          dot_scores<T, Backend, decode_prefetch_parts<KS>>(dot_for(j0 + r0), dq, n, kv.k_row(j0 + r0),
                                                            kv.k_stride, run, buf.s + r0, ld, prefetch_from(j0 + r0));
        }
        in_registers = true;
      };
      constexpr bool fp8 = std::is_same_v<KS, e4m3> || std::is_same_v<KS, e5m2>;
      if constexpr ((fp8 || std::is_same_v<KS, block_q8_0>) && quantized_in_registers<T, Backend, KS>()) {
        if (D == dq && (!fp8 || (kv.k_scales.token == 0 && kv.k_scales.page == 0)))
          score_runs([&, dot = quantized_key_dot<Backend, KS>(buf.q, dq, fp8 ? kv.k_scale(j0) : 1.0f)](index_t) {
            return dot;
          });
      } else if constexpr (std::is_same_v<KS, std::int8_t> && quantized_in_registers<T, Backend, KS>()) {
        auto int8_dot = [&]<bool Channels>(index_t j) {
          const auto [scales, stride] = kv.k_scales_from(j);
          return int8_key_dot<Backend, Channels>(buf.q, dq, scales, stride, kv.k_channels);
        };
        if (D == dq && kv.k_channels)
          score_runs([&](index_t j) { return int8_dot.template operator()<true>(j); });
        else if (D == dq)
          score_runs([&](index_t j) { return int8_dot.template operator()<false>(j); });
      }
#endif
      for (index_t r0 = 0; !in_registers && r0 < keys; r0 += decode_strip) {
        const index_t rows = std::min(decode_strip, keys - r0);
        stage_rows(kv, true, j0 + r0, rows, D, dq, buf.stage_k);
        dot_scores<T, Backend, decode_prefetch_parts<KS>>(converting_dot<T, Backend>{buf.q, dq}, dq,
                                                          n, buf.stage_k, dq, rows, buf.s + r0, ld,
                                                          prefetch_from(j0 + r0));
      }
    } else {
      auto ahead = prefetch_from(j0);
      with_rows(kv, true, j0, keys, D, dq, buf.stage_k, [&](const auto* k, index_t stride) {
#if FOVEA_HAS_BF16_DOT
        using K = std::remove_cv_t<std::remove_pointer_t<decltype(k)>>;
        if constexpr (bf16_dot_applies<T, Backend, K>())
          if (pairs_ready)
            return dot_scores<T, Backend, 1>(bf16_pair_dot<Backend>{buf.q_pairs, bf16_pairs(dq)}, D,
                                             n, k, stride, keys, buf.s, ld, ahead);
#endif
        dot_scores<T, Backend, decode_prefetch_parts<KS>>(converting_dot<T, Backend>{buf.q, dq},
                                                          dq, n, k, stride, keys, buf.s, ld, ahead);
      });
    }
    const tile_cuts cuts{!band.covers(cols.first_pos, cols.last_pos + 1, j0, j0 + keys)};
    const bool masked = apply_logits_by_column<Backend>(
        cols, custom, band, cuts, buf.s, ld, [j0](index_t r) { return j0 + r; }, keys);
    if (online_softmax_by_column<T, Backend>(buf.s, buf.p, ld, n, keys, buf.m, buf.l, buf.alpha))
      for (index_t c = 0; c < n; ++c) {
        const auto a = V::broadcast(buf.alpha[c]);
        for (index_t d = 0; d < dvp; d += W)
          V::store(buf.acc + c * dvp + d, V::mul(V::load(buf.acc + c * dvp + d), a));
      }
    // P V: values read as they are go two columns at a time over whole rows (a sequential
    // stream; AVX2: half rows, see `half`); converted ones four columns at a time over
    // half rows, so that each value vector is converted once per four columns (measured,
    // D = 128: the other way round fp32 is 25% slower and bf16 12% slower).
    if constexpr (is_quantized_v<VS>) {
      for (index_t r0 = 0; r0 < keys; r0 += decode_strip) {
        const index_t rows = std::min(decode_strip, keys - r0);
#if FOVEA_HAS_QUANTIZED_VALUES
        // Converted in registers (quantized_values.hpp), the same bits: q8_0 rows unless a
        // masked tile meets a non-finite scale; int8 (with or without per-channel scales)
        // and fp8 rows of whole 32-value groups in unmasked tiles (masked ones check the
        // staged values).
        if constexpr (quantized_in_registers<T, Backend, VS>()) {
          constexpr bool q8_0 = std::is_same_v<VS, block_q8_0>;
          const VS* value_rows[decode_strip];
          float value_scales[decode_strip];
          for (index_t r = 0; r < rows; ++r) {
            value_rows[r] = kv.v_row(j0 + r0 + r);
            value_scales[r] = kv.v_scale(j0 + r0 + r);
          }
          bool in_registers;
          if constexpr (q8_0)
            in_registers = !masked || q8_0_scales_finite(value_rows, rows, Dv / block_q8_0::size);
          else
            in_registers = !masked && Dv % 32 == 0;
          if (in_registers) {
            quantized_values<Backend>(value_rows, value_scales, rows, Dv, buf.p + r0, ld, n, buf.acc, dvp,
                                      kv.v_channels);
            continue;
          }
        }
#endif
        stage_rows(kv, false, j0 + r0, rows, Dv, dvp, buf.stage_v);
        if (masked && !all_finite<T, Backend>(buf.stage_v, dvp, rows, Dv))
          accumulate_skipping_masked(buf.stage_v, dvp, rows, Dv, buf.s + r0, buf.p + r0, 1, ld, n,
                                     buf.acc, 1, dvp);
        else
          gemm_wide<T, Backend, 2, 8 / half, true>(n, dvp / W, buf.p + r0, ld, 1, buf.stage_v, dvp,
                                                   buf.acc, dvp, rows);
      }
    } else {
      with_rows(kv, false, j0, keys, Dv, dvp, buf.stage_v, [&](const auto* v, index_t stride) {
        // keys [from, from + count)
        auto accumulate = [&](index_t from, index_t count, paced_prefetch* pace) {
          const auto* rows = v + from * stride;
          if constexpr (std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(v)>>, T>)
            gemm_wide<T, Backend, 2, 8 / half, true>(n, dvp / W, buf.p + from, ld, 1, rows, stride,
                                                     buf.acc, dvp, count, pace);
          else
            gemm_wide<T, Backend, 4, 4 / half, true>(n, dvp / W, buf.p + from, ld, 1, rows, stride,
                                                     buf.acc, dvp, count, pace);
        };
        if (masked && !all_finite<T, Backend>(v, stride, keys, Dv)) {
          accumulate_skipping_masked(v, stride, keys, Dv, buf.s, buf.p, 1, ld, n, buf.acc, 1, dvp);
        } else if (!values_in_pv) {
          accumulate(0, keys, nullptr);
        } else {
          const index_t column_blocks = (n + 3) / 4, group = decode_value_group * column_blocks;
          for (index_t g = 0; g < keys; g += group) {
            const index_t count = std::min(group, keys - g), next = j0 + ld + g;
            paced_prefetch values;
            pace_rows(values, kv, false, next, std::clamp<index_t>(stream_end - next, 0, count), Dv,
                      prefetch_kind::l2);
            values.pace(2 * column_blocks);  // ~ the micro-kernel calls
            accumulate(g, count, &values);
            values.finish();
          }
        }
      });
    }
    j0 += keys;
  }
  for (index_t c = 0; c < n; ++c) {
    T* out = partials + c * partial_size<T>(Dv);
    out[0] = buf.m[c];
    out[1] = buf.l[c];
    std::copy(buf.acc + c * dvp, buf.acc + c * dvp + Dv, out + 2);
  }
}

/// Merges `chunks` partial states (stride apart) in order into one (m, l) and acc[Dv].
/// Only a chunk that saw no key (l == 0) is left out: a chunk whose every visible logit
/// was NaN keeps m = -inf (a max ignores NaN) but carries l = NaN, and must poison the row.
template <class T>
void merge_partials(const T* partials, index_t stride, index_t chunks, index_t Dv, T& m, T& l,
                    T* acc) noexcept {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  m = neg_inf;
  for (index_t k = 0; k < chunks; ++k) {
    const T mk = partials[k * stride];
    if (mk > m || mk != mk) m = mk;  // NaN wins and poisons l below
  }
  l = 0;
  std::fill(acc, acc + Dv, T(0));
  for (index_t k = 0; k < chunks; ++k) {
    const T* p = partials + k * stride;
    if (p[1] == T(0)) continue;  // saw no key (or only underflowed ones): adds nothing
    if (p[1] != p[1]) {          // a NaN logit: the row's result is NaN
      l = p[1];
      std::fill(acc, acc + Dv, p[1]);
      return;
    }
    const T e = std::exp(p[0] - m);
    l += p[1] * e;
    for (index_t d = 0; d < Dv; ++d) acc[d] += p[2 + d] * e;
  }
}

}  // namespace fovea::detail
