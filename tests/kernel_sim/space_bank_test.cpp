#include "agate/kernel/space_bank.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "agate/kernel/kernel.h"
#include "kernel_test_util.h"

namespace agate::kernel {
namespace {

using test::attach;
using test::handleOf;
using test::Proc;
using test::usedOf;

// A process with a bank tree: root (process bank) -> mid -> leaf.
struct Tree {
  Proc p;
  Handle mid;
  Handle leaf;
};

Tree makeTree(Kernel& k, uint64_t rootLimit, uint64_t midLimit, uint64_t leafLimit) {
  Tree t;
  t.p = attach(k, rootLimit);
  t.mid = handleOf(k.tryCreateBank(t.p.pid, t.p.bank, midLimit));
  t.leaf = handleOf(k.tryCreateBank(t.p.pid, t.mid, leafLimit));
  return t;
}

TEST(SpaceBank, ARegionChargesItsPagesAndARecordPageToItsBankAndEveryAncestor) {
  Kernel k;
  Tree t = makeTree(k, 1000, 500, 100);
  const uint64_t root = usedOf(k, t.p.pid, t.p.bank);
  const uint64_t mid = usedOf(k, t.p.pid, t.mid);
  const uint64_t system = k.systemBank().used();
  (void)handleOf(k.tryCreateRegion(t.p.pid, t.leaf, 10));
  EXPECT_EQ(usedOf(k, t.p.pid, t.leaf), 11u) << "10 pages + the leaf's first record page";
  EXPECT_EQ(usedOf(k, t.p.pid, t.mid), mid + 11);
  EXPECT_EQ(usedOf(k, t.p.pid, t.p.bank), root + 11);
  EXPECT_EQ(k.systemBank().used(), system + 11);
  k.verifyInvariants();
}

TEST(SpaceBank, RecordPagesAreChargedOncePerRecordsPerPageObjects) {
  Kernel k;
  Tree t = makeTree(k, 1000, 500, 100);
  std::vector<Handle> regions;
  for (uint64_t i = 1; i <= RECORDS_PER_PAGE + 1; ++i) {
    regions.push_back(handleOf(k.tryCreateRegion(t.p.pid, t.leaf, 1)));
    EXPECT_EQ(usedOf(k, t.p.pid, t.leaf), i + recordPages(i)) << "after " << i << " regions";
  }
  EXPECT_EQ(usedOf(k, t.p.pid, t.leaf), RECORDS_PER_PAGE + 1 + 2);
  ASSERT_TRUE(k.tryDestroyObject(t.p.pid, regions.back()).ok());
  EXPECT_EQ(usedOf(k, t.p.pid, t.leaf), RECORDS_PER_PAGE + 1) << "the 17th record's page back";
  k.verifyInvariants();
}

TEST(SpaceBank, TheTightestLimitInAThreeLevelTreeWins) {
  Kernel k;
  // The leaf allows 100 pages, but mid allows only 20 (mid's record page for the leaf included).
  Tree t = makeTree(k, 1000, 20, 100);
  EXPECT_EQ(usedOf(k, t.p.pid, t.mid), 1u) << "the leaf's record";
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(t.p.pid, t.leaf, 19), Errc::QUOTA_EXCEEDED);
  (void)handleOf(k.tryCreateRegion(t.p.pid, t.leaf, 18));  // 18 + record page + 1 = 20
  EXPECT_EQ(usedOf(k, t.p.pid, t.mid), 20u);
  auto leaf = k.tryFindBank(t.p.pid, t.leaf, Rights::NONE);
  ASSERT_TRUE(leaf.ok());
  EXPECT_EQ((*leaf)->available(), 0u) << "mid is full, whatever the leaf's own limit";
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(t.p.pid, t.leaf, 1), Errc::QUOTA_EXCEEDED);
  // The root's limit binds too: a sibling of mid cannot take more than the root has left.
  const uint64_t rootLeft = 1000 - usedOf(k, t.p.pid, t.p.bank);
  Handle wide = handleOf(k.tryCreateBank(t.p.pid, t.p.bank, UNLIMITED));
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(t.p.pid, wide, rootLeft), Errc::QUOTA_EXCEEDED);
  k.verifyInvariants();
}

