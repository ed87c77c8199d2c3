// Suite `rpc`: Agate's RpcConnection between two processes beside the floors (rings) and the
// peer, Cap'n Proto 0.9.2 EzRpc over a Unix socket, measured in the same run.
#pragma once

#include <span>
#include <vector>

#include "support/scenario.h"

namespace agate::bench::rpc {

// The floors this suite compares with: floor_cacheline_rtt_ns and floor_futex_rtt_ns (rings).
std::vector<Scenario> rpcFloors();

// null_call_rtt_polled_ns / _parked_ns, calls_per_s_inflight, chain10_pipelined_ns,
// chain10_awaited_ns (two processes, SHARED channels), allocations_per_call (one process).
std::span<const Scenario> agateRpcScenarios();

// peer_capnp_null_call_rtt_ns, peer_capnp_calls_per_s_inflight, peer_capnp_chain10_pipelined_ns.
std::span<const Scenario> peerCapnpScenarios();

}  // namespace agate::bench::rpc
