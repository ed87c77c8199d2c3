// agate-kernel through its real socket and rings, driven by agate::caps: attach, bank tree
// accounting, refusals that change nothing, revoke, batched calls beyond a ring's worth, and the
// kernel's own death.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <capnp/serialize.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "../support/watchdog.h"
#include "agate/caps/kernel_connection.h"
#include "agate/kernel/home.h"
#include "kernel.capnp.h"
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

BankInfo findBank(const std::vector<BankInfo>& banks, Koid koid) {
  auto it =
      std::find_if(banks.begin(), banks.end(), [&](const BankInfo& b) { return b.koid == koid; });
  return it == banks.end() ? BankInfo{} : *it;
}

TEST(KernelDaemon, AttachTakesPidAndUidFromTheSocketCredentials) {
  Watchdog dog("attach", seconds(30));
  KernelProcess kernel;
  Client c(kernel, "attach-test");
  ASSERT_TRUE(c.conn);
  EXPECT_TRUE(c.conn->bank().valid());
  EXPECT_TRUE(c.conn->registry().valid());
  EXPECT_EQ(c.conn->kernelPid(), kernel.pid());
  auto procs = c.sync().listProcesses();
  ASSERT_TRUE(procs.ok());
  ASSERT_EQ(procs->size(), 1u);
  EXPECT_EQ((*procs)[0].pid, c.conn->pid());
  EXPECT_EQ((*procs)[0].osPid, ::getpid());
  EXPECT_EQ((*procs)[0].uid, ::geteuid());
  EXPECT_EQ((*procs)[0].name, "attach-test");
  auto bank = c.sync().inspectCap(c.conn->bank());
  ASSERT_TRUE(bank.ok());
  EXPECT_EQ(bank->type, ObjectType::BANK);
  EXPECT_EQ((*procs)[0].bank, bank->koid);
}

TEST(KernelDaemon, AttachToAHomeWithoutKernelIsDisconnected) {
  EventLoop loop;
  auto c = KernelConnection::tryAttach(loop, "/tmp/agate-no-such-home-for-tests", "x");
  EXPECT_EQ(c.code(), Errc::DISCONNECTED);
}

TEST(KernelDaemon, AttachRefusesAnEmptyOrOverlongName) {
  KernelProcess kernel;
  EventLoop loop;
  EXPECT_EQ(KernelConnection::tryAttach(loop, kernel.home(), "").code(), Errc::INVALID_ARGUMENT);
  EXPECT_EQ(KernelConnection::tryAttach(loop, kernel.home(), std::string(65, 'n')).code(),
            Errc::INVALID_ARGUMENT);
}

TEST(KernelDaemon, ARefusedAttachCarriesTheKernelsReason) {
  KernelProcess kernel;
  EventLoop loop;
  auto c = KernelConnection::tryAttach(loop, kernel.home(), "caf\xc3\xa9");  // not ASCII
  ASSERT_EQ(c.code(), Errc::INVALID_ARGUMENT);
  EXPECT_STREQ(c.error().detail,
               "refused by agate-kernel: a process name is 1..64 printable ASCII bytes");
  // The kernel goes on taking attaches.
  EXPECT_TRUE(KernelConnection::tryAttach(loop, kernel.home(), "cafe").ok());
}

