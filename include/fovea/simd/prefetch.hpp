// Software prefetch into L1 or L2, or for writing. GCC 12 drops __builtin_prefetch / _mm_prefetch
// loops it judges free of side effects (the enclosing function is marked pure and its call
// deleted), so on x86 this is an asm statement the optimiser must keep.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace fovea::detail {

/// Asks for the line holding p to be brought into cache level `Level` (1 or 2).
template <int Level>
inline void prefetch_into(const void* p) noexcept {
  static_assert(Level == 1 || Level == 2);
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (Level == 1)
    asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
  else
    asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, Level == 1 ? 3 : 2);
#endif
}

/// Asks for the line holding p in L1 for writing (PREFETCHW where the target has it), so
/// that the read a store to a missing line needs starts early.
inline void prefetch_for_write(const void* p) noexcept {
#if defined(__PRFCHW__)
  asm volatile("prefetchw %0" : : "m"(*static_cast<const char*>(p)));
#elif defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 1, 3);
#endif
}

/// Asks for the lines of [first, first + bytes) to be brought into cache level `Level`,
/// in one loop (measured: decode's key prefetch written as a loop per key row made the
/// whole decode 16% slower, Sk = 32768, D = 128, fp32).
template <int Level>
inline void prefetch_span(const void* first, std::ptrdiff_t bytes) noexcept {
  const char* p = static_cast<const char*>(first);
  for (std::ptrdiff_t at = 0; at < bytes; at += 64) prefetch_into<Level>(p + at);
}

inline void prefetch_l1(const void* p) noexcept { prefetch_into<1>(p); }
inline void prefetch_l2(const void* p) noexcept { prefetch_into<2>(p); }

/// Where a paced_prefetch brings its lines: L1, L2, or L1 for writing.
enum class prefetch_kind : std::uint8_t { l1, l2, write };

/// Requests for the rows a tile will need next, paced: a share of the lines with each
/// tick() (the tile's products call it between their micro-kernel calls), the rest at
/// finish(). Asked for all at once at the start of a tile, many of them found no room
/// and came back as misses: agent attention (N = 32768, D = 64) spent 16% longer.
class paced_prefetch {
 public:
  /// Rows r < rows of `bytes` bytes each, at first + r * stride bytes (asked for at once
  /// when the spans are all taken).
  void add(const void* first, std::ptrdiff_t bytes, std::ptrdiff_t stride, std::ptrdiff_t rows,
           prefetch_kind kind) noexcept {
    if (bytes <= 0 || rows <= 0) return;
    if (stride == bytes) bytes *= rows, rows = 1;  // back to back: one piece
    const span s{static_cast<const char*>(first), bytes, stride, rows, 0, 0, kind};
    if (count_ == capacity) {
      paced_prefetch now;
      now.spans_[now.count_++] = s;
      now.ask(rows * ((bytes + 63) / 64));
      return;
    }
    spans_[count_++] = s;
    lines_ += rows * ((bytes + 63) / 64);
  }
  /// Lines asked for per tick: all of them over `ticks` ticks.
  void pace(std::ptrdiff_t ticks) noexcept { per_tick_ = (lines_ + ticks - 1) / ticks; }
  /// (Out of line: inlined into the products' loops, it made agent attention 1-2% slower.)
  [[gnu::noinline]] void tick() noexcept { ask(per_tick_); }
  void finish() noexcept { ask(lines_); }
  bool empty() const noexcept { return count_ == 0; }

 private:
  struct span {
    const char* first;
    std::ptrdiff_t bytes, stride, rows;
    std::ptrdiff_t row, at;  // the next line: row `row`, byte `at`
    prefetch_kind kind;
  };
  template <class Ask>
  static void each_line(const char* p, std::ptrdiff_t n, Ask&& ask) noexcept {
    for (; n > 0; --n, p += 64) ask(p);
  }
  /// The next `lines` lines, row piece by row piece (a loop per piece: a line each
  /// costs a few instructions).
  void ask(std::ptrdiff_t lines) noexcept {
    while (lines > 0 && next_ < count_) {
      span& s = spans_[next_];
      const std::ptrdiff_t n = std::min(lines, (s.bytes - s.at + 63) / 64);
      const char* p = s.first + s.row * s.stride + s.at;
      if (s.kind == prefetch_kind::l1)
        each_line(p, n, [](const char* q) { prefetch_into<1>(q); });
      else if (s.kind == prefetch_kind::l2)
        each_line(p, n, [](const char* q) { prefetch_into<2>(q); });
      else
        each_line(p, n, [](const char* q) { prefetch_for_write(q); });
      lines -= n;
      if ((s.at += 64 * n) >= s.bytes) s.at = 0, ++s.row;
      if (s.row == s.rows) ++next_;
    }
  }
  static constexpr int capacity = 8;
  span spans_[capacity];
  int count_ = 0, next_ = 0;
  std::ptrdiff_t lines_ = 0, per_tick_ = 0;
};

}  // namespace fovea::detail
