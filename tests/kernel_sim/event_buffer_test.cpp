// Event buffers through the Kernel: a server's writable view and a client's read-only view of the
// same coalescing slots, the notification that comes with them, rights, sealing, and
// descriptors returned on destroy and death. The slot protocol itself (torn reads, stuck
// writers, a racing writer thread) is tested in event_slot_test.cpp.
#include "agate/kernel/event_buffer.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <thread>

#include "agate/kernel/kernel.h"
#include "agate/runtime/doorbell.h"
#include "kernel_test_util.h"

namespace agate::kernel::test {
namespace {

std::array<uint64_t, EVENT_SLOT_WORDS> wordsFor(uint64_t n) {
  std::array<uint64_t, EVENT_SLOT_WORDS> w{};
  for (size_t i = 0; i < EVENT_SLOT_WORDS; ++i) w[i] = n * 0x9E3779B97F4A7C15ull + i;
  return w;
}

// An mmap that unmaps itself.
struct View {
  View(int fd, size_t size, int prot) : bytes(size) {
    void* p = ::mmap(nullptr, size, prot, MAP_SHARED, fd, 0);
    base = p == MAP_FAILED ? nullptr : p;
  }
  ~View() {
    if (base) ::munmap(base, bytes);
  }
  View(const View&) = delete;
  View& operator=(const View&) = delete;
  EventSlot* slots() const { return static_cast<EventSlot*>(base); }
  void* base = nullptr;
  size_t bytes = 0;
};

struct Pair {
  Proc server;
  Proc client;
  Handle notification;  // the server's
  Handle buffer;        // the server's (CREATOR rights)
  Handle clientBuffer;  // the client's READ cap
};

Pair makePair(Kernel& k, uint32_t slots, bool wakeFd = true) {
  Pair s;
  s.server = attach(k, 1000);
  s.client = attach(k, 1000);
  s.notification = handleOf(k.tryCreateNotification(s.server.pid, s.server.bank, wakeFd));
  s.buffer = handleOf(k.tryCreateEventBuffer(s.server.pid, s.server.bank, slots, s.notification));
  Handle readCopy = handleOf(k.tryCopyCap(s.server.pid, s.buffer, Rights::READ | Rights::GRANT));
  s.clientBuffer =
      handleOf(k.tryTransferCap(s.server.pid, readCopy, s.client.pid, TransferMode::MOVE));
  return s;
}

TEST(EventBufferTest, CreatingChargesItsSlotPagesAndARecordToTheBank) {
  Kernel k;
  Proc p = attach(k, 1000);
  Handle n = handleOf(k.tryCreateNotification(p.pid, p.bank, false));
  const uint64_t before = usedOf(k, p.pid, p.bank);
  Handle b = handleOf(k.tryCreateEventBuffer(p.pid, p.bank, 65, n));
  EXPECT_EQ(usedOf(k, p.pid, p.bank), before + 2) << "65 slots of 64 bytes need two pages";
  auto info = k.tryInspectCap(p.pid, b);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->type, ObjectType::EVENT_BUFFER);
  auto m = k.tryMapEventBuffer(p.pid, b, true);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->slots, 65u);
  EXPECT_EQ(m->bytes, 2 * PAGE_BYTES);
  EXPECT_TRUE(m->writable);
  EXPECT_TRUE(m->hasNotification);
  EXPECT_TRUE(m->notification.page.valid());
}

TEST(EventBufferTest, AClientReadsTheNewestPostOfEachSlotThroughItsReadOnlyView) {
  Kernel k;
  Pair s = makePair(k, 4);
  auto w = k.tryMapEventBuffer(s.server.pid, s.buffer, true);
  ASSERT_TRUE(w.ok());
  View writer(w->fd.get(), w->bytes, PROT_READ | PROT_WRITE);
  ASSERT_NE(writer.base, nullptr);
  auto r = k.tryMapEventBuffer(s.client.pid, s.clientBuffer, false);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->writable);
  EXPECT_FALSE(r->notification.ringFd.valid()) << "a reader waits, the writer rings";
  EXPECT_TRUE(r->notification.wakeFd.valid());
  View reader(r->fd.get(), r->bytes, PROT_READ);
  ASSERT_NE(reader.base, nullptr);

  for (uint64_t n = 1; n <= 10; ++n) postEvent(writer.slots()[0], wordsFor(n));
  postEvent(writer.slots()[3], wordsFor(77));
  EventRecord rec;
  ASSERT_TRUE(tryReadEvent(reader.slots()[0], rec));
  EXPECT_EQ(postsOf(rec.sequence), 10u) << "ten posts coalesced into one slot";
  EXPECT_EQ(rec.words, wordsFor(10));
  ASSERT_TRUE(tryReadEvent(reader.slots()[3], rec));
  EXPECT_EQ(rec.words, wordsFor(77));
  ASSERT_TRUE(tryReadEvent(reader.slots()[1], rec));
  EXPECT_EQ(rec.sequence, 0u) << "a slot never posted to";
}

