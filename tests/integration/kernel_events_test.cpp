// KernelEvents, the router of one kernel connection's events, against a real agate-kernel: two
// connections of this process stand for a server and a client (the kernel treats each attach as
// its own process). Opens that come before the server listens are kept; one listener per
// service; a close that overtakes the claim of its bushel is reported by claimBushel; the
// kernel's death reaches every listener once, and later ones at once.
#include <chrono>
#include <memory>
#include <vector>

#include <gtest/gtest.h>

#include "../support/watchdog.h"
#include "agate/client/kernel_events.h"
#include "kernel_fixture.h"

namespace agate::client {
namespace {

using agate::testing::KernelProcess;
using agate::testing::Watchdog;
using caps::EventType;
using caps::KernelConnection;
using caps::KernelEvent;
using std::chrono::milliseconds;
using std::chrono::seconds;

struct Recorder final : KernelEventListener {
  std::vector<EventType> types;
  std::vector<caps::Koid> bushels;
  int gone = 0;
  bool ringsValid = true;
  void kernelEvent(KernelEvent& e) noexcept override {
    types.push_back(e.type);
    bushels.push_back(e.bushel);
    if (e.type == EventType::BUSHEL_OPENED) ringsValid = e.request.valid() && e.reply.valid();
  }
  void kernelGone(const Error&) noexcept override { ++gone; }
};

struct Pair {
  KernelProcess kernel;
  EventLoop loop;
  std::unique_ptr<KernelConnection> server, client;
  Pair() {
    server = std::move(KernelConnection::tryAttach(loop, kernel.home(), "server")).value();
    client = std::move(KernelConnection::tryAttach(loop, kernel.home(), "client")).value();
  }
  // Lets the routers' pumps run for a while.
  void settle() { (void)loop.run(loop.sleep(milliseconds(30))); }
};

TEST(KernelEvents, OpensBeforeTheServiceIsListenedToAreKeptAndDeliveredWhenItIs) {
  Watchdog dog("held opens", seconds(30));
  Pair p;
  KernelEvents events(*p.server);
  auto service = p.server->sync().registerService(p.server->registry(), "svc", p.server->bank());
  ASSERT_TRUE(service.ok());
  const caps::Koid koid = p.server->sync().inspectCap(*service)->koid;
  auto bushel = p.client->sync().openBushel(p.client->registry(), "svc", p.client->bank());
  ASSERT_TRUE(bushel.ok());
  p.settle();
  Recorder host;
  events.attach(host);
  EXPECT_TRUE(host.types.empty());
  ASSERT_TRUE(events.listenService(koid, host).ok());
  ASSERT_EQ(host.types.size(), 1u);
  EXPECT_EQ(host.types[0], EventType::BUSHEL_OPENED);
  EXPECT_TRUE(host.ringsValid) << "the kept event still carries its rings";
  // Later events go straight to the listener, a close too.
  ASSERT_TRUE(p.client->sync().deleteCap(*bushel).ok());
  p.settle();
  ASSERT_EQ(host.types.size(), 2u);
  EXPECT_EQ(host.types[1], EventType::BUSHEL_CLOSED);
  EXPECT_EQ(events.unroutedEvents(), 0u);
  events.detach(host);
}

TEST(KernelEvents, ASecondListenerForOneServiceIsRefusedAndTheFirstKeepsIt) {
  Watchdog dog("one listener", seconds(30));
  Pair p;
  KernelEvents events(*p.server);
  Recorder first, second;
  events.attach(first);
  events.attach(second);
  ASSERT_TRUE(events.listenService(42, first).ok());
  EXPECT_EQ(events.listenService(42, second).code(), Errc::ALREADY_EXISTS);
  EXPECT_TRUE(events.listenService(42, first).ok()) << "listening again is a no-op";
  EXPECT_EQ(events.listenIntroductions(&first).code(), Errc::OK);
  EXPECT_EQ(events.listenIntroductions(&second).code(), Errc::INVALID_ARGUMENT);
  events.detach(first);  // drops its keys: the service is free now
  EXPECT_TRUE(events.listenService(42, second).ok());
  EXPECT_TRUE(events.listenIntroductions(&second).ok());
  events.detach(second);
}

TEST(KernelEvents, ACloseThatOvertakesTheClaimIsReportedByClaimBushel) {
  Watchdog dog("early close", seconds(30));
  Pair p;
  KernelEvents events(*p.client);
  auto service = p.server->sync().registerService(p.server->registry(), "svc", p.server->bank());
  ASSERT_TRUE(service.ok());
  auto bushel = p.client->sync().openBushel(p.client->registry(), "svc", p.client->bank());
  ASSERT_TRUE(bushel.ok());
  const caps::Koid koid = p.client->sync().inspectCap(*bushel)->koid;
  // The service goes before anyone claimed the bushel: SERVICE_GONE and BUSHEL_CLOSED arrive
  // for a koid nobody knows yet.
  ASSERT_TRUE(p.server->sync().destroy(*service).ok());
  p.settle();
  Recorder session;
  events.attach(session);
  EXPECT_EQ(events.claimBushel(koid, session).code(), Errc::DISCONNECTED);
  EXPECT_TRUE(session.types.empty());
  // A live bushel is claimed, and its close reaches the claimer.
  auto service2 = p.server->sync().registerService(p.server->registry(), "svc2", p.server->bank());
  auto bushel2 = p.client->sync().openBushel(p.client->registry(), "svc2", p.client->bank());
  ASSERT_TRUE(service2.ok() && bushel2.ok());
  const caps::Koid koid2 = p.client->sync().inspectCap(*bushel2)->koid;
  ASSERT_TRUE(events.claimBushel(koid2, session).ok());
  Recorder other;
  events.attach(other);
  EXPECT_EQ(events.claimBushel(koid2, other).code(), Errc::ALREADY_EXISTS);
  ASSERT_TRUE(p.server->sync().destroy(*service2).ok());
  p.settle();
  ASSERT_EQ(session.types.size(), 2u);
  EXPECT_EQ(session.types[0], EventType::SERVICE_GONE);
  EXPECT_EQ(session.types[1], EventType::BUSHEL_CLOSED);
  EXPECT_TRUE(other.types.empty());
  events.detach(session);
  events.detach(other);
}

TEST(KernelEvents, TheKernelsDeathReachesEveryListenerOnceAndLaterOnesAtOnce) {
  Watchdog dog("kernel death", seconds(30));
  Pair p;
  KernelEvents events(*p.client);
  Recorder a, b;
  events.attach(a);
  events.attach(b);
  EXPECT_EQ(p.kernel.stop(), 0);
  for (int i = 0; i < 100 && a.gone == 0; ++i) p.settle();
  EXPECT_EQ(a.gone, 1);
  EXPECT_EQ(b.gone, 1);
  EXPECT_EQ(events.gone().code, Errc::DISCONNECTED);
  Recorder late;
  events.attach(late);
  EXPECT_EQ(late.gone, 1);
  EXPECT_EQ(events.claimBushel(7, late).code(), Errc::DISCONNECTED);
  events.detach(a);
  events.detach(b);
  events.detach(late);
}

}  // namespace
}  // namespace agate::client
