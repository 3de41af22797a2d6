// parallel_for over OpenMP when the caller compiles with it, serial otherwise.
#pragma once

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>

#include "tensor_view.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fovea::detail {

/// Threads a call may use: 0 means all that OpenMP offers, n > 0 means at most n.
inline int resolve_threads(int requested) noexcept {
#if defined(_OPENMP)
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

/// Work (in flops) below which a call runs on one thread: starting a parallel region and
/// meeting at its barrier costs a few microseconds when the cores are free and up to
/// milliseconds when another process holds one (the waiting thread must be scheduled
/// again), while ~2 MFLOP take ~10-20 us on one core. Results never depend on it.
inline constexpr double min_parallel_flops = 2e6;

/// The threads worth using for `flops` of work split into `tasks`: 1 below
/// min_parallel_flops, else at most one per task.
inline int threads_for_work(int threads, double flops, index_t tasks) noexcept {
  if (flops < min_parallel_flops) return 1;
  return static_cast<int>(std::max<index_t>(1, std::min<index_t>(threads, tasks)));
}

/// Runs body(task, thread) for task in [0, tasks) on up to `threads` threads, handing
/// out tasks one at a time (tasks may differ in cost). `thread` is in [0, threads).
/// The body must not throw. Which thread runs a task never changes what it computes.
template <class Body>
void parallel_for(index_t tasks, int threads, Body&& body) noexcept {
  if (tasks <= 0) return;
#if defined(_OPENMP)
  if (threads > 1 && tasks > 1) {
    const int used = static_cast<int>(std::min<index_t>(threads, tasks));
#pragma omp parallel for schedule(dynamic, 1) num_threads(used)
    for (index_t t = 0; t < tasks; ++t) body(t, omp_get_thread_num());
    return;
  }
#else
  (void)threads;
#endif
  for (index_t t = 0; t < tasks; ++t) body(t, 0);
}

/// Adds into shared rows in a fixed order whatever the threads: slot s (a block of rows)
/// takes the adds of its writers turn by turn, first(s), first(s) + 1, ..., each waiting
/// for the previous one. With parallel_for handing tasks out in increasing order and each
/// task waiting only on turns of earlier tasks, every wait ends (the earlier task runs).
class ordered_turns {
 public:
  template <class First>
  ordered_turns(index_t slots, First&& first)
      : next_(std::make_unique<std::atomic<int>[]>(std::size_t(std::max<index_t>(slots, 1)))) {
    for (index_t s = 0; s < slots; ++s) next_[s].store(int(first(s)), std::memory_order_relaxed);
  }
  /// Whether it is `turn`'s turn at `slot` now.
  bool ready(index_t slot, index_t turn) const noexcept {
    return next_[slot].load(std::memory_order_acquire) == int(turn);
  }
  /// Waits until it is `turn`'s turn at `slot`: spins, then yields the core between looks
  /// (the turn comes within a tile's time; sleeping on a futex would add the kernel's
  /// wake-up latency to every wait, and a yield lets a preempted holder of the turn run).
  void wait(index_t slot, index_t turn) const noexcept {
    const std::atomic<int>& next = next_[slot];
    for (int spin = 0; spin < 1024; ++spin)
      if (next.load(std::memory_order_acquire) == int(turn)) return;
    while (next.load(std::memory_order_acquire) != int(turn)) std::this_thread::yield();
  }
  /// Ends `turn` at `slot`: the next writer may add.
  void pass(index_t slot, index_t turn) const noexcept {
    next_[slot].store(int(turn) + 1, std::memory_order_release);
  }

 private:
  std::unique_ptr<std::atomic<int>[]> next_;
};

}  // namespace fovea::detail