TEST(EventBufferTest, TheWriterRingsTheNotificationAndAWaitingReaderWakes) {
  Kernel k;
  Pair s = makePair(k, 1);
  auto w = k.tryMapEventBuffer(s.server.pid, s.buffer, true);
  ASSERT_TRUE(w.ok());
  View writer(w->fd.get(), w->bytes, PROT_READ | PROT_WRITE);  // writers map first
  auto r = k.tryMapEventBuffer(s.client.pid, s.clientBuffer, false);
  ASSERT_TRUE(r.ok());
  View reader(r->fd.get(), r->bytes, PROT_READ);
  View writerBell(w->notification.page.get(), w->notification.bytes, PROT_READ | PROT_WRITE);
  View readerBell(r->notification.page.get(), r->notification.bytes, PROT_READ | PROT_WRITE);
  ASSERT_NE(writer.base, nullptr);
  ASSERT_NE(reader.base, nullptr);
  ASSERT_NE(writerBell.base, nullptr);
  ASSERT_NE(readerBell.base, nullptr);
  Doorbell ringer(static_cast<DoorbellWord*>(writerBell.base), true, w->notification.ringFd.get());
  Doorbell waiter(static_cast<DoorbellWord*>(readerBell.base), true);

  (void)waiter.announce(/*viaEventfd=*/true);
  EventRecord rec;
  ASSERT_TRUE(tryReadEvent(reader.slots()[0], rec));
  EXPECT_EQ(rec.sequence, 0u) << "re-check before polling: nothing yet";
  postEvent(writer.slots()[0], wordsFor(5));
  ringer.ring();
  pollfd pfd{r->notification.wakeFd.get(), POLLIN, 0};
  ASSERT_EQ(::poll(&pfd, 1, 5000), 1) << "the reader's wake fd became readable";
  waiter.cancel(true);
  ASSERT_TRUE(tryReadEvent(reader.slots()[0], rec));
  EXPECT_EQ(rec.words, wordsFor(5));
}

TEST(EventBufferTest, TheReadOnlyViewCannotBeMadeWritableByAnyHolder) {
  Kernel k;
  Pair s = makePair(k, 2);
  auto w = k.tryMapEventBuffer(s.server.pid, s.buffer, true);
  ASSERT_TRUE(w.ok());
  View writer(w->fd.get(), w->bytes, PROT_READ | PROT_WRITE);
  auto r = k.tryMapEventBuffer(s.client.pid, s.clientBuffer, false);
  ASSERT_TRUE(r.ok());
  void* p = ::mmap(nullptr, r->bytes, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd.get(), 0);
  EXPECT_EQ(p, MAP_FAILED);
  EXPECT_EQ(errno, EPERM);
  View reader(r->fd.get(), r->bytes, PROT_READ);
  ASSERT_NE(reader.base, nullptr);
  EXPECT_NE(::mprotect(reader.base, r->bytes, PROT_READ | PROT_WRITE), 0);
  const char byte = 1;
  EXPECT_LT(::pwrite(r->fd.get(), &byte, 1, 0), 0);
  // A writable map after the first read-only one is refused, even for the server.
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapEventBuffer(s.server.pid, s.buffer, true),
                           Errc::PERMISSION_DENIED);
  // The server's earlier writable view keeps working and the reader sees it.
  postEvent(writer.slots()[1], wordsFor(9));
  EventRecord rec;
  ASSERT_TRUE(tryReadEvent(reader.slots()[1], rec));
  EXPECT_EQ(rec.words, wordsFor(9));
}

