#include "support/in_process.h"

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace agate::bench {

namespace {

// Captures the "median" aggregate of the one benchmark that runs; prints nothing.
class CapturingReporter final : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.error_occurred) {
        std::fprintf(stderr, "bench: %s: %s\n", run.benchmark_name().c_str(),
                     run.error_message.c_str());
        failed = true;
        continue;
      }
      if (run.run_type == Run::RT_Aggregate && run.aggregate_name == "median") {
        medianNs = run.GetAdjustedRealTime();
        found = true;
      }
    }
  }

  bool found = false;
  bool failed = false;
  double medianNs = 0;
};

}  // namespace

Result<double> measureInProcess(std::string_view name, const RunOptions& options,
                                std::function<void(benchmark::State&)> body) {
  const std::string benchName(name);
  benchmark::RegisterBenchmark(benchName.c_str(),
                               [body = std::move(body)](benchmark::State& s) { body(s); })
      ->Unit(benchmark::kNanosecond)
      // Google Benchmark re-estimates the iteration count before every repetition (trial runs
      // growing up to MinTime), which costs about twice the measured time again: a third of the
      // per-repetition share keeps a scenario near measureSeconds in all.
      ->MinTime(options.measureSeconds / (3.0 * options.repetitions))
      ->Repetitions(options.repetitions)
      ->ReportAggregatesOnly(true);
  CapturingReporter reporter;
  // Options such as MinTime become part of the name ("x/min_time:0.2/repeats:5").
  benchmark::RunSpecifiedBenchmarks(&reporter, "^" + benchName + "(/|$)");
  // Google Benchmark's registry is the library's own; leave it empty for the next scenario.
  benchmark::ClearRegisteredBenchmarks();
  if (reporter.failed || !reporter.found) {
    return Error(Errc::FAILED, "the in-process benchmark produced no median");
  }
  return reporter.medianNs;
}

}  // namespace agate::bench
