#include <cstdio>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include "support/scenario.h"

namespace agate::bench {

namespace {

bool selected(std::string_view name, const std::vector<std::string>& filters) {
  if (filters.empty()) return true;
  for (const std::string& f : filters) {
    if (name.find(f) != std::string_view::npos) return true;
  }
  return false;
}

}  // namespace

int runSuiteMain(std::string_view suite, std::span<const Scenario> scenarios, int argc,
                 char** argv) {
  RunOptions options;
  std::string jsonPath;
  std::vector<std::string> filters;
  std::vector<int> pin;
  bool list = false;
  double seconds = 0;
  int watchdogSeconds = 30;

  CLI::App app{fmt::format("Agate benchmark suite '{}'", suite)};
  app.add_option("--json", jsonPath, "also write every figure to this JSON file");
  app.add_flag("--quick", options.quick, "smoke run: a fraction of a second per scenario");
  app.add_option("--filter", filters, "run only scenarios whose name contains this (repeatable)");
  app.add_flag("--list", list, "list the scenarios and what each measures, then exit");
  app.add_option("--seconds", seconds, "measuring time per scenario (default 2, --quick 0.05)")
      ->check(CLI::PositiveNumber);
  app.add_option("--pin", pin, "pin cross-process parties A and B to these two CPUs")->expected(2);
  app.add_option("--watchdog", watchdogSeconds, "kill a cross-process scenario after this long")
      ->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);

  if (list) {
    for (const Scenario& s : scenarios) fmt::print("{:<36} {:<7} {}\n", s.name, s.unit, s.measures);
    return 0;
  }
  if (options.quick) {
    options.warmupSeconds = 0.01;
    options.measureSeconds = 0.05;
    options.repetitions = 3;
  }
  if (seconds > 0) options.measureSeconds = seconds;
  if (pin.size() == 2) {
    options.cpuA = pin[0];
    options.cpuB = pin[1];
  }
  options.watchdog = std::chrono::seconds(watchdogSeconds);

  Report report(std::string(suite), options.quick, MachineInfo::probe());
  if (pin.size() == 2) report.setPinned(options.cpuA, options.cpuB);
  size_t ran = 0;
  for (const Scenario& s : scenarios) {
    if (!selected(s.name, filters)) continue;
    ++ran;
    std::fprintf(stderr, "bench: %-36s ...\n", std::string(s.name).c_str());
    const Status status = s.run(s, options, report);
    if (!status.ok()) {
      char buf[256];
      std::fprintf(stderr, "bench: %s failed: %s\n", std::string(s.name).c_str(),
                   status.error().describe(buf, sizeof buf));
      report.addFailure(s.name, status.error());
    }
  }
  if (ran == 0) {
    std::fprintf(stderr, "bench: no scenario of suite '%s' matches the filter (see --list)\n",
                 std::string(suite).c_str());
    return 2;
  }

  report.printTable(stdout);
  if (!jsonPath.empty()) {
    const Status written = report.writeJson(jsonPath);
    if (!written.ok()) {
      char buf[256];
      std::fprintf(stderr, "bench: %s: %s\n", jsonPath.c_str(),
                   written.error().describe(buf, sizeof buf));
      return 1;
    }
    std::printf("figures written to %s\n", jsonPath.c_str());
  }
  return report.hasFailures() ? 1 : 0;
}

}  // namespace agate::bench