TEST(EventBufferTest, ArgumentAndRightsErrorsChangeNothing) {
  Kernel k;
  Proc p = attach(k, 1000);
  const ProcessId pid = p.pid;
  Handle n = handleOf(k.tryCreateNotification(pid, p.bank, false));
  Handle nRead = handleOf(k.tryCopyCap(pid, n, Rights::READ));
  Handle noAlloc = handleOf(k.tryCopyCap(pid, p.bank, Kernel::PROCESS_BANK & ~Rights::ALLOCATE));
  const uint32_t tooMany = EventBuffer::MAX_SLOTS + 1;
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateEventBuffer(pid, p.bank, 0, n), Errc::INVALID_ARGUMENT);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateEventBuffer(pid, p.bank, tooMany, n),
                           Errc::INVALID_ARGUMENT);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateEventBuffer(pid, p.bank, 1, nRead),
                           Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateEventBuffer(pid, noAlloc, 1, n), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateEventBuffer(pid, n, 1, n), Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateEventBuffer(pid, p.bank, 1, p.bank), Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateEventBuffer(pid, p.bank, 1, Handle{}),
                           Errc::INVALID_HANDLE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateEventBuffer(pid + 7, p.bank, 1, n), Errc::NOT_FOUND);

  Handle b = handleOf(k.tryCreateEventBuffer(pid, p.bank, 1, n));
  Handle bRead = handleOf(k.tryCopyCap(pid, b, Rights::READ));
  Handle bWrite = handleOf(k.tryCopyCap(pid, b, Rights::WRITE));
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapEventBuffer(pid, bRead, true), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapEventBuffer(pid, bWrite, false), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapEventBuffer(pid, n, false), Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapEventBuffer(pid, Handle{}, false), Errc::INVALID_HANDLE);
}

TEST(EventBufferTest, ABankThatCannotPayIsQuotaExceededAndMakesNoMemfd) {
  Kernel k;
  Proc p = attach(k, 1000);
  Handle n = handleOf(k.tryCreateNotification(p.pid, p.bank, false));
  Handle small = handleOf(k.tryCreateBank(p.pid, p.bank, 3));
  const size_t fds = countOpenFds();
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateEventBuffer(p.pid, small, 256, n), Errc::QUOTA_EXCEEDED);
  EXPECT_EQ(countOpenFds(), fds);
}

TEST(EventBufferTest, AWriterThatSealsTheSealsGetsReadersRefused) {
  Kernel k;
  Pair s = makePair(k, 1);
  auto w = k.tryMapEventBuffer(s.server.pid, s.buffer, true);
  ASSERT_TRUE(w.ok());
  ASSERT_EQ(::fcntl(w->fd.get(), F_ADD_SEALS, F_SEAL_SEAL), 0) << "a hostile writer";
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapEventBuffer(s.client.pid, s.clientBuffer, false),
                           Errc::PERMISSION_DENIED);
}

uint32_t endsIn(const View& bell) {
  auto* word =
      reinterpret_cast<uint32_t*>(static_cast<std::byte*>(bell.base) + NOTIFICATION_ENDS_OFFSET);
  return std::atomic_ref<uint32_t>(*word).load(std::memory_order_acquire);
}

TEST(EventBufferTest, DestroyingTheBufferDeletesTheReadersCapCountsTheEndAndWakesTheReader) {
  Kernel k;
  Pair s = makePair(k, 2);
  auto r = k.tryMapEventBuffer(s.client.pid, s.clientBuffer, false);
  ASSERT_TRUE(r.ok());
  View readerBell(r->notification.page.get(), r->notification.bytes, PROT_READ | PROT_WRITE);
  ASSERT_NE(readerBell.base, nullptr);
  Doorbell waiter(static_cast<DoorbellWord*>(readerBell.base), true);
  EXPECT_EQ(endsIn(readerBell), 0u);
  // Another buffer on the same notification: each end counts once.
  Handle other = handleOf(k.tryCreateEventBuffer(s.server.pid, s.server.bank, 1, s.notification));

  (void)waiter.announce(/*viaEventfd=*/true);
  ASSERT_TRUE(k.tryDestroyObject(s.server.pid, s.buffer).ok());
  EXPECT_EQ(k.tryInspectCap(s.client.pid, s.clientBuffer).code(), Errc::INVALID_HANDLE)
      << "the end is the kernel's: the reader's cap is gone";
  EXPECT_EQ(endsIn(readerBell), 1u);
  pollfd pfd{r->notification.wakeFd.get(), POLLIN, 0};
  EXPECT_EQ(::poll(&pfd, 1, 5000), 1) << "the kernel rang: the reader wakes";
  waiter.cancel(true);
  ASSERT_TRUE(k.tryDestroyObject(s.server.pid, other).ok());
  EXPECT_EQ(endsIn(readerBell), 2u);
  k.verifyInvariants();
}

