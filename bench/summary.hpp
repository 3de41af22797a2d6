// A Google Benchmark reporter that also keeps every result (the median when repetitions
// are asked for), so a benchmark binary can print ratios between entries of one run.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <fovea/core/build_info.hpp>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace fovea::bench {

/// Google Benchmark's Initialize with fovea's own flag taken out first: returns whether
/// `--quick` (fewer, shorter shapes) was given.
inline bool initialize(int argc, char** argv) {
  bool quick = false;
  static std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::string(argv[i]) == "--quick")
      quick = true;
    else
      args.push_back(argv[i]);
  }
  int n_args = int(args.size());
  benchmark::Initialize(&n_args, args.data());
  return quick;
}

/// Every benchmark added through add(), in the order added: the summary tables list their
/// rows in this order even when the repetitions ran interleaved at random.
inline std::vector<std::string>& added_names() {
  static std::vector<std::string> names;
  return names;
}

/// Registers a benchmark timed in wall-clock milliseconds.
template <class... Args>
benchmark::internal::Benchmark* add(const std::string& name, Args&&... args) {
  added_names().push_back(name);
  return benchmark::RegisterBenchmark(name.c_str(), std::forward<Args>(args)...)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

/// One object per key, made on first use and kept for the process: inputs of hundreds of
/// MB that every call of a benchmark (Google Benchmark calls it several times per
/// repetition) and every repetition share. On a virtual machine memory the guest has just
/// touched is slow for its first second or so of passes (seen here: decode over a 256 MB
/// fp32 cache allocated afresh in each call, 25 ms at the default 0.5 s per repetition,
/// 12.5 ms with 2 s, and from the start when the memory had been used before).
template <class T, class Key, class Make>
const T& kept(const Key& key, Make&& make) {
  static std::map<Key, std::unique_ptr<T>> made;
  auto& slot = made[key];
  if (!slot) slot = std::make_unique<T>(make());
  return *slot;
}

struct result {
  double seconds = 0;  ///< real time per iteration
  std::map<std::string, double> counters;
  double counter(const std::string& name) const {
    const auto it = counters.find(name);
    return it == counters.end() ? 0.0 : it->second;
  }
};

class summary_reporter : public benchmark::ConsoleReporter {
 public:
  /// With FOVEA_BENCH_RAW=path in the environment, Google Benchmark's own table and its
  /// context lines (CPU caches, load, the library's build type) go to that file, so the
  /// terminal shows only the summary tables (scripts/bench does this).
  summary_reporter() {
    std::printf("fovea: %s\n", fovea::build_info().c_str());  // backend, OpenMP, -O
    if (const char* path = std::getenv("FOVEA_BENCH_RAW")) {
      raw_.open(path);
      if (raw_) {
        SetOutputStream(&raw_);
        SetErrorStream(&raw_);
      }
    }
  }

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      const bool aggregate = run.run_type == Run::RT_Aggregate;
      if (aggregate && run.aggregate_name != "median") continue;
      if (!aggregate && run.repetitions > 1) continue;
      result r;
      r.seconds = run.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(run.time_unit);
      for (const auto& [name, c] : run.counters) r.counters[name] = c.value;
      std::string name = run.run_name.str();
      const std::string suffix = "/real_time";
      if (name.size() > suffix.size() &&
          name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0)
        name.resize(name.size() - suffix.size());
      if (!results_.count(name)) order_.push_back(name);
      results_[name] = r;
    }
  }

  const std::map<std::string, result>& results() const { return results_; }

  /// Entries "<a><shape>" and "<b><shape>" that both ran, as (shape, (a, b)) in the order
  /// they were added (run order for benchmarks registered otherwise).
  std::vector<std::pair<std::string, std::pair<result, result>>> pairs(const std::string& a,
                                                                       const std::string& b) const {
    std::vector<std::pair<std::string, std::pair<result, result>>> out;
    for (const std::string& name : added_names().empty() ? order_ : added_names()) {
      if (name.rfind(a, 0) != 0 || !results_.count(name)) continue;
      const std::string shape = name.substr(a.size());
      const auto other = results_.find(b + shape);
      if (other != results_.end()) out.push_back({shape, {results_.at(name), other->second}});
    }
    return out;
  }

 private:
  std::ofstream raw_;
  std::map<std::string, result> results_;
  std::vector<std::string> order_;
};

}  // namespace fovea::bench
