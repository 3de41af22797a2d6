// Where the keys and values of one (sequence, key/value head) live: contiguous rows, or
// fixed-size pages addressed through a block table (vLLM / FlashInfer paged KV). The tile
// loops ask for runs of consecutive keys that share one row stride.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../../core/cache_types.hpp"
#include "../../core/tensor_view.hpp"
#include "../../simd/prefetch.hpp"

namespace fovea::detail {

/// The scales of one (sequence, head) of a scaled cache (int8, fp8): slot s of page p (or
/// key s of a contiguous cache, p = 0) has scale at[p * page + s * token]; null: 1.
struct row_scales {
  const float* at = nullptr;
  index_t token = 0, page = 0;
};

template <class K, class V = K>
struct kv_source {
  const K* k = nullptr;  ///< key 0 (contiguous) or slot 0 of page 0 (paged)
  const V* v = nullptr;
  index_t k_stride = 0, v_stride = 0;  ///< elements between consecutive keys (within a page)
  index_t k_page_stride = 0, v_page_stride = 0;
  const std::int32_t* pages = nullptr;  ///< block-table row; null: contiguous
  index_t page_size = 0;
  row_scales k_scales{}, v_scales{};
  /// Per-channel scales of an int8 cache (one per column of this head), or null.
  const float* k_channels = nullptr;
  const float* v_channels = nullptr;

  /// How many of `want` keys starting at j share one stride (all, unless a page ends).
  index_t run(index_t j, index_t want) const noexcept {
    return pages ? std::min(want, page_size - j % page_size) : want;
  }
  const K* k_row(index_t j) const noexcept {
    return pages ? k + pages[j / page_size] * k_page_stride + (j % page_size) * k_stride
                 : k + j * k_stride;
  }
  const V* v_row(index_t j) const noexcept {
    return pages ? v + pages[j / page_size] * v_page_stride + (j % page_size) * v_stride
                 : v + j * v_stride;
  }
  float k_scale(index_t j) const noexcept { return scale(k_scales, j); }
  /// The key scales of the run of keys starting at j (see run): key j + i's at
  /// first[i * stride] (a stride of 0 and a 1 when the cache has no scales).
  struct scale_run {
    const float* first;
    index_t stride;
  };
  scale_run k_scales_from(index_t j) const noexcept {
    static constexpr float one = 1.0f;
    if (!k_scales.at) return {&one, 0};
    return {scale_at(k_scales, j), k_scales.token};
  }
  float v_scale(index_t j) const noexcept { return scale(v_scales, j); }
  /// Key rows of D values (value rows of Dv) follow each other with no gap.
  bool k_packed(index_t D) const noexcept {
    return !pages && k_stride * values_per_element<K>::value == D;
  }
  bool v_packed(index_t Dv) const noexcept {
    return !pages && v_stride * values_per_element<V>::value == Dv;
  }

 private:
  const float* scale_at(const row_scales& s, index_t j) const noexcept {
    return pages ? s.at + pages[j / page_size] * s.page + (j % page_size) * s.token : s.at + j * s.token;
  }
  float scale(const row_scales& s, index_t j) const noexcept { return s.at ? *scale_at(s, j) : 1.0f; }
};

/// The keys/values of a whole problem: (B, Hk, Sk, D) views, or paged caches viewed as
/// (pages, Hk, page_size, D) with a block table (B, max_pages); the scales of scaled
/// caches as (B|pages|1, Hk|1, Sk|page_size|1) views (empty: 1); an int8 cache's
/// per-channel scales as (Hk|1, D) views (empty: none).
template <class K, class V = K>
struct kv_layout {
  tensor_view<const K, 4> k;
  tensor_view<const V, 4> v;
  tensor_view<const std::int32_t, 2> table{};  ///< empty: contiguous
  tensor_view<const float, 3> k_scale{}, v_scale{};
  tensor_view<const float, 2> k_channel_scale{}, v_channel_scale{};