// How a publisher's objects go: the buffer first (EventPublisher), the notification first (a
// hostile or careless one), or both with the publisher's process (its bank, in its own order).
enum class Teardown { BUFFER_FIRST, NOTIFICATION_FIRST, PUBLISHER_DIES };

class EventBufferEndTest : public ::testing::TestWithParam<Teardown> {};

TEST_P(EventBufferEndTest, EitherOrderCountsTheEndOnceAndWakesTheReaderAndFreesEverything) {
  Kernel k;
  const size_t fds = countOpenFds();
  const uint64_t system = k.systemBank().used();
  {
    Pair s = makePair(k, 2);
    auto r = k.tryMapEventBuffer(s.client.pid, s.clientBuffer, false);
    ASSERT_TRUE(r.ok());
    View readerBell(r->notification.page.get(), r->notification.bytes, PROT_READ | PROT_WRITE);
    ASSERT_NE(readerBell.base, nullptr);
    Doorbell waiter(static_cast<DoorbellWord*>(readerBell.base), true);
    pollfd pfd{r->notification.wakeFd.get(), POLLIN, 0};
    (void)waiter.announce(/*viaEventfd=*/true);

    if (GetParam() == Teardown::NOTIFICATION_FIRST) {
      const size_t withBoth = countOpenFds();
      ASSERT_TRUE(k.tryDestroyObject(s.server.pid, s.notification).ok());
      // Not an end: the buffer lives, without a notification, and its reader's cap resolves.
      EXPECT_EQ(endsIn(readerBell), 0u);
      EXPECT_TRUE(k.tryInspectCap(s.client.pid, s.clientBuffer).ok());
      EXPECT_EQ(::poll(&pfd, 1, 0), 0) << "nothing to wake the reader for";
      auto again = k.tryMapEventBuffer(s.client.pid, s.clientBuffer, false);
      ASSERT_TRUE(again.ok());
      EXPECT_FALSE(again->hasNotification);
      // Only the write end handed to WRITE holders is closed; the bell (the page, the pipe's
      // read end and the kernel's write end) stays with the buffer.
      EXPECT_EQ(countOpenFds(), withBoth - 1 + 1) << "(+1: the new map's memfd descriptor)";
      k.verifyInvariants();
    }
    if (GetParam() == Teardown::PUBLISHER_DIES) {
      ASSERT_TRUE(k.tryKillProcess(s.server.pid).ok());
    } else if (GetParam() == Teardown::NOTIFICATION_FIRST) {
      ASSERT_TRUE(k.tryDestroyObject(s.server.pid, s.buffer).ok());
    } else {
      ASSERT_TRUE(k.tryDestroyObject(s.server.pid, s.buffer).ok());
      EXPECT_EQ(endsIn(readerBell), 1u);
      ASSERT_TRUE(k.tryDestroyObject(s.server.pid, s.notification).ok());
    }
    // The end, counted once, from the kernel: the reader's cap is gone and the reader wakes.
    EXPECT_EQ(k.tryInspectCap(s.client.pid, s.clientBuffer).code(), Errc::INVALID_HANDLE);
    EXPECT_EQ(endsIn(readerBell), 1u);
    EXPECT_EQ(::poll(&pfd, 1, 5000), 1) << "the kernel rang: the reader wakes";
    waiter.cancel(true);
    k.verifyInvariants();
    if (GetParam() != Teardown::PUBLISHER_DIES) {
      ASSERT_TRUE(k.tryKillProcess(s.server.pid).ok());
    }
    ASSERT_TRUE(k.tryKillProcess(s.client.pid).ok());
  }
  // Every descriptor the kernel kept (the bell included) is closed, every page back.
  EXPECT_EQ(countOpenFds(), fds);
  EXPECT_EQ(k.systemBank().used(), system);
  EXPECT_EQ(k.objectCount(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Orders, EventBufferEndTest,
                         ::testing::Values(Teardown::BUFFER_FIRST, Teardown::NOTIFICATION_FIRST,
                                           Teardown::PUBLISHER_DIES));

TEST(EventBufferTest, ABellKeptByABufferRingsAFutexWaiterWithoutAWakePipe) {
  Kernel k;
  Pair s = makePair(k, 1, /*wakeFd=*/false);
  auto r = k.tryMapEventBuffer(s.client.pid, s.clientBuffer, false);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->notification.wakeFd.valid());
  View readerBell(r->notification.page.get(), r->notification.bytes, PROT_READ | PROT_WRITE);
  ASSERT_NE(readerBell.base, nullptr);
  ASSERT_TRUE(k.tryDestroyObject(s.server.pid, s.notification).ok());
  // A reader parked on the futex word (its own mapping of the page) is woken by the buffer's end.
  std::atomic<bool> woke{false};
  std::thread reader([&] {
    Doorbell waiter(static_cast<DoorbellWord*>(readerBell.base), true);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      const uint32_t snapshot = waiter.announce();
      const bool ended = endsIn(readerBell) != 0;
      if (!ended) (void)waiter.wait(snapshot, std::chrono::seconds(10));
      waiter.cancel();
      if (ended) {
        woke = true;
        return;
      }
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(woke);
  ASSERT_TRUE(k.tryDestroyObject(s.server.pid, s.buffer).ok());
  const auto destroyed = std::chrono::steady_clock::now();
  reader.join();
  EXPECT_TRUE(woke);
  EXPECT_LT(std::chrono::steady_clock::now() - destroyed, std::chrono::seconds(5))
      << "woken by the ring, not by its park's timeout";
  EXPECT_EQ(endsIn(readerBell), 1u);
  k.verifyInvariants();
}

TEST(EventBufferTest, DestroyingTheNotificationFirstLeavesTheBufferWorkingWithoutOne) {
  Kernel k;
  Pair s = makePair(k, 1);
  ASSERT_TRUE(k.tryDestroyObject(s.server.pid, s.notification).ok());
  auto w = k.tryMapEventBuffer(s.server.pid, s.buffer, true);
  ASSERT_TRUE(w.ok());
  EXPECT_FALSE(w->hasNotification);
  EXPECT_FALSE(w->notification.page.valid());
  k.verifyInvariants();
}

TEST(EventBufferTest, DestroyAndEitherDeathCloseEveryDescriptorAndReturnEveryPage) {
  Kernel k;
  const size_t fds = countOpenFds();
  const uint64_t system = k.systemBank().used();
  {
    Pair s = makePair(k, 8);
    const size_t withBoth = countOpenFds();
    ASSERT_TRUE(k.tryDestroyObject(s.server.pid, s.buffer).ok());
    EXPECT_EQ(countOpenFds(), withBoth - 1);
    auto b = k.tryInspectCap(s.client.pid, s.clientBuffer);
    EXPECT_EQ(b.code(), Errc::INVALID_HANDLE) << "the client's cap died with the buffer";
    ASSERT_TRUE(k.tryKillProcess(s.client.pid).ok());
    ASSERT_TRUE(k.tryKillProcess(s.server.pid).ok());
  }
  EXPECT_EQ(countOpenFds(), fds);
  {
    // The server dies while the client holds the buffer: it was paid from the server's bank.
    Pair s = makePair(k, 8);
    ASSERT_TRUE(k.tryKillProcess(s.server.pid).ok());
    EXPECT_EQ(k.tryInspectCap(s.client.pid, s.clientBuffer).code(), Errc::INVALID_HANDLE);
    ASSERT_TRUE(k.tryKillProcess(s.client.pid).ok());
  }
  EXPECT_EQ(countOpenFds(), fds);
  EXPECT_EQ(k.systemBank().used(), system);
  EXPECT_EQ(k.objectCount(), 0u);
}

}  // namespace
}  // namespace agate::kernel::test
