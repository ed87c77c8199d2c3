// A process whose descriptor table is full (RLIMIT_NOFILE) when the kernel passes it descriptors:
// the packet arrives cut short (MSG_CTRUNC), and only what it was for fails. A call fails with
// OUT_OF_MEMORY (errno EMFILE), an event comes without its descriptors and says why, the
// descriptors that did arrive are closed, and the connection and everything else carry on: a
// later call gets its descriptors, a later client is served. Two connections of one process
// stand for a server and a client where one is needed (the kernel treats each attach as its own
// process). The table is filled for real: the soft limit lowered and the rest taken by dup().
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "../support/proc_self.h"
#include "../support/watchdog.h"
#include "agate/caps/kernel_connection.h"
#include "agate/client/service_host.h"
#include "agate/runtime/fd_passing.h"
#include "kernel_client.h"
#include "kernel_fixture.h"

namespace agate::caps {
namespace {

using agate::testing::get;
using agate::testing::KernelProcess;
using agate::testing::Watchdog;
using std::chrono::seconds;

// Under ASan+UBSan, the vptr check probes memory through a pipe (two descriptors) and reports
// a false "invalid vptr" when it cannot make one: a table filled for a test keeps two slots free
// there, so only packets of three descriptors or more can be cut short (a notification's map, an
// attach); the two-descriptor events are checked in the other builds.
#ifdef AGATE_ASAN
constexpr int MIN_SPARE = 2;
#else
constexpr int MIN_SPARE = 0;
#endif

// The highest descriptor this process has open.
int highestFd() {
  int highest = -1;
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return -1;
  const int own = ::dirfd(d);
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const int fd = std::atoi(e->d_name);
    if (fd != own && fd > highest) highest = fd;
  }
  ::closedir(d);
  return highest;
}

// Fills the descriptor table but for `spare` slots: the soft limit lowered to a little above the
// descriptors in use, the rest taken by dup(). Undone (descriptors closed, limit restored) when
// it goes.
class FullTable {
 public:
  explicit FullTable(int spare) {
    EXPECT_EQ(::getrlimit(RLIMIT_NOFILE, &saved_), 0);
    rlimit low = saved_;
    low.rlim_cur = static_cast<rlim_t>(highestFd() + 1 + 16);
    EXPECT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
    for (;;) {
      const int fd = ::fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 0);
      if (fd < 0) {
        EXPECT_EQ(errno, EMFILE);
        break;
      }
      held_.push_back(fd);
    }
    for (int i = 0; i < spare && !held_.empty(); ++i) {
      ::close(held_.back());
      held_.pop_back();
    }
  }
  ~FullTable() {
    for (int fd : held_) ::close(fd);
    EXPECT_EQ(::setrlimit(RLIMIT_NOFILE, &saved_), 0);
  }
  FullTable(const FullTable&) = delete;
  FullTable& operator=(const FullTable&) = delete;

  // Free slots left in the table now (probed by taking them, then giving them back).
  int freeSlots() const {
    std::vector<int> taken;
    for (;;) {
      const int fd = ::fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 0);
      if (fd < 0) break;
      taken.push_back(fd);
    }
    for (int fd : taken) ::close(fd);
    return static_cast<int>(taken.size());
  }

 private:
  rlimit saved_{};
  std::vector<int> held_;
};

using Client = agate::testing::KernelClient;

