// Driver of suite `kernel`: `bench/run kernel [--json FILE] [--quick] ...` (see bench/README.md).
//
// The two floors the syscall round trips compare with come first, measured in the same run
// (the rings suite's cross-process cache-line and futex round trips); then the kernel scenarios
// (kernel/kernel_scenarios.cpp), each against its own agate-kernel process.
#include <span>
#include <vector>

#include "kernel/kernel_scenarios.h"
#include "rings/floors.h"
#include "support/scenario.h"

int main(int argc, char** argv) {
  using agate::bench::Scenario;
  std::vector<Scenario> suite;
  for (const Scenario& s : agate::bench::rings::crossProcessFloors())
    if (s.name == "floor_cacheline_rtt_ns" || s.name == "floor_futex_rtt_ns") suite.push_back(s);
  for (const Scenario& s : agate::bench::kernel::kernelScenarios()) suite.push_back(s);
  return agate::bench::runSuiteMain("kernel", suite, argc, argv);
}
