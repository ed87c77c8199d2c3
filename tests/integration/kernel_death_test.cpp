// kill -9 of a client at random points, over and over: each time the kernel notices (socket
// hang-up, pidfd), reclaims everything the process held, and tells the server its bushels are
// gone. After every death: the system bank's usage, the kernel's open descriptors and its memfd
// mappings are back to their baseline. Seeded, so a failing trial can be replayed.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "../support/watchdog.h"
#include "agate/caps/kernel_connection.h"
#include "kernel_fixture.h"

namespace agate::caps {
namespace {

using agate::testing::KernelProcess;
using agate::testing::Watchdog;
using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr int TRIALS = 120;
constexpr const char* SERVICE = "victim-svc";

// A client that never stops: banks, regions (mapped and written), copies, bushels to the
// server, destroys, and batches of calls left in flight. It dies by SIGKILL only.
Promise<void> burst(KernelConnection& c, int n) {
  std::vector<Promise<Cap<SpaceBank>>> calls;
  for (int i = 0; i < n; ++i) calls.push_back(c.copyCap(c.bank(), Rights::READ));
  for (auto& p : calls) (void)co_await p;
  co_return {};
}

// `ready` gets one byte once the victim is attached and holds a bushel to the server.
[[noreturn]] void churn(const std::string& home, uint64_t seed, int ready) {
  EventLoop loop;
  auto attached = KernelConnection::tryAttach(loop, home, "victim");
  if (!attached) ::_exit(2);
  KernelConnection& c = **attached;
  auto s = c.sync();
  std::mt19937_64 rng(seed);
  std::vector<Cap<SpaceBank>> banks{c.bank()};
  std::vector<MappedRegion> mappings;
  std::vector<BushelRings> rings;
  if (auto b = s.openBushel(c.registry(), SERVICE, c.bank())) {
    if (auto r = s.bushelRings(*b)) rings.push_back(std::move(*r));
  }
  const char byte = 'a';
  if (::write(ready, &byte, 1) != 1) ::_exit(3);
  for (;;) {
    Cap<SpaceBank> bank = banks[rng() % banks.size()];
    switch (rng() % 6) {
      case 0:
        if (auto b = s.createBank(bank, 64)) banks.push_back(*b);
        break;
      case 1:
        if (auto r = s.createRegion(bank, 1 + rng() % 4)) {
          if (auto m = s.mapRegion(*r, true)) {
            std::memset(m->data(), 0x42, m->size());
            mappings.push_back(std::move(*m));
          }
        }
        break;
      case 2:
        (void)s.copyCap(bank, Rights::READ | Rights::ALLOCATE);
        break;
      case 3:
        if (auto b = s.openBushel(c.registry(), SERVICE, bank)) {
          if (auto r = s.bushelRings(*b)) rings.push_back(std::move(*r));
        }
        break;
      case 4:
        if (banks.size() > 1) {
          const size_t i = 1 + rng() % (banks.size() - 1);
          (void)s.destroy(banks[i]);
          banks.erase(banks.begin() + static_cast<long>(i));
        }
        break;
      case 5:
        (void)loop.run(burst(c, 32));
        break;
    }
  }
}

// The server: registers SERVICE, then drains its events until told to stop (its control pipe
// closes), and reports how many bushels were opened to it and closed.
int serve(const std::string& home, int control, int report) {
  EventLoop loop;
  auto c = KernelConnection::tryAttach(loop, home, "server");
  if (!c) return 1;
  if (!(*c)->sync().registerService((*c)->registry(), SERVICE, (*c)->bank())) return 2;
  const char ready = 'r';
  if (::write(report, &ready, 1) != 1) return 3;
  uint64_t counts[2] = {0, 0};  // opened, closed
  for (;;) {
    auto e = loop.run(loop.deadline((*c)->nextEvent(), milliseconds(20)));
    if (e.ok()) {
      if (e->type == EventType::BUSHEL_OPENED) ++counts[0];
      if (e->type == EventType::BUSHEL_CLOSED) ++counts[1];
      continue;
    }
    if (e.code() != Errc::TIMED_OUT) return 4;
    pollfd pfd{control, POLLIN, 0};
    if (::poll(&pfd, 1, 0) == 1) break;  // end of file: stop
  }
  return ::write(report, counts, sizeof(counts)) == sizeof(counts) ? 0 : 5;
}

struct Books {
  uint64_t systemUsed = 0;
  uint64_t objects = 0;
  int kernelFds = 0;
  int kernelMaps = 0;
};

// Attaches an observer (this process holds no loop in between: children are forked from it),
// waits until only the observer and the server are attached, and reads the books.
bool readBooks(const KernelProcess& kernel, Books& out) {
  EventLoop loop;
  auto c = KernelConnection::tryAttach(loop, kernel.home(), "observer");
  if (!c) return false;
  const bool settled = agate::testing::eventually(
      [&] {
        auto procs = (*c)->sync().listProcesses();
        return procs && procs->size() == 2;
      },
      milliseconds(10000));
  if (!settled) return false;
  auto banks = (*c)->sync().listBanks();
  if (!banks || banks->empty()) return false;
  out.systemUsed = (*banks)[0].used;
  out.objects = 0;
  for (const BankInfo& b : *banks) out.objects += b.objects;
  out.kernelFds = kernel.openFds();
  out.kernelMaps = kernel.memfdMappings();
  return true;
}

TEST(KernelDeath, KillNineAtRandomPointsLeaksNothing) {
  KernelProcess kernel;
  int control[2];
  int report[2];
  ASSERT_EQ(::pipe2(control, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(report, O_CLOEXEC), 0);
  const pid_t server = ::fork();
  if (server == 0) {
    ::close(control[1]);
    ::_exit(serve(kernel.home(), control[0], report[1]));
  }
  ::close(control[0]);
  ::close(report[1]);
  Watchdog dog("kill -9 trials", seconds(150), server);
  char ready = 0;
  ASSERT_EQ(::read(report[0], &ready, 1), 1);

  Books baseline;
  ASSERT_TRUE(readBooks(kernel, baseline));
  std::mt19937_64 rng(20261123);
  for (int trial = 0; trial < TRIALS; ++trial) {
    const uint64_t seed = rng();
    int attached[2];
    ASSERT_EQ(::pipe2(attached, O_CLOEXEC), 0);
    const pid_t victim = ::fork();
    if (victim == 0) churn(kernel.home(), seed, attached[1]);
    ::close(attached[1]);
    // Even trials: at any time from the fork (often before the attach completes). Odd trials:
    // once the victim is attached with a bushel open, somewhere in its churn.
    if (trial % 2 == 1) {
      pollfd pfd{attached[0], POLLIN, 0};
      char byte = 0;
      ASSERT_TRUE(::poll(&pfd, 1, 10000) == 1 && ::read(attached[0], &byte, 1) == 1)
          << "trial " << trial << ": the victim did not attach";
    }
    ::close(attached[0]);
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 8000));
    ASSERT_EQ(::kill(victim, SIGKILL), 0);
    int status = 0;
    ASSERT_EQ(::waitpid(victim, &status, 0), victim);
    ASSERT_TRUE(WIFSIGNALED(status)) << "trial " << trial << " seed " << seed << ": the victim "
                                     << "exited on its own with " << WEXITSTATUS(status);
    Books now;
    ASSERT_TRUE(readBooks(kernel, now)) << "trial " << trial << " seed " << seed;
    ASSERT_EQ(now.systemUsed, baseline.systemUsed) << "trial " << trial << " seed " << seed;
    ASSERT_EQ(now.objects, baseline.objects) << "trial " << trial << " seed " << seed;
    ASSERT_EQ(now.kernelFds, baseline.kernelFds) << "trial " << trial << " seed " << seed;
    ASSERT_EQ(now.kernelMaps, baseline.kernelMaps) << "trial " << trial << " seed " << seed;
  }

  ::close(control[1]);  // the server stops and reports
  uint64_t counts[2] = {0, 0};
  ASSERT_EQ(::read(report[0], counts, sizeof(counts)), static_cast<ssize_t>(sizeof(counts)));
  int status = 0;
  ASSERT_EQ(::waitpid(server, &status, 0), server);
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(counts[0], counts[1]) << "every bushel opened to the server was closed";
  EXPECT_GT(counts[0], 0u) << "the victims opened bushels";
}

}  // namespace
}  // namespace agate::caps
