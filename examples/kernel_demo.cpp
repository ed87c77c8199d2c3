// agate-kernel-demo: two processes and a running agate-kernel (`agate up` first).
//
//   agate-kernel-demo [--home DIR]
//
// The writer attaches, builds a bank tree under its process bank (team -> project), creates a
// region charged to the project bank, maps it writable and writes a greeting. It then derives a
// READ-only copy of the region cap and transfers it to the reader, a second process that
// attached on its own. The reader maps the region read-only, prints what it finds, and shows that
// its cap cannot be turned into a writable mapping. Finally the writer prints the bank tree's
// accounting. Every step goes through the kernel's syscall rings (caps/).
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include "agate/caps/kernel_connection.h"
#include "agate/kernel/home.h"
#include "agate/runtime/event_loop.h"

namespace {

using agate::EventLoop;
using agate::Result;
using agate::caps::Cap;
using agate::caps::KernelConnection;
using agate::caps::Region;
using agate::caps::SpaceBank;

int fail(const char* who, const char* step, agate::Errc code, const KernelConnection* c) {
  std::fprintf(stderr, "%s: %s failed: %s%s%s\n", who, step, agate::errcName(code),
               c != nullptr && !c->lastErrorDetail().empty() ? ": " : "",
               c != nullptr ? c->lastErrorDetail().c_str() : "");
  return 1;
}

// An attach that failed: which home, and how to start a kernel there when none runs. One write,
// so that the two demo processes' lines do not interleave.
int failAttach(const char* who, const std::string& home, agate::Errc code) {
  std::string line =
      std::string(who) + ": attach to the kernel in " + home + " failed: " + agate::errcName(code);
  if (code == agate::Errc::DISCONNECTED) line += "; start one with `agate up --home " + home + "`";
  line += "\n";
  std::fputs(line.c_str(), stderr);
  return 1;
}

bool writeAll(int fd, const void* data, size_t n) {
  return ::write(fd, data, n) == static_cast<ssize_t>(n);
}
bool readAll(int fd, void* data, size_t n) {
  return ::read(fd, data, n) == static_cast<ssize_t>(n);
}

// The second process: attaches, says who it is, waits for a region cap, reads the region.
int reader(const std::string& home, int toWriter, int fromWriter) {
  EventLoop loop;
  auto conn = KernelConnection::tryAttach(loop, home, "demo-reader");
  if (!conn) return failAttach("reader", home, conn.code());
  KernelConnection& c = **conn;
  const agate::caps::ProcessId me = c.pid();
  if (!writeAll(toWriter, &me, sizeof(me))) return 1;
  uint64_t handle = 0;
  if (!readAll(fromWriter, &handle, sizeof(handle))) return 1;
  const Cap<Region> region{handle};

  Result<agate::caps::CapInfo> info = c.sync().inspectCap(region);
  if (!info) return fail("reader", "inspectCap", info.code(), &c);
  auto has = [&](agate::caps::Rights r) { return (info->rights & r) != agate::caps::Rights::NONE; };
  std::printf("reader (kernel pid %u): received a region cap with rights %s%s%s\n", me,
              has(agate::caps::Rights::READ) ? "R" : "", has(agate::caps::Rights::WRITE) ? "W" : "",
              has(agate::caps::Rights::GRANT) ? "G" : "");
  Result<agate::caps::MappedRegion> writable = c.sync().mapRegion(region, /*writable=*/true);
  std::printf("reader: a writable mapping is refused: %s\n",
              writable ? "NO (unexpected)" : agate::errcName(writable.code()));
  Result<agate::caps::MappedRegion> mapped = c.sync().mapRegion(region, /*writable=*/false);
  if (!mapped) return fail("reader", "mapRegion(read-only)", mapped.code(), &c);
  const char* text = reinterpret_cast<const char*>(mapped->data());
  std::printf("reader: the region says: \"%.*s\"\n",
              static_cast<int>(strnlen(text, mapped->size())), text);
  return writable ? 1 : 0;
}

int writer(const std::string& home, pid_t readerOs, int fromReader, int toReader) {
  EventLoop loop;
  auto conn = KernelConnection::tryAttach(loop, home, "demo-writer");
  if (!conn) return failAttach("writer", home, conn.code());
  KernelConnection& c = **conn;
  auto s = c.sync();

  Result<Cap<SpaceBank>> team = s.createBank(c.bank(), 64);
  if (!team) return fail("writer", "createBank(team)", team.code(), &c);
  Result<Cap<SpaceBank>> project = s.createBank(*team, 16);
  if (!project) return fail("writer", "createBank(project)", project.code(), &c);
  Result<Cap<Region>> region = s.createRegion(*project, 4);
  if (!region) return fail("writer", "createRegion", region.code(), &c);
  Result<Cap<Region>> tooBig = s.createRegion(*project, 64);
  std::printf("writer: a 64-page region in the 16-page project bank is refused: %s\n",
              tooBig ? "NO (unexpected)" : agate::errcName(tooBig.code()));

  Result<agate::caps::MappedRegion> mapped = s.mapRegion(*region, /*writable=*/true);
  if (!mapped) return fail("writer", "mapRegion(writable)", mapped.code(), &c);
  std::snprintf(reinterpret_cast<char*>(mapped->data()), mapped->size(),
                "hello from kernel pid %u (OS pid %d), written in place", c.pid(), ::getpid());

  agate::caps::ProcessId readerPid = 0;
  if (!readAll(fromReader, &readerPid, sizeof(readerPid))) return 1;
  Result<Cap<Region>> readOnly =
      s.copyCap(*region, agate::caps::Rights::READ | agate::caps::Rights::GRANT);
  if (!readOnly) return fail("writer", "copyCap(READ)", readOnly.code(), &c);
  Result<Cap<Region>> theirs = s.transferCap(*readOnly, readerPid, agate::caps::TransferMode::MOVE);
  if (!theirs) return fail("writer", "transferCap", theirs.code(), &c);
  std::printf(
      "writer (kernel pid %u): gave kernel pid %u a READ-only cap (READ|GRANT: no WRITE) to a "
      "4-page region\n",
      c.pid(), readerPid);
  const uint64_t handle = theirs->handle;
  if (!writeAll(toReader, &handle, sizeof(handle))) return 1;

  std::fflush(stdout);  // keep the two processes' lines in order
  int status = 0;
  ::waitpid(readerOs, &status, 0);
  const bool readerOk = WIFEXITED(status) && WEXITSTATUS(status) == 0;

  for (auto [name, bank] :
       {std::pair{"process", c.bank()}, std::pair{"team", *team}, std::pair{"project", *project}}) {
    Result<agate::caps::BankCredit> credit = s.readBank(bank);
    if (!credit) return fail("writer", "readBank", credit.code(), &c);
    std::printf("writer: bank %-8s used %3llu of %5llu pages\n", name,
                static_cast<unsigned long long>(credit->used),
                static_cast<unsigned long long>(credit->limit));
  }
  if (agate::Status destroyed = s.destroy(*team); !destroyed) {
    return fail("writer", "destroy(team)", destroyed.code(), &c);
  }
  Result<agate::caps::BankCredit> after = s.readBank(c.bank());
  if (after) {
    std::printf("writer: team bank destroyed with everything below it; process bank uses %llu\n",
                static_cast<unsigned long long>(after->used));
  }
  return readerOk ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string home;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--home") == 0 && i + 1 < argc) {
      home = argv[++i];
    } else if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::printf("usage: agate-kernel-demo [--home DIR]\n");
      return 0;
    } else {
      std::fprintf(stderr, "usage: agate-kernel-demo [--home DIR]\n");
      return 64;
    }
  }
  home = agate::kernel::resolveKernelHome(home);
  int up[2];
  int down[2];
  if (::pipe(up) != 0 || ::pipe(down) != 0) return 1;
  // The reader is forked before either process makes its event loop.
  const pid_t child = ::fork();
  if (child < 0) return 1;
  if (child == 0) {
    ::close(up[0]);
    ::close(down[1]);
    const int rc = reader(home, up[1], down[0]);
    std::fflush(stdout);  // _exit skips stdio's buffers
    ::_exit(rc);
  }
  ::close(up[1]);
  ::close(down[0]);
  const int rc = writer(home, child, up[0], down[1]);
  if (rc != 0) {
    ::kill(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
  }
  return rc;
}
