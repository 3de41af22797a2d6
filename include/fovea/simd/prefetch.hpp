// Software prefetch into L1 or L2, or for writing. GCC 12 drops __builtin_prefetch / _mm_prefetch
// loops it judges free of side effects (the enclosing function is marked pure and its call
// deleted), so on x86 this is an asm statement the optimiser must keep.
#pragma once

#include <cstddef>

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

}  // namespace fovea::detail
