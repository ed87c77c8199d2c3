#include "agate/kernel/cspace.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "agate/kernel/kernel.h"
#include "kernel_test_util.h"

namespace agate::kernel {
namespace {

using test::attach;
using test::handleOf;
using test::Proc;
using test::usedOf;

TEST(CSpace, LookupReturnsTheCapWithItsRightsAndBadge) {
  Kernel k;
  Proc p = attach(k);
  const CSpace& cs = k.findProcess(p.pid)->cspace();
  auto cap = cs.lookup(p.bank, Rights::ALLOCATE, ObjectType::BANK);
  ASSERT_TRUE(cap.ok());
  EXPECT_EQ(cap->object, &k.findProcess(p.pid)->bank());
  EXPECT_EQ(cap->rights, Kernel::PROCESS_BANK);
  EXPECT_EQ(cap->badge, 0u);
  EXPECT_EQ(cap->as<SpaceBank>().limit(), 1000u);
}

TEST(CSpace, LookupErrorsAreInvalidHandleThenWrongTypeThenPermissionDenied) {
  Kernel k;
  Proc p = attach(k);
  const CSpace& cs = k.findProcess(p.pid)->cspace();
  Handle outOfRange = Handle::make(cs.capacity() + 5, 1);
  EXPECT_EQ(cs.lookup(outOfRange, Rights::NONE).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(cs.lookup(Handle{}, Rights::NONE).code(), Errc::INVALID_HANDLE);
  Handle freeSlot = Handle::make(1, 1);
  EXPECT_EQ(cs.lookup(freeSlot, Rights::NONE).code(), Errc::INVALID_HANDLE);
  Handle wrongGeneration = Handle::make(p.bank.index(), p.bank.generation() + 1);
  EXPECT_EQ(cs.lookup(wrongGeneration, Rights::NONE).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(cs.lookup(p.bank, Rights::NONE, ObjectType::REGION).code(), Errc::WRONG_TYPE);
  EXPECT_EQ(cs.lookup(p.bank, Rights::DESTROY, ObjectType::BANK).code(), Errc::PERMISSION_DENIED);
  // Type is checked before rights: a caller learns the handle is wrong, not what it may do.
  EXPECT_EQ(cs.lookup(p.bank, Rights::DESTROY, ObjectType::REGION).code(), Errc::WRONG_TYPE);
}

TEST(CSpace, CopyWithFewerRightsMakesARestrictedCapDerivedFromTheSource) {
  Kernel k;
  Proc p = attach(k);
  Handle ro = handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ));
  auto info = k.tryInspectCap(p.pid, ro);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->rights, Rights::READ);
  EXPECT_EQ(info->type, ObjectType::BANK);
  EXPECT_TRUE(k.tryReadBank(p.pid, ro).ok());
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(p.pid, ro, 1), Errc::PERMISSION_DENIED);
  EXPECT_EQ(k.findProcess(p.pid)->bank().capCount(), 2u);
  k.verifyInvariants();
}

TEST(CSpace, CopyAddingARightIsRefusedAndChangesNothing) {
  Kernel k;
  Proc p = attach(k);
  Handle ro = handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ));
  EXPECT_REFUSED_UNCHANGED(k, k.tryCopyCap(p.pid, ro, Rights::READ | Rights::ALLOCATE),
                           Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCopyCap(p.pid, p.bank, Rights::DESTROY),
                           Errc::PERMISSION_DENIED);
}

TEST(CSpace, CopyWithUndefinedRightsBitsIsInvalidArgumentAndChangesNothing) {
  Kernel k;
  Proc p = attach(k);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCopyCap(p.pid, p.bank, static_cast<Rights>(1u << 31)),
                           Errc::INVALID_ARGUMENT);
}

TEST(CSpace, CopySetsABadgeOnceAndRefusesToChangeIt) {
  Kernel k;
  Proc p = attach(k);
  Handle badged = handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ, 42));
  EXPECT_EQ(k.tryInspectCap(p.pid, badged)->badge, 42u);
  Handle inherits = handleOf(k.tryCopyCap(p.pid, badged, Rights::READ));
  EXPECT_EQ(k.tryInspectCap(p.pid, inherits)->badge, 42u);
  Handle same = handleOf(k.tryCopyCap(p.pid, badged, Rights::READ, 42));
  EXPECT_EQ(k.tryInspectCap(p.pid, same)->badge, 42u);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCopyCap(p.pid, badged, Rights::READ, 7),
                           Errc::PERMISSION_DENIED);
}

