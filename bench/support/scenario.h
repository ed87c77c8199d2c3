// The registration seam of every suite: a Scenario is one benchmark function with its name, unit
// and a one-line statement of what it measures. A suite is an ordered table of them; adding a
// figure to a suite is adding one row (see bench/README.md, "Adding a scenario").
#pragma once

#include <chrono>
#include <span>
#include <string_view>

#include "agate/runtime/result.h"
#include "support/process_pair.h"
#include "support/report.h"

namespace agate::bench {

// How long and how a scenario should run; set once from the command line.
struct RunOptions {
  bool quick = false;           // smoke run: every scenario in a fraction of a second
  double warmupSeconds = 0.25;  // run, unrecorded, before measuring
  double measureSeconds = 2.0;  // measuring time of a latency scenario (or its sample cap first)
  int repetitions = 5;          // throughput windows, or Google Benchmark repetitions
  std::chrono::milliseconds watchdog{30'000};  // per cross-process scenario
  int cpuA = -1;                               // --pin: party A's CPU; -1: not pinned
  int cpuB = -1;

  PairOptions pairOptions() const { return PairOptions{watchdog, cpuA, cpuB}; }
};

struct Scenario;
// Runs the scenario and adds its figures (named after scenario.name) and placement to `report`.
// An error is reported as the scenario's failure; other scenarios still run.
using ScenarioFn = Status (*)(const Scenario& scenario, const RunOptions& options, Report& report);

struct Scenario {
  std::string_view name;      // the main figure's name; derived ones add a suffix (_p99, _p999)
  std::string_view unit;      // unit of the main figure
  std::string_view measures;  // one line: what exactly is measured (shown by --list)
  ScenarioFn run;
};

// The whole driver of one suite: parses the command line (--json, --quick, --filter, --list,
// --seconds, --pin, --watchdog), runs the scenarios in order, prints the table, writes the JSON.
// Returns the process exit code: non-zero on a usage error or when any scenario failed.
int runSuiteMain(std::string_view suite, std::span<const Scenario> scenarios, int argc,
                 char** argv);

}  // namespace agate::bench
