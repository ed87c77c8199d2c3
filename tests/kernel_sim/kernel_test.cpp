#include "agate/kernel/kernel.h"

#include <gtest/gtest.h>

#include "kernel_test_util.h"

namespace agate::kernel {
namespace {

using test::attach;
using test::handleOf;
using test::Proc;
using test::usedOf;

TEST(Kernel, AttachGivesACSpaceHoldingOneCapToTheProcessBankWithoutDestroyOrSetLimit) {
  Kernel k;
  Proc p = attach(k, 300);
  const Process* proc = k.findProcess(p.pid);
  ASSERT_NE(proc, nullptr);
  EXPECT_EQ(proc->cspace().heldCaps(), 1u);
  EXPECT_EQ(proc->bank().parent(), &k.systemBank());
  EXPECT_EQ(proc->cspace().owner(), &proc->bank()) << "the process pays for its own CSpace";
  auto info = k.tryInspectCap(p.pid, p.bank);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->type, ObjectType::BANK);
  EXPECT_EQ(info->rights, Kernel::PROCESS_BANK);
  EXPECT_FALSE(hasRights(info->rights, Rights::DESTROY));
  EXPECT_FALSE(hasRights(info->rights, Rights::SET_LIMIT));
  EXPECT_EQ(k.tryReadBank(p.pid, p.bank)->limit, 300u);
  EXPECT_EQ(usedOf(k, p.pid, p.bank), 2u) << "CSpace record page + first slot chunk";
  k.verifyInvariants();
}

TEST(Kernel, EachAttachChargesTheSystemBankForTheProcessBankAndItsCSpace) {
  Kernel k(Kernel::Options{.systemPages = 100});
  Proc a = attach(k);
  EXPECT_EQ(k.systemBank().used(), 1u + 2) << "record page for process banks + a's CSpace";
  Proc b = attach(k);
  EXPECT_EQ(k.systemBank().used(), 1u + 2 + 2) << "b's bank record shares the page";
  EXPECT_NE(a.pid, b.pid);
  EXPECT_EQ(k.processCount(), 2u);
}

TEST(Kernel, AttachWithABankTooSmallForItsCSpaceIsRefusedAndChangesNothing) {
  Kernel k;
  EXPECT_REFUSED_UNCHANGED(k, k.tryAttachProcess(1), Errc::QUOTA_EXCEEDED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryAttachProcess(0), Errc::QUOTA_EXCEEDED);
  EXPECT_EQ(k.systemBank().used(), 0u);
}

TEST(Kernel, AttachWhenTheSystemBankIsFullIsRefusedAndChangesNothing) {
  Kernel k(Kernel::Options{.systemPages = 4});
  (void)attach(k);  // 3 pages; a second process needs 2 more (its bank record shares a page)
  EXPECT_REFUSED_UNCHANGED(k, k.tryAttachProcess(100), Errc::QUOTA_EXCEEDED);
  Kernel tight(Kernel::Options{.systemPages = 2});
  EXPECT_REFUSED_UNCHANGED(tight, tight.tryAttachProcess(100), Errc::QUOTA_EXCEEDED);
}

TEST(Kernel, DeathReturnsTheSystemBankAndTheObjectCountToTheirBaseline) {
  Kernel k;
  Proc survivor = attach(k);
  const uint64_t baselineUsed = k.systemBank().used();
  const uint64_t baselineObjects = k.objectCount();
  const auto baseline = k.snapshot();

  Proc p = attach(k, 5000);
  Handle sub = handleOf(k.tryCreateBank(p.pid, p.bank, 2000));
  Handle subsub = handleOf(k.tryCreateBank(p.pid, sub, 100));
  for (int i = 0; i < 40; ++i) (void)handleOf(k.tryCreateRegion(p.pid, i % 2 ? sub : subsub, 2));
  Handle region = handleOf(k.tryCreateRegion(p.pid, p.bank, 7));
  for (int i = 0; i < 100; ++i) (void)handleOf(k.tryCopyCap(p.pid, region, Rights::READ, 9));
  // Hand caps to the survivor, in both directions.
  Handle given = handleOf(k.tryTransferCap(p.pid, region, survivor.pid, TransferMode::COPY));
  Handle fromSurvivor =
      handleOf(k.tryTransferCap(survivor.pid, survivor.bank, p.pid, TransferMode::COPY));
  (void)fromSurvivor;
  EXPECT_GT(k.systemBank().used(), baselineUsed);
  k.verifyInvariants();

  ASSERT_TRUE(k.tryKillProcess(p.pid).ok());
  EXPECT_EQ(k.systemBank().used(), baselineUsed);
  EXPECT_EQ(k.objectCount(), baselineObjects);
  EXPECT_EQ(k.tryInspectCap(survivor.pid, given).code(), Errc::INVALID_HANDLE)
      << "the region died with the bank it came from";
  EXPECT_TRUE(k.snapshot() == baseline);
  k.verifyInvariants();
}

TEST(Kernel, DeathKeepsObjectsTheDeadAllocatedFromABankItWasGiven) {
  Kernel k;
  Proc client = attach(k, 1000);
  Proc server = attach(k, 1000);
  // The client pays for the server's per-client state: it hands over a bank for it.
  Handle forServer = handleOf(k.tryCreateBank(client.pid, client.bank, 100));
  Handle inServer =
      handleOf(k.tryTransferCap(client.pid, forServer, server.pid, TransferMode::COPY));
  Handle state = handleOf(k.tryCreateRegion(server.pid, inServer, 3));
  Handle stateForClient =
      handleOf(k.tryTransferCap(server.pid, state, client.pid, TransferMode::COPY));
  const uint64_t clientUsed = usedOf(k, client.pid, client.bank);

  ASSERT_TRUE(k.tryKillProcess(server.pid).ok());
  EXPECT_EQ(usedOf(k, client.pid, client.bank), clientUsed) << "the client's bank still pays";
  EXPECT_TRUE(k.tryInspectCap(client.pid, stateForClient).ok());
  EXPECT_EQ(k.tryInspectCap(server.pid, state).code(), Errc::NOT_FOUND);
  k.verifyInvariants();
  // The client gets it all back by destroying the bank.
  ASSERT_TRUE(k.tryDestroyObject(client.pid, forServer).ok());
  // The region's 3 pages and the record page in forServer; forServer's own record shares the
  // client bank's record page with the CSpace's record, so that page stays.
  EXPECT_EQ(usedOf(k, client.pid, client.bank), clientUsed - 3 - 1);
  EXPECT_EQ(k.tryInspectCap(client.pid, stateForClient).code(), Errc::INVALID_HANDLE);
  k.verifyInvariants();
}

TEST(Kernel, DeathHandsCapsDerivedFromTheDeadsCapsToTheirParents) {
  Kernel k;
  Proc a = attach(k), b = attach(k), c = attach(k);
  Handle region = handleOf(k.tryCreateRegion(a.pid, a.bank, 1));
  Handle inB = handleOf(k.tryTransferCap(a.pid, region, b.pid, TransferMode::COPY));
  Handle inC = handleOf(k.tryTransferCap(b.pid, inB, c.pid, TransferMode::COPY));
  ASSERT_TRUE(k.tryKillProcess(b.pid).ok());
  EXPECT_TRUE(k.tryInspectCap(c.pid, inC).ok());
  k.verifyInvariants();
  auto revoked = k.tryRevokeCap(a.pid, region);
  ASSERT_TRUE(revoked.ok());
  EXPECT_EQ(*revoked, 1u) << "c's cap is still reachable from a's";
  EXPECT_EQ(k.tryInspectCap(c.pid, inC).code(), Errc::INVALID_HANDLE);
}

TEST(Kernel, KillingAProcessThatIsNotAttachedIsNotFoundAndChangesNothing) {
  Kernel k;
  Proc p = attach(k);
  EXPECT_REFUSED_UNCHANGED(k, k.tryKillProcess(p.pid + 7), Errc::NOT_FOUND);
  ASSERT_TRUE(k.tryKillProcess(p.pid).ok());
  EXPECT_REFUSED_UNCHANGED(k, k.tryKillProcess(p.pid), Errc::NOT_FOUND);
  Proc q = attach(k);
  EXPECT_NE(q.pid, p.pid) << "process ids are never reused";
}

TEST(Kernel, ObserversOfTheSystemBankAreToldWhatADeathReturned) {
  struct Counter final : BankObserver {
    uint64_t pages = 0;
    bool bankDied = false;
    void pagesReturned(SpaceBank&, uint64_t n) noexcept override { pages += n; }
    void bankDestroyed(SpaceBank&) noexcept override { bankDied = true; }
  } onSystem, onProcess;
  Kernel k;
  Proc keep = attach(k);
  (void)keep;
  const uint64_t before = k.systemBank().used();
  Proc p = attach(k);
  (void)handleOf(k.tryCreateRegion(p.pid, p.bank, 10));
  const uint64_t grown = k.systemBank().used() - before;
  k.systemBank().addObserver(onSystem);
  const_cast<SpaceBank&>(k.findProcess(p.pid)->bank()).addObserver(onProcess);
  ASSERT_TRUE(k.tryKillProcess(p.pid).ok());
  EXPECT_EQ(onSystem.pages, grown);
  EXPECT_TRUE(onProcess.bankDied);
  k.systemBank().removeObserver(onSystem);
}

TEST(Kernel, TheSnapshotCountsPerBankUsageAndPerProcessCaps) {
  Kernel k;
  Proc p = attach(k, 100);
  Handle sub = handleOf(k.tryCreateBank(p.pid, p.bank, 50));
  (void)handleOf(k.tryCreateRegion(p.pid, sub, 4));
  auto snap = k.snapshot();
  ASSERT_EQ(snap.banks.size(), 3u);
  EXPECT_EQ(snap.banks[0].koid, k.systemBank().koid());
  EXPECT_EQ(snap.banks[2].used, 5u);
  EXPECT_EQ(snap.banks[2].limit, 50u);
  EXPECT_EQ(snap.banks[2].parent, snap.banks[1].koid);
  ASSERT_EQ(snap.processes.size(), 1u);
  EXPECT_EQ(snap.processes[0].caps.size(), 3u);
  EXPECT_EQ(snap.objects, k.objectCount());
  EXPECT_EQ(snap.objects, 4u) << "process bank, CSpace, sub bank, region";
}

TEST(Kernel, DestroyingTheKernelReclaimsEveryLiveProcess) {
  // No leak or assertion: ASan and the destructors' checks are the judges here.
  Kernel k;
  Proc a = attach(k), b = attach(k);
  Handle r = handleOf(k.tryCreateRegion(a.pid, a.bank, 3));
  (void)handleOf(k.tryTransferCap(a.pid, r, b.pid, TransferMode::COPY));
  EXPECT_EQ(k.processCount(), 2u);
}

}  // namespace
}  // namespace agate::kernel