TEST(CSpace, DeletedCapsHandleIsStaleEvenAfterItsSlotIsReused) {
  Kernel k;
  Proc p = attach(k);
  Handle a = handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ));
  ASSERT_TRUE(k.tryDeleteCap(p.pid, a).ok());
  EXPECT_EQ(k.tryInspectCap(p.pid, a).code(), Errc::INVALID_HANDLE);
  Handle b = handleOf(k.tryCopyCap(p.pid, p.bank, Rights::ALLOCATE));
  EXPECT_EQ(b.index(), a.index()) << "the freed slot is reused";
  EXPECT_NE(b.generation(), a.generation());
  EXPECT_EQ(k.tryInspectCap(p.pid, a).code(), Errc::INVALID_HANDLE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryDeleteCap(p.pid, a), Errc::INVALID_HANDLE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryRevokeCap(p.pid, a), Errc::INVALID_HANDLE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCopyCap(p.pid, a, Rights::NONE), Errc::INVALID_HANDLE);
  EXPECT_EQ(k.tryInspectCap(p.pid, b)->rights, Rights::ALLOCATE);
}

TEST(CSpace, DeleteHandsChildrenToTheParentSoRevokeStillReachesThem) {
  Kernel k;
  Proc p = attach(k);
  Handle mid = handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ | Rights::GRANT));
  Handle leaf = handleOf(k.tryCopyCap(p.pid, mid, Rights::READ));
  ASSERT_TRUE(k.tryDeleteCap(p.pid, mid).ok());
  EXPECT_TRUE(k.tryInspectCap(p.pid, leaf).ok()) << "deleting a cap leaves its children";
  k.verifyInvariants();
  auto revoked = k.tryRevokeCap(p.pid, p.bank);
  ASSERT_TRUE(revoked.ok());
  EXPECT_EQ(*revoked, 1u);
  EXPECT_EQ(k.tryInspectCap(p.pid, leaf).code(), Errc::INVALID_HANDLE);
  EXPECT_TRUE(k.tryInspectCap(p.pid, p.bank).ok()) << "revoke keeps the cap itself";
  k.verifyInvariants();
}

TEST(CSpace, SlotWhoseGenerationIsExhaustedIsRetiredAndItsHandlesNeverResolveAgain) {
  Kernel k(Kernel::Options{.systemPages = 1000, .maxGeneration = 3});
  Proc p = attach(k);
  std::vector<Handle> seen;
  for (int i = 0; i < 3; ++i) {
    Handle h = handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ));
    EXPECT_EQ(h.index(), 1u) << "slot 1 is reused while its generations last";
    EXPECT_EQ(h.generation(), static_cast<uint32_t>(i + 1));
    seen.push_back(h);
    ASSERT_TRUE(k.tryDeleteCap(p.pid, h).ok());
  }
  EXPECT_EQ(k.findProcess(p.pid)->cspace().retiredSlots(), 1u);
  Handle next = handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ));
  EXPECT_EQ(next.index(), 2u) << "a retired slot is never handed out again";
  for (Handle h : seen) EXPECT_EQ(k.tryInspectCap(p.pid, h).code(), Errc::INVALID_HANDLE);
  k.verifyInvariants();
}

TEST(CSpace, RandomForgedHandlesNeverResolve) {
  Kernel k;
  Proc p = attach(k);
  std::vector<Handle> live{p.bank};
  for (int i = 0; i < 100; ++i) live.push_back(handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ)));
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(k.tryDeleteCap(p.pid, live[live.size() - 1 - i]).ok());
  live.resize(live.size() - 50);
  const CSpace& cs = k.findProcess(p.pid)->cspace();
  std::mt19937_64 rng(0x5eed);
  int resolved = 0;
  for (int i = 0; i < 100000; ++i) {
    uint64_t raw = rng();
    // Half of them aim at slots in range, where only the generation can tell them apart.
    if (i % 2) raw = (raw & ~uint64_t{0xffffffff}) | (raw % cs.capacity());
    Handle h{raw};
    bool isLive = false;
    for (Handle l : live) isLive |= (l == h);
    if (isLive) continue;  // a 1 in 2^32 hit of a real handle is not a forgery
    if (cs.lookup(h, Rights::NONE).ok()) ++resolved;
  }
  EXPECT_EQ(resolved, 0);
}