  kv_source<K, V> source(index_t b, index_t hk) const noexcept {
    constexpr index_t kb = values_per_element<K>::value, vb = values_per_element<V>::value;
    kv_source<K, V> s;
    const index_t row = table.data() == nullptr ? b : 0;
    s.k = k.data() + (row * k.stride(0) + hk * k.stride(1)) / kb;
    s.v = v.data() + (row * v.stride(0) + hk * v.stride(1)) / vb;
    if (table.data() != nullptr) {
      s.k_page_stride = k.stride(0) / kb;
      s.v_page_stride = v.stride(0) / vb;
      s.pages = table.data() + b * table.stride(0);
      s.page_size = k.extent(2);
    }
    s.k_stride = k.stride(2) / kb;
    s.v_stride = v.stride(2) / vb;
    s.k_scales = scales_of(k_scale, row, hk);
    s.v_scales = scales_of(v_scale, row, hk);
    s.k_channels = channels_of(k_channel_scale, hk);
    s.v_channels = channels_of(v_channel_scale, hk);
    return s;
  }
  index_t heads() const noexcept { return k.extent(1); }
  index_t dim() const noexcept { return k.extent(3); }
  index_t value_dim() const noexcept { return v.extent(3); }

 private:
  /// Row hk of a (Hk|1, D) view (rows contiguous, checked by the front-end), or null.
  static const float* channels_of(const tensor_view<const float, 2>& s, index_t hk) {
    if (s.data() == nullptr) return nullptr;
    return s.data() + (s.extent(0) == 1 ? 0 : hk * s.stride(0));
  }
  /// Extent-1 dimensions broadcast.
  static row_scales scales_of(const tensor_view<const float, 3>& s, index_t row, index_t hk) {
    if (s.data() == nullptr) return {};
    auto at = [&](std::size_t r, index_t i) { return s.extent(r) == 1 ? 0 : i * s.stride(r); };
    return {s.data() + at(0, row) + at(1, hk), s.extent(2) == 1 ? 0 : s.stride(2),
            s.extent(0) == 1 ? 0 : s.stride(0)};
  }
};

/// Asks for the key rows [j, j + rows) to be brought into cache level KeyLevel and the
/// value rows into ValueLevel (1 or 2; 0: not asked for), all at once: the block-sparse
/// engine asks for scattered pieces the hardware cannot guess, a few pieces ahead.
/// (Streams spread their requests instead: decode through its scoring loop,
/// spread_prefetch below; prefill's next key tile between the micro-kernel calls,
/// paced_prefetch.)
template <int KeyLevel, int ValueLevel, class K, class V>
[[gnu::always_inline]] inline void prefetch_rows(const kv_source<K, V>& kv, index_t j, index_t rows,
                                                 index_t D, index_t Dv) noexcept {
  const index_t k_bytes = storage_bytes<K>(D), v_bytes = storage_bytes<V>(Dv);
  if (kv.k_packed(D) && kv.v_packed(Dv)) {  // rows back to back: two spans
    if constexpr (KeyLevel > 0) prefetch_span<KeyLevel>(kv.k_row(j), rows * k_bytes);
    if constexpr (ValueLevel > 0) prefetch_span<ValueLevel>(kv.v_row(j), rows * v_bytes);
    return;
  }
  for (index_t r = j; r < j + rows; ++r) {  // (as spans, strided rows were 25% slower)
    if constexpr (KeyLevel > 0)
      for (index_t b = 0; b < k_bytes; b += 64)
        prefetch_into<KeyLevel>(reinterpret_cast<const char*>(kv.k_row(r)) + b);
    if constexpr (ValueLevel > 0)
      for (index_t b = 0; b < v_bytes; b += 64)
        prefetch_into<ValueLevel>(reinterpret_cast<const char*>(kv.v_row(r)) + b);
  }
}

/// Adds the key rows (keys) or value rows [j, j + n) of `cols` values each to `pace`,
/// one span per run of rows that share a stride (a page boundary splits them).
template <class K, class V>
void pace_rows(paced_prefetch& pace, const kv_source<K, V>& kv, bool keys, index_t j, index_t n,
               index_t cols, prefetch_kind kind) noexcept {
  for (index_t run; n > 0; j += run, n -= run) {
    run = kv.run(j, n);
    if (keys)
      pace.add(kv.k_row(j), storage_bytes<K>(cols), kv.k_stride * index_t(sizeof(K)), run, kind);
    else
      pace.add(kv.v_row(j), storage_bytes<V>(cols), kv.v_stride * index_t(sizeof(V)), run, kind);
  }
}

/// Prefetch spread through a loop that reads a block of key rows in `steps` parts
/// (decode's scoring): with each part, the next share of the rows of the keys `distance`
/// further on is asked for, and of their values, in address order. The requests go out
/// as evenly as the loads; asked for a block's rows at once, bf16 decode (Sk = 32768,
/// D = 128) was 15% slower, 16 keys' rows at once 35% slower, and the same lines asked
/// for across the rows (line d of every row with part d) 15% slower too.
/// Rows back to back (a contiguous cache) are one span per block: its lines, counted at
/// start(), go out a fixed number per part (the remainder at once, first) from a cursor
/// kept in a register. Rows apart (strided, paged) are one stream each, advanced through a
/// list with end tests: for packed rows that list cost more instructions than the scoring
/// it rode on (AVX2 fp32: ~60 per 16 FMAs). The same requests through the span, Sk =
/// 32768, H = 32, Hk = 8, D = 128, 1 thread, medians of 9-11 interleaved: AVX-512 q8_0
/// 6.88 -> 6.49 ms, q8_0 products 5.31 -> 5.06, e4m3 7.56 -> 7.29, bf16 7.27 -> 6.96, fp32
/// level; AVX2 q8_0 13.4 -> 12.6, e4m3 16.4 -> 15.5, bf16 10.7 -> 10.4, fp32 level (it
/// waits on memory); with the cache in L3 (Sk = 512) AVX2 fp32 13% and bf16 11% faster.
template <class K, class V, int MaxRows>
class spread_prefetch {
 public:
  /// Keys at or past `end` are not asked for; keys into L1 or L2, values into L2 or not.
  spread_prefetch(const kv_source<K, V>& kv, index_t distance, index_t end, index_t D, index_t Dv,
                  bool keys_to_l1, bool values) noexcept
      : kv_(kv),
        distance_(distance),
        end_(end),
        D_(D),
        Dv_(Dv),
        keys_to_l1_(keys_to_l1),
        values_(values),
        contiguous_(kv.k_packed(D) && kv.v_packed(Dv)) {}

