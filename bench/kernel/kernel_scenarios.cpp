// Suite `kernel`: agate-kernel's syscall path, measured against a real daemon process.
//
// Every scenario starts its own agate-kernel (the binary built beside this driver) on a fresh
// temporary home and talks to it through agate::caps, as any process would. The driver process
// forks children only while it holds no EventLoop (a forked child would inherit it as its current
// loop), so each scenario makes its loop after the daemon started and drops it before returning.
#include "kernel/kernel_scenarios.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "agate/caps/kernel_connection.h"
#include "support/kernel_daemon.h"
#include "support/latency.h"
#include "support/round_trips.h"  // secondsToNs
#include "support/timing.h"

namespace agate::bench::kernel {
namespace {

using caps::Cap;
using caps::KernelConnection;
using caps::Rights;
using caps::SpaceBank;

using agate::bench::Daemon;

constexpr int BATCH = 128;  // calls in flight per round of the throughput scenarios

// Polled: the daemon never parks (--poll-us huge) and the client spins on its completion ring.
// Parked: the daemon sleeps as soon as it is idle and the client parks at once.
enum class Waiting { POLLED, PARKED };

AsyncWaitPolicy completionWait(Waiting w) {
  AsyncWaitPolicy p;
  p.spinIterations = w == Waiting::POLLED ? 200'000 : 0;  // ~ms of spinning, then park
  return p;
}
uint32_t daemonPoll(Waiting w) { return w == Waiting::POLLED ? 100'000'000 : 0; }

Status syscallRtt(const Scenario& scenario, const RunOptions& o, Report& report, Waiting w,
                  std::string_view floor) {
  auto daemon = Daemon::tryStart(AGATE_KERNEL_BINARY, daemonPoll(w));
  if (!daemon) return daemon.error();
  EventLoop loop;
  auto conn = KernelConnection::tryAttach(loop, (*daemon)->home(), "bench", std::chrono::seconds(5),
                                          completionWait(w));
  if (!conn) return conn.error();
  KernelConnection& c = **conn;
  const Cap<SpaceBank> bank = c.bank();
  const size_t capacity =
      std::clamp<size_t>(static_cast<size_t>(o.measureSeconds * 1e6), 10'000, 2'000'000);
  std::vector<uint64_t> storage(SampleBuffer::bytesFor(capacity) / sizeof(uint64_t) + 1);
  SampleBuffer* samples = SampleBuffer::createAt(storage.data(), capacity);
  auto once = [&] { return c.sync().readBank(bank).ok(); };
  const uint64_t warmEnd = nowNs() + secondsToNs(o.warmupSeconds);
  while (nowNs() < warmEnd)
    if (!once()) return Error(Errc::FAILED, "readBank failed while warming up");
  const uint64_t end = nowNs() + secondsToNs(o.measureSeconds);
  uint64_t t0 = nowNs();
  for (;;) {
    if (!once()) return Error(Errc::FAILED, "readBank failed");
    const uint64_t t1 = nowNs();
    if (!samples->tryRecord(t1 - t0) || t1 >= end) break;
    t0 = t1;
  }
  const LatencySummary summary = summarize(samples->samples());
  report.addLatency(scenario.name, scenario.name, scenario.unit, summary, floor);
  report.addPlacement(scenario.name, {::sched_getcpu()});  // the client (this process)
  return {};
}

Status rttPolled(const Scenario& s, const RunOptions& o, Report& r) {
  return syscallRtt(s, o, r, Waiting::POLLED, "floor_cacheline_rtt_ns");
}
Status rttParked(const Scenario& s, const RunOptions& o, Report& r) {
  return syscallRtt(s, o, r, Waiting::PARKED, "floor_futex_rtt_ns");
}

// Rounds of BATCH calls in flight; `round` issues them and awaits all, returning the operations
// it made. The figure is the median over o.repetitions windows of operations per second.
template <class Round>
Status throughput(const Scenario& scenario, const RunOptions& o, Report& report, Round round) {
  auto daemon = Daemon::tryStart(AGATE_KERNEL_BINARY, daemonPoll(Waiting::POLLED));
  if (!daemon) return daemon.error();
  EventLoop loop;
  auto conn = KernelConnection::tryAttach(loop, (*daemon)->home(), "bench", std::chrono::seconds(5),
                                          completionWait(Waiting::POLLED));
  if (!conn) return conn.error();
  KernelConnection& c = **conn;
  const uint64_t warmEnd = nowNs() + secondsToNs(o.warmupSeconds);
  while (nowNs() < warmEnd) {
    Result<uint64_t> ops = loop.run(round(c));
    if (!ops) return ops.error();
  }
  std::vector<double> windows;
  const uint64_t window = secondsToNs(o.measureSeconds / o.repetitions);
  uint64_t total = 0;
  for (int rep = 0; rep < o.repetitions; ++rep) {
    uint64_t ops = 0;
    const uint64_t t0 = nowNs();
    uint64_t t1 = t0;
    while (t1 - t0 < window) {
      Result<uint64_t> n = loop.run(round(c));
      if (!n) return n.error();
      ops += *n;
      t1 = nowNs();
    }
    total += ops;
    windows.push_back(static_cast<double>(ops) * 1e9 / static_cast<double>(t1 - t0));
  }
  std::sort(windows.begin(), windows.end());
  report.add(Figure{std::string(scenario.name),
                    windows[windows.size() / 2],
                    std::string(scenario.unit),
                    std::string(scenario.name),
                    total,
                    {}});
  report.addPlacement(scenario.name, {::sched_getcpu()});  // the client (this process)
  return {};
}

Promise<uint64_t> readBankRound(KernelConnection& c) {
  std::vector<Promise<caps::BankCredit>> calls;
  calls.reserve(BATCH);
  for (int i = 0; i < BATCH; ++i) calls.push_back(c.readBank(c.bank()));
  for (auto& p : calls)
    if (Result<caps::BankCredit> r = co_await p; !r) co_return r.error();
  co_return uint64_t{BATCH};
}

Promise<uint64_t> copyDeleteRound(KernelConnection& c) {
  std::vector<Promise<Cap<SpaceBank>>> copies;
  copies.reserve(BATCH);
  for (int i = 0; i < BATCH; ++i) copies.push_back(c.copyCap(c.bank(), Rights::READ));
  std::vector<Promise<void>> deletes;
  deletes.reserve(BATCH);
  for (auto& p : copies) {
    Result<Cap<SpaceBank>> cap = co_await p;
    if (!cap) co_return cap.error();
    deletes.push_back(c.deleteCap(*cap));
  }
  for (auto& p : deletes)
    if (Status s = co_await p; !s) co_return s.error();
  co_return uint64_t{2 * BATCH};
}

Promise<uint64_t> bankAllocFreeRound(KernelConnection& c) {
  std::vector<Promise<Cap<SpaceBank>>> banks;
  banks.reserve(BATCH);
  for (int i = 0; i < BATCH; ++i) banks.push_back(c.createBank(c.bank(), 4));
  std::vector<Promise<void>> destroys;
  destroys.reserve(BATCH);
  for (auto& p : banks) {
    Result<Cap<SpaceBank>> bank = co_await p;
    if (!bank) co_return bank.error();
    destroys.push_back(c.destroy(*bank));
  }
  for (auto& p : destroys)
    if (Status s = co_await p; !s) co_return s.error();
  co_return uint64_t{2 * BATCH};
}

Status batched(const Scenario& s, const RunOptions& o, Report& r) {
  return throughput(s, o, r, readBankRound);
}
Status copyDelete(const Scenario& s, const RunOptions& o, Report& r) {
  return throughput(s, o, r, copyDeleteRound);
}
Status bankAllocFree(const Scenario& s, const RunOptions& o, Report& r) {
  return throughput(s, o, r, bankAllocFreeRound);
}

// A holder of 10k caps dies (SIGKILL); the time until the kernel lists it no more, i.e. until
// its CSpace, bank and everything charged to it are reclaimed. Median of o.repetitions deaths.
constexpr int RECLAIM_CAPS = 10'000;

[[noreturn]] void holdCaps(const std::string& home, int ready) {
  EventLoop loop;
  auto conn = KernelConnection::tryAttach(loop, home, "holder");
  if (!conn) ::_exit(2);
  KernelConnection& c = **conn;
  for (int made = 0; made < RECLAIM_CAPS;) {
    const int n = std::min(BATCH, RECLAIM_CAPS - made);
    auto round = [](KernelConnection& k, int count) -> Promise<void> {
      std::vector<Promise<Cap<SpaceBank>>> calls;
      for (int i = 0; i < count; ++i) calls.push_back(k.copyCap(k.bank(), Rights::READ));
      for (auto& p : calls)
        if (auto r = co_await p; !r) co_return r.error();
      co_return {};
    };
    if (!loop.run(round(c, n))) ::_exit(3);
    made += n;
  }
  const char byte = 'r';
  if (::write(ready, &byte, 1) != 1) ::_exit(4);
  for (;;) ::pause();
}

Status reclaim(const Scenario& scenario, const RunOptions& o, Report& report) {
  auto daemon = Daemon::tryStart(AGATE_KERNEL_BINARY, daemonPoll(Waiting::PARKED));
  if (!daemon) return daemon.error();
  std::vector<double> ms;
  const int reps = o.quick ? 1 : o.repetitions;
  for (int rep = 0; rep < reps; ++rep) {
    int ready[2];
    if (::pipe2(ready, O_CLOEXEC) != 0) return Error::fromErrno(errno, "pipe failed");
    const pid_t holder = ::fork();  // no EventLoop exists in this process here
    if (holder == 0) holdCaps((*daemon)->home(), ready[1]);
    ::close(ready[1]);
    pollfd pfd{ready[0], POLLIN, 0};
    char byte = 0;
    const bool up = ::poll(&pfd, 1, 30000) == 1 && ::read(ready[0], &byte, 1) == 1;
    ::close(ready[0]);
    if (!up) {
      ::kill(holder, SIGKILL);
      ::waitpid(holder, nullptr, 0);
      return Error(Errc::FAILED, "the holder did not make its caps");
    }
    double elapsed = -1;
    {
      EventLoop loop;
      auto conn =
          KernelConnection::tryAttach(loop, (*daemon)->home(), "observer", std::chrono::seconds(5),
                                      completionWait(Waiting::POLLED));
      if (!conn) return conn.error();
      const uint64_t t0 = nowNs();
      ::kill(holder, SIGKILL);
      for (;;) {
        auto procs = (*conn)->sync().listProcesses();
        if (!procs) return procs.error();
        if (procs->size() == 1) break;
        if (nowNs() - t0 > secondsToNs(10)) return Error(Errc::TIMED_OUT, "never reclaimed");
      }
      elapsed = static_cast<double>(nowNs() - t0) / 1e6;
    }
    ::waitpid(holder, nullptr, 0);
    ms.push_back(elapsed);
  }
  std::sort(ms.begin(), ms.end());
  report.add(Figure{std::string(scenario.name),
                    ms[ms.size() / 2],
                    std::string(scenario.unit),
                    std::string(scenario.name),
                    ms.size(),
                    {}});
  report.addPlacement(scenario.name, {::sched_getcpu()});  // the observer (this process)
  return {};
}

const Scenario SCENARIOS[] = {
    {"syscall_rtt_polled_ns", "ns",
     "one readBank call and its completion through agate::caps (sync form), daemon polling its "
     "rings and the caller spinning on its completion ring",
     rttPolled},
    {"syscall_rtt_parked_ns", "ns",
     "the same with both sides asleep between calls: the daemon in epoll on the submission "
     "doorbell's eventfd, the caller parked on the completion doorbell",
     rttParked},
    {"syscall_batched_ops_per_s", "ops/s",
     "readBank calls, 128 in flight per round (one doorbell per round), awaited together; "
     "daemon polling",
     batched},
    {"cap_copy_delete_ops_per_s", "ops/s",
     "copyCap then deleteCap of each copy, 128 in flight per round; both counted", copyDelete},
    {"bank_alloc_free_ops_per_s", "ops/s",
     "createBank (limit 4) then destroy, 128 in flight per round; both counted", bankAllocFree},
    {"reclaim_10k_caps_ms", "ms",
     "SIGKILL of a process holding 10k caps until the kernel no longer lists it (death noticed "
     "through its pidfd, CSpace and bank reclaimed); median of the repetitions",
     reclaim},
};

}  // namespace

std::span<const Scenario> kernelScenarios() { return SCENARIOS; }

}  // namespace agate::bench::kernel