TEST(CSpace, RevokeDeletesEveryDerivedCapAcrossThreeCSpacesTransitively) {
  Kernel k;
  Proc a = attach(k), b = attach(k), c = attach(k);
  Handle region = handleOf(k.tryCreateRegion(a.pid, a.bank, 1));
  Handle mine = handleOf(k.tryCopyCap(a.pid, region, Rights::READ | Rights::GRANT));
  Handle inB = handleOf(k.tryTransferCap(a.pid, mine, b.pid, TransferMode::COPY));
  Handle inB2 = handleOf(k.tryCopyCap(b.pid, inB, Rights::READ | Rights::GRANT));
  Handle inC = handleOf(k.tryTransferCap(b.pid, inB2, c.pid, TransferMode::COPY));
  Handle inC2 = handleOf(k.tryCopyCap(c.pid, inC, Rights::READ));
  Handle sibling = handleOf(k.tryCopyCap(a.pid, region, Rights::READ));
  k.verifyInvariants();

  auto revoked = k.tryRevokeCap(a.pid, mine);
  ASSERT_TRUE(revoked.ok());
  EXPECT_EQ(*revoked, 4u);
  EXPECT_EQ(k.tryInspectCap(b.pid, inB).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(k.tryInspectCap(b.pid, inB2).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(k.tryInspectCap(c.pid, inC).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(k.tryInspectCap(c.pid, inC2).code(), Errc::INVALID_HANDLE);
  EXPECT_TRUE(k.tryInspectCap(a.pid, mine).ok());
  EXPECT_TRUE(k.tryInspectCap(a.pid, sibling).ok()) << "not derived from the revoked cap";
  EXPECT_TRUE(k.tryInspectCap(a.pid, region).ok());
  k.verifyInvariants();
}

TEST(CSpace, RevokeOfADeepChainNeedsNoRecursion) {
  Kernel k;
  Proc p = attach(k, 1000);
  Handle h = p.bank;
  for (int i = 0; i < 20000; ++i) h = handleOf(k.tryCopyCap(p.pid, h, Rights::READ));
  auto revoked = k.tryRevokeCap(p.pid, p.bank);
  ASSERT_TRUE(revoked.ok());
  EXPECT_EQ(*revoked, 20000u);
  EXPECT_EQ(k.findProcess(p.pid)->cspace().heldCaps(), 1u);
  k.verifyInvariants();
}

TEST(CSpace, RevokeOfALeafDeletesNothing) {
  Kernel k;
  Proc p = attach(k);
  Handle leaf = handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ));
  const auto before = k.snapshot();
  auto revoked = k.tryRevokeCap(p.pid, leaf);
  ASSERT_TRUE(revoked.ok());
  EXPECT_EQ(*revoked, 0u);
  EXPECT_TRUE(k.snapshot() == before);
}

TEST(CSpace, TransferWithoutGrantIsRefusedAndChangesNothing) {
  Kernel k;
  Proc a = attach(k), b = attach(k);
  Handle noGrant = handleOf(k.tryCopyCap(a.pid, a.bank, Rights::READ));
  EXPECT_REFUSED_UNCHANGED(k, k.tryTransferCap(a.pid, noGrant, b.pid, TransferMode::COPY),
                           Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryTransferCap(a.pid, noGrant, b.pid, TransferMode::MOVE),
                           Errc::PERMISSION_DENIED);
}

TEST(CSpace, TransferToAnUnknownProcessOrWithAnUnknownModeChangesNothing) {
  Kernel k;
  Proc a = attach(k);
  EXPECT_REFUSED_UNCHANGED(k, k.tryTransferCap(a.pid, a.bank, 999, TransferMode::COPY),
                           Errc::NOT_FOUND);
  EXPECT_REFUSED_UNCHANGED(k, k.tryTransferCap(a.pid, a.bank, a.pid, static_cast<TransferMode>(7)),
                           Errc::INVALID_ARGUMENT);
}

TEST(CSpace, TransferByMoveKeepsTheCapsPlaceInTheDerivationTree) {
  Kernel k;
  Proc a = attach(k), b = attach(k);
  Handle granted = handleOf(k.tryCopyCap(a.pid, a.bank, Rights::READ | Rights::GRANT));
  Handle child = handleOf(k.tryCopyCap(a.pid, granted, Rights::READ));
  Handle moved = handleOf(k.tryTransferCap(a.pid, granted, b.pid, TransferMode::MOVE));
  EXPECT_EQ(k.tryInspectCap(a.pid, granted).code(), Errc::INVALID_HANDLE) << "moved away";
  auto info = k.tryInspectCap(b.pid, moved);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->rights, Rights::READ | Rights::GRANT);
  k.verifyInvariants();
  // The moved cap still has its child, and is still a child of a's bank cap.
  auto revokedFromMoved = k.tryRevokeCap(b.pid, moved);
  ASSERT_TRUE(revokedFromMoved.ok());
  EXPECT_EQ(*revokedFromMoved, 1u);
  EXPECT_EQ(k.tryInspectCap(a.pid, child).code(), Errc::INVALID_HANDLE);
  auto revokedFromRoot = k.tryRevokeCap(a.pid, a.bank);
  ASSERT_TRUE(revokedFromRoot.ok());
  EXPECT_EQ(*revokedFromRoot, 1u);
  EXPECT_EQ(k.tryInspectCap(b.pid, moved).code(), Errc::INVALID_HANDLE);
  k.verifyInvariants();
}

