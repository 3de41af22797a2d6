// Software prefetch into L1 or L2. GCC 12 drops __builtin_prefetch / _mm_prefetch loops it
// judges free of side effects (the enclosing function is marked pure and its call
// deleted), so on x86 this is an asm statement the optimiser must keep.
#pragma once

namespace fovea::detail {

inline void prefetch_l1(const void* p) noexcept {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

inline void prefetch_l2(const void* p) noexcept {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

}  // namespace fovea::detail