TEST(SpaceBank, AChildMayBeCreatedWithALimitAboveWhatItsParentHasLeft) {
  Kernel k;
  Proc p = attach(k, 50);
  Handle child = handleOf(k.tryCreateBank(p.pid, p.bank, 10000));
  auto credit = k.tryReadBank(p.pid, child);
  ASSERT_TRUE(credit.ok());
  EXPECT_EQ(credit->limit, 10000u);
  EXPECT_EQ(credit->used, 0u);
  auto bank = k.tryFindBank(p.pid, child, Rights::NONE);
  ASSERT_TRUE(bank.ok());
  EXPECT_EQ((*bank)->available(), 50 - usedOf(k, p.pid, p.bank));
}

TEST(SpaceBank, CreatingAChildWhenItsRecordPageCannotBePaidIsQuotaExceededAndChangesNothing) {
  Kernel k;
  Proc p = attach(k, 2);  // exactly its CSpace's record page and first slot chunk
  // The CSpace's record page has room for RECORDS_PER_PAGE - 1 more records ...
  for (uint64_t i = 1; i < RECORDS_PER_PAGE; ++i)
    (void)handleOf(k.tryCreateBank(p.pid, p.bank, 10));
  EXPECT_EQ(usedOf(k, p.pid, p.bank), 2u);
  // ... and the next one needs a page the bank does not have.
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateBank(p.pid, p.bank, 10), Errc::QUOTA_EXCEEDED);
}

TEST(SpaceBank, AnObjectThatFitsButWhoseCapDoesNotIsRefusedWhole) {
  Kernel k;
  Proc p = attach(k, 10);
  Handle sub = handleOf(k.tryCreateBank(p.pid, p.bank, UNLIMITED));  // 1 record page in p.bank
  // Fill the first slot chunk, so that the next cap needs a new chunk page.
  for (uint32_t i = 2; i < CSpace::SLOTS_PER_CHUNK; ++i)
    (void)handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ));
  const uint64_t left = 10 - usedOf(k, p.pid, p.bank);
  ASSERT_GE(left, 2u);
  // The region (and its record page) fits exactly; the chunk page for its cap does not.
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(p.pid, sub, left - 1), Errc::QUOTA_EXCEEDED);
  (void)handleOf(k.tryCreateRegion(p.pid, sub, left - 2));
  EXPECT_EQ(usedOf(k, p.pid, p.bank), 10u);
  k.verifyInvariants();
}

TEST(SpaceBank, LoweringTheLimitBelowUsedIsRefusedAndChangesNothing) {
  Kernel k;
  Tree t = makeTree(k, 1000, 500, 100);
  (void)handleOf(k.tryCreateRegion(t.p.pid, t.leaf, 30));
  EXPECT_REFUSED_UNCHANGED(k, k.trySetBankLimit(t.p.pid, t.leaf, 30), Errc::INVALID_ARGUMENT);
  ASSERT_TRUE(k.trySetBankLimit(t.p.pid, t.leaf, 31).ok()) << "down to exactly used";
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(t.p.pid, t.leaf, 1), Errc::QUOTA_EXCEEDED);
  ASSERT_TRUE(k.trySetBankLimit(t.p.pid, t.leaf, 40).ok());
  EXPECT_EQ(k.tryReadBank(t.p.pid, t.leaf)->limit, 40u);
  (void)handleOf(k.tryCreateRegion(t.p.pid, t.leaf, 9));
  k.verifyInvariants();
}

