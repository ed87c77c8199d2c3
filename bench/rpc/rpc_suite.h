// The scenarios of suite `rpc`: the floors an RPC round trip is read against, and the peer, Cap'n
// Proto's own RPC over a Unix socket (BENCHMARKS.md: every figure beside a floor and a peer).
#pragma once

#include <span>

#include "support/scenario.h"

namespace agate::bench::rpc {

// Cross-process round-trip floors from suite `rings`: cache line, futex, Unix socket pair.
std::span<const Scenario> rttFloors();

// Cap'n Proto 0.9.2 EzRpc, client and server in two processes over a Unix socket.
std::span<const Scenario> peerCapnpScenarios();

}  // namespace agate::bench::rpc