  /// Keys [j, j + n) (n <= MaxRows) are about to be read in `steps` parts.
  void start(index_t j, index_t n, index_t steps) noexcept {
    const index_t first = j + distance_, rows = std::clamp<index_t>(end_ - first, 0, n);
    if (contiguous_)
      start_span(first, rows, steps);
    else
      start_rows(first, rows, steps);
  }
  /// One part is being read: asks for the next share of each span.
  void step() noexcept {
    if (contiguous_) {
      if (keys_to_l1_)
        key_span_.template ask<1>(key_span_.per_step);
      else
        key_span_.template ask<2>(key_span_.per_step);
      value_span_.template ask<2>(value_span_.per_step);
      return;
    }
    for (int i = 0; i < l1_count_; ++i) advance<1>(l1_[i]);
    for (int i = 0; i < l2_count_; ++i) advance<2>(l2_[i]);
  }

 private:
  /// Lines from a cursor: per_step of them with each part (the rest at start()).
  struct line_cursor {
    const char* at;
    index_t per_step;
    template <int Level>
    void ask(index_t lines) noexcept {
      const char* p = at;  // a local: through the member, every line would store it
      for (index_t i = 0; i < lines; ++i, p += 64) prefetch_into<Level>(p);
      at = p;
    }
  };
  struct stream {
    const char *at, *end;
    index_t share;  ///< bytes per part, whole lines
  };

