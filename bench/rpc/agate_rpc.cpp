// Agate's figures in suite `rpc`: two forked processes joined by a bushel-shaped pair of SHARED
// channels (requests client->server, replies server->client), an RpcConnection on each side's
// EventLoop. Every figure is the client's view; the server serves until the client detaches.
//
//  null_call_rtt_polled_ns   an empty call and its Return, the readers spinning between messages
//                            (AsyncWaitPolicy with a spin budget longer than a round trip)
//  null_call_rtt_parked_ns   the same with both readers parking on the doorbell futex at once
//  calls_per_s_inflight      64 calls in flight at a time, one client, polled
//  chain10_pipelined_ns      ten dependent calls (each on the capability the previous returns),
//                            all sent before the first Return, then the last awaited
//  chain10_awaited_ns        the same ten, each awaited before the next is sent
//  chain10_pipelined_parked_ns, chain10_awaited_parked_ns
//                            the two chains with both readers parking, as null_call_rtt_parked_ns:
//                            where a trip costs wake-ups, which pipelining is there to save
//  null_call_one_thread_ns   an awaited empty call with client and server on one thread: what the
//                            software costs per call, with no cache line crossing between cores
//  chain10_one_thread_ns     chain10_pipelined_ns with client and server on one thread
//  allocations_per_call      heap allocations per awaited call in steady state (one process)
//  null_call_rtt_parked_64clients_ns
//                            null_call_rtt_parked_ns over bushels a real agate-kernel opened
//                            (client/: Session, ServiceHost), with 63 more clients connected to
//                            the same server the whole time (a third process holds their
//                            bushels), every reader parking at once: what many idle clients cost
//                            the one that calls
//
// Every empty ("null") call is sent as a typed stub sends a method with empty results: with
// Request::noPipelining() (Call.noPromisePipelining), so its Return ends it and no Finish
// follows (two messages per call). The chain's `next` returns a capability, so its calls are
// sent with pipelining and each ends with Finish, as before.
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <vector>

#include "agate/client/service_host.h"
#include "agate/client/session.h"
#include "agate/rpc/connection.h"
#include "agate/runtime/channel.h"
#include "rpc/rpc.h"
#include "support/alloc_counter.h"
#include "support/kernel_daemon.h"
#include "support/latency.h"
#include "support/process_pair.h"
#include "support/round_trips.h"  // secondsToNs
#include "support/timing.h"

