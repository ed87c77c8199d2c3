// The receive limit: caps other processes push into a CSpace (transfers by copy or move,
// introductions, passed registry caps) take slots its own bank pays for, so each CSpace bounds
// how many it holds at once. A push past the bound is refused to the pusher with QUOTA_EXCEEDED
// and changes nothing (the recipient's bank included); deleting or moving on a pushed cap makes
// room again (and deleting them all gives the pages back); the process's own caps never count;
// the process sets its own bound.
#include <gtest/gtest.h>

#include <vector>

#include "kernel_test_util.h"

namespace agate::kernel::test {
namespace {

constexpr uint32_t LIMIT = 8;

struct Pair {
  Kernel k{Kernel::Options{.receiveLimit = LIMIT}};
  Proc pusher = attach(k, 1000);
  Proc victim = attach(k, 1000);
  Handle region = handleOf(k.tryCreateRegion(pusher.pid, pusher.bank, 1));

  uint32_t received(ProcessId pid) const { return k.findProcess(pid)->cspace().receivedCaps(); }
  Result<Handle> push(TransferMode mode = TransferMode::COPY) {
    return k.tryTransferCap(pusher.pid, region, victim.pid, mode);
  }
  // Fills the victim's allowance with copies of the region.
  void fill() {
    for (uint32_t i = received(victim.pid); i < LIMIT; ++i) (void)handleOf(push());
    ASSERT_EQ(received(victim.pid), LIMIT);
  }
};

TEST(ReceiveLimit, ANewProcessStartsWithTheKernelsDefault) {
  Kernel k;
  Proc p = attach(k);
  EXPECT_EQ(k.findProcess(p.pid)->cspace().receiveLimit(), Kernel::DEFAULT_RECEIVE_LIMIT);
  EXPECT_EQ(k.findProcess(p.pid)->cspace().receivedCaps(), 0u);
  Kernel tight(Kernel::Options{.receiveLimit = 3});
  Proc q = attach(tight);
  EXPECT_EQ(tight.findProcess(q.pid)->cspace().receiveLimit(), 3u);
}

TEST(ReceiveLimit, CopiesPastTheLimitAreRefusedAndTheVictimsBankPaysNothingMore) {
  Pair w;
  w.fill();
  const uint64_t victimUsed = usedOf(w.k, w.victim.pid, w.victim.bank);
  EXPECT_REFUSED_UNCHANGED(w.k, w.push(), Errc::QUOTA_EXCEEDED);
  EXPECT_REFUSED_UNCHANGED(w.k, w.push(TransferMode::MOVE), Errc::QUOTA_EXCEEDED);
  EXPECT_EQ(usedOf(w.k, w.victim.pid, w.victim.bank), victimUsed);
  // The pusher's own table is not bounded by the victim's limit.
  EXPECT_TRUE(w.k.tryTransferCap(w.pusher.pid, w.region, w.pusher.pid, TransferMode::COPY).ok());
  EXPECT_TRUE(w.k.tryCopyCap(w.pusher.pid, w.region, Rights::READ).ok());
}

TEST(ReceiveLimit, AFloodCostsTheVictimAtMostTheChunksItsLimitSpans) {
  // With the default limit, however many caps a pusher sends, the victim's bank pays at most
  // ceil(limit / SLOTS_PER_CHUNK) pages beyond its own caps.
  Kernel k;
  Proc pusher = attach(k, 1000), victim = attach(k, 1000);
  Handle region = handleOf(k.tryCreateRegion(pusher.pid, pusher.bank, 1));
  const uint64_t before = usedOf(k, victim.pid, victim.bank);
  uint32_t accepted = 0;
  for (uint32_t i = 0; i < 3 * Kernel::DEFAULT_RECEIVE_LIMIT; ++i)
    if (k.tryTransferCap(pusher.pid, region, victim.pid, TransferMode::COPY).ok()) ++accepted;
  EXPECT_EQ(accepted, Kernel::DEFAULT_RECEIVE_LIMIT);
  EXPECT_LE(
      usedOf(k, victim.pid, victim.bank) - before,
      (Kernel::DEFAULT_RECEIVE_LIMIT + CSpace::SLOTS_PER_CHUNK - 1) / CSpace::SLOTS_PER_CHUNK);
  k.verifyInvariants();
  // The victim deletes what it did not want and has its pages back.
  std::vector<Handle> pushed;
  k.findProcess(victim.pid)->cspace().forEachCap([&](const Slot& s) {
    if (s.received) pushed.push_back(s.handle());
  });
  ASSERT_EQ(pushed.size(), Kernel::DEFAULT_RECEIVE_LIMIT);
  for (Handle h : pushed) ASSERT_TRUE(k.tryDeleteCap(victim.pid, h).ok());
  EXPECT_EQ(usedOf(k, victim.pid, victim.bank), before);
  k.verifyInvariants();
}

TEST(ReceiveLimit, MovesIntroductionsAndRegistryGrantsCountToo) {
  Pair w;
  // Moves: each a fresh copy the pusher owns, moved over.
  for (uint32_t i = 0; i < 3; ++i) {
    Handle copy = handleOf(w.k.tryCopyCap(w.pusher.pid, w.region, Rights::ALL));
    (void)handleOf(w.k.tryTransferCap(w.pusher.pid, copy, w.victim.pid, TransferMode::MOVE));
  }
  EXPECT_EQ(w.received(w.victim.pid), 3u);
  // A registry cap passed on.
  Handle registry =
      handleOf(w.k.tryGrantRegistry(w.pusher.pid, Rights::READ | Rights::WRITE | Rights::GRANT));
  (void)handleOf(w.k.tryPassRegistry(w.pusher.pid, registry, w.victim.pid, Rights::READ));
  EXPECT_EQ(w.received(w.victim.pid), 4u);
  // An introduction: the pusher is a client of a third process's service.
  Proc server = attach(w.k, 1000);
  Handle serverRegistry = handleOf(w.k.tryGrantRegistry(server.pid, Rights::WRITE));
  (void)handleOf(w.k.tryRegisterService(server.pid, serverRegistry, "svc", server.bank));
  Handle bushel = handleOf(w.k.tryOpenBushel(w.pusher.pid, registry, "svc", w.pusher.bank));
  (void)handleOf(w.k.tryIntroduce(w.pusher.pid, bushel, w.victim.pid));
  EXPECT_EQ(w.received(w.victim.pid), 5u);
  w.fill();
  (void)w.k.takeEvents(w.victim.pid);
  (void)w.k.takeEvents(server.pid);
  EXPECT_REFUSED_UNCHANGED(w.k,
                           w.k.tryPassRegistry(w.pusher.pid, registry, w.victim.pid, Rights::READ),
                           Errc::QUOTA_EXCEEDED);
  // A second service, so the introduction is a new cap (the first one would come back as is).
  (void)handleOf(w.k.tryRegisterService(server.pid, serverRegistry, "svc2", server.bank));
  Handle bushel2 = handleOf(w.k.tryOpenBushel(w.pusher.pid, registry, "svc2", w.pusher.bank));
  (void)w.k.takeEvents(server.pid);
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.tryIntroduce(w.pusher.pid, bushel2, w.victim.pid),
                           Errc::QUOTA_EXCEEDED);
  // The existing introduction still comes back: it takes no new slot.
  EXPECT_TRUE(w.k.tryIntroduce(w.pusher.pid, bushel, w.victim.pid).ok());
  w.k.verifyInvariants();
}

TEST(ReceiveLimit, DeletingOrMovingOnAPushedCapMakesRoomAndReusesItsSlot) {
  Pair w;
  Handle first = handleOf(w.push());
  w.fill();
  const uint32_t capacity = w.k.findProcess(w.victim.pid)->cspace().capacity();
  const uint64_t victimUsed = usedOf(w.k, w.victim.pid, w.victim.bank);
  ASSERT_TRUE(w.k.tryDeleteCap(w.victim.pid, first).ok());
  EXPECT_EQ(w.received(w.victim.pid), LIMIT - 1);
  Handle again = handleOf(w.push());
  EXPECT_EQ(again.index(), first.index()) << "the freed slot is reused";
  EXPECT_NE(again, first) << "under a new generation";
  EXPECT_EQ(w.k.findProcess(w.victim.pid)->cspace().capacity(), capacity);
  EXPECT_EQ(usedOf(w.k, w.victim.pid, w.victim.bank), victimUsed);
  // Moving a pushed cap to a third process: it counts there, not here.
  Proc third = attach(w.k, 1000);
  ASSERT_TRUE(w.k.tryTransferCap(w.victim.pid, again, third.pid, TransferMode::MOVE).ok());
  EXPECT_EQ(w.received(w.victim.pid), LIMIT - 1);
  EXPECT_EQ(w.received(third.pid), 1u);
  // The pusher's revoke deletes what it pushed (its copies derive from its cap).
  auto revoked = w.k.tryRevokeCap(w.pusher.pid, w.region);
  ASSERT_TRUE(revoked.ok());
  EXPECT_EQ(w.received(w.victim.pid), 0u);
  EXPECT_EQ(w.received(third.pid), 0u);
  w.k.verifyInvariants();
}

TEST(ReceiveLimit, TheRecipientsOwnCopiesAndMovesWithinItsTableAreItsOwn) {
  Pair w;
  Handle pushed = handleOf(w.push());
  EXPECT_EQ(w.received(w.victim.pid), 1u);
  // A copy the victim makes itself does not count...
  Handle mine = handleOf(w.k.tryCopyCap(w.victim.pid, pushed, Rights::READ | Rights::GRANT));
  EXPECT_EQ(w.received(w.victim.pid), 1u);
  // ... nor does a cap it transfers to itself; moving the pushed one within its table keeps it
  // counted.
  (void)handleOf(w.k.tryTransferCap(w.victim.pid, mine, w.victim.pid, TransferMode::COPY));
  EXPECT_EQ(w.received(w.victim.pid), 1u);
  Handle moved =
      handleOf(w.k.tryTransferCap(w.victim.pid, pushed, w.victim.pid, TransferMode::MOVE));
  EXPECT_EQ(w.received(w.victim.pid), 1u);
  ASSERT_TRUE(w.k.tryDeleteCap(w.victim.pid, moved).ok());
  EXPECT_EQ(w.received(w.victim.pid), 0u);
  // The victim's own objects never count, however many.
  for (int i = 0; i < 3 * static_cast<int>(LIMIT); ++i)
    (void)handleOf(w.k.tryCopyCap(w.victim.pid, w.victim.bank, Rights::READ));
  EXPECT_EQ(w.received(w.victim.pid), 0u);
  w.k.verifyInvariants();
}

TEST(ReceiveLimit, AProcessSetsItsOwnLimitAndZeroRefusesEveryPush) {
  Pair w;
  (void)handleOf(w.push());
  (void)handleOf(w.push());
  auto held = w.k.trySetReceiveLimit(w.victim.pid, 0);
  ASSERT_TRUE(held.ok());
  EXPECT_EQ(*held, 2u) << "the answer is what it holds now";
  EXPECT_EQ(w.received(w.victim.pid), 2u) << "a lower limit deletes nothing";
  EXPECT_REFUSED_UNCHANGED(w.k, w.push(), Errc::QUOTA_EXCEEDED);
  ASSERT_TRUE(w.k.trySetReceiveLimit(w.victim.pid, 3).ok());
  EXPECT_TRUE(w.push().ok());
  EXPECT_REFUSED_UNCHANGED(w.k, w.push(), Errc::QUOTA_EXCEEDED);
  ASSERT_TRUE(w.k.trySetReceiveLimit(w.victim.pid, CSpace::MAX_SLOTS).ok());
  EXPECT_TRUE(w.push().ok());
  // Refusals: a limit beyond any CSpace, a process that is not attached.
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.trySetReceiveLimit(w.victim.pid, CSpace::MAX_SLOTS + 1),
                           Errc::INVALID_ARGUMENT);
  EXPECT_EQ(w.k.findProcess(w.victim.pid)->cspace().receiveLimit(), CSpace::MAX_SLOTS);
  EXPECT_REFUSED_UNCHANGED(w.k, w.k.trySetReceiveLimit(w.victim.pid + 100, 5), Errc::NOT_FOUND);
  w.k.verifyInvariants();
}