TEST(SpaceBank, RestrictedBankCapsRefuseEachOperationTheyLack) {
  Kernel k;
  Tree t = makeTree(k, 1000, 500, 100);
  const Rights all = Kernel::CREATOR;
  Handle noAlloc = handleOf(k.tryCopyCap(t.p.pid, t.mid, all & ~Rights::ALLOCATE));
  Handle noChild = handleOf(k.tryCopyCap(t.p.pid, t.mid, all & ~Rights::CREATE_CHILD));
  Handle noLimit = handleOf(k.tryCopyCap(t.p.pid, t.mid, all & ~Rights::SET_LIMIT));
  Handle noRead = handleOf(k.tryCopyCap(t.p.pid, t.mid, all & ~Rights::READ));
  Handle noDestroy = handleOf(k.tryCopyCap(t.p.pid, t.mid, all & ~Rights::DESTROY));
  const ProcessId pid = t.p.pid;
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(pid, noAlloc, 1), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateBank(pid, noChild, 1), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.trySetBankLimit(pid, noLimit, 400), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryReadBank(pid, noRead), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryDestroyObject(pid, noDestroy), Errc::PERMISSION_DENIED);
  // Each still does everything else.
  (void)handleOf(k.tryCreateRegion(pid, noChild, 1));
  (void)handleOf(k.tryCreateBank(pid, noAlloc, 1));
  EXPECT_TRUE(k.tryReadBank(pid, noDestroy).ok());
  EXPECT_TRUE(k.trySetBankLimit(pid, noRead, 450).ok());
  k.verifyInvariants();
}

TEST(SpaceBank, BankCallsOnARegionCapAreWrongTypeAndChangeNothing) {
  Kernel k;
  Proc p = attach(k);
  Handle region = handleOf(k.tryCreateRegion(p.pid, p.bank, 1));
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(p.pid, region, 1), Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateBank(p.pid, region, 1), Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(k, k.trySetBankLimit(p.pid, region, 1), Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryReadBank(p.pid, region), Errc::WRONG_TYPE);
}

TEST(SpaceBank, RegionSizeOutOfRangeIsInvalidArgumentAndChangesNothing) {
  Kernel k;
  Proc p = attach(k);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(p.pid, p.bank, 0), Errc::INVALID_ARGUMENT);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(p.pid, p.bank, Region::MAX_PAGES + 1),
                           Errc::INVALID_ARGUMENT);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(p.pid, p.bank, UINT64_MAX), Errc::INVALID_ARGUMENT);
}

TEST(SpaceBank, DestroyingAMiddleBankRefundsExactlyAndInvalidatesEveryCapBelowIt) {
  Kernel k;
  Tree t = makeTree(k, 1000, 500, 100);
  Proc other = attach(k);
  const uint64_t rootBefore = usedOf(k, t.p.pid, t.p.bank);
  const uint64_t systemBefore = k.systemBank().used();
  const uint64_t objectsBefore = k.objectCount();
  Handle midRegion = handleOf(k.tryCreateRegion(t.p.pid, t.mid, 7));
  Handle leafRegion = handleOf(k.tryCreateRegion(t.p.pid, t.leaf, 5));
  Handle grandchild = handleOf(k.tryCreateBank(t.p.pid, t.leaf, 50));
  Handle deepRegion = handleOf(k.tryCreateRegion(t.p.pid, grandchild, 3));
  // Caps to objects below mid, held by another process too.
  Handle heldElsewhere =
      handleOf(k.tryTransferCap(t.p.pid, deepRegion, other.pid, TransferMode::COPY));
  Handle leafElsewhere = handleOf(k.tryTransferCap(t.p.pid, t.leaf, other.pid, TransferMode::MOVE));
  // A region in the root survives.
  Handle rootRegion = handleOf(k.tryCreateRegion(t.p.pid, t.p.bank, 2));
  const uint64_t rootWithRegion = usedOf(k, t.p.pid, t.p.bank);
  const uint64_t midUsed = usedOf(k, t.p.pid, t.mid);
  // One record page in each of mid, leaf and grandchild, plus the regions' pages.
  EXPECT_EQ(midUsed, 1u + 7 + 1 + 5 + 1 + 3);

  ASSERT_TRUE(k.tryDestroyObject(t.p.pid, t.mid).ok());
  // mid's record shared the root's record page with the CSpace's: that page stays.
  EXPECT_EQ(usedOf(k, t.p.pid, t.p.bank), rootWithRegion - midUsed);
  for (auto [pid, h] : {std::pair{t.p.pid, t.mid},
                        {t.p.pid, midRegion},
                        {t.p.pid, leafRegion},
                        {t.p.pid, grandchild},
                        {t.p.pid, deepRegion},
                        {other.pid, heldElsewhere},
                        {other.pid, leafElsewhere}})
    EXPECT_EQ(k.tryInspectCap(pid, h).code(), Errc::INVALID_HANDLE) << h.raw;
  EXPECT_TRUE(k.tryInspectCap(t.p.pid, rootRegion).ok());
  ASSERT_TRUE(k.tryDestroyObject(t.p.pid, rootRegion).ok());
  EXPECT_EQ(usedOf(k, t.p.pid, t.p.bank), rootBefore - 1) << "mid's page for the leaf record";
  EXPECT_LT(k.systemBank().used(), systemBefore);
  EXPECT_EQ(k.objectCount(), objectsBefore - 2) << "mid and leaf";
  k.verifyInvariants();
}

