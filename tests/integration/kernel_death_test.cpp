// kill -9 at random points, over and over, of a client (the kernel reclaims everything it held
// and tells the server its bushels are gone) and of a server (its service is unregistered, every
// client gets SERVICE_GONE and BUSHEL_CLOSED, and everything the bushels and the server held is
// reclaimed). After every death: the system bank's usage, the object count, the kernel's open
// descriptors and its memfd mappings are back to their baseline. Seeded, so a failing trial can
// be replayed. And once, a server whose service another process's bank paid for: its death
// unregisters the service all the same, and the record goes back to that bank.
//
// Trial counts: CLIENT_TRIALS + SERVER_TRIALS (>= 100) in CI; AGATE_DEATH_TRIALS=N runs N of
// each instead (scripts/soak does, with thousands).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
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

constexpr int CLIENT_TRIALS = 120;
constexpr int SERVER_TRIALS = 80;
constexpr const char* SERVICE = "victim-svc";

// `ciCount`, or AGATE_DEATH_TRIALS when set (the soak run).
int trials(int ciCount) {
  const char* soak = std::getenv("AGATE_DEATH_TRIALS");
  if (soak == nullptr) return ciCount;
  const int n = std::atoi(soak);
  return n > 0 ? n : ciCount;
}

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
  bool serviceRegistered = false;
};

// Attaches an observer (this process holds no loop in between: children are forked from it),
// waits until only the observer and the one long-lived process (the server, or the client) are
// attached, and reads the books.
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
  auto service = (*c)->sync().lookupService((*c)->registry(), SERVICE);
  if (!service && service.code() != Errc::NOT_FOUND) return false;
  out.serviceRegistered = service.ok();
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

