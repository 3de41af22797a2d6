// parallel_for over OpenMP when the caller compiles with it, serial otherwise.
#pragma once

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

}  // namespace fovea::detail