TEST(SpaceBank, DestroyingADeepChainOfBanksNeedsNoRecursion) {
  Kernel k;
  Proc p = attach(k, 100000);
  Handle top = handleOf(k.tryCreateBank(p.pid, p.bank, UNLIMITED));
  Handle h = top;
  for (int i = 0; i < 5000; ++i) h = handleOf(k.tryCreateBank(p.pid, h, UNLIMITED));
  const uint64_t objects = k.objectCount();
  ASSERT_TRUE(k.tryDestroyObject(p.pid, top).ok());
  EXPECT_EQ(k.objectCount(), objects - 5001);
  // The record page stays (the CSpace's record is on it); of the slot chunks for the 5002 caps
  // the CSpace held, it gives back all but its first once only the bank's cap is left.
  EXPECT_EQ(k.findProcess(p.pid)->cspace().capacity(), CSpace::SLOTS_PER_CHUNK);
  EXPECT_EQ(usedOf(k, p.pid, p.bank), 1u + 1);
  k.verifyInvariants();
}

TEST(SpaceBank, DestroyedObjectsHandleIsStaleAndASecondDestroyIsRefused) {
  Kernel k;
  Proc p = attach(k);
  Handle region = handleOf(k.tryCreateRegion(p.pid, p.bank, 4));
  ASSERT_TRUE(k.tryDestroyObject(p.pid, region).ok());
  EXPECT_REFUSED_UNCHANGED(k, k.tryDestroyObject(p.pid, region), Errc::INVALID_HANDLE);
}

TEST(SpaceBank, AProcessCannotDestroyOrResizeItsOwnBank) {
  Kernel k;
  Proc p = attach(k);
  EXPECT_REFUSED_UNCHANGED(k, k.tryDestroyObject(p.pid, p.bank), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.trySetBankLimit(p.pid, p.bank, 5000), Errc::PERMISSION_DENIED);
}

TEST(SpaceBank, TheCreditPageMirrorsUsedAndLimitAndMarksDestruction) {
  Kernel k;
  Tree t = makeTree(k, 1000, 500, 100);
  auto leaf = k.tryFindBank(t.p.pid, t.leaf, Rights::READ);
  ASSERT_TRUE(leaf.ok());
  auto page = std::make_unique<BankCreditPage>();
  (*leaf)->setCreditPage(page.get());
  BankCredit c;
  ASSERT_TRUE(tryReadCredit(*page, c));
  EXPECT_EQ(c, (BankCredit{0, 100, 0, false}));
  Handle region = handleOf(k.tryCreateRegion(t.p.pid, t.leaf, 9));
  ASSERT_TRUE(tryReadCredit(*page, c));
  EXPECT_EQ(c, (BankCredit{10, 100, 0, false}));
  ASSERT_TRUE(k.trySetBankLimit(t.p.pid, t.leaf, 60).ok());
  ASSERT_TRUE(k.tryDestroyObject(t.p.pid, region).ok());
  ASSERT_TRUE(tryReadCredit(*page, c));
  EXPECT_EQ(c, (BankCredit{0, 60, 10, false}));
  // A refused call leaves the page as it was (a cancelled charge is republished exactly).
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(t.p.pid, t.leaf, 61), Errc::QUOTA_EXCEEDED);
  ASSERT_TRUE(tryReadCredit(*page, c));
  EXPECT_EQ(c, (BankCredit{0, 60, 10, false}));
  ASSERT_TRUE(k.tryDestroyObject(t.p.pid, t.mid).ok());
  ASSERT_TRUE(tryReadCredit(*page, c));
  EXPECT_TRUE(c.destroyed);
}

