// Three-party introductions (Kernel::tryIntroduce, tryOpenBushelVia, tryBushelServer): a client
// of a service lets a third process reach it through a connect-only cap the kernel mints; every
// refusal changes nothing and queues no event.
#include <gtest/gtest.h>

#include "kernel_test_util.h"

namespace agate::kernel::test {
namespace {

// A serves "bank"; C has a bushel to it; B is the third party.
struct Three {
  Kernel k;
  Proc a, b, c;
  Handle service, bushel;
  Koid serviceKoid = 0;
  Three() {
    a = attach(k, 1000);
    b = attach(k, 1000);
    c = attach(k, 1000);
    Handle regA = handleOf(k.tryGrantRegistry(a.pid, Rights::READ | Rights::WRITE));
    Handle regC = handleOf(k.tryGrantRegistry(c.pid, Rights::READ));
    service = handleOf(k.tryRegisterService(a.pid, regA, "bank", a.bank));
    serviceKoid = k.tryInspectCap(a.pid, service)->koid;
    bushel = handleOf(k.tryOpenBushel(c.pid, regC, "bank", c.bank));
    (void)k.takeEvents(a.pid);
  }
};

TEST(IntroductionTest, TheRecipientGetsAConnectOnlyCapAndAnEventNamingTheServer) {
  Three t;
  const uint64_t usedB = usedOf(t.k, t.b.pid, t.b.bank);
  Result<Handle> h = t.k.tryIntroduce(t.c.pid, t.bushel, t.b.pid);
  ASSERT_TRUE(h.ok()) << errcName(h.code());
  auto info = t.k.tryInspectCap(t.b.pid, *h);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->type, ObjectType::SERVICE);
  EXPECT_EQ(info->koid, t.serviceKoid);
  EXPECT_EQ(info->rights, Rights::READ) << "connect only: no GRANT, WRITE or DESTROY";
  EXPECT_EQ(usedOf(t.k, t.b.pid, t.b.bank), usedB) << "a slot in B's first chunk";
  auto events = t.k.takeEvents(t.b.pid);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, KernelEventType::INTRODUCED);
  EXPECT_EQ(events[0].service, t.serviceKoid);
  EXPECT_EQ(events[0].peer, t.a.pid);
  EXPECT_EQ(events[0].cap, h->raw);
  EXPECT_EQ(events[0].object, 0u);
  EXPECT_TRUE(t.k.takeEvents(t.c.pid).empty());
  t.k.verifyInvariants();
}

TEST(IntroductionTest, IntroducingTwiceGivesTheSameCapAndNoSecondEvent) {
  Three t;
  Handle first = handleOf(t.k.tryIntroduce(t.c.pid, t.bushel, t.b.pid));
  (void)t.k.takeEvents(t.b.pid);
  const auto before = t.k.snapshot();
  Handle second = handleOf(t.k.tryIntroduce(t.c.pid, t.bushel, t.b.pid));
  EXPECT_EQ(first.raw, second.raw);
  EXPECT_TRUE(t.k.takeEvents(t.b.pid).empty());
  EXPECT_TRUE(before == t.k.snapshot()) << "an introducer cannot flood the recipient's CSpace";
}

TEST(IntroductionTest, TheIntroducedCapOpensABushelPaidByTheRecipient) {
  Three t;
  Handle intro = handleOf(t.k.tryIntroduce(t.c.pid, t.bushel, t.b.pid));
  (void)t.k.takeEvents(t.b.pid);
  const uint64_t usedB = usedOf(t.k, t.b.pid, t.b.bank);
  const uint64_t usedC = usedOf(t.k, t.c.pid, t.c.bank);
  Handle bushel = handleOf(t.k.tryOpenBushelVia(t.b.pid, intro, t.b.bank));
  EXPECT_GT(usedOf(t.k, t.b.pid, t.b.bank), usedB + 2) << "B pays the record and both rings";
  EXPECT_EQ(usedOf(t.k, t.c.pid, t.c.bank), usedC) << "the introducer pays nothing";
  auto events = t.k.takeEvents(t.a.pid);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, KernelEventType::BUSHEL_OPENED);
  EXPECT_EQ(events[0].peer, t.b.pid) << "the server learns the recipient's id from the kernel";
  EXPECT_EQ(t.k.tryBushelServer(t.b.pid, bushel).value(), t.a.pid);
  EXPECT_EQ(t.k.tryBushelServer(t.c.pid, t.bushel).value(), t.a.pid);
  ASSERT_TRUE(t.k.tryDeleteCap(t.b.pid, bushel).ok());
  EXPECT_EQ(usedOf(t.k, t.b.pid, t.b.bank), usedB) << "closing it refunds B";
  t.k.verifyInvariants();
}

TEST(IntroductionTest, TheIntroducedCapCannotBePassedOnOrUsedBeyondConnecting) {
  Three t;
  Handle intro = handleOf(t.k.tryIntroduce(t.c.pid, t.bushel, t.b.pid));
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryTransferCap(t.b.pid, intro, t.c.pid, TransferMode::COPY),
                           Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryDestroyObject(t.b.pid, intro), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryGrowBushelState(t.b.pid, intro, 1, 1),
                           Errc::PERMISSION_DENIED);
  // Nor can B's bushel caps reach C's rings: B holds none of C's.
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryBushelFds(t.b.pid, t.bushel), Errc::INVALID_HANDLE);
}

