// The floors of suite `rings`: what this machine itself can do, measured with no Agate code, so
// that Agate's ring, loop and fiber figures can be read as ratios to them (BENCHMARKS.md).
#pragma once

#include <span>

#include "support/scenario.h"

namespace agate::bench::rings {

// Two forked processes over memory shared before fork: cache-line, futex and Unix-socket round
// trips, and raw SPSC ring throughput.
std::span<const Scenario> crossProcessFloors();

// One process: the clock read, a bare system call, a C++20 coroutine resume, a Boost.Context
// switch.
std::span<const Scenario> inProcessFloors();

// Agate's SHARED and LOCAL channels, each figure with the ratio to its floor.
std::span<const Scenario> agateRingScenarios();

// Agate's EventLoop (co_await round trip) and Fiber switch, each with the ratio to its floor.
std::span<const Scenario> agateLoopScenarios();

}  // namespace agate::bench::rings