  /// Rows back to back: one span of lines per operand.
  void start_span(index_t first, index_t rows, index_t steps) noexcept {
    if (rows != shared_rows_ || steps != shared_steps_) {  // (divisions, once per shape)
      shared_rows_ = rows;
      shared_steps_ = steps;
      // ceil(bytes / 64) lines from the span's first byte: each line asked for by one
      // block where the spans are whole lines
      const index_t k_lines = (rows * storage_bytes<K>(D_) + 63) / 64;
      const index_t v_lines = values_ ? (rows * storage_bytes<V>(Dv_) + 63) / 64 : 0;
      key_span_.per_step = k_lines / steps;
      value_span_.per_step = v_lines / steps;
      key_first_ = k_lines % steps;
      value_first_ = v_lines % steps;
    }
    if (rows == 0) return;  // (no lines per step either)
    key_span_.at = reinterpret_cast<const char*>(kv_.k_row(first));
    value_span_.at = reinterpret_cast<const char*>(kv_.v_row(first));
    if (keys_to_l1_)
      key_span_.template ask<1>(key_first_);
    else
      key_span_.template ask<2>(key_first_);
    value_span_.template ask<2>(value_first_);
  }
  /// Rows apart (strided, paged): one stream per row.
  void start_rows(index_t first, index_t rows, index_t steps) noexcept {
    if (steps != shared_steps_) {  // (two divisions)
      shared_steps_ = steps;
      key_share_ = share(storage_bytes<K>(D_), steps);
      value_share_ = share(storage_bytes<V>(Dv_), steps);
    }
    // The streams each level receives, so that step() tests no option (it runs in the
    // innermost loop, which -O2 does not unswitch).
    l1_count_ = l2_count_ = 0;
    // Each stream is written in place, field by field: built aside and copied, GCC 12
    // stored its two pointers one by one and copied them with a 16-byte load, which
    // waited for both stores (a store-forwarding stall, 10% of the AVX2 scoring loop's
    // samples; AVX2 decode 2-6% faster without it).
    for (index_t r = 0; r < rows; ++r) {
      set(keys_to_l1_ ? l1_[l1_count_++] : l2_[l2_count_++], kv_.k_row(first + r),
          storage_bytes<K>(D_), key_share_);
      if (values_) set(l2_[l2_count_++], kv_.v_row(first + r), storage_bytes<V>(Dv_), value_share_);
    }
  }
  static void set(stream& s, const void* p, index_t bytes, index_t share) noexcept {
    s.at = static_cast<const char*>(p);
    s.end = s.at + bytes;
    s.share = share;
  }
  /// Bytes per part, whole lines.
  static index_t share(index_t bytes, index_t steps) noexcept {
    const index_t lines = (bytes + 63) / 64;
    return (lines + steps - 1) / steps * 64;
  }
  template <int Level>
  static void advance(stream& s) noexcept {
    const char* at = s.at;  // a local: through s, every line would store the cursor
    const char* stop = s.end - at < s.share ? s.end : at + s.share;
    for (; at < stop; at += 64) prefetch_into<Level>(at);
    s.at = at;
  }

  const kv_source<K, V>& kv_;
  index_t distance_, end_, D_, Dv_;
  bool keys_to_l1_, values_, contiguous_;
  line_cursor key_span_{}, value_span_{};
  index_t key_first_ = 0, value_first_ = 0;
  stream l1_[MaxRows], l2_[2 * MaxRows];
  int l1_count_ = 0, l2_count_ = 0;
  index_t key_share_ = 0, value_share_ = 0, shared_rows_ = -1, shared_steps_ = -1;
};

}  // namespace fovea::detail