namespace agate::bench::rpc {

namespace {

using agate::rpc::CallContext;
using agate::rpc::RemoteCap;
using agate::rpc::RemotePromise;
using agate::rpc::Request;
using agate::rpc::Response;
using agate::rpc::RpcConnection;
using agate::rpc::RpcOptions;
using agate::rpc::ServerObject;

constexpr double NS_PER_S = 1e9;
constexpr uint64_t HOP_INTERFACE_ID = 0xb11805459d4e75d6ull;  // the schema's id, for Agate's side
constexpr uint16_t NULL_METHOD = 0;
constexpr uint16_t NEXT_METHOD = 1;
constexpr uint32_t IN_FLIGHT = 64;

// Fewer than support/round_trips.h allows: a call takes microseconds, not a cache line's 500 ns.
size_t rpcSampleCapacity(const RunOptions& o) {
  return std::clamp<size_t>(static_cast<size_t>(o.measureSeconds * 1e6), 10'000, 2'000'000);
}

// The benchmark's server object: `null` returns empty results; `next` returns a capability to
// itself (borrowed, so a chain allocates no objects).
class Hop final : public ServerObject {
 public:
  Promise<void> dispatch(uint64_t, uint16_t methodId, CallContext& ctx) override {
    if (methodId == NEXT_METHOD) {
      auto results = ctx.initResults(32);
      if (!results) return readyPromise<void>(results.error());
      auto index = ctx.addResultCap(*this);
      if (!index) return readyPromise<void>(index.error());
      auto s = results->initAsAnyStruct(0, 1);
      agate::rpc::writeCapPointer(s, 0, *index);
    }
    return readyPromise<void>(Status{});
  }
};

// Polled: spin long enough to cover a round trip on two CPUs (tens of microseconds), but not so
// long that a pair sharing one CPU starves its peer for long (the runtime's spin does not yield);
// past the budget it parks. Parked: park at once on every wait.
AsyncWaitPolicy policyFor(bool polled) {
  AsyncWaitPolicy p;
  p.spinIterations = polled ? 4'000 : 0;
  return p;
}

// The shared channels of one run, created before fork.
struct Bushel {
  std::unique_ptr<Channel> requests, replies;
};

Result<Bushel> makeBushel() {
  ChannelOptions co;
  co.scope = ChannelScope::SHARED;
  co.capacityBytes = 256 * 1024;
  auto requests = Channel::create(co);
  if (!requests) return requests.error();
  auto replies = Channel::create(co);
  if (!replies) return replies.error();
  return Bushel{std::move(*requests), std::move(*replies)};
}

// Party B: serves a Hop until the client detaches.
int serve(Bushel& b, bool polled) {
  auto rxEnd = b.requests->attachReceiver();
  auto txEnd = b.replies->attachSender();
  if (!rxEnd || !txEnd) return 2;
  EventLoop loop;
  MessageSender tx(std::move(*txEnd));
  MessageReceiver rx(*b.requests, std::move(*rxEnd), agate::rpc::rpcReceiverOptions());
  Hop hop;
  RpcOptions options;
  options.bootstrap = &hop;
  options.wait = policyFor(polled);
  RpcConnection conn(tx, rx, loop, options);
  Status st = loop.run(conn.onDisconnect());
  return st.code() == Errc::DISCONNECTED ? 0 : 3;
}

// Party A's frame: a client connection; `body` runs the measurement on it.
template <class Body>
int client(Bushel& b, bool polled, Body body) {
  auto txEnd = b.requests->attachSender();
  auto rxEnd = b.replies->attachReceiver();
  if (!rxEnd || !txEnd) return 2;
  EventLoop loop;
  MessageSender tx(std::move(*txEnd));
  MessageReceiver rx(*b.replies, std::move(*rxEnd), agate::rpc::rpcReceiverOptions());
  RpcOptions options;
  options.wait = policyFor(polled);
  RpcConnection conn(tx, rx, loop, options);
  RemoteCap root = conn.bootstrap();
  Result<int> r = loop.run(body(loop, root));
  return r.ok() ? *r : 1;
}

// An empty call, sent as the typed stub of a method with empty results sends it.
Promise<void> nullCall(RemoteCap& cap) {
  Result<Response> r = co_await cap.newCall(HOP_INTERFACE_ID, NULL_METHOD, 0).noPipelining().send();
  AGATE_CO_TRY(r);
  co_return {};
}

Promise<void> chain(RemoteCap& root, bool pipelined) {
  RemoteCap cap = root;
  std::optional<RemotePromise> last;
  for (int i = 0; i < 10; ++i) {
    RemotePromise p = cap.newCall(HOP_INTERFACE_ID, NEXT_METHOD, 0).send();
    if (!pipelined) {
      Result<Response> r = co_await p;
      AGATE_CO_TRY(r);
      auto next = r->getCap(0);
      AGATE_CO_TRY(next);
      cap = next->remote;
      continue;
    }
    cap = p.pipeline({0});
    if (i == 9) last.emplace(std::move(p));
  }
  if (last) {
    Result<Response> r = co_await *last;
    AGATE_CO_TRY(r);
  }
  co_return {};
}

// Times `op` once per sample after a warm-up; the samples go to `samples` (shared memory).
template <class Op>
Promise<int> timeEach(const RunOptions& o, SampleBuffer* samples, Op op) {
  const uint64_t warmEnd = nowNs() + secondsToNs(o.warmupSeconds);
  while (nowNs() < warmEnd) {
    Status s = co_await op();
    if (!s) co_return 1;
  }
  const uint64_t end = nowNs() + secondsToNs(o.measureSeconds);
  for (;;) {
    const uint64_t t0 = nowNs();
    Status s = co_await op();
    if (!s) co_return 1;
    const uint64_t t1 = nowNs();
    if (!samples->tryRecord(t1 - t0) || t1 >= end) co_return 0;
  }
}

Status latencyScenario(const Scenario& scenario, const RunOptions& o, Report& report, bool polled,
                       std::string_view ratioTo, Promise<void> (*op)(RemoteCap&, const void*),
                       const void* arg) {
  auto bushel = makeBushel();
  if (!bushel) return bushel.error();
  auto mapping = SharedMapping::tryCreate(SampleBuffer::bytesFor(rpcSampleCapacity(o)));
  if (!mapping) return mapping.error();
  SampleBuffer* samples = SampleBuffer::createAt(mapping->data(), rpcSampleCapacity(o));
  auto partyA = [&]() -> int {
    return client(*bushel, polled, [&](EventLoop&, RemoteCap& root) -> Promise<int> {
      co_return co_await timeEach(o, samples, [&] { return op(root, arg); });
    });
  };
  auto partyB = [&]() -> int { return serve(*bushel, polled); };
  auto placement = runPair(o.pairOptions(), partyA, partyB);
  if (!placement) return placement.error();
  const LatencySummary summary = summarize(samples->samples());
  if (summary.count == 0) return Error(Errc::FAILED, "the client recorded no samples");
  report.addLatency(scenario.name, scenario.name, scenario.unit, summary, ratioTo);
  report.addPlacement(scenario.name, {placement->cpuA, placement->cpuB});
  return {};
}

Promise<void> nullOp(RemoteCap& cap, const void*) { return nullCall(cap); }
Promise<void> chainOp(RemoteCap& cap, const void* pipelined) {
  return chain(cap, *static_cast<const bool*>(pipelined));
}

Status nullPolled(const Scenario& s, const RunOptions& o, Report& r) {
  return latencyScenario(s, o, r, true, "floor_cacheline_rtt_ns", nullOp, nullptr);
}
Status nullParked(const Scenario& s, const RunOptions& o, Report& r) {
  return latencyScenario(s, o, r, false, "floor_futex_rtt_ns", nullOp, nullptr);
}
constexpr bool PIPELINED = true;
constexpr bool AWAITED = false;
Status chainPipelined(const Scenario& s, const RunOptions& o, Report& r) {
  return latencyScenario(s, o, r, true, "null_call_rtt_polled_ns", chainOp, &PIPELINED);
}
Status chainAwaited(const Scenario& s, const RunOptions& o, Report& r) {
  return latencyScenario(s, o, r, true, "null_call_rtt_polled_ns", chainOp, &AWAITED);
}
Status chainPipelinedParked(const Scenario& s, const RunOptions& o, Report& r) {
  return latencyScenario(s, o, r, false, "null_call_rtt_parked_ns", chainOp, &PIPELINED);
}
Status chainAwaitedParked(const Scenario& s, const RunOptions& o, Report& r) {
  return latencyScenario(s, o, r, false, "null_call_rtt_parked_ns", chainOp, &AWAITED);
}

// Windows of IN_FLIGHT calls: send them all, await them all; calls/s per window, lower median.
Status callsInFlight(const Scenario& scenario, const RunOptions& o, Report& report) {
  auto bushel = makeBushel();
  if (!bushel) return bushel.error();
  constexpr int WINDOWS = 16;
  struct Windows {
    uint64_t calls[WINDOWS];
    uint64_t ns[WINDOWS];
  };
  auto mapping = SharedMapping::tryCreate(sizeof(Windows));
  if (!mapping) return mapping.error();
  auto* windows = static_cast<Windows*>(mapping->data());
  const int count = o.quick ? 2 : std::max(3, o.repetitions);
  auto partyA = [&]() -> int {
    return client(*bushel, true, [&](EventLoop&, RemoteCap& root) -> Promise<int> {
      std::vector<RemotePromise> slots;
      slots.reserve(IN_FLIGHT);
      auto batch = [&]() -> Promise<void> {
        for (uint32_t i = 0; i < IN_FLIGHT; ++i)
          slots.push_back(root.newCall(HOP_INTERFACE_ID, NULL_METHOD, 0).noPipelining().send());
        for (RemotePromise& p : slots) {
          Result<Response> r = co_await p;
          AGATE_CO_TRY(r);
        }
        slots.clear();
        co_return {};
      };
      const uint64_t warmEnd = nowNs() + secondsToNs(o.warmupSeconds);
      while (nowNs() < warmEnd)
        if (!(co_await batch())) co_return 1;
      const uint64_t perWindow = secondsToNs(o.measureSeconds / count);
      for (int w = 0; w < count; ++w) {
        uint64_t calls = 0;
        const uint64_t t0 = nowNs();
        uint64_t t1 = t0;
        while (t1 - t0 < perWindow) {
          if (!(co_await batch())) co_return 1;
          calls += IN_FLIGHT;
          t1 = nowNs();
        }
        windows->calls[w] = calls;
        windows->ns[w] = t1 - t0;
      }
      co_return 0;
    });
  };
  auto partyB = [&]() -> int { return serve(*bushel, true); };
  auto placement = runPair(o.pairOptions(), partyA, partyB);
  if (!placement) return placement.error();
  std::vector<double> rates;
  for (int w = 0; w < count; ++w)
    if (windows->ns[w] != 0)
      rates.push_back(static_cast<double>(windows->calls[w]) * NS_PER_S /
                      static_cast<double>(windows->ns[w]));
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

// One process, one loop: a client connection and a server connection joined by LOCAL channels
// whose readers copy frames in as SHARED ones do (COPY_IN), so a call takes the cross-process
// software path with no cache line crossing between cores.
struct OneThread {
  EventLoop loop;
  std::unique_ptr<Channel> c2s, s2c;
  std::optional<MessageSender> clientTx, serverTx;
  std::optional<MessageReceiver> serverRx, clientRx;
  Hop hop;
  std::optional<RpcConnection> server, client;
  RemoteCap root;

  Status open() {
    ChannelOptions co;
    co.scope = ChannelScope::LOCAL;
    auto a = Channel::create(co);
    if (!a) return a.error();
    auto b = Channel::create(co);
    if (!b) return b.error();
    c2s = std::move(*a);
    s2c = std::move(*b);
    MessageReceiverOptions ro = agate::rpc::rpcReceiverOptions();
    ro.policy = ReadPolicy::COPY_IN;
    clientTx.emplace(c2s->attachSender().value());
    serverRx.emplace(*c2s, c2s->attachReceiver().value(), ro);
    serverTx.emplace(s2c->attachSender().value());
    clientRx.emplace(*s2c, s2c->attachReceiver().value(), ro);
    RpcOptions so;
    so.bootstrap = &hop;
    server.emplace(*serverTx, *serverRx, loop, so);
    client.emplace(*clientTx, *clientRx, loop);
    root = client->bootstrap();
    return {};
  }
  ~OneThread() {
    root = RemoteCap();
    client.reset();
    server.reset();
  }
  Promise<void> calls(uint64_t n) {
    for (uint64_t i = 0; i < n; ++i) AGATE_CO_TRY(co_await nullCall(root));
    co_return {};
  }
};

// Global operator new calls per awaited null call after a warm-up (the counting operator new is
// linked into this driver).
Status allocationsPerCall(const Scenario& scenario, const RunOptions& o, Report& report) {
  OneThread t;
  AGATE_TRY(t.open());
  const uint64_t calls = o.quick ? 2'000 : 100'000;
  AGATE_TRY(t.loop.run(t.calls(1'000)));
  const uint64_t before = agate::testing::allocationCount();
  AGATE_TRY(t.loop.run(t.calls(calls)));
  const uint64_t allocations = agate::testing::allocationCount() - before;
  report.add(Figure{.name = std::string(scenario.name),
                    .value = static_cast<double>(allocations) / static_cast<double>(calls),
                    .unit = std::string(scenario.unit),
                    .scenario = std::string(scenario.name),
                    .samples = calls,
                    .ratioTo = {}});
  report.addPlacement(scenario.name, {::sched_getcpu()});
  return {};
}

// Times `op` on the root of a OneThread pair, one sample per op after a warm-up; the figure is
// given as a ratio to `ratioTo`.
template <class Op>
Status oneThreadLatency(const Scenario& scenario, const RunOptions& o, Report& report,
                        std::string_view ratioTo, Op op) {
  OneThread t;
  AGATE_TRY(t.open());
  std::vector<uint64_t> samples;
  samples.reserve(rpcSampleCapacity(o));
  auto measure = [&]() -> Promise<void> {
    const uint64_t warmEnd = nowNs() + secondsToNs(o.warmupSeconds);
    while (nowNs() < warmEnd) AGATE_CO_TRY(co_await op(t.root));
    const uint64_t end = nowNs() + secondsToNs(o.measureSeconds);
    while (samples.size() < samples.capacity()) {
      const uint64_t t0 = nowNs();
      AGATE_CO_TRY(co_await op(t.root));
      const uint64_t t1 = nowNs();
      samples.push_back(t1 - t0);
      if (t1 >= end) break;
    }
    co_return {};
  };
  AGATE_TRY(t.loop.run(measure()));
  const LatencySummary summary = summarize(samples);
  if (summary.count == 0) return Error(Errc::FAILED, "nothing was timed");
  report.addLatency(scenario.name, scenario.name, scenario.unit, summary, ratioTo);
  report.addPlacement(scenario.name, {::sched_getcpu()});
  return {};
}

// The software cost of a call: both ends on one thread, so nothing crosses between cores and
// no one waits; each sample is one awaited null call (client and server work, two messages:
// Call and Return, no Finish).
Status nullOneThread(const Scenario& scenario, const RunOptions& o, Report& report) {
  return oneThreadLatency(scenario, o, report, "floor_cacheline_rtt_ns",
                          [](RemoteCap& root) { return nullCall(root); });
}

// The software cost of a pipelined chain (chain10_pipelined_ns on one thread): ten Calls, ten
// Returns each carrying a capability, ten Finishes (nine of them sent before their Returns, with
// releaseResultCaps) and one Release.
Status chainOneThread(const Scenario& scenario, const RunOptions& o, Report& report) {
  return oneThreadLatency(scenario, o, report, "null_call_one_thread_ns",
                          [](RemoteCap& root) { return chain(root, PIPELINED); });
}

// --- Many clients over kernel bushels ---

constexpr int IDLE_CLIENTS = 63;
constexpr const char* HOP_SERVICE = "bench-hop";

agate::client::SessionOptions parkedSession() {
  agate::client::SessionOptions s;
  s.rpc.wait = policyFor(false);
  return s;
}

// The third process: opens IDLE_CLIENTS bushels to the service, says so on `ready`, and keeps
// them open (every reader parked) until killed.
[[noreturn]] void holdIdleClients(const std::string& home, int ready) {
  EventLoop loop;
  auto kernel = caps::KernelConnection::tryAttach(loop, home, "bench-idle");
  if (!kernel) ::_exit(2);
  agate::client::Session session(**kernel, parkedSession());
  auto open = [&]() -> Promise<void> {
    AGATE_CO_TRY(co_await session.waitForService(HOP_SERVICE, std::chrono::seconds(10)));
    for (int i = 0; i < IDLE_CLIENTS; ++i) {
      auto opened = co_await session.openBushel(HOP_SERVICE);
      if (!opened) co_return opened.error();
    }
    co_return {};
  };
  if (!loop.run(open())) ::_exit(3);
  const char byte = 1;
  if (::write(ready, &byte, 1) != 1) ::_exit(4);
  (void)loop.run(loop.sleep(std::chrono::hours(1)));
  ::_exit(0);
}

// The server: one Hop per client, every reader parking at once; ends once a client went (the
// measuring one exits first).
int serveHops(const std::string& home) {
  EventLoop loop;
  auto kernel = caps::KernelConnection::tryAttach(loop, home, "bench-hop");
  if (!kernel) return 2;
  agate::client::ServiceOptions options;
  options.rpc.wait = policyFor(false);
  auto served = [&]() -> Promise<void> {
    auto host = co_await agate::client::ServiceHost::create(
        **kernel, HOP_SERVICE, [](agate::client::ServedClient&) { return std::make_unique<Hop>(); },
        options);
    if (!host) co_return host.error();
    auto watch = [&]() -> Promise<void> {
      while ((*host)->clientsDropped() == 0)
        (void)co_await loop.sleep(std::chrono::milliseconds(5));
      (*host)->stop();
      co_return {};
    };
    Promise<void> watching = watch();
    co_return co_await (*host)->run();
  };
  return loop.run(served()) ? 0 : 3;
}

Status nullParked64Clients(const Scenario& scenario, const RunOptions& o, Report& report) {
  auto daemon = Daemon::tryStart(AGATE_KERNEL_BINARY, /*pollMicros=*/0);
  if (!daemon) return daemon.error();
  const std::string home = (*daemon)->home();
  auto mapping = SharedMapping::tryCreate(SampleBuffer::bytesFor(rpcSampleCapacity(o)));
  if (!mapping) return mapping.error();
  SampleBuffer* samples = SampleBuffer::createAt(mapping->data(), rpcSampleCapacity(o));
  int ready[2];
  if (::pipe(ready) != 0) return Error::fromErrno(errno, "pipe");
  const pid_t holder = ::fork();  // no EventLoop exists in this process here
  if (holder < 0) return Error::fromErrno(errno, "fork");
  if (holder == 0) {
    ::close(ready[0]);
    holdIdleClients(home, ready[1]);
  }
  ::close(ready[1]);

  auto partyA = [&]() -> int {
    pollfd pfd{ready[0], POLLIN, 0};  // the idle clients are connected
    char byte = 0;
    if (::poll(&pfd, 1, 20'000) != 1 || ::read(ready[0], &byte, 1) != 1) return 5;
    EventLoop loop;
    auto kernel = caps::KernelConnection::tryAttach(loop, home, "bench-active");
    if (!kernel) return 2;
    agate::client::Session session(**kernel, parkedSession());
    auto measure = [&]() -> Promise<int> {
      auto opened = co_await session.openBushel(HOP_SERVICE);
      if (!opened) co_return 3;
      RemoteCap root = opened->connection->bootstrap();
      co_return co_await timeEach(o, samples, [&] { return nullCall(root); });
    };
    Result<int> r = loop.run(measure());
    return r.ok() ? *r : 1;
  };
  auto partyB = [&]() -> int { return serveHops(home); };
  auto placement = runPair(o.pairOptions(), partyA, partyB);
  ::close(ready[0]);
  ::kill(holder, SIGKILL);
  ::waitpid(holder, nullptr, 0);
  if (!placement) return placement.error();
  const LatencySummary summary = summarize(samples->samples());
  if (summary.count == 0) return Error(Errc::FAILED, "the client recorded no samples");
  report.addLatency(scenario.name, scenario.name, scenario.unit, summary, "floor_futex_rtt_ns");
  report.addPlacement(scenario.name, {placement->cpuA, placement->cpuB});
  return {};
}

constexpr Scenario AGATE_RPC[] = {
    {"null_call_rtt_polled_ns", "ns",
     "empty call and its Return between two processes over SHARED rings, readers spinning",
     nullPolled},
    {"null_call_rtt_parked_ns", "ns",
     "empty call and its Return between two processes, both readers parking on the futex",
     nullParked},
    {"calls_per_s_inflight", "calls/s",
     "empty calls completed per second with 64 in flight, one client, two processes",
     callsInFlight},
    {"chain10_pipelined_ns", "ns",
     "ten dependent calls, each on the capability the previous returns, pipelined (one trip)",
     chainPipelined},
    {"chain10_awaited_ns", "ns", "the same ten dependent calls, each awaited before the next",
     chainAwaited},
    {"chain10_pipelined_parked_ns", "ns",
     "chain10_pipelined_ns with both readers parking on the futex: a trip costs two wake-ups",
     chainPipelinedParked},
    {"chain10_awaited_parked_ns", "ns",
     "chain10_awaited_ns with both readers parking: ten trips, each two wake-ups",
     chainAwaitedParked},
    {"null_call_one_thread_ns", "ns",
     "empty call and its Return with both ends on one thread (COPY_IN): software cost, no transfer",
     nullOneThread},
    {"chain10_one_thread_ns", "ns",
     "chain10_pipelined_ns with both ends on one thread (COPY_IN): the chain's software cost",
     chainOneThread},
    {"allocations_per_call", "allocs",
     "global operator new calls per awaited empty call in steady state (one process)",
     allocationsPerCall},
    {"null_call_rtt_parked_64clients_ns", "ns",
     "null_call_rtt_parked_ns over kernel-opened bushels, 63 other clients connected and parked",
     nullParked64Clients},
};

}  // namespace

std::span<const Scenario> agateRpcScenarios() { return AGATE_RPC; }

}  // namespace agate::bench::rpc