// One kill -9 trial: forks a victim that runs `body(fd)` (it writes a byte to `fd` once it
// reached the point `waitForSignal` waits for, and never returns), waits for that byte if asked,
// lets the victim run up to 8 ms more, kills it with SIGKILL and reaps it. Fails if the victim
// exited on its own. Call under ASSERT_NO_FATAL_FAILURE.
template <class Body>
void killNineAtRandomPoint(std::mt19937_64& rng, bool waitForSignal, const std::string& trial,
                           Body body) {
  int reached[2];
  ASSERT_EQ(::pipe2(reached, O_CLOEXEC), 0);
  const pid_t victim = ::fork();
  if (victim == 0) {
    body(reached[1]);
    ::_exit(99);  // not reached: body ends by SIGKILL only
  }
  ::close(reached[1]);
  if (waitForSignal) {
    pollfd pfd{reached[0], POLLIN, 0};
    char byte = 0;
    ASSERT_TRUE(::poll(&pfd, 1, 10000) == 1 && ::read(reached[0], &byte, 1) == 1)
        << trial << ": the victim did not reach its point";
  }
  ::close(reached[0]);
  std::this_thread::sleep_for(std::chrono::microseconds(rng() % 8000));
  ASSERT_EQ(::kill(victim, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(victim, &status, 0), victim);
  ASSERT_TRUE(WIFSIGNALED(status))
      << trial << ": the victim exited on its own with " << WEXITSTATUS(status);
}

// The books a death must leave as they were: the system bank's usage, the kernel's objects, its
// open descriptors and its memfd mappings.
void expectBooksBack(const Books& now, const Books& baseline, const std::string& trial) {
  ASSERT_EQ(now.systemUsed, baseline.systemUsed) << trial;
  ASSERT_EQ(now.objects, baseline.objects) << trial;
  ASSERT_EQ(now.kernelFds, baseline.kernelFds) << trial;
  ASSERT_EQ(now.kernelMaps, baseline.kernelMaps) << trial;
}

TEST(KernelDeath, KillNineOfAClientAtRandomPointsLeaksNothing) {
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
  const int count = trials(CLIENT_TRIALS);
  Watchdog dog("kill -9 client trials", seconds(60 + count), server);
  char ready = 0;
  ASSERT_EQ(::read(report[0], &ready, 1), 1);

  Books baseline;
  ASSERT_TRUE(readBooks(kernel, baseline));
  std::mt19937_64 rng(20261123);
  for (int trial = 0; trial < count; ++trial) {
    const uint64_t seed = rng();
    const std::string name = "trial " + std::to_string(trial) + " seed " + std::to_string(seed);
    // Even trials: at any time from the fork (often before the attach completes). Odd trials:
    // once the victim is attached with a bushel open, somewhere in its churn.
    ASSERT_NO_FATAL_FAILURE(killNineAtRandomPoint(
        rng, trial % 2 == 1, name, [&](int attached) { churn(kernel.home(), seed, attached); }));
    Books now;
    ASSERT_TRUE(readBooks(kernel, now)) << name;
    ASSERT_NO_FATAL_FAILURE(expectBooksBack(now, baseline, name));
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

// --- Servers ---------------------------------------------------------------------------------

// A server that never stops: registers SERVICE, takes the bushels clients open to it (holding
// their ring descriptors), and allocates banks, regions, notifications and event buffers. `ready`
// gets one byte once the first bushel from a client has arrived. It dies by SIGKILL only.
[[noreturn]] void serveUntilKilled(const std::string& home, uint64_t seed, int ready) {
  EventLoop loop;
  auto attached = KernelConnection::tryAttach(loop, home, "victim-server");
  if (!attached) ::_exit(2);
  KernelConnection& c = **attached;
  auto s = c.sync();
  // The previous server's name must have been unregistered at its death.
  if (!s.registerService(c.registry(), SERVICE, c.bank())) ::_exit(3);
  std::mt19937_64 rng(seed);
  std::vector<KernelEvent> bushels;
  std::vector<Cap<SpaceBank>> banks{c.bank()};
  std::vector<MappedRegion> mappings;
  std::vector<MappedNotification> notifications;
  bool told = false;
  for (;;) {
    auto e = loop.run(loop.deadline(c.nextEvent(), milliseconds(1)));
    if (e.ok() && e->type == EventType::BUSHEL_OPENED) {
      bushels.push_back(std::move(*e));
      if (!told) {
        const char byte = 'b';
        if (::write(ready, &byte, 1) != 1) ::_exit(4);
        told = true;
      }
    }
    Cap<SpaceBank> bank = banks[rng() % banks.size()];
    switch (rng() % 5) {
      case 0:
        if (auto b = s.createBank(bank, 64)) banks.push_back(*b);
        break;
      case 1:
        if (auto r = s.createRegion(bank, 1 + rng() % 4)) {
          if (auto m = s.mapRegion(*r, true)) mappings.push_back(std::move(*m));
        }
        break;
      case 2:
        if (auto n = s.createNotification(bank, rng() % 2 == 0)) {
          if (auto m = s.mapNotification(*n)) notifications.push_back(std::move(*m));
          if (auto b = s.createEventBuffer(bank, 1 + rng() % 128, *n))
            (void)s.mapEventBuffer(*b, true);
        }
        break;
      case 3:
        (void)s.mapBankCredit(bank);
        break;
      case 4:
        if (banks.size() > 1) {
          const size_t i = 1 + rng() % (banks.size() - 1);
          (void)s.destroy(banks[i]);
          banks.erase(banks.begin() + static_cast<long>(i));
        }
        break;
    }
  }
}

// The long-lived client: keeps up to 3 bushels open to whichever server is registered, and
// counts what the kernel tells it. When `control` closes it reports {opened, gone, closed}.
int openUntilTold(const std::string& home, int control, int report) {
  EventLoop loop;
  auto attached = KernelConnection::tryAttach(loop, home, "client");
  if (!attached) return 1;
  KernelConnection& c = **attached;
  auto s = c.sync();
  const char ready = 'r';
  if (::write(report, &ready, 1) != 1) return 2;
  uint64_t counts[3] = {0, 0, 0};  // opened, serviceGone, bushelClosed
  int live = 0;
  for (;;) {
    for (;;) {
      auto e = loop.run(loop.deadline(c.nextEvent(), milliseconds(1)));
      if (!e) {
        if (e.code() != Errc::TIMED_OUT) return 3;
        break;
      }
      if (e->type == EventType::SERVICE_GONE) ++counts[1];
      if (e->type == EventType::BUSHEL_CLOSED) {
        ++counts[2];
        --live;
      }
    }
    if (live < 3) {
      auto b = s.openBushel(c.registry(), SERVICE, c.bank());
      if (b.ok()) {
        ++counts[0];
        ++live;
      } else if (b.code() != Errc::NOT_FOUND) {
        return 4;
      }
    }
    pollfd pfd{control, POLLIN, 0};
    if (::poll(&pfd, 1, 0) == 1) break;  // end of file: stop
  }
  // The last server's events may still be on their way: take them before reporting.
  while (live > 0) {
    auto e = loop.run(loop.deadline(c.nextEvent(), milliseconds(2000)));
    if (!e) return 6;
    if (e->type == EventType::SERVICE_GONE) ++counts[1];
    if (e->type == EventType::BUSHEL_CLOSED) {
      ++counts[2];
      --live;
    }
  }
  // The last server's events may still be on their way: take them before reporting.
  while (live > 0) {
    auto e = loop.run(loop.deadline(c.nextEvent(), milliseconds(2000)));
    if (!e) return 6;
    if (e->type == EventType::SERVICE_GONE) ++counts[1];
    if (e->type == EventType::BUSHEL_CLOSED) {
      ++counts[2];
      --live;
    }
  }
  return ::write(report, counts, sizeof(counts)) == sizeof(counts) ? 0 : 5;
}

TEST(KernelDeath, KillNineOfAServerWithOpenBushelsLeaksNothingAndTellsItsClients) {
  KernelProcess kernel;
  int control[2];
  int report[2];
  ASSERT_EQ(::pipe2(control, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(report, O_CLOEXEC), 0);
  const pid_t client = ::fork();
  if (client == 0) {
    ::close(control[1]);
    ::_exit(openUntilTold(kernel.home(), control[0], report[1]));
  }
  ::close(control[0]);
  ::close(report[1]);
  const int count = trials(SERVER_TRIALS);
  Watchdog dog("kill -9 server trials", seconds(60 + 2 * count), client);
  char ready = 0;
  ASSERT_EQ(::read(report[0], &ready, 1), 1);

  Books baseline;
  ASSERT_TRUE(readBooks(kernel, baseline));
  ASSERT_FALSE(baseline.serviceRegistered);
  std::mt19937_64 rng(20261124);
  for (int trial = 0; trial < count; ++trial) {
    const uint64_t seed = rng();
    const std::string name = "trial " + std::to_string(trial) + " seed " + std::to_string(seed);
    // Most trials: once a client's bushel has reached the server, somewhere in its churn. Every
    // fourth: at any time from the fork (before, during or after it registers).
    ASSERT_NO_FATAL_FAILURE(killNineAtRandomPoint(rng, trial % 4 != 0, name, [&](int hasBushel) {
      serveUntilKilled(kernel.home(), seed, hasBushel);
    }));
    Books now;
    ASSERT_TRUE(readBooks(kernel, now)) << name;
    ASSERT_FALSE(now.serviceRegistered) << name;
    ASSERT_NO_FATAL_FAILURE(expectBooksBack(now, baseline, name));
  }

  ::close(control[1]);  // the client stops and reports
  uint64_t counts[3] = {0, 0, 0};
  ASSERT_EQ(::read(report[0], counts, sizeof(counts)), static_cast<ssize_t>(sizeof(counts)));
  int status = 0;
  ASSERT_EQ(::waitpid(client, &status, 0), client);
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_GT(counts[0], 0u) << "the client opened bushels";
  EXPECT_EQ(counts[1], counts[0]) << "SERVICE_GONE for every bushel whose server died";
  EXPECT_EQ(counts[2], counts[0]) << "BUSHEL_CLOSED for every bushel the client opened";
}

// A server whose service another process pays for: reports its ProcessId on `out`, reads the
// handle of the bank it was given from `in`, registers SERVICE paid from it, reports one byte,
// and serves (drains its events) until it is killed.
[[noreturn]] void serveFromALentBank(const std::string& home, int in, int out) {
  EventLoop loop;
  auto c = KernelConnection::tryAttach(loop, home, "lent-server");
  if (!c) ::_exit(1);
  const uint64_t pid = (*c)->pid();
  if (::write(out, &pid, sizeof(pid)) != sizeof(pid)) ::_exit(2);
  uint64_t bank = 0;
  if (::read(in, &bank, sizeof(bank)) != sizeof(bank)) ::_exit(3);
  if (!(*c)->sync().registerService((*c)->registry(), SERVICE, Cap<SpaceBank>{bank})) ::_exit(4);
  const char ready = 'r';
  if (::write(out, &ready, 1) != 1) ::_exit(5);
  for (;;) (void)loop.run(loop.deadline((*c)->nextEvent(), milliseconds(100)));
}

TEST(KernelDeath, KillNineOfAServerWhoseServiceAnotherProcessPaysForUnregistersItAtOnce) {
  KernelProcess kernel;
  int toServer[2];
  int fromServer[2];
  ASSERT_EQ(::pipe2(toServer, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(fromServer, O_CLOEXEC), 0);
  const pid_t server = ::fork();
  if (server == 0) serveFromALentBank(kernel.home(), toServer[0], fromServer[1]);
  ::close(toServer[0]);
  ::close(fromServer[1]);
  Watchdog dog("a lent-bank server's death", seconds(30), server);
  uint64_t serverPid = 0;
  ASSERT_EQ(::read(fromServer[0], &serverPid, sizeof(serverPid)),
            static_cast<ssize_t>(sizeof(serverPid)));

  // The payer makes its loop only now: the server is forked already (kernel_fixture.h).
  EventLoop loop;
  auto c = KernelConnection::tryAttach(loop, kernel.home(), "payer");
  ASSERT_TRUE(c.ok());
  auto s = (*c)->sync();
  auto lent = s.createBank((*c)->bank(), 50);
  ASSERT_TRUE(lent.ok());
  const uint64_t lentUsed = s.readBank(*lent)->used;
  auto inServer = s.transferCap(*lent, static_cast<ProcessId>(serverPid), TransferMode::COPY);
  ASSERT_TRUE(inServer.ok());
  ASSERT_EQ(::write(toServer[1], &inServer->handle, sizeof(uint64_t)),
            static_cast<ssize_t>(sizeof(uint64_t)));
  char ready = 0;
  ASSERT_EQ(::read(fromServer[0], &ready, 1), 1) << "the server did not register";
  ASSERT_TRUE(s.lookupService((*c)->registry(), SERVICE).ok());
  EXPECT_GT(s.readBank(*lent)->used, lentUsed) << "the lent bank pays for the registration";
  auto bushel = s.openBushel((*c)->registry(), SERVICE, (*c)->bank());
  ASSERT_TRUE(bushel.ok());

  ASSERT_EQ(::kill(server, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(server, &status, 0), server);
  ASSERT_TRUE(WIFSIGNALED(status)) << "the server exited on its own: " << WEXITSTATUS(status);
  // The payer hears of it as of any server's death; by then the name is free.
  auto gone = loop.run(loop.deadline((*c)->nextEvent(), seconds(10)));
  ASSERT_TRUE(gone.ok()) << errcName(gone.code());
  EXPECT_EQ(gone->type, EventType::SERVICE_GONE);
  EXPECT_EQ(gone->peer, static_cast<ProcessId>(serverPid));
  auto closed = loop.run(loop.deadline((*c)->nextEvent(), seconds(10)));
  ASSERT_TRUE(closed.ok()) << errcName(closed.code());
  EXPECT_EQ(closed->type, EventType::BUSHEL_CLOSED);
  EXPECT_EQ(s.lookupService((*c)->registry(), SERVICE).code(), Errc::NOT_FOUND);
  EXPECT_EQ(s.openBushel((*c)->registry(), SERVICE, (*c)->bank()).code(), Errc::NOT_FOUND);
  EXPECT_EQ(s.inspectCap(*bushel).code(), Errc::INVALID_HANDLE);
  // The service's record went back to the bank that paid, which the payer still holds; the
  // name can be taken again at once.
  EXPECT_EQ(s.readBank(*lent)->used, lentUsed);
  EXPECT_TRUE(s.registerService((*c)->registry(), SERVICE, *lent).ok());
  ::close(toServer[1]);
  ::close(fromServer[0]);
}

}  // namespace
}  // namespace agate::caps