TEST(CSpace, GrowingPastAChunkChargesOnePageToTheCSpacesBank) {
  Kernel k;
  Proc p = attach(k, 100);
  const CSpace& cs = k.findProcess(p.pid)->cspace();
  const SpaceBank& bank = k.findProcess(p.pid)->bank();
  ASSERT_EQ(cs.capacity(), CSpace::SLOTS_PER_CHUNK);
  for (uint32_t i = 1; i < CSpace::SLOTS_PER_CHUNK; ++i)
    (void)handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ));
  const uint64_t used = bank.used();
  (void)handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ));
  EXPECT_EQ(cs.capacity(), 2 * CSpace::SLOTS_PER_CHUNK);
  EXPECT_EQ(bank.used(), used + 1);
  EXPECT_EQ(cs.chargedPages(), 2u);
  k.verifyInvariants();
}

TEST(CSpace, ANewCapTakesTheLowestFreeSlot) {
  Kernel k;
  Proc p = attach(k);
  std::vector<Handle> caps;
  for (int i = 0; i < 10; ++i) caps.push_back(handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ)));
  ASSERT_TRUE(k.tryDeleteCap(p.pid, caps[7]).ok());
  ASSERT_TRUE(k.tryDeleteCap(p.pid, caps[2]).ok());
  ASSERT_TRUE(k.tryDeleteCap(p.pid, caps[5]).ok());
  EXPECT_EQ(handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ)).index(), caps[2].index());
  EXPECT_EQ(handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ)).index(), caps[5].index());
  EXPECT_EQ(handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ)).index(), caps[7].index());
  EXPECT_EQ(handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ)).index(), 11u);
  k.verifyInvariants();
}

