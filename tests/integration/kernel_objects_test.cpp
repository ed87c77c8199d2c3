// agate-kernel's notification, event buffer and credit page calls through the real socket and
// rings, driven by agate::caps: every call, the descriptors each one passes (SCM_RIGHTS), waits in
// an event loop on the doorbell's futex and on the wake descriptor, and every refusal (wrong type,
// missing right, stale handle, quota exhausted) with the kernel's state unchanged.
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <vector>

#include <gtest/gtest.h>

#include "../support/watchdog.h"
#include "agate/caps/kernel_connection.h"
#include "kernel_client.h"
#include "kernel_fixture.h"

namespace agate::caps {
namespace {

using agate::testing::get;
using agate::testing::KernelProcess;
using Client = agate::testing::KernelClient;
using agate::testing::Watchdog;
using std::chrono::milliseconds;
using std::chrono::seconds;

// Everything a refused call must leave as it was, as the process can observe it: every bank's
// usage and object count, and the caller's caps with their rights.
struct Observed {
  std::vector<std::tuple<Koid, uint64_t, uint64_t, uint64_t>> banks;
  std::vector<std::tuple<uint64_t, Koid, uint32_t>> caps;
  friend bool operator==(const Observed&, const Observed&) = default;
};
Observed observe(Client& c) {
  Observed o;
  for (const BankInfo& b : get(c.sync().listBanks()))
    o.banks.emplace_back(b.koid, b.used, b.objects, b.ownPages);
  for (const CapEntry& e : get(c.sync().listCaps(c.conn->pid())))
    o.caps.emplace_back(e.handle, e.koid, static_cast<uint32_t>(e.rights));
  return o;
}

// A cap that was valid once: a copy, deleted.
template <class T>
Cap<T> staleCopy(Client& c, Cap<T> cap) {
  Cap<T> copy = get(c.sync().copyCap(cap, Rights::READ));
  EXPECT_TRUE(c.sync().deleteCap(copy).ok());
  return copy;
}

TEST(KernelObjects, NotificationFdsCarryThePageAndWithWriteTheRingEnd) {
  Watchdog dog("notification fds", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  auto n = s.createNotification(c.conn->bank(), /*wakeFd=*/true);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(get(s.inspectCap(*n)).type, ObjectType::NOTIFICATION);

  MappedNotification writer = get(s.mapNotification(*n));
  ASSERT_TRUE(writer.mapped());
  EXPECT_GE(writer.wakeFd(), 0);
  EXPECT_TRUE(writer.canRingWakeFd());

  auto readOnly = s.copyCap(*n, Rights::READ);
  ASSERT_TRUE(readOnly.ok());
  MappedNotification reader = get(s.mapNotification(*readOnly));
  EXPECT_GE(reader.wakeFd(), 0);
  EXPECT_FALSE(reader.canRingWakeFd());  // READ only: no ring end

  auto plain = s.createNotification(c.conn->bank(), /*wakeFd=*/false);
  ASSERT_TRUE(plain.ok());
  MappedNotification noWake = get(s.mapNotification(*plain));
  EXPECT_TRUE(noWake.mapped());
  EXPECT_EQ(noWake.wakeFd(), -1);
  EXPECT_FALSE(noWake.canRingWakeFd());
}

// Starts the wait first (promises start eagerly: the waiter announces and parks), then makes
// the state true and has the kernel ring. With a park slice of 20 s, finishing in well under
// that proves the ring woke the park.
Promise<void> waitThenSignal(KernelConnection& c, MappedNotification& n, Cap<Notification> cap,
                             WaitVia via, bool& woke) {
  bool ready = false;
  Promise<bool> wait = n.waitAsync(
      c.loop(), [&ready] { return ready; }, seconds(20), via,
      /*slice=*/seconds(20));
  co_await c.loop().yield();
  ready = true;
  AGATE_CO_TRY(co_await c.signal(cap));
  Result<bool> r = co_await wait;
  woke = r.ok() && *r;
  co_return {};
}

TEST(KernelObjects, SignalWakesAWaiterParkedOnTheWakeDescriptorInItsLoop) {
  Watchdog dog("signal wake fd", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto n = c.sync().createNotification(c.conn->bank(), true);
  ASSERT_TRUE(n.ok());
  auto readOnly = c.sync().copyCap(*n, Rights::READ);
  MappedNotification waiter = get(c.sync().mapNotification(*readOnly));
  bool woke = false;
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(c.loop.run(waitThenSignal(*c.conn, waiter, *n, WaitVia::WAKE_FD, woke)).ok());
  EXPECT_TRUE(woke);
  EXPECT_LT(std::chrono::steady_clock::now() - start, seconds(10));
  // The wake pipe was drained by the waiter: nothing left to read.
  pollfd pfd{waiter.wakeFd(), POLLIN, 0};
  EXPECT_EQ(::poll(&pfd, 1, 0), 0);
}

TEST(KernelObjects, SignalWakesAWaiterParkedOnTheFutexWord) {
  Watchdog dog("signal futex", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto n = c.sync().createNotification(c.conn->bank(), false);
  ASSERT_TRUE(n.ok());
  MappedNotification waiter = get(c.sync().mapNotification(*n));
  bool woke = false;
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(c.loop.run(waitThenSignal(*c.conn, waiter, *n, WaitVia::FUTEX, woke)).ok());
  EXPECT_TRUE(woke);
  EXPECT_LT(std::chrono::steady_clock::now() - start, seconds(10));
}

TEST(KernelObjects, WaitingOnAWakeDescriptorThatDoesNotExistIsRefused) {
  Watchdog dog("no wake fd", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto n = c.sync().createNotification(c.conn->bank(), false);
  MappedNotification m = get(c.sync().mapNotification(*n));
  auto r = c.loop.run(m.waitAsync(
      c.loop, [] { return false; }, milliseconds(10), WaitVia::WAKE_FD));
  EXPECT_EQ(r.code(), Errc::INVALID_ARGUMENT);
  auto timedOut = c.loop.run(m.waitAsync(
      c.loop, [] { return false; }, milliseconds(20)));
  ASSERT_TRUE(timedOut.ok());
  EXPECT_FALSE(*timedOut);
}

TEST(KernelObjects, NotificationCallsRefuseBadCapsAndChangeNothing) {
  Watchdog dog("notification refusals", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  Cap<SpaceBank> bank = get(s.createBank(c.conn->bank(), 8));
  Cap<Notification> n = get(s.createNotification(bank, true));
  Cap<SpaceBank> noAllocate = get(s.copyCap(bank, Rights::READ));
  Cap<Notification> noWrite = get(s.copyCap(n, Rights::READ));
  Cap<Notification> noRead = get(s.copyCap(n, Rights::WRITE));
  Cap<SpaceBank> staleBank = staleCopy(c, bank);
  Cap<Notification> staleN = staleCopy(c, n);
  Cap<SpaceBank> tiny = get(s.createBank(c.conn->bank(), 4));
  ASSERT_TRUE(s.createRegion(tiny, 3).ok());  // with its record page: 4 of 4 used
  const Observed before = observe(c);

  EXPECT_EQ(s.createNotification(capAs<SpaceBank>(c.conn->registry()), true).code(),
            Errc::WRONG_TYPE);
  EXPECT_EQ(s.createNotification(noAllocate, true).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.createNotification(staleBank, true).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(s.createNotification(tiny, false).code(), Errc::QUOTA_EXCEEDED);
  EXPECT_EQ(s.mapNotification(capAs<Notification>(bank)).code(), Errc::WRONG_TYPE);
  EXPECT_EQ(s.mapNotification(noRead).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.mapNotification(staleN).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(s.signal(capAs<Notification>(bank)).code(), Errc::WRONG_TYPE);
  EXPECT_EQ(s.signal(noWrite).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.signal(staleN).code(), Errc::INVALID_HANDLE);
  EXPECT_FALSE(c.conn->lastErrorDetail().empty());

  EXPECT_EQ(observe(c), before);
  EXPECT_TRUE(s.signal(n).ok());  // the connection carries on
}

// The same shape as waitThenSignal, but what rings is the kernel seeing pages come back to a
// bound bank: the waiter's state is the bank's credit page.
Promise<void> waitForRefund(KernelConnection& c, MappedNotification& n, MappedCreditPage& credit,
                            Cap<SpaceBank> child, uint64_t& returnedSeen) {
  const uint64_t before = credit.tryRead()->returned;
  Promise<bool> wait = n.waitAsync(
      c.loop(), [&] { return credit.tryRead()->returned > before; }, seconds(20), WaitVia::WAKE_FD,
      seconds(20));
  co_await c.loop().yield();
  AGATE_CO_TRY(co_await c.destroy(child));
  Result<bool> r = co_await wait;
  if (r.ok() && *r) returnedSeen = credit.tryRead()->returned - before;
  co_return {};
}

TEST(KernelObjects, ABoundNotificationRingsWhenPagesComeBackToTheBank) {
  Watchdog dog("bank notification", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  Cap<SpaceBank> bank = get(s.createBank(c.conn->bank(), 64));
  Cap<SpaceBank> child = get(s.createBank(bank, 32));
  ASSERT_TRUE(s.createRegion(child, 4).ok());
  Cap<Notification> n = get(s.createNotification(c.conn->bank(), true));
  ASSERT_TRUE(s.bindBankNotification(bank, n).ok());
  MappedCreditPage credit = get(s.mapBankCredit(bank));
  MappedNotification waiter = get(s.mapNotification(n));
  uint64_t returned = 0;
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(c.loop.run(waitForRefund(*c.conn, waiter, credit, child, returned)).ok());
  EXPECT_GE(returned, 5u);  // the region's 4 pages and the child's record page at least
  EXPECT_LT(std::chrono::steady_clock::now() - start, seconds(10));

  // Unbound: pages coming back ring nothing any more (the binding is gone: binding again works).
  ASSERT_TRUE(s.unbindBankNotification(bank, n).ok());
  EXPECT_EQ(s.unbindBankNotification(bank, n).code(), Errc::NOT_FOUND);
  EXPECT_TRUE(s.bindBankNotification(bank, n).ok());
}

TEST(KernelObjects, BankNotificationBindingRefusesBadCapsAndChangesNothing) {
  Watchdog dog("bind refusals", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  Cap<SpaceBank> bank = get(s.createBank(c.conn->bank(), 8));
  Cap<Notification> n = get(s.createNotification(c.conn->bank(), false));
  Cap<SpaceBank> noRead = get(s.copyCap(bank, Rights::ALLOCATE));
  Cap<Notification> noWrite = get(s.copyCap(n, Rights::READ));
  Cap<Notification> staleN = staleCopy(c, n);
  ASSERT_TRUE(s.bindBankNotification(bank, n).ok());
  const Observed before = observe(c);

  EXPECT_EQ(s.bindBankNotification(bank, n).code(), Errc::ALREADY_EXISTS);
  EXPECT_EQ(s.bindBankNotification(capAs<SpaceBank>(n), n).code(), Errc::WRONG_TYPE);
  EXPECT_EQ(s.bindBankNotification(bank, capAs<Notification>(bank)).code(), Errc::WRONG_TYPE);
  EXPECT_EQ(s.bindBankNotification(noRead, n).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.bindBankNotification(bank, noWrite).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.bindBankNotification(bank, staleN).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(s.unbindBankNotification(bank, noWrite).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.unbindBankNotification(noRead, n).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.unbindBankNotification(bank, staleN).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(s.unbindBankNotification(bank, capAs<Notification>(bank)).code(), Errc::WRONG_TYPE);
  EXPECT_EQ(s.unbindBankNotification(c.conn->bank(), n).code(), Errc::NOT_FOUND);
  EXPECT_EQ(observe(c), before);

  // A notification watches at most 64 banks: the 65th bind is QUOTA_EXCEEDED, unchanged state.
  Cap<Notification> many = get(s.createNotification(c.conn->bank(), false));
  std::vector<Cap<SpaceBank>> banks;
  for (int i = 0; i < 64; ++i) {
    banks.push_back(get(s.createBank(c.conn->bank(), 4)));
    ASSERT_TRUE(s.bindBankNotification(banks.back(), many).ok()) << i;
  }
  Cap<SpaceBank> oneMore = get(s.createBank(c.conn->bank(), 4));
  const Observed full = observe(c);
  EXPECT_EQ(s.bindBankNotification(oneMore, many).code(), Errc::QUOTA_EXCEEDED);
  EXPECT_EQ(observe(c), full);
}

TEST(KernelObjects, CreditPageFollowsTheBankWithoutAKernelCall) {
  Watchdog dog("credit page", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  Cap<SpaceBank> bank = get(s.createBank(c.conn->bank(), 64));
  const uint64_t usedBeforeMap = get(s.readBank(bank)).used;
  MappedCreditPage credit = get(s.mapBankCredit(bank));
  // The first map charged the page to the bank itself.
  EXPECT_EQ(get(s.readBank(bank)).used, usedBeforeMap + 1);
  EXPECT_EQ(get(credit.tryRead()), get(s.readBank(bank)));
  // A second holder shares the page for free.
  MappedCreditPage second = get(s.mapBankCredit(get(s.copyCap(bank, Rights::READ))));
  EXPECT_EQ(get(s.readBank(bank)).used, usedBeforeMap + 1);

  ASSERT_TRUE(s.createRegion(bank, 7).ok());
  // The credit page, the region's 7 pages and the page of the bank's first object record.
  EXPECT_EQ(get(credit.tryRead()).used, usedBeforeMap + 1 + 7 + 1);
  EXPECT_EQ(get(second.tryRead()), get(credit.tryRead()));
  ASSERT_TRUE(s.setBankLimit(bank, 100).ok());
  EXPECT_EQ(get(credit.tryRead()).limit, 100u);
  ASSERT_TRUE(s.destroy(bank).ok());
  EXPECT_TRUE(get(credit.tryRead()).destroyed);  // the page stays readable, final
}

TEST(KernelObjects, CreditPageCannotBeMappedOrMadeWritable) {
  Watchdog dog("credit page read-only", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  Cap<SpaceBank> bank = get(c.sync().createBank(c.conn->bank(), 16));
  MappedCreditPage credit = get(c.sync().mapBankCredit(bank));
  const int fd = credit.fd();
  const BankCredit before = get(credit.tryRead());

  EXPECT_EQ(::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), MAP_FAILED);
  EXPECT_NE(
      ::mprotect(const_cast<kernel::BankCreditPage*>(credit.page()), 4096, PROT_READ | PROT_WRITE),
      0);
  const uint64_t forged = 0;
  EXPECT_LT(::pwrite(fd, &forged, sizeof(forged), 8), 0);
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
  const int reopened = ::open(path, O_RDWR | O_CLOEXEC);
  if (reopened >= 0) {  // the re-open may succeed; writing through it may not
    EXPECT_LT(::pwrite(reopened, &forged, sizeof(forged), 8), 0);
    EXPECT_EQ(::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, reopened, 0), MAP_FAILED);
    ::close(reopened);
  }
  EXPECT_NE(::ftruncate(fd, 0), 0);
  EXPECT_NE(::fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE), 0);
  EXPECT_EQ(get(credit.tryRead()), before);
  EXPECT_EQ(get(credit.tryRead()), get(c.sync().readBank(bank)));
}

TEST(KernelObjects, MapBankCreditRefusesBadCapsAndChangesNothing) {
  Watchdog dog("credit refusals", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  Cap<SpaceBank> bank = get(s.createBank(c.conn->bank(), 8));
  Cap<SpaceBank> noRead = get(s.copyCap(bank, Rights::ALLOCATE));
  Cap<SpaceBank> stale = staleCopy(c, bank);
  Cap<SpaceBank> full = get(s.createBank(c.conn->bank(), 4));
  ASSERT_TRUE(s.createRegion(full, 3).ok());  // with its record page: 4 of 4 used
  const Observed before = observe(c);
  EXPECT_EQ(s.mapBankCredit(capAs<SpaceBank>(c.conn->registry())).code(), Errc::WRONG_TYPE);
  EXPECT_EQ(s.mapBankCredit(noRead).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.mapBankCredit(stale).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(s.mapBankCredit(full).code(), Errc::QUOTA_EXCEEDED);
  EXPECT_EQ(observe(c), before);
}

TEST(KernelObjects, EventBufferWriterPostsAndAReadOnlyReaderSeesItAfterTheRing) {
  Watchdog dog("event buffer", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  Cap<Notification> n = get(s.createNotification(c.conn->bank(), true));
  Cap<EventBuffer> buffer = get(s.createEventBuffer(c.conn->bank(), 100, n));
  EXPECT_EQ(get(s.inspectCap(buffer)).type, ObjectType::EVENT_BUFFER);

  MappedEventBuffer writer = get(s.mapEventBuffer(buffer, /*writable=*/true));
  ASSERT_EQ(writer.slots(), 100u);
  ASSERT_TRUE(writer.writable());
  const MappedNotification* writerBell = writer.notification();
  ASSERT_NE(writerBell, nullptr);
  EXPECT_TRUE(writerBell->canRingWakeFd());

  Cap<EventBuffer> readCap = get(s.copyCap(buffer, Rights::READ));
  MappedEventBuffer reader = get(s.mapEventBuffer(readCap, /*writable=*/false));
  ASSERT_EQ(reader.slots(), 100u);
  EXPECT_FALSE(reader.writable());
  const MappedNotification* readerBell = reader.notification();
  ASSERT_NE(readerBell, nullptr);
  EXPECT_FALSE(readerBell->canRingWakeFd());

  // The reader waits on the wake descriptor for slot 42 to move; the writer posts and rings.
  bool seen = false;
  EventRecord record;
  auto wait = reader.notification()->waitAsync(
      c.loop,
      [&] {
        seen = reader.tryRead(42, record) && record.sequence > 0;
        return seen;
      },
      seconds(20), WaitVia::WAKE_FD, seconds(20));
  writer.post(42, {1, 2, 3, 4, 5, 6, 7});
  writer.post(42, {8, 9, 10, 11, 12, 13, 14});  // coalesces: the reader sees the newer post
  writer.notification()->ring();
  const auto start = std::chrono::steady_clock::now();
  auto r = c.loop.run(std::move(wait));
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(*r);
  EXPECT_LT(std::chrono::steady_clock::now() - start, seconds(10));
  EXPECT_EQ(kernel::postsOf(record.sequence), 2u);
  EXPECT_EQ(record.words[0], 8u);
  EXPECT_EQ(record.words[6], 14u);

  // The reader's view cannot become writable, and writers came first: a writable map is refused
  // now that a reader has mapped.
  EXPECT_EQ(::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, reader.fd(), 0), MAP_FAILED);
  EXPECT_EQ(s.mapEventBuffer(buffer, true).code(), Errc::PERMISSION_DENIED);
  // The writer's earlier mapping keeps working.
  writer.post(0, {7, 7, 7, 7, 7, 7, 7});
  ASSERT_TRUE(reader.tryRead(0, record));
  EXPECT_EQ(record.words[3], 7u);
}

TEST(KernelObjects, EventBufferOutlivesItsNotificationAndThenMapsWithoutOne) {
  Watchdog dog("event buffer without notification", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  Cap<Notification> n = get(s.createNotification(c.conn->bank(), false));
  Cap<EventBuffer> buffer = get(s.createEventBuffer(c.conn->bank(), 1, n));
  ASSERT_TRUE(s.destroy(n).ok());
  MappedEventBuffer writer = get(s.mapEventBuffer(buffer, true));
  EXPECT_EQ(writer.notification(), nullptr);
  EXPECT_EQ(writer.slots(), 1u);
}

TEST(KernelObjects, EventBufferCallsRefuseBadCapsAndChangeNothing) {
  Watchdog dog("event buffer refusals", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  Cap<SpaceBank> bank = get(s.createBank(c.conn->bank(), 16));
  Cap<Notification> n = get(s.createNotification(c.conn->bank(), false));
  Cap<EventBuffer> buffer = get(s.createEventBuffer(bank, 1, n));
  Cap<SpaceBank> noAllocate = get(s.copyCap(bank, Rights::READ));
  Cap<Notification> noWrite = get(s.copyCap(n, Rights::READ));
  Cap<EventBuffer> readOnly = get(s.copyCap(buffer, Rights::READ));
  Cap<EventBuffer> noRight = get(s.copyCap(buffer, Rights::GRANT));
  Cap<EventBuffer> stale = staleCopy(c, buffer);
  Cap<Notification> staleN = staleCopy(c, n);
  const Observed before = observe(c);

  EXPECT_EQ(s.createEventBuffer(capAs<SpaceBank>(n), 1, n).code(), Errc::WRONG_TYPE);
  EXPECT_EQ(s.createEventBuffer(bank, 1, capAs<Notification>(bank)).code(), Errc::WRONG_TYPE);
  EXPECT_EQ(s.createEventBuffer(noAllocate, 1, n).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.createEventBuffer(bank, 1, noWrite).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.createEventBuffer(bank, 1, staleN).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(s.createEventBuffer(bank, 0, n).code(), Errc::INVALID_ARGUMENT);
  EXPECT_EQ(s.createEventBuffer(bank, (1u << 16) + 1, n).code(), Errc::INVALID_ARGUMENT);
  EXPECT_EQ(s.createEventBuffer(bank, 1u << 16, n).code(), Errc::QUOTA_EXCEEDED);  // 1024 pages
  EXPECT_EQ(s.mapEventBuffer(capAs<EventBuffer>(n), false).code(), Errc::WRONG_TYPE);
  EXPECT_EQ(s.mapEventBuffer(readOnly, true).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.mapEventBuffer(noRight, false).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.mapEventBuffer(stale, false).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(observe(c), before);
}

TEST(KernelObjects, ObjectsDieWithTheirBankAndTheirCapsGoStale) {
  Watchdog dog("objects die with bank", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  const uint64_t baseline = get(s.readBank(c.conn->bank())).used;
  Cap<SpaceBank> bank = get(s.createBank(c.conn->bank(), 64));
  Cap<Notification> n = get(s.createNotification(bank, true));
  Cap<EventBuffer> buffer = get(s.createEventBuffer(bank, 200, n));
  ASSERT_TRUE(s.bindBankNotification(bank, n).ok());
  MappedCreditPage credit = get(s.mapBankCredit(bank));
  ASSERT_TRUE(s.destroy(bank).ok());
  EXPECT_EQ(get(s.readBank(c.conn->bank())).used, baseline);
  EXPECT_EQ(s.signal(n).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(s.mapEventBuffer(buffer, false).code(), Errc::INVALID_HANDLE);
  EXPECT_TRUE(get(credit.tryRead()).destroyed);
}

}  // namespace
}  // namespace agate::caps
