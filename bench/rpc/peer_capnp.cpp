// Suite `rpc`'s peer: Cap'n Proto 0.9.2 RPC as a user would deploy it on one machine, an
// EzRpcServer and an EzRpcClient talking over a Unix socket, each in its own process. Party B
// serves PeerBench (peer_capnp.capnp); party A calls it and times. Nothing here is Agate code:
// these figures are what Agate's rpc figures are compared with.
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include <capnp/ez-rpc.h>
#include <kj/async.h>
#include <kj/exception.h>

#include "peer_capnp.capnp.h"
#include "rpc/rpc_suite.h"
#include "support/round_trips.h"
#include "support/timing.h"

namespace agate::bench::rpc {

namespace {

constexpr int CHAIN_LENGTH = 10;
constexpr int IN_FLIGHT = 64;  // calls outstanding at once in the throughput scenario
constexpr int MAX_WINDOWS = 64;
constexpr auto SERVER_START_TIMEOUT = std::chrono::seconds(10);

class PeerBenchImpl final : public PeerBench::Server {
 public:
  explicit PeerBenchImpl(kj::Own<kj::PromiseFulfiller<void>> stopped) : stopped_(kj::mv(stopped)) {}

  kj::Promise<void> null(NullContext) override { return kj::READY_NOW; }

  kj::Promise<void> step(StepContext context) override {
    auto results = context.getResults();
    results.setValue(context.getParams().getValue() + 1);
    results.setNext(thisCap());
    return kj::READY_NOW;
  }

  kj::Promise<void> stop(StopContext) override {
    stopped_->fulfill();
    return kj::READY_NOW;
  }

