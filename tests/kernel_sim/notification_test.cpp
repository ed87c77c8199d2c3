// Notifications through the Kernel: the shared doorbell page, the wake pipe, rights, banks that
// ring them when pages come back, and descriptors returned on destroy and death.
#include "agate/kernel/notification.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

#include "agate/kernel/kernel.h"
#include "agate/runtime/doorbell.h"
#include "kernel_test_util.h"

namespace agate::kernel::test {
namespace {

// A holder's view of a notification: the page mapped shared read-write, and the doorbell on it.
class Mapped {
 public:
  explicit Mapped(const NotificationFds& fds) {
    void* p = ::mmap(nullptr, fds.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fds.page.get(), 0);
    EXPECT_NE(p, MAP_FAILED);
    if (p == MAP_FAILED) return;
    word_ = static_cast<DoorbellWord*>(p);
    bytes_ = fds.bytes;
    doorbell_ = Doorbell(word_, true, fds.ringFd.valid() ? fds.ringFd.get() : -1);
  }
  ~Mapped() {
    if (word_) ::munmap(word_, bytes_);
  }
  Mapped(const Mapped&) = delete;
  Mapped& operator=(const Mapped&) = delete;
  Doorbell& doorbell() { return doorbell_; }
  uint32_t seq() const {
    return std::atomic_ref<uint32_t>(word_->seq).load(std::memory_order_acquire);
  }