TEST(IntroductionTest, TheServerRevokesEveryIntroductionThroughItsServiceCap) {
  Three t;
  Handle intro = handleOf(t.k.tryIntroduce(t.c.pid, t.bushel, t.b.pid));
  auto revoked = t.k.tryRevokeCap(t.a.pid, t.service);
  ASSERT_TRUE(revoked.ok());
  EXPECT_EQ(*revoked, 1u);
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryOpenBushelVia(t.b.pid, intro, t.b.bank),
                           Errc::INVALID_HANDLE);
  t.k.verifyInvariants();
}

TEST(IntroductionTest, TheServicesEndDeletesItsIntroductions) {
  Three t;
  Handle intro = handleOf(t.k.tryIntroduce(t.c.pid, t.bushel, t.b.pid));
  ASSERT_TRUE(t.k.tryDestroyObject(t.a.pid, t.service).ok());
  EXPECT_EQ(t.k.tryInspectCap(t.b.pid, intro).code(), Errc::INVALID_HANDLE);
  t.k.verifyInvariants();
}

TEST(IntroductionTest, RefusalsChangeNothingAndQueueNoEvent) {
  Three t;
  // Not a bushel; a bushel cap without GRANT; a stale handle.
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryIntroduce(t.c.pid, t.c.bank, t.b.pid), Errc::WRONG_TYPE);
  Handle noGrant = handleOf(t.k.tryCopyCap(t.c.pid, t.bushel, Rights::READ));
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryIntroduce(t.c.pid, noGrant, t.b.pid),
                           Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryIntroduce(t.c.pid, Handle{0x1234567800000009}, t.b.pid),
                           Errc::INVALID_HANDLE);
  // No such recipient; the server itself.
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryIntroduce(t.c.pid, t.bushel, t.c.pid + 100),
                           Errc::NOT_FOUND);
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryIntroduce(t.c.pid, t.bushel, t.a.pid),
                           Errc::INVALID_ARGUMENT);
  // A dead recipient.
  Proc dead = attach(t.k, 100);
  ASSERT_TRUE(t.k.tryKillProcess(dead.pid).ok());
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryIntroduce(t.c.pid, t.bushel, dead.pid), Errc::NOT_FOUND);
  EXPECT_TRUE(t.k.takeEvents(t.b.pid).empty());
  EXPECT_TRUE(t.k.takeEvents(t.a.pid).empty());
}

TEST(IntroductionTest, OpeningViaAServiceCapChecksTypeRightsAndBank) {
  Three t;
  Handle intro = handleOf(t.k.tryIntroduce(t.c.pid, t.bushel, t.b.pid));
  (void)t.k.takeEvents(t.b.pid);
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryOpenBushelVia(t.b.pid, t.b.bank, t.b.bank),
                           Errc::WRONG_TYPE);
  Handle readOnlyBank = handleOf(t.k.tryCopyCap(t.b.pid, t.b.bank, Rights::READ));
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryOpenBushelVia(t.b.pid, intro, readOnlyBank),
                           Errc::PERMISSION_DENIED);
  Handle tiny = handleOf(t.k.tryCreateBank(t.b.pid, t.b.bank, 1));
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryOpenBushelVia(t.b.pid, intro, tiny), Errc::QUOTA_EXCEEDED);
  Handle none = handleOf(t.k.tryCopyCap(t.a.pid, t.service, Rights::NONE));
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryOpenBushelVia(t.a.pid, none, t.a.bank),
                           Errc::PERMISSION_DENIED);
  EXPECT_TRUE(t.k.takeEvents(t.a.pid).empty()) << "no BUSHEL_OPENED for a refused open";
}

TEST(IntroductionTest, AGoneServiceCannotBeIntroduced) {
  Three t;
  // The bushel dies with its service, so the introducer's cap is stale by the next call.
  ASSERT_TRUE(t.k.tryKillProcess(t.a.pid).ok());
  EXPECT_REFUSED_UNCHANGED(t.k, t.k.tryIntroduce(t.c.pid, t.bushel, t.b.pid), Errc::INVALID_HANDLE);
  EXPECT_TRUE(t.k.takeEvents(t.b.pid).empty());
}

TEST(IntroductionTest, TheRecipientsDeathLeavesNothingBehind) {
  Three t;
  const auto baseline = t.k.snapshot();
  Proc d = attach(t.k, 1000);
  Handle intro = handleOf(t.k.tryIntroduce(t.c.pid, t.bushel, d.pid));
  (void)handleOf(t.k.tryOpenBushelVia(d.pid, intro, d.bank));
  ASSERT_TRUE(t.k.tryKillProcess(d.pid).ok());
  (void)t.k.takeEvents(t.a.pid);
  EXPECT_TRUE(baseline == t.k.snapshot());
  t.k.verifyInvariants();
}

}  // namespace
}  // namespace agate::kernel::test
