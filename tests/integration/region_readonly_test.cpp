// A read-only region cap stays read-only in another process: a forked child receives the
// descriptor the kernel hands a READ-only holder (over SCM_RIGHTS, as the daemon will) and tries
// every way to write the shared pages; each must fail, while the writer's mapping (made before
// the seal) keeps writing and the child sees it.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

#include <gtest/gtest.h>

#include "../support/watchdog.h"
#include "agate/kernel/kernel.h"

namespace agate::kernel {
namespace {

constexpr size_t BYTES = 2 * PAGE_BYTES;

bool sendFd(int sock, int fd) {
  char byte = 'f';
  iovec iov{&byte, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
  return ::sendmsg(sock, &msg, 0) == 1;
}

int receiveFd(int sock) {
  char byte = 0;
  iovec iov{&byte, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  if (::recvmsg(sock, &msg, 0) != 1) return -1;
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  if (!c || c->cmsg_type != SCM_RIGHTS) return -1;
  int fd = -1;
  std::memcpy(&fd, CMSG_DATA(c), sizeof(int));
  return fd;
}

// The child: returns a bit per upgrade path that wrongly succeeded (0: all refused).
int tryEveryUpgrade(int sock) {
  int fails = 0;
  const int fd = receiveFd(sock);
  if (fd < 0) return 1 << 30;
  // 1. A writable shared mapping.
  void* p = ::mmap(nullptr, BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p != MAP_FAILED) fails |= 1 << 0;
  // 2. A read mapping, then mprotect it writable.
  auto* r = static_cast<char*>(::mmap(nullptr, BYTES, PROT_READ, MAP_SHARED, fd, 0));
  if (r == MAP_FAILED) return 1 << 29;
  if (::mprotect(r, BYTES, PROT_READ | PROT_WRITE) == 0) fails |= 1 << 1;
  // 3. Re-open through /proc with O_RDWR, then map writable and write().
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
  const int reopened = ::open(path, O_RDWR);
  if (reopened >= 0) {
    void* q = ::mmap(nullptr, BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, reopened, 0);
    if (q != MAP_FAILED) fails |= 1 << 2;
    if (::pwrite(reopened, "z", 1, 0) == 1) fails |= 1 << 3;
    ::close(reopened);
  }
  // 4. write() / pwrite() on the received descriptor.
  if (::pwrite(fd, "z", 1, 0) == 1) fails |= 1 << 4;
  if (::write(fd, "z", 1) == 1) fails |= 1 << 5;
  // 5. Truncate: shrink (SIGBUS for the others) or grow.
  if (::ftruncate(fd, 0) == 0) fails |= 1 << 6;
  if (::ftruncate(fd, BYTES * 2) == 0) fails |= 1 << 7;
  // 6. Punch a hole (zeroes the shared pages) or allocate.
  if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, PAGE_BYTES) == 0)
    fails |= 1 << 8;
  // 7. Seals: adding any (F_SEAL_SEAL forbids it); none can be removed (no such fcntl exists).
  if (::fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE) == 0) fails |= 1 << 9;
  const int seals = ::fcntl(fd, F_GET_SEALS);
  const int want = F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL;
  if ((seals & want) != want) fails |= 1 << 10;
  // 8. A private writable mapping is allowed, but copy-on-write: the shared pages never change.
  auto* priv =
      static_cast<char*>(::mmap(nullptr, BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0));
  if (priv != MAP_FAILED) {
    priv[0] = 'P';
    if (r[0] == 'P') fails |= 1 << 11;
  }
  // The contents are the writer's, before and after the writer writes again.
  if (std::memcmp(r, "hello", 5) != 0) fails |= 1 << 12;
  char go = 0;
  if (::write(sock, "r", 1) != 1 || ::read(sock, &go, 1) != 1) return 1 << 28;
  if (std::memcmp(r, "world", 5) != 0) fails |= 1 << 13;
  return fails;
}

TEST(RegionReadOnlyTest, ReadOnlyHolderInAnotherProcessCannotWriteByAnyPath) {
  Kernel k;
  auto w0 = k.tryAttachProcess(100);
  auto r0 = k.tryAttachProcess(100);
  ASSERT_TRUE(w0.ok() && r0.ok());
  const Attached writer = *w0;
  const Attached reader = *r0;
  auto region = k.tryCreateRegion(writer.pid, writer.bank, BYTES / PAGE_BYTES);
  ASSERT_TRUE(region.ok());
  auto w = k.tryMapRegion(writer.pid, *region, true);
  ASSERT_TRUE(w.ok());
  auto* wp = static_cast<char*>(
      ::mmap(nullptr, BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, w->fd.get(), 0));
  ASSERT_NE(wp, MAP_FAILED);
  std::memcpy(wp, "hello", 5);
  auto ro = k.tryCopyCap(writer.pid, *region, Rights::READ | Rights::GRANT);
  ASSERT_TRUE(ro.ok());
  auto given = k.tryTransferCap(writer.pid, *ro, reader.pid, TransferMode::MOVE);
  ASSERT_TRUE(given.ok());
  auto r = k.tryMapRegion(reader.pid, *given, false);
  ASSERT_TRUE(r.ok());
  ASSERT_FALSE(r->writable);

  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(sv[0]);
    ::alarm(20);  // the child's own watchdog
    const int fails = tryEveryUpgrade(sv[1]);
    (void)!::write(sv[1], &fails, sizeof(fails));  // which paths wrongly succeeded
    ::_exit(fails == 0 ? 0 : 1);
  }
  ::close(sv[1]);
  agate::testing::Watchdog watchdog("region read-only child", std::chrono::seconds(30), child);
  ASSERT_TRUE(sendFd(sv[0], r->fd.get()));
  char ready = 0;
  ASSERT_EQ(::read(sv[0], &ready, 1), 1) << "child failed before the second check";
  std::memcpy(wp, "world", 5);  // the pre-seal writable mapping still writes
  ASSERT_EQ(::write(sv[0], "g", 1), 1);
  int fails = -1;
  EXPECT_EQ(::read(sv[0], &fails, sizeof(fails)), static_cast<ssize_t>(sizeof(fails)));
  EXPECT_EQ(fails, 0) << "bit i set: upgrade path i succeeded (see tryEveryUpgrade)";
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
  EXPECT_EQ(wp[0], 'w') << "the child's private copy never reached the shared pages";
  ::munmap(wp, BYTES);
  ::close(sv[0]);
}

}  // namespace
}  // namespace agate::kernel
