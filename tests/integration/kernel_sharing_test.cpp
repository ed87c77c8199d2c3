// Two real processes share kernel objects through agate-kernel: a region written by one and read
// by the other after a cap transfer, a read-only cap that cannot be turned into a write by any
// path, revoke reaching into another process, and bushel events between a server and a client.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

#include <gtest/gtest.h>

#include "../support/watchdog.h"
#include "agate/caps/kernel_connection.h"
#include "kernel_fixture.h"

namespace agate::caps {
namespace {

using agate::testing::KernelProcess;
using agate::testing::Watchdog;
using std::chrono::seconds;

constexpr size_t PAGE = 4096;

// A line between the test's two children: fixed-size values, blocking.
struct Line {
  int fd;
  bool put(uint64_t v) const { return ::write(fd, &v, sizeof(v)) == sizeof(v); }
  uint64_t take() const {
    uint64_t v = 0;
    return ::read(fd, &v, sizeof(v)) == sizeof(v) ? v : UINT64_MAX;
  }
};

// Child exit codes: 0 success, else the number of the failed step.
int writerChild(const std::string& home, Line line) {
  EventLoop loop;
  auto c = KernelConnection::tryAttach(loop, home, "writer");
  if (!c) return 1;
  auto s = (*c)->sync();
  auto region = s.createRegion((*c)->bank(), 2);
  if (!region) return 2;
  auto mapping = s.mapRegion(*region, /*writable=*/true);  // writers map before sharing read-only
  if (!mapping || !mapping->writable()) return 3;
  std::memcpy(mapping->data(), "first words", 12);
  std::memcpy(mapping->data() + PAGE, "second page", 12);
  auto readOnly = s.copyCap(*region, Rights::READ | Rights::GRANT);
  if (!readOnly) return 4;
  const uint64_t readerPid = line.take();
  auto theirs = s.transferCap(*readOnly, static_cast<ProcessId>(readerPid), TransferMode::MOVE);
  if (!theirs) return 5;
  if (s.inspectCap(*readOnly).code() != Errc::INVALID_HANDLE) return 6;  // moved away
  line.put(theirs->handle);
  if (line.take() != 1) return 7;                   // the reader checked the first contents
  std::memcpy(mapping->data(), "later words", 12);  // the writer's mapping keeps writing
  line.put(2);
  if (line.take() != 3) return 8;  // the reader saw it
  // Revoke the region's derived caps: the reader's cap goes, its mapping stays.
  auto revoked = s.revokeCap(*region);
  if (!revoked || *revoked != 1) return 9;
  line.put(4);
  if (line.take() != 5) return 10;
  return 0;
}

int readerChild(const std::string& home, Line line) {
  EventLoop loop;
  auto c = KernelConnection::tryAttach(loop, home, "reader");
  if (!c) return 1;
  auto s = (*c)->sync();
  line.put((*c)->pid());
  const Cap<Region> region{line.take()};
  auto info = s.inspectCap(region);
  if (!info || info->type != ObjectType::REGION || info->rights != (Rights::READ | Rights::GRANT))
    return 2;
  if (s.mapRegion(region, /*writable=*/true).code() != Errc::PERMISSION_DENIED) return 3;
  auto mapping = s.mapRegion(region, /*writable=*/false);
  if (!mapping || mapping->writable() || mapping->size() != 2 * PAGE) return 4;
  if (std::memcmp(mapping->data(), "first words", 12) != 0) return 5;
  if (std::memcmp(mapping->data() + PAGE, "second page", 12) != 0) return 6;
  // Every way to write through a read-only holding fails.
  if (::mprotect(mapping->data(), PAGE, PROT_READ | PROT_WRITE) == 0) return 7;
  if (::pwrite(mapping->fd(), "x", 1, 0) == 1) return 8;
  void* w = ::mmap(nullptr, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, mapping->fd(), 0);
  if (w != MAP_FAILED) return 9;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/self/fd/%d", mapping->fd());
  const int reopened = ::open(path, O_RDWR);
  if (reopened >= 0) {
    const bool wrote = ::pwrite(reopened, "x", 1, 0) == 1;
    ::close(reopened);
    if (wrote) return 10;
  }
  line.put(1);
  if (line.take() != 2) return 11;
  if (std::memcmp(mapping->data(), "later words", 12) != 0) return 12;
  line.put(3);
  if (line.take() != 4) return 13;
  if (s.inspectCap(region).code() != Errc::INVALID_HANDLE) return 14;   // revoked
  if (std::memcmp(mapping->data(), "later words", 12) != 0) return 15;  // still mapped
  line.put(5);
  return 0;
}

TEST(KernelSharing, RegionTransferredToAnotherProcessIsReadThereAndStaysReadOnly) {
  KernelProcess kernel;
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  // Fork before this process makes any loop (kernel_fixture.h).
  const pid_t writer = ::fork();
  if (writer == 0) ::_exit(writerChild(kernel.home(), Line{sv[0]}));
  const pid_t reader = ::fork();
  if (reader == 0) ::_exit(readerChild(kernel.home(), Line{sv[1]}));
  ::close(sv[0]);
  ::close(sv[1]);
  Watchdog dog("region sharing", seconds(30), writer);
  int ws = 0;
  int rs = 0;
  ASSERT_EQ(::waitpid(writer, &ws, 0), writer);
  ASSERT_EQ(::waitpid(reader, &rs, 0), reader);
  EXPECT_TRUE(WIFEXITED(ws)) << "writer died by a signal";
  EXPECT_TRUE(WIFEXITED(rs)) << "reader died by a signal";
  EXPECT_EQ(WEXITSTATUS(ws), 0) << "writer failed at step " << WEXITSTATUS(ws);
  EXPECT_EQ(WEXITSTATUS(rs), 0) << "reader failed at step " << WEXITSTATUS(rs);
}

// Two connections of one process stand for a server and a client: the kernel treats each
// attach as its own process.
TEST(KernelSharing, BushelOpenAndCloseAreDeliveredToTheServerWithItsRings) {
  Watchdog dog("bushel events", seconds(30));
  KernelProcess kernel;
  EventLoop loop;
  auto server = std::move(KernelConnection::tryAttach(loop, kernel.home(), "server")).value();
  auto client = std::move(KernelConnection::tryAttach(loop, kernel.home(), "client")).value();
  auto service = server->sync().registerService(server->registry(), "echo", server->bank());
  ASSERT_TRUE(service.ok());
  EXPECT_EQ(server->sync().registerService(server->registry(), "echo", server->bank()).code(),
            Errc::ALREADY_EXISTS);
  auto koid = client->sync().lookupService(client->registry(), "echo");
  ASSERT_TRUE(koid.ok());
  EXPECT_EQ(*koid, server->sync().inspectCap(*service)->koid);
  EXPECT_EQ(client->sync().lookupService(client->registry(), "nope").code(), Errc::NOT_FOUND);

  auto bushel = client->sync().openBushel(client->registry(), "echo", client->bank());
  ASSERT_TRUE(bushel.ok());
  auto opened = server->sync().nextEvent();
  ASSERT_TRUE(opened.ok());
  EXPECT_EQ(opened->type, EventType::BUSHEL_OPENED);
  EXPECT_EQ(opened->peer, client->pid());
  EXPECT_EQ(opened->service, *koid);
  ASSERT_TRUE(opened->request.valid());
  ASSERT_TRUE(opened->reply.valid());
  auto rings = client->sync().bushelRings(*bushel);
  ASSERT_TRUE(rings.ok());
  // Both ends open the same rings: a frame the client sends arrives at the server.
  auto clientReq = Channel::openShared(std::move(rings->request));
  auto serverReq = Channel::openShared(std::move(opened->request));
  ASSERT_TRUE(clientReq.ok());
  ASSERT_TRUE(serverReq.ok());
  auto tx = (*clientReq)->attachSender();
  auto rx = (*serverReq)->attachReceiver();
  ASSERT_TRUE(tx.ok());
  ASSERT_TRUE(rx.ok());
  const char hello[8] = "hello";
  ASSERT_TRUE(tx->trySend(std::as_bytes(std::span(hello))).ok());
  auto frame = rx->tryReceive();
  ASSERT_TRUE(frame.ok());
  EXPECT_EQ(std::memcmp(frame->payload.data(), "hello", 6), 0);
  rx->release();

  // The client goes away: the server is told, and the bushel's pages go back.
  const Koid bushelKoid = opened->bushel;
  client.reset();
  auto closed = server->sync().nextEvent();
  ASSERT_TRUE(closed.ok());
  EXPECT_EQ(closed->type, EventType::BUSHEL_CLOSED);
  EXPECT_EQ(closed->bushel, bushelKoid);
  EXPECT_TRUE(
      agate::testing::eventually([&] { return server->sync().listProcesses()->size() == 1; }));
}

TEST(KernelSharing, AServiceThatGoesTellsItsClients) {
  Watchdog dog("service gone", seconds(30));
  KernelProcess kernel;
  EventLoop loop;
  auto server = std::move(KernelConnection::tryAttach(loop, kernel.home(), "server")).value();
  auto client = std::move(KernelConnection::tryAttach(loop, kernel.home(), "client")).value();
  ASSERT_TRUE(server->sync().registerService(server->registry(), "svc", server->bank()).ok());
  auto bushel = client->sync().openBushel(client->registry(), "svc", client->bank());
  ASSERT_TRUE(bushel.ok());
  ASSERT_EQ(server->sync().nextEvent()->type, EventType::BUSHEL_OPENED);
  server.reset();  // the server dies: its service goes
  auto gone = client->sync().nextEvent();
  ASSERT_TRUE(gone.ok());
  EXPECT_EQ(gone->type, EventType::SERVICE_GONE);
  auto closed = client->sync().nextEvent();
  ASSERT_TRUE(closed.ok());
  EXPECT_EQ(closed->type, EventType::BUSHEL_CLOSED);
  EXPECT_EQ(client->sync().inspectCap(*bushel).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(client->sync().lookupService(client->registry(), "svc").code(), Errc::NOT_FOUND);
}

TEST(KernelSharing, GrantRegistryNeedsGrantAndNoMoreRightsThanTheCallerHas) {
  Watchdog dog("grant registry", seconds(30));
  KernelProcess kernel;
  EventLoop loop;
  auto a = std::move(KernelConnection::tryAttach(loop, kernel.home(), "a")).value();
  auto b = std::move(KernelConnection::tryAttach(loop, kernel.home(), "b")).value();
  auto readOnly = a->sync().copyCap(a->registry(), Rights::READ);
  ASSERT_TRUE(readOnly.ok());
  EXPECT_EQ(a->sync().grantRegistry(*readOnly, b->pid(), Rights::READ).code(),
            Errc::PERMISSION_DENIED);
  EXPECT_EQ(a->sync().grantRegistry(a->registry(), b->pid(), Rights::ALL).code(),
            Errc::PERMISSION_DENIED);
  EXPECT_EQ(a->sync().grantRegistry(capAs<Registry>(a->bank()), b->pid(), Rights::READ).code(),
            Errc::WRONG_TYPE);
  auto granted = a->sync().grantRegistry(a->registry(), b->pid(), Rights::READ);
  ASSERT_TRUE(granted.ok());
  auto info = b->sync().inspectCap(*granted);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->type, ObjectType::REGISTRY);
  EXPECT_EQ(info->rights, Rights::READ);
}

}  // namespace
}  // namespace agate::caps
