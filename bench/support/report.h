// The figures of one suite run, printed as a table for people and written as JSON for tools.
//
// JSON shape (stable; tools read it):
//   {"suite": "rings", "quick": false,
//    "machine": {"cpus": 2, "cpu_model": "...", "kernel": "..."}, "pinned": null,
//    "figures": [{"name": "floor_futex_rtt_ns", "value": 21034, "unit": "ns", "samples": 95000,
//                 "scenario": "floor_futex_rtt_ns"},
//                {"name": "shared_rtt_polled_ns", ..., "ratio_to": "floor_cacheline_rtt_ns",
//                 "ratio": 1.4}, ...],
//    "placements": [{"scenario": "floor_futex_rtt_ns", "cpus": [0, 1]}, ...],
//    "failures": [{"scenario": "...", "error": "..."}]}
// "pinned" is [cpuA, cpuB] under --pin. "samples", "ratio_to"/"ratio" appear only where they apply.
// A ratio is this figure's value divided by the named figure's value, both from this same run.
#pragma once

#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "agate/runtime/result.h"
#include "support/latency.h"

namespace agate::bench {

struct Figure {
  std::string name;      // unique within a run; snake_case, ends with its unit (_ns, _msgs_per_s)
  double value = 0;      // finite; the median where the figure is a distribution
  std::string unit;      // "ns", "msgs/s", ...
  std::string scenario;  // the scenario that produced it
  size_t samples = 0;    // operations or repetitions behind the value; 0: not applicable
  std::string ratioTo;   // name of a figure of the same run to divide by; empty: none
};

// The machine the run happened on.
struct MachineInfo {
  int cpus = 0;          // online CPUs
  std::string cpuModel;  // /proc/cpuinfo "model name"
  std::string kernel;    // uname release
  static MachineInfo probe();
};

class Report {
 public:
  Report(std::string suite, bool quick, MachineInfo machine);

  // Adds one figure. A name already present is a bug in the suite.
  void add(Figure figure);

  // Adds `name` (the median), `name_p99` and `name_p999` from one latency distribution. With
  // `ratioTo` (a floor's median figure), each is compared with the floor's figure of the same
  // suffix: median to median, p99 to p99, p99.9 to p99.9.
  void addLatency(std::string_view scenario, std::string_view name, std::string_view unit,
                  const LatencySummary& summary, std::string_view ratioTo = {});

  // Records the CPUs the parties of `scenario` finished on (one entry per party).
  void addPlacement(std::string_view scenario, std::vector<int> cpus);

  // Records that cross-process parties were pinned (--pin): A to cpuA, B to cpuB.
  void setPinned(int cpuA, int cpuB);

  // Records that `scenario` failed; its figures are then absent.
  void addFailure(std::string_view scenario, const Error& error);

  const Figure* find(std::string_view name) const noexcept;
  const std::vector<Figure>& figures() const noexcept { return figures_; }
  bool hasFailures() const noexcept { return !failures_.empty(); }

  // value / value of figure.ratioTo; empty when there is no ratioTo, that figure is absent or its
  // value is zero.
  std::optional<double> ratioOf(const Figure& figure) const noexcept;

  void printTable(FILE* out) const;
  std::string toJson() const;
  // Writes toJson() to `path` through a temporary file and rename, so a reader never sees half.
  Status writeJson(const std::string& path) const;

 private:
  struct Placement {
    std::string scenario;
    std::vector<int> cpus;
  };
  struct Failure {
    std::string scenario;
    std::string error;
  };

  std::string suite_;
  bool quick_;
  MachineInfo machine_;
  std::vector<int> pinned_;  // empty: nothing pinned
  std::vector<Figure> figures_;
  std::vector<Placement> placements_;
  std::vector<Failure> failures_;
};

// `s` as a JSON string literal, quotes included.
std::string jsonString(std::string_view s);
// `v` as a JSON number; null when it is not finite (JSON has no NaN or infinity).
std::string jsonNumber(double v);

}  // namespace agate::bench
