// In-process figures through Google Benchmark.
//
// measureInProcess registers one benchmark, runs it with a reporter that prints nothing and
// captures the result, and returns the median over repetitions of the time per iteration. The
// suite's own table and JSON then show it beside the cross-process figures.
#pragma once

#include <functional>
#include <string_view>

#include <benchmark/benchmark.h>

#include "agate/runtime/result.h"
#include "support/scenario.h"

namespace agate::bench {

// Median over options.repetitions of the nanoseconds one iteration of `body` takes, each
// repetition measuring at least options.measureSeconds / (3 * repetitions); with Google
// Benchmark's iteration estimation before each repetition, a scenario takes about measureSeconds.
// Errors: FAILED when the benchmark reported an error (state.SkipWithError) or produced no result.
Result<double> measureInProcess(std::string_view name, const RunOptions& options,
                                std::function<void(benchmark::State&)> body);

}  // namespace agate::bench