TEST(SpaceBank, ACreditReaderOnAnotherThreadNeverSeesATornPair) {
  BankCreditPage page;
  std::atomic<bool> done{false};
  std::thread writer([&] {
    for (uint64_t i = 1; i <= 200000; ++i) publishCredit(page, {i, i, i, false});
    done.store(true, std::memory_order_release);
  });
  uint64_t reads = 0;
  uint64_t last = 0;
  while (!done.load(std::memory_order_acquire)) {
    BankCredit c;
    if (!tryReadCredit(page, c)) continue;
    ASSERT_EQ(c.used, c.limit);
    ASSERT_EQ(c.used, c.returned);
    ASSERT_GE(c.used, last) << "readings go forward";
    last = c.used;
    ++reads;
  }
  writer.join();
  BankCredit c;
  ASSERT_TRUE(tryReadCredit(page, c));
  EXPECT_EQ(c.used, 200000u);
  EXPECT_GT(reads, 0u);
}

TEST(SpaceBank, ATornCreditPageIsReportedAfterBoundedRetries) {
  BankCreditPage page;
  page.sequence.store(1, std::memory_order_relaxed);  // a writer that died mid-write
  BankCredit c{7, 7, 7, false};
  EXPECT_FALSE(tryReadCredit(page, c, 16));
  EXPECT_EQ(c, (BankCredit{7, 7, 7, false})) << "out is unchanged";
}

struct RecordingObserver final : BankObserver {
  std::vector<std::pair<Koid, uint64_t>> returned;
  std::vector<Koid> destroyed;
  void pagesReturned(SpaceBank& bank, uint64_t pages) noexcept override {
    returned.emplace_back(bank.koid(), pages);
  }
  void bankDestroyed(SpaceBank& bank) noexcept override { destroyed.push_back(bank.koid()); }
};

TEST(SpaceBank, ObserversAreToldWhenPagesComeBackButNotOnARefusedCall) {
  Kernel k;
  Tree t = makeTree(k, 1000, 500, 100);
  SpaceBank& mid = *k.tryFindBank(t.p.pid, t.mid, Rights::NONE).value();
  SpaceBank& leaf = *k.tryFindBank(t.p.pid, t.leaf, Rights::NONE).value();
  RecordingObserver onMid, onLeaf;
  mid.addObserver(onMid);
  leaf.addObserver(onLeaf);
  Handle region = handleOf(k.tryCreateRegion(t.p.pid, t.leaf, 4));
  EXPECT_TRUE(onMid.returned.empty());
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(t.p.pid, t.leaf, 500), Errc::QUOTA_EXCEEDED);
  EXPECT_TRUE(onLeaf.returned.empty()) << "a cancelled reservation is not a return";
  ASSERT_TRUE(k.tryDestroyObject(t.p.pid, region).ok());
  using R = std::vector<std::pair<Koid, uint64_t>>;
  EXPECT_EQ(onLeaf.returned, (R{{leaf.koid(), 5}}));
  EXPECT_EQ(onMid.returned, (R{{mid.koid(), 5}}));
  const Koid leafKoid = leaf.koid();
  ASSERT_TRUE(k.tryDestroyObject(t.p.pid, t.leaf).ok());
  EXPECT_EQ(onLeaf.destroyed, std::vector<Koid>{leafKoid});
  EXPECT_EQ(onMid.returned.back(), (std::pair<Koid, uint64_t>{mid.koid(), 1}))
      << "the leaf's record page";
  mid.removeObserver(onMid);
}

}  // namespace
}  // namespace agate::kernel
