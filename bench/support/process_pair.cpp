#include "support/process_pair.h"

#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <new>
#include <utility>

#include "support/timing.h"

namespace agate::bench {

Result<SharedMapping> SharedMapping::tryCreate(size_t bytes) {
  AGATE_REQUIRE(bytes > 0, "empty shared mapping");
  const auto page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t size = (bytes + page - 1) / page * page;
  void* p =
      mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) return Error::fromErrno(errno, "mmap of shared benchmark memory");
  std::memset(p, 0, size);  // MAP_POPULATE is a hint; touching each page is the guarantee
  return SharedMapping(p, size);
}

SharedMapping::SharedMapping(SharedMapping&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

SharedMapping& SharedMapping::operator=(SharedMapping&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) munmap(data_, size_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

SharedMapping::~SharedMapping() {
  if (data_ != nullptr) munmap(data_, size_);
}

namespace {

// Shared between the driver and both children; lives in its own mapping.
struct Control {
  std::atomic<uint32_t> arrived{0};  // children that reached the start barrier
  std::atomic<int32_t> cpu[2] = {-1, -1};
};

// Exit codes of a child that failed before or around its body.
constexpr int EXIT_PARENT_GONE = 120;
constexpr int EXIT_PIN_FAILED = 121;

[[noreturn]] void runChild(Control* control, int index, int cpu, pid_t driver,
                           const PartyBody& body) {
  // A driver that dies (killed, crashed) must not leave a spinning orphan behind.
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != driver) _exit(EXIT_PARENT_GONE);  // it died before prctl took effect
  if (cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) {
      std::fprintf(stderr, "bench: cannot pin party %c to cpu %d: %s\n", 'A' + index, cpu,
                   std::strerror(errno));
      _exit(EXIT_PIN_FAILED);
    }
  }
  // Start barrier. acq_rel/acquire: whatever the driver wrote to shared memory before forking is
  // visible anyway; the ordering makes each party's setup happen-before the other's start.
  control->arrived.fetch_add(1, std::memory_order_acq_rel);
  SpinWait spin;
  while (control->arrived.load(std::memory_order_acquire) < 2) spin.once();

  const int rc = body();
  control->cpu[index].store(sched_getcpu(), std::memory_order_relaxed);  // read after waitpid
  std::fflush(nullptr);
  _exit(rc);  // no atexit handlers, no destructors of the driver's objects in the child
}

void describeExit(char party, int status) {
  if (WIFEXITED(status)) {
    std::fprintf(stderr, "bench: party %c exited with code %d\n", party, WEXITSTATUS(status));
  } else if (WIFSIGNALED(status)) {
    std::fprintf(stderr, "bench: party %c was killed by signal %d (%s)\n", party, WTERMSIG(status),
                 strsignal(WTERMSIG(status)));
  }
}

}  // namespace

Result<PairPlacement> runPair(const PairOptions& options, const PartyBody& partyA,
                              const PartyBody& partyB) {
  auto mapping = SharedMapping::tryCreate(sizeof(Control));
  if (!mapping) return mapping.error();
  auto* control = new (mapping->data()) Control{};

  std::fflush(nullptr);  // or buffered output would be written once per process
  const pid_t driver = getpid();
  pid_t pids[2] = {-1, -1};
  const PartyBody* bodies[2] = {&partyA, &partyB};
  const int cpus[2] = {options.cpuA, options.cpuB};
  for (int i = 0; i < 2; ++i) {
    pids[i] = fork();
    if (pids[i] == 0) runChild(control, i, cpus[i], driver, *bodies[i]);
    if (pids[i] < 0) {
      const int e = errno;
      if (i == 1) {
        kill(pids[0], SIGKILL);
        waitpid(pids[0], nullptr, 0);
      }
      return Error::fromErrno(e, "fork of a benchmark party");
    }
  }

  // Watchdog: sleep until a child exits (its pidfd becomes readable) or the deadline passes, so the
  // driver takes no CPU from the parties; kill both on the deadline or when one of them fails.
  int pidfds[2];
  for (int i = 0; i < 2; ++i) pidfds[i] = static_cast<int>(syscall(SYS_pidfd_open, pids[i], 0));
  const auto deadline = std::chrono::steady_clock::now() + options.watchdog;
  bool done[2] = {false, false};
  Error failure{};
  while (!(done[0] && done[1])) {
    pollfd fds[2];
    nfds_t n = 0;
    bool havePidfds = true;
    for (int i = 0; i < 2; ++i) {
      if (done[i]) continue;
      if (pidfds[i] < 0) havePidfds = false;
      fds[n++] = pollfd{pidfds[i], POLLIN, 0};  // a negative fd is ignored by poll
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    // Without pidfds (old kernel) fall back to looking every 10 ms.
    const int timeoutMs = static_cast<int>(std::max<int64_t>(
        0, havePidfds ? left.count() + 1 : std::min<int64_t>(left.count() + 1, 10)));
    poll(fds, n, timeoutMs);

    for (int i = 0; i < 2; ++i) {
      if (done[i]) continue;
      int status = 0;
      const pid_t r = waitpid(pids[i], &status, WNOHANG);
      if (r == 0) continue;
      done[i] = true;
      if (r < 0) {
        failure = Error::fromErrno(errno, "waitpid on a benchmark party");
      } else if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
        describeExit(static_cast<char>('A' + i), status);
        if (failure.code == Errc::OK) failure = Error(Errc::FAILED, "a benchmark party failed");
      }
    }
    if (done[0] && done[1]) break;
    if (failure.code == Errc::OK && std::chrono::steady_clock::now() >= deadline) {
      std::fprintf(stderr, "bench: watchdog expired after %lld ms; killing both parties\n",
                   static_cast<long long>(options.watchdog.count()));
      failure = Error(Errc::TIMED_OUT, "benchmark parties outlived the watchdog");
    }
    if (failure.code != Errc::OK) {
      for (int i = 0; i < 2; ++i) {
        if (done[i]) continue;
        kill(pids[i], SIGKILL);
        waitpid(pids[i], nullptr, 0);
        done[i] = true;
      }
    }
  }
  for (int fd : pidfds) {
    if (fd >= 0) close(fd);
  }
  if (failure.code != Errc::OK) return failure;
  return PairPlacement{control->cpu[0].load(std::memory_order_relaxed),
                       control->cpu[1].load(std::memory_order_relaxed)};
}

}  // namespace agate::bench
