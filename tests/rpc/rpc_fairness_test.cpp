// RpcOptions::messagesPerTurn: a connection's reader yields to the others after its budget, so
// connections sharing a loop are served round robin and a peer with a full ring cannot starve
// another. Two connection pairs on one loop over LOCAL channels; calls are queued before the
// loop runs, so the order the server handles them in is deterministic. And many connections on
// one loop are not scanned: a parked reader waits on its own doorbell, so a hundred idle
// connections read nothing while another on their loop makes a thousand calls.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "rpc_harness.h"
#include "support/watchdog.h"

namespace agate::rpc::test {
namespace {

using agate::testing::Watchdog;

constexpr uint64_t FLOOD_BASE = 1000;  // RECORD values of the flooding client

// Sends `count` RECORD calls with values base, base + 1, ... without waiting.
void sendRecords(RpcConnection& client, uint64_t base, int count,
                 std::vector<RemotePromise>& pending) {
  RemoteCap node = client.bootstrap();
  for (int i = 0; i < count; ++i) {
    Request req = node.newCall(NODE_INTERFACE_ID, RECORD, 16);
    req.initParams<Value>().setValue(base + static_cast<uint64_t>(i));
    pending.push_back(req.send());
  }
}

// Where the last of the quiet client's calls (values < FLOOD_BASE) landed in the server's order.
size_t lastQuietPosition(const Log& log) {
  size_t last = 0;
  for (size_t i = 0; i < log.order.size(); ++i)
    if (log.order[i] < FLOOD_BASE) last = i;
  return last;
}

struct Served {
  size_t total = 0;
  size_t lastQuiet = 0;
};

Served serveFloodAndQuiet(uint32_t messagesPerTurn) {
  EventLoop loop;
  Log log;
  Node flooded(0, log), quiet(0, log);
  RpcOptions options;
  options.messagesPerTurn = messagesPerTurn;
  LocalPair flood(loop, &flooded, nullptr, options, 256 * 1024);
  LocalPair calm(loop, &quiet, nullptr, options, 256 * 1024);
  std::vector<RemotePromise> pending;
  sendRecords(flood.client(), FLOOD_BASE, 400, pending);
  sendRecords(calm.client(), 1, 5, pending);
  EXPECT_TRUE(runUntil(loop, [&] { return log.order.size() == 405; }));
  EXPECT_TRUE(runUntil(loop, [&] {
    return std::all_of(pending.begin(), pending.end(), [](auto& p) { return p.isReady(); });
  }));
  pending.clear();  // handles go before their connections
  return Served{log.order.size(), lastQuietPosition(log)};
}

TEST(RpcFairnessTest, AReaderYieldsAfterItsBudgetSoAFullRingCannotStarveAnotherConnection) {
  Watchdog watchdog{"rpc_fairness_test", std::chrono::seconds(30)};
  const Served s = serveFloodAndQuiet(4);
  ASSERT_EQ(s.total, 405u);
  // Round robin with 4 messages a turn: the quiet client's 5 calls are done within the first
  // few turns, not after the flood's 400.
  EXPECT_LT(s.lastQuiet, 20u) << "the quiet client's last call was handled at " << s.lastQuiet;
}

TEST(RpcFairnessTest, WithoutABudgetAReaderDrainsItsRingBeforeOthersRun) {
  // The contrast that shows the budget is what makes the order above (and that the test above
  // can fail): with no budget the flood's whole ring goes first.
  Watchdog watchdog{"rpc_fairness_test", std::chrono::seconds(30)};
  const Served s = serveFloodAndQuiet(0);
  ASSERT_EQ(s.total, 405u);
  EXPECT_GE(s.lastQuiet, 400u);
}

// `idleCount` connections on one loop beside a busy one: how many times the idle ones' readers
// found their rings empty while the busy one made 1000 calls. `idleSpin`: the idle readers'
// spin budget (the default, 1000 empty tries, then they park); `parks`: whether to wait first
// until every idle reader has parked.
uint64_t idleReadsWhileAnotherIsBusy(int idleCount, uint32_t idleSpin, bool parks) {
  EventLoop loop;
  Log log;
  Node root(0, log);
  RpcOptions busyOptions;
  busyOptions.messagesPerTurn = 16;  // as a service host sets it
  RpcOptions idleOptions = busyOptions;
  idleOptions.wait.spinIterations = idleSpin;
  // A parked reader looks at its ring once per park slice even unwoken (a backstop): longer
  // than the test, so only a wake-up could make it read.
  idleOptions.wait.parkSlice = std::chrono::hours(1);
  std::vector<std::unique_ptr<LocalPair>> idle;
  for (int i = 0; i < idleCount; ++i)
    idle.push_back(std::make_unique<LocalPair>(loop, idleOptions, idleOptions));
  LocalPair busy(loop, &root, nullptr, busyOptions);
  auto idleReads = [&] {
    uint64_t n = 0;
    for (auto& p : idle) n += p->serverReceiver().emptyReads() + p->clientReceiver().emptyReads();
    return n;
  };
  // Every idle reader looks, spins its budget and parks: its count then stops.
  uint64_t settled = idleReads();
  for (int quiet = 0, i = 0; parks && quiet < 3 && i < 500; ++i) {
    (void)loop.run(loop.sleep(std::chrono::milliseconds(5)));
    const uint64_t now = idleReads();
    quiet = now == settled ? quiet + 1 : 0;
    settled = now;
  }
  std::vector<RemotePromise> pending;
  RemoteCap node = busy.client().bootstrap();
  for (int round = 0; round < 10; ++round) {
    for (int i = 0; i < 100; ++i) {
      Request req = node.newCall(NODE_INTERFACE_ID, ECHO, 16);
      req.initParams<Value>().setValue(static_cast<uint64_t>(i));
      pending.push_back(req.send());
    }
    EXPECT_TRUE(runUntil(loop, [&] {
      return std::all_of(pending.begin(), pending.end(), [](auto& p) { return p.isReady(); });
    }));
    pending.clear();
  }
  EXPECT_EQ(busy.server().stats().callsReceived, 1000u);
  EXPECT_GT(busy.serverReceiver().emptyReads(), 0u) << "the busy reader waited between rounds";
  const uint64_t during = idleReads() - settled;
  node = RemoteCap();
  return during;
}

TEST(RpcFairnessTest, IdleConnectionsAreNotReadWhileAnotherOnTheirLoopIsBusy) {
  Watchdog watchdog{"rpc_fairness_test", std::chrono::seconds(30)};
  // The parked readers wait on their own doorbells: the busy connection's traffic wakes none.
  EXPECT_EQ(idleReadsWhileAnotherIsBusy(100, 1000, true), 0u);
}

TEST(RpcFairnessTest, ReadersThatNeverParkReadTheirEmptyRingsAgainAndAgain) {
  // The contrast that shows the count above can move: readers that only spin (yielding to the
  // loop's other work between tries) read their empty rings on every turn of the busy one.
  Watchdog watchdog{"rpc_fairness_test", std::chrono::seconds(30)};
  EXPECT_GT(idleReadsWhileAnotherIsBusy(4, UINT32_MAX, false), 1000u);
}

}  // namespace
}  // namespace agate::rpc::test