TEST(ReceiveLimit, PassingTheRegistryChecksTheCallersCapFirst) {
  Pair w;
  Handle readOnly = handleOf(w.k.tryGrantRegistry(w.pusher.pid, Rights::READ));
  Handle withGrant = handleOf(w.k.tryGrantRegistry(w.pusher.pid, Rights::READ | Rights::GRANT));
  EXPECT_REFUSED_UNCHANGED(
      w.k, w.k.tryPassRegistry(w.pusher.pid, Handle{12345}, w.victim.pid, Rights::READ),
      Errc::INVALID_HANDLE);
  EXPECT_REFUSED_UNCHANGED(w.k,
                           w.k.tryPassRegistry(w.pusher.pid, w.region, w.victim.pid, Rights::READ),
                           Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(w.k,
                           w.k.tryPassRegistry(w.pusher.pid, readOnly, w.victim.pid, Rights::READ),
                           Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(
      w.k, w.k.tryPassRegistry(w.pusher.pid, withGrant, w.victim.pid, Rights::WRITE),
      Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(
      w.k,
      w.k.tryPassRegistry(w.pusher.pid, withGrant, w.victim.pid, static_cast<Rights>(1u << 30)),
      Errc::INVALID_ARGUMENT);
  EXPECT_REFUSED_UNCHANGED(
      w.k, w.k.tryPassRegistry(w.pusher.pid, withGrant, w.victim.pid + 100, Rights::READ),
      Errc::NOT_FOUND);
  // To itself: allowed, and not a push.
  (void)handleOf(w.k.tryPassRegistry(w.pusher.pid, withGrant, w.pusher.pid, Rights::READ));
  EXPECT_EQ(w.received(w.pusher.pid), 0u);
  Handle passed =
      handleOf(w.k.tryPassRegistry(w.pusher.pid, withGrant, w.victim.pid, Rights::READ));
  auto info = w.k.tryInspectCap(w.victim.pid, passed);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->type, ObjectType::REGISTRY);
  EXPECT_EQ(info->rights, Rights::READ);
  EXPECT_EQ(w.received(w.victim.pid), 1u);
}

TEST(ReceiveLimit, ThePushersDeathLeavesWhatItPushedCountedUntilTheRecipientDeletesIt) {
  Pair w;
  Handle given = handleOf(w.k.tryCreateBank(w.victim.pid, w.victim.bank, 10));
  // The victim's own bank object, pushed back and forth, is still a push when it comes back.
  Handle inPusher =
      handleOf(w.k.tryTransferCap(w.victim.pid, given, w.pusher.pid, TransferMode::COPY));
  Handle back =
      handleOf(w.k.tryTransferCap(w.pusher.pid, inPusher, w.victim.pid, TransferMode::COPY));
  EXPECT_EQ(w.received(w.victim.pid), 1u);
  ASSERT_TRUE(w.k.tryKillProcess(w.pusher.pid).ok());
  EXPECT_EQ(w.received(w.victim.pid), 1u);
  ASSERT_TRUE(w.k.tryDeleteCap(w.victim.pid, back).ok());
  EXPECT_EQ(w.received(w.victim.pid), 0u);
  w.k.verifyInvariants();
}

}  // namespace
}  // namespace agate::kernel::test