 private:
  kj::Own<kj::PromiseFulfiller<void>> stopped_;
};

// What the parties share, mapped before fork.
struct alignas(64) PeerControl {
  std::atomic<uint32_t> serverReady{0};  // B -> A: listening. Release/acquire.
  uint32_t windows = 0;                  // written by A only, read by the driver after exit
  double windowRates[MAX_WINDOWS] = {};
};

// A socket path private to this run of the driver.
std::string socketAddress() {
  return "unix:/tmp/agate-bench-rpc-peer-" + std::to_string(::getpid()) + ".sock";
}

// Party B: serves until A calls stop().
int serve(const std::string& address, PeerControl& control) {
  try {
    auto stopped = kj::newPromiseAndFulfiller<void>();
    capnp::EzRpcServer server(kj::heap<PeerBenchImpl>(kj::mv(stopped.fulfiller)), address);
    auto& waitScope = server.getWaitScope();
    server.getPort().wait(waitScope);  // bound and listening
    control.serverReady.store(1, std::memory_order_release);
    stopped.promise.wait(waitScope);
    return 0;
  } catch (const kj::Exception& e) {
    std::fprintf(stderr, "rpc peer server: %s\n", e.getDescription().cStr());
    return 1;
  }
}

bool waitForServer(const PeerControl& control) {
  const auto deadline = std::chrono::steady_clock::now() + SERVER_START_TIMEOUT;
  while (control.serverReady.load(std::memory_order_acquire) == 0) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

// Party A's frame: connects, runs `body` with the main capability, then stops the server (a
// failed stop only means the server went first).
template <class Body>
int asClient(const std::string& address, const PeerControl& control, Body&& body) {
  if (!waitForServer(control)) return 3;
  try {
    capnp::EzRpcClient client(address);
    auto& waitScope = client.getWaitScope();
    PeerBench::Client cap = client.getMain<PeerBench>();
    const int rc = body(cap, waitScope);
    try {
      cap.stopRequest().send().wait(waitScope);
    } catch (const kj::Exception&) {  // the server may exit before its return is written
    }
    return rc;
  } catch (const kj::Exception& e) {
    std::fprintf(stderr, "rpc peer client: %s\n", e.getDescription().cStr());
    return 1;
  }
}

// ---- scenarios ----

// An empty call and its return, one at a time, client and server in two processes.
Status nullCallRtt(const Scenario& scenario, const RunOptions& o, Report& report) {
  auto control = SharedMapping::tryCreate(sizeof(PeerControl));
  if (!control) return control.error();
  auto* c = new (control->data()) PeerControl{};
  const std::string address = socketAddress();
  Status s = runRoundTrips(
      scenario, o, report,
      [&](SampleBuffer& samples) {
        return asClient(address, *c, [&](PeerBench::Client& cap, kj::WaitScope& ws) {
          return recordRoundTrips(o, samples,
                                  [&] {
                                    cap.nullRequest().send().wait(ws);
                                    return true;
                                  })
                     ? 0
                     : 1;
        });
      },
      [&] { return serve(address, *c); }, "floor_socketpair_rtt_ns");
  ::unlink(address.c_str() + 5);
  return s;
}

// Ten dependent calls, each made on the capability the previous one returns, all sent before
// any return arrives (promise pipelining); timed until the last one's result is read.
Status chain10Pipelined(const Scenario& scenario, const RunOptions& o, Report& report) {
  auto control = SharedMapping::tryCreate(sizeof(PeerControl));
  if (!control) return control.error();
  auto* c = new (control->data()) PeerControl{};
  const std::string address = socketAddress();
  Status s = runRoundTrips(
      scenario, o, report,
      [&](SampleBuffer& samples) {
        return asClient(address, *c, [&](PeerBench::Client& cap, kj::WaitScope& ws) {
          std::vector<capnp::RemotePromise<PeerBench::StepResults>> chain;
          chain.reserve(CHAIN_LENGTH);
          return recordRoundTrips(o, samples,
                                  [&] {
                                    chain.clear();
                                    PeerBench::Client target = cap;
                                    for (uint64_t i = 0; i < CHAIN_LENGTH; ++i) {
                                      auto request = target.stepRequest();
                                      request.setValue(i);
                                      chain.push_back(request.send());
                                      target = chain.back().getNext();
                                    }
                                    return chain.back().wait(ws).getValue() == CHAIN_LENGTH;
                                  })
                     ? 0
                     : 1;
        });
      },
      [&] { return serve(address, *c); }, "peer_capnp_null_call_rtt_ns");
  ::unlink(address.c_str() + 5);
  return s;
}

// Calls per second with IN_FLIGHT empty calls outstanding: each batch sends IN_FLIGHT calls, then
// waits for all of them. The median over `repetitions` windows.
Status callsInFlight(const Scenario& scenario, const RunOptions& o, Report& report) {
  auto mapping = SharedMapping::tryCreate(sizeof(PeerControl));
  if (!mapping) return mapping.error();
  auto* control = new (mapping->data()) PeerControl{};
  PeerControl& c = *control;
  const std::string address = socketAddress();
  auto partyA = [&]() -> int {
    return asClient(address, c, [&](PeerBench::Client& cap, kj::WaitScope& ws) {
      std::vector<kj::Promise<capnp::Response<PeerBench::NullResults>>> batch;
      batch.reserve(IN_FLIGHT);
      auto runBatch = [&] {
        for (int i = 0; i < IN_FLIGHT; ++i) batch.push_back(cap.nullRequest().send());
        for (auto& p : batch) p.wait(ws);
        batch.clear();
      };
      const uint64_t warmEnd = nowNs() + secondsToNs(o.warmupSeconds);
      while (nowNs() < warmEnd) runBatch();
      const int windows = std::clamp(o.repetitions, 1, MAX_WINDOWS);
      const uint64_t windowNs = secondsToNs(o.measureSeconds) / static_cast<uint64_t>(windows);
      for (int w = 0; w < windows; ++w) {
        uint64_t calls = 0;
        const uint64_t t0 = nowNs();
        uint64_t t1 = t0;
        while (t1 - t0 < windowNs) {
          runBatch();
          calls += IN_FLIGHT;
          t1 = nowNs();
        }
        c.windowRates[w] = static_cast<double>(calls) * 1e9 / static_cast<double>(t1 - t0);
      }
      c.windows = static_cast<uint32_t>(windows);
      return 0;
    });
  };
  auto placement = runPair(o.pairOptions(), partyA, [&] { return serve(address, c); });
  ::unlink(address.c_str() + 5);  // the path after "unix:"; the server leaves it behind
  if (!placement) return placement.error();
  std::vector<double> rates(
      control->windowRates,
      control->windowRates + std::min<uint32_t>(control->windows, MAX_WINDOWS));
  if (rates.empty()) return Error(Errc::FAILED, "the client measured no window");
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

constexpr Scenario PEER_CAPNP[] = {
    {"peer_capnp_null_call_rtt_ns", "ns",
     "Cap'n Proto EzRpc over a Unix socket: an empty call and its return, client and server in "
     "two processes",
     nullCallRtt},
    {"peer_capnp_calls_per_s_inflight", "calls/s",
     "Cap'n Proto EzRpc: empty calls per second with 64 outstanding (batches of 64 sent, then "
     "awaited)",
     callsInFlight},
    {"peer_capnp_chain10_pipelined_ns", "ns",
     "Cap'n Proto EzRpc: ten dependent calls, each on the capability the previous returns, all "
     "pipelined; until the last result is read",
     chain10Pipelined},
};

}  // namespace

std::span<const Scenario> peerCapnpScenarios() { return PEER_CAPNP; }

}  // namespace agate::bench::rpc
