// Driver of suite `rings`: `bench/run rings [--json FILE] [--quick] ...` (see bench/README.md).
//
// The suite is the table below, run in order. Floors come first so that every Agate figure can
// name one in Figure::ratioTo. Agate's own scenarios follow:
//   rings/agate_rings.cpp  shared_rtt_polled(_raw)_ns, shared_rtt_parked_ns, shared_oneway_*,
//                          local_oneway_32b_msgs_per_s
//   rings/agate_loop.cpp   coawait_resume_ns, fiber_switch_ns and the fiber start/peer figures
#include <span>
#include <vector>

#include "rings/floors.h"
#include "support/scenario.h"

int main(int argc, char** argv) {
  using agate::bench::Scenario;
  namespace rings = agate::bench::rings;
  // Registration seam: one span per group of scenarios, in the order they run.
  const std::span<const Scenario> groups[] = {
      rings::crossProcessFloors(),
      rings::inProcessFloors(),
      rings::agateRingScenarios(),
      rings::agateLoopScenarios(),
  };
  std::vector<Scenario> suite;
  for (auto group : groups) suite.insert(suite.end(), group.begin(), group.end());
  return agate::bench::runSuiteMain("rings", suite, argc, argv);
}
