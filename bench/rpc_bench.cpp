// Driver of suite `rpc`: `bench/run rpc [--json FILE] [--quick] ...` (see bench/README.md).
//
// The floors first (floor_cacheline_rtt_ns, floor_futex_rtt_ns, from suite `rings`), then
// Agate's RPC figures with their ratios to them (rpc/agate_rpc.cpp), then the peer, Cap'n Proto
// 0.9.2 EzRpc over a Unix socket (rpc/peer_capnp.cpp), all in the same run.
#include <span>
#include <string_view>
#include <vector>

#include "rings/floors.h"
#include "rpc/rpc.h"
#include "support/scenario.h"

namespace agate::bench::rpc {

std::vector<Scenario> rpcFloors() {
  std::vector<Scenario> floors;
  for (const Scenario& s : rings::crossProcessFloors()) {
    if (s.name == "floor_cacheline_rtt_ns" || s.name == "floor_futex_rtt_ns") floors.push_back(s);
  }
  return floors;
}

}  // namespace agate::bench::rpc

int main(int argc, char** argv) {
  using agate::bench::Scenario;
  namespace rpc = agate::bench::rpc;
  const std::vector<Scenario> floors = rpc::rpcFloors();
  const std::span<const Scenario> groups[] = {
      floors,
      rpc::agateRpcScenarios(),
      rpc::peerCapnpScenarios(),
  };
  std::vector<Scenario> suite;
  for (auto group : groups) suite.insert(suite.end(), group.begin(), group.end());
  return agate::bench::runSuiteMain("rpc", suite, argc, argv);
}
