// Space bank completeness: the credit page as kernel memory a holder maps read-only and reads
// without a kernel call, and restricted bank caps refused by every call that needs the right
// they lack.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>

#include "agate/kernel/kernel.h"
#include "kernel_test_util.h"

namespace agate::kernel::test {
namespace {

// The holder's read-only view of a credit page.
struct CreditView {
  explicit CreditView(int fd) {
    void* p = ::mmap(nullptr, sizeof(BankCreditPage), PROT_READ, MAP_SHARED, fd, 0);
    page = p == MAP_FAILED ? nullptr : static_cast<const BankCreditPage*>(p);
  }
  ~CreditView() {
    if (page) ::munmap(const_cast<BankCreditPage*>(page), sizeof(BankCreditPage));
  }
  CreditView(const CreditView&) = delete;
  CreditView& operator=(const CreditView&) = delete;
  BankCredit read() const {
    BankCredit c;
    EXPECT_TRUE(tryReadCredit(*page, c));
    return c;
  }
  const BankCreditPage* page = nullptr;
};

TEST(BankCreditTest, AHolderReadsUsedAndLimitFromItsMappingWithoutAKernelCall) {
  Kernel k;
  Proc p = attach(k, 1000);
  Handle bank = handleOf(k.tryCreateBank(p.pid, p.bank, 200));
  const uint64_t parentBefore = usedOf(k, p.pid, p.bank);
  auto fd = k.tryMapBankCredit(p.pid, bank);
  ASSERT_TRUE(fd.ok()) << errcName(fd.code());
  EXPECT_EQ(usedOf(k, p.pid, bank), 1u) << "the page is the bank's own cost";
  EXPECT_EQ(usedOf(k, p.pid, p.bank), parentBefore + 1) << "and its ancestors'";
  CreditView view(fd->get());
  ASSERT_NE(view.page, nullptr);
  EXPECT_EQ(view.read(), (BankCredit{1, 200, 0, false}));

  Handle r = handleOf(k.tryCreateRegion(p.pid, bank, 10));
  Handle child = handleOf(k.tryCreateBank(p.pid, bank, 50));
  (void)handleOf(k.tryCreateRegion(p.pid, child, 5));
  auto viaCall = k.tryReadBank(p.pid, bank);
  ASSERT_TRUE(viaCall.ok());
  EXPECT_EQ(view.read(), *viaCall) << "allocations below the bank show in the mapping";
  EXPECT_EQ(view.read().used, 1u + 10 + 1 + 1 + 5)
      << "credit page, region, a record page here and one in the child, child's region";
  ASSERT_TRUE(k.trySetBankLimit(p.pid, bank, 300).ok());
  ASSERT_TRUE(k.tryDestroyObject(p.pid, r).ok());
  BankCredit c = view.read();
  EXPECT_EQ(c.limit, 300u);
  EXPECT_EQ(c.used, 1u + 1 + 1 + 5);
  EXPECT_EQ(c.returned, 10u);

  auto again = k.tryMapBankCredit(p.pid, bank);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(usedOf(k, p.pid, bank), 8u) << "a second holder's map costs nothing more";
  ASSERT_TRUE(k.tryDestroyObject(p.pid, bank).ok());
  EXPECT_TRUE(view.read().destroyed) << "the last word of a destroyed bank";
  EXPECT_EQ(usedOf(k, p.pid, p.bank), parentBefore) << "the credit page came back with the bank";
}

TEST(BankCreditTest, NoHolderCanWriteTheCreditPage) {
  Kernel k;
  Proc p = attach(k, 100);
  auto fd = k.tryMapBankCredit(p.pid, p.bank);
  ASSERT_TRUE(fd.ok());
  EXPECT_NE(::fcntl(fd->get(), F_GET_SEALS) & F_SEAL_FUTURE_WRITE, 0);
  void* w = ::mmap(nullptr, PAGE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd->get(), 0);
  EXPECT_EQ(w, MAP_FAILED);
  EXPECT_EQ(errno, EPERM);
  CreditView view(fd->get());
  ASSERT_NE(view.page, nullptr);
  EXPECT_NE(::mprotect(const_cast<BankCreditPage*>(view.page), PAGE_BYTES, PROT_WRITE), 0);
  const uint64_t forged = 0;
  EXPECT_LT(::pwrite(fd->get(), &forged, sizeof forged, 8), 0);
  EXPECT_NE(::fcntl(fd->get(), F_ADD_SEALS, F_SEAL_WRITE), 0) << "seals are sealed";
  EXPECT_NE(::ftruncate(fd->get(), 0), 0);
  EXPECT_EQ(view.read().used, usedOf(k, p.pid, p.bank));
}

TEST(BankCreditTest, MappingErrorsChangeNothing) {
  Kernel k;
  Proc p = attach(k, 100);
  Handle full = handleOf(k.tryCreateBank(p.pid, p.bank, 0));
  Handle noRead = handleOf(k.tryCopyCap(p.pid, p.bank, Kernel::PROCESS_BANK & ~Rights::READ));
  Handle r = handleOf(k.tryCreateRegion(p.pid, p.bank, 1));
  const size_t fds = countOpenFds();
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapBankCredit(p.pid, full), Errc::QUOTA_EXCEEDED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapBankCredit(p.pid, noRead), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapBankCredit(p.pid, r), Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapBankCredit(p.pid, Handle{}), Errc::INVALID_HANDLE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapBankCredit(p.pid + 1, p.bank), Errc::NOT_FOUND);
  EXPECT_EQ(countOpenFds(), fds);
}

TEST(BankCreditTest, DeathClosesTheCreditMemoryAndReturnsItsPage) {
  Kernel k;
  const size_t fds = countOpenFds();
  const uint64_t system = k.systemBank().used();
  Proc p = attach(k, 100);
  Handle child = handleOf(k.tryCreateBank(p.pid, p.bank, 10));
  ASSERT_TRUE(k.tryMapBankCredit(p.pid, p.bank).ok());
  auto held = k.tryMapBankCredit(p.pid, child);
  ASSERT_TRUE(held.ok());
  CreditView view(held->get());
  ASSERT_TRUE(k.tryKillProcess(p.pid).ok());
  EXPECT_TRUE(view.read().destroyed) << "a holder's mapping outlives the kernel's";
  EXPECT_EQ(k.systemBank().used(), system);
  EXPECT_EQ(countOpenFds(), fds + 1) << "only the descriptor this test still holds";
}

// Every call that allocates from a bank needs ALLOCATE; the others their own right.
TEST(BankCreditTest, ARestrictedBankCapIsRefusedByEveryCallNeedingWhatItLacks) {
  Kernel k;
  Proc p = attach(k, 1000);
  const ProcessId pid = p.pid;
  auto registry = k.tryGrantRegistry(pid, Rights::ALL);
  ASSERT_TRUE(registry.ok());
  Handle bank = handleOf(k.tryCreateBank(pid, p.bank, 500));
  (void)handleOf(k.tryRegisterService(pid, *registry, "svc", bank));
  Handle n = handleOf(k.tryCreateNotification(pid, bank, false));
  Handle noAlloc = handleOf(k.tryCopyCap(pid, bank, Kernel::CREATOR & ~Rights::ALLOCATE));
  Handle noDestroy = handleOf(k.tryCopyCap(pid, bank, Kernel::CREATOR & ~Rights::DESTROY));
  Handle noLimit = handleOf(k.tryCopyCap(pid, bank, Kernel::CREATOR & ~Rights::SET_LIMIT));
  Handle noChild = handleOf(k.tryCopyCap(pid, bank, Kernel::CREATOR & ~Rights::CREATE_CHILD));
  Handle readOnly = handleOf(k.tryCopyCap(pid, bank, Rights::READ));
  const auto denied = Errc::PERMISSION_DENIED;
  for (Handle h : {noAlloc, readOnly}) {
    EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(pid, h, 1), denied);
    EXPECT_REFUSED_UNCHANGED(k, k.tryCreateNotification(pid, h, true), denied);
    EXPECT_REFUSED_UNCHANGED(k, k.tryCreateEventBuffer(pid, h, 1, n), denied);
    EXPECT_REFUSED_UNCHANGED(k, k.tryRegisterService(pid, *registry, "other", h), denied);
    EXPECT_REFUSED_UNCHANGED(k, k.tryOpenBushel(pid, *registry, "svc", h), denied);
  }
  for (Handle h : {noDestroy, readOnly})
    EXPECT_REFUSED_UNCHANGED(k, k.tryDestroyObject(pid, h), denied);
  for (Handle h : {noLimit, readOnly}) {
    EXPECT_REFUSED_UNCHANGED(k, k.trySetBankLimit(pid, h, 600), denied);
    EXPECT_REFUSED_UNCHANGED(k, k.trySetBankLimit(pid, h, 400), denied);
  }
  for (Handle h : {noChild, readOnly})
    EXPECT_REFUSED_UNCHANGED(k, k.tryCreateBank(pid, h, 1), denied);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCopyCap(pid, readOnly, Rights::READ | Rights::ALLOCATE), denied);
  // A read-only cap still reads, maps the credit page and binds notifications.
  EXPECT_TRUE(k.tryReadBank(pid, readOnly).ok());
  EXPECT_TRUE(k.tryMapBankCredit(pid, readOnly).ok());
  EXPECT_TRUE(k.tryBindBankNotification(pid, readOnly, n).ok());
  k.verifyInvariants();
}

}  // namespace
}  // namespace agate::kernel::test
