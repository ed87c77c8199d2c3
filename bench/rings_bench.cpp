// Driver of suite `rings`: `bench/run rings [--json FILE] [--quick] ...` (see bench/README.md).
//
// The suite is the table below, run in order. Floors come first so that every Agate figure can
// name one in Figure::ratioTo. Agate's own scenarios join as further groups:
//   shared_rtt_polled_ns, shared_rtt_parked_ns          (ratio to floor_cacheline / floor_futex)
//   shared_oneway_32b_msgs_per_s, shared_oneway_1k_msgs_per_s   (ratio to floor_spsc_*)
//   local_oneway_32b_msgs_per_s, coawait_resume_ns, fiber_switch_ns
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
