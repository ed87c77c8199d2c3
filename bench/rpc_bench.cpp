// Driver of suite `rpc`: `bench/run rpc [--json FILE] [--quick] ...` (see bench/README.md).
//
// The floors come first (the round trips of suite `rings`, re-measured in this run), then the
// peer, Cap'n Proto's own RPC (rpc/peer_capnp.cpp).
#include <algorithm>
#include <span>
#include <string_view>
#include <vector>

#include "rings/floors.h"
#include "rpc/rpc_suite.h"
#include "support/scenario.h"

namespace agate::bench::rpc {

std::span<const Scenario> rttFloors() {
  static const std::vector<Scenario> floors = [] {
    constexpr std::string_view WANTED[] = {"floor_cacheline_rtt_ns", "floor_futex_rtt_ns",
                                           "floor_socketpair_rtt_ns"};
    std::vector<Scenario> picked;
    for (const Scenario& s : rings::crossProcessFloors()) {
      if (std::find(std::begin(WANTED), std::end(WANTED), s.name) != std::end(WANTED)) {
        picked.push_back(s);
      }
    }
    return picked;
  }();
  return floors;
}

}  // namespace agate::bench::rpc

int main(int argc, char** argv) {
  using agate::bench::Scenario;
  namespace rpc = agate::bench::rpc;
  const std::span<const Scenario> groups[] = {
      rpc::rttFloors(),
      rpc::peerCapnpScenarios(),
  };
  std::vector<Scenario> suite;
  for (auto group : groups) suite.insert(suite.end(), group.begin(), group.end());
  return agate::bench::runSuiteMain("rpc", suite, argc, argv);
}
