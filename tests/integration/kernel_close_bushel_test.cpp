// agate-kernel's closeBushel call (a service's server disconnects a client) through the real
// socket and rings: two connections of one process stand for the server and the client (the
// kernel treats each attach as its own process). The client hears BUSHEL_CLOSED, its cap goes
// and its bank gets the rings and the state pages back; every refusal (wrong type, missing
// right, another service's bushel, a second close) leaves the observable state unchanged and
// sends no event.
#include <chrono>
#include <memory>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "../support/watchdog.h"
#include "agate/caps/kernel_connection.h"
#include "kernel_client.h"
#include "kernel_fixture.h"

namespace agate::caps {
namespace {

using agate::testing::KernelProcess;
using agate::testing::Watchdog;
using std::chrono::seconds;

using agate::testing::get;
using agate::testing::Observed;

// A server with the service "store" and a client with one bushel to it, paid from a bank of
// its own.
struct Pair {
  KernelProcess kernel;
  EventLoop loop;
  std::unique_ptr<KernelConnection> server, client;
  Cap<Service> service;
  Cap<SpaceBank> bank;
  Cap<Bushel> bushel;
  Koid koid = 0;
  Pair() {
    server = std::move(KernelConnection::tryAttach(loop, kernel.home(), "server")).value();
    client = std::move(KernelConnection::tryAttach(loop, kernel.home(), "client")).value();
    service = get(server->sync().registerService(server->registry(), "store", server->bank()));
    bank = get(client->sync().createBank(client->bank(), 500));
    bushel = get(client->sync().openBushel(client->registry(), "store", bank));
    KernelEvent opened = get(server->sync().nextEvent());
    EXPECT_EQ(opened.type, EventType::BUSHEL_OPENED);
    koid = opened.bushel;
  }
  uint64_t used() { return get(client->sync().readBank(bank)).used; }
  Observed observe() { return agate::testing::observe(*server, {server.get(), client.get()}); }
  // True when `k` has no event within a short wait.
  bool quiet(KernelConnection& k) { return agate::testing::quiet(loop, k); }
};

TEST(KernelCloseBushel, TheServerClosesItAndTheClientIsToldAndPaidBack) {
  Watchdog dog("closeBushel", seconds(30));
  Pair p;
  EXPECT_EQ(get(p.server->sync().growBushelState(p.service, p.koid, 6)), 6u);
  EXPECT_GT(p.used(), 6u);

  ASSERT_TRUE(p.server->sync().closeBushel(p.service, p.koid).ok());
  KernelEvent told = get(p.client->sync().nextEvent());
  EXPECT_EQ(told.type, EventType::BUSHEL_CLOSED);
  EXPECT_EQ(told.bushel, p.koid);
  EXPECT_EQ(told.peer, p.server->pid());
  KernelEvent closed = get(p.server->sync().nextEvent());
  EXPECT_EQ(closed.type, EventType::BUSHEL_CLOSED);
  EXPECT_EQ(closed.bushel, p.koid);
  EXPECT_EQ(closed.peer, p.client->pid());
  EXPECT_EQ(p.client->sync().inspectCap(p.bushel).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(p.used(), 0u) << "the rings, the record and the state pages came back";

  // A second close: NOT_FOUND, nothing changes, nobody hears anything.
  const Observed before = p.observe();
  EXPECT_EQ(p.server->sync().closeBushel(p.service, p.koid).code(), Errc::NOT_FOUND);
  EXPECT_TRUE(p.observe() == before);
  EXPECT_TRUE(p.quiet(*p.client));
  EXPECT_TRUE(p.quiet(*p.server));
  // The service carries on.
  (void)get(p.client->sync().openBushel(p.client->registry(), "store", p.bank));
  EXPECT_EQ(get(p.server->sync().nextEvent()).type, EventType::BUSHEL_OPENED);
}

TEST(KernelCloseBushel, RefusalsLeaveEverythingUnchangedAndSendNoEvent) {
  Watchdog dog("closeBushel refusals", seconds(30));
  Pair p;
  auto s = p.server->sync();
  Cap<Service> readOnly = get(s.copyCap(p.service, Rights::READ));
  Cap<Service> other = get(s.registerService(p.server->registry(), "other", p.server->bank()));
  const Observed before = p.observe();
  EXPECT_EQ(s.closeBushel(readOnly, p.koid).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.closeBushel(Cap<Service>{p.server->bank().handle}, p.koid).code(), Errc::WRONG_TYPE);
  EXPECT_EQ(s.closeBushel(Cap<Service>{}, p.koid).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(s.closeBushel(other, p.koid).code(), Errc::NOT_FOUND) << "another service's bushel";
  EXPECT_EQ(s.closeBushel(p.service, p.koid + 1000).code(), Errc::NOT_FOUND);
  // The client holds no Service cap: it closes by deleting its own.
  EXPECT_EQ(p.client->sync().closeBushel(Cap<Service>{p.bushel.handle}, p.koid).code(),
            Errc::WRONG_TYPE);
  EXPECT_TRUE(p.observe() == before);
  EXPECT_TRUE(p.quiet(*p.client));
  EXPECT_TRUE(p.quiet(*p.server));
  EXPECT_TRUE(p.client->sync().bushelRings(p.bushel).ok()) << "the bushel is still open";
}

}  // namespace
}  // namespace agate::caps
