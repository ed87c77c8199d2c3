// The peer in suite `rpc`: Cap'n Proto 0.9.2's own RPC (EzRpcServer / EzRpcClient) over a Unix
// socket between two forked processes, the same operations as Agate's side:
//   peer_capnp_null_call_rtt_ns          an empty call and its return, awaited one at a time
//   peer_capnp_calls_per_s_inflight      64 empty calls in flight, one client
//   peer_capnp_chain10_pipelined_ns      ten dependent calls through pipelined capabilities
// Cap'n Proto reports failures by throwing kj::Exception; a party catches it at its top and
// exits non-zero, which fails the scenario.
#include <capnp/ez-rpc.h>
#include <kj/async-io.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "bench_rpc.capnp.h"
#include "rpc/rpc.h"
#include "support/latency.h"
#include "support/process_pair.h"
#include "support/round_trips.h"  // secondsToNs
#include "support/timing.h"

namespace agate::bench::rpc {

namespace {

constexpr double NS_PER_S = 1e9;
constexpr uint32_t IN_FLIGHT = 64;

// Cap'n Proto's generated Server has a non-virtual destructor in an accessible base; its objects
// are owned through kj::Own<Hop::Server>, which destroys them through the most derived type.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wnon-virtual-dtor"
class HopImpl final : public Hop::Server {
 protected:
  kj::Promise<void> null(NullContext) override { return kj::READY_NOW; }
  kj::Promise<void> next(NextContext context) override {
    context.getResults().setHop(thisCap());
    return kj::READY_NOW;
  }
};
#pragma GCC diagnostic pop

// Shared between the parties: the server says when it listens, the client when it is done.
struct Control {
  std::atomic<uint32_t> listening{0};
  std::atomic<uint32_t> done{0};
};

std::string socketPath() { return "/tmp/agate-rpc-bench-" + std::to_string(::getpid()) + ".sock"; }

int serve(const std::string& path, Control* control) {
  try {
    ::unlink(path.c_str());
    capnp::EzRpcServer server(kj::heap<HopImpl>(), kj::str("unix:", path.c_str()));
    auto& ws = server.getWaitScope();
    server.getPort().wait(ws);  // bound and listening
    control->listening.store(1, std::memory_order_release);
    auto& timer = server.getIoProvider().getTimer();
    while (control->done.load(std::memory_order_acquire) == 0)
      timer.afterDelay(5 * kj::MILLISECONDS).wait(ws);
    ::unlink(path.c_str());
    return 0;
  } catch (const kj::Exception& e) {
    fprintf(stderr, "peer server: %s\n", e.getDescription().cStr());
    return 1;
  }
}

template <class Body>
int client(const std::string& path, Control* control, Body body) {
  SpinWait spin;
  while (control->listening.load(std::memory_order_acquire) == 0) spin.once();
  int rc = 1;
  try {
    capnp::EzRpcClient client(kj::str("unix:", path.c_str()));
    Hop::Client hop = client.getMain<Hop>();
    rc = body(hop, client.getWaitScope());
  } catch (const kj::Exception& e) {
    fprintf(stderr, "peer client: %s\n", e.getDescription().cStr());
  }
  control->done.store(1, std::memory_order_release);
  return rc;
}

template <class Op>
Status latency(const Scenario& scenario, const RunOptions& o, Report& report, Op op) {
  const size_t capacity =
      std::clamp<size_t>(static_cast<size_t>(o.measureSeconds * 1e5), 10'000, 1'000'000);
  auto mapping = SharedMapping::tryCreate(SampleBuffer::bytesFor(capacity) + sizeof(Control));
  if (!mapping) return mapping.error();
  auto* control = new (mapping->data()) Control();
  SampleBuffer* samples =
      SampleBuffer::createAt(static_cast<char*>(mapping->data()) + sizeof(Control), capacity);
  const std::string path = socketPath();
  auto partyA = [&]() -> int {
    return client(path, control, [&](Hop::Client& hop, kj::WaitScope& ws) {
      const uint64_t warmEnd = nowNs() + secondsToNs(o.warmupSeconds);
      while (nowNs() < warmEnd) op(hop, ws);
      const uint64_t end = nowNs() + secondsToNs(o.measureSeconds);
      for (;;) {
        const uint64_t t0 = nowNs();
        op(hop, ws);
        const uint64_t t1 = nowNs();
        if (!samples->tryRecord(t1 - t0) || t1 >= end) return 0;
      }
    });
  };
  auto partyB = [&]() -> int { return serve(path, control); };
  auto placement = runPair(o.pairOptions(), partyA, partyB);
  if (!placement) return placement.error();
  const LatencySummary summary = summarize(samples->samples());
  if (summary.count == 0) return Error(Errc::FAILED, "the client recorded no samples");
  report.addLatency(scenario.name, scenario.name, scenario.unit, summary);
  report.addPlacement(scenario.name, {placement->cpuA, placement->cpuB});
  return {};
}

Status nullRtt(const Scenario& s, const RunOptions& o, Report& r) {
  return latency(s, o, r,
                 [](Hop::Client& hop, kj::WaitScope& ws) { hop.nullRequest().send().wait(ws); });
}

Status chain10(const Scenario& s, const RunOptions& o, Report& r) {
  return latency(s, o, r, [](Hop::Client& hop, kj::WaitScope& ws) {
    auto p = hop.nextRequest().send();
    for (int i = 1; i < 10; ++i) p = p.getHop().nextRequest().send();
    p.wait(ws);
  });
}

Status callsInFlight(const Scenario& scenario, const RunOptions& o, Report& report) {
  constexpr int WINDOWS = 16;
  struct Shared {
    Control control;
    uint64_t calls[WINDOWS];
    uint64_t ns[WINDOWS];
  };
  auto mapping = SharedMapping::tryCreate(sizeof(Shared));
  if (!mapping) return mapping.error();
  auto* shared = new (mapping->data()) Shared();
  const int count = o.quick ? 2 : std::max(3, o.repetitions);
  const std::string path = socketPath();
  auto partyA = [&]() -> int {
    return client(path, &shared->control, [&](Hop::Client& hop, kj::WaitScope& ws) {
      auto batch = [&] {
        kj::Vector<kj::Promise<void>> all(IN_FLIGHT);
        for (uint32_t i = 0; i < IN_FLIGHT; ++i) all.add(hop.nullRequest().send().ignoreResult());
        kj::joinPromises(all.releaseAsArray()).wait(ws);
      };
      const uint64_t warmEnd = nowNs() + secondsToNs(o.warmupSeconds);
      while (nowNs() < warmEnd) batch();
      const uint64_t perWindow = secondsToNs(o.measureSeconds / count);
      for (int w = 0; w < count; ++w) {
        uint64_t calls = 0;
        const uint64_t t0 = nowNs();
        uint64_t t1 = t0;
        while (t1 - t0 < perWindow) {
          batch();
          calls += IN_FLIGHT;
          t1 = nowNs();
        }
        shared->calls[w] = calls;
        shared->ns[w] = t1 - t0;
      }
      return 0;
    });
  };
  auto partyB = [&]() -> int { return serve(path, &shared->control); };
  auto placement = runPair(o.pairOptions(), partyA, partyB);
  if (!placement) return placement.error();
  std::vector<double> rates;
  for (int w = 0; w < count; ++w)
    if (shared->ns[w] != 0)
      rates.push_back(static_cast<double>(shared->calls[w]) * NS_PER_S /
                      static_cast<double>(shared->ns[w]));
  if (rates.empty()) return Error(Errc::FAILED, "no window was timed");
  std::sort(rates.begin(), rates.end());
  report.add(Figure{.name = std::string(scenario.name),
                    .value = rates[(rates.size() - 1) / 2],
                    .unit = std::string(scenario.unit),
                    .scenario = std::string(scenario.name),
                    .samples = rates.size(),
                    .ratioTo = {}});
  report.addPlacement(scenario.name, {placement->cpuA, placement->cpuB});
  return {};
}

constexpr Scenario PEER[] = {
    {"peer_capnp_null_call_rtt_ns", "ns",
     "Cap'n Proto EzRpc over a Unix socket: empty call and its return, two processes", nullRtt},
    {"peer_capnp_calls_per_s_inflight", "calls/s",
     "Cap'n Proto EzRpc: empty calls completed per second with 64 in flight, one client",
     callsInFlight},
    {"peer_capnp_chain10_pipelined_ns", "ns",
     "Cap'n Proto EzRpc: ten dependent calls through pipelined capabilities", chain10},
};

}  // namespace

std::span<const Scenario> peerCapnpScenarios() { return PEER; }

}  // namespace agate::bench::rpc