TEST(CSpace, DeletingTheCapsOfTheTopChunksGivesTheirPagesBack) {
  Kernel k;
  Proc p = attach(k, 100);
  const CSpace& cs = k.findProcess(p.pid)->cspace();
  const SpaceBank& bank = k.findProcess(p.pid)->bank();
  const uint64_t baseline = bank.used();
  const uint64_t returned = bank.returnedPages();
  std::vector<Handle> caps;  // slots 1..95: three chunks
  for (uint32_t i = 1; i < 3 * CSpace::SLOTS_PER_CHUNK; ++i)
    caps.push_back(handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ)));
  ASSERT_EQ(cs.capacity(), 3 * CSpace::SLOTS_PER_CHUNK);
  ASSERT_EQ(bank.used(), baseline + 2);
  // Emptying the middle chunk gives nothing back: the top one still holds caps.
  for (uint32_t i = 32; i < 64; ++i) ASSERT_TRUE(k.tryDeleteCap(p.pid, caps[i - 1]).ok());
  EXPECT_EQ(cs.capacity(), 3 * CSpace::SLOTS_PER_CHUNK);
  EXPECT_EQ(bank.used(), baseline + 2);
  // Emptying the top one gives back both, at the end of the call that did it.
  for (uint32_t i = 64; i < 95; ++i) ASSERT_TRUE(k.tryDeleteCap(p.pid, caps[i - 1]).ok());
  EXPECT_EQ(cs.capacity(), 3 * CSpace::SLOTS_PER_CHUNK);
  ASSERT_TRUE(k.tryDeleteCap(p.pid, caps[94]).ok());
  EXPECT_EQ(cs.capacity(), CSpace::SLOTS_PER_CHUNK);
  EXPECT_EQ(cs.chargedPages(), 1u);
  EXPECT_EQ(bank.used(), baseline);
  EXPECT_EQ(bank.returnedPages(), returned + 2) << "a return, as any refund";
  k.verifyInvariants();
  // Handles into the chunks given back never resolve, not even once the table regrows.
  for (uint32_t i = 32; i < 3 * CSpace::SLOTS_PER_CHUNK; ++i)
    EXPECT_EQ(k.tryInspectCap(p.pid, caps[i - 1]).code(), Errc::INVALID_HANDLE);
  std::vector<Handle> regrown;
  for (uint32_t i = 32; i < 3 * CSpace::SLOTS_PER_CHUNK; ++i)
    regrown.push_back(handleOf(k.tryCopyCap(p.pid, p.bank, Rights::ALLOCATE)));
  EXPECT_EQ(bank.used(), baseline + 2);
  for (uint32_t i = 32; i < 3 * CSpace::SLOTS_PER_CHUNK; ++i) {
    EXPECT_EQ(regrown[i - 32].index(), caps[i - 1].index());
    EXPECT_GT(regrown[i - 32].generation(), caps[i - 1].generation());
    EXPECT_EQ(k.tryInspectCap(p.pid, caps[i - 1]).code(), Errc::INVALID_HANDLE);
  }
  // The first chunk is the process's own fixed cost: it stays, whatever it holds.
  for (Handle h : regrown) ASSERT_TRUE(k.tryDeleteCap(p.pid, h).ok());
  for (uint32_t i = 1; i < 32; ++i) ASSERT_TRUE(k.tryDeleteCap(p.pid, caps[i - 1]).ok());
  EXPECT_EQ(cs.capacity(), CSpace::SLOTS_PER_CHUNK);
  EXPECT_EQ(bank.used(), baseline);
  k.verifyInvariants();
}

TEST(CSpace, AnotherProcesssRevokeOrMoveAlsoGivesTheEmptiedChunksBack) {
  Kernel k;
  Proc owner = attach(k), holder = attach(k);
  Handle region = handleOf(k.tryCreateRegion(owner.pid, owner.bank, 1));
  const uint64_t holderUsed = usedOf(k, holder.pid, holder.bank);
  std::vector<Handle> given;
  for (int i = 0; i < 40; ++i)
    given.push_back(handleOf(k.tryTransferCap(owner.pid, region, holder.pid, TransferMode::COPY)));
  EXPECT_EQ(usedOf(k, holder.pid, holder.bank), holderUsed + 1);
  ASSERT_TRUE(k.tryRevokeCap(owner.pid, region).ok());
  EXPECT_EQ(usedOf(k, holder.pid, holder.bank), holderUsed) << "the owner's revoke emptied it";
  // Moving caps out of the top chunk gives it back too.
  Handle grant = handleOf(k.tryCopyCap(holder.pid, holder.bank, Rights::READ | Rights::GRANT));
  std::vector<Handle> mine;
  for (int i = 0; i < 40; ++i)
    mine.push_back(handleOf(k.tryCopyCap(holder.pid, grant, Rights::GRANT)));
  EXPECT_EQ(usedOf(k, holder.pid, holder.bank), holderUsed + 1);
  for (Handle h : mine)
    ASSERT_TRUE(k.tryTransferCap(holder.pid, h, owner.pid, TransferMode::MOVE).ok());
  EXPECT_EQ(usedOf(k, holder.pid, holder.bank), holderUsed);
  k.verifyInvariants();
}

