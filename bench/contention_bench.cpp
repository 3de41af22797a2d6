// A decode loop on a shared machine: the per-step time of one softmax_attention decode
// call (one layer's step: H=32, Hk=8, D=128, Sq=1, fp32) while other processes keep the
// cores busy. Prints the median, 90th and 99th percentile and the worst step for every
// pairing of cache length, competing busy processes (0, 1, one per core) and threads
// (0 = every thread OpenMP offers, and 1).
//
// OpenMP reads OMP_WAIT_POLICY when it starts, so a policy is compared by running this
// binary twice (scripts/bench runs it as is and under OMP_WAIT_POLICY=passive). The busy
// processes are children that spin until the measurement ends.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fovea/fovea.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using fovea::index_t;
constexpr index_t H = 32, Hk = 8, D = 128;

/// Child processes that spin on one core each until stopped.
class busy_processes {
 public:
  explicit busy_processes(int count) {
    for (int i = 0; i < count; ++i) {
      const pid_t pid = fork();
      if (pid == 0) {
        volatile unsigned long spin = 0;
        for (;;) spin = spin + 1;
      }
      if (pid > 0) children_.push_back(pid);
    }
    if (count > 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));  // let them start
  }
  ~busy_processes() {
    for (pid_t pid : children_) kill(pid, SIGKILL);
    for (pid_t pid : children_) waitpid(pid, nullptr, 0);
  }
  busy_processes(const busy_processes&) = delete;
  busy_processes& operator=(const busy_processes&) = delete;

 private:
  std::vector<pid_t> children_;
};

struct step_times {
  double median, p90, p99, worst;
};

/// Times `steps` decode calls (after a few untimed ones).
step_times time_steps(index_t keys, int threads, int steps) {
  std::mt19937 gen(7);
  std::normal_distribution<float> dist;
  std::vector<float> q(H * D), k(Hk * keys * D), v(Hk * keys * D), o(H * D);
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) e = dist(gen);
  const auto Q = fovea::bhsd<const float>(q.data(), 1, H, 1, D);
  const auto K = fovea::bhsd<const float>(k.data(), 1, Hk, keys, D);
  const auto V = fovea::bhsd<const float>(v.data(), 1, Hk, keys, D);
  const auto O = fovea::bhsd(o.data(), 1, H, 1, D);
  const fovea::softmax_options options{.causal = true, .threads = threads};
  std::vector<double> ms;
  for (int s = -5; s < steps; ++s) {
    const auto t0 = std::chrono::steady_clock::now();
    fovea::softmax_attention(Q, K, V, O, options);
    const auto t1 = std::chrono::steady_clock::now();
    if (s >= 0) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  auto at = [&](double f) { return ms[std::min(ms.size() - 1, std::size_t(f * double(ms.size())))]; };
  return {at(0.5), at(0.9), at(0.99), ms.back()};
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  std::printf("%s\n", fovea::build_info().c_str());
  std::printf("OMP_WAIT_POLICY=%s, %d cores\n\n", policy ? policy : "(unset)", cores);
  std::printf(
      "| Sk | busy processes | threads | median ms | p90 ms | p99 ms | worst ms |\n"
      "|---:|---:|---:|---:|---:|---:|---:|\n");
  std::vector<int> busy_counts{0, 1};
  if (cores > 1) busy_counts.push_back(cores);
  for (const index_t keys : {index_t(1024), index_t(16384)})
    for (const int busy : busy_counts) {
      const busy_processes others(busy);
      for (const int threads : {0, 1}) {
        const int steps = (keys > 4096 ? 150 : 1000) / (quick ? 4 : 1);
        const step_times t = time_steps(keys, threads, steps);
        std::printf("| %ld | %d | %s | %.3f | %.3f | %.3f | %.3f |\n", long(keys), busy,
                    threads == 0 ? "0 (all)" : "1", t.median, t.p90, t.p99, t.worst);
        std::fflush(stdout);
      }
    }
}