TEST(KernelFdLimit, AReplysDescriptorsDroppedForAFullTableFailOnlyThatCall) {
  Watchdog dog("a full descriptor table fails one call", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  Cap<Region> region = get(s.createRegion(c.conn->bank(), 1));
  Cap<Notification> notification = get(s.createNotification(c.conn->bank(), /*wakeFd=*/true));
  const int before = agate::testing::openFdCount();

  for (int spare = MIN_SPARE; spare <= 2; ++spare) {
    SCOPED_TRACE(spare);
    {
      FullTable full(spare);
      ASSERT_EQ(full.freeSlots(), spare);
      // One descriptor (a region) with no room; three (page, wake pipe, ring end) with room for
      // fewer: those that arrived are closed again.
      if (spare == 0) {
        Result<MappedRegion> mapped = s.mapRegion(region, /*writable=*/true);
        ASSERT_EQ(mapped.code(), Errc::OUT_OF_MEMORY);
        EXPECT_EQ(mapped.error().sysErrno, EMFILE);
        EXPECT_NE(std::string(mapped.error().detail).find("descriptor table is full"),
                  std::string::npos);
      }
      Result<MappedNotification> n = s.mapNotification(notification);
      ASSERT_EQ(n.code(), Errc::OUT_OF_MEMORY);
      EXPECT_EQ(n.error().sysErrno, EMFILE);
      EXPECT_EQ(full.freeSlots(), spare) << "a descriptor that arrived was not closed";
      // The connection carries on: calls without descriptors work with the table still full.
      EXPECT_EQ(c.conn->state(), Errc::OK);
      EXPECT_EQ(get(s.inspectCap(region)).type, ObjectType::REGION);
    }
    // Room again: the same calls get their descriptors.
    MappedRegion mapped = get(s.mapRegion(region, /*writable=*/true));
    EXPECT_TRUE(mapped.mapped());
    MappedNotification n = get(s.mapNotification(notification));
    EXPECT_TRUE(n.mapped());
  }
  EXPECT_EQ(agate::testing::openFdCount(), before) << "descriptors leaked";
  EXPECT_EQ(c.conn->state(), Errc::OK);
}

TEST(KernelFdLimit, AnEventsDescriptorsDroppedForAFullTableComeWithTheReasonAndTheNextArrive) {
  if (MIN_SPARE > 1) GTEST_SKIP() << "the sanitizer needs two free descriptors (see MIN_SPARE)";
  Watchdog dog("a full descriptor table drops one event's rings", seconds(30));
  KernelProcess kernel;
  EventLoop loop;
  auto server = std::move(KernelConnection::tryAttach(loop, kernel.home(), "server")).value();
  auto client = std::move(KernelConnection::tryAttach(loop, kernel.home(), "client")).value();
  (void)get(server->sync().registerService(server->registry(), "store", server->bank()));
  const int before = agate::testing::openFdCount();

  for (int spare : {0, 1}) {
    SCOPED_TRACE(spare);
    {
      FullTable full(spare);
      (void)get(client->sync().openBushel(client->registry(), "store", client->bank()));
      KernelEvent opened = get(server->sync().nextEvent());
      EXPECT_EQ(opened.type, EventType::BUSHEL_OPENED);
      EXPECT_NE(opened.bushel, 0u);
      EXPECT_EQ(opened.peer, client->pid());
      EXPECT_EQ(opened.error.code, Errc::OUT_OF_MEMORY);
      EXPECT_EQ(opened.error.sysErrno, EMFILE);
      EXPECT_FALSE(opened.request.valid());
      EXPECT_FALSE(opened.reply.valid());
      EXPECT_EQ(full.freeSlots(), spare) << "a ring that arrived was not closed";
      EXPECT_EQ(server->state(), Errc::OK);
    }
    // The next client's rings arrive.
    (void)get(client->sync().openBushel(client->registry(), "store", client->bank()));
    KernelEvent opened = get(server->sync().nextEvent());
    EXPECT_EQ(opened.type, EventType::BUSHEL_OPENED);
    EXPECT_EQ(opened.error.code, Errc::OK);
    EXPECT_TRUE(opened.request.valid());
    EXPECT_TRUE(opened.reply.valid());
  }
  EXPECT_EQ(agate::testing::openFdCount(), before) << "descriptors leaked";
}

TEST(KernelFdLimit, AServiceHostClosesTheBushelWhoseRingsNeverArrivedAndServesTheNext) {
  if (MIN_SPARE > 0) GTEST_SKIP() << "the sanitizer needs two free descriptors (see MIN_SPARE)";
  Watchdog dog("a host refuses a client whose rings were dropped", seconds(30));
  KernelProcess kernel;
  EventLoop loop;
  auto server = std::move(KernelConnection::tryAttach(loop, kernel.home(), "server")).value();
  auto client = std::move(KernelConnection::tryAttach(loop, kernel.home(), "client")).value();
  auto host =
      std::move(loop.run(client::ServiceHost::create(*server, "store", [](client::ServedClient&) {
        return nullptr;
      }))).value();
  Promise<void> serving = host->run();
  Cap<SpaceBank> bank = get(client->sync().createBank(client->bank(), 100));
  const int before = agate::testing::openFdCount();

  {
    FullTable full(0);
    Cap<Bushel> bushel = get(client->sync().openBushel(client->registry(), "store", bank));
    // The host closes it (perhaps before this call's answer is read): the client hears
    // BUSHEL_CLOSED, from the server, and its bushel is gone.
    KernelEvent closed = get(client->sync().nextEvent());
    EXPECT_EQ(closed.type, EventType::BUSHEL_CLOSED);
    EXPECT_NE(closed.bushel, 0u);
    EXPECT_EQ(closed.peer, server->pid());
    EXPECT_EQ(client->sync().inspectCap(bushel).code(), Errc::INVALID_HANDLE);
    EXPECT_EQ(full.freeSlots(), 0);
  }
  EXPECT_EQ(host->clientsRefused(), 1u);
  EXPECT_EQ(host->bushelsClosed(), 1u);
  EXPECT_EQ(host->clientsOpened(), 0u);
  EXPECT_EQ(get(client->sync().readBank(bank)).used, 0u) << "the refused bushel's pages are back";

  // The next client is served.
  (void)get(client->sync().openBushel(client->registry(), "store", bank));
  ASSERT_TRUE(agate::testing::eventually([&] {
    (void)client->sync().readBank(bank);  // runs the loop a little
    return host->clientsOpened() == 1;
  }));
  EXPECT_EQ(host->clientCount(), 1u);
  EXPECT_EQ(host->clientsRefused(), 1u);
  EXPECT_EQ(server->state(), Errc::OK);
  host->stop();
  EXPECT_TRUE(loop.run(std::move(serving)).ok());
  host.reset();
  EXPECT_EQ(agate::testing::openFdCount(), before + 0)
      << "only the served client's rings were kept, then closed";
}

TEST(KernelFdLimit, AnAttachWhoseRingsCannotBeTakenFailsAndLeavesNothingInTheKernel) {
  Watchdog dog("an attach with a full descriptor table", seconds(30));
  KernelProcess kernel;
  Client observer(kernel, "observer");
  ASSERT_TRUE(observer.conn);
  const size_t processes = get(observer.sync().listProcesses()).size();
  const int before = agate::testing::openFdCount();
  {
    FullTable full(3);  // room for the socket and two of the six ring descriptors
    auto attached = KernelConnection::tryAttach(observer.loop, kernel.home(), "starved");
    ASSERT_EQ(attached.code(), Errc::OUT_OF_MEMORY);
    EXPECT_EQ(attached.error().sysErrno, EMFILE);
    EXPECT_EQ(full.freeSlots(), 3);
  }
  EXPECT_EQ(agate::testing::openFdCount(), before);
  // The kernel saw the socket close and detached the process it had attached.
  EXPECT_TRUE(agate::testing::eventually(
      [&] { return get(observer.sync().listProcesses()).size() == processes; }));
  // Room again: an attach works.
  auto attached = KernelConnection::tryAttach(observer.loop, kernel.home(), "fed");
  EXPECT_TRUE(attached.ok());
}

// The runtime's part, on a socket pair: FAIL reports OUT_OF_MEMORY/EMFILE, REPORT returns the
// payload with fdsDropped; both close what arrived. A peer sending more than a packet carries
// is still PROTOCOL_ERROR.
TEST(KernelFdLimit, APacketCutShortByAFullTableIsToldApartFromAPeerSendingTooMany) {
  int pair[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair), 0);
  Fd a(pair[0]), b(pair[1]);
  const uint64_t word = 42;
  const auto bytes = std::as_bytes(std::span(&word, 1));
  const int three[] = {STDERR_FILENO, STDERR_FILENO, STDERR_FILENO};
  const int before = agate::testing::openFdCount();

  for (DroppedFds mode : {DroppedFds::FAIL, DroppedFds::REPORT}) {
    ASSERT_TRUE(trySendPacket(a.get(), bytes, three).ok());
    FullTable full(2);  // two of the three arrive
    uint64_t got = 0;
    Fd fds[3];
    auto r = tryReceivePacket(b.get(), std::as_writable_bytes(std::span(&got, 1)), fds, mode);
    if (mode == DroppedFds::FAIL) {
      ASSERT_EQ(r.code(), Errc::OUT_OF_MEMORY);
      EXPECT_EQ(r.error().sysErrno, EMFILE);
    } else {
      ASSERT_TRUE(r.ok());
      EXPECT_TRUE(r->fdsDropped);
      EXPECT_EQ(r->fdCount, 0u);
      EXPECT_EQ(r->bytes, sizeof(word));
      EXPECT_EQ(got, word);
    }
    for (const Fd& fd : fds) EXPECT_FALSE(fd.valid());
    EXPECT_EQ(full.freeSlots(), 2);
  }
  // Nine descriptors, more than any packet carries: the peer's fault, not the table's.
  // (trySendPacket refuses more than MAX_PACKET_FDS: sent by hand.)
  const int nine[] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 9)] = {};
  iovec iov{const_cast<uint64_t*>(&word), sizeof(word)};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  cmsghdr* cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int) * 9);
  std::memcpy(CMSG_DATA(cm), nine, sizeof(nine));
  ASSERT_EQ(::sendmsg(a.get(), &msg, 0), static_cast<ssize_t>(sizeof(word)));
  uint64_t got = 0;
  Fd fds[MAX_PACKET_FDS];
  auto r = tryReceivePacket(b.get(), std::as_writable_bytes(std::span(&got, 1)), fds,
                            DroppedFds::REPORT);
  EXPECT_EQ(r.code(), Errc::PROTOCOL_ERROR);
  for (const Fd& fd : fds) EXPECT_FALSE(fd.valid());
  EXPECT_EQ(agate::testing::openFdCount(), before);
}

}  // namespace
}  // namespace agate::caps