 private:
  DoorbellWord* word_ = nullptr;
  size_t bytes_ = 0;
  Doorbell doorbell_;
};

bool readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

TEST(NotificationTest, CreatingChargesItsPageAndGivesASealedSharedDoorbellPage) {
  Kernel k;
  Proc p = attach(k, 100);
  const uint64_t before = usedOf(k, p.pid, p.bank);
  Handle n = handleOf(k.tryCreateNotification(p.pid, p.bank, false));
  EXPECT_EQ(usedOf(k, p.pid, p.bank), before + Notification::PAGES)
      << "its record fits on the CSpace's record page";
  (void)handleOf(k.tryCreateNotification(p.pid, p.bank, true));
  EXPECT_EQ(usedOf(k, p.pid, p.bank), before + 2 * Notification::PAGES + 1)
      << "a wake pipe costs its buffer's page";
  auto info = k.tryInspectCap(p.pid, n);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->type, ObjectType::NOTIFICATION);
  auto fds = k.tryNotificationFds(p.pid, n);
  ASSERT_TRUE(fds.ok());
  EXPECT_FALSE(fds->wakeFd.valid()) << "none asked for";
  EXPECT_FALSE(fds->ringFd.valid());
  struct stat st {};
  ASSERT_EQ(::fstat(fds->page.get(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), fds->bytes);
  const int seals = ::fcntl(fds->page.get(), F_GET_SEALS);
  EXPECT_EQ(seals & (F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL),
            F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL);
  EXPECT_EQ(seals & F_SEAL_FUTURE_WRITE, 0) << "waiters write the doorbell word";
  Mapped m(*fds);
  EXPECT_EQ(m.seq(), 0u);
}

TEST(NotificationTest, TheKernelsSignalWakesAnAnnouncedFutexWaiterAndCostsNothingWithoutOne) {
  Kernel k;
  Proc p = attach(k, 100);
  Handle n = handleOf(k.tryCreateNotification(p.pid, p.bank, false));
  auto fds = k.tryNotificationFds(p.pid, n);
  ASSERT_TRUE(fds.ok());
  Mapped m(*fds);
  ASSERT_TRUE(k.trySignal(p.pid, n).ok());
  EXPECT_EQ(m.seq(), 0u) << "nobody announced: the ring makes no futex call";

  const uint32_t snapshot = m.doorbell().announce();
  std::atomic<bool> woke{false};
  std::thread waiter([&] {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (m.seq() == snapshot && std::chrono::steady_clock::now() < deadline)
      (void)m.doorbell().wait(snapshot, std::chrono::milliseconds(100));
    woke.store(m.seq() != snapshot, std::memory_order_release);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_TRUE(k.trySignal(p.pid, n).ok());
  waiter.join();
  m.doorbell().cancel();
  EXPECT_TRUE(woke.load(std::memory_order_acquire));
  EXPECT_EQ(m.seq(), snapshot + 1);
}

TEST(NotificationTest, AWakeFdWaiterIsWokenByTheKernelAndByAWriterHoldingTheRingEnd) {
  Kernel k;
  Proc p = attach(k, 100);
  Handle n = handleOf(k.tryCreateNotification(p.pid, p.bank, true));
  auto fds = k.tryNotificationFds(p.pid, n);
  ASSERT_TRUE(fds.ok());
  ASSERT_TRUE(fds->wakeFd.valid());
  ASSERT_TRUE(fds->ringFd.valid()) << "the creator's cap has WRITE";
  EXPECT_EQ(::fcntl(fds->wakeFd.get(), F_GETPIPE_SZ), static_cast<int>(PAGE_BYTES))
      << "the pipe's buffer is the one page it is charged";
  Mapped m(*fds);
  (void)m.doorbell().announce(/*viaEventfd=*/true);
  EXPECT_FALSE(readable(fds->wakeFd.get()));
  ASSERT_TRUE(k.trySignal(p.pid, n).ok());
  ASSERT_TRUE(readable(fds->wakeFd.get()));
  uint64_t v = 0;
  EXPECT_EQ(::read(fds->wakeFd.get(), &v, sizeof v), 8);
  EXPECT_FALSE(readable(fds->wakeFd.get())) << "one ring, one 8-byte wake";
  m.doorbell().ring();  // a holder rings it itself through the ring end
  EXPECT_TRUE(readable(fds->wakeFd.get()));
  m.doorbell().cancel(true);
}

TEST(NotificationTest, AHolderThatMakesTheWakePipeBlockingAndFullCannotBlockTheKernel) {
  Kernel k;
  Proc p = attach(k, 100);
  Handle n = handleOf(k.tryCreateNotification(p.pid, p.bank, true));
  auto fds = k.tryNotificationFds(p.pid, n);
  ASSERT_TRUE(fds.ok());
  const int ring = fds->ringFd.get();
  ASSERT_EQ(::fcntl(ring, F_SETFL, O_NONBLOCK), 0);
  const uint64_t junk = 0;
  while (::write(ring, &junk, sizeof junk) == sizeof junk) {
  }
  ASSERT_EQ(::fcntl(ring, F_SETFL, 0), 0) << "the holders' write description is now blocking";
  Mapped m(*fds);
  (void)m.doorbell().announce(true);
  std::atomic<bool> returned{false};
  std::thread signaller([&] {
    EXPECT_TRUE(k.trySignal(p.pid, n).ok());
    returned.store(true, std::memory_order_release);
  });
  // Watchdog: a blocked signal would hang here; drain the pipe to free it and fail.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!returned.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const bool inTime = returned.load(std::memory_order_acquire);
  if (!inTime) {
    uint64_t sink[512];
    while (!returned.load(std::memory_order_acquire))
      (void)::read(fds->wakeFd.get(), sink, sizeof sink);
  }
  signaller.join();
  EXPECT_TRUE(inTime) << "the kernel's write blocked on a holder's full pipe";
  EXPECT_TRUE(readable(fds->wakeFd.get()));
  m.doorbell().cancel(true);
}

TEST(NotificationTest, RightsAreCheckedAndEveryRefusalChangesNothing) {
  Kernel k;
  Proc p = attach(k, 100);
  Handle n = handleOf(k.tryCreateNotification(p.pid, p.bank, true));
  Handle readOnly = handleOf(k.tryCopyCap(p.pid, n, Rights::READ));
  Handle writeOnly = handleOf(k.tryCopyCap(p.pid, n, Rights::WRITE));
  Handle r = handleOf(k.tryCreateRegion(p.pid, p.bank, 1));
  EXPECT_REFUSED_UNCHANGED(k, k.trySignal(p.pid, readOnly), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryNotificationFds(p.pid, writeOnly), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.trySignal(p.pid, r), Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryNotificationFds(p.pid, p.bank), Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(k, k.trySignal(p.pid, Handle{}), Errc::INVALID_HANDLE);
  EXPECT_REFUSED_UNCHANGED(k, k.trySignal(p.pid + 1, n), Errc::NOT_FOUND);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateNotification(p.pid, r, false), Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateNotification(p.pid + 1, p.bank, false), Errc::NOT_FOUND);
  auto fds = k.tryNotificationFds(p.pid, readOnly);
  ASSERT_TRUE(fds.ok());
  EXPECT_TRUE(fds->wakeFd.valid());
  EXPECT_FALSE(fds->ringFd.valid()) << "the ring end needs WRITE";
  EXPECT_TRUE(k.trySignal(p.pid, writeOnly).ok());
}

TEST(NotificationTest, ABankThatCannotPayIsQuotaExceededAndMakesNoDescriptor) {
  Kernel k;
  Proc p = attach(k, 100);
  Handle small = handleOf(k.tryCreateBank(p.pid, p.bank, 1));  // room for the record page only
  const size_t fds = countOpenFds();
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateNotification(p.pid, small, true), Errc::QUOTA_EXCEEDED);
  EXPECT_EQ(countOpenFds(), fds);
}

TEST(NotificationTest, DestroyAndDeathCloseEveryDescriptorAndReturnEveryPage) {
  Kernel k;
  const size_t fds = countOpenFds();
  const uint64_t system = k.systemBank().used();
  Proc p = attach(k, 100);
  const uint64_t used = usedOf(k, p.pid, p.bank);
  Handle n = handleOf(k.tryCreateNotification(p.pid, p.bank, true));
  EXPECT_EQ(countOpenFds(), fds + 4) << "page, pipe ends, the kernel's own write end";
  ASSERT_TRUE(k.tryDestroyObject(p.pid, n).ok());
  EXPECT_EQ(countOpenFds(), fds);
  EXPECT_EQ(usedOf(k, p.pid, p.bank), used);
  for (int i = 0; i < 3; ++i) (void)handleOf(k.tryCreateNotification(p.pid, p.bank, i % 2 == 0));
  ASSERT_TRUE(k.tryKillProcess(p.pid).ok());
  EXPECT_EQ(countOpenFds(), fds);
  EXPECT_EQ(k.systemBank().used(), system);
}

// --- Banks that ring a notification when pages come back ---

struct Watched {
  Proc p;
  Handle bank;  // a child of the process bank
  Handle n;
  NotificationFds fds;
};

Watched makeWatched(Kernel& k) {
  Watched w;
  w.p = attach(k, 1000);
  w.bank = handleOf(k.tryCreateBank(w.p.pid, w.p.bank, 100));
  w.n = handleOf(k.tryCreateNotification(w.p.pid, w.p.bank, false));
  auto fds = k.tryNotificationFds(w.p.pid, w.n);
  EXPECT_TRUE(fds.ok());
  if (fds) w.fds = std::move(*fds);
  return w;
}

TEST(NotificationTest, ABoundBankRingsWhenPagesComeBackToItOrBelowButNotOnAllocation) {
  Kernel k;
  Watched w = makeWatched(k);
  const ProcessId pid = w.p.pid;
  ASSERT_TRUE(k.tryBindBankNotification(pid, w.bank, w.n).ok());
  Handle child = handleOf(k.tryCreateBank(pid, w.bank, 50));
  Mapped m(w.fds);
  (void)m.doorbell().announce();
  Handle r1 = handleOf(k.tryCreateRegion(pid, w.bank, 2));
  Handle r2 = handleOf(k.tryCreateRegion(pid, child, 3));
  EXPECT_EQ(m.seq(), 0u) << "allocations do not ring";
  ASSERT_TRUE(k.tryDestroyObject(pid, r1).ok());
  EXPECT_EQ(m.seq(), 1u) << "pages came back to the bank";
  ASSERT_TRUE(k.tryDestroyObject(pid, r2).ok());
  EXPECT_EQ(m.seq(), 2u) << "pages came back below it";
  Handle elsewhere = handleOf(k.tryCreateRegion(pid, w.p.bank, 1));
  ASSERT_TRUE(k.tryDestroyObject(pid, elsewhere).ok());
  EXPECT_EQ(m.seq(), 2u) << "a return to the parent is not a return to the bank";
  ASSERT_TRUE(k.tryDestroyObject(pid, w.bank).ok());
  EXPECT_GE(m.seq(), 3u) << "the bank's destruction rings";
  EXPECT_EQ(k.snapshot().banks.size(), 2u) << "system and process banks";
  m.doorbell().cancel();
  k.verifyInvariants();
}

TEST(NotificationTest, BindingErrorsChangeNothing) {
  Kernel k;
  Watched w = makeWatched(k);
  const ProcessId pid = w.p.pid;
  Handle noRead = handleOf(k.tryCopyCap(pid, w.bank, Kernel::CREATOR & ~Rights::READ));
  Handle noWrite = handleOf(k.tryCopyCap(pid, w.n, Rights::READ));
  EXPECT_REFUSED_UNCHANGED(k, k.tryBindBankNotification(pid, noRead, w.n), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryBindBankNotification(pid, w.bank, noWrite),
                           Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryBindBankNotification(pid, w.n, w.n), Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryBindBankNotification(pid, w.bank, w.bank), Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryUnbindBankNotification(pid, w.bank, w.n), Errc::NOT_FOUND);
  ASSERT_TRUE(k.tryBindBankNotification(pid, w.bank, w.n).ok());
  EXPECT_REFUSED_UNCHANGED(k, k.tryBindBankNotification(pid, w.bank, w.n), Errc::ALREADY_EXISTS);
  EXPECT_REFUSED_UNCHANGED(k, k.tryUnbindBankNotification(pid, noRead, w.n),
                           Errc::PERMISSION_DENIED);
  ASSERT_TRUE(k.tryUnbindBankNotification(pid, w.bank, w.n).ok());
  EXPECT_REFUSED_UNCHANGED(k, k.tryUnbindBankNotification(pid, w.bank, w.n), Errc::NOT_FOUND);
}

TEST(NotificationTest, ANotificationWatchesAtMostItsLimitOfBanks) {
  Kernel k;
  Proc p = attach(k, 10000);
  Handle n = handleOf(k.tryCreateNotification(p.pid, p.bank, false));
  for (size_t i = 0; i < Notification::MAX_WATCHED_BANKS; ++i) {
    Handle b = handleOf(k.tryCreateBank(p.pid, p.bank, 10));
    ASSERT_TRUE(k.tryBindBankNotification(p.pid, b, n).ok()) << i;
  }
  Handle last = handleOf(k.tryCreateBank(p.pid, p.bank, 10));
  EXPECT_REFUSED_UNCHANGED(k, k.tryBindBankNotification(p.pid, last, n), Errc::QUOTA_EXCEEDED);
}

TEST(NotificationTest, DestroyingTheNotificationOrTheBankUnbindsThem) {
  Kernel k;
  Watched w = makeWatched(k);
  const ProcessId pid = w.p.pid;
  ASSERT_TRUE(k.tryBindBankNotification(pid, w.bank, w.n).ok());
  ASSERT_TRUE(k.tryBindBankNotification(pid, w.p.bank, w.n).ok());
  auto observersOf = [&](Handle bank) {
    auto b = k.tryFindBank(pid, bank, Rights::NONE);
    return b.ok() ? (*b)->observerCount() : size_t{99};
  };
  EXPECT_EQ(observersOf(w.bank), 1u);
  ASSERT_TRUE(k.tryDestroyObject(pid, w.bank).ok());
  EXPECT_EQ(observersOf(w.p.bank), 1u);
  ASSERT_TRUE(k.tryDestroyObject(pid, w.n).ok());
  EXPECT_EQ(observersOf(w.p.bank), 0u);
  // A notification allocated from the very bank it watches dies with it cleanly.
  Handle b = handleOf(k.tryCreateBank(pid, w.p.bank, 50));
  Handle inner = handleOf(k.tryCreateNotification(pid, b, false));
  ASSERT_TRUE(k.tryBindBankNotification(pid, b, inner).ok());
  ASSERT_TRUE(k.tryBindBankNotification(pid, w.p.bank, inner).ok());
  ASSERT_TRUE(k.tryDestroyObject(pid, b).ok());
  EXPECT_EQ(observersOf(w.p.bank), 0u);
  k.verifyInvariants();
  ASSERT_TRUE(k.tryKillProcess(pid).ok());
}

}  // namespace
}  // namespace agate::kernel::test