TEST(CSpace, AGivenBackChunkKeepsItsGenerationsAndOneWithARetiredSlotStays) {
  Kernel k(Kernel::Options{.systemPages = 1000, .maxGeneration = 2});
  Proc p = attach(k);
  const CSpace& cs = k.findProcess(p.pid)->cspace();
  for (uint32_t i = 1; i < CSpace::SLOTS_PER_CHUNK; ++i)
    (void)handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ));
  Handle top = handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ));
  ASSERT_EQ(top.index(), CSpace::SLOTS_PER_CHUNK);
  ASSERT_EQ(top.generation(), 1u);
  ASSERT_TRUE(k.tryDeleteCap(p.pid, top).ok());
  EXPECT_EQ(cs.capacity(), CSpace::SLOTS_PER_CHUNK) << "its only cap gone, the chunk went back";
  // Grown again, the chunk starts at the generation it left with: the old handle stays stale.
  Handle again = handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ));
  ASSERT_EQ(again.index(), top.index());
  EXPECT_EQ(again.generation(), 2u);
  EXPECT_EQ(k.tryInspectCap(p.pid, top).code(), Errc::INVALID_HANDLE);
  // Its last generation used, the slot retires, and its chunk can never go back: grown again,
  // it would hand out generation 2 a second time.
  ASSERT_TRUE(k.tryDeleteCap(p.pid, again).ok());
  EXPECT_EQ(cs.retiredSlots(), 1u);
  EXPECT_EQ(cs.capacity(), 2 * CSpace::SLOTS_PER_CHUNK);
  EXPECT_EQ(k.tryInspectCap(p.pid, again).code(), Errc::INVALID_HANDLE);
  Handle next = handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ));
  EXPECT_EQ(next.index(), CSpace::SLOTS_PER_CHUNK + 1) << "past the retired slot";
  k.verifyInvariants();
}

TEST(CSpace, ACSpaceWhoseBankCannotPayForGrowthIsQuotaExceededAndChangesNothing) {
  Kernel k;
  Proc p = attach(k, 2);  // exactly the CSpace record and its first chunk
  for (uint32_t i = 1; i < CSpace::SLOTS_PER_CHUNK; ++i)
    (void)handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ));
  EXPECT_REFUSED_UNCHANGED(k, k.tryCopyCap(p.pid, p.bank, Rights::READ), Errc::QUOTA_EXCEEDED);
  Proc q = attach(k);
  Handle grant = handleOf(k.tryCopyCap(q.pid, q.bank, Rights::READ | Rights::GRANT));
  EXPECT_REFUSED_UNCHANGED(k, k.tryTransferCap(q.pid, grant, p.pid, TransferMode::MOVE),
                           Errc::QUOTA_EXCEEDED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryTransferCap(q.pid, grant, p.pid, TransferMode::COPY),
                           Errc::QUOTA_EXCEEDED);
}

TEST(CSpace, CallsFromAProcessThatIsNotAttachedAreNotFound) {
  Kernel k;
  Proc p = attach(k);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCopyCap(p.pid + 1, p.bank, Rights::READ), Errc::NOT_FOUND);
  EXPECT_REFUSED_UNCHANGED(k, k.tryDeleteCap(p.pid + 1, p.bank), Errc::NOT_FOUND);
  EXPECT_REFUSED_UNCHANGED(k, k.tryRevokeCap(p.pid + 1, p.bank), Errc::NOT_FOUND);
  EXPECT_REFUSED_UNCHANGED(k, k.tryInspectCap(p.pid + 1, p.bank), Errc::NOT_FOUND);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(p.pid + 1, p.bank, 1), Errc::NOT_FOUND);
}

}  // namespace
}  // namespace agate::kernel