TEST(KernelDaemon, BankTreeChargesEveryAncestorAndDestroyRefundsIt) {
  Watchdog dog("bank tree", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  const BankCredit before = get(s.readBank(c.conn->bank()));
  auto child = s.createBank(c.conn->bank(), 100);
  ASSERT_TRUE(child.ok());
  auto grandchild = s.createBank(*child, 50);
  ASSERT_TRUE(grandchild.ok());
  auto region = s.createRegion(*grandchild, 10);
  ASSERT_TRUE(region.ok());

  const BankCredit g = get(s.readBank(*grandchild));
  const BankCredit ch = get(s.readBank(*child));
  const BankCredit p = get(s.readBank(c.conn->bank()));
  EXPECT_EQ(g.limit, 50u);
  EXPECT_GE(g.used, 10u);  // the region's pages and the grandchild's record page
  EXPECT_GE(ch.used, g.used);
  EXPECT_GT(p.used, before.used);

  // Over the tightest limit: refused, nothing charged anywhere.
  const auto banksBefore = get(s.listBanks());
  EXPECT_EQ(s.createRegion(*grandchild, 45).code(), Errc::QUOTA_EXCEEDED);
  EXPECT_EQ(s.createRegion(*child, 200).code(), Errc::QUOTA_EXCEEDED);
  const auto banksAfter = get(s.listBanks());
  ASSERT_EQ(banksBefore.size(), banksAfter.size());
  for (size_t i = 0; i < banksBefore.size(); ++i) {
    EXPECT_EQ(banksBefore[i].koid, banksAfter[i].koid);
    EXPECT_EQ(banksBefore[i].used, banksAfter[i].used);
  }
  // The tree, parents first, as the CLI shows it.
  const Koid childKoid = s.inspectCap(*child)->koid;
  const Koid grandKoid = s.inspectCap(*grandchild)->koid;
  EXPECT_EQ(findBank(banksAfter, grandKoid).parent, childKoid);
  EXPECT_EQ(findBank(banksAfter, grandKoid).used, g.used);

  ASSERT_TRUE(s.destroy(*child).ok());
  EXPECT_EQ(s.readBank(c.conn->bank())->used, before.used);
  EXPECT_EQ(s.readBank(*grandchild).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(s.inspectCap(*region).code(), Errc::INVALID_HANDLE);
}

TEST(KernelDaemon, RefusedCallsReportTheKernelsErrorAndChangeNothing) {
  Watchdog dog("refusals", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  auto bank = s.createBank(c.conn->bank(), 20);
  ASSERT_TRUE(bank.ok());
  auto readOnly = s.copyCap(*bank, Rights::READ);
  ASSERT_TRUE(readOnly.ok());
  const auto caps = get(s.listCaps(c.conn->pid()));
  const auto banks = get(s.listBanks());

  EXPECT_EQ(s.createBank(*readOnly, 5).code(), Errc::PERMISSION_DENIED);
  EXPECT_FALSE(c.conn->lastErrorDetail().empty());
  EXPECT_EQ(s.copyCap(*readOnly, Rights::ALL).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.createRegion(Cap<SpaceBank>{0xdead00000007ull}, 1).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(s.createRegion(capAs<SpaceBank>(c.conn->registry()), 1).code(), Errc::WRONG_TYPE);
  EXPECT_EQ(s.setBankLimit(c.conn->bank(), 1).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.destroy(c.conn->bank()).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.listCaps(9999).code(), Errc::NOT_FOUND);
  EXPECT_EQ(s.transferCap(*bank, 9999, TransferMode::COPY).code(), Errc::NOT_FOUND);

  const auto capsAfter = get(s.listCaps(c.conn->pid()));
  ASSERT_EQ(caps.size(), capsAfter.size());
  for (size_t i = 0; i < caps.size(); ++i) {
    EXPECT_EQ(caps[i].handle, capsAfter[i].handle);
    EXPECT_EQ(caps[i].rights, capsAfter[i].rights);
  }
  const auto banksAfter = get(s.listBanks());
  ASSERT_EQ(banks.size(), banksAfter.size());
  for (size_t i = 0; i < banks.size(); ++i) EXPECT_EQ(banks[i].used, banksAfter[i].used);
}

TEST(KernelDaemon, RevokeDeletesEveryDerivedCapTransitively) {
  Watchdog dog("revoke", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  auto bank = s.createBank(c.conn->bank(), 20);
  ASSERT_TRUE(bank.ok());
  auto copy = s.copyCap(*bank, Rights::READ | Rights::GRANT | Rights::CREATE_CHILD);
  ASSERT_TRUE(copy.ok());
  auto copyOfCopy = s.copyCap(*copy, Rights::READ, /*badge=*/7);
  ASSERT_TRUE(copyOfCopy.ok());
  auto info = s.inspectCap(*copyOfCopy);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->badge, 7u);
  EXPECT_EQ(info->rights, Rights::READ);

  auto revoked = s.revokeCap(*bank);
  ASSERT_TRUE(revoked.ok());
  EXPECT_EQ(*revoked, 2u);
  EXPECT_EQ(s.inspectCap(*copy).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(s.inspectCap(*copyOfCopy).code(), Errc::INVALID_HANDLE);
  EXPECT_TRUE(s.readBank(*bank).ok());  // the revoked cap itself stays
  EXPECT_TRUE(s.deleteCap(*bank).ok());
  EXPECT_EQ(s.deleteCap(*bank).code(), Errc::INVALID_HANDLE);
}

// Several thousand calls in flight at once: more than the submission ring holds, so some wait
// for space; every one completes with its own answer.
Promise<void> manyCopies(KernelConnection& c, int n, int& ok, int& distinct) {
  std::vector<Promise<Cap<SpaceBank>>> calls;
  calls.reserve(n);
  for (int i = 0; i < n; ++i) calls.push_back(c.copyCap(c.bank(), Rights::READ, 0));
  std::vector<uint64_t> handles;
  for (auto& p : calls) {
    Result<Cap<SpaceBank>> r = co_await p;
    if (r) {
      ++ok;
      handles.push_back(r->handle);
    }
  }
  std::sort(handles.begin(), handles.end());
  distinct = static_cast<int>(std::unique(handles.begin(), handles.end()) - handles.begin());
  co_return {};
}

TEST(KernelDaemon, BatchedCallsBeyondTheRingsCapacityAllComplete) {
  Watchdog dog("batched", seconds(60));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  int ok = 0;
  int distinct = 0;
  constexpr int N = 3000;  // ~80 bytes a frame: more than a 64 KiB ring holds
  ASSERT_TRUE(c.loop.run(manyCopies(*c.conn, N, ok, distinct)).ok());
  EXPECT_EQ(ok, N);
  EXPECT_EQ(distinct, N);
  auto procs = c.sync().listProcesses();
  ASSERT_TRUE(procs.ok());
  ASSERT_EQ(procs->size(), 1u);
  EXPECT_EQ((*procs)[0].caps, uint32_t{N} + 2);  // the copies, the bank, the registry
  // 3002 caps do not fit in one completion frame: listCaps fetches them page by page.
  auto first = c.sync().listCapsPage(c.conn->pid(), 0);
  ASSERT_TRUE(first.ok());
  EXPECT_LT(first->entries.size(), size_t{N} + 2);
  EXPECT_NE(first->nextCursor, 0u);
  auto caps = c.sync().listCaps(c.conn->pid());
  ASSERT_TRUE(caps.ok());
  ASSERT_EQ(caps->size(), size_t{N} + 2);
  std::vector<uint64_t> handles;
  for (const CapEntry& e : *caps) handles.push_back(e.handle);
  EXPECT_TRUE(std::is_sorted(handles.begin(), handles.end(), [](uint64_t a, uint64_t b) {
    return (a & 0xffffffffu) < (b & 0xffffffffu);
  }));
  EXPECT_EQ(std::unique(handles.begin(), handles.end()), handles.end());
}

TEST(KernelDaemon, IntrospectionPagesFollowTheCursorToTheEnd) {
  Watchdog dog("pages", seconds(60));
  KernelProcess kernel;
  Client a(kernel, "first");  // one loop (one per thread) for the three connections
  ASSERT_TRUE(a.conn);
  auto b = KernelConnection::tryAttach(a.loop, kernel.home(), "second");
  auto c = KernelConnection::tryAttach(a.loop, kernel.home(), "third");
  ASSERT_TRUE(b.ok() && c.ok());
  auto s = a.sync();
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(s.createBank(a.conn->bank(), 4).ok());

  // Processes one per page: three pages, in pid order, then the end.
  std::vector<ProcessId> pids;
  uint64_t cursor = 0;
  int pages = 0;
  do {
    auto p = s.listProcessesPage(cursor, 1);
    ASSERT_TRUE(p.ok());
    ASSERT_LE(p->entries.size(), 1u);
    for (const ProcessInfo& info : p->entries) pids.push_back(info.pid);
    cursor = p->nextCursor;
    ++pages;
  } while (cursor != 0 && pages < 10);
  EXPECT_EQ(pids, (std::vector<ProcessId>{a.conn->pid(), (*b)->pid(), (*c)->pid()}));

  // Banks three per page equal the whole list, parents before children.
  const auto all = get(s.listBanks());
  std::vector<BankInfo> paged;
  cursor = 0;
  do {
    auto p = s.listBanksPage(cursor, 3);
    ASSERT_TRUE(p.ok());
    ASSERT_LE(p->entries.size(), 3u);
    paged.insert(paged.end(), p->entries.begin(), p->entries.end());
    cursor = p->nextCursor;
  } while (cursor != 0);
  ASSERT_EQ(paged.size(), all.size());
  for (size_t i = 0; i < all.size(); ++i) {
    EXPECT_EQ(paged[i].koid, all[i].koid);
    for (size_t j = 0; j < i; ++j) EXPECT_NE(paged[j].parent, paged[i].koid) << "child first";
  }

  // A cursor past the end: an empty last page. An unknown process: NOT_FOUND.
  auto past = s.listCapsPage(a.conn->pid(), 1u << 30, 5);
  ASSERT_TRUE(past.ok());
  EXPECT_TRUE(past->entries.empty());
  EXPECT_EQ(past->nextCursor, 0u);
  EXPECT_EQ(s.listCapsPage(9999, 0).code(), Errc::NOT_FOUND);
}

TEST(KernelDaemon, PushesPastTheReceiversLimitAreRefusedToTheSenderAndChangeNothing) {
  Watchdog dog("receive limit", seconds(30));
  KernelProcess kernel;
  Client a(kernel, "pusher");  // one loop for both connections
  ASSERT_TRUE(a.conn);
  auto bConn = KernelConnection::tryAttach(a.loop, kernel.home(), "receiver");
  ASSERT_TRUE(bConn.ok());
  KernelConnection& b = **bConn;
  auto s = a.sync();
  auto r = b.sync();
  EXPECT_EQ(get(r.setReceiveLimit(3)), 0u);
  auto region = s.createRegion(a.conn->bank(), 1);
  ASSERT_TRUE(region.ok());
  std::vector<Cap<Region>> received;
  for (int i = 0; i < 3; ++i)
    received.push_back(get(s.transferCap(*region, b.pid(), TransferMode::COPY)));
  const agate::testing::Observed before = agate::testing::observe(*a.conn, {a.conn.get(), &b});
  EXPECT_EQ(s.transferCap(*region, b.pid(), TransferMode::COPY).code(), Errc::QUOTA_EXCEEDED);
  EXPECT_NE(a.conn->lastErrorDetail().find("receive"), std::string::npos)
      << a.conn->lastErrorDetail();
  EXPECT_EQ(s.transferCap(*region, b.pid(), TransferMode::MOVE).code(), Errc::QUOTA_EXCEEDED);
  EXPECT_EQ(s.grantRegistry(a.conn->registry(), b.pid(), Rights::READ).code(),
            Errc::QUOTA_EXCEEDED);
  EXPECT_EQ(r.setReceiveLimit((1u << 20) + 1).code(), Errc::INVALID_ARGUMENT);
  EXPECT_TRUE(agate::testing::observe(*a.conn, {a.conn.get(), &b}) == before);
  // The receiver deletes one: room for one more. Its own caps never count.
  ASSERT_TRUE(r.deleteCap(received[0]).ok());
  EXPECT_TRUE(s.grantRegistry(a.conn->registry(), b.pid(), Rights::READ).ok());
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(r.copyCap(b.bank(), Rights::READ).ok());
  EXPECT_EQ(s.transferCap(*region, b.pid(), TransferMode::COPY).code(), Errc::QUOTA_EXCEEDED);
  EXPECT_EQ(get(r.setReceiveLimit(4)), 3u) << "the answer counts the pushed caps it holds";
  EXPECT_TRUE(s.transferCap(*region, b.pid(), TransferMode::COPY).ok());
}

TEST(KernelDaemon, TheKernelsReceiveCapsOptionIsEachNewProcesssLimit) {
  Watchdog dog("--receive-caps", seconds(30));
  KernelProcess kernel("--receive-caps=2");
  Client a(kernel, "pusher");
  ASSERT_TRUE(a.conn);
  auto bConn = KernelConnection::tryAttach(a.loop, kernel.home(), "receiver");
  ASSERT_TRUE(bConn.ok());
  auto s = a.sync();
  for (int i = 0; i < 2; ++i)
    EXPECT_TRUE(s.transferCap(a.conn->bank(), (*bConn)->pid(), TransferMode::COPY).ok());
  EXPECT_EQ(s.transferCap(a.conn->bank(), (*bConn)->pid(), TransferMode::COPY).code(),
            Errc::QUOTA_EXCEEDED);
  // The receiver raises its own limit.
  EXPECT_EQ(get((*bConn)->sync().setReceiveLimit(3)), 2u);
  EXPECT_TRUE(s.transferCap(a.conn->bank(), (*bConn)->pid(), TransferMode::COPY).ok());
}

TEST(KernelDaemon, CallsFailDisconnectedOnceTheKernelDies) {
  Watchdog dog("kernel death", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  ASSERT_TRUE(c.sync().readBank(c.conn->bank()).ok());
  ::kill(kernel.pid(), SIGKILL);
  kernel.stop();
  EXPECT_EQ(c.sync().readBank(c.conn->bank()).code(), Errc::DISCONNECTED);
  EXPECT_EQ(c.sync().createBank(c.conn->bank(), 1).code(), Errc::DISCONNECTED);
  EXPECT_EQ(c.conn->state(), Errc::DISCONNECTED);
}

// A raw connection to kernel.sock that sends nothing.
int connectSilently(const std::string& home) {
  const std::string path = home + "/" + kernel::KERNEL_SOCKET_NAME;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const int sock = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (sock < 0) return -1;
  if (::connect(sock, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(sock);
    return -1;
  }
  return sock;
}

TEST(KernelDaemon, AConnectionThatNeverAttachesIsDroppedAfterTheTimeoutWhileOthersAreServed) {
  Watchdog dog("attach timeout", seconds(30));
  KernelProcess kernel("--attach-timeout-ms=300");
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  ASSERT_TRUE(c.sync().readBank(c.conn->bank()).ok());
  const int baseline = kernel.openFds();

  const auto start = std::chrono::steady_clock::now();
  const int silent = connectSilently(kernel.home());
  ASSERT_GE(silent, 0);
  // Accepted: the daemon holds one more descriptor for it, and serves everyone else meanwhile.
  ASSERT_TRUE(agate::testing::eventually([&] { return kernel.openFds() == baseline + 1; }));
  for (int i = 0; i < 20; ++i) ASSERT_TRUE(c.sync().readBank(c.conn->bank()).ok());

  // Then it is refused with TIMED_OUT and hung up on, no sooner than the timeout.
  pollfd pfd{silent, POLLIN, 0};
  ASSERT_EQ(::poll(&pfd, 1, 10000), 1);
  EXPECT_GE(std::chrono::steady_clock::now() - start, milliseconds(250));
  capnp::word packet[64];
  const ssize_t n = ::recv(silent, packet, sizeof(packet), 0);
  ASSERT_GT(n, 0);
  ASSERT_EQ(n % 8, 0);
  capnp::FlatArrayMessageReader reader(kj::ArrayPtr<const capnp::word>(packet, n / 8));
  auto reply = reader.getRoot<wire::AttachReply>();
  ASSERT_TRUE(reply.isError());
  EXPECT_EQ(reply.getError().getCode(), static_cast<uint16_t>(Errc::TIMED_OUT));
  EXPECT_EQ(::recv(silent, packet, sizeof(packet), 0), 0);  // end of stream
  ::close(silent);
  // Its descriptor is reclaimed; the attached client is untouched.
  EXPECT_TRUE(agate::testing::eventually([&] { return kernel.openFds() == baseline; }));
  EXPECT_TRUE(c.sync().readBank(c.conn->bank()).ok());
  EXPECT_EQ(get(c.sync().listProcesses()).size(), 1u);
}

TEST(KernelDaemon, AnAttachWithinTheTimeoutSucceedsAfterOthersTimedOut) {
  Watchdog dog("attach after timeout", seconds(30));
  KernelProcess kernel("--attach-timeout-ms=100");
  std::vector<int> silent;
  for (int i = 0; i < 8; ++i) silent.push_back(connectSilently(kernel.home()));
  std::this_thread::sleep_for(milliseconds(300));
  Client c(kernel);  // a fresh connection gets its own full timeout
  ASSERT_TRUE(c.conn);
  EXPECT_TRUE(c.sync().readBank(c.conn->bank()).ok());
  for (int fd : silent) {
    ASSERT_GE(fd, 0);
    pollfd pfd{fd, POLLIN, 0};
    EXPECT_EQ(::poll(&pfd, 1, 5000), 1);
    ::close(fd);
  }
}

TEST(KernelDaemon, ACleanExitRemovesItsPidfileAndSocketAndKeepsTheLockFile) {
  KernelProcess kernel;
  const std::string home = kernel.home();
  auto exists = [&](const char* name) { return ::access((home + "/" + name).c_str(), F_OK) == 0; };
  ASSERT_TRUE(exists("kernel.pid"));
  ASSERT_TRUE(exists("kernel.sock"));
  ASSERT_EQ(kernel.stop(), 0);  // SIGTERM
  EXPECT_FALSE(exists("kernel.pid")) << "a clean exit leaves no stale pid";
  EXPECT_FALSE(exists("kernel.sock"));
  EXPECT_TRUE(exists("kernel.lock")) << "the lock file outlives the daemon (see ~KernelDaemon)";
}

TEST(KernelDaemon, SecondDaemonOnTheSameHomeRefusesToStart) {
  KernelProcess kernel;
  const std::string cmd =
      std::string(AGATE_KERNEL_BINARY) + " --home " + kernel.home() + " 2>/dev/null";
  EXPECT_NE(std::system(cmd.c_str()), 0);
  EventLoop loop;
  EXPECT_TRUE(KernelConnection::tryAttach(loop, kernel.home(), "still-served").ok());
}

}  // namespace
}  // namespace agate::caps
