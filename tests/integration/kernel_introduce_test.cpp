// agate-kernel's introduce and openBushelVia calls (and bushelFds naming the server) through the
// real socket and rings: three connections of one process stand for server A, client C and the
// third party B (the kernel treats each attach as its own process). Every refusal (wrong type,
// missing right, stale handle, dead or absent target) leaves the observable state unchanged
// and sends no event.
#include <chrono>
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

struct Three {
  KernelProcess kernel;
  EventLoop loop;
  std::unique_ptr<KernelConnection> a, b, c;
  Cap<Service> service;
  Cap<Bushel> bushel;
  Three() {
    a = std::move(KernelConnection::tryAttach(loop, kernel.home(), "a")).value();
    b = std::move(KernelConnection::tryAttach(loop, kernel.home(), "b")).value();
    c = std::move(KernelConnection::tryAttach(loop, kernel.home(), "c")).value();
    service = get(a->sync().registerService(a->registry(), "bank", a->bank()));
    bushel = get(c->sync().openBushel(c->registry(), "bank", c->bank()));
    EXPECT_EQ(get(a->sync().nextEvent()).type, EventType::BUSHEL_OPENED);
  }
  Observed observe() { return agate::testing::observe(*a, {a.get(), b.get(), c.get()}); }
  // True when `k` has no event within a short wait.
  bool quiet(KernelConnection& k) { return agate::testing::quiet(loop, k); }
};

TEST(KernelIntroduce, TheRecipientGetsAConnectOnlyCapAndAnEventAndOpensThroughIt) {
  Watchdog dog("introduce", seconds(30));
  Three t;
  BushelRings rings = get(t.c->sync().bushelRings(t.bushel));
  EXPECT_EQ(rings.server, t.a->pid()) << "bushelFds names the bushel's server";

  Cap<Service> intro = get(t.c->sync().introduce(t.bushel, t.b->pid()));
  KernelEvent event = get(t.b->sync().nextEvent());
  EXPECT_EQ(event.type, EventType::INTRODUCED);
  EXPECT_EQ(event.peer, t.a->pid());
  EXPECT_EQ(event.cap, intro.handle);
  CapInfo info = get(t.b->sync().inspectCap(Cap<Service>{event.cap}));
  EXPECT_EQ(info.type, ObjectType::SERVICE);
  EXPECT_EQ(info.koid, event.service);
  EXPECT_EQ(info.rights, Rights::READ);

  // Again: the same cap, no second event.
  EXPECT_EQ(get(t.c->sync().introduce(t.bushel, t.b->pid())).handle, intro.handle);
  EXPECT_TRUE(t.quiet(*t.b));

  Cap<Bushel> via = get(t.b->sync().openBushelVia(intro, t.b->bank()));
  KernelEvent opened = get(t.a->sync().nextEvent());
  EXPECT_EQ(opened.type, EventType::BUSHEL_OPENED);
  EXPECT_EQ(opened.peer, t.b->pid());
  EXPECT_EQ(get(t.b->sync().bushelRings(via)).server, t.a->pid());
  // The cap cannot be passed on.
  EXPECT_EQ(t.b->sync().transferCap(intro, t.c->pid(), TransferMode::COPY).code(),
            Errc::PERMISSION_DENIED);
}

TEST(KernelIntroduce, RefusalsLeaveEverythingUnchangedAndSendNoEvent) {
  Watchdog dog("introduce refusals", seconds(30));
  Three t;
  const Observed before = t.observe();
  auto s = t.c->sync();
  EXPECT_EQ(s.introduce(Cap<Bushel>{t.c->bank().handle}, t.b->pid()).code(), Errc::WRONG_TYPE);
  Cap<Bushel> noGrant = get(s.copyCap(t.bushel, Rights::READ));
  const Observed withCopy = t.observe();
  EXPECT_EQ(s.introduce(noGrant, t.b->pid()).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.introduce(t.bushel, t.b->pid() + 1000).code(), Errc::NOT_FOUND);
  EXPECT_EQ(s.introduce(t.bushel, t.a->pid()).code(), Errc::INVALID_ARGUMENT);
  EXPECT_TRUE(t.observe() == withCopy);
  ASSERT_TRUE(s.deleteCap(noGrant).ok());
  EXPECT_EQ(s.introduce(noGrant, t.b->pid()).code(), Errc::INVALID_HANDLE) << "stale";
  EXPECT_TRUE(t.observe() == before);

  auto sb = t.b->sync();
  EXPECT_EQ(sb.openBushelVia(Cap<Service>{t.b->bank().handle}, t.b->bank()).code(),
            Errc::WRONG_TYPE);
  Cap<Service> intro = get(s.introduce(t.bushel, t.b->pid()));
  EXPECT_EQ(get(sb.nextEvent()).type, EventType::INTRODUCED);
  const Observed introduced = t.observe();
  Cap<SpaceBank> readOnly = get(sb.copyCap(t.b->bank(), Rights::READ));
  EXPECT_EQ(sb.openBushelVia(intro, readOnly).code(), Errc::PERMISSION_DENIED);
  ASSERT_TRUE(sb.deleteCap(readOnly).ok());
  EXPECT_TRUE(t.observe() == introduced);
  EXPECT_TRUE(t.quiet(*t.a)) << "no BUSHEL_OPENED for a refused open";
  EXPECT_TRUE(t.quiet(*t.b));
}

TEST(KernelIntroduce, TheServersDeathTakesTheIntroductionAndTheDeadAreNoRecipients) {
  Watchdog dog("introduce deaths", seconds(30));
  Three t;
  Cap<Service> intro = get(t.c->sync().introduce(t.bushel, t.b->pid()));
  EXPECT_EQ(get(t.b->sync().nextEvent()).type, EventType::INTRODUCED);
  const ProcessId aPid = t.a->pid();
  t.a.reset();  // A detaches: the kernel kills it, its service goes, and every cap to it
  KernelEvent gone = get(t.c->sync().nextEvent());
  EXPECT_EQ(gone.type, EventType::SERVICE_GONE);
  EXPECT_EQ(gone.peer, aPid);
  EXPECT_EQ(t.b->sync().openBushelVia(intro, t.b->bank()).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(t.b->sync().inspectCap(intro).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(t.c->sync().introduce(t.bushel, t.b->pid()).code(), Errc::INVALID_HANDLE)
      << "the bushel died with its service";
}

}  // namespace
}  // namespace agate::caps
